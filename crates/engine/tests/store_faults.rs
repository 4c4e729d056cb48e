//! A streamed model survives read faults: the forward pass that hit one fails with an error
//! naming the file and offset, the KV cache is left as it was, and the next pass computes what an
//! unfaulted model computes. A weight file that changes under the model is detected.
use moestream_engine::models::{Logits, Model};
use moestream_engine::store::io::IoBackend;
use moestream_engine::store::{ReadMode, StoreOptions, StreamMode};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn streamed(dir: &Path, io: IoBackend, reads: ReadMode, fail_read: Option<u64>) -> Model {
    let options = StoreOptions {
        stream: StreamMode::On,
        io,
        reads,
        fail_read,
        ..StoreOptions::default()
    };
    Model::load_with(dir, &options).expect("load")
}

#[test]
fn a_read_fault_fails_one_pass_and_the_next_pass_is_exact() {
    let dir = fixture("qwen3_moe_a_mlx4");
    let resident = Model::load_with(
        &dir,
        &StoreOptions {
            stream: StreamMode::Off,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let prompt = [3u32, 77, 12, 9, 401, 5];
    let mut c = resident.new_cache(16);
    let want_prefill = resident.forward(&prompt, &mut c, Logits::All).unwrap();
    let want_next = resident.forward(&[42], &mut c, Logits::Last).unwrap();
    for (io, reads) in [
        (IoBackend::Uring, ReadMode::Copy),
        (IoBackend::Threads, ReadMode::Copy),
        (IoBackend::Threads, ReadMode::Map),
    ] {
        // Read 5 fails during the prefill; read 400 during the decode step.
        for fail in [5u64, 400] {
            let m = streamed(&dir, io, reads, Some(fail));
            let mut cache = m.new_cache(16);
            let first = m.forward(&prompt, &mut cache, Logits::All);
            let prefill = match first {
                Err(e) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains("model.safetensors") && msg.contains("offset"),
                        "{msg}"
                    );
                    assert_eq!(cache.len(), 0, "a failed pass leaves the cache as it was");
                    assert!(cache.layers.iter().all(|l| matches!(
                        l,
                        moestream_engine::cache::LayerState::Attention(kv) if kv.k.is_empty()
                    )));
                    m.forward(&prompt, &mut cache, Logits::All)
                        .expect("the pass after a fault works")
                }
                Ok(p) => p,
            };
            assert_eq!(prefill, want_prefill, "{io:?} {reads:?} fail at {fail}");
            let next = match m.forward(&[42], &mut cache, Logits::Last) {
                Err(_) => {
                    assert_eq!(cache.len(), prompt.len());
                    m.forward(&[42], &mut cache, Logits::Last).unwrap()
                }
                Ok(n) => n,
            };
            assert_eq!(next, want_next, "{io:?} {reads:?} fail at {fail}");
        }
    }
}

#[test]
fn a_weight_file_that_shrinks_under_the_model_is_detected() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("qwen3_moe_b_mlx4");
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    let m = streamed(tmp.path(), IoBackend::Auto, ReadMode::Copy, None);
    let mut cache = m.new_cache(16);
    m.forward(&[1, 2, 3], &mut cache, Logits::Last).unwrap();
    let weights = tmp.path().join("model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let err = m
        .forward(&[4], &mut cache, Logits::Last)
        .expect_err("a truncated file must be detected");
    let msg = err.to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("size changed"),
        "{msg}"
    );
    assert_eq!(cache.len(), 3);
}
