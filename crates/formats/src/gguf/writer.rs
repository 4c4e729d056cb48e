//! Writing GGUF v3 files (random-weight test models, test fixtures).
//!
//! The header is written first, with every tensor's offset computed from the declared types and
//! shapes; the tensor data then follow one at a time, each padded to the alignment, so a writer
//! holds one tensor in memory at a time.
use super::header::{align_up, DEFAULT_ALIGNMENT, MAGIC};
use super::metadata::{MetadataArray, MetadataValue};
use super::GgmlType;
use std::io::{self, Write};

/// A tensor to write: name, type and ggml dimensions (`dims[0]` contiguous).
#[derive(Clone, Debug)]
pub struct TensorToWrite {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub ggml_type: GgmlType,
    /// ggml order: the reverse of the PyTorch/numpy shape.
    pub dims: Vec<u64>,
}

impl TensorToWrite {
    /// Bytes of data this tensor takes, if its first dimension is whole blocks.
    pub fn len_bytes(&self) -> Option<u64> {
        let first = *self.dims.first()?;
        let rows = self.dims[1..]
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))?;
        self.ggml_type.row_bytes(first)?.checked_mul(rows)
    }
}

/// Writes a GGUF v3 file: `metadata` (with `general.alignment` if it is to differ from 32),
/// `tensors`, and the data `data(i)` returns for tensor `i` (exactly
/// [`TensorToWrite::len_bytes`] bytes, checked).
pub fn write_gguf<W: Write>(
    out: &mut W,
    metadata: &[(String, MetadataValue)],
    tensors: &[TensorToWrite],
    mut data: impl FnMut(usize) -> io::Result<Vec<u8>>,
) -> io::Result<()> {
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        Some((_, MetadataValue::U32(a))) if a.is_power_of_two() => u64::from(*a),
        Some(_) => {
            return Err(invalid(
                "general.alignment must be a u32 power of two".into(),
            ))
        }
        None => DEFAULT_ALIGNMENT,
    };
    let mut head = Vec::new();
    head.extend(MAGIC.to_le_bytes());
    head.extend(3u32.to_le_bytes());
    head.extend((tensors.len() as u64).to_le_bytes());
    head.extend((metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_string(&mut head, k);
        head.extend(v.value_type().id().to_le_bytes());
        put_value(&mut head, v);
    }
    let mut lens = Vec::with_capacity(tensors.len());
    let mut offset = 0u64;
    for t in tensors {
        let len = t.len_bytes().ok_or_else(|| {
            invalid(format!(
                "tensor `{}`: {:?} is not whole {} blocks",
                t.name, t.dims, t.ggml_type
            ))
        })?;
        put_string(&mut head, &t.name);
        head.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            head.extend(d.to_le_bytes());
        }
        head.extend(t.ggml_type.id().to_le_bytes());
        head.extend(offset.to_le_bytes());
        lens.push(len);
        offset = align_up(offset + len, alignment).ok_or_else(|| invalid("too large".into()))?;
    }
    let pad = |n: u64| vec![0u8; (align_up(n, alignment).unwrap_or(n) - n) as usize];
    let head_len = head.len() as u64;
    head.extend(pad(head_len));
    out.write_all(&head)?;
    for (i, (t, len)) in tensors.iter().zip(lens).enumerate() {
        let bytes = data(i)?;
        if bytes.len() as u64 != len {
            return Err(invalid(format!(
                "tensor `{}`: {} bytes of data, its shape and type need {len}",
                t.name,
                bytes.len()
            )));
        }
        out.write_all(&bytes)?;
        out.write_all(&pad(len))?;
    }
    Ok(())
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &MetadataValue) {
    use MetadataValue as V;
    match v {
        V::U8(x) => out.extend(x.to_le_bytes()),
        V::I8(x) => out.extend(x.to_le_bytes()),
        V::U16(x) => out.extend(x.to_le_bytes()),
        V::I16(x) => out.extend(x.to_le_bytes()),
        V::U32(x) => out.extend(x.to_le_bytes()),
        V::I32(x) => out.extend(x.to_le_bytes()),
        V::F32(x) => out.extend(x.to_le_bytes()),
        V::Bool(x) => out.push(u8::from(*x)),
        V::String(s) => put_string(out, s),
        V::Array(a) => put_array(out, a),
        V::U64(x) => out.extend(x.to_le_bytes()),
        V::I64(x) => out.extend(x.to_le_bytes()),
        V::F64(x) => out.extend(x.to_le_bytes()),
    }
}

fn put_array(out: &mut Vec<u8>, a: &MetadataArray) {
    use MetadataArray as A;
    out.extend(a.element_type().id().to_le_bytes());
    out.extend((a.len() as u64).to_le_bytes());
    match a {
        A::U8(v) => out.extend(v),
        A::I8(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        A::U16(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        A::I16(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        A::U32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        A::I32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        A::F32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        A::Bool(v) => v.iter().for_each(|x| out.push(u8::from(*x))),
        A::String(v) => v.iter().for_each(|s| put_string(out, s)),
        A::Array(v) => v.iter().for_each(|a| put_array(out, a)),
        A::U64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        A::I64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        A::F64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
    }
}
