//! llama.cpp's (ggml's) block quantization formats: Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K.
//!
//! A row of `cols` weights is `cols / block_elements` blocks laid end to end; each block carries
//! its own scales (MODELS.md 10.2). [`dequantize_block`] is the reference decoder: its
//! arithmetic is that of gguf-py's `gguf.quants.dequantize` operation for operation (products
//! `d·sc` and `dmin·m` rounded to f32 first, then `ds·q − dm`, no fused multiply-add), so its
//! output equals gguf-py's bit for bit (tested against a committed fixture,
//! `tests/fixtures/ggml_blocks`). The matrix products decode one block at a time with this
//! arithmetic (scalar) or its SIMD transcription (`matmul/avx2.rs`) and apply it to every token.
//!
//! [`quantize_row`] quantizes f32 weights by rounding to nearest (no search for the best scales,
//! unlike llama.cpp's quantizer): enough for random-weight test models.
mod quantize;

pub use quantize::quantize_row;

/// Elements per K-quant super-block.
pub const QK_K: usize = 256;

/// A ggml block format with a kernel in this crate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum BlockFormat {
    /// 32 weights: `d: f16, qs: u8[16]`; `w = d·(q − 8)`.
    Q4_0,
    /// 32 weights: `d, m: f16, qs: u8[16]`; `w = d·q + m`. (llama-quantize's fallback for
    /// rows that are not whole Q4_K super-blocks in Q4_1-based mixes.)
    Q4_1,
    /// 32 weights: `d: f16, qh: u32, qs: u8[16]`; `w = d·(q − 16)` with a fifth bit per weight
    /// in `qh` (llama-quantize's fallback from Q4_K for rows of a length not a multiple of 256).
    Q5_0,
    /// 32 weights: `d: f16, qs: i8[32]`; `w = d·q`.
    Q8_0,
    /// 256 weights: `d, dmin: f16, scales: u8[12], qs: u8[128]`; 8 sub-blocks of 32 with 6-bit
    /// scales and mins; `w = d·sc·q − dmin·m`.
    Q4_K,
    /// As Q4_K with a fifth bit per weight in `qh: u8[32]` before `qs`.
    Q5_K,
    /// 256 weights: `ql: u8[128], qh: u8[64], scales: i8[16], d: f16`; 16 groups of 16;
    /// `w = d·sc·(q − 32)`.
    Q6_K,
}

impl BlockFormat {
    /// Every format, for tests and listings.
    pub const ALL: [BlockFormat; 7] = [
        BlockFormat::Q4_0,
        BlockFormat::Q4_1,
        BlockFormat::Q5_0,
        BlockFormat::Q8_0,
        BlockFormat::Q4_K,
        BlockFormat::Q5_K,
        BlockFormat::Q6_K,
    ];

    /// Weights per block.
    pub const fn block_elements(self) -> usize {
        match self {
            BlockFormat::Q4_0 | BlockFormat::Q4_1 | BlockFormat::Q5_0 | BlockFormat::Q8_0 => 32,
            BlockFormat::Q4_K | BlockFormat::Q5_K | BlockFormat::Q6_K => QK_K,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q4_0 => 18,
            BlockFormat::Q4_1 => 20,
            BlockFormat::Q5_0 => 22,
            BlockFormat::Q8_0 => 34,
            BlockFormat::Q4_K => 144,
            BlockFormat::Q5_K => 176,
            BlockFormat::Q6_K => 210,
        }
    }

    /// The ggml name (`Q4_K`).
    pub const fn name(self) -> &'static str {
        match self {
            BlockFormat::Q4_0 => "Q4_0",
            BlockFormat::Q4_1 => "Q4_1",
            BlockFormat::Q5_0 => "Q5_0",
            BlockFormat::Q8_0 => "Q8_0",
            BlockFormat::Q4_K => "Q4_K",
            BlockFormat::Q5_K => "Q5_K",
            BlockFormat::Q6_K => "Q6_K",
        }
    }

    /// The format named `name` (`Q4_K`), if supported.
    pub fn from_name(name: &str) -> Option<BlockFormat> {
        BlockFormat::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Byte offsets of the f16 scales (and minimums) in a block: what test data must keep finite.
    pub const fn f16_offsets(self) -> &'static [usize] {
        match self {
            BlockFormat::Q4_0 | BlockFormat::Q5_0 | BlockFormat::Q8_0 => &[0],
            BlockFormat::Q4_1 | BlockFormat::Q4_K | BlockFormat::Q5_K => &[0, 2],
            BlockFormat::Q6_K => &[208],
        }
    }

    /// Bytes of a row of `cols` weights (`cols` a multiple of [`Self::block_elements`]).
    pub const fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_elements() * self.block_bytes()
    }
}

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block's 12 scale bytes.
#[inline]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Decodes one block (`format.block_bytes()` bytes) into `out` (`format.block_elements()`
/// values), bit-exactly as gguf-py does.
pub fn dequantize_block(format: BlockFormat, block: &[u8], out: &mut [f32]) {
    assert_eq!(
        block.len(),
        format.block_bytes(),
        "{} block bytes",
        format.name()
    );
    assert_eq!(
        out.len(),
        format.block_elements(),
        "{} block values",
        format.name()
    );
    match format {
        BlockFormat::Q8_0 => {
            let d = f16_at(block, 0);
            for (y, &q) in out.iter_mut().zip(&block[2..]) {
                *y = f32::from(q as i8) * d;
            }
        }
        BlockFormat::Q4_0 => {
            let d = f16_at(block, 0);
            let qs = &block[2..18];
            for (l, &q) in qs.iter().enumerate() {
                out[l] = d * f32::from((q & 15) as i8 - 8);
                out[l + 16] = d * f32::from((q >> 4) as i8 - 8);
            }
        }
        BlockFormat::Q4_1 => {
            let (d, m) = (f16_at(block, 0), f16_at(block, 2));
            for (l, &q) in block[4..20].iter().enumerate() {
                out[l] = d * f32::from(q & 15) + m;
                out[l + 16] = d * f32::from(q >> 4) + m;
            }
        }
        BlockFormat::Q5_0 => {
            let d = f16_at(block, 0);
            let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
            for (l, &q) in block[6..22].iter().enumerate() {
                let high = |bit: usize| (((qh >> bit) & 1) << 4) as u8;
                out[l] = d * f32::from(((q & 15) | high(l)) as i8 - 16);
                out[l + 16] = d * f32::from(((q >> 4) | high(l + 16)) as i8 - 16);
            }
        }
        BlockFormat::Q4_K | BlockFormat::Q5_K => {
            let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
            let scales = &block[4..16];
            let (qh, qs) = if format == BlockFormat::Q5_K {
                (Some(&block[16..48]), &block[48..176])
            } else {
                (None, &block[16..144])
            };
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, scales);
                let ds = d * f32::from(sc);
                let dm = dmin * f32::from(m);
                let (i, high) = (j / 2, j % 2 == 1);
                for l in 0..32 {
                    let byte = qs[32 * i + l];
                    let mut q = if high { byte >> 4 } else { byte & 15 };
                    if let Some(qh) = qh {
                        q |= ((qh[l] >> j) & 1) << 4;
                    }
                    out[32 * j + l] = ds * f32::from(q) - dm;
                }
            }
        }
        BlockFormat::Q6_K => {
            let (ql, qh) = (&block[0..128], &block[128..192]);
            let scales = &block[192..208];
            let d = f16_at(block, 208);
            for h in 0..2 {
                let (l_, h_, s_) = (&ql[64 * h..], &qh[32 * h..], &scales[8 * h..]);
                for l in 0..32 {
                    let s = l / 16;
                    let q = [
                        (l_[l] & 15) | ((h_[l] & 3) << 4),
                        (l_[l + 32] & 15) | (((h_[l] >> 2) & 3) << 4),
                        (l_[l] >> 4) | (((h_[l] >> 4) & 3) << 4),
                        (l_[l + 32] >> 4) | (((h_[l] >> 6) & 3) << 4),
                    ];
                    for (k, q) in q.into_iter().enumerate() {
                        let ds = d * f32::from(s_[s + 2 * k] as i8);
                        out[128 * h + 32 * k + l] = ds * f32::from(q as i8 - 32);
                    }
                }
            }
        }
    }
}

/// Decodes a whole row (`format.row_bytes(out.len())` bytes) into `out`.
pub fn dequantize_row(format: BlockFormat, row: &[u8], out: &mut [f32]) {
    for (block, y) in row
        .chunks_exact(format.block_bytes())
        .zip(out.chunks_exact_mut(format.block_elements()))
    {
        dequantize_block(format, block, y);
    }
}
