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
//!
//! Speculative decoding verifies several drafted tokens in one pass and then keeps only some.
//! For that pass the cache records a [`DeltaTrail`] per linear layer (its convolution inputs
//! and the per-token inputs of the recurrence, a few KiB per token), and the spare buffers still
//! hold the state from before the pass: going back to any token of the pass replays the
//! recurrence from there with the recorded inputs, the same arithmetic as the pass itself, so
//! the state comes out bit for bit as if the rejected tokens had never been seen, without running
//! the model again ([`crate::models::Model::take_back`]).

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
    /// Written by the pass in progress; swapped in when it commits. After a pass commits they
    /// hold the state from before it.
    pub(crate) next_conv: Vec<f32>,
    pub(crate) next_recurrent: Vec<f32>,
    pub(crate) pending: bool,
    /// Whether passes record their [`DeltaTrail`].
    pub(crate) record: bool,
    /// What the last pass saw, when it was recorded (else `tokens == 0`).
    pub(crate) trail: DeltaTrail,
    /// A third recurrent state for stepping several tokens (allocated on first use).
    pub(crate) spare: Vec<f32>,
}

/// A linear layer's state as a pass sees it: [`LinearState::split`].
pub(crate) struct StateBuffers<'a> {
    /// The convolution state now.
    pub conv: &'a [f32],
    /// The recurrent state now.
    pub recurrent: &'a [f32],
    /// Where the pass writes the convolution state after it.
    pub next_conv: &'a mut [f32],
    /// Where the pass writes the recurrent state after it.
    pub next_recurrent: &'a mut [f32],
    /// Room for one more recurrent state, as long as it.
    pub spare: &'a mut [f32],
    /// Where to record the pass, when recording.
    pub trail: Option<&'a mut DeltaTrail>,
}

/// The inputs a Gated DeltaNet layer saw in one pass, per token: enough to recompute its state
/// after any of those tokens from the state before the pass.
#[derive(Clone, Debug, Default)]
pub struct DeltaTrail {
    /// Tokens recorded.
    pub tokens: usize,
    /// Convolution inputs `[tokens, channels]`.
    pub mixed: Vec<f32>,
    /// Queries, keys, values, log decays and write strengths, as the recurrence took them.
    pub q: Vec<f32>,
    /// Keys.
    pub k: Vec<f32>,
    /// Values.
    pub v: Vec<f32>,
    /// Log decays.
    pub g: Vec<f32>,
    /// Write strengths.
    pub beta: Vec<f32>,
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
            record: false,
            trail: DeltaTrail::default(),
            spare: Vec::new(),
        }
    }

    /// The current state, the buffers the pass in progress writes its successor to, and the
    /// trail to record into when recording.
    pub(crate) fn split(&mut self) -> StateBuffers<'_> {
        self.pending = true;
        self.trail.tokens = 0;
        self.spare.resize(self.recurrent.len(), 0.0);
        StateBuffers {
            conv: &self.conv,
            recurrent: &self.recurrent,
            next_conv: &mut self.next_conv,
            next_recurrent: &mut self.next_recurrent,
            spare: &mut self.spare,
            trail: self.record.then_some(&mut self.trail),
        }
    }

    /// After a recorded pass committed: goes back to the state after its first `keep` tokens,
    /// recomputing the convolution state from the recorded inputs and stepping the recurrence
    /// with `step(token, state, next_state)` from the state before the pass (module docs).
    /// `trail` is the layer's trail, taken out of it for the call.
    pub(crate) fn take_back(
        &mut self,
        keep: usize,
        channels: usize,
        trail: &DeltaTrail,
        mut step: impl FnMut(usize, &[f32], &mut [f32]),
    ) {
        debug_assert!(keep <= trail.tokens);
        // The convolution keeps the last K − 1 inputs of [state before ; inputs kept].
        let hist = self.conv.len();
        let mut window = std::mem::take(&mut self.next_conv);
        window.extend_from_slice(&trail.mixed[..keep * channels]);
        self.conv.copy_from_slice(&window[window.len() - hist..]);
        window.truncate(hist);
        self.next_conv = window;
        if keep == 0 {
            self.recurrent.copy_from_slice(&self.next_recurrent);
        } else {
            self.spare.resize(self.recurrent.len(), 0.0);
            alternate_steps(
                keep,
                &self.next_recurrent,
                &mut self.recurrent,
                &mut self.spare,
                &mut step,
            );
        }
    }

    pub(crate) fn commit(&mut self) {
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

/// Runs `steps` recurrence steps `step(token, state, next_state)` from `initial`, alternating
/// between `last` and `spare` so that the final state lands in `last`: each step reads what the
/// one before it wrote.
pub(crate) fn alternate_steps(
    steps: usize,
    initial: &[f32],
    last: &mut [f32],
    spare: &mut [f32],
    step: &mut impl FnMut(usize, &[f32], &mut [f32]),
) {
    for t in 0..steps {
        let into_last = (steps - 1 - t).is_multiple_of(2);
        match (t, into_last) {
            (0, true) => step(t, initial, last),
            (0, false) => step(t, initial, spare),
            (_, true) => step(t, spare, last),
            (_, false) => step(t, last, spare),
        }
    }
}

/// The state of one layer.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // one per layer
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
    /// The length before the last pass, when that pass recorded its trail.
    trail_start: Option<usize>,
    /// The state an [`crate::accelerator::Accelerator`] keeps on its device for this sequence
    /// (keys and values in device memory); its length is this cache's `len`.
    pub device: Option<Box<dyn crate::accelerator::DeviceState>>,
    /// The last pass's final hidden states (after the model's last norm), one row per token,
    /// when the model keeps them ([`crate::models::Model::set_keep_hidden`]): what its MTP head
    /// drafts from.
    pub hidden: Vec<f32>,
    /// The position of `hidden`'s first row.
    pub hidden_start: usize,
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
            trail_start: None,
            device: None,
            hidden: Vec::new(),
            hidden_start: 0,
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
    pub fn advance(&mut self, n: usize) {
        let mut recorded = false;
        for l in &mut self.layers {
            if let LayerState::Linear(s) = l {
                s.commit();
                recorded |= s.record;
            }
        }
        self.trail_start = recorded.then_some(self.len);
        self.len += n;
    }

    /// Makes the following passes record (or not) what the linear layers need to go back to
    /// any of their tokens ([`DeltaTrail`]).
    pub(crate) fn set_recording(&mut self, on: bool) {
        for l in &mut self.layers {
            if let LayerState::Linear(s) = l {
                s.record = on;
            }
        }
    }

    /// The length before the last pass, if that pass recorded its trail.
    pub(crate) fn trail_start(&self) -> Option<usize> {
        self.trail_start
    }

    /// Cuts the attention layers to `len` tokens and sets the length, after the linear layers
    /// were taken back to `len` by their trails.
    pub(crate) fn cut_after_replay(&mut self, len: usize) {
        let w = self.kv_width;
        for l in &mut self.layers {
            if let LayerState::Attention(kv) = l {
                kv.k.truncate(len * w);
                kv.v.truncate(len * w);
            }
        }
        self.len = len;
        self.trail_start = None;
    }

    /// Drops what some layers wrote in a forward pass that did not finish.
    pub(crate) fn drop_uncommitted(&mut self) {
        self.trail_start = None;
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
        self.trail_start = None;
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
        self.trail_start = None;
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
