//! Speculative decoding: the verification pass and taking back rejected tokens must leave
//! exactly what plain decoding computes, bit for bit, for every architecture and format,
//! resident and streamed; and `run` with a draft must print the tokens `run` prints without.
use crate::common::*;
use moestream_engine::cache::SequenceCache;
use moestream_engine::models::{Logits, Model};
use moestream_engine::store::{StoreOptions, StreamMode};
use std::path::{Path, PathBuf};

fn tokens(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 37 + salt * 11 + 5) % 500)
        .collect()
}

fn all_models(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for arch in [
        "qwen3_moe",
        "qwen3",
        "mixtral",
        "qwen3_next",
        "qwen3_5",
        "qwen3_5_moe",
    ] {
        for format in ["hf-f32", "mlx4"] {
            v.push(synth(dir, arch, format));
        }
    }
    v
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Logits of `steps` fed one decode step at a time.
fn stepped(m: &Model, cache: &mut SequenceCache, steps: &[u32]) -> Vec<Vec<u32>> {
    steps
        .iter()
        .map(|&t| bits(&m.forward(&[t], cache, Logits::Last).expect("step")))
        .collect()
}

/// Rounds of verify-then-take-back with varying acceptance leave the logits of plain decoding:
/// each verified row equals the step's, and after taking back, the next steps equal those of a
/// sequence that never saw the rejected tokens.
fn check_rounds(m: &Model, what: &str) {
    let v = m.config.vocab_size;
    let prompt = tokens(70, 1);
    let cont = tokens(40, 2);
    let mut plain = m.new_cache(256);
    m.forward(&prompt, &mut plain, Logits::Last)
        .expect("prefill");
    let want = stepped(m, &mut plain, &cont);

    let mut spec = m.new_cache(256);
    m.forward(&prompt, &mut spec, Logits::Last)
        .expect("prefill");
    let mut at = 0; // tokens of `cont` fed so far
    let mut round = 0;
    while at + 6 <= cont.len() {
        // Verify cont[at] plus 4 drafted tokens, of which the first `keep - 1` are right.
        let keep = [1, 5, 3, 2, 1, 4][round % 6];
        let mut drafted: Vec<u32> = cont[at..at + 5].to_vec();
        for d in drafted.iter_mut().skip(keep) {
            *d = (*d + 101) % 500; // wrong from here on
        }
        let start = spec.len();
        let logits = m.verify(&drafted, &mut spec).expect("verify");
        assert_eq!(spec.len(), start + 5);
        for (j, row) in logits.chunks_exact(v).take(keep).enumerate() {
            assert!(
                bits(row) == want[at + j],
                "{what}: round {round}, verified position {j} differs from the decode step"
            );
        }
        m.take_back(&mut spec, start + keep).expect("take back");
        assert_eq!(spec.len(), start + keep);
        at += keep;
        round += 1;
    }
    // After all the rejections, plain steps continue exactly as the uninterrupted run.
    let rest = stepped(m, &mut spec, &cont[at..]);
    assert!(
        rest == want[at..],
        "{what}: steps after {round} rounds differ"
    );
}

#[test]
fn verify_and_take_back_equal_plain_decoding() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for dir in all_models(tmp.path()) {
        let what = dir.file_name().unwrap().to_string_lossy().into_owned();
        let m = Model::load(&dir).expect("load");
        check_rounds(&m, &what);
        if m.experts.experts_in(0) > 0 {
            let opts = StoreOptions {
                stream: StreamMode::On,
                ..StoreOptions::default()
            };
            let streamed = Model::load_with(&dir, &opts).expect("load streamed");
            check_rounds(&streamed, &format!("{what} streamed"));
        }
    }
}

#[test]
fn take_back_refuses_what_it_cannot_do_exactly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = synth(tmp.path(), "qwen3_5", "hf-f32");
    let m = Model::load(&dir).expect("load");
    let mut c = m.new_cache(64);
    m.forward(&tokens(10, 1), &mut c, Logits::Last)
        .expect("prefill");
    // Not after a plain pass: there is no trail to replay.
    let err = m.take_back(&mut c, 5).expect_err("no trail");
    assert!(err.contains("verification"), "{err}");
    m.verify(&tokens(4, 2), &mut c).expect("verify");
    // Not before the verification pass began.
    assert!(m.take_back(&mut c, 9).is_err());
    assert_eq!(c.len(), 14);
    m.take_back(&mut c, 12).expect("within the pass");
    assert_eq!(c.len(), 12);
}

fn run_json(model: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "run",
        "--model",
        model.to_str().unwrap(),
        "--prompt-tokens",
        "3 1 4 1 5 9 2 6 5 3 5 8 9 7 9 3 2 3 8 4 6 2 6 4 3 3 8 3 2 7 9 5",
        "--max-tokens",
        "40",
        "--ignore-eos",
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = moestream(&args);
    assert!(o.status.success(), "run {extra:?}: {}", stderr(&o));
    let line = stdout(&o)
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("json line")
        .to_string();
    serde_json::from_str(&line).expect("json")
}

/// `run` with a draft prints the tokens `run` prints without, for dense, MoE and hybrid
/// targets, resident and streamed, with a draft that agrees often (the target's own weights at
/// 8 bits, or the target itself) and one that rarely does (another seed: many rejections, so
/// hybrid states are taken back again and again), and with prompt lookup.
#[test]
fn greedy_run_with_a_draft_equals_run_without() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for arch in ["qwen3", "qwen3_moe", "mixtral", "qwen3_5_moe", "qwen3_next"] {
        let target = synth(tmp.path(), arch, "hf-f32");
        // The target's own weights at 8 bits; synth's hybrid layouts differ between the HF and
        // MLX formats (names, norms), so there the draft that always agrees is the target.
        let close = if arch.starts_with("qwen3_5") || arch == "qwen3_next" {
            target.clone()
        } else {
            synth(tmp.path(), arch, "mlx8")
        };
        let other = tmp.path().join(format!("{arch}-other"));
        let o = moestream(&[
            "synth",
            "--arch",
            arch,
            "--preset",
            "tiny",
            "--format",
            "mlx4",
            "--seed",
            "7",
            other.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let streams: &[&str] = if arch == "qwen3" {
            &["off"]
        } else {
            &["off", "on"]
        };
        for &stream in streams {
            let base = &["--stream-experts", stream];
            let want = run_json(&target, base)["generated_tokens"].clone();
            assert_eq!(want.as_array().map(Vec::len), Some(40));
            let mut accepted = Vec::new();
            for (draft, name) in [(&close, "close"), (&other, "other")] {
                let d = draft.to_str().unwrap();
                let got = run_json(
                    &target,
                    &[base[0], base[1], "--draft-model", d, "--fixed-draft-length"],
                );
                assert_eq!(
                    got["generated_tokens"], want,
                    "{arch} stream {stream}, {name} draft"
                );
                let s = &got["speculation"];
                assert!(s["verify_passes"].as_u64() > Some(0), "{arch}: {s}");
                accepted.push(s["accepted"].as_f64().unwrap() / s["proposed"].as_f64().unwrap());
            }
            assert!(
                accepted[0] >= accepted[1] && accepted[0] > 0.3,
                "{arch}: the 8-bit draft should agree more often: {accepted:?}"
            );
            let got = run_json(&target, &[base[0], base[1], "--prompt-lookup"]);
            assert_eq!(got["generated_tokens"], want, "{arch} prompt lookup");
        }
    }
}

/// `synth --residual-scale` makes the high-acceptance pair of the MoE speculation benchmark: with
/// the layers' additions to the residual stream scaled down, a one-layer model of the same seed
/// and scale drafts the full model's greedy tokens, and those tokens differ from position to
/// position (each position routes to its own experts, as real text does). The run with the draft
/// equals the run without, resident and streamed.
#[test]
fn a_one_layer_draft_predicts_a_small_residual_target() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let synth_scaled = |name: &str, extra: &[&str]| -> PathBuf {
        let out = tmp.path().join(name);
        let mut args = vec![
            "synth",
            "--arch",
            "qwen3_moe",
            "--preset",
            "tiny",
            "--format",
            "mlx4",
            "--seed",
            "9",
            "--residual-scale",
            "0.01",
        ];
        args.extend_from_slice(extra);
        args.push(out.to_str().unwrap());
        let o = moestream(&args);
        assert!(o.status.success(), "synth: {}", stderr(&o));
        out
    };
    let target = synth_scaled("target", &[]);
    let draft = synth_scaled("draft", &["--layers", "1"]);
    for stream in ["off", "on"] {
        let base = ["--stream-experts", stream];
        let want = run_json(&target, &base)["generated_tokens"].clone();
        let d = draft.to_str().unwrap();
        let got = run_json(
            &target,
            &[base[0], base[1], "--draft-model", d, "--fixed-draft-length"],
        );
        assert_eq!(got["generated_tokens"], want, "stream {stream}");
        let s = &got["speculation"];
        let (accepted, proposed) = (s["accepted"].as_u64(), s["proposed"].as_u64());
        assert!(
            accepted
                .zip(proposed)
                .is_some_and(|(a, p)| p > 0 && 5 * a >= 4 * p),
            "stream {stream}: the one-layer draft should agree at least 80% of the time: {s}"
        );
        let distinct: std::collections::HashSet<u64> = want
            .as_array()
            .expect("tokens")
            .iter()
            .filter_map(|t| t.as_u64())
            .collect();
        assert!(distinct.len() >= 8, "tokens should vary: {want}");
    }
    // The scale is refused where it would be ignored.
    let o = synth_tiny_gguf(&tmp.path().join("x.gguf"), &["--residual-scale", "0.5"]);
    assert!(!o.status.success() && stderr(&o).contains("--residual-scale"));
}

/// `synth` of the tiny Qwen3-MoE preset as a Q4_K_M GGUF file `out`, with `extra` options.
fn synth_tiny_gguf(out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "synth",
        "--arch",
        "qwen3_moe",
        "--preset",
        "tiny-gguf",
        "--format",
        "gguf-q4km",
    ];
    args.extend_from_slice(extra);
    args.push(out.to_str().unwrap());
    moestream(&args)
}

/// A GGUF file drafts for a GGUF target: the vocabularies are compared from the files' own
/// metadata (no tokenizer.json beside them), and with the target as its own draft every
/// proposal is kept and the tokens are those of plain decoding.
#[test]
fn a_gguf_draft_is_checked_by_its_metadata_vocabulary() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let m = tmp.path().join("m.gguf");
    let o = synth_tiny_gguf(&m, &[]);
    assert!(o.status.success(), "synth: {}", stderr(&o));
    let want = run_json(&m, &[])["generated_tokens"].clone();
    let d = m.to_str().unwrap();
    let got = run_json(&m, &["--draft-model", d, "--fixed-draft-length"]);
    assert_eq!(got["generated_tokens"], want);
    let s = &got["speculation"];
    assert!(
        s["proposed"].as_u64() > Some(0) && s["accepted"] == s["proposed"],
        "the target drafting for itself: {s}"
    );
}

/// Sampling with a draft keeps the target's distribution: over many seeds, the first tokens of
/// runs with and without speculation have close frequencies (the exact law is tested on the
/// sampler itself; this checks the wiring).
#[test]
fn sampled_run_with_a_draft_runs_and_reports() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let target = synth(tmp.path(), "qwen3_moe", "hf-f32");
    let draft = synth(tmp.path(), "qwen3_moe", "mlx8");
    let got = run_json(
        &target,
        &[
            "--temperature",
            "0.8",
            "--seed",
            "5",
            "--draft-model",
            draft.to_str().unwrap(),
        ],
    );
    assert_eq!(got["generated_tokens"].as_array().map(Vec::len), Some(40));
    assert!(got["speculation"]["proposed"].as_u64().is_some());
}

#[test]
fn a_draft_with_another_vocabulary_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let target = synth(tmp.path(), "qwen3_moe", "mlx4");
    let mixtral = synth(tmp.path(), "mixtral", "mlx4");
    let o = moestream(&[
        "run",
        "--model",
        target.to_str().unwrap(),
        "--prompt-tokens",
        "1 2 3",
        "--draft-model",
        mixtral.to_str().unwrap(),
    ]);
    assert_clean_error(&o, &["cannot draft for", "tokenizer"]);
}
