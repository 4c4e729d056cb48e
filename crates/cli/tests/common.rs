//! Helpers shared by the integration tests.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary under test: `MOESTREAM_BIN` when set (a test binary carried to another machine,
/// such as the GPU machine, with the binary beside it), else the one cargo built.
pub fn bin() -> PathBuf {
    std::env::var_os("MOESTREAM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_moestream")))
}

pub fn moestream(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("MOESTREAM_LOG", "error")
        .output()
        .expect("spawn moestream")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a clean failure: exit code 1 (not a panic's 101), no panic message, and an error
/// message that contains every `needles` string.
pub fn assert_clean_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "expected exit 1, stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    for n in needles {
        assert!(err.contains(n), "error message lacks `{n}`: {err}");
    }
}

/// Writes a synthetic model and returns its folder.
pub fn synth(dir: &Path, arch: &str, format: &str) -> PathBuf {
    let out = dir.join(format!("{arch}-{format}"));
    let o = moestream(&[
        "synth",
        "--arch",
        arch,
        "--preset",
        "tiny",
        "--format",
        format,
        "--seed",
        "1",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "synth failed: {}", stderr(&o));
    out
}

pub fn score(model: &Path, tokens: &str) -> (Vec<u32>, Vec<f64>) {
    let o = moestream(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        tokens,
    ]);
    assert!(o.status.success(), "score failed: {}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_str(stdout(&o).trim()).expect("score prints one JSON object");
    let toks = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let lps = v["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    (toks, lps)
}

/// Rewrites a safetensors file, passing each tensor through `edit` (return None to drop it).
pub fn rewrite_safetensors(
    path: &Path,
    edit: impl Fn(
        &str,
        safetensors::Dtype,
        Vec<usize>,
        Vec<u8>,
    ) -> Option<(safetensors::Dtype, Vec<usize>, Vec<u8>)>,
) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = vec![];
    for (name, view) in st.tensors() {
        if let Some(t) = edit(
            &name,
            view.dtype(),
            view.shape().to_vec(),
            view.data().to_vec(),
        ) {
            out.push((name, t));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = out
        .iter()
        .map(|(n, (d, s, b))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Copies every file of model folder `from` into the existing folder `to`.
pub fn copy_files(from: &Path, to: &Path) {
    for f in std::fs::read_dir(from).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
    }
}

/// The token ids of 24 greedy tokens after a fixed prompt (as JSON text), with `extra` options.
pub fn greedy_ids(model: &Path, extra: &[&str]) -> String {
    run_json(model, 24, extra)["generated_tokens"].to_string()
}

/// `run --json` on `model` after the prompt `5 9 44 3 17 250 8 1 99 31`, `max_tokens` tokens
/// without stopping at EOS, plus `extra`: its JSON object.
pub fn run_json(model: &Path, max_tokens: usize, extra: &[&str]) -> serde_json::Value {
    let max = max_tokens.to_string();
    let mut args = vec![
        "run",
        "--model",
        model.to_str().unwrap(),
        "--prompt-tokens",
        "5 9 44 3 17 250 8 1 99 31",
        "--max-tokens",
        &max,
        "--ignore-eos",
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = moestream(&args);
    assert!(o.status.success(), "run failed: {}", stderr(&o));
    serde_json::from_str(stdout(&o).trim()).expect("run --json prints one object")
}

/// The `logprobs` of `score`'s JSON output.
pub fn score_logprobs(o: &Output) -> Vec<f64> {
    let v: serde_json::Value =
        serde_json::from_str(stdout(o).trim()).expect("score prints one JSON object");
    v["logprobs"]
        .as_array()
        .expect("logprobs")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}
