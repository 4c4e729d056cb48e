//! `moestream bench`: a llama-bench-style table, one row per test (prefill `ppN`, decode `tgN`)
//! and active-expert count (`--top-k 8,6,4,2`), with what each row cost in expert traffic: disk
//! bytes per token (the process's storage reads, what the page cache did not serve), prefetch hit
//! rate, peak resident memory. The machine's memory bandwidth is measured in the same run so
//! decode speed can be stated against its floor:
//!
//! ```text
//! floor_seconds_per_token = bytes of weights one decode step reads / measured bandwidth
//! ```
//!
//! Bytes read per decode step: every non-expert matrix except the embedding (one row of it is
//! read), plus `top_k` experts per MoE layer. For reduced top-k rows, the quality cost is the mean
//! KL divergence of the next-token distributions from the model's own top-k, over the prompt.
use crate::loaded::{
    human_bytes, peak_rss_bytes, EngineArgs, Loaded, SpeculationArgs, StreamArgs, Traffic,
};
use anyhow::Result;
use clap::Args;
use moestream_engine::generate::{generate_with, GenerationRequest, SamplingParams};
use moestream_engine::models::blocks::FeedForward;
use moestream_engine::models::{Logits, Model};
use moestream_engine::speculative::SpeculationStats;
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
    /// Active experts per token to compare, comma-separated (default: the model's own).
    #[arg(long = "top-k", value_delimiter = ',', value_name = "K,K,...")]
    top_k: Vec<usize>,
    /// Skip the warm-up run (cold-cache measurements: the first run is the one timed).
    #[arg(long)]
    no_warmup: bool,
    /// Skip the memory-bandwidth measurement (it allocates 1 GiB, too much under a tight cap).
    #[arg(long)]
    no_bandwidth: bool,
    /// Print JSON lines instead of the table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    stream: StreamArgs,
    #[command(flatten)]
    device: crate::device::DeviceArgs,
    /// Activations of quantized products, as for `run` (int8, int16 or f32; MOESTREAM_EXACT_MATMUL=1
    /// forces f32).
    #[arg(long, value_name = "int8|int16|f32")]
    decode_activations: Option<moestream_kernels::features::ActivationPrecision>,
    /// With a draft model or prompt lookup, each decode test runs from the same prompt without
    /// and with speculation, taking turns (greedy: the same tokens), as rows `tgN` and
    /// `tgN spec`.
    #[command(flatten)]
    speculation: SpeculationArgs,
    /// Sampling temperature of the decode tests with speculation (0: greedy). Random-weight
    /// models often repeat one token greedily, which any draft predicts; sampling measures
    /// how much the draft's distribution overlaps the target's.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Seed of the sampled decode tests.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// What one timed run measured itself, when it times less than the whole call (speculative
/// decode tests exclude their prompt).
#[derive(Default)]
struct Timing {
    seconds: Option<f64>,
    speculation: Option<SpeculationStats>,
}

/// Bytes of weights one decode step reads.
pub fn active_bytes_per_token(m: &Model) -> u64 {
    let mut b = m.lm_head.size_bytes() as u64;
    for (i, layer) in m.layers.iter().enumerate() {
        b += layer
            .mixer
            .linears()
            .iter()
            .map(|l| l.size_bytes() as u64)
            .sum::<u64>();
        b += match &layer.mlp {
            FeedForward::Dense(mlp) => mlp.size_bytes() as u64,
            FeedForward::Sparse(moe) => {
                moe.router.size_bytes() as u64
                    + moe.shared.as_ref().map_or(0, |s| s.mlp.size_bytes() as u64)
                    + m.experts.expert_bytes(i) as u64 * m.top_k() as u64
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

/// One table row.
struct Row {
    test: String,
    top_k: usize,
    mean: f64,
    std: f64,
    disk_bytes_per_token: Option<u64>,
    read_bytes_per_token: u64,
    prefetch_hit_rate: Option<f64>,
    io_wait_fraction: f64,
    peak_rss: Option<u64>,
    kl: Option<f64>,
    speculation: Option<SpeculationStats>,
}

pub fn bench(a: BenchArgs) -> Result<()> {
    let engine = EngineArgs {
        top_k: None,
        decode_activations: a.decode_activations,
        stream: a.stream.clone(),
        device: a.device.clone(),
    };
    let draft = a.speculation.load_draft()?;
    let mut l = Loaded::open(&a.model, &engine)?;
    let proposer = a.speculation.proposer(draft, &l)?;
    let own_k = l.model.top_k();
    let ks = if a.top_k.is_empty() {
        vec![own_k]
    } else {
        a.top_k.clone()
    };
    let bw = if a.no_bandwidth {
        None
    } else {
        Some(measure_memory_bandwidth())
    };
    let threads = rayon::current_num_threads();
    let name = l
        .dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let vocab = l.model.config.vocab_size as u32;
    let prompt = |n: usize| -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i * 7919 + 13) % vocab.min(30000))
            .collect()
    };
    let v = l.model.config.vocab_size;
    // Logits of the model's own top-k over the first prompt (the KL base).
    let mut base_logprobs: Option<Vec<f32>> = None;
    let mut rows: Vec<Row> = vec![];
    let mut actives = vec![];
    for &k in &ks {
        if k != l.model.top_k() || l.model.top_k() != own_k {
            l.model.set_top_k(k).map_err(anyhow::Error::msg)?;
        }
        let m = &l.model;
        actives.push(active_bytes_per_token(m));
        let warm = usize::from(!a.no_warmup);
        // Quality against the model's own top-k, on the first prompt length.
        let kl = if ks.len() > 1 {
            let ids = prompt(a.n_prompt.first().copied().unwrap_or(64).max(2));
            let mut cache = m.new_cache(ids.len());
            let lp = m.forward(&ids, &mut cache, Logits::All)?;
            if k == own_k {
                base_logprobs = Some(lp);
                Some(0.0)
            } else {
                base_logprobs.as_ref().map(|base| {
                    let n = base.len() / v;
                    base.chunks_exact(v)
                        .zip(lp.chunks_exact(v))
                        .map(|(p, q)| crate::kl::kl_divergence(p, q))
                        .sum::<f64>()
                        / n as f64
                })
            }
        } else {
            None
        };
        // Runs each test of `tests` (`run(i)` runs test i) once per repetition, the tests
        // taking turns so that a machine whose speed drifts affects them alike.
        let mut timed =
            |tests: Vec<String>, tokens: usize, run: &mut dyn FnMut(usize) -> Result<Timing>| {
                #[derive(Default)]
                struct Acc {
                    rates: Vec<f64>,
                    disk: Option<u64>,
                    read: u64,
                    hits: (u64, u64),
                    wait: f64,
                    total: f64,
                    spec: Option<SpeculationStats>,
                }
                let mut accs: Vec<Acc> = tests
                    .iter()
                    .map(|_| Acc {
                        disk: Some(0),
                        ..Acc::default()
                    })
                    .collect();
                for rep in 0..a.repetitions.max(1) + warm {
                    for (i, acc) in accs.iter_mut().enumerate() {
                        let before = Traffic::now(m);
                        let t = Instant::now();
                        let timing = run(i)?;
                        let dt = timing.seconds.unwrap_or_else(|| t.elapsed().as_secs_f64());
                        if rep < warm {
                            continue;
                        }
                        if let Some(s) = timing.speculation {
                            acc.spec
                                .get_or_insert_with(SpeculationStats::default)
                                .add(&s);
                        }
                        acc.rates.push(tokens as f64 / dt);
                        let after = Traffic::now(m);
                        let s = after.store.since(&before.store);
                        let disk = match (before.disk_read_bytes, after.disk_read_bytes) {
                            (Some(x), Some(y)) => Some(y.saturating_sub(x)),
                            _ => None,
                        };
                        acc.disk = acc.disk.zip(disk).map(|(a, b)| a + b);
                        acc.read += s.bytes_read;
                        acc.hits.0 += s.prefetch_hits;
                        acc.hits.1 += s.prefetch_opportunities;
                        acc.wait += s.wait_ns as f64 / 1e9;
                        acc.total += dt;
                    }
                }
                for (test, acc) in tests.into_iter().zip(accs) {
                    let (mean, std) = mean_std(&acc.rates);
                    let n_tok = (tokens * acc.rates.len()) as u64;
                    rows.push(Row {
                        test,
                        top_k: k,
                        mean,
                        std,
                        disk_bytes_per_token: acc.disk.map(|d| d / n_tok),
                        read_bytes_per_token: acc.read / n_tok,
                        prefetch_hit_rate: (acc.hits.1 > 0)
                            .then(|| acc.hits.0 as f64 / acc.hits.1 as f64),
                        io_wait_fraction: acc.wait / acc.total,
                        peak_rss: peak_rss_bytes(),
                        kl,
                        speculation: acc.spec,
                    });
                }
                Ok::<(), anyhow::Error>(())
            };
        for &p in &a.n_prompt {
            let ids = prompt(p);
            timed(vec![format!("pp{p}")], p, &mut |_| {
                let mut cache = m.new_cache(p);
                std::hint::black_box(m.forward(&ids, &mut cache, Logits::Last)?);
                Ok(Timing::default())
            })?;
        }
        for &n in &a.n_gen {
            if proposer.is_some() {
                // Greedy from the same 16-token prompt, timing the decode only, without and
                // with speculation.
                let req = GenerationRequest {
                    prompt: prompt(16),
                    max_tokens: n + 1,
                    sampling: SamplingParams {
                        temperature: a.temperature,
                        seed: a.seed,
                        ..SamplingParams::default()
                    },
                    eos_token_ids: vec![],
                    stop_strings: vec![],
                };
                let tests = vec![format!("tg{n}"), format!("tg{n} spec")];
                timed(tests, n, &mut |variant| {
                    let mut cache = m.new_cache(req.prompt.len() + n + 2);
                    let mut spec = (variant == 1)
                        .then(|| a.speculation.speculation(&proposer, &req.sampling))
                        .flatten();
                    let stats = generate_with(m, None, &mut cache, &req, spec.as_mut(), |_| true)
                        .map_err(anyhow::Error::msg)?;
                    Ok(Timing {
                        seconds: Some(stats.decode_seconds),
                        speculation: stats.speculation,
                    })
                })?;
                continue;
            }
            timed(vec![format!("tg{n}")], n, &mut |_| {
                let mut cache = m.new_cache(n + 1);
                let mut tok = 1u32;
                for _ in 0..n {
                    let logits = m.forward(&[tok], &mut cache, Logits::Last)?;
                    tok = moestream_engine::generate::argmax(&logits);
                }
                Ok(Timing::default())
            })?;
        }
    }
    let m = &l.model;
    let streamed = m.experts.is_streamed();
    let mode = if streamed {
        format!("stream ({})", m.experts.io_backend().unwrap_or("?"))
    } else {
        "mmap".to_string()
    };
    // On a GPU the experts' host side (mapped or streamed) feeds the VRAM expert cache.
    let device_stats = m.accelerator().map(|d| {
        d.stats()
            .into_iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(" | ")
    });
    let mode = match m.accelerator() {
        Some(d) => format!("{}, experts from {mode}", d.describe()),
        None => mode,
    };
    let floor = |k: usize| {
        let i = ks.iter().position(|&x| x == k).unwrap_or(0);
        bw.map(|bw| bw / actives[i] as f64)
    };
    if a.json {
        for r in &rows {
            println!(
                "{}",
                json!({"model": name, "arch": m.config.arch.model_type(), "threads": threads,
                "experts": mode, "top_k": r.top_k, "test": r.test,
                "tokens_per_second": r.mean, "std": r.std,
                "disk_bytes_per_token": r.disk_bytes_per_token,
                "expert_bytes_read_per_token": r.read_bytes_per_token,
                "prefetch_hit_rate": r.prefetch_hit_rate, "io_wait_fraction": r.io_wait_fraction,
                "peak_rss_bytes": r.peak_rss, "kl_divergence": r.kl,
                "memory_bandwidth_bytes_per_second": bw,
                "bandwidth_floor_tokens_per_second": floor(r.top_k),
                "speculation": r.speculation.map(|s| json!({
                    "verify_passes": s.verify_passes, "proposed": s.proposed,
                    "accepted": s.accepted, "acceptance_rate": s.acceptance_rate(),
                    "tokens_per_pass": s.tokens_per_pass(), "plain_steps": s.plain_steps,
                    "experts_per_pass": s.experts_per_pass(),
                    "tokens_per_verify_pass": (s.verify_passes > 0)
                        .then(|| s.verify_tokens as f64 / s.verify_passes as f64)})),
                    "device": device_stats})
            );
        }
        return Ok(());
    }
    if let Some(bw) = bw {
        println!(
            "memory bandwidth (all threads, 1 GiB read): {:.2} GB/s; weights read per decode token at top-k {}: {}",
            bw / 1e9,
            ks[0],
            human_bytes(actives[0])
        );
    }
    println!("| model | experts | threads | top-k | test | t/s | disk/tok | prefetch hit | I/O wait | peak RSS | KL vs own top-k | vs mem floor | accepted | tok/pass | experts/pass |");
    println!("| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &rows {
        let vs = match (r.test.starts_with("tg"), floor(r.top_k)) {
            (true, Some(f)) => format!("{:.2}x", f / r.mean),
            _ => String::new(),
        };
        let spec = |f: &dyn Fn(&SpeculationStats) -> Option<String>| {
            r.speculation
                .as_ref()
                .and_then(f)
                .unwrap_or_else(|| "-".into())
        };
        let accepted = spec(&|s| s.acceptance_rate().map(|x| format!("{:.0}%", x * 100.0)));
        let per_pass = spec(&|s| s.tokens_per_pass().map(|x| format!("{x:.2}")));
        let experts = spec(&|s| s.experts_per_pass().map(|x| format!("{x:.0}")));
        println!(
            "| {name} | {mode} | {threads} | {} | {} | {:.2} ± {:.2} | {} | {} | {:.0}% | {} | {} | {vs} | {accepted} | {per_pass} | {experts} |",
            r.top_k,
            r.test,
            r.mean,
            r.std,
            r.disk_bytes_per_token
                .map(human_bytes)
                .unwrap_or_else(|| "?".into()),
            r.prefetch_hit_rate
                .map(|h| format!("{:.0}%", h * 100.0))
                .unwrap_or_else(|| "-".into()),
            r.io_wait_fraction * 100.0,
            r.peak_rss.map(human_bytes).unwrap_or_else(|| "?".into()),
            r.kl.map(|k| format!("{k:.4}")).unwrap_or_else(|| "-".into()),
        );
    }
    if let Some(d) = device_stats {
        println!("{d}");
    }
    Ok(())
}
