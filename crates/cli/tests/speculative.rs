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
