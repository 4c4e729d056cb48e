//! The multi-token-prediction (MTP) head that Qwen3-Next and Qwen3.5 checkpoints ship, run as a
//! draft for self-speculation (shared/docs/MODELS.md §5.5). From the trunk's final hidden state
//! at position p (after its last norm) and the embedding of token p+1 it predicts token p+2
//! through full-attention decoder layers with keys and values of their own:
//!
//! ```text
//! e = RMSNorm(embed(tok_{p+1}), pre_fc_norm_embedding);  g = RMSNorm(h_p, pre_fc_norm_hidden)
//! x = fc([e ; g]);  x = DecoderLayer(x, position p);  logits = lm_head(RMSNorm(x, norm))
//! ```
//!
//! A further draft feeds the head's own output state (after its norm) back with the token just
//! drafted, one position on, as vLLM and llama.cpp do. The head's keys and values live in a cache
//! of their own ([`Model::mtp_cache`]); speculation cuts it back to the trunk's accepted tokens
//! after each verification (an attention-only cache cuts exactly). The head costs one decoder
//! layer per draft token, a fraction of the trunk's pass, and reads no expert from disk (its
//! experts are resident).
use super::{LayerStep, Model};
use crate::cache::SequenceCache;
use moestream_kernels::features::ProductMode;

impl Model {
    /// An empty cache for the MTP head's layers; `None` when the checkpoint has no head.
    pub fn mtp_cache(&self) -> Option<SequenceCache> {
        let head = self.mtp.as_ref()?;
        let c = &self.config;
        Some(SequenceCache::with_layers(
            &vec![None; head.layers.len()],
            c.num_key_value_heads * c.head_dim,
            256,
        ))
    }

    /// Runs the MTP head over the pairs (`tokens[i]`, row i of `hidden`), at the positions after
    /// what `cache` holds; row i of `hidden` is the trunk's (or, chaining, the head's) state at
    /// the position before `tokens[i]`. Returns the logits of the last pair, a draft of the
    /// token after `tokens[last]`, and that pair's output state (after the head's norm).
    pub fn mtp_forward(
        &self,
        tokens: &[u32],
        hidden: &[f32],
        cache: &mut SequenceCache,
    ) -> Result<(Vec<f32>, Vec<f32>), String> {
        let head = self.mtp.as_ref().ok_or("the model has no MTP head")?;
        let h = self.config.hidden_size;
        let n = tokens.len();
        if n == 0 || hidden.len() != n * h {
            return Err(format!(
                "the MTP head needs one hidden state per token: {n} tokens, {} floats",
                hidden.len()
            ));
        }
        let mode = ProductMode::for_pass(n);
        let mut e = vec![0f32; n * h];
        for (t, &id) in tokens.iter().enumerate() {
            moestream_kernels::dequantize_row(
                &self.embed_tokens.matrix(),
                id as usize,
                &mut e[t * h..(t + 1) * h],
            );
        }
        let mut e_normed = vec![0f32; n * h];
        head.pre_fc_norm_embedding.forward(&e, &mut e_normed);
        let mut g_normed = vec![0f32; n * h];
        head.pre_fc_norm_hidden.forward(hidden, &mut g_normed);
        // [embedding ; hidden] per token, the order of the checkpoints' `fc`.
        let mut joined = Vec::with_capacity(2 * n * h);
        for (e, g) in e_normed.chunks_exact(h).zip(g_normed.chunks_exact(h)) {
            joined.extend_from_slice(e);
            joined.extend_from_slice(g);
        }
        let mut x = vec![0f32; n * h];
        head.fc.forward(mode, &joined, n, &mut x);
        let (mut normed, mut delta) = (vec![0f32; n * h], vec![0f32; n * h]);
        let start = cache.len();
        for (j, (layer, state)) in head.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            let step = LayerStep {
                mode,
                n,
                start,
                experts: &head.experts,
                prefetch: false,
            };
            if let Err(e) =
                self.layer_forward(layer, j, state, step, &mut x, &mut normed, &mut delta)
            {
                cache.drop_uncommitted();
                return Err(format!("MTP head: {e}"));
            }
        }
        cache.advance(n);
        let mut out = vec![0f32; h];
        head.norm.forward(&x[(n - 1) * h..], &mut out);
        let mut logits = vec![0f32; self.config.vocab_size];
        self.lm_head.forward(mode, &out, 1, &mut logits);
        Ok((logits, out))
    }
}
