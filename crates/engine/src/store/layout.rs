//! Where each expert's bytes are, and where they land in a slot buffer.
//!
//! An expert is three projections (gate, up, down), each one to three tensors (float weights, or
//! MLX packed codes + scales + biases), so three to nine byte ranges, which the checkpoint may put
//! anywhere: one tensor per expert (HF per-expert, often adjacent in the file), a stacked tensor
//! per projection (MLX `switch_mlp`, HF fused), far apart. The layout sorts an expert's ranges by
//! file and offset, widens each to the read alignment (4 KiB for O_DIRECT), merges ranges that
//! touch, and places each merged window in the slot at an aligned offset. The kernels then read
//! the expert's matrices straight out of the slot: no copies, no repacking.
use crate::models::blocks::Mlp;
use crate::weights::{Bytes, Linear, Storage};
use moestream_kernels::{FloatKind, Matrix, Weights};

/// Largest single read; bigger windows are split so that they spread over the queue.
const MAX_READ: usize = 8 << 20;

/// One positional read that fills part of a slot.
#[derive(Clone, Debug)]
pub(crate) struct Window {
    /// File index.
    pub file: usize,
    /// Aligned file offset.
    pub offset: u64,
    /// Bytes to read (aligned).
    pub len: usize,
    /// Bytes that must arrive (up to the end of the last tensor in the window).
    pub need: usize,
    /// Where the window starts in the slot.
    pub slot_offset: usize,
}

/// Number format of one projection.
#[derive(Clone, Copy, Debug)]
enum Format {
    Float(FloatKind),
    Affine {
        bits: u32,
        group_size: usize,
        scale_kind: FloatKind,
    },
    Ggml(moestream_kernels::ggml::BlockFormat),
}

/// A projection's shape, format, and the slot ranges of its tensors.
#[derive(Clone, Debug)]
struct Projection {
    rows: usize,
    cols: usize,
    format: Format,
    /// `(slot offset, len)` of the float data, or of packed codes, scales and biases.
    parts: Vec<(usize, usize)>,
}

/// All reads of one expert and how to view the result.
#[derive(Clone, Debug)]
pub(crate) struct ExpertLayout {
    /// Reads, in file order.
    pub windows: Vec<Window>,
    /// Slot bytes this expert occupies.
    pub slot_len: usize,
    /// Bytes of the expert's tensors (what the model asked for; the windows may read a little more).
    pub bytes: usize,
    projections: [Projection; 3],
}

impl ExpertLayout {
    /// The layout of `mlp`'s tensors; `file_index` maps a mapped file to its index in the file
    /// table; `align` is the read alignment (1 for buffered reads, 4096 for O_DIRECT).
    pub fn new(
        mlp: &Mlp,
        align: usize,
        file_index: &mut impl FnMut(&Bytes) -> usize,
    ) -> ExpertLayout {
        let linears = [&mlp.gate_proj, &mlp.up_proj, &mlp.down_proj];
        // Every tensor range: (file, offset, len, projection, part).
        let mut ranges = Vec::new();
        for (p, l) in linears.iter().enumerate() {
            for (k, b) in tensor_bytes(l).into_iter().enumerate() {
                let (_, off) = b.location().expect("expert weights are file-backed");
                ranges.push((file_index(b), off as u64, b.len(), p, k));
            }
        }
        ranges.sort_by_key(|r| (r.0, r.1));
        let slot_align = align.max(64);
        let mut windows: Vec<Window> = Vec::new();
        let mut placed = vec![vec![(0usize, 0usize); 3]; 3];
        for &(file, off, len, p, k) in &ranges {
            let start = off / align as u64 * align as u64;
            let end = (off + len as u64).div_ceil(align as u64) * align as u64;
            let merge = windows
                .last()
                .is_some_and(|w| w.file == file && start <= w.offset + w.len as u64);
            if !merge {
                let slot_offset = windows
                    .last()
                    .map_or(0, |w| (w.slot_offset + w.len).next_multiple_of(slot_align));
                windows.push(Window {
                    file,
                    offset: start,
                    len: 0,
                    need: 0,
                    slot_offset,
                });
            }
            let w = windows.last_mut().expect("a window was just pushed");
            w.len = w.len.max((end - w.offset) as usize);
            w.need = w.need.max((off + len as u64 - w.offset) as usize);
            placed[p][k] = (w.slot_offset + (off - w.offset) as usize, len);
        }
        let slot_len = windows.last().map_or(0, |w| w.slot_offset + w.len);
        let projections = std::array::from_fn(|p| {
            let l = linears[p];
            let format = match &l.storage {
                Storage::Float { kind, .. } => Format::Float(*kind),
                Storage::Ggml { format, .. } => Format::Ggml(*format),
                Storage::Affine {
                    bits,
                    group_size,
                    scale_kind,
                    ..
                } => Format::Affine {
                    bits: *bits,
                    group_size: *group_size,
                    scale_kind: *scale_kind,
                },
            };
            let n_parts = tensor_bytes(l).len();
            Projection {
                rows: l.rows,
                cols: l.cols,
                format,
                parts: placed[p][..n_parts].to_vec(),
            }
        });
        ExpertLayout {
            windows: split_large(windows, align),
            slot_len,
            bytes: mlp.size_bytes(),
            projections,
        }
    }

    /// Gate, up and down as kernel views of a slot holding this expert.
    pub fn matrices<'a>(&self, slot: &'a [u8]) -> [Matrix<'a>; 3] {
        std::array::from_fn(|p| {
            let pr = &self.projections[p];
            let part = |k: usize| {
                let (o, l) = pr.parts[k];
                &slot[o..o + l]
            };
            let weights = match pr.format {
                Format::Float(kind) => Weights::Float {
                    kind,
                    data: part(0),
                },
                Format::Ggml(format) => Weights::Ggml {
                    format,
                    data: part(0),
                },
                Format::Affine {
                    bits,
                    group_size,
                    scale_kind,
                } => Weights::Affine {
                    bits,
                    group_size,
                    packed: part(0),
                    scales: part(1),
                    biases: part(2),
                    scale_kind,
                },
            };
            Matrix {
                rows: pr.rows,
                cols: pr.cols,
                weights,
            }
        })
    }
}

/// The tensors behind a projection, in the order [`ExpertLayout::matrices`] expects.
fn tensor_bytes(l: &Linear) -> Vec<&Bytes> {
    match &l.storage {
        Storage::Float { data, .. } | Storage::Ggml { data, .. } => vec![data],
        Storage::Affine {
            packed,
            scales,
            biases,
            ..
        } => vec![packed, scales, biases],
    }
}

/// Splits windows longer than [`MAX_READ`] into aligned pieces.
fn split_large(windows: Vec<Window>, align: usize) -> Vec<Window> {
    let chunk = MAX_READ / align.max(1) * align.max(1);
    let mut out = Vec::with_capacity(windows.len());
    for w in windows {
        let mut done = 0;
        while done < w.len {
            let len = chunk.min(w.len - done);
            out.push(Window {
                file: w.file,
                offset: w.offset + done as u64,
                len,
                need: w.need.saturating_sub(done).min(len),
                slot_offset: w.slot_offset + done,
            });
            done += len;
        }
    }
    out
}
