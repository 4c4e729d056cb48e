//! Bad checkpoints and requests end in a clear error naming the file and tensor or field, a
//! non-zero exit, and no panic.
use crate::common::*;
use std::path::Path;

fn tiny(dir: &Path) -> std::path::PathBuf {
    synth(dir, "qwen3_moe", "hf-f32")
}

fn score_err(model: &Path) -> std::process::Output {
    moestream(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        "1 2 3",
    ])
}

#[test]
fn truncated_safetensors_file() {
    let t = tempfile::tempdir().unwrap();
    let m = tiny(t.path());
    let f = m.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
    file.set_len(len - 1000).unwrap();
    assert_clean_error(&score_err(&m), &["model.safetensors", "truncated"]);
}

#[test]
fn file_shorter_than_its_header() {
    let t = tempfile::tempdir().unwrap();
    let m = tiny(t.path());
    let f = m.join("model.safetensors");
    let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
    file.set_len(100).unwrap();
    assert_clean_error(&score_err(&m), &["model.safetensors", "header"]);
}

#[test]
fn header_offsets_past_the_end_of_the_file() {
    let t = tempfile::tempdir().unwrap();
    let m = tiny(t.path());
    let f = m.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    // Move the tensor that ends last a megabyte further out.
    let obj = header.as_object_mut().unwrap();
    let (name, last) = obj
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .max_by_key(|(_, v)| v["data_offsets"][1].as_u64().unwrap())
        .map(|(k, v)| (k.clone(), v["data_offsets"][1].as_u64().unwrap()))
        .unwrap();
    obj.get_mut(&name).unwrap()["data_offsets"][1] = serde_json::json!(last + (1 << 20));
    let mut h = serde_json::to_vec(&header).unwrap();
    while h.len() < n {
        h.push(b' ');
    }
    assert_eq!(h.len(), n, "edited header must keep its length");
    let mut out = bytes[..8].to_vec();
    out.extend(h);
    out.extend(&bytes[8 + n..]);
    std::fs::write(&f, out).unwrap();
    assert_clean_error(
        &score_err(&m),
        &["model.safetensors", &name, "past the end"],
    );
}

#[test]
fn tensor_shape_disagrees_with_config() {
    let t = tempfile::tempdir().unwrap();
    let m = tiny(t.path());
    let cfg_path = m.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["moe_intermediate_size"] = serde_json::json!(64);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert_clean_error(
        &score_err(&m),
        &[
            "model.safetensors",
            "model.layers.0.mlp.experts.0.gate_proj.weight",
            "[128, 128]",
            "[64, 128]",
        ],
    );
}

#[test]
fn missing_tensor() {
    let t = tempfile::tempdir().unwrap();
    let m = tiny(t.path());
    rewrite_safetensors(&m.join("model.safetensors"), |name, d, s, b| {
        (name != "model.layers.2.self_attn.k_norm.weight").then_some((d, s, b))
    });
    assert_clean_error(
        &score_err(&m),
        &["model.layers.2.self_attn.k_norm.weight", "not found"],
    );
}

#[test]
fn unsupported_dtype() {
    let t = tempfile::tempdir().unwrap();
    let m = tiny(t.path());
    rewrite_safetensors(&m.join("model.safetensors"), |name, d, s, b| {
        if name == "model.norm.weight" {
            let wide: Vec<u8> = b
                .chunks(4)
                .flat_map(|c| (f32::from_le_bytes(c.try_into().unwrap()) as f64).to_le_bytes())
                .collect();
            Some((safetensors::Dtype::F64, s, wide))
        } else {
            Some((d, s, b))
        }
    });
    assert_clean_error(
        &score_err(&m),
        &["model.safetensors", "model.norm.weight", "F64"],
    );
}

#[test]
fn unsupported_bit_width_in_config() {
    let t = tempfile::tempdir().unwrap();
    let m = synth(t.path(), "qwen3_moe", "mlx4");
    let cfg_path = m.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["quantization"]["bits"] = serde_json::json!(7);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert_clean_error(&score_err(&m), &["config.json", "quantization.bits", "7"]);
}

#[test]
fn unsupported_bit_width_in_tensor() {
    // A packed weight whose width implies 7 bits per code.
    let t = tempfile::tempdir().unwrap();
    let m = synth(t.path(), "qwen3_moe", "mlx4");
    rewrite_safetensors(&m.join("model.safetensors"), |name, d, mut s, b| {
        if name == "model.layers.0.self_attn.q_proj.weight" {
            // 128 inputs at 7 bits = 28 words per row.
            s[1] = 28;
            let rows = s[0];
            Some((d, s, vec![0u8; rows * 28 * 4]))
        } else {
            Some((d, s, b))
        }
    });
    assert_clean_error(
        &score_err(&m),
        &["model.layers.0.self_attn.q_proj.weight", "7 bits"],
    );
}

#[test]
fn malformed_config_json() {
    let t = tempfile::tempdir().unwrap();
    let m = tiny(t.path());
    std::fs::write(m.join("config.json"), "{\"model_type\": \"qwen3_moe\", ").unwrap();
    assert_clean_error(&score_err(&m), &["config.json", "malformed JSON"]);
    std::fs::write(
        m.join("config.json"),
        "{\"model_type\": \"qwen3_moe\", \"hidden_size\": \"big\"}",
    )
    .unwrap();
    assert_clean_error(&score_err(&m), &["config.json", "hidden_size"]);
}

#[test]
fn unknown_architecture_names_the_supported_ones() {
    let t = tempfile::tempdir().unwrap();
    let m = tiny(t.path());
    let cfg_path = m.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["model_type"] = serde_json::json!("llama4_moe");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert_clean_error(
        &score_err(&m),
        &["config.json", "llama4_moe", "qwen3_moe", "qwen3", "mixtral"],
    );
}

#[test]
fn missing_model_folder_and_token_out_of_range() {
    assert_clean_error(
        &moestream(&["score", "--model", "/nonexistent/model", "--tokens", "1"]),
        &["/nonexistent/model"],
    );
    let t = tempfile::tempdir().unwrap();
    let m = tiny(t.path());
    assert_clean_error(
        &moestream(&[
            "score",
            "--model",
            m.to_str().unwrap(),
            "--tokens",
            "1 99999",
        ]),
        &["99999", "vocabulary"],
    );
    assert_clean_error(
        &moestream(&["score", "--model", m.to_str().unwrap(), "--tokens", "1 x"]),
        &["`x`"],
    );
}

#[test]
fn prompt_longer_than_the_context() {
    let t = tempfile::tempdir().unwrap();
    let m = tiny(t.path());
    let cfg_path = m.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["max_position_embeddings"] = serde_json::json!(8);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let o = moestream(&[
        "run",
        "--model",
        m.to_str().unwrap(),
        "--prompt-tokens",
        "1 2 3 4 5 6 7 8 9 10",
        "--max-tokens",
        "2",
    ]);
    assert_clean_error(&o, &["context"]);
}
