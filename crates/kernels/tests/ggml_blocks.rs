//! Our decoding of every ggml block type equals gguf-py's `gguf.quants.dequantize` bit for bit,
//! on the random blocks of `tests/fixtures/ggml_blocks/blocks.gguf`
//! (made by `scripts/reference/make_gguf_blocks.py`; the file itself is written by gguf-py's
//! GGUFWriter, so reading it also checks our GGUF reader against gguf-py's writer).
use moestream_formats::gguf::{GgmlType, GgufIndex};
use moestream_kernels::ggml::BlockFormat;
use moestream_kernels::{dequantize_row, FloatKind, Matrix, Weights};
use std::path::PathBuf;

fn fixture() -> GgufIndex {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/ggml_blocks/blocks.gguf");
    GgufIndex::open(&p).expect("fixture opens")
}

#[test]
fn every_type_matches_gguf_py_bit_for_bit() {
    let idx = fixture();
    let mut checked = Vec::new();
    for t in idx
        .tensors()
        .iter()
        .filter(|t| t.name.starts_with("blocks."))
    {
        let name = &t.name["blocks.".len()..];
        let want = idx.require(&format!("dequant.{name}")).unwrap();
        assert_eq!(want.ggml_type, GgmlType::F32);
        assert_eq!(want.dims, t.dims);
        let (rows, cols) = (t.shape()[0], t.shape()[1]);
        let weights = match t.ggml_type {
            GgmlType::F32 => Weights::Float {
                kind: FloatKind::F32,
                data: t.bytes(),
            },
            GgmlType::F16 => Weights::Float {
                kind: FloatKind::F16,
                data: t.bytes(),
            },
            GgmlType::BF16 => Weights::Float {
                kind: FloatKind::BF16,
                data: t.bytes(),
            },
            other => Weights::Ggml {
                format: BlockFormat::from_name(other.name()).expect("a supported type"),
                data: t.bytes(),
            },
        };
        let m = Matrix {
            rows,
            cols,
            weights,
        };
        m.validate().unwrap();
        let mut row = vec![0f32; cols];
        let mut differ = 0;
        for r in 0..rows {
            dequantize_row(&m, r, &mut row);
            for (c, v) in row.iter().enumerate() {
                let at = (r * cols + c) * 4;
                let w = f32::from_le_bytes(want.bytes()[at..at + 4].try_into().unwrap());
                if v.to_bits() != w.to_bits() {
                    differ += 1;
                    assert!(differ > 5, "{name} [{r},{c}]: {v} vs gguf-py {w}");
                }
            }
        }
        assert_eq!(differ, 0, "{name}: {differ} values differ from gguf-py");
        checked.push(name.to_string());
    }
    checked.sort();
    assert_eq!(
        checked,
        ["BF16", "F16", "F32", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_K", "Q6_K", "Q8_0"]
    );
}
