//! Round-to-nearest quantization into the ggml block formats (random-weight test models).
//!
//! Scales come from each (sub-)block's range; the K-quant sub-block scales and mins are then
//! quantized to 6 bits (Q4_K/Q5_K) or 8 bits (Q6_K) against one f16 super-scale, and the weights
//! are rounded against the scales as they will be decoded. No search for better scales.
use super::{BlockFormat, QK_K};
use half::f16;

/// Quantizes `row` (a multiple of `format.block_elements()` values) into
/// `format.row_bytes(row.len())` bytes.
///
/// # Panics
/// If `row.len()` is not a whole number of blocks.
pub fn quantize_row(format: BlockFormat, row: &[f32]) -> Vec<u8> {
    let be = format.block_elements();
    assert!(
        row.len().is_multiple_of(be),
        "quantize_row: {} values are not whole {} blocks",
        row.len(),
        format.name()
    );
    let mut out = Vec::with_capacity(format.row_bytes(row.len()));
    for x in row.chunks_exact(be) {
        match format {
            BlockFormat::Q8_0 => q8_0(x, &mut out),
            BlockFormat::Q4_0 => q4_0(x, &mut out),
            BlockFormat::Q4_1 => q4_1(x, &mut out),
            BlockFormat::Q5_0 => q5_0(x, &mut out),
            BlockFormat::Q4_K => qk_k(x, 4, &mut out),
            BlockFormat::Q5_K => qk_k(x, 5, &mut out),
            BlockFormat::Q6_K => q6_k(x, &mut out),
        }
    }
    debug_assert_eq!(out.len(), format.row_bytes(row.len()));
    out
}

fn put_f16(out: &mut Vec<u8>, v: f32) -> f32 {
    let h = f16::from_f32(v);
    out.extend(h.to_le_bytes());
    h.to_f32()
}

fn inverse(d: f32) -> f32 {
    if d == 0.0 {
        0.0
    } else {
        1.0 / d
    }
}

fn q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let id = inverse(put_f16(out, amax / 127.0));
    out.extend(
        x.iter()
            .map(|v| (v * id).round().clamp(-127.0, 127.0) as i8 as u8),
    );
}

fn q4_0(x: &[f32], out: &mut Vec<u8>) {
    // As gguf-py: the scale maps the value of largest magnitude to -8.
    let max = x
        .iter()
        .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
    let id = inverse(put_f16(out, max / -8.0));
    let q = |v: f32| ((v * id + 8.5).trunc() as i32).clamp(0, 15) as u8;
    out.extend((0..16).map(|l| q(x[l]) | (q(x[l + 16]) << 4)));
}

fn q4_1(x: &[f32], out: &mut Vec<u8>) {
    // The block's range in 15 steps from its minimum.
    let (lo, hi) = x
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let id = inverse(put_f16(out, (hi - lo) / 15.0));
    let m = put_f16(out, lo);
    let q = |v: f32| (((v - m) * id).round() as i32).clamp(0, 15) as u8;
    out.extend((0..16).map(|l| q(x[l]) | (q(x[l + 16]) << 4)));
}

fn q5_0(x: &[f32], out: &mut Vec<u8>) {
    // As Q4_0 with 32 levels: the value of largest magnitude maps to -16.
    let max = x
        .iter()
        .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
    let id = inverse(put_f16(out, max / -16.0));
    let q: Vec<u8> = x
        .iter()
        .map(|&v| ((v * id + 16.5).trunc() as i32).clamp(0, 31) as u8)
        .collect();
    let qh = q
        .iter()
        .enumerate()
        .fold(0u32, |h, (l, &q)| h | (u32::from(q >> 4) << l));
    out.extend(qh.to_le_bytes());
    out.extend((0..16).map(|l| (q[l] & 15) | ((q[l + 16] & 15) << 4)));
}

fn qk_k(x: &[f32], bits: u32, out: &mut Vec<u8>) {
    let top = ((1u32 << bits) - 1) as f32;
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    for (j, sub) in x.chunks_exact(32).enumerate() {
        let lo = sub.iter().fold(0f32, |a, &v| a.min(v));
        let hi = sub.iter().fold(f32::MIN, |a, &v| a.max(v));
        scales[j] = (hi - lo).max(0.0) / top;
        mins[j] = -lo;
    }
    let d = put_f16(out, scales.iter().fold(0f32, |a, &v| a.max(v)) / 63.0);
    let dmin = put_f16(out, mins.iter().fold(0f32, |a, &v| a.max(v)) / 63.0);
    let six = |v: f32, d: f32| (v * inverse(d)).round().clamp(0.0, 63.0) as u8;
    let sc: [u8; 8] = std::array::from_fn(|j| six(scales[j], d));
    let m: [u8; 8] = std::array::from_fn(|j| six(mins[j], dmin));
    let mut packed = [0u8; 12];
    for j in 0..4 {
        packed[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        packed[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
        packed[j + 8] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4);
    }
    out.extend(packed);
    let mut q = [0u8; QK_K];
    for j in 0..8 {
        let ds = d * f32::from(sc[j]);
        let dm = dmin * f32::from(m[j]);
        let ids = inverse(ds);
        for l in 0..32 {
            q[32 * j + l] = ((x[32 * j + l] + dm) * ids).round().clamp(0.0, top) as u8;
        }
    }
    if bits == 5 {
        let mut qh = [0u8; 32];
        for (j, sub) in q.chunks_exact(32).enumerate() {
            for (h, &v) in qh.iter_mut().zip(sub) {
                *h |= ((v >> 4) & 1) << j;
            }
        }
        out.extend(qh);
    }
    for i in 0..4 {
        out.extend((0..32).map(|l| (q[64 * i + l] & 15) | ((q[64 * i + 32 + l] & 15) << 4)));
    }
}

fn q6_k(x: &[f32], out: &mut Vec<u8>) {
    let scales: [f32; 16] = std::array::from_fn(|g| {
        x[16 * g..16 * g + 16]
            .iter()
            .fold(0f32, |a, v| a.max(v.abs()))
            / 31.0
    });
    let d_f32 = scales.iter().fold(0f32, |a, &v| a.max(v)) / 127.0;
    let d = f16::from_f32(d_f32).to_f32();
    let sc: [i8; 16] =
        std::array::from_fn(|g| (scales[g] * inverse(d)).round().clamp(-128.0, 127.0) as i8);
    let q: [u8; QK_K] = std::array::from_fn(|i| {
        let ids = inverse(d * f32::from(sc[i / 16]));
        ((x[i] * ids).round().clamp(-32.0, 31.0) as i32 + 32) as u8
    });
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for h in 0..2 {
        for l in 0..32 {
            let v = |k: usize| q[128 * h + 32 * k + l];
            ql[64 * h + l] = (v(0) & 15) | ((v(2) & 15) << 4);
            ql[64 * h + l + 32] = (v(1) & 15) | ((v(3) & 15) << 4);
            qh[32 * h + l] =
                (v(0) >> 4) | ((v(1) >> 4) << 2) | ((v(2) >> 4) << 4) | ((v(3) >> 4) << 6);
        }
    }
    out.extend(ql);
    out.extend(qh);
    out.extend(sc.map(|s| s as u8));
    put_f16(out, d_f32);
}
