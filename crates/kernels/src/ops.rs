//! Element-wise, normalisation, positional and attention kernels.
//!
//! These touch activations, not weights, so they cost little next to the matrix products; they are
//! written plainly so the compiler vectorises them, and checked against the formulas in tests.
//! Conventions follow Hugging Face transformers exactly (see shared MODELS.md §1): statistics in
//! f32, RoPE in the NeoX "rotate half" layout, softmax with the maximum subtracted.
use rayon::prelude::*;

/// Plain RMSNorm: `out = w * x / sqrt(mean(x²) + eps)` (Qwen3, Mixtral).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = x.len();
    debug_assert_eq!(w.len(), n);
    let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / n as f32;
    let r = 1.0 / (ss + eps).sqrt();
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = wi * (xi * r);
    }
}

/// [`rms_norm`] in place over consecutive rows of width `w.len()`.
pub fn rms_norm_rows(x: &mut [f32], w: &[f32], eps: f32) {
    let n = w.len();
    let mut tmp = vec![0f32; n];
    for row in x.chunks_exact_mut(n) {
        rms_norm(row, w, eps, &mut tmp);
        row.copy_from_slice(&tmp);
    }
}

/// Cos/sin tables for rotary embeddings over the first `rot` dims of a head.
#[derive(Clone, Debug)]
pub struct Rope {
    rot: usize,
    inv_freq: Vec<f32>,
}

impl Rope {
    /// `inv_freq[i] = theta^(-2i/rot)`.
    pub fn new(rot: usize, theta: f64) -> Rope {
        let inv_freq = (0..rot / 2)
            .map(|i| (1.0 / theta.powf(2.0 * i as f64 / rot as f64)) as f32)
            .collect();
        Rope { rot, inv_freq }
    }

    /// Rotated dimensions per head.
    pub fn rotary_dim(&self) -> usize {
        self.rot
    }

    /// `theta^(-2i/rot)` for `i < rot / 2`, as f32.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Rotates every head of `x` (`n_heads * head_dim` values) for position `pos`, NeoX layout:
    /// `x_r' = x_r cos + rotate_half(x_r) sin` on the first `rot` dims, the rest unchanged.
    pub fn apply(&self, x: &mut [f32], head_dim: usize, pos: usize) {
        let half = self.rot / 2;
        let mut cs = [(0f32, 0f32); 512];
        let tbl: Vec<(f32, f32)>;
        let cos_sin: &[(f32, f32)] = if half <= cs.len() {
            for (i, c) in cs.iter_mut().take(half).enumerate() {
                let f = pos as f32 * self.inv_freq[i];
                *c = (f.cos(), f.sin());
            }
            &cs[..half]
        } else {
            tbl = (0..half)
                .map(|i| {
                    let f = pos as f32 * self.inv_freq[i];
                    (f.cos(), f.sin())
                })
                .collect();
            &tbl
        };
        for head in x.chunks_exact_mut(head_dim) {
            for (i, &(c, s)) in cos_sin.iter().enumerate() {
                let a = head[i];
                let b = head[i + half];
                head[i] = a * c - b * s;
                head[i + half] = b * c + a * s;
            }
        }
    }
}

/// In-place softmax.
pub fn softmax(x: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Natural-log softmax of `logits` evaluated at `index`, computed stably in f64.
pub fn log_softmax_at(logits: &[f32], index: usize) -> f64 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse: f64 = logits
        .iter()
        .map(|&v| (v as f64 - m).exp())
        .sum::<f64>()
        .ln()
        + m;
    logits[index] as f64 - lse
}

/// `gate[i] = silu(gate[i]) * up[i]` where `silu(x) = x * sigmoid(x)`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Indices and values of the `k` largest entries, largest first (ties: lower index first).
pub fn top_k(x: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    let k = k.min(x.len());
    idx.select_nth_unstable_by(k.saturating_sub(1), |&a, &b| {
        x[b].total_cmp(&x[a]).then(a.cmp(&b))
    });
    let mut top: Vec<usize> = idx[..k].to_vec();
    top.sort_by(|&a, &b| x[b].total_cmp(&x[a]).then(a.cmp(&b)));
    top.into_iter().map(|i| (i, x[i])).collect()
}

/// Geometry of grouped-query attention.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads; query head `h` reads kv head `h / (n_heads / n_kv_heads)`.
    pub n_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
}

/// Causal grouped-query attention for `n_tokens` new queries.
///
/// `q` is `[n_tokens, n_heads * head_dim]`; `k_cache`/`v_cache` are `[positions, n_kv_heads *
/// head_dim]` and already hold the new tokens' keys and values; query `t` sits at position
/// `start + t` and attends to positions `0..=start + t`. Scale `head_dim^-0.5`, softmax in f32.
pub fn attention(
    shape: AttentionShape,
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    start: usize,
    n_tokens: usize,
    out: &mut [f32],
) {
    let AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim: d,
    } = shape;
    let group = n_heads / n_kv_heads;
    let kv_stride = n_kv_heads * d;
    let scale = 1.0 / (d as f32).sqrt();
    let work = n_tokens * n_heads * (start + n_tokens) * d;
    let one = |(th, o): (usize, &mut [f32])| {
        let (t, h) = (th / n_heads, th % n_heads);
        let kvh = h / group;
        let qv = &q[t * n_heads * d + h * d..][..d];
        let len = start + t + 1;
        let mut scores: Vec<f32> = (0..len)
            .map(|p| {
                let kv = &k_cache[p * kv_stride + kvh * d..][..d];
                qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() * scale
            })
            .collect();
        softmax(&mut scores);
        o.fill(0.0);
        for (p, &s) in scores.iter().enumerate() {
            let vv = &v_cache[p * kv_stride + kvh * d..][..d];
            for (oi, &vi) in o.iter_mut().zip(vv) {
                *oi += s * vi;
            }
        }
    };
    let chunks = out[..n_tokens * n_heads * d].chunks_mut(d).enumerate();
    if work > 1 << 16 {
        chunks.collect::<Vec<_>>().into_par_iter().for_each(one);
    } else {
        chunks.for_each(one);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_matches_formula() {
        let x = [1.0f32, -2.0, 3.0, 0.5];
        let w = [1.0f32, 2.0, 0.5, -1.0];
        let mut out = [0f32; 4];
        rms_norm(&x, &w, 1e-6, &mut out);
        let ms = (1.0 + 4.0 + 9.0 + 0.25) / 4.0;
        for i in 0..4 {
            let want = w[i] * x[i] / ((ms + 1e-6) as f32).sqrt();
            assert!((out[i] - want).abs() < 1e-6);
        }
    }

    #[test]
    fn rope_rotates_pairs_half_apart() {
        let rope = Rope::new(4, 10000.0);
        let mut x = [1.0f32, 2.0, 3.0, 4.0, 9.0];
        // head_dim 5 with rot 4: last dim passes through.
        rope.apply(&mut x, 5, 3);
        let f0 = 3.0f32;
        let f1 = 3.0f32 * (1.0 / 10000f64.powf(0.5)) as f32;
        let want = [
            1.0 * f0.cos() - 3.0 * f0.sin(),
            2.0 * f1.cos() - 4.0 * f1.sin(),
            3.0 * f0.cos() + 1.0 * f0.sin(),
            4.0 * f1.cos() + 2.0 * f1.sin(),
            9.0,
        ];
        for i in 0..5 {
            assert!(
                (x[i] - want[i]).abs() < 1e-5,
                "{i}: {} vs {}",
                x[i],
                want[i]
            );
        }
    }

    #[test]
    fn top_k_orders_and_breaks_ties_by_index() {
        let v = [0.1, 0.5, 0.3, 0.5, -1.0];
        assert_eq!(top_k(&v, 3), vec![(1, 0.5), (3, 0.5), (2, 0.3)]);
    }

    #[test]
    fn attention_single_position_returns_value() {
        let shape = AttentionShape {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 2,
        };
        let q = [1.0, 0.0, 0.0, 1.0];
        let k = [0.3, 0.7];
        let v = [5.0, -2.0];
        let mut out = [0f32; 4];
        attention(shape, &q, &k, &v, 0, 1, &mut out);
        assert_eq!(out, [5.0, -2.0, 5.0, -2.0]);
    }

    #[test]
    fn attention_is_causal_and_weighted() {
        let shape = AttentionShape {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 1,
        };
        let q = [1.0, 2.0];
        let k = [1.0, 0.5];
        let v = [10.0, 20.0];
        let mut out = [0f32; 2];
        attention(shape, &q, &k, &v, 0, 2, &mut out);
        assert_eq!(out[0], 10.0);
        let (a, b) = ((2.0f32 * 1.0).exp(), (2.0f32 * 0.5).exp());
        assert!((out[1] - (10.0 * a + 20.0 * b) / (a + b)).abs() < 1e-4);
    }
}
