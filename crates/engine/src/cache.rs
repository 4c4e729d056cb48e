//! Per-sequence state: the key/value cache of every attention layer, and the convolution and
//! recurrent state of every Gated DeltaNet layer of a hybrid model.
//!
//! Attention layout per layer: `[position, n_kv_heads * head_dim]` f32, keys and values apart,
//! grown as tokens arrive (reserved up front to the context size when it is known).
//!
//! Going back differs between the two. A KV cache holds nothing about later tokens, so cutting it
//! is exact. A recurrent state has integrated every token it saw; there is no way to remove some.
//! So a hybrid sequence goes back only by [`SequenceCache::restore`]-ing a
//! [`Checkpoint`] taken earlier and replaying the tokens to keep after it
//! ([`crate::models::Model::rewind`]); [`SequenceCache::truncate`] refuses to cut a hybrid
//! sequence anywhere but to empty.
//!
//! A forward pass writes each linear layer's new state into a spare buffer and the cache swaps
//! them in only when the whole pass succeeded ([`SequenceCache::advance`]): a pass that fails
//! half-way (an expert read error) leaves the state exactly as it was.

/// Keys and values of one attention layer.
#[derive(Clone, Debug, Default)]
pub struct LayerKv {
    /// `[positions, kv_width]` keys (after RoPE).
    pub k: Vec<f32>,
    /// `[positions, kv_width]` values.
    pub v: Vec<f32>,
}

/// The state of one Gated DeltaNet layer.
#[derive(Clone, Debug, Default)]
pub struct LinearState {
    /// The last `K − 1` inputs of the causal convolution, `[K − 1, channels]`, oldest first.
    pub conv: Vec<f32>,
    /// The delta-rule state `[nv, dk, dv]`.
    pub recurrent: Vec<f32>,
    /// Written by the pass in progress; swapped in when it commits.
    pub(crate) next_conv: Vec<f32>,
    pub(crate) next_recurrent: Vec<f32>,
    pub(crate) pending: bool,
}

impl LinearState {
    /// A zero state of `conv_len` convolution floats and `recurrent_len` state floats.
    pub fn new(conv_len: usize, recurrent_len: usize) -> LinearState {
        LinearState {
            conv: vec![0.0; conv_len],
            recurrent: vec![0.0; recurrent_len],
            next_conv: vec![0.0; conv_len],
            next_recurrent: vec![0.0; recurrent_len],
            pending: false,
        }
    }

    /// The current state and the buffers the pass in progress writes its successor to.
    #[allow(clippy::type_complexity)] // (conv, recurrent) now and next
    pub(crate) fn split(&mut self) -> ((&[f32], &[f32]), (&mut [f32], &mut [f32])) {
        self.pending = true;
        (
            (&self.conv, &self.recurrent),
            (&mut self.next_conv, &mut self.next_recurrent),
        )
    }

    fn commit(&mut self) {
        if self.pending {
            std::mem::swap(&mut self.conv, &mut self.next_conv);
            std::mem::swap(&mut self.recurrent, &mut self.next_recurrent);
            self.pending = false;
        }
    }

    fn bytes(&self) -> usize {
        (self.conv.len() + self.recurrent.len()) * 4
    }
}

/// The state of one layer.
#[derive(Clone, Debug)]
pub enum LayerState {
    /// An attention layer's keys and values.
    Attention(LayerKv),
    /// A Gated DeltaNet layer's convolution and recurrent state.
    Linear(LinearState),
}

/// Everything a model keeps about one sequence between forward passes.
#[derive(Clone, Debug)]
pub struct SequenceCache {
    /// One entry per decoder layer.
    pub layers: Vec<LayerState>,
    kv_width: usize,
    len: usize,
}

/// A copy of a sequence's state at some length, to go back to with
/// [`SequenceCache::restore`]. Holds the recurrent states only (attention needs just the length).
#[derive(Clone, Debug)]
pub struct Checkpoint {
    len: usize,
    linear: Vec<(Vec<f32>, Vec<f32>)>,
}

impl Checkpoint {
    /// Tokens the sequence held when the checkpoint was taken.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it was taken of an empty sequence.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl SequenceCache {
    /// An empty cache for layers described by `layers` (`None` for attention, `Some((conv_len,
    /// recurrent_len))` for a linear layer), `kv_width = n_kv_heads * head_dim`.
    pub fn with_layers(
        layers: &[Option<(usize, usize)>],
        kv_width: usize,
        reserve_tokens: usize,
    ) -> SequenceCache {
        let layers = layers
            .iter()
            .map(|l| match l {
                None => LayerState::Attention(LayerKv {
                    k: Vec::with_capacity(reserve_tokens * kv_width),
                    v: Vec::with_capacity(reserve_tokens * kv_width),
                }),
                Some((c, r)) => LayerState::Linear(LinearState::new(*c, *r)),
            })
            .collect();
        SequenceCache {
            layers,
            kv_width,
            len: 0,
        }
    }

    /// An empty cache of `n_layers` attention layers.
    pub fn new(n_layers: usize, kv_width: usize, reserve_tokens: usize) -> SequenceCache {
        Self::with_layers(&vec![None; n_layers], kv_width, reserve_tokens)
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether some layer keeps a recurrent state (then only checkpoints go back exactly).
    pub fn has_recurrent_state(&self) -> bool {
        self.layers
            .iter()
            .any(|l| matches!(l, LayerState::Linear(_)))
    }

    /// Marks `n` more tokens as held (after every layer appended them) and commits the linear
    /// layers' new states.
    pub(crate) fn advance(&mut self, n: usize) {
        for l in &mut self.layers {
            if let LayerState::Linear(s) = l {
                s.commit();
            }
        }
        self.len += n;
    }

    /// Drops what some layers wrote in a forward pass that did not finish.
    pub(crate) fn drop_uncommitted(&mut self) {
        let (len, w) = (self.len, self.kv_width);
        for l in &mut self.layers {
            match l {
                LayerState::Attention(kv) => {
                    kv.k.truncate(len * w);
                    kv.v.truncate(len * w);
                }
                LayerState::Linear(s) => s.pending = false,
            }
        }
    }

    /// Forgets every token after the first `len`. Exact for attention; a sequence with recurrent
    /// state can only be cut to empty (it is reset), and otherwise `false` is returned and
    /// nothing changes: use a [`Checkpoint`] and replay.
    #[must_use]
    pub fn truncate(&mut self, len: usize) -> bool {
        if len >= self.len {
            return true;
        }
        if self.has_recurrent_state() && len > 0 {
            return false;
        }
        let w = self.kv_width;
        for l in &mut self.layers {
            match l {
                LayerState::Attention(kv) => {
                    kv.k.truncate(len * w);
                    kv.v.truncate(len * w);
                }
                LayerState::Linear(s) => {
                    s.conv.fill(0.0);
                    s.recurrent.fill(0.0);
                    s.pending = false;
                }
            }
        }
        self.len = len;
        true
    }

    /// The state now, to come back to later.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            len: self.len,
            linear: self
                .layers
                .iter()
                .filter_map(|l| match l {
                    LayerState::Linear(s) => Some((s.conv.clone(), s.recurrent.clone())),
                    LayerState::Attention(_) => None,
                })
                .collect(),
        }
    }

    /// Returns to `checkpoint`, taken of this sequence when it held a prefix of what it holds
    /// now. Errors (changing nothing) if the checkpoint is longer than the sequence or belongs
    /// to a model of another shape.
    pub fn restore(&mut self, checkpoint: &Checkpoint) -> Result<(), String> {
        if checkpoint.len > self.len {
            return Err(format!(
                "checkpoint of {} tokens is past the end of the sequence ({} tokens)",
                checkpoint.len, self.len
            ));
        }
        let linear: Vec<&mut LinearState> = self
            .layers
            .iter_mut()
            .filter_map(|l| match l {
                LayerState::Linear(s) => Some(s),
                LayerState::Attention(_) => None,
            })
            .collect();
        if linear.len() != checkpoint.linear.len()
            || linear
                .iter()
                .zip(&checkpoint.linear)
                .any(|(s, (c, r))| s.conv.len() != c.len() || s.recurrent.len() != r.len())
        {
            return Err("checkpoint does not belong to this model".into());
        }
        for (s, (c, r)) in linear.into_iter().zip(&checkpoint.linear) {
            s.conv.copy_from_slice(c);
            s.recurrent.copy_from_slice(r);
            s.pending = false;
        }
        let (len, w) = (checkpoint.len, self.kv_width);
        for l in &mut self.layers {
            if let LayerState::Attention(kv) = l {
                kv.k.truncate(len * w);
                kv.v.truncate(len * w);
            }
        }
        self.len = len;
        Ok(())
    }

    /// Bytes held (keys, values and recurrent states; spare buffers not counted).
    pub fn size_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                LayerState::Attention(kv) => (kv.k.len() + kv.v.len()) * 4,
                LayerState::Linear(s) => s.bytes(),
            })
            .sum()
    }
}
