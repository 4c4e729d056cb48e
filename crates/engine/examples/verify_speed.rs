//! Time of a speculative verification pass over n tokens against n single decode steps:
//! `cargo run --release --example verify_speed -- MODEL_DIR [n...]`.
use moestream_engine::models::{Logits, Model};
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("usage: verify_speed MODEL_DIR [n...]");
    let ns: Vec<usize> = args.map(|a| a.parse().expect("n")).collect();
    let ns = if ns.is_empty() {
        vec![1, 2, 3, 4, 5]
    } else {
        ns
    };
    let m = Model::load(std::path::Path::new(&dir)).expect("load");
    let mut cache = m.new_cache(256);
    let prompt: Vec<u32> = (0..16).map(|i| 100 + i * 7).collect();
    m.forward(&prompt, &mut cache, Logits::Last)
        .expect("prefill");
    let base = cache.len();
    let reps = 4;
    // Warm up, then one decode step.
    for _ in 0..2 {
        m.verify(&[5], &mut cache).expect("step");
        m.take_back(&mut cache, base).expect("take back");
    }
    let t = Instant::now();
    for _ in 0..reps {
        m.verify(&[5], &mut cache).expect("step");
        m.take_back(&mut cache, base).expect("take back");
    }
    let step = t.elapsed().as_secs_f64() / reps as f64;
    println!("one decode step: {:.1} ms", step * 1e3);
    for n in ns {
        let tokens: Vec<u32> = (0..n as u32).map(|i| 5 + i).collect();
        let t = Instant::now();
        for _ in 0..reps {
            m.verify(&tokens, &mut cache).expect("verify");
            m.take_back(&mut cache, base).expect("take back");
        }
        let v = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "verify {n} tokens: {:.1} ms = {:.2} steps ({} experts)",
            v * 1e3,
            v / step,
            m.last_pass_experts()
        );
    }
}
