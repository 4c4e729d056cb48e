//! Sequence state of hybrid (Gated DeltaNet) models: checkpoint, restore, replay and failed
//! passes must leave exactly the state an uninterrupted run has.
use moestream_engine::models::{Logits, Model};
use moestream_engine::store::{StoreOptions, StreamMode};
use moestream_kernels::ops::log_softmax_at;
use std::path::PathBuf;

/// The committed hybrid fixtures (Qwen3-Next, Qwen3.5 dense and MoE, float and MLX).
fn hybrid_fixtures() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fixture folder")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            std::fs::read_to_string(p.join("config.json"))
                .map(|c| c.contains("\"qwen3_next\"") || c.contains("\"qwen3_5"))
                .unwrap_or(false)
        })
        .collect();
    v.sort();
    assert!(v.len() >= 3, "hybrid fixtures missing in {}", dir.display());
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
    for dir in hybrid_fixtures() {
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
    for dir in hybrid_fixtures() {
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
