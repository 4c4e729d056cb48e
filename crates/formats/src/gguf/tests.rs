//! Hand-made and corrupted GGUF files.
use super::*;
use std::io::Write;

fn meta(k: &str, v: MetadataValue) -> (String, MetadataValue) {
    (k.to_string(), v)
}

fn sample_metadata() -> Vec<(String, MetadataValue)> {
    use MetadataValue as V;
    vec![
        meta("general.architecture", V::String("qwen3moe".into())),
        meta("u8", V::U8(7)),
        meta("i8", V::I8(-7)),
        meta("u16", V::U16(65535)),
        meta("i16", V::I16(-300)),
        meta("u32", V::U32(1 << 31)),
        meta("i32", V::I32(-5)),
        meta("f32", V::F32(1.5)),
        meta("bool", V::Bool(true)),
        meta("u64", V::U64(u64::MAX)),
        meta("i64", V::I64(i64::MIN)),
        meta("f64", V::F64(-2.25)),
        meta(
            "tokens",
            V::Array(MetadataArray::String(vec![
                "a".into(),
                "ü".into(),
                "".into(),
            ])),
        ),
        meta(
            "nested",
            V::Array(MetadataArray::Array(vec![
                MetadataArray::I32(vec![1, 2]),
                MetadataArray::F64(vec![]),
            ])),
        ),
    ]
}

fn sample_tensors() -> Vec<TensorToWrite> {
    vec![
        TensorToWrite {
            name: "a".into(),
            ggml_type: GgmlType::F32,
            dims: vec![3, 2],
        },
        TensorToWrite {
            name: "b".into(),
            ggml_type: GgmlType::Q4_K,
            dims: vec![256, 1, 2],
        },
    ]
}

fn sample_bytes(metadata: &[(String, MetadataValue)]) -> Vec<u8> {
    let tensors = sample_tensors();
    let mut out = Vec::new();
    write_gguf(&mut out, metadata, &tensors, |i| {
        let n = tensors[i].len_bytes().unwrap() as usize;
        Ok((0..n).map(|b| (b + i) as u8).collect())
    })
    .unwrap();
    out
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
    p
}

fn open_bytes(bytes: &[u8]) -> Result<GgufIndex, FormatError> {
    let dir = tempfile::tempdir().unwrap();
    let p = write_file(dir.path(), "m.gguf", bytes);
    GgufIndex::open(&p)
}

fn open_err(bytes: &[u8]) -> String {
    match open_bytes(bytes) {
        Ok(_) => panic!("corrupt file accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn round_trips_every_metadata_type_and_locates_tensors() {
    let md = sample_metadata();
    let idx = open_bytes(&sample_bytes(&md)).unwrap();
    assert_eq!(idx.version(), 3);
    assert_eq!(idx.metadata(), md.as_slice());
    assert_eq!(
        idx.get_metadata("general.architecture")
            .and_then(|v| v.as_str()),
        Some("qwen3moe")
    );
    let a = idx.require("a").unwrap();
    assert_eq!(a.shape(), vec![2, 3]);
    assert_eq!(a.len, 24);
    assert_eq!(a.offset % 32, 0);
    assert_eq!(a.bytes()[..3], [0, 1, 2]);
    let b = idx.require("b").unwrap();
    assert_eq!(b.shape(), vec![2, 1, 256]);
    assert_eq!(b.len, 288);
    assert_eq!(b.offset % 32, 0);
    assert_eq!(b.bytes()[..2], [1, 2]);
    assert!(idx.get("c").is_none());
    let e = idx.require("c").unwrap_err().to_string();
    assert!(e.contains("m.gguf") && e.contains("`c`"), "{e}");
}

#[test]
fn honours_general_alignment() {
    let mut md = sample_metadata();
    md.push(meta("general.alignment", MetadataValue::U32(64)));
    let idx = open_bytes(&sample_bytes(&md)).unwrap();
    for t in idx.tensors() {
        assert_eq!(t.offset % 64, 0, "{}", t.name);
    }
    assert_eq!(idx.require("b").unwrap().bytes()[0], 1);
}

/// Byte offset just after the tensor-count and kv-count fields.
const COUNTS_END: usize = 24;

#[test]
fn rejects_bad_magic_version_and_truncation() {
    let good = sample_bytes(&sample_metadata());
    let mut b = good.clone();
    b[0] = b'X';
    assert!(open_err(&b).contains("not a GGUF file"));
    let mut b = good.clone();
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert!(open_err(&b).contains("big-endian"));
    let mut b = good.clone();
    b[4..8].copy_from_slice(&7u32.to_le_bytes());
    assert!(open_err(&b).contains("version 7"));
    assert!(open_err(&good[..3]).contains("too short"));
    // Every truncation of the header or data is an error, never a panic.
    for cut in (0..good.len()).step_by(7) {
        let e = open_err(&good[..cut]);
        assert!(e.contains("m.gguf"), "{e}");
    }
}

#[test]
fn rejects_huge_counts_without_allocating() {
    let good = sample_bytes(&sample_metadata());
    for (at, what) in [(8, "tensors"), (16, "metadata entries")] {
        let mut b = good.clone();
        b[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = open_err(&b);
        assert!(e.contains(what) && e.contains("bytes left"), "{e}");
    }
    // The first key's length.
    let mut b = good.clone();
    b[COUNTS_END..COUNTS_END + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    assert!(open_err(&b).contains("string bytes"));
}

/// The position of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("needle present")
}

#[test]
fn rejects_bad_arrays_types_and_strings() {
    let good = sample_bytes(&sample_metadata());
    // The `tokens` array: key, type 9, element type 8, count 3.
    let at = find(&good, b"tokens") + 6 + 4;
    let mut b = good.clone();
    b[at + 4..at + 12].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(open_err(&b).contains("array elements"));
    let mut b = good.clone();
    b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    assert!(open_err(&b).contains("unknown array element type 99"));
    // Value type of `u8`.
    let at = find(&good, b"\x02\0\0\0\0\0\0\0u8") + 10;
    let mut b = good.clone();
    b[at..at + 4].copy_from_slice(&13u32.to_le_bytes());
    assert!(open_err(&b).contains("unknown value type 13"));
    // Bool byte.
    let at = find(&good, b"bool") + 4 + 4;
    let mut b = good.clone();
    b[at] = 2;
    assert!(open_err(&b).contains("bool byte 2"));
    // Invalid UTF-8 in a key.
    let at = find(&good, b"general.architecture");
    let mut b = good.clone();
    b[at] = 0xff;
    assert!(open_err(&b).contains("UTF-8"));
}

#[test]
fn rejects_deep_nesting() {
    let mut a = MetadataArray::U8(vec![1]);
    for _ in 0..20 {
        a = MetadataArray::Array(vec![a]);
    }
    let md = vec![meta("deep", MetadataValue::Array(a))];
    assert!(open_err(&sample_bytes(&md)).contains("nested deeper"));
}

#[test]
fn rejects_bad_tensor_infos() {
    let md = sample_metadata();
    let good = sample_bytes(&md);
    // Tensor `b`: name, n_dims (3), dims, type, offset.
    let at = find(&good, b"\x01\0\0\0\0\0\0\0b\x03\0\0\0") + 9;
    let patch = |off: usize, v: &[u8]| {
        let mut b = good.clone();
        b[at + off..at + off + v.len()].copy_from_slice(v);
        open_err(&b)
    };
    assert!(patch(0, &9u32.to_le_bytes()).contains("9 dimensions"));
    assert!(patch(0, &0u32.to_le_bytes()).contains("0 dimensions"));
    assert!(patch(4, &100u64.to_le_bytes()).contains("not whole blocks"));
    assert!(patch(12, &u64::MAX.to_le_bytes()).contains("overflow"));
    assert!(patch(20, &(1u64 << 40).to_le_bytes()).contains("beyond the end"));
    assert!(patch(28, &77u32.to_le_bytes()).contains("unknown ggml type id 77"));
    assert!(patch(32, &8u64.to_le_bytes()).contains("not a multiple of the alignment"));
    assert!(patch(32, &(u64::MAX - 31).to_le_bytes()).contains("beyond the end"));
    // A renamed tensor that duplicates another.
    let mut b = good.clone();
    b[at - 1] = b'a';
    assert!(open_err(&b).contains("appears twice"));
}

#[test]
fn rejects_bad_alignment() {
    let mut md = sample_metadata();
    md.push(meta("general.alignment", MetadataValue::U32(48)));
    let tensors = sample_tensors();
    let mut out = Vec::new();
    assert!(write_gguf(&mut out, &md, &tensors, |_| Ok(vec![])).is_err());
    // Patch a valid file's alignment to 48.
    let mut md = sample_metadata();
    md.push(meta("general.alignment", MetadataValue::U32(64)));
    let mut b = sample_bytes(&md);
    let at = find(&b, b"general.alignment") + 17 + 4;
    b[at..at + 4].copy_from_slice(&48u32.to_le_bytes());
    assert!(open_err(&b).contains("power of two"));
}

#[test]
fn opens_split_files_from_the_first_part() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = sample_tensors();
    let parts: Vec<Vec<u8>> = (0..2)
        .map(|i| {
            let mut md = if i == 0 { sample_metadata() } else { vec![] };
            md.push(meta("split.no", MetadataValue::U16(i as u16)));
            md.push(meta("split.count", MetadataValue::U16(2)));
            md.push(meta("split.tensors.count", MetadataValue::I32(2)));
            let mine = vec![tensors[i].clone()];
            let mut out = Vec::new();
            write_gguf(&mut out, &md, &mine, |_| {
                Ok(vec![i as u8 + 10; mine[0].len_bytes().unwrap() as usize])
            })
            .unwrap();
            out
        })
        .collect();
    let first = write_file(dir.path(), "m-00001-of-00002.gguf", &parts[0]);
    let second = write_file(dir.path(), "m-00002-of-00002.gguf", &parts[1]);
    let idx = GgufIndex::open(&first).unwrap();
    assert_eq!(idx.files().len(), 2);
    assert_eq!(idx.require("a").unwrap().bytes()[0], 10);
    assert_eq!(idx.require("b").unwrap().bytes()[0], 11);
    assert_eq!(idx.require("b").unwrap().file.path(), second);
    assert!(idx.get_metadata("tokens").is_some());
    let e = GgufIndex::open(&second).unwrap_err().to_string();
    assert!(e.contains("open the first part"), "{e}");
    std::fs::remove_file(&second).unwrap();
    let e = GgufIndex::open(&first).unwrap_err().to_string();
    assert!(e.contains("m-00002-of-00002.gguf"), "{e}");
    // Parts swapped.
    write_file(dir.path(), "m-00002-of-00002.gguf", &parts[0]);
    let e = GgufIndex::open(&first).unwrap_err().to_string();
    assert!(e.contains("split.no"), "{e}");
}

#[test]
fn split_names() {
    assert_eq!(
        split_name(Path::new("/x/Qwen3-30B-Q4_K_M-00001-of-00003.gguf")),
        Some(("Qwen3-30B-Q4_K_M".into(), 1, 3))
    );
    assert_eq!(split_name(Path::new("model.gguf")), None);
    assert_eq!(split_name(Path::new("m-1-of-3.gguf")), None);
    assert!(is_gguf_path(Path::new("a/b.GGUF")));
    assert!(!is_gguf_path(Path::new("a/b")));
}
