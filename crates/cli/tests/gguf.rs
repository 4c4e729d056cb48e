//! GGUF models: `score` on a Q4_K_M file equals `score` on the float checkpoint gguf-py's
//! dequantization of it gives (fixtures `qwen3_moe_gguf_q4km`, `qwen3_gguf_q4km` (dense, tied
//! embeddings), `mixtral_gguf_q4km` (`llama` arch: permuted q/k rows), and the hybrids
//! `qwen3_next_gguf_q4km`, `qwen3_5_gguf_q4km`, `qwen3_5_moe_gguf_q4km` (Gated DeltaNet with
//! the converter's transformations, Qwen3.5's tiled value heads, shared experts, MTP blocks),
//! made by `scripts/reference/make_gguf_fixtures.py`, which undoes the converter's
//! transformations in numpy), streamed equals resident, and files moestream cannot run fail
//! cleanly naming the tensor and type.
use crate::common::{assert_clean_error, moestream, score, stderr, stdout};
use std::path::PathBuf;

/// Both sides use bit-identical weights (our decoding equals gguf-py's, tested in the kernels
/// crate) and f32 activations; what remains is the order of f32 additions (block-quantized
/// rows are decoded then dotted; the float checkpoint is read directly). Measured: 3e-6 at most
/// (hybrids: 2.4e-6 in prefill, 2.8e-6 in decode steps).
const TOLERANCE: f64 = 1e-4;

/// The agreement fixtures: Qwen3-MoE (one MoE layer, one dense), dense Qwen3, Mixtral, and a
/// Gated DeltaNet layer plus a full-attention layer (and an MTP block) of each hybrid.
const FIXTURES: [&str; 6] = [
    "qwen3_moe_gguf_q4km",
    "qwen3_gguf_q4km",
    "mixtral_gguf_q4km",
    "qwen3_next_gguf_q4km",
    "qwen3_5_gguf_q4km",
    "qwen3_5_moe_gguf_q4km",
];

fn fixture() -> (PathBuf, serde_json::Value) {
    fixture_named(FIXTURES[0])
}

fn fixture_named(name: &str) -> (PathBuf, serde_json::Value) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name);
    let reference = serde_json::from_str(
        &std::fs::read_to_string(dir.join("gguf_reference.json")).expect("gguf_reference.json"),
    )
    .unwrap();
    (dir.join("model.gguf"), reference)
}

fn ids(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap().to_string())
        .collect()
}

fn worst(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn score_with(model: &std::path::Path, tokens: &str, extra: &[&str]) -> Vec<f64> {
    let mut args = vec![
        "score",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        tokens,
    ];
    args.extend(extra);
    let o = moestream(&args);
    assert!(o.status.success(), "score failed: {}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    v["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn q4_k_m_scores_equal_the_gguf_py_dequantized_checkpoint() {
    for name in FIXTURES {
        agrees_with_dequantized_checkpoint(name);
    }
}

fn agrees_with_dequantized_checkpoint(name: &str) {
    let (model, reference) = fixture_named(name);
    let tokens = ids(&reference["tokens"]).join(" ");
    let (_, ours) = score(&model, &tokens);
    let theirs: Vec<f64> = reference["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let w = worst(&ours, &theirs);
    eprintln!("{name}: gguf q4_k_m vs dequantized f32: max |Δ logprob| = {w:e}");
    assert!(w <= TOLERANCE, "{name}: max |logprob - reference| = {w:e}");
    let spread = theirs.iter().cloned().fold(f64::MIN, f64::max)
        - theirs.iter().cloned().fold(f64::MAX, f64::min);
    assert!(spread > 1.0, "{name}: reference too flat ({spread})");

    // Token by token (decode steps) with f32 activations: the same numbers.
    let decode = score_with(&model, &tokens, &["--ubatch", "1"]);
    let w = worst(&decode, &theirs);
    assert!(
        w <= TOLERANCE,
        "{name}: decode: max |logprob - reference| = {w:e}"
    );

    let prompt = ids(&reference["greedy"]["prompt"]).join(" ");
    let want = ids(&reference["greedy"]["generated"]);
    let o = moestream(&[
        "run",
        "--model",
        model.to_str().unwrap(),
        "--prompt-tokens",
        &prompt,
        "--max-tokens",
        &want.len().to_string(),
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
        "--decode-activations",
        "f32",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(
        ids(&v["generated_tokens"]),
        want,
        "{name}: greedy continuation"
    );
}

#[test]
fn streamed_gguf_experts_equal_resident() {
    for name in [
        "qwen3_moe_gguf_q4km",
        "mixtral_gguf_q4km",
        "qwen3_next_gguf_q4km",
        "qwen3_5_moe_gguf_q4km",
    ] {
        let (model, reference) = fixture_named(name);
        let tokens = ids(&reference["tokens"]).join(" ");
        let resident = score_with(&model, &tokens, &["--stream-experts", "off"]);
        for extra in [
            &["--stream-experts", "on"][..],
            &["--stream-experts", "on", "--expert-cache", "0"],
            &["--stream-experts", "on", "--stream-reads", "map"],
        ] {
            let streamed = score_with(&model, &tokens, extra);
            assert_eq!(streamed, resident, "{name} {extra:?}");
        }
    }
}

/// Decode steps with int16 activations (the default of `run`, `bench`): within the int16
/// path's error of the f32 ones (measured: 8.5e-4 at most, on the dense model's logits of
/// spread ~29; tested bound 5e-3).
#[test]
fn int16_decode_stays_close_to_f32_decode() {
    for name in FIXTURES {
        let (model, reference) = fixture_named(name);
        let tokens = ids(&reference["tokens"]).join(" ");
        let f32_steps = score_with(&model, &tokens, &["--ubatch", "1"]);
        let int16_steps = score_with(
            &model,
            &tokens,
            &["--ubatch", "1", "--decode-activations", "int16"],
        );
        let w = worst(&int16_steps, &f32_steps);
        eprintln!("{name}: int16 vs f32 decode: max |Δ logprob| = {w:e}");
        assert!(w <= 5e-3, "{name}: int16 decode: max |Δ logprob| = {w:e}");
    }
}

/// int8 activations (the default of `run`, `bench`, `serve`: prompts and decode steps of the
/// block formats), as a prefill and as decode steps, against f32 decode steps.
///
/// The bounds come from the int16 path's, scaled by the ratio of the rounding steps: both paths
/// round each span to a step of `max|x| / N` (N = 32767 for int16, 127 for int8), so every
/// product's rounding error, and to first order every log-probability's, is 32767 / 127 = 258
/// times larger with int8. The int16 test above measures at most 8.5e-4 (the dense model, logits
/// of spread ~29): 258 times that is 0.22, and the tested maximum is 0.5 for the spread of the
/// maximum over other rounding patterns (and for MoE routing, where a perturbed hidden state can
/// flip a near-tie between experts: a step, not a linear response). The mean error of int16
/// decode on the small reference models is ~2.5e-4 (`matmul` module docs): 258 times that is
/// 0.065, tested at 0.1. Measured (80 tokens): max 2.5e-2 (qwen3_moe) to 0.24 (dense qwen3),
/// mean 6.8e-3 to 7.0e-2; prefill and decode steps agree to 5e-7 or better on the attention-only
/// models and to 2.5e-2 on the hybrids (the chunked and the step-wise Gated DeltaNet differ in
/// f32, and a difference can move an activation across a rounding boundary). llama.cpp rounds
/// activations likewise (to 8 bits per 256 columns for the K-quants: coarser), and differs from
/// f32 by ~1e-2 to 0.3 on these models (`scripts/reference/llamacpp_agreement.py`); on `synth
/// --preset tiny-gguf --format gguf-q4km --seed 1` files (80 tokens) our f32 and int8 scores are
/// as far from llama.cpp's as from each other (dense qwen3: max 0.30 / mean 0.089 for f32, 0.34 /
/// 0.11 for int8; Mixtral: 0.12 / 0.0092 and 0.032 / 0.0091): the two roundings are independent.
#[test]
fn int8_scores_stay_close_to_f32() {
    for name in FIXTURES {
        let (model, reference) = fixture_named(name);
        let tokens = ids(&reference["tokens"]).join(" ");
        let f32_steps = score_with(&model, &tokens, &["--ubatch", "1"]);
        let int8_prefill = score_with(&model, &tokens, &["--decode-activations", "int8"]);
        let int8_steps = score_with(
            &model,
            &tokens,
            &["--ubatch", "1", "--decode-activations", "int8"],
        );
        let mean = |a: &[f64]| {
            a.iter()
                .zip(&f32_steps)
                .map(|(x, y)| (x - y).abs())
                .sum::<f64>()
                / a.len() as f64
        };
        for (what, int8) in [("prefill", &int8_prefill), ("decode", &int8_steps)] {
            let (w, m) = (worst(int8, &f32_steps), mean(int8));
            eprintln!("{name}: int8 {what} vs f32: max |Δ logprob| = {w:e}, mean {m:e}");
            assert!(w <= 0.5, "{name}: int8 {what}: max |Δ logprob| = {w:e}");
            assert!(m <= 0.1, "{name}: int8 {what}: mean |Δ logprob| = {m:e}");
        }
    }
}

#[test]
fn text_goes_through_the_gguf_tokenizer_and_chat_template() {
    let (model, _) = fixture();
    let o = moestream(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--text",
        "Hi <|im_start|>",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    // Bytes of "Hi " as byte-level tokens, then the special token.
    assert_eq!(ids(&v["tokens"]), ["72", "105", "32", "257"]);
    let o = moestream(&[
        "run",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "Hello",
        "--max-tokens",
        "3",
        "--temperature",
        "0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn unsupported_tensor_type_names_type_and_tensor() {
    let (model, _) = fixture();
    let mut bytes = std::fs::read(&model).unwrap();
    // blk.0.attn_q.weight's info: name, n_dims 2, dims 256 256, type Q4_K (12) -> IQ4_XS (23),
    // which is smaller, so the file still holds it.
    let name = b"blk.0.attn_q.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4 + 16;
    assert_eq!(bytes[at..at + 4], 12u32.to_le_bytes());
    bytes[at..at + 4].copy_from_slice(&23u32.to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, &bytes).unwrap();
    let o = moestream(&["score", "--model", bad.to_str().unwrap(), "--tokens", "1 2"]);
    assert_clean_error(&o, &["blk.0.attn_q.weight", "IQ4_XS", "bad.gguf"]);
    // A truncated file is a clean error too.
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let o = moestream(&["score", "--model", cut.to_str().unwrap(), "--tokens", "1 2"]);
    assert_clean_error(&o, &["cut.gguf", "beyond the end"]);
}

#[test]
fn hybrid_with_missing_ssm_metadata_names_the_key() {
    let (model, _) = fixture_named("qwen3_5_moe_gguf_q4km");
    let mut bytes = std::fs::read(&model).unwrap();
    // Misspell the key (same length, so the file stays well-formed).
    let key = b"qwen35moe.ssm.group_count";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap();
    bytes[at + key.len() - 1] = b'_';
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("no_groups.gguf");
    std::fs::write(&bad, &bytes).unwrap();
    let o = moestream(&["score", "--model", bad.to_str().unwrap(), "--tokens", "1 2"]);
    assert_clean_error(&o, &["no_groups.gguf", "qwen35moe.ssm.group_count"]);
}

#[test]
fn inspect_reports_the_gguf_recipe_and_the_hybrid_geometry() {
    let (model, _) = fixture_named("qwen3_5_moe_gguf_q4km");
    let o = moestream(&["inspect", "--model", model.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["quantization"], "GGUF Q4_K_M (general.file_type 15)");
    assert_eq!(v["architecture"], "qwen3_5_moe");
    assert_eq!(v["layers"], 2);
    assert!(v["bytes_by_format"]["q4_k"].as_u64().unwrap() > 0);
}
