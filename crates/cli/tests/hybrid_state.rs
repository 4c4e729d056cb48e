//! Sequence state of hybrid (Gated DeltaNet) models: checkpoint, restore, replay and failed
//! passes must leave exactly the state an uninterrupted run has. Runs on fresh random models
//! of the three hybrid architectures (`synth --preset tiny`, float and MLX 4-bit): 8 layers,
//! value heads = 2 x key heads, head_dim != hidden/heads, prompts past one 64-token chunk.
use crate::common::synth;
use moestream_engine::models::{Logits, Model};
use moestream_engine::store::{StoreOptions, StreamMode};
use moestream_kernels::ops::log_softmax_at;
use std::path::PathBuf;

fn hybrid_models(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for arch in ["qwen3_next", "qwen3_5", "qwen3_5_moe"] {
        for format in ["hf-f32", "mlx4"] {
            v.push(synth(dir, arch, format));
        }
    }
    v
}

fn tokens(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 37 + salt * 11 + 5) % 500)
        .collect()
}

/// Log-probability of `next` after each step, feeding `steps` one token at a time.
fn step_logprobs(
    m: &Model,
    cache: &mut moestream_engine::cache::SequenceCache,
    steps: &[u32],
) -> Vec<f64> {
    let mut out = Vec::new();
    for w in steps.windows(2) {
        let logits = m.forward(&w[..1], cache, Logits::Last).expect("forward");
        out.push(log_softmax_at(&logits, w[1] as usize));
    }
    out
}

#[test]
fn restore_and_replay_equals_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for dir in hybrid_models(tmp.path()) {
        let m = Model::load(&dir).expect("load");
        let prompt = tokens(70, 1);
        let cont = tokens(20, 2);
        // Uninterrupted: prompt, then 20 single-token steps.
        let mut a = m.new_cache(128);
        m.forward(&prompt, &mut a, Logits::Last).expect("prefill");
        let want = step_logprobs(&m, &mut a, &cont);

        // Interrupted: 5 steps, checkpoint, 7 steps of other tokens, restore, replay.
        let mut b = m.new_cache(128);
        m.forward(&prompt, &mut b, Logits::Last).expect("prefill");
        let first = step_logprobs(&m, &mut b, &cont[..6]);
        assert_eq!(first, want[..5], "{}", dir.display());
        let cp = b.checkpoint();
        let detour = tokens(8, 3);
        step_logprobs(&m, &mut b, &detour);
        assert_eq!(b.len(), 70 + 5 + 7);
        assert!(!b.truncate(70 + 5), "a recurrent state cannot be cut");
        b.restore(&cp).expect("restore");
        assert_eq!(b.len(), 75);
        let replayed = step_logprobs(&m, &mut b, &cont[5..]);
        assert_eq!(
            replayed,
            want[5..],
            "{}: restore then replay",
            dir.display()
        );

        // Model::rewind: back to 72 tokens through the checkpoint at 70, replaying 2 tokens in
        // one (chunked) pass, then on step by step. The same computation without the detour:
        // prompt, the 2 tokens as one pass, steps. Bit for bit equal.
        let mut d = m.new_cache(128);
        m.forward(&prompt, &mut d, Logits::Last).expect("prefill");
        m.forward(&cont[..2], &mut d, Logits::Last).expect("pair");
        let want_pair = step_logprobs(&m, &mut d, &cont[1..]);
        let mut c = m.new_cache(128);
        m.forward(&prompt, &mut c, Logits::Last).expect("prefill");
        let cp70 = c.checkpoint();
        step_logprobs(&m, &mut c, &cont[..8]);
        let known: Vec<u32> = prompt.iter().chain(&cont[..7]).copied().collect();
        m.rewind(&mut c, 72, &known, Some(&cp70)).expect("rewind");
        assert_eq!(c.len(), 72);
        let after = step_logprobs(&m, &mut c, &cont[1..]);
        assert_eq!(after, want_pair, "{}: rewind", dir.display());
        assert!(m.rewind(&mut c, 71, &known, None).is_err(), "no checkpoint");
    }
}

#[test]
fn a_failed_streamed_pass_leaves_the_recurrent_state_unchanged() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for dir in hybrid_models(tmp.path()) {
        let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap_or_default();
        if !cfg.contains("num_experts") {
            continue;
        }
        let resident = Model::load_with(
            &dir,
            &StoreOptions {
                stream: StreamMode::Off,
                ..StoreOptions::default()
            },
        )
        .expect("load");
        let prompt = tokens(70, 4);
        let mut c = resident.new_cache(128);
        resident
            .forward(&prompt, &mut c, Logits::Last)
            .expect("prefill");
        let want = resident.forward(&[9], &mut c, Logits::Last).expect("step");
        // The 3rd read after load fails: inside the prefill, after some linear layers ran.
        let streamed = Model::load_with(
            &dir,
            &StoreOptions {
                stream: StreamMode::On,
                fail_read: Some(3),
                cache: moestream_engine::store::CacheSize::Bytes(0),
                ..StoreOptions::default()
            },
        )
        .expect("load");
        let mut s = streamed.new_cache(128);
        assert!(streamed.forward(&prompt, &mut s, Logits::Last).is_err());
        assert_eq!(s.len(), 0);
        streamed
            .forward(&prompt, &mut s, Logits::Last)
            .expect("prefill");
        let got = streamed.forward(&[9], &mut s, Logits::Last).expect("step");
        assert_eq!(got, want, "{}", dir.display());
    }
}

fn score_json(model: &std::path::Path, extra: &[&str]) -> Vec<f64> {
    score_json_env(model, extra, false)
}

/// `exact`: f32 activations in decode too (MOESTREAM_EXACT_MATMUL=1).
fn score_json_env(model: &std::path::Path, extra: &[&str], exact: bool) -> Vec<f64> {
    let tokens: Vec<String> = (0..100u32)
        .map(|i| ((i * 53 + 7) % 500).to_string())
        .collect();
    let tokens = tokens.join(" ");
    let mut args = vec![
        "score",
        "--model",
        model.to_str().unwrap(),
        "--tokens",
        &tokens,
    ];
    args.extend_from_slice(extra);
    let o = std::process::Command::new(crate::common::bin())
        .args(&args)
        .env("MOESTREAM_EXACT_MATMUL", if exact { "1" } else { "0" })
        .output()
        .expect("run moestream");
    assert!(
        o.status.success(),
        "score {extra:?}: {}",
        crate::common::stderr(&o)
    );
    let v: serde_json::Value =
        serde_json::from_str(crate::common::stdout(&o).trim()).expect("score JSON");
    v["logprobs"]
        .as_array()
        .expect("logprobs")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

/// Streamed equals mapped bit for bit; single-token decode steps (the recurrent form) equal the
/// chunked prefill up to f32 rounding. Exact f32 activations here: MLX decode's int16 activations
/// alone move these random hybrids' log-probs by up to ~1e-2.
#[test]
fn hybrid_models_stream_exactly_and_decode_like_they_prefill() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for dir in hybrid_models(tmp.path()) {
        let mapped = score_json(&dir, &["--stream-experts", "off"]);
        for v in [
            &[][..],
            &["--expert-cache", "0", "--io-backend", "threads"][..],
        ] {
            let mut args = vec!["--stream-experts", "on"];
            args.extend_from_slice(v);
            assert_eq!(mapped, score_json(&dir, &args), "{} {v:?}", dir.display());
        }
        let prefill = score_json_env(&dir, &["--stream-experts", "off"], true);
        let stepped = score_json_env(&dir, &["--stream-experts", "off", "--ubatch", "1"], true);
        let worst = prefill
            .iter()
            .zip(&stepped)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            worst < 1e-4,
            "{}: decode vs prefill {worst:e}",
            dir.display()
        );
    }
}
