//! `moestream bench`: llama-bench-style throughput table, with the machine's memory bandwidth
//! measured in the same run so decode speed can be stated against its floor:
//!
//! ```text
//! floor_seconds_per_token = bytes of weights one decode step reads / measured bandwidth
//! ```
//!
//! Bytes read per decode step: every non-expert matrix except the embedding (one row of it is
//! read), plus `top_k` experts per MoE layer.
use crate::loaded::{human_bytes, Loaded};
use anyhow::Result;
use clap::Args;
use moestream_engine::models::blocks::FeedForward;
use moestream_engine::models::{Logits, Model};
use rayon::prelude::*;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    /// Model folder.
    #[arg(long)]
    model: PathBuf,
    /// Prompt lengths to time (prefill), comma-separated.
    #[arg(short = 'p', long, default_value = "128", value_delimiter = ',')]
    n_prompt: Vec<usize>,
    /// Generated tokens to time (decode), comma-separated.
    #[arg(short = 'n', long, default_value = "32", value_delimiter = ',')]
    n_gen: Vec<usize>,
    /// Repetitions of each test (after one warm-up run).
    #[arg(short = 'r', long, default_value_t = 3)]
    repetitions: usize,
    /// Print JSON lines instead of the table.
    #[arg(long)]
    json: bool,
}

/// Bytes of weights one decode step reads.
pub fn active_bytes_per_token(m: &Model) -> u64 {
    let mut b = m.lm_head.size_bytes() as u64;
    for layer in &m.layers {
        let a = &layer.self_attn;
        b += [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj]
            .iter()
            .map(|l| l.size_bytes() as u64)
            .sum::<u64>();
        b += match &layer.mlp {
            FeedForward::Dense(mlp) => mlp.size_bytes() as u64,
            FeedForward::Sparse(moe) => {
                moe.router.size_bytes() as u64
                    + moe.experts.first().map_or(0, |e| e.size_bytes() as u64)
                        * moe.rule.top_k as u64
            }
        };
    }
    b
}

/// Read bandwidth of main memory with all threads: sums a 1 GiB buffer (far larger than any
/// cache) several times and takes the best pass.
pub fn measure_memory_bandwidth() -> f64 {
    let n = (1usize << 30) / 8;
    let buf: Vec<u64> = (0..n as u64)
        .into_par_iter()
        .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .collect();
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        let s: u64 = buf
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &x| a ^ x))
            .reduce(|| 0, |a, b| a ^ b);
        let dt = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max((n * 8) as f64 / dt);
    }
    best
}

fn mean_std(x: &[f64]) -> (f64, f64) {
    let m = x.iter().sum::<f64>() / x.len() as f64;
    let v = x.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / (x.len().max(2) - 1) as f64;
    (m, v.sqrt())
}

pub fn bench(a: BenchArgs) -> Result<()> {
    let l = Loaded::open(&a.model)?;
    let m = &l.model;
    let active = active_bytes_per_token(m);
    let bw = measure_memory_bandwidth();
    let threads = rayon::current_num_threads();
    let name = l
        .dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let vocab = m.config.vocab_size as u32;
    let prompt = |n: usize| -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i * 7919 + 13) % vocab.min(30000))
            .collect()
    };
    let mut rows = vec![];
    for &p in &a.n_prompt {
        let ids = prompt(p);
        let mut rates = vec![];
        for rep in 0..=a.repetitions {
            let mut cache = m.new_cache(p);
            let t = Instant::now();
            std::hint::black_box(m.forward(&ids, &mut cache, Logits::Last));
            if rep > 0 {
                rates.push(p as f64 / t.elapsed().as_secs_f64());
            }
        }
        rows.push((format!("pp{p}"), mean_std(&rates)));
    }
    for &n in &a.n_gen {
        let mut rates = vec![];
        for rep in 0..=a.repetitions {
            let mut cache = m.new_cache(n + 1);
            let mut tok = 1u32;
            let t = Instant::now();
            for _ in 0..n {
                let logits = m.forward(&[tok], &mut cache, Logits::Last);
                tok = moestream_engine::generate::argmax(&logits);
            }
            if rep > 0 {
                rates.push(n as f64 / t.elapsed().as_secs_f64());
            }
        }
        rows.push((format!("tg{n}"), mean_std(&rates)));
    }
    let floor_tps = bw / active as f64;
    if a.json {
        for (test, (mean, std)) in &rows {
            println!(
                "{}",
                json!({"model": name, "arch": m.config.arch.model_type(), "threads": threads, "test": test,
                "tokens_per_second": mean, "std": std, "active_bytes_per_token": active, "memory_bandwidth_bytes_per_second": bw,
                "bandwidth_floor_tokens_per_second": floor_tps})
            );
        }
        return Ok(());
    }
    println!("memory bandwidth (all threads, 1 GiB read): {:.2} GB/s; weights read per decode token: {}; floor: {:.2} tok/s", bw / 1e9, human_bytes(active), floor_tps);
    println!("| model | arch | threads | test | t/s | vs floor |");
    println!("| --- | --- | ---: | --- | ---: | ---: |");
    for (test, (mean, std)) in &rows {
        let vs = if test.starts_with("tg") {
            format!("{:.2}x", floor_tps / mean)
        } else {
            "".into()
        };
        println!(
            "| {name} | {} | {threads} | {test} | {mean:.2} ± {std:.2} | {vs} |",
            m.config.arch.model_type()
        );
    }
    Ok(())
}
