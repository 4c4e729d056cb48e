//! Parser of a GGUF header: magic, version, metadata, tensor infos, data section start.
//!
//! The parser reads from the file's bytes through a bounds-checked cursor and never trusts a
//! count: before allocating room for `n` things it checks that the bytes left in the file could
//! hold `n` of them (each takes at least [`ValueType::min_bytes`]), so a hostile header can make
//! it allocate at most a small multiple of the file's size. Array nesting is limited
//! ([`MAX_NESTING`]) so that recursion cannot overflow the stack. Every offset and size is
//! computed with checked arithmetic and checked against the file's length.
use super::metadata::{MetadataArray, MetadataValue, ValueType};
use super::GgmlType;

/// Deepest array-of-arrays accepted (llama.cpp files use none).
pub(super) const MAX_NESTING: usize = 8;
/// ggml tensors have at most four dimensions.
pub(super) const MAX_DIMS: usize = 4;
/// `"GGUF"` read as a little-endian u32.
pub(super) const MAGIC: u32 = 0x4655_4747;
/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// One tensor as the header declares it.
#[derive(Clone, Debug)]
pub(crate) struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous dimension.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte offset from the start of the data section.
    pub offset: u64,
    /// Byte length (validated: whole blocks, no overflow).
    pub len: u64,
}

/// A parsed header.
#[derive(Clone, Debug)]
pub(crate) struct Header {
    pub version: u32,
    pub metadata: Vec<(String, MetadataValue)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_start: u64,
}

/// Parses and validates the header of a GGUF file whose bytes are `bytes`. The error is the
/// problem, without the file name (the caller adds it).
pub(crate) fn parse(bytes: &[u8]) -> Result<Header, String> {
    let mut c = Cursor { bytes, pos: 0 };
    let magic = c
        .u32()
        .map_err(|_| "file too short for a GGUF header".to_string())?;
    if magic != MAGIC {
        return Err(format!(
            "not a GGUF file (magic {:02x?}, expected \"GGUF\")",
            magic.to_le_bytes()
        ));
    }
    let version = c.u32()?;
    match version {
        2 | 3 => {}
        1 => return Err("GGUF version 1 is not supported (only 2 and 3)".into()),
        v if v.swap_bytes() <= 3 => {
            return Err(format!(
                "GGUF version {v} looks byte-swapped: big-endian GGUF files are not supported"
            ))
        }
        v => return Err(format!("unsupported GGUF version {v} (supported: 2, 3)")),
    }
    let n_tensors = c.u64()?;
    let n_kv = c.u64()?;
    // Each metadata entry takes at least a key length, a type and a 1-byte value; each tensor
    // info at least a name length, n_dims, one dim, a type and an offset.
    let n_kv = c.count(n_kv, 8 + 4 + 1, "metadata entries")?;
    let n_tensors = c.count(n_tensors, 8 + 4 + 8 + 4 + 8, "tensors")?;

    let mut metadata: Vec<(String, MetadataValue)> = Vec::with_capacity(n_kv);
    let mut keys = std::collections::HashSet::with_capacity(n_kv);
    for i in 0..n_kv {
        let key = c
            .string()
            .map_err(|e| format!("metadata entry {i}: key: {e}"))?;
        let ty = c.u32()?;
        let ty = ValueType::from_id(ty)
            .ok_or_else(|| format!("metadata `{key}`: unknown value type {ty}"))?;
        let value = c
            .value(ty, 0)
            .map_err(|e| format!("metadata `{key}`: {e}"))?;
        if !keys.insert(key.clone()) {
            return Err(format!("metadata key `{key}` appears twice"));
        }
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, MetadataValue::U32(a))) if a.is_power_of_two() => u64::from(*a),
        Some((_, v)) => {
            return Err(format!(
                "general.alignment must be a u32 power of two, found {v:?}"
            ))
        }
    };

    let mut tensors = Vec::with_capacity(n_tensors);
    let mut names = std::collections::HashSet::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = c.string().map_err(|e| format!("tensor {i}: name: {e}"))?;
        let t = tensor_info(&mut c, name, alignment).map_err(|e| format!("tensor {i} {e}"))?;
        if !names.insert(t.name.clone()) {
            return Err(format!("tensor `{}` appears twice", t.name));
        }
        tensors.push(t);
    }
    let data_start = align_up(c.pos as u64, alignment)
        .ok_or_else(|| "data section offset overflows".to_string())?;
    let file_len = bytes.len() as u64;
    for t in &tensors {
        let end = data_start
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.len));
        match end {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(format!(
                    "tensor `{}`: bytes [{}, +{}) of the data section (which starts at {data_start}) lie beyond the end of the file ({file_len} bytes)",
                    t.name, t.offset, t.len
                ))
            }
        }
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_start,
    })
}

fn tensor_info(c: &mut Cursor, name: String, alignment: u64) -> Result<TensorInfo, String> {
    let here = |e: String| format!("`{name}`: {e}");
    let n_dims = c.u32().map_err(here)? as usize;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(here(format!(
            "{n_dims} dimensions (ggml tensors have 1 to {MAX_DIMS})"
        )));
    }
    let mut dims = Vec::with_capacity(n_dims);
    for _ in 0..n_dims {
        dims.push(c.u64().map_err(here)?);
    }
    let ty = c.u32().map_err(here)?;
    let ggml_type =
        GgmlType::from_id(ty).ok_or_else(|| here(format!("unknown ggml type id {ty}")))?;
    let offset = c.u64().map_err(here)?;
    let elements = dims
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(|| here(format!("dimensions {dims:?} overflow")))?;
    let row = ggml_type.row_bytes(dims[0]).ok_or_else(|| {
        here(format!(
            "{ggml_type} rows of {} elements are not whole blocks of {}",
            dims[0],
            ggml_type.block_elements()
        ))
    })?;
    let rows = elements.checked_div(dims[0]).unwrap_or(0);
    let len = row
        .checked_mul(rows)
        .ok_or_else(|| here(format!("byte size of {dims:?} {ggml_type} overflows")))?;
    if !offset.is_multiple_of(alignment) {
        return Err(here(format!(
            "data offset {offset} is not a multiple of the alignment {alignment}"
        )));
    }
    Ok(TensorInfo {
        name,
        dims,
        ggml_type,
        offset,
        len,
    })
}

/// `x` rounded up to a multiple of `align` (a power of two), if it fits.
pub(super) fn align_up(x: u64, align: u64) -> Option<u64> {
    Some(x.checked_add(align - 1)? & !(align - 1))
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn left(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if n > self.left() {
            return Err(format!(
                "needs {n} bytes at offset {}, the file ends after {}",
                self.pos,
                self.left()
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A declared count of things of at least `min_bytes` each, checked against the bytes left.
    fn count(&self, n: u64, min_bytes: usize, what: &str) -> Result<usize, String> {
        match usize::try_from(n) {
            Ok(n) if n.checked_mul(min_bytes).is_some_and(|b| b <= self.left()) => Ok(n),
            _ => Err(format!(
                "{n} {what} declared at offset {}, more than the {} bytes left could hold",
                self.pos,
                self.left()
            )),
        }
    }

    fn string(&mut self) -> Result<String, String> {
        let len = self.u64()?;
        let len = self.count(len, 1, "string bytes")?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| format!("string is not UTF-8: {e}"))
    }

    fn value(&mut self, ty: ValueType, depth: usize) -> Result<MetadataValue, String> {
        use MetadataValue as V;
        Ok(match ty {
            ValueType::U8 => V::U8(u8::from_le_bytes(self.array()?)),
            ValueType::I8 => V::I8(i8::from_le_bytes(self.array()?)),
            ValueType::U16 => V::U16(u16::from_le_bytes(self.array()?)),
            ValueType::I16 => V::I16(i16::from_le_bytes(self.array()?)),
            ValueType::U32 => V::U32(self.u32()?),
            ValueType::I32 => V::I32(i32::from_le_bytes(self.array()?)),
            ValueType::F32 => V::F32(f32::from_le_bytes(self.array()?)),
            ValueType::Bool => V::Bool(self.bool()?),
            ValueType::String => V::String(self.string()?),
            ValueType::Array => V::Array(self.array_value(depth)?),
            ValueType::U64 => V::U64(self.u64()?),
            ValueType::I64 => V::I64(i64::from_le_bytes(self.array()?)),
            ValueType::F64 => V::F64(f64::from_le_bytes(self.array()?)),
        })
    }

    fn bool(&mut self) -> Result<bool, String> {
        match self.array::<1>()?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(format!("bool byte {b} (must be 0 or 1)")),
        }
    }

    fn array_value(&mut self, depth: usize) -> Result<MetadataArray, String> {
        if depth >= MAX_NESTING {
            return Err(format!("arrays nested deeper than {MAX_NESTING}"));
        }
        let ty = self.u32()?;
        let ty =
            ValueType::from_id(ty).ok_or_else(|| format!("unknown array element type {ty}"))?;
        let n = self.u64()?;
        let n = self.count(n, ty.min_bytes(), "array elements")?;
        use MetadataArray as A;
        fn many<T>(n: usize, mut f: impl FnMut() -> Result<T, String>) -> Result<Vec<T>, String> {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(f()?);
            }
            Ok(v)
        }
        Ok(match ty {
            ValueType::U8 => A::U8(self.take(n)?.to_vec()),
            ValueType::I8 => A::I8(self.take(n)?.iter().map(|&b| b as i8).collect()),
            ValueType::U16 => A::U16(many(n, || Ok(u16::from_le_bytes(self.array()?)))?),
            ValueType::I16 => A::I16(many(n, || Ok(i16::from_le_bytes(self.array()?)))?),
            ValueType::U32 => A::U32(many(n, || self.u32())?),
            ValueType::I32 => A::I32(many(n, || Ok(i32::from_le_bytes(self.array()?)))?),
            ValueType::F32 => A::F32(many(n, || Ok(f32::from_le_bytes(self.array()?)))?),
            ValueType::Bool => A::Bool(many(n, || self.bool())?),
            ValueType::String => A::String(many(n, || self.string())?),
            ValueType::Array => A::Array(many(n, || self.array_value(depth + 1))?),
            ValueType::U64 => A::U64(many(n, || self.u64())?),
            ValueType::I64 => A::I64(many(n, || Ok(i64::from_le_bytes(self.array()?)))?),
            ValueType::F64 => A::F64(many(n, || Ok(f64::from_le_bytes(self.array()?)))?),
        })
    }
}
