//! Model families. Each file builds a [`Model`] from a checkpoint by naming its tensors; the
//! forward pass is shared, because Qwen3, Qwen3-MoE, Mixtral, Qwen3-Next and Qwen3.5 are the
//! same pre-norm decoder:
//!
//! ```text
//! h   = x + Mixer(RMSNorm(x))                Mixer = attention, or Gated DeltaNet (hybrids)
//! out = h + FeedForward(RMSNorm(h))          FeedForward = dense SwiGLU MLP or sparse MoE
//! logits = lm_head(RMSNorm(out_L))
//! ```
pub mod blocks;
mod loading;
pub mod mixtral;
mod mtp;
pub mod qwen3_moe;
pub mod qwen3_next;

use crate::accelerator::Accelerator;
use crate::cache::{Checkpoint, LayerState, SequenceCache};
use crate::config::{Arch, ModelConfig};
use crate::store::{ExpertStore, Prefetch, StoreError, StoreOptions};
use crate::weights::Linear;
use blocks::{Attention, FeedForward, GatedDeltaNet, RmsNorm};
use moestream_kernels::features::ProductMode;
use moestream_kernels::ops::Rope;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The token mixer of a layer.
pub enum Mixer {
    /// Softmax attention over the KV cache.
    Attention(Attention),
    /// Gated DeltaNet over a recurrent state.
    Linear(GatedDeltaNet),
}

impl Mixer {
    /// The mixer's projection matrices.
    pub fn linears(&self) -> Vec<&Linear> {
        match self {
            Mixer::Attention(a) => vec![&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj],
            Mixer::Linear(d) => {
                let mut v = match &d.proj {
                    blocks::DeltaProjections::Separate { qkv, z, b, a } => vec![qkv, z, b, a],
                    blocks::DeltaProjections::Fused { qkvz, ba } => vec![qkvz, ba],
                };
                v.push(&d.out_proj);
                v
            }
        }
    }

    /// Parameters kept as plain vectors (norms, convolution, decay).
    pub fn vector_params(&self) -> usize {
        match self {
            Mixer::Attention(a) => {
                a.q_norm.as_ref().map_or(0, |n| n.weight.len())
                    + a.k_norm.as_ref().map_or(0, |n| n.weight.len())
            }
            Mixer::Linear(d) => {
                d.conv_weight.len() + d.dt_bias.len() + d.neg_a.len() + d.norm.weight.len()
            }
        }
    }
}

pub use loading::{available_memory_bytes, LoadError};

/// One decoder layer.
pub struct DecoderLayer {
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Attention or Gated DeltaNet.
    pub mixer: Mixer,
    /// Norm before the feed-forward block.
    pub post_attention_layernorm: RmsNorm,
    /// Dense MLP or MoE (whose experts live in the model's [`ExpertStore`]).
    pub mlp: FeedForward,
}

impl DecoderLayer {
    fn to_resident(&self) -> DecoderLayer {
        DecoderLayer {
            input_layernorm: self.input_layernorm.clone(),
            mixer: match &self.mixer {
                Mixer::Attention(a) => Mixer::Attention(a.to_resident()),
                Mixer::Linear(d) => Mixer::Linear(d.to_resident()),
            },
            post_attention_layernorm: self.post_attention_layernorm.clone(),
            mlp: match &self.mlp {
                FeedForward::Dense(m) => FeedForward::Dense(m.to_resident()),
                FeedForward::Sparse(m) => FeedForward::Sparse(m.to_resident()),
            },
        }
    }
}

fn add_into(x: &mut [f32], d: &[f32]) {
    for (a, b) in x.iter_mut().zip(d) {
        *a += b;
    }
}

/// A multi-token-prediction head (Qwen3-Next, Qwen3.5; ../shared/docs/MODELS.md §5.5): from the
/// trunk's final (normed) hidden state at position p and the embedding of token p+1, it predicts
/// token p+2:
///
/// ```text
/// x = fc([RMSNorm(embed(tok_{p+1}), pre_fc_norm_embedding) ; RMSNorm(h_p, pre_fc_norm_hidden)])
/// x = layers(x, position p)        full-attention decoder layers with their own KV cache
/// logits = lm_head(RMSNorm(x, norm))
/// ```
///
/// Loaded when present, never streamed (its experts stay memory-mapped, touched only when used).
pub struct MtpHead {
    /// Norm of the next token's embedding.
    pub pre_fc_norm_embedding: RmsNorm,
    /// Norm of the trunk's hidden state.
    pub pre_fc_norm_hidden: RmsNorm,
    /// `[H, 2H]` projection of the concatenation `[embedding ; hidden]`.
    pub fc: Linear,
    /// Full-attention decoder layers (one in every released checkpoint).
    pub layers: Vec<DecoderLayer>,
    /// The routed experts of those layers (empty vectors for dense ones).
    pub experts: ExpertStore,
    /// Final norm before the shared `lm_head`.
    pub norm: RmsNorm,
    /// The checkpoint's `mtp.*` tensor names.
    pub tensors: Vec<String>,
}

impl MtpHead {
    /// Bytes of its weights (experts included).
    pub fn size_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let ffn = match &l.mlp {
                    FeedForward::Dense(m) => m.size_bytes(),
                    FeedForward::Sparse(m) => {
                        m.router.size_bytes()
                            + m.shared
                                .as_ref()
                                .map_or(0, |s| s.mlp.size_bytes() + s.gate.size_bytes())
                    }
                };
                l.mixer
                    .linears()
                    .iter()
                    .map(|w| w.size_bytes())
                    .sum::<usize>()
                    + ffn
            })
            .sum();
        let experts: usize = (0..self.layers.len())
            .map(|i| self.experts.expert_bytes(i) * self.experts.experts_in(i))
            .sum();
        self.fc.size_bytes() + layers + experts
    }
}

/// What a decoder layer's pass runs over, besides its input.
#[derive(Clone, Copy)]
pub(crate) struct LayerStep<'a> {
    pub mode: ProductMode,
    /// Tokens.
    pub n: usize,
    /// Position of the first (keys and values held before it).
    pub start: usize,
    /// Where the layer's routed experts come from.
    pub experts: &'a ExpertStore,
    /// Whether to start reading the next sparse layer's likely experts (the trunk, streamed).
    pub prefetch: bool,
}

/// Which positions need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (generation).
    Last,
    /// Every token's (scoring).
    All,
}

/// A loaded decoder-only language model.
pub struct Model {
    /// Its configuration.
    pub config: ModelConfig,
    /// `[V, H]` token embeddings.
    pub embed_tokens: Linear,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer>,
    /// Where the routed experts' weights come from.
    pub experts: ExpertStore,
    /// Final norm.
    pub norm: RmsNorm,
    /// `[V, H]` output projection (the embedding itself when tied).
    pub lm_head: Linear,
    /// The multi-token-prediction head the checkpoint ships (Qwen3-Next, Qwen3.5), for
    /// self-speculation; the trunk does not use it.
    pub mtp: Option<MtpHead>,
    rope: Rope,
    /// Experts per token in use (the model's own unless overridden).
    top_k: usize,
    prefetch: Prefetch,
    /// Distinct (layer, expert) pairs the last forward pass applied.
    pass_experts: AtomicUsize,
    /// Whether passes keep their final hidden states in the cache (for the MTP head).
    keep_hidden: AtomicBool,
    /// The device that runs the forward passes instead of the CPU kernels, if any.
    accelerator: Option<Box<dyn Accelerator>>,
}

impl Model {
    /// Assembles a model from its parts.
    pub fn new(
        config: ModelConfig,
        embed_tokens: Linear,
        layers: Vec<DecoderLayer>,
        experts: ExpertStore,
        norm: RmsNorm,
        lm_head: Linear,
    ) -> Model {
        let rope = Rope::new(config.rotary_dim, config.rope_theta);
        let top_k = config.num_experts_per_tok;
        Model {
            config,
            embed_tokens,
            layers,
            experts,
            norm,
            lm_head,
            mtp: None,
            rope,
            top_k,
            prefetch: Prefetch::default(),
            pass_experts: AtomicUsize::new(0),
            keep_hidden: AtomicBool::new(false),
            accelerator: None,
        }
    }

    /// Loads the model in `dir` (config.json + safetensors), streaming experts when it does not
    /// fit in memory.
    pub fn load(dir: &std::path::Path) -> Result<Model, LoadError> {
        loading::load(dir, &StoreOptions::default())
    }

    /// Loads the model in `dir` with the expert store set up as `options` say.
    pub fn load_with(dir: &std::path::Path, options: &StoreOptions) -> Result<Model, LoadError> {
        loading::load(dir, options)
    }

    /// Streams the experts from disk from now on; every other weight is copied into process
    /// memory, so that nothing reads the memory map any more.
    pub fn stream_experts(mut self, options: &StoreOptions) -> Result<Model, StoreError> {
        if self.experts.is_streamed() {
            return Ok(self);
        }
        self.embed_tokens = self.embed_tokens.to_resident();
        self.lm_head = self.lm_head.to_resident();
        self.layers = self.layers.iter().map(DecoderLayer::to_resident).collect();
        let store = std::mem::replace(&mut self.experts, ExpertStore::resident(Vec::new()));
        self.experts = store.into_streamed(self.config.num_experts_per_tok, options)?;
        self.prefetch = match options.prefetch {
            Prefetch::Auto if self.experts.caches_experts(self.config.num_experts_per_tok) => {
                Prefetch::None
            }
            Prefetch::Auto => Prefetch::Router,
            p => p,
        };
        Ok(self)
    }

    /// Copies every weight into process memory, so that nothing is read from the files again
    /// (a draft model for speculative decoding must not compete with a streamed target for the
    /// page cache). A streamed store stays streamed.
    pub fn into_memory(mut self) -> Model {
        self.embed_tokens = self.embed_tokens.to_resident();
        self.lm_head = self.lm_head.to_resident();
        self.layers = self.layers.iter().map(DecoderLayer::to_resident).collect();
        let store = std::mem::replace(&mut self.experts, ExpertStore::resident(Vec::new()));
        self.experts = store.into_memory();
        self
    }

    /// Overrides the number of experts each token uses (1 to the model's own); the chosen
    /// weights are renormalised as the model's router does.
    pub fn set_top_k(&mut self, k: usize) -> Result<(), String> {
        let own = self.config.num_experts_per_tok;
        if !self
            .layers
            .iter()
            .any(|l| matches!(l.mlp, FeedForward::Sparse(_)))
        {
            return Err("--top-k applies to mixture-of-experts models; this one is dense".into());
        }
        if k == 0 || k > own {
            return Err(format!(
                "top-k {k} is out of range: this model uses 1 to {own} experts per token"
            ));
        }
        self.top_k = k;
        Ok(())
    }

    /// Experts per token in use.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Hands every forward pass from now on to `accelerator` (a GPU). Caches made before keep
    /// working: the device state is built on their next pass from nothing, so use fresh ones.
    pub fn set_accelerator(&mut self, accelerator: Box<dyn Accelerator>) {
        self.accelerator = Some(accelerator);
    }

    /// The device running the forward passes, if not the CPU.
    pub fn accelerator(&self) -> Option<&dyn Accelerator> {
        self.accelerator.as_deref()
    }

    /// Rotary position embedding tables.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// An empty sequence cache for this model: KV for attention layers, zero states for linear
    /// ones. Attention layers reserve room for `reserve_tokens`.
    pub fn new_cache(&self, reserve_tokens: usize) -> SequenceCache {
        let c = &self.config;
        SequenceCache::with_layers(
            &self.layer_states(),
            c.num_key_value_heads * c.head_dim,
            reserve_tokens,
        )
    }

    /// Per layer, the per-sequence state it keeps besides keys and values: None for attention,
    /// (convolution, recurrent) state floats for a Gated DeltaNet layer.
    pub fn layer_states(&self) -> Vec<Option<(usize, usize)>> {
        self.layers
            .iter()
            .map(|l| match &l.mixer {
                Mixer::Attention(_) => None,
                Mixer::Linear(d) => Some(d.state_lens()),
            })
            .collect()
    }

    /// Takes `cache` back to `len` tokens, of which `tokens` are the ones it holds: exact for
    /// every architecture. Attention-only models just cut; hybrid models restore `checkpoint`
    /// (taken at or before `len`) and replay `tokens[checkpoint.len()..len]`.
    pub fn rewind(
        &self,
        cache: &mut SequenceCache,
        len: usize,
        tokens: &[u32],
        checkpoint: Option<&Checkpoint>,
    ) -> Result<(), String> {
        if cache.truncate(len) {
            return Ok(());
        }
        let cp = checkpoint.ok_or("a hybrid model's state can only go back to a checkpoint")?;
        if cp.len() > len || tokens.len() < len {
            return Err(format!(
                "cannot rewind to {len} tokens from a checkpoint at {} with {} tokens known",
                cp.len(),
                tokens.len()
            ));
        }
        cache.restore(cp)?;
        if len > cp.len() {
            self.forward(&tokens[cp.len()..len], cache, Logits::Last)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Runs `tokens` after what `cache` holds; returns logits `[rows, V]` for the positions asked.
    /// One token is a decode step, several a prefill ([`ProductMode::for_pass`]).
    /// Token ids must be below `vocab_size` (checked by callers that take outside input:
    /// [`Model::check_tokens`]). An error (a failed expert read) leaves `cache` as it was.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut SequenceCache,
        want: Logits,
    ) -> Result<Vec<f32>, StoreError> {
        self.forward_in(ProductMode::for_pass(tokens.len()), tokens, cache, want)
    }

    /// Runs `tokens` (speculative verification) as if they were decoded one at a time: the
    /// logits `[tokens, V]` of every position have the same bits as those of single decode
    /// steps, so greedy speculation gives exactly the tokens of plain decoding. Each expert any
    /// of the tokens chose is applied once to all that chose it (read from disk once). The pass
    /// is recorded, so [`Model::take_back`] can then keep any prefix of it.
    pub fn verify(
        &self,
        tokens: &[u32],
        cache: &mut SequenceCache,
    ) -> Result<Vec<f32>, StoreError> {
        cache.set_recording(true);
        let logits = self.forward_in(ProductMode::decode(), tokens, cache, Logits::All);
        cache.set_recording(false);
        logits
    }

    /// Takes `cache` back to `len` tokens after a [`Model::verify`] pass, `len` at least the
    /// length before that pass. Exact for every architecture: attention cuts its keys and
    /// values; a Gated DeltaNet layer replays its recurrence from the state before the pass over
    /// the recorded inputs of the tokens kept (no model run, nothing read from disk).
    pub fn take_back(&self, cache: &mut SequenceCache, len: usize) -> Result<(), String> {
        if len >= cache.len() {
            return Ok(());
        }
        if cache.truncate(len) {
            return Ok(());
        }
        let start = cache
            .trail_start()
            .ok_or("a hybrid model's state goes back only within the last verification pass")?;
        if len < start {
            return Err(format!(
                "cannot take back to {len} tokens: the last verification pass began at {start}"
            ));
        }
        for (layer, state) in self.layers.iter().zip(cache.layers.iter_mut()) {
            if let (Mixer::Linear(d), LayerState::Linear(s)) = (&layer.mixer, state) {
                d.take_back(s, len - start);
            }
        }
        cache.cut_after_replay(len);
        Ok(())
    }

    /// Makes every CPU forward pass keep all its tokens' final hidden states (after the last
    /// norm) in [`SequenceCache::hidden`], which self-speculation with the MTP head reads.
    pub fn set_keep_hidden(&self, keep: bool) {
        self.keep_hidden.store(keep, Ordering::Relaxed);
    }

    /// Distinct (layer, expert) pairs the last forward pass applied.
    pub fn last_pass_experts(&self) -> usize {
        self.pass_experts.load(Ordering::Relaxed)
    }

    /// [`Model::forward`] with an explicit [`ProductMode`].
    pub fn forward_in(
        &self,
        mode: ProductMode,
        tokens: &[u32],
        cache: &mut SequenceCache,
        want: Logits,
    ) -> Result<Vec<f32>, StoreError> {
        if let Some(device) = &self.accelerator {
            return device.forward(self, mode, tokens, cache, want);
        }
        self.experts.check_files()?;
        let mut experts_used = 0;
        let h = self.config.hidden_size;
        let n = tokens.len();
        let start = cache.len();
        let mut x = vec![0f32; n * h];
        for (t, &id) in tokens.iter().enumerate() {
            moestream_kernels::dequantize_row(
                &self.embed_tokens.matrix(),
                id as usize,
                &mut x[t * h..(t + 1) * h],
            );
        }
        let mut normed = vec![0f32; n * h];
        let mut delta = vec![0f32; n * h];
        for (l, (layer, state)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            let step = LayerStep {
                mode,
                n,
                start,
                experts: &self.experts,
                prefetch: true,
            };
            match self.layer_forward(layer, l, state, step, &mut x, &mut normed, &mut delta) {
                Ok(used) => experts_used += used,
                Err(e) => {
                    cache.drop_uncommitted();
                    return Err(e);
                }
            }
        }
        cache.advance(n);
        self.pass_experts.store(experts_used, Ordering::Relaxed);
        let keep = self.keep_hidden.load(Ordering::Relaxed);
        let rows: &[f32] = match want {
            Logits::Last if !keep => &x[(n - 1) * h..],
            _ => &x,
        };
        let mut normed = vec![0f32; rows.len()];
        self.norm.forward(rows, &mut normed);
        if keep {
            cache.hidden_start = start;
            cache.hidden = normed;
            normed = match want {
                Logits::All => cache.hidden.clone(),
                Logits::Last => cache.hidden[(n - 1) * h..].to_vec(),
            };
        }
        let m = normed.len() / h;
        let mut logits = vec![0f32; m * self.config.vocab_size];
        // The last-token logits of a prefill are part of the prefill (f32 activations).
        self.lm_head.forward(mode, &normed, m, &mut logits);
        Ok(logits)
    }

    /// One decoder layer over `n` rows of the residual stream `x` (in place):
    /// `h = x + Mixer(RMSNorm(x))`, `out = h + FeedForward(RMSNorm(h))`. Returns the distinct
    /// experts it applied. On error the caller drops the pass's uncommitted state.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn layer_forward(
        &self,
        layer: &DecoderLayer,
        l: usize,
        state: &mut LayerState,
        step: LayerStep,
        x: &mut [f32],
        normed: &mut [f32],
        delta: &mut [f32],
    ) -> Result<usize, StoreError> {
        let LayerStep { mode, n, start, .. } = step;
        layer.input_layernorm.forward(x, normed);
        match (&layer.mixer, state) {
            (Mixer::Attention(a), LayerState::Attention(kv)) => {
                a.forward(mode, normed, n, start, &self.rope, kv, delta)
            }
            (Mixer::Linear(d), LayerState::Linear(s)) => d.forward(mode, normed, n, s, delta),
            _ => unreachable!("caches come from Model::new_cache"),
        }
        add_into(x, delta);
        layer.post_attention_layernorm.forward(x, normed);
        let used = match &layer.mlp {
            FeedForward::Dense(m) => {
                m.forward(mode, normed, n, delta);
                0
            }
            FeedForward::Sparse(moe) => {
                let routing = moe.route(mode, normed, n, self.top_k);
                let prediction = if step.prefetch {
                    self.predict_next(mode, l, x, n)
                } else {
                    None
                };
                let prefetch = prediction.as_ref().map(|(l, e)| (*l, e.as_slice()));
                moe.forward(mode, l, step.experts, normed, n, &routing, prefetch, delta)?
            }
        };
        add_into(x, delta);
        Ok(used)
    }

    /// The next sparse layer after `layer` and the experts it is expected to use, for the expert
    /// store to start reading while `layer` computes. `x` is the residual stream after `layer`'s
    /// attention. The router predictor applies the next layer's norm and router to it: the
    /// residual stream changes little from one layer to the next, so its top-k is a good guess.
    fn predict_next(
        &self,
        mode: ProductMode,
        layer: usize,
        x: &[f32],
        n: usize,
    ) -> Option<(usize, Vec<usize>)> {
        if !self.experts.is_streamed() || self.prefetch == Prefetch::None {
            return None;
        }
        let (next, moe) =
            self.layers
                .iter()
                .enumerate()
                .skip(layer + 1)
                .find_map(|(i, l)| match &l.mlp {
                    FeedForward::Sparse(m) => Some((i, m)),
                    FeedForward::Dense(_) => None,
                })?;
        let mut ids: Vec<usize> = match self.prefetch {
            Prefetch::Router => {
                let mut normed = vec![0f32; x.len()];
                self.layers[next]
                    .post_attention_layernorm
                    .forward(x, &mut normed);
                moe.route(mode, &normed, n, self.top_k)
                    .iter()
                    .flatten()
                    .map(|c| c.0)
                    .collect()
            }
            Prefetch::Previous => self.experts.previous_choice(next),
            Prefetch::None | Prefetch::Auto => Vec::new(),
        };
        ids.sort_unstable();
        ids.dedup();
        Some((next, ids))
    }

    /// Errors if any token id is outside the vocabulary.
    pub fn check_tokens(&self, tokens: &[u32]) -> Result<(), String> {
        match tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            Some(t) => Err(format!(
                "token id {t} is outside the vocabulary (size {})",
                self.config.vocab_size
            )),
            None => Ok(()),
        }
    }

    /// The architecture.
    pub fn arch(&self) -> Arch {
        self.config.arch
    }
}
