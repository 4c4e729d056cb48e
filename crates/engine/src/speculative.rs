//! Speculative decoding: a cheap proposer guesses the next few tokens, the target model checks
//! them all in one pass, and every guess it agrees with is a token gained.
//!
//! A round, with `next` the last token chosen and not yet run through the target:
//!
//! ```text
//! propose d1..dk                       draft model (k decode steps), or prompt lookup (free)
//! logits = target.verify([next, d1..dk])       one pass; each expert read once for all k+1
//! accept d1.. while rejection sampling keeps them; the first rejected one is replaced by a
//! token drawn from the residual; if all are kept, a bonus token is drawn from the last row
//! target.take_back(to next + accepted)          exact for KV and for Gated DeltaNet state
//! ```
//!
//! Lossless: [`Model::verify`] computes each row with the bits of a plain decode step, so greedy
//! output is token for token that of plain decoding; with sampling, rejection sampling
//! ([`Sampler::accept`]) makes the output distribution exactly the target's.
//!
//! When does it pay? A round costs `k` draft steps plus one target pass over `k + 1` tokens and
//! yields `1 + (accepted)` tokens. For a dense target in memory that pass costs about one
//! decode step (the weights are read once). For a mixture of experts it reads the union of the
//! experts the `k + 1` tokens chose, up to `k + 1` times as many: SwiftLM found speculation a loss
//! while streaming for that reason. So the number of drafted tokens is not fixed:
//! [`DraftLength`] measures the acceptance rate, the draft's cost per token and the target's
//! cost per pass of each length (streaming included), and drafts the `k` with the most tokens
//! per second, down to `k = 0`, plain decoding, with an occasional one-token probe so that a
//! change in acceptance is noticed.
use crate::cache::{Checkpoint, SequenceCache};
use crate::generate::{Distribution, Sampler, SamplingParams};
use crate::models::{Logits, Model};
use crate::text::Tokenizer;
use moestream_kernels::features::ProductMode;
use std::sync::Arc;
use std::time::Instant;

/// Where proposed tokens come from.
#[derive(Clone)]
pub enum Proposer {
    /// A smaller model with the target's vocabulary, fully in memory.
    Draft(Arc<Model>),
    /// Prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's
    /// last n-gram (n from 3 down to 1). Costs nothing; pays on repetitive text (code, quoting,
    /// extraction).
    PromptLookup,
    /// The target's own multi-token-prediction head (Qwen3-Next, Qwen3.5 checkpoints): one
    /// decoder layer a draft token from the trunk's last hidden state, no second model. The
    /// target must keep its hidden states ([`Model::set_keep_hidden`]).
    Mtp,
}

/// Counters of one sequence's speculation.
#[derive(Clone, Copy, Debug, Default)]
pub struct SpeculationStats {
    /// Rounds that verified at least one proposed token.
    pub verify_passes: usize,
    /// Tokens proposed in those rounds.
    pub proposed: usize,
    /// Proposed tokens the target kept.
    pub accepted: usize,
    /// Tokens produced by plain decode steps (rounds with nothing proposed).
    pub plain_steps: usize,
    /// Distinct (layer, expert) pairs the verification passes applied, summed.
    pub verify_experts: usize,
    /// Tokens those passes covered, summed (`proposed + verify_passes`).
    pub verify_tokens: usize,
    /// Seconds in draft steps and in target passes.
    pub draft_seconds: f64,
    /// Seconds in target passes (verification and plain steps).
    pub target_seconds: f64,
}

impl SpeculationStats {
    /// Share of proposed tokens kept.
    pub fn acceptance_rate(&self) -> Option<f64> {
        (self.proposed > 0).then(|| self.accepted as f64 / self.proposed as f64)
    }

    /// Tokens produced per verification pass (kept proposals plus the target's own token).
    pub fn tokens_per_pass(&self) -> Option<f64> {
        (self.verify_passes > 0)
            .then(|| (self.accepted + self.verify_passes) as f64 / self.verify_passes as f64)
    }

    /// Distinct experts a verification pass applied, on average.
    pub fn experts_per_pass(&self) -> Option<f64> {
        (self.verify_passes > 0).then(|| self.verify_experts as f64 / self.verify_passes as f64)
    }

    /// Adds `other`'s counts.
    pub fn add(&mut self, other: &SpeculationStats) {
        self.verify_passes += other.verify_passes;
        self.proposed += other.proposed;
        self.accepted += other.accepted;
        self.plain_steps += other.plain_steps;
        self.verify_experts += other.verify_experts;
        self.verify_tokens += other.verify_tokens;
        self.draft_seconds += other.draft_seconds;
        self.target_seconds += other.target_seconds;
    }
}

/// Chooses how many tokens to draft from measurements (module docs).
#[derive(Clone, Debug)]
pub struct DraftLength {
    max: usize,
    /// Decayed counts of kept and rejected proposals.
    kept: f64,
    rejected: f64,
    /// Seconds per draft token (decayed mean), when measured.
    draft_cost: Option<f64>,
    /// Seconds per target pass over `k + 1` tokens, for each `k`, when measured.
    pass_cost: Vec<Option<f64>>,
    /// Plain steps since the last round that proposed something.
    since_probe: usize,
    /// Plain steps between probes: doubles after each probe that does not change the choice
    /// (a probe with a draft model costs the draft's catching up on the tokens it missed).
    probe_every: usize,
    /// Rounds with proposals since the last plain step.
    since_plain: usize,
    /// Always `max`.
    fixed: bool,
}

/// Weight of the newest measurement in the decayed means.
const DECAY: f64 = 0.2;
/// Plain steps between two probes of a one-token proposal (and rounds with proposals between
/// two plain steps).
const PROBE_EVERY: usize = 16;
/// The longest wait between probes.
const MAX_PROBE_EVERY: usize = 256;
/// Most tokens the draft catches up on before a proposal; beyond, it restarts from that many.
const DRAFT_WINDOW: usize = 8;
/// What each extra verified token is assumed to cost, as a share of a plain step, until
/// measured: about what a dense model costs on a CPU whose decode is compute-bound.
const PRIOR_EXTRA_COST: f64 = 0.3;

impl DraftLength {
    /// At most `max` tokens per round.
    pub fn new(max: usize) -> DraftLength {
        DraftLength {
            max,
            kept: 1.0,
            rejected: 1.0,
            draft_cost: None,
            pass_cost: vec![None; max + 1],
            since_probe: 0,
            probe_every: PROBE_EVERY,
            since_plain: 0,
            fixed: false,
        }
    }

    /// Always `k` tokens, whatever is measured.
    pub fn fixed(k: usize) -> DraftLength {
        DraftLength {
            fixed: true,
            ..DraftLength::new(k)
        }
    }

    /// The estimated probability that a proposed token is kept.
    pub fn acceptance(&self) -> f64 {
        self.kept / (self.kept + self.rejected)
    }

    /// The estimated cost of a target pass over `k + 1` tokens: measured, else a plain step's
    /// cost plus `k` times the extra cost per token seen in the lengths measured (before any,
    /// [`PRIOR_EXTRA_COST`] of a step). `None` before a plain step was measured.
    fn pass_cost(&self, k: usize) -> Option<f64> {
        let c0 = self.pass_cost[0]?;
        if let Some(c) = self.pass_cost[k] {
            return Some(c);
        }
        let slopes: Vec<f64> = (1..=self.max)
            .filter_map(|j| self.pass_cost[j].map(|c| (c / c0 - 1.0).max(0.0) / j as f64))
            .collect();
        let slope = if slopes.is_empty() {
            PRIOR_EXTRA_COST
        } else {
            slopes.iter().sum::<f64>() / slopes.len() as f64
        };
        Some(c0 * (1.0 + slope * k as f64))
    }

    /// The number of tokens to propose next round (`0`: a plain decode step). Measures a plain
    /// step first, then a one-token round (cheap to try, and it measures the draft), then takes
    /// the length with the most expected tokens per second.
    pub fn choose(&mut self) -> usize {
        if self.max == 0 || self.fixed {
            return self.max;
        }
        let Some(plain) = self.pass_cost(0) else {
            return 0;
        };
        let Some(draft) = self.draft_cost else {
            return 1;
        };
        let a = self.acceptance();
        let rate = |k: usize| -> f64 {
            let tokens = (0..=k).map(|i| a.powi(i as i32)).sum::<f64>();
            let cost = k as f64 * draft + self.pass_cost(k).unwrap_or(plain);
            tokens / cost
        };
        let best = (0..=self.max)
            .max_by(|&x, &y| rate(x).total_cmp(&rate(y)))
            .unwrap_or(0);
        if best == 0 {
            self.since_probe += 1;
            if self.since_probe >= self.probe_every {
                self.since_probe = 0;
                self.probe_every = (self.probe_every * 2).min(MAX_PROBE_EVERY);
                return 1;
            }
        } else {
            self.probe_every = PROBE_EVERY;
            // Re-measure a plain step now and then: the one measured at the start of a
            // sequence (short context, cold caches) is not the one speculation competes with.
            self.since_plain += 1;
            if self.since_plain >= PROBE_EVERY {
                self.since_plain = 0;
                return 0;
            }
        }
        best
    }

    /// Records a round: `proposed` tokens, `kept` of them, the draft's seconds and the target
    /// pass's seconds.
    pub fn record(&mut self, proposed: usize, kept: usize, draft_seconds: f64, pass_seconds: f64) {
        let mean = |old: Option<f64>, new: f64| Some(old.map_or(new, |o| o + DECAY * (new - o)));
        if proposed > 0 {
            self.kept = self.kept * (1.0 - DECAY) + kept as f64;
            self.rejected = self.rejected * (1.0 - DECAY) + (kept < proposed) as u8 as f64;
            // Includes the draft's catching up on tokens it missed, which is what the next
            // probe will cost again.
            self.draft_cost = mean(self.draft_cost, draft_seconds / proposed as f64);
            self.since_probe = 0;
        }
        if let Some(slot) = self.pass_cost.get_mut(proposed) {
            *slot = mean(*slot, pass_seconds);
        }
    }
}

/// What one round produced.
#[derive(Clone, Debug)]
pub struct Round {
    /// New tokens, in order: kept proposals, then the target's own token. At least one.
    pub tokens: Vec<u32>,
    /// The target's raw logits each token was chosen from, `[tokens, V]`.
    pub logits: Vec<f32>,
}

/// Adjusts a row of logits before sampling, given the sequence so far (logit bias, presence and
/// frequency penalties of an API request); the same for target and draft rows.
pub type AdjustLogits<'a> = dyn FnMut(&mut [f32], &[u32]) + 'a;

/// The speculation state of one sequence: the proposer, the draft's own cache, the draft
/// length controller and the counters.
pub struct Speculation {
    proposer: Proposer,
    draft_cache: Option<SequenceCache>,
    /// The history position the draft's cache starts at: after plain steps the draft does not
    /// catch up on everything it missed (that would cost a prefill of all of it), it restarts
    /// from the last [`DRAFT_WINDOW`] tokens. Its proposals then see less context, which costs
    /// acceptance, never correctness.
    draft_base: usize,
    /// A hybrid draft's state after the history of the current round (it cannot be cut).
    draft_checkpoint: Option<Checkpoint>,
    draft_sampler: Sampler,
    /// The MTP head's keys and values ([`Proposer::Mtp`]), made at the first proposal.
    mtp_cache: Option<SequenceCache>,
    /// The position of the MTP cache's first entry: it restarts where the trunk's recorded
    /// hidden states begin when it missed some (plain steps, a prompt run in several passes).
    mtp_base: usize,
    /// How many tokens to draft.
    pub length: DraftLength,
    /// Counters.
    pub stats: SpeculationStats,
}

impl Speculation {
    /// Speculation with `proposer`, at most `max_draft` tokens per round (always `max_draft`
    /// when `fixed`); `sampling` as the target's (the draft samples with the same settings,
    /// from its own random stream).
    pub fn new(
        proposer: Proposer,
        max_draft: usize,
        fixed: bool,
        sampling: &SamplingParams,
    ) -> Speculation {
        let draft_cache = match &proposer {
            Proposer::Draft(m) => Some(m.new_cache(256)),
            Proposer::PromptLookup | Proposer::Mtp => None,
        };
        let draft_params = SamplingParams {
            seed: sampling.seed ^ 0xD1CE_5EED,
            ..sampling.clone()
        };
        Speculation {
            proposer,
            draft_cache,
            draft_base: 0,
            draft_checkpoint: None,
            draft_sampler: Sampler::new(draft_params),
            mtp_cache: None,
            mtp_base: 0,
            length: if fixed {
                DraftLength::fixed(max_draft)
            } else {
                DraftLength::new(max_draft)
            },
            stats: SpeculationStats::default(),
        }
    }

    /// Runs the prompt through the draft model (part of prompt processing, like the target's
    /// prefill), so that its first proposals see the whole prompt.
    pub fn prefill(&mut self, prompt: &[u32]) -> Result<(), String> {
        if let (Proposer::Draft(model), Some(cache)) = (&self.proposer, self.draft_cache.as_mut()) {
            let _ = cache.truncate(0);
            self.draft_base = 0;
            model
                .forward(prompt, cache, Logits::Last)
                .map_err(|e| format!("draft model: {e}"))?;
        }
        Ok(())
    }

    /// One round after `history`, whose last token is chosen but not yet in `cache`: returns at
    /// least one and at most `limit` new tokens (`limit >= 1`). On error the target's cache may
    /// hold the tokens of a failed pass dropped, as after any failed forward pass.
    pub fn round(
        &mut self,
        target: &Model,
        cache: &mut SequenceCache,
        history: &[u32],
        sampler: &mut Sampler,
        limit: usize,
        adjust: &mut AdjustLogits,
    ) -> Result<Round, String> {
        let next = *history
            .last()
            .ok_or("speculation needs a token to continue from")?;
        let vocab = target.config.vocab_size;
        let room = target
            .config
            .max_position_embeddings
            .saturating_sub(cache.len() + 1);
        let k = self.length.choose().min(limit.saturating_sub(1)).min(room);
        let t0 = Instant::now();
        let (drafts, dists, catch_up_seconds) = if k > 0 {
            self.propose(target, cache, history, k, vocab, adjust)?
        } else {
            (Vec::new(), Vec::new(), 0.0)
        };
        let draft_seconds = t0.elapsed().as_secs_f64();
        let k = drafts.len();
        let start = cache.len();
        let t1 = Instant::now();
        let logits = if k == 0 {
            target.forward(&[next], cache, Logits::Last)
        } else {
            let mut input = Vec::with_capacity(k + 1);
            input.push(next);
            input.extend_from_slice(&drafts);
            target.verify(&input, cache)
        }
        .map_err(|e| e.to_string())?;
        let experts = target.last_pass_experts();
        let mut seen = history.to_vec();
        let mut tokens = Vec::with_capacity(k + 1);
        for (i, row) in logits.chunks_exact(vocab).enumerate() {
            let mut adjusted = row.to_vec();
            adjust(&mut adjusted, &seen);
            let p = sampler.distribution(&mut adjusted, &seen);
            if i < k {
                let x = drafts[i];
                match sampler.accept(&p, &dists[i], x) {
                    None => {
                        tokens.push(x);
                        seen.push(x);
                    }
                    Some(y) => {
                        tokens.push(y);
                        break;
                    }
                }
            } else {
                tokens.push(sampler.draw(&p));
            }
        }
        let kept = tokens.len() - 1;
        target.take_back(cache, start + 1 + kept)?;
        let pass_seconds = t1.elapsed().as_secs_f64();
        if let Some(mtp) = self.mtp_cache.as_mut() {
            // Keep the pairs of the trunk's own states; drop the chained drafts' entries.
            let _ = mtp.truncate(start.saturating_sub(self.mtp_base)); // attention only: always cuts
        }
        self.sync_draft(history.len(), &drafts, kept)?;
        // The draft's steady cost: without catching up on a prompt or on plain steps' tokens,
        // which speculating every round does not pay.
        self.length
            .record(k, kept, draft_seconds - catch_up_seconds, pass_seconds);
        let s = &mut self.stats;
        if k > 0 {
            s.verify_passes += 1;
            s.proposed += k;
            s.accepted += kept;
            s.verify_experts += experts;
            s.verify_tokens += k + 1;
        } else {
            s.plain_steps += 1;
        }
        s.draft_seconds += draft_seconds;
        s.target_seconds += pass_seconds;
        let logits = logits[..tokens.len() * vocab].to_vec();
        Ok(Round { tokens, logits })
    }

    /// Up to `k` proposed tokens after `history`, with the distributions they were drawn from,
    /// and the seconds the draft spent catching up on more than the two tokens a round leaves
    /// it (the prompt, or tokens of plain steps).
    #[allow(clippy::type_complexity)]
    #[allow(clippy::too_many_arguments)]
    fn propose(
        &mut self,
        target: &Model,
        cache: &SequenceCache,
        history: &[u32],
        k: usize,
        target_vocab: usize,
        adjust: &mut AdjustLogits,
    ) -> Result<(Vec<u32>, Vec<Distribution>, f64), String> {
        match &self.proposer {
            Proposer::PromptLookup => {
                let drafts = prompt_lookup(history, k);
                let dists = drafts.iter().map(|&t| Distribution::certain(t)).collect();
                Ok((drafts, dists, 0.0))
            }
            Proposer::Mtp => self.propose_mtp(target, cache, history, k, target_vocab, adjust),
            Proposer::Draft(model) => {
                let model = Arc::clone(model);
                let cache = self.draft_cache.as_mut().ok_or("draft cache missing")?;
                if history.len() - (self.draft_base + cache.len()) > DRAFT_WINDOW {
                    let _ = cache.truncate(0);
                    self.draft_base = history.len() - DRAFT_WINDOW;
                }
                let base = self.draft_base;
                let vocab = model.config.vocab_size;
                // The draft catches up on what it has not seen (at least `next`; a few tokens
                // after a round, as decode steps sharing weight loads; the prompt as a prefill).
                let unseen = &history[base + cache.len()..];
                let mode = if unseen.len() <= 8 {
                    ProductMode::decode()
                } else {
                    ProductMode::prefill()
                };
                let t = Instant::now();
                let mut logits = model
                    .forward_in(mode, unseen, cache, Logits::Last)
                    .map_err(|e| format!("draft model: {e}"))?;
                let catch_up = if unseen.len() > 2 {
                    t.elapsed().as_secs_f64()
                } else {
                    0.0
                };
                self.draft_checkpoint = cache.has_recurrent_state().then(|| cache.checkpoint());
                let mut seen = history.to_vec();
                let (mut drafts, mut dists) = (Vec::with_capacity(k), Vec::with_capacity(k));
                for i in 0..k {
                    adjust(&mut logits[..vocab], &seen);
                    let q = self.draft_sampler.distribution(&mut logits[..vocab], &seen);
                    let x = self.draft_sampler.draw(&q);
                    if x as usize >= target_vocab {
                        break; // a padding id of a larger draft vocabulary
                    }
                    drafts.push(x);
                    dists.push(q);
                    seen.push(x);
                    if i + 1 < k {
                        logits = model
                            .forward(&[x], cache, Logits::Last)
                            .map_err(|e| format!("draft model: {e}"))?;
                    }
                }
                Ok((drafts, dists, catch_up))
            }
        }
    }

    /// [`Speculation::propose`] with the target's MTP head: it first catches up on the pairs
    /// (token p+1, trunk state p) it has not seen, p up to the last position the target ran,
    /// whose output drafts the token after `history`'s last; each further draft chains the
    /// head's own output state.
    #[allow(clippy::type_complexity)]
    fn propose_mtp(
        &mut self,
        target: &Model,
        cache: &SequenceCache,
        history: &[u32],
        k: usize,
        target_vocab: usize,
        adjust: &mut AdjustLogits,
    ) -> Result<(Vec<u32>, Vec<Distribution>, f64), String> {
        let h = target.config.hidden_size;
        let len = cache.len();
        let (first, rows) = (cache.hidden_start, cache.hidden.len() / h);
        if rows == 0 || first + rows < len || history.len() != len + 1 {
            // No hidden states of the last pass (kept off, or run by an accelerator).
            return Ok((Vec::new(), Vec::new(), 0.0));
        }
        if self.mtp_cache.is_none() {
            self.mtp_cache = Some(target.mtp_cache().ok_or("the model has no MTP head")?);
            self.mtp_base = first;
        }
        let mtp = self.mtp_cache.as_mut().ok_or("MTP cache missing")?;
        if self.mtp_base + mtp.len() < first {
            // It missed states the trunk no longer holds: restart at the first it holds.
            let _ = mtp.truncate(0);
            self.mtp_base = first;
        }
        let from = self.mtp_base + mtp.len();
        if from >= len {
            return Ok((Vec::new(), Vec::new(), 0.0));
        }
        let t = Instant::now();
        let pairs = &history[from + 1..=len];
        let states = &cache.hidden[(from - first) * h..(len - first) * h];
        let (mut logits, mut state) = target.mtp_forward(pairs, states, mtp)?;
        let catch_up = if pairs.len() > 2 {
            t.elapsed().as_secs_f64()
        } else {
            0.0
        };
        let mut seen = history.to_vec();
        let (mut drafts, mut dists) = (Vec::with_capacity(k), Vec::with_capacity(k));
        for i in 0..k {
            adjust(&mut logits, &seen);
            let q = self.draft_sampler.distribution(&mut logits, &seen);
            let x = self.draft_sampler.draw(&q);
            if x as usize >= target_vocab {
                break;
            }
            drafts.push(x);
            dists.push(q);
            seen.push(x);
            if i + 1 < k {
                (logits, state) = target.mtp_forward(&[x], &state, mtp)?;
            }
        }
        Ok((drafts, dists, catch_up))
    }

    /// Brings the draft's cache to the tokens kept: it ran `history` and `drafts[..k-1]`; it must
    /// hold `history` and `drafts[..kept]` (when all were kept the last one is run next round).
    fn sync_draft(
        &mut self,
        history_len: usize,
        drafts: &[u32],
        kept: usize,
    ) -> Result<(), String> {
        let (Proposer::Draft(model), Some(cache)) = (&self.proposer, self.draft_cache.as_mut())
        else {
            return Ok(());
        };
        let want = history_len + kept - self.draft_base;
        if drafts.is_empty() || cache.len() <= want {
            return Ok(());
        }
        if cache.truncate(want) {
            return Ok(());
        }
        // A hybrid draft: back to the state after `history`, then the kept tokens again.
        let checkpoint = self
            .draft_checkpoint
            .as_ref()
            .filter(|c| c.len() == history_len - self.draft_base)
            .ok_or("the draft's checkpoint is missing")?;
        cache.restore(checkpoint)?;
        if kept > 0 {
            model
                .forward(&drafts[..kept], cache, Logits::Last)
                .map_err(|e| format!("draft model: {e}"))?;
        }
        Ok(())
    }
}

/// Checks that a draft can propose tokens for a target: the same tokenizer vocabulary (every
/// token string at the same id, special tokens included) and the same end-of-sequence token.
/// Without tokenizers, the same vocabulary size. Errors say what differs.
pub fn check_vocabularies(
    target: Option<&Tokenizer>,
    target_vocab: usize,
    draft: Option<&Tokenizer>,
    draft_vocab: usize,
) -> Result<(), String> {
    match (target, draft) {
        (Some(t), Some(d)) => {
            let (tv, dv) = (t.inner().get_vocab(true), d.inner().get_vocab(true));
            if tv.len() != dv.len() {
                return Err(format!(
                    "the draft's tokenizer has {} tokens, the target's {}",
                    dv.len(),
                    tv.len()
                ));
            }
            let mut differ: Vec<(&String, &u32)> = tv
                .iter()
                .filter(|(tok, id)| dv.get(*tok) != Some(id))
                .collect();
            if !differ.is_empty() {
                differ.sort_by_key(|(_, &id)| id);
                let (tok, id) = differ[0];
                return Err(format!(
                    "the draft's tokenizer differs from the target's in {} tokens (first: {tok:?}, id {id} in the target, {:?} in the draft)",
                    differ.len(),
                    dv.get(tok)
                ));
            }
            if t.eos_token_id() != d.eos_token_id() || t.bos_token_id() != d.bos_token_id() {
                return Err(format!(
                    "the draft's special tokens differ: EOS {:?} / BOS {:?}, the target's {:?} / {:?}",
                    d.eos_token_id(),
                    d.bos_token_id(),
                    t.eos_token_id(),
                    t.bos_token_id()
                ));
            }
            Ok(())
        }
        (None, None) if target_vocab == draft_vocab => Ok(()),
        (None, None) => Err(format!(
            "the draft's vocabulary has {draft_vocab} tokens, the target's {target_vocab}"
        )),
        (Some(_), None) => {
            Err("the draft model has no tokenizer (tokenizer.json or a GGUF vocabulary) to compare with the target's".into())
        }
        (None, Some(_)) => {
            Err("the target model has no tokenizer (tokenizer.json or a GGUF vocabulary) to compare with the draft's".into())
        }
    }
}

/// Prompt lookup: finds the latest earlier occurrence of the last `n` tokens of `history`
/// (`n` = 3, 2, 1, the longest that occurs) and proposes the `k` tokens that followed it (past
/// the end of the history, the pattern continues: a loop is proposed as a loop).
pub fn prompt_lookup(history: &[u32], k: usize) -> Vec<u32> {
    let len = history.len();
    for n in (1..=3usize).rev() {
        if len <= n {
            continue;
        }
        let tail = &history[len - n..];
        // Latest start s < len - n with history[s..s + n] == tail and something after it.
        if let Some(s) = (0..len - n).rev().find(|&s| &history[s..s + n] == tail) {
            // What followed, continued past the end of the history with the proposals
            // themselves: a repeating pattern goes on repeating.
            let mut seq = history.to_vec();
            for j in s + n..s + n + k {
                seq.push(seq[j]);
            }
            return seq[len..].to_vec();
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_lookup_continues_the_latest_match() {
        let h = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 1, 2, 3];
        assert_eq!(prompt_lookup(&h, 2), vec![7, 8]);
        assert_eq!(prompt_lookup(&h, 7), vec![7, 8, 1, 2, 3, 7, 8]);
        assert_eq!(prompt_lookup(&[5, 6, 7], 3), Vec::<u32>::new());
        assert_eq!(prompt_lookup(&[4, 5, 4], 3), vec![5, 4, 5]);
        assert_eq!(prompt_lookup(&[9, 9, 9], 4), vec![9, 9, 9, 9]);
    }

    #[test]
    fn draft_length_follows_acceptance_and_cost() {
        // A cheap draft that is always right: the longest rounds.
        let mut d = DraftLength::new(4);
        for _ in 0..20 {
            let k = d.choose();
            d.record(k, k, 0.001 * k as f64, 0.010 + 0.001 * k as f64);
        }
        assert_eq!(d.choose(), 4);
        // A draft that is always wrong: plain decoding, with a probe now and then.
        let mut d = DraftLength::new(4);
        let mut plain = 0;
        for _ in 0..64 {
            let k = d.choose();
            plain += (k == 0) as usize;
            d.record(k, 0, 0.001 * k as f64, 0.010 + 0.001 * k as f64);
        }
        assert!(plain >= 50, "{plain}");
        // Right a third of the time, the draft costing 0.6 of a step and a verified token 0.3:
        // plain decoding, with probes ever rarer.
        let mut d = DraftLength::new(4);
        let mut proposed = 0;
        for _ in 0..400 {
            let k = d.choose();
            proposed += k;
            d.record(
                k,
                (k > 0 && proposed % 3 == 0) as usize,
                0.6 * k as f64,
                1.0 + 0.3 * k as f64,
            );
        }
        assert!(proposed < 20, "{proposed} proposed in 400 rounds");
        // Right half the time but each extra token costs as much as a whole step (streamed
        // experts): not worth it.
        let mut d = DraftLength::new(4);
        for _ in 0..40 {
            let k = d.choose();
            d.record(k, k / 2, 0.0, 0.010 * (k + 1) as f64);
        }
        assert_eq!(d.choose(), 0);
    }
}
