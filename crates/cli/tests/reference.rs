//! Agreement with references nobody here wrote, on committed fixtures: small random-weight models
//! made by transformers (HF float32 checkpoints) and converted by mlx-lm (MLX quantized
//! checkpoints), each with the reference's own log-probabilities and greedy continuation in
//! `reference.json` (see scripts/reference/). Tolerance: 1e-4 absolute on log-probabilities (F32
//! activations; what remains is accumulation order), greedy tokens identical.
use crate::common::*;
use std::path::PathBuf;

const TOLERANCE: f64 = 1e-4;

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models")
}

fn check_fixture(name: &str) {
    let dir = fixtures_dir().join(name);
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("reference.json"))
            .unwrap_or_else(|e| panic!("{name}: reference.json: {e}")),
    )
    .unwrap();
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap().to_string())
            .collect()
    };
    let tokens = ids(&reference["tokens"]);
    assert!(
        tokens.len() > 64,
        "{name}: the prompt must be longer than 64 tokens"
    );
    let (_, ours) = score(&dir, &tokens.join(" "));
    let theirs: Vec<f64> = reference["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(ours.len(), theirs.len(), "{name}");
    let worst = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        worst <= TOLERANCE,
        "{name}: max |logprob - {}| = {worst:e}",
        reference["source"]
    );
    // The reference logprobs must not be trivially uniform (a broken engine could match those).
    let spread = theirs.iter().cloned().fold(f64::MIN, f64::max)
        - theirs.iter().cloned().fold(f64::MAX, f64::min);
    assert!(
        spread > 1.0,
        "{name}: reference log-probabilities are too flat to test anything ({spread})"
    );

    let prompt = ids(&reference["greedy"]["prompt"]);
    let want = ids(&reference["greedy"]["generated"]);
    let o = moestream(&[
        "run",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-tokens",
        &prompt.join(" "),
        "--max-tokens",
        &want.len().to_string(),
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ]);
    assert!(o.status.success(), "{name}: {}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(
        ids(&v["generated_tokens"]),
        want,
        "{name}: greedy continuation differs from {}",
        reference["source"]
    );
}

/// Every fixture folder is checked; the list below must all be present so a lost fixture fails.
#[test]
fn all_fixtures_match_their_reference() {
    let mut names: Vec<String> = std::fs::read_dir(fixtures_dir())
        .expect("tests/fixtures/models exists")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("reference.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for required in [
        "qwen3_moe_a",
        "qwen3_moe_b",
        "qwen3_dense",
        "mixtral",
        "qwen3_moe_a_mlx4",
        "qwen3_moe_a_mlx8",
        "mixtral_mlx4",
        "mixtral_mlx8",
        "qwen3_dense_mlx4",
    ] {
        assert!(
            names.iter().any(|n| n == required),
            "fixture {required} is missing (have {names:?})"
        );
    }
    for n in &names {
        check_fixture(n);
    }
    eprintln!("checked {} fixtures: {names:?}", names.len());
}
