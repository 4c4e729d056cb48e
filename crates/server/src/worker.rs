//! The engine thread: it owns every sequence's cache and runs all forward passes, one at a time
//! (the model runs one pass at a time; its kernels spread each pass over the rayon pool).
//!
//! Handlers hand it [`Job`]s through a bounded queue and get [`Event`]s back on an unbounded
//! channel per job, so sending never blocks the engine: a slow client only lets its own events
//! pile up (bounded by its `max_tokens`). Up to `max_concurrent` sequences are interleaved, one
//! token each per round, so a long generation does not hold the others back. Between two tokens
//! the worker checks whether the job's receiver is gone (the client disconnected, or its handler
//! was dropped) and drops the sequence at once; a server-wide cancel flag does the same for all.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use moestream_engine::cache::SequenceCache;
use moestream_engine::generate::{FinishReason, Sampler, SamplingParams, StopStrings};
use moestream_engine::models::Logits;
use moestream_engine::speculative::Speculation;
use moestream_engine::text::IncrementalDecoder;
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::Engine;

/// Sequences reserve cache room for this many generated tokens up front; more grow the cache.
const RESERVE_GENERATED_TOKENS: usize = 512;

/// OpenAI's penalties and biases, applied to the logits before the sampler.
#[derive(Clone, Debug, Default)]
pub struct LogitAdjustments {
    /// Subtracted once from every token already generated.
    pub presence_penalty: f32,
    /// Subtracted per occurrence of every token already generated.
    pub frequency_penalty: f32,
    /// Added to the named tokens.
    pub logit_bias: Vec<(u32, f32)>,
}

/// One generation to run.
pub struct Job {
    /// Prompt token ids (checked against the vocabulary and the context by the handler).
    pub prompt: Vec<u32>,
    /// Most tokens to generate (prompt + this fits the context).
    pub max_tokens: usize,
    /// Sampler settings.
    pub sampling: SamplingParams,
    /// Penalties and biases.
    pub adjustments: LogitAdjustments,
    /// Strings that end generation (not emitted).
    pub stop: Vec<String>,
    /// `Some(n)`: report each token's log-probability and the `n` most likely alternatives.
    pub logprobs: Option<usize>,
    /// When the request arrived (time to first token counts from here).
    pub arrived: Instant,
    /// Where the events go.
    pub events: mpsc::UnboundedSender<Event>,
    /// Use the server's speculative decoding, if it has one (the request's `speculative`).
    pub speculate: bool,
}

/// A token's log-probability under the model's raw distribution (before penalties and
/// temperature), with the most likely alternatives.
#[derive(Clone, Debug)]
pub struct TokenLogprob {
    /// The token.
    pub token: TokenText,
    /// Natural-log probability.
    pub logprob: f32,
    /// The most likely tokens at this position, most likely first, with theirs.
    pub top: Vec<(TokenText, f32)>,
}

/// One token as text and as bytes.
#[derive(Clone, Debug)]
pub struct TokenText {
    /// Its text (a partial UTF-8 character shows as U+FFFD).
    pub text: String,
    /// Its exact bytes.
    pub bytes: Vec<u8>,
}

/// What a job reports.
#[derive(Debug)]
pub enum Event {
    /// A generated token: its final text (may be empty: held back as a partial character or a
    /// possible stop string) and, if asked for, its log-probability.
    Token {
        /// Text that became final with this token.
        text: String,
        /// Its log-probability.
        logprob: Option<TokenLogprob>,
    },
    /// Generation ended.
    Done {
        /// Why.
        reason: FinishReason,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Generated tokens (EOS excluded).
        completion_tokens: usize,
    },
    /// The engine failed (a failed expert read).
    Failed(String),
    /// The server is shutting down and its grace period is over: the generation was cancelled.
    ShutDown,
}

/// The worker's side of the queue.
pub struct Worker {
    /// Jobs from the handlers.
    pub queue: mpsc::Receiver<Job>,
    /// The model.
    pub engine: Arc<Engine>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Set at shutdown once the grace period is over: every sequence is cancelled.
    pub cancel_all: Arc<AtomicBool>,
    /// Sequences interleaved at most.
    pub max_concurrent: usize,
}

impl Worker {
    /// Serves jobs until every queue sender is gone.
    pub fn run(mut self) {
        let mut active: Vec<Sequence> = Vec::new();
        let mut script_next = 0usize;
        loop {
            while active.len() < self.max_concurrent.max(1) {
                let job = if active.is_empty() {
                    match self.queue.blocking_recv() {
                        Some(job) => job,
                        None => return,
                    }
                } else {
                    match self.queue.try_recv() {
                        Ok(job) => job,
                        Err(_) => break,
                    }
                };
                self.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
                let forced = (!self.engine.scripted_replies.is_empty()).then(|| {
                    let reply = &self.engine.scripted_replies
                        [script_next % self.engine.scripted_replies.len()];
                    script_next += 1;
                    reply.clone()
                });
                let speculation = match (&forced, &self.engine.speculation) {
                    (None, Some(c)) if job.speculate => Some(Speculation::new(
                        c.proposer.clone(),
                        c.max_draft,
                        c.fixed,
                        &job.sampling,
                    )),
                    _ => None,
                };
                active.push(Sequence::new(job, forced, speculation));
            }
            self.metrics
                .active_sequences
                .store(active.len(), Ordering::Relaxed);
            let cancel = self.cancel_all.load(Ordering::Relaxed);
            for seq in &mut active {
                // A bug that panics in one sequence's step must not take the engine down with it.
                let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    seq.step(&self.engine, &self.metrics, cancel)
                }));
                if stepped.is_err() {
                    seq.fail("internal error while generating".into(), &self.metrics);
                }
            }
            active.retain(|s| !s.done);
            self.metrics
                .active_sequences
                .store(active.len(), Ordering::Relaxed);
        }
    }
}

/// One sequence being generated.
struct Sequence {
    job: Job,
    cache: Option<SequenceCache>,
    logits: Vec<f32>,
    sampler: Sampler,
    stops: StopStrings,
    decoder: IncrementalDecoder,
    history: Vec<u32>,
    generated: usize,
    last_token_at: Option<Instant>,
    /// Test scripts: tokens to emit instead of sampling (then EOS).
    forced: Option<std::collections::VecDeque<u32>>,
    /// Speculative decoding state, when the server speculates.
    speculation: Option<Speculation>,
    done: bool,
}

impl Sequence {
    /// A sequence for `job`; `forced`: a scripted reply (see [`Engine::scripted_replies`]).
    fn new(job: Job, forced: Option<Vec<u32>>, speculation: Option<Speculation>) -> Sequence {
        Sequence {
            sampler: Sampler::new(job.sampling.clone()),
            stops: StopStrings::new(job.stop.clone()),
            decoder: IncrementalDecoder::with_context(&job.prompt, true),
            history: job.prompt.clone(),
            cache: None,
            logits: Vec::new(),
            generated: 0,
            last_token_at: None,
            forced: forced.map(Into::into),
            speculation,
            done: false,
            job,
        }
    }

    /// Runs the prefill (first call) and generates one token, or with speculation one round
    /// (one or more tokens).
    fn step(&mut self, engine: &Engine, metrics: &Metrics, cancel: bool) {
        if self.job.events.is_closed() {
            return self.end(FinishReason::Cancelled, engine, metrics);
        }
        if cancel {
            let _ = self.job.events.send(Event::ShutDown);
            metrics.finished("cancelled", self.job.prompt.len(), self.generated);
            self.record_speculation(metrics);
            self.done = true;
            return;
        }
        let model = &engine.model;
        if self.cache.is_none() {
            let reserve = self.job.prompt.len() + self.job.max_tokens.min(RESERVE_GENERATED_TOKENS);
            let mut cache = model.new_cache(reserve);
            match model.forward(&self.job.prompt, &mut cache, Logits::Last) {
                Ok(l) => self.logits = l,
                Err(e) => return self.fail(e.to_string(), metrics),
            }
            if let Some(spec) = self.speculation.as_mut() {
                if let Err(e) = spec.prefill(&self.job.prompt) {
                    return self.fail(e, metrics);
                }
            }
            self.cache = Some(cache);
        }
        let chosen: Vec<(u32, Option<RawDistribution>)> = if !self.logits.is_empty() {
            // A position's logits are waiting (after the prefill, or a plain step).
            let raw = self
                .job
                .logprobs
                .map(|n| RawDistribution::new(&self.logits, n));
            self.adjust_logits();
            let next = match &mut self.forced {
                Some(f) => f
                    .pop_front()
                    .unwrap_or_else(|| engine.eos_token_ids.first().copied().unwrap_or(0)),
                None => self.sampler.sample(&mut self.logits, &self.history),
            };
            self.logits.clear();
            vec![(next, raw)]
        } else {
            match self.speculate(engine) {
                Ok(c) => c,
                Err(e) => return self.fail(e, metrics),
            }
        };
        let mut last = None;
        for (next, raw) in chosen {
            if !self.emit(next, raw, engine, metrics) {
                return;
            }
            last = Some(next);
        }
        if self.speculation.is_some() {
            return; // the next round starts from the last token
        }
        let (Some(cache), Some(next)) = (self.cache.as_mut(), last) else {
            return;
        };
        match model.forward(&[next], cache, Logits::Last) {
            Ok(l) => self.logits = l,
            Err(e) => self.fail(e.to_string(), metrics),
        }
    }

    /// One speculative round after the last emitted token: the tokens with their raw
    /// distributions.
    fn speculate(
        &mut self,
        engine: &Engine,
    ) -> Result<Vec<(u32, Option<RawDistribution>)>, String> {
        let (Some(spec), Some(cache)) = (self.speculation.as_mut(), self.cache.as_mut()) else {
            return Err("no logits and no speculation".into());
        };
        let limit = (self.job.max_tokens - self.generated)
            .min(engine.ctx_size.saturating_sub(cache.len()))
            .max(1);
        let adjustments = &self.job.adjustments;
        let prompt_len = self.job.prompt.len();
        let mut adjust = |row: &mut [f32], seen: &[u32]| {
            adjust_row(adjustments, &seen[prompt_len.min(seen.len())..], row)
        };
        let round = spec.round(
            &engine.model,
            cache,
            &self.history,
            &mut self.sampler,
            limit,
            &mut adjust,
        )?;
        let v = engine.model.config.vocab_size;
        Ok(round
            .tokens
            .iter()
            .zip(round.logits.chunks_exact(v))
            .map(|(&t, row)| (t, self.job.logprobs.map(|n| RawDistribution::new(row, n))))
            .collect())
    }

    /// Emits one chosen token; `false` when the sequence ended with it.
    fn emit(
        &mut self,
        next: u32,
        raw: Option<RawDistribution>,
        engine: &Engine,
        metrics: &Metrics,
    ) -> bool {
        let now = Instant::now();
        match self.last_token_at {
            None => metrics.first_token((now - self.job.arrived).as_secs_f64()),
            Some(t) => metrics.next_token((now - t).as_secs_f64()),
        }
        self.last_token_at = Some(now);
        if engine.eos_token_ids.contains(&next) {
            self.end(FinishReason::Stop, engine, metrics);
            return false;
        }
        self.generated += 1;
        self.history.push(next);
        let piece = match self.decoder.push(&engine.tokenizer, next) {
            Ok(p) => p,
            Err(e) => {
                self.fail(e.to_string(), metrics);
                return false;
            }
        };
        let (text, stopped) = self.stops.push(&piece);
        let logprob = raw.map(|r| r.entry(next, engine));
        let _ = self.job.events.send(Event::Token { text, logprob });
        if stopped {
            self.end_without_flush(FinishReason::Stop, metrics);
            return false;
        }
        let cached_tokens = self.cache.as_ref().map_or(0, SequenceCache::len);
        if self.generated >= self.job.max_tokens || cached_tokens >= engine.ctx_size {
            self.end(FinishReason::Length, engine, metrics);
            return false;
        }
        true
    }

    fn record_speculation(&mut self, metrics: &Metrics) {
        if let Some(s) = self.speculation.take() {
            metrics.speculation(&s.stats);
        }
    }

    fn adjust_logits(&mut self) {
        let generated = &self.history[self.job.prompt.len()..];
        adjust_row(&self.job.adjustments, generated, &mut self.logits);
    }

    /// Ends with the text still held back (partial character, possible stop prefix) released.
    fn end(&mut self, reason: FinishReason, engine: &Engine, metrics: &Metrics) {
        if reason != FinishReason::Cancelled {
            let rest = self.decoder.flush(&engine.tokenizer).unwrap_or_default();
            let (mut text, _) = self.stops.push(&rest);
            text.push_str(&self.stops.finish());
            if !text.is_empty() {
                let _ = self.job.events.send(Event::Token {
                    text,
                    logprob: None,
                });
            }
        }
        self.end_without_flush(reason, metrics);
    }

    fn end_without_flush(&mut self, reason: FinishReason, metrics: &Metrics) {
        let label = match reason {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        };
        // Counted before the client hears it is done, so /metrics read after a response
        // includes that response.
        metrics.finished(label, self.job.prompt.len(), self.generated);
        self.record_speculation(metrics);
        let _ = self.job.events.send(Event::Done {
            reason,
            prompt_tokens: self.job.prompt.len(),
            completion_tokens: self.generated,
        });
        self.done = true;
        self.cache = None;
    }

    fn fail(&mut self, message: String, metrics: &Metrics) {
        tracing::error!("generation failed: {message}");
        metrics.finished("error", self.job.prompt.len(), self.generated);
        self.record_speculation(metrics);
        let _ = self.job.events.send(Event::Failed(message));
        self.done = true;
        self.cache = None;
    }
}

/// Applies a request's logit bias and its presence and frequency penalties (over the tokens
/// `generated` so far) to one row of logits.
fn adjust_row(a: &LogitAdjustments, generated: &[u32], row: &mut [f32]) {
    for &(id, bias) in &a.logit_bias {
        if let Some(l) = row.get_mut(id as usize) {
            *l += bias;
        }
    }
    if a.presence_penalty != 0.0 || a.frequency_penalty != 0.0 {
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &t in generated {
            *counts.entry(t).or_default() += 1;
        }
        for (&id, &n) in &counts {
            if let Some(l) = row.get_mut(id as usize) {
                *l -= a.presence_penalty + a.frequency_penalty * n as f32;
            }
        }
    }
}

/// The model's distribution at one position, kept from before penalties and sampling.
struct RawDistribution {
    logits: Vec<f32>,
    log_sum_exp: f32,
    top: Vec<u32>,
}

impl RawDistribution {
    fn new(logits: &[f32], n: usize) -> RawDistribution {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
        let log_sum_exp = max + sum.ln() as f32;
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        let n = n.min(ids.len());
        let by_logit = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        if n > 0 && n < ids.len() {
            ids.select_nth_unstable_by(n - 1, by_logit);
        }
        ids.truncate(n);
        ids.sort_by(by_logit);
        RawDistribution {
            logits: logits.to_vec(),
            log_sum_exp,
            top: ids,
        }
    }

    fn logprob(&self, id: u32) -> f32 {
        self.logits
            .get(id as usize)
            .map_or(f32::NEG_INFINITY, |l| l - self.log_sum_exp)
    }

    fn entry(&self, chosen: u32, engine: &Engine) -> TokenLogprob {
        TokenLogprob {
            token: token_text(engine, chosen),
            logprob: self.logprob(chosen),
            top: self
                .top
                .iter()
                .map(|&id| (token_text(engine, id), self.logprob(id)))
                .collect(),
        }
    }
}

/// One token on its own, special tokens included.
fn token_text(engine: &Engine, id: u32) -> TokenText {
    let bytes = crate::token_bytes::token_bytes(&engine.tokenizer, id);
    TokenText {
        text: String::from_utf8_lossy(&bytes).into_owned(),
        bytes,
    }
}
