//! Speed of the Gated DeltaNet recurrence: chunked prefill against one step per token.
//!
//! ```text
//! cargo run -p moestream-kernels --release --example deltanet_speed [-- --rounds N]
//! ```
//!
//! At the geometry of Qwen3.5-35B-A3B and Qwen3-Next-80B-A3B (16 key heads, 32 value heads,
//! head dims 128, so a 2 MiB state per layer), runs `n` tokens through
//! [`gated_delta_chunked`] and through `n` calls of [`gated_delta_step`] (each reading the last
//! one's state), for n = 64, 256, 1024, and prints the time per token of each and their ratio.
//! Both start from the same random state and inputs; the largest difference of their outputs is
//! printed too (the unit tests bound it against an f64 recurrence).

use moestream_kernels::deltanet::{
    gated_delta_chunked, gated_delta_step, l2_normalize_rows, DeltaInputs, DeltaShape,
    ValueHeadOrder,
};
use std::time::Instant;

/// A small deterministic generator (xorshift), so runs are comparable.
fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn main() {
    let rounds: usize = std::env::args()
        .skip_while(|a| a != "--rounds")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let shape = DeltaShape {
        n_k_heads: 16,
        n_v_heads: 32,
        k_dim: 128,
        v_dim: 128,
        order: ValueHeadOrder::Grouped,
    };
    let (nk, nv, dk, dv) = (shape.n_k_heads, shape.n_v_heads, shape.k_dim, shape.v_dim);
    println!(
        "threads {}; heads {nk}/{nv}, dims {dk}/{dv}; best of {rounds} rounds",
        rayon::current_num_threads()
    );
    println!("| tokens | chunked ms/token | step ms/token | step / chunked | max |Δ out| |");
    println!("| ---: | ---: | ---: | ---: | ---: |");
    for n in [64usize, 256, 1024] {
        let mut q = random(n * nk * dk, 1, 1.0);
        let mut k = random(n * nk * dk, 2, 1.0);
        l2_normalize_rows(&mut q, dk, 1.0 / (dk as f32).sqrt());
        l2_normalize_rows(&mut k, dk, 1.0);
        let v = random(n * nv * dv, 3, 1.0);
        let g: Vec<f32> = random(n * nv, 4, 1.0)
            .iter()
            .map(|x| -0.1 - 0.1 * x.abs())
            .collect();
        let beta: Vec<f32> = random(n * nv, 5, 0.5).iter().map(|x| 0.5 + x).collect();
        let state = random(shape.state_len(), 6, 0.1);
        let x = DeltaInputs {
            q: &q,
            k: &k,
            v: &v,
            g: &g,
            beta: &beta,
        };
        let (mut best_chunked, mut best_step) = (f64::MAX, f64::MAX);
        let mut out_chunked = vec![0f32; n * nv * dv];
        let mut out_step = vec![0f32; n * nv * dv];
        for _ in 0..rounds {
            let mut new_state = vec![0f32; state.len()];
            let t = Instant::now();
            gated_delta_chunked(shape, n, x, &state, &mut new_state, &mut out_chunked);
            best_chunked = best_chunked.min(t.elapsed().as_secs_f64());

            let (mut s, mut s_next) = (state.clone(), vec![0f32; state.len()]);
            let t = Instant::now();
            for i in 0..n {
                let xi = DeltaInputs {
                    q: &q[i * nk * dk..(i + 1) * nk * dk],
                    k: &k[i * nk * dk..(i + 1) * nk * dk],
                    v: &v[i * nv * dv..(i + 1) * nv * dv],
                    g: &g[i * nv..(i + 1) * nv],
                    beta: &beta[i * nv..(i + 1) * nv],
                };
                let o = &mut out_step[i * nv * dv..(i + 1) * nv * dv];
                gated_delta_step(shape, xi, &s, &mut s_next, o);
                std::mem::swap(&mut s, &mut s_next);
            }
            best_step = best_step.min(t.elapsed().as_secs_f64());
        }
        let diff = out_chunked
            .iter()
            .zip(&out_step)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!(
            "| {n} | {:.3} | {:.3} | {:.2}x | {diff:.1e} |",
            best_chunked * 1e3 / n as f64,
            best_step * 1e3 / n as f64,
            best_step / best_chunked
        );
    }
}
