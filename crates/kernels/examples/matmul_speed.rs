//! Speed of the matrix-product kernels against this machine's memory bandwidth.
//!
//! ```text
//! cargo run -p moestream-kernels --release --example matmul_speed [-- --quick] [--decode] [--hot] [--rounds N] [--ggml]
//! ```
//!
//! Times decode (1 token) and prefill (128 tokens) for 4-bit and 8-bit gs64 affine weights (bf16
//! scales and biases) and bf16 weights, at the Qwen3-30B-A3B expert shapes [768 x 2048] and
//! [2048 x 768] and the lm_head shape [151936 x 2048], for each SIMD level this CPU has, on one
//! thread and on all of rayon's threads. Affine decode runs with both activation precisions
//! (`acts`: `f32`, exact, and `int16`, the default; see the `matmul` module docs); everything else
//! has f32 activations. `--quick` leaves out the lm_head, `--decode` the prefill rows. `--rounds N`
//! measures everything N times, round after round, and keeps the fastest of each (the memory
//! bandwidth likewise), so that a burst of other work on a shared machine spoils one round of a
//! measurement, not all of them. `--ggml` times llama.cpp block formats (Q4_K, Q5_K, Q6_K, Q8_0,
//! random blocks with finite scales) instead of the MLX and bf16 ones, decode at the three
//! activation precisions (f32, int16, int8), and 3 and 128 tokens at f32 and int8 (the scalar
//! level only on the expert shapes).
//!
//! The expert matrices are far smaller than the last-level cache, but during MoE decoding experts
//! arrive from RAM; each measurement therefore cycles through enough copies of the matrix to fill
//! [`POOL_BYTES`], so that the figures are for weights read from memory, not from cache. `--hot`
//! uses a single copy instead: the expert matrices then stay in cache, and their figures show what
//! the kernels can compute, not what memory delivers.
//!
//! Columns: `GB/s` is weight bytes (codes + scales + biases) read per call divided by the time of
//! a call; for prefill each call reads the weights once for all tokens, so compare its `ms/token`
//! with decode's `ms/call`. `GFLOP/s` counts 2 flops per weight per token. `% bw` compares `GB/s`
//! with the memory bandwidth measured with the same number of threads. A last table sets the
//! integer paths beside f32 at the best SIMD level.

use std::time::{Duration, Instant};

use moestream_kernels::features::{cpu_level, ActivationPrecision, SimdLevel};
use moestream_kernels::ggml::BlockFormat;
use moestream_kernels::{matmul_with_precision, FloatKind, Matrix, Weights};
use rayon::prelude::*;

/// Bytes of distinct copies each measurement cycles through (8× a 32 MiB L3).
const POOL_BYTES: usize = 256 << 20;
/// Each measurement repeats calls for at least this long, in [`WINDOWS`] windows (at least one
/// call each) of which the fastest counts.
const MEASURE: Duration = Duration::from_millis(600);
const WINDOWS: usize = 4;

/// One line of the table: what was timed, and the fastest seconds per call over the rounds.
struct Measurement {
    format: Format,
    rows: usize,
    cols: usize,
    n_tokens: usize,
    level: SimdLevel,
    precision: ActivationPrecision,
    threads: usize,
    seconds: f64,
    matrix_bytes: usize,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let decode_only = args.iter().any(|a| a == "--decode");
    let pool_bytes = if args.iter().any(|a| a == "--hot") {
        0
    } else {
        POOL_BYTES
    };
    let rounds: usize = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse().expect("--rounds takes a number"))
        .unwrap_or(1)
        .max(1);
    let all_threads = rayon::current_num_threads();
    let one_thread = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("rayon pool with one thread");

    println!(
        "CPU SIMD level: {:?}; rayon threads: {all_threads}; rounds: {rounds}",
        cpu_level()
    );

    let mut levels = vec![SimdLevel::Scalar];
    if cpu_level() >= SimdLevel::Avx2 {
        levels.push(SimdLevel::Avx2);
    }
    // Block formats have no AVX-512 kernel: that level runs the AVX2 one.
    if cpu_level() >= SimdLevel::Avx512 && !args.iter().any(|a| a == "--ggml") {
        levels.push(SimdLevel::Avx512);
    }
    let formats: Vec<Format> = if args.iter().any(|a| a == "--ggml") {
        [
            BlockFormat::Q4_K,
            BlockFormat::Q5_K,
            BlockFormat::Q6_K,
            BlockFormat::Q8_0,
        ]
        .map(Format::Ggml)
        .to_vec()
    } else {
        vec![Format::Affine(4), Format::Affine(8), Format::Bf16]
    };
    let mut shapes = vec![(768, 2048), (2048, 768)];
    if !quick {
        shapes.push((151_936, 2048));
    }
    let ggml = args.iter().any(|a| a == "--ggml");
    // Block formats also at 3 tokens: the typical count per expert of a MoE prompt (top-8 of 128
    // experts, 32-64 tokens).
    let token_counts: &[usize] = match (decode_only, ggml) {
        (true, _) => &[1],
        (false, true) => &[1, 3, 128],
        (false, false) => &[1, 128],
    };

    let (mut bw_all, mut bw_one) = (0f64, 0f64);
    let mut table: Vec<Measurement> = Vec::new();
    for round in 0..rounds {
        let (all, one) = memory_bandwidth(&one_thread);
        println!("round {}: memory bandwidth (sum of a 1 GiB buffer) {all:.1} GB/s all threads, {one:.1} GB/s one thread", round + 1);
        bw_all = bw_all.max(all);
        bw_one = bw_one.max(one);
        let mut line = 0;
        for &format in &formats {
            for &(rows, cols) in &shapes {
                let pool = Pool::new(format, rows, cols, pool_bytes);
                for &n_tokens in token_counts {
                    let mut rng = 0x1234_5678_9abc_def1u64;
                    let x: Vec<f32> = (0..n_tokens * cols)
                        .map(|_| (next(&mut rng) >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                        .collect();
                    let mut y = vec![0f32; n_tokens * rows];
                    let precisions: &[ActivationPrecision] = match format {
                        Format::Ggml(_) if n_tokens == 1 => &[
                            ActivationPrecision::F32,
                            ActivationPrecision::Int16,
                            ActivationPrecision::Int8,
                        ],
                        Format::Ggml(_) => &[ActivationPrecision::F32, ActivationPrecision::Int8],
                        Format::Affine(_) if n_tokens == 1 => {
                            &[ActivationPrecision::F32, ActivationPrecision::Int16]
                        }
                        _ => &[ActivationPrecision::F32],
                    };
                    for &level in &levels {
                        // The scalar lm_head prefill takes minutes; its ratio to AVX2 is visible on the experts.
                        if level == SimdLevel::Scalar && n_tokens > 1 && rows > 100_000 {
                            continue;
                        }
                        // Likewise the scalar block decode of the lm_head.
                        if level == SimdLevel::Scalar
                            && matches!(format, Format::Ggml(_))
                            && rows > 100_000
                        {
                            continue;
                        }
                        for &precision in precisions {
                            for threads in [1, all_threads] {
                                let mut run = || pool.time(level, precision, &x, n_tokens, &mut y);
                                let seconds = if threads == 1 {
                                    one_thread.install(run)
                                } else {
                                    run()
                                };
                                if round == 0 {
                                    table.push(Measurement {
                                        format,
                                        rows,
                                        cols,
                                        n_tokens,
                                        level,
                                        precision,
                                        threads,
                                        seconds,
                                        matrix_bytes: pool.matrix_bytes,
                                    });
                                } else {
                                    table[line].seconds = table[line].seconds.min(seconds);
                                }
                                line += 1;
                            }
                        }
                    }
                }
            }
        }
    }
    println!("memory bandwidth, best of {rounds}: {bw_all:.1} GB/s all threads, {bw_one:.1} GB/s one thread");
    println!();
    print_table(&table, bw_one, bw_all);
    println!();
    print_integer_summary(&table, bw_one, bw_all);
}

fn print_table(table: &[Measurement], bw_one: f64, bw_all: f64) {
    println!(
        "| {:<9} | {:<13} | {:>6} | {:<6} | {:<5} | {:>7} | {:>10} | {:>9} | {:>7} | {:>7} | {:>6} |",
        "format",
        "shape",
        "tokens",
        "path",
        "acts",
        "threads",
        "ms/call",
        "ms/token",
        "GB/s",
        "GFLOP/s",
        "% bw"
    );
    println!(
        "|{}|",
        [11, 15, 8, 8, 7, 9, 12, 11, 9, 9, 8]
            .map(|n| "-".repeat(n))
            .join("|")
    );
    for m in table {
        let bw = if m.threads == 1 { bw_one } else { bw_all };
        let gb_s = m.matrix_bytes as f64 / m.seconds / 1e9;
        let gflop_s = 2.0 * (m.rows * m.cols * m.n_tokens) as f64 / m.seconds / 1e9;
        println!(
            "| {:<9} | {:<13} | {:>6} | {:<6} | {:<5} | {:>7} | {:>10.3} | {:>9.4} | {:>7.2} | {:>7.1} | {:>5.0}% |",
            m.format.name(),
            format!("{}x{}", m.rows, m.cols),
            m.n_tokens,
            format!("{:?}", m.level).to_lowercase(),
            precision_name(m.precision),
            m.threads,
            m.seconds * 1e3,
            m.seconds * 1e3 / m.n_tokens as f64,
            gb_s,
            gflop_s,
            100.0 * gb_s / bw
        );
    }
}

/// The integer paths (int16 decode, int8 decode and prefill) against f32 at the best SIMD
/// level, with the bandwidth-bound time per call.
fn print_integer_summary(table: &[Measurement], bw_one: f64, bw_all: f64) {
    let best = table
        .iter()
        .map(|m| m.level)
        .max()
        .unwrap_or_else(cpu_level);
    println!(
        "| {:<9} | {:<13} | {:>6} | {:>7} | {:>5} | {:>11} | {:>11} | {:>7} | {:>7} | {:>10} |",
        "format",
        "shape",
        "tokens",
        "threads",
        "acts",
        "f32 ms/call",
        "int ms/call",
        "speedup",
        "% bw",
        "bw-bound ms"
    );
    println!(
        "|{}|",
        [11, 15, 8, 9, 7, 13, 13, 9, 9, 12]
            .map(|n| "-".repeat(n))
            .join("|")
    );
    let at_best = |m: &&Measurement| m.level == best;
    for f32_line in table
        .iter()
        .filter(at_best)
        .filter(|m| m.precision == ActivationPrecision::F32)
    {
        let same = |m: &&Measurement| {
            (m.format.name(), m.rows, m.cols, m.threads, m.n_tokens)
                == (
                    f32_line.format.name(),
                    f32_line.rows,
                    f32_line.cols,
                    f32_line.threads,
                    f32_line.n_tokens,
                )
        };
        let bw = if f32_line.threads == 1 {
            bw_one
        } else {
            bw_all
        };
        let floor = f32_line.matrix_bytes as f64 / (bw * 1e9);
        for int_line in table
            .iter()
            .filter(at_best)
            .filter(same)
            .filter(|m| m.precision != ActivationPrecision::F32)
        {
            println!(
                "| {:<9} | {:<13} | {:>6} | {:>7} | {:>5} | {:>11.3} | {:>11.3} | {:>6.2}x | {:>6.0}% | {:>10.3} |",
                f32_line.format.name(),
                format!("{}x{}", f32_line.rows, f32_line.cols),
                f32_line.n_tokens,
                f32_line.threads,
                precision_name(int_line.precision),
                f32_line.seconds * 1e3,
                int_line.seconds * 1e3,
                f32_line.seconds / int_line.seconds,
                100.0 * floor / int_line.seconds,
                floor * 1e3
            );
        }
    }
}

fn precision_name(p: ActivationPrecision) -> &'static str {
    match p {
        ActivationPrecision::F32 => "f32",
        ActivationPrecision::Int16 => "int16",
        ActivationPrecision::Int8 => "int8",
    }
}

/// xorshift64 step.
fn next(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Best GB/s of summing a 1 GiB buffer of u64: with every thread, then with one.
fn memory_bandwidth(one_thread: &rayon::ThreadPool) -> (f64, f64) {
    let words = (1usize << 30) / 8;
    let buffer: Vec<u64> = (0..words as u64)
        .into_par_iter()
        .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .collect();
    let sum_all = || {
        buffer
            .par_chunks(1 << 16)
            .map(sum_words)
            .reduce(|| 0, u64::wrapping_add)
    };
    let best = |f: &dyn Fn() -> u64, runs: usize| {
        (0..runs)
            .map(|_| {
                let start = Instant::now();
                std::hint::black_box(f());
                (1u64 << 30) as f64 / start.elapsed().as_secs_f64() / 1e9
            })
            .fold(0.0, f64::max)
    };
    let all = best(&sum_all, 5);
    let one = one_thread.install(|| best(&sum_all, 3));
    (all, one)
}

/// Four independent sums so that the loop is limited by loads, not by the add latency.
fn sum_words(words: &[u64]) -> u64 {
    let mut acc = [0u64; 4];
    let chunks = words.chunks_exact(4);
    let tail: u64 = chunks.remainder().iter().fold(0, |a, &w| a.wrapping_add(w));
    for c in chunks {
        for k in 0..4 {
            acc[k] = acc[k].wrapping_add(c[k]);
        }
    }
    acc.iter().fold(tail, |a, &w| a.wrapping_add(w))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    /// MLX affine, group size 64, bf16 scales and biases.
    Affine(u32),
    Bf16,
    /// llama.cpp blocks.
    Ggml(BlockFormat),
}

impl Format {
    fn name(self) -> String {
        match self {
            Format::Affine(bits) => format!("q{bits} gs64"),
            Format::Bf16 => "bf16".to_string(),
            Format::Ggml(f) => f.name().to_string(),
        }
    }
}

/// Copies of one matrix, back to back, that a measurement cycles through.
struct Pool {
    format: Format,
    rows: usize,
    cols: usize,
    copies: usize,
    matrix_bytes: usize,
    data: Vec<u8>,
    scales: Vec<u8>,
    biases: Vec<u8>,
}

impl Pool {
    /// At least one copy, and as many as `pool_bytes` needs.
    fn new(format: Format, rows: usize, cols: usize, pool_bytes: usize) -> Self {
        let (data_len, params_len) = match format {
            Format::Affine(bits) => (rows * cols * bits as usize / 8, rows * cols / 64 * 2),
            Format::Bf16 => (rows * cols * 2, 0),
            Format::Ggml(f) => (rows * f.row_bytes(cols), 0),
        };
        let matrix_bytes = data_len + 2 * params_len;
        let copies = pool_bytes.div_ceil(matrix_bytes).max(1);
        // Codes are any bytes; bf16 numbers get exponents near 2^-7 (no NaN, no subnormals).
        let bf16_values = |n: usize, seed: u64| -> Vec<u8> {
            let mut s = seed;
            (0..n / 2)
                .flat_map(|_| (((next(&mut s) as u16) & 0x807f) | (0x78 << 7)).to_le_bytes())
                .collect()
        };
        let data = match format {
            Format::Affine(_) => {
                let mut s = 7u64;
                (0..copies * data_len).map(|_| next(&mut s) as u8).collect()
            }
            Format::Bf16 => bf16_values(copies * data_len, 7),
            Format::Ggml(f) => {
                // Random bytes, with every block's f16 scales set to finite values near 2^-7.
                let mut s = 7u64;
                let mut data: Vec<u8> =
                    (0..copies * data_len).map(|_| next(&mut s) as u8).collect();
                for block in data.chunks_exact_mut(f.block_bytes()) {
                    for &at in f.f16_offsets() {
                        let v = (next(&mut s) as u16 & 0x83ff) | (0x08 << 10);
                        block[at..at + 2].copy_from_slice(&v.to_le_bytes());
                    }
                }
                data
            }
        };
        Pool {
            format,
            rows,
            cols,
            copies,
            matrix_bytes,
            data,
            scales: bf16_values(copies * params_len, 11),
            biases: bf16_values(copies * params_len, 13),
        }
    }

    fn matrix<'a>(&'a self, copy: usize) -> Matrix<'a> {
        let part = |v: &'a [u8]| -> &'a [u8] {
            let len = v.len() / self.copies;
            &v[copy * len..(copy + 1) * len]
        };
        let weights = match self.format {
            Format::Affine(bits) => Weights::Affine {
                bits,
                group_size: 64,
                packed: part(&self.data),
                scales: part(&self.scales),
                biases: part(&self.biases),
                scale_kind: FloatKind::BF16,
            },
            Format::Bf16 => Weights::Float {
                kind: FloatKind::BF16,
                data: part(&self.data),
            },
            Format::Ggml(format) => Weights::Ggml {
                format,
                data: part(&self.data),
            },
        };
        Matrix {
            rows: self.rows,
            cols: self.cols,
            weights,
        }
    }

    /// Seconds per call: the mean over the fastest of several windows of calls, cycling through
    /// the copies. The fastest window is the one least disturbed by other processes on the
    /// machine; the mean within it still includes every cache and memory effect.
    fn time(
        &self,
        level: SimdLevel,
        precision: ActivationPrecision,
        x: &[f32],
        n_tokens: usize,
        y: &mut [f32],
    ) -> f64 {
        let product = |copy: usize, y: &mut [f32]| {
            matmul_with_precision(level, precision, &self.matrix(copy), x, n_tokens, y)
        };
        product(self.copies - 1, y);
        let start = Instant::now();
        let mut best = f64::INFINITY;
        let mut calls = 0;
        while calls < WINDOWS || start.elapsed() < MEASURE {
            let window = Instant::now();
            let mut in_window = 0;
            while in_window < 1 || window.elapsed() < MEASURE / WINDOWS as u32 {
                product(calls % self.copies, y);
                calls += 1;
                in_window += 1;
            }
            best = best.min(window.elapsed().as_secs_f64() / in_window as f64);
        }
        std::hint::black_box(&y);
        best
    }
}
