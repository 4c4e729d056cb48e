//! Entry points for fuzzing the header parsers, shared by the `cargo fuzz` targets (`fuzz/`,
//! their own workspace) and by the random-input tests below, which run in every `cargo test`.
//!
//! Each entry point parses a whole file's bytes as the loaders do ([`GgufIndex`](crate::gguf::GgufIndex)'s
//! header parser, [`SafetensorsIndex`](crate::SafetensorsIndex)'s), then checks what the loaders
//! rely on: every tensor's byte range lies inside the bytes. The property fuzzed is that no
//! input panics, overflows, reads out of bounds or allocates without bound; a violated invariant
//! panics here, so the fuzzer reports it.
//!
//! [`mutate`] is the mutator of the tests: bit flips, bytes set to boundary values, 8-byte
//! little-endian fields overwritten with boundary counts and lengths, truncation, insertion and
//! deletion of runs, splices of the file into itself. Starting from valid files
//! ([`seed_gguf`], [`seed_safetensors`]), it reaches the length, count and offset checks deep in
//! the headers, which purely random bytes would not get past the magic to.
use crate::gguf::{write_gguf, GgmlType, MetadataArray, MetadataValue, TensorToWrite};

/// Parses `bytes` as a GGUF file's header and checks its tensors' byte ranges; `Ok` holds the
/// number of tensors, `Err` the parser's message.
///
/// # Panics
/// If the parser accepted a tensor whose bytes lie outside `bytes` (a bug).
pub fn gguf_header(bytes: &[u8]) -> Result<usize, String> {
    let h = crate::gguf::header::parse(bytes)?;
    // (A file without tensors may end before its data section would start: nothing is read there.)
    assert!(h.alignment.is_power_of_two());
    for t in &h.tensors {
        let end = h
            .data_start
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.len))
            .expect("accepted tensor range overflows");
        assert!(
            end <= bytes.len() as u64,
            "tensor `{}` past the end",
            t.name
        );
        let expected = t.dims.get(1..).unwrap_or(&[]).iter().try_fold(
            t.ggml_type.row_bytes(t.dims.first().copied().unwrap_or(1)),
            |a, &d| Some(a.and_then(|a| a.checked_mul(d))),
        );
        let expected = expected.flatten();
        assert_eq!(expected, Some(t.len), "tensor `{}` length", t.name);
    }
    // Touch every metadata value, as a loader would.
    let described: usize = h
        .metadata
        .iter()
        .map(|(k, v)| k.len() + format!("{v:?}").len().min(1))
        .sum();
    std::hint::black_box(described);
    Ok(h.tensors.len())
}

/// Parses `bytes` as a safetensors file's header and checks its tensors' byte ranges; `Ok` holds
/// the number of tensors.
///
/// # Panics
/// If the parser accepted a tensor whose bytes lie outside `bytes` (a bug).
pub fn safetensors_header(bytes: &[u8]) -> Result<usize, String> {
    let tensors = crate::safetensors_index::locate_tensors(bytes)?;
    for t in &tensors {
        let end = t
            .offset
            .checked_add(t.len)
            .expect("accepted range overflows");
        assert!(end <= bytes.len(), "tensor `{}` past the end", t.name);
        std::hint::black_box((t.dtype, t.shape.iter().product::<usize>()));
    }
    Ok(tensors.len())
}

/// A small valid GGUF file: metadata of every value type (arrays, a nested array), and F32,
/// Q8_0, Q4_K and F16 tensors.
pub fn seed_gguf() -> Vec<u8> {
    let s = |v: &str| MetadataValue::String(v.to_string());
    let metadata = vec![
        ("general.architecture".to_string(), s("qwen3moe")),
        ("general.alignment".to_string(), MetadataValue::U32(32)),
        ("qwen3moe.block_count".to_string(), MetadataValue::U32(1)),
        (
            "qwen3moe.rope.freq_base".to_string(),
            MetadataValue::F32(1e6),
        ),
        ("a.u8".to_string(), MetadataValue::U8(7)),
        ("a.i8".to_string(), MetadataValue::I8(-7)),
        ("a.u16".to_string(), MetadataValue::U16(700)),
        ("a.i16".to_string(), MetadataValue::I16(-700)),
        ("a.i32".to_string(), MetadataValue::I32(-70000)),
        ("a.bool".to_string(), MetadataValue::Bool(true)),
        ("a.u64".to_string(), MetadataValue::U64(1 << 40)),
        ("a.i64".to_string(), MetadataValue::I64(-(1 << 40))),
        ("a.f64".to_string(), MetadataValue::F64(0.5)),
        (
            "tokenizer.ggml.tokens".to_string(),
            MetadataValue::Array(MetadataArray::String(
                ["a", "b", "<|im_start|>"].map(String::from).to_vec(),
            )),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            MetadataValue::Array(MetadataArray::I32(vec![1, 1, 3])),
        ),
        (
            "a.nested".to_string(),
            MetadataValue::Array(MetadataArray::Array(vec![
                MetadataArray::F32(vec![1.0, 2.0]),
                MetadataArray::U64(vec![3]),
            ])),
        ),
    ];
    let tensor = |name: &str, ggml_type, dims: &[u64]| TensorToWrite {
        name: name.to_string(),
        ggml_type,
        dims: dims.to_vec(),
    };
    let tensors = vec![
        tensor("output_norm.weight", GgmlType::F32, &[8]),
        tensor("blk.0.attn_q.weight", GgmlType::Q8_0, &[32, 2]),
        tensor("blk.0.ffn_gate_exps.weight", GgmlType::Q4_K, &[256, 1, 2]),
        tensor("token_embd.weight", GgmlType::F16, &[4, 3]),
    ];
    let mut out = Vec::new();
    write_gguf(&mut out, &metadata, &tensors, |i| {
        let len = tensors[i].len_bytes().unwrap_or(0) as usize;
        Ok((0..len).map(|b| (b * 31 + i) as u8).collect())
    })
    .expect("writing to a Vec");
    out
}

/// A small valid safetensors file: metadata and three tensors of different dtypes.
pub fn seed_safetensors() -> Vec<u8> {
    let header = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"BF16","shape":[4],"data_offsets":[16,24]},"c":{"dtype":"U32","shape":[1,2],"data_offsets":[24,32]}}"#;
    let mut h = header.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend((0..32u8).map(|b| b.wrapping_mul(37)));
    out
}

/// xorshift64* step.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// One to four random mutations of `file` (module docs), driven by `state`.
pub fn mutate(file: &[u8], state: &mut u64) -> Vec<u8> {
    const COUNTS: [u64; 10] = [
        0,
        1,
        2,
        31,
        255,
        1 << 16,
        1 << 32,
        u64::MAX / 2,
        u64::MAX - 7,
        u64::MAX,
    ];
    let mut out = file.to_vec();
    for _ in 0..1 + next(state) % 4 {
        let len = out.len().max(1);
        let at = (next(state) % len as u64) as usize;
        match next(state) % 8 {
            0 => {
                if let Some(b) = out.get_mut(at) {
                    *b ^= 1 << (next(state) % 8);
                }
            }
            1 => {
                if let Some(b) = out.get_mut(at) {
                    *b = [0, 1, 0x7f, 0x80, 0xff, b'"', b'{', b'['][(next(state) % 8) as usize];
                }
            }
            2 | 3 => {
                // Header fields are little-endian u64 (counts, lengths, offsets, dims) or u32
                // (types, versions): overwrite a field-sized run with a boundary value.
                let v = COUNTS[(next(state) % COUNTS.len() as u64) as usize]
                    .wrapping_add(next(state) % 3);
                let width = if next(state).is_multiple_of(2) { 8 } else { 4 };
                for (k, byte) in v.to_le_bytes()[..width].iter().enumerate() {
                    if let Some(b) = out.get_mut(at + k) {
                        *b = *byte;
                    }
                }
            }
            4 => out.truncate(at),
            5 => {
                let run = (next(state) % 16) as usize;
                let fill = next(state) as u8;
                out.splice(at..at, std::iter::repeat_n(fill, run));
            }
            6 => {
                let end = (at + 1 + (next(state) % 16) as usize).min(out.len());
                out.drain(at.min(end)..end);
            }
            _ => {
                // Copy a run of the file over another place (duplicated keys, tensor infos).
                let from = (next(state) % len as u64) as usize;
                let run = ((next(state) % 64) as usize).min(out.len().saturating_sub(from));
                let piece = out[from..from + run].to_vec();
                let end = (at + run).min(out.len());
                out.splice(at..end, piece);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    type Parser = fn(&[u8]) -> Result<usize, String>;

    fn seed() -> u64 {
        std::env::var("MOESTREAM_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
                now.map(|d| d.as_nanos() as u64).unwrap_or(1)
            })
    }

    /// `cases` mutants of `file` (and mutants of mutants), each parsed without a panic; returns
    /// how many the parser accepted. Half the cases come from fixed seeds (the same in every
    /// run), half from a fresh one.
    fn fuzz(file: &[u8], parse: Parser, cases: u64) -> usize {
        let fresh = seed();
        let mut accepted = 0;
        for case in 0..cases {
            let base = if case < cases / 2 { case } else { fresh ^ case };
            let mut state = base.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut input = mutate(file, &mut state);
            if case % 4 == 0 {
                input = mutate(&input, &mut state);
            }
            let result = std::panic::catch_unwind(|| parse(&input));
            match result {
                Ok(Ok(_)) => accepted += 1,
                Ok(Err(message)) => assert!(!message.is_empty()),
                Err(_) => panic!(
                    "case {case} panicked (replay: MOESTREAM_TEST_SEED={fresh}, input {} bytes)",
                    input.len()
                ),
            }
        }
        accepted
    }

    /// Writes the seed files into the `cargo fuzz` corpus folders (`fuzz/corpus/*/seed`):
    /// `cargo test -p moestream-formats -- --ignored write_seed_corpus`.
    #[test]
    #[ignore]
    fn write_seed_corpus() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
        for (dir, bytes) in [
            ("gguf_header", seed_gguf()),
            ("safetensors_header", seed_safetensors()),
        ] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
            std::fs::write(root.join(dir).join("seed"), bytes).unwrap();
        }
    }

    #[test]
    fn seeds_parse() {
        assert_eq!(gguf_header(&seed_gguf()), Ok(4));
        assert_eq!(safetensors_header(&seed_safetensors()), Ok(3));
    }

    /// Every file of the committed `cargo fuzz` corpus (seeds, and any crash input added there
    /// after a fix) goes through its parser without a panic; the seeds parse.
    #[test]
    fn fuzz_corpus_parses_without_panic() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
        let targets: [(&str, Parser); 2] = [
            ("gguf_header", gguf_header),
            ("safetensors_header", safetensors_header),
        ];
        for (dir, parse) in targets {
            let mut ok = 0;
            for entry in std::fs::read_dir(root.join(dir)).unwrap() {
                let path = entry.unwrap().path();
                let bytes = std::fs::read(&path).unwrap();
                ok += usize::from(parse(&bytes).is_ok());
            }
            assert!(ok >= 1, "{dir}: no corpus file parses");
        }
    }

    #[test]
    fn mutated_gguf_headers_never_panic() {
        let accepted = fuzz(&seed_gguf(), gguf_header, 200_000);
        eprintln!("gguf: 200000 mutants, {accepted} accepted");
        assert!(
            accepted > 100,
            "the mutations should leave some files valid"
        );
    }

    #[test]
    fn mutated_safetensors_headers_never_panic() {
        let accepted = fuzz(&seed_safetensors(), safetensors_header, 200_000);
        eprintln!("safetensors: 200000 mutants, {accepted} accepted");
        assert!(
            accepted > 100,
            "the mutations should leave some files valid"
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut state = seed() | 1;
        for _ in 0..2_000 {
            let len = (next(&mut state) % 512) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next(&mut state) as u8).collect();
            // Half with a valid magic, so that the GGUF parser reads further.
            if next(&mut state).is_multiple_of(2) && bytes.len() >= 8 {
                bytes[..8].copy_from_slice(b"GGUF\x03\x00\x00\x00");
            }
            let _ = gguf_header(&bytes);
            let _ = safetensors_header(&bytes);
        }
    }
}
