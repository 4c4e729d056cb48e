//! From logits to text: sampling, stop conditions, and the decode loop.
//!
//! The sampler applies, in llama.cpp's and transformers' order: repetition penalty, temperature,
//! top-k, top-p, min-p, then draws with a seeded generator, so a seed reproduces a run. Temperature 0
//! is greedy (argmax, lowest id on ties). Stop strings are matched on the detokenized text; text
//! that could still become a stop string is held back until it cannot.
use crate::cache::SequenceCache;
use crate::models::{Logits, Model};
use crate::speculative::{Speculation, SpeculationStats};
use crate::text::{IncrementalDecoder, Tokenizer};
use std::time::Instant;

/// Sampling settings.
#[derive(Clone, Debug)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set whose mass reaches p (1 = off).
    pub top_p: f32,
    /// Drop tokens below `min_p` times the top probability (0 = off).
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of tokens already seen (1 = off).
    pub repetition_penalty: f32,
    /// Random seed.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

/// A seeded token sampler.
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
}

impl Sampler {
    /// A sampler with these settings.
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = SplitMix64(params.seed ^ 0x9E37_79B9_7F4A_7C15);
        Sampler { params, rng }
    }

    /// Picks the next token from `logits` (modified in place); `history` feeds the repetition
    /// penalty.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let d = self.distribution(logits, history);
        self.draw(&d)
    }

    /// Whether this sampler is greedy (temperature 0).
    pub fn is_greedy(&self) -> bool {
        self.params.temperature <= 0.0
    }

    /// The distribution [`Self::sample`] draws from: repetition penalty, then argmax (greedy) or
    /// temperature, top-k, top-p and min-p, renormalised. `logits` are penalised in place.
    pub fn distribution(&self, logits: &mut [f32], history: &[u32]) -> Distribution {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.temperature <= 0.0 {
            return Distribution {
                candidates: vec![(argmax(logits), 1.0)],
            };
        }
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l / p.temperature))
            .collect();
        // Most likely first, but only as far as the cuts need: the k best when top-k cuts
        // (a selection, then a sort of k), all of them for top-p or min-p alone, none otherwise
        // (a full sort of a 150k vocabulary costs about as much as a small model's step).
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, order);
            cand.truncate(p.top_k);
            cand.sort_by(order);
        } else if p.top_p < 1.0 || p.min_p > 0.0 {
            cand.sort_by(order);
        } else if let Some(best) = (0..cand.len()).max_by(|&i, &j| order(&cand[j], &cand[i])) {
            cand.swap(0, best);
        }
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|c| ((c.1 - max) as f64).exp()).collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, &q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p as f64;
            keep = keep.min(probs.iter().take_while(|&&q| q >= floor).count().max(1));
        }
        let total: f64 = probs[..keep].iter().sum();
        Distribution {
            candidates: cand[..keep]
                .iter()
                .zip(&probs)
                .map(|(c, &q)| (c.0, q / total))
                .collect(),
        }
    }

    /// Draws a token from `d` (greedy: its only candidate, drawing nothing).
    pub fn draw(&mut self, d: &Distribution) -> u32 {
        if self.is_greedy() || d.candidates.len() == 1 {
            return d.candidates[0].0;
        }
        let mut r = self.rng.next_f64();
        for &(id, q) in &d.candidates {
            r -= q;
            if r <= 0.0 {
                return id;
            }
        }
        d.candidates[d.candidates.len() - 1].0
    }

    /// Speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023): `x` was drawn
    /// from the draft's distribution `q`; it is kept with probability `min(1, p(x)/q(x))`,
    /// else a token is drawn from `max(0, p − q)` renormalised. Either way the token that comes
    /// out is distributed exactly as `p`. Returns `None` when `x` is kept, else the replacement.
    /// Greedy: `x` is kept if and only if it is `p`'s argmax, which replaces it otherwise.
    pub fn accept(&mut self, p: &Distribution, q: &Distribution, x: u32) -> Option<u32> {
        let (px, qx) = (p.prob(x), q.prob(x));
        if self.is_greedy() {
            return (p.candidates[0].0 != x).then_some(p.candidates[0].0);
        }
        if qx > 0.0 && self.rng.next_f64() * qx < px {
            return None;
        }
        let q_of: std::collections::HashMap<u32, f64> = q.candidates.iter().copied().collect();
        let mut residual: Vec<(u32, f64)> = p
            .candidates
            .iter()
            .map(|&(id, pi)| (id, (pi - q_of.get(&id).copied().unwrap_or(0.0)).max(0.0)))
            .filter(|c| c.1 > 0.0)
            .collect();
        let total: f64 = residual.iter().map(|c| c.1).sum();
        if total <= 0.0 {
            return Some(self.draw(p));
        }
        residual.iter_mut().for_each(|c| c.1 /= total);
        Some(self.draw(&Distribution {
            candidates: residual,
        }))
    }
}

/// A distribution over tokens after the sampler's transformations: candidates with their
/// probabilities (summing to 1), most likely first; tokens not listed have probability 0.
#[derive(Clone, Debug, PartialEq)]
pub struct Distribution {
    /// `(token, probability)`.
    pub candidates: Vec<(u32, f64)>,
}

impl Distribution {
    /// A single sure token (a deterministic proposal).
    pub fn certain(token: u32) -> Distribution {
        Distribution {
            candidates: vec![(token, 1.0)],
        }
    }

    /// The probability of `token`.
    pub fn prob(&self, token: u32) -> f64 {
        self.candidates
            .iter()
            .find(|c| c.0 == token)
            .map_or(0.0, |c| c.1)
    }
}

/// Index of the largest value (lowest index on ties).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Finds stop strings in streamed text, holding back what might still grow into one.
#[derive(Clone, Debug, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    pending: String,
}

impl StopStrings {
    /// Watches for these strings (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> StopStrings {
        StopStrings {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Feeds new text; returns `(text safe to emit, stopped)`. On a stop, the text before the stop
    /// string is returned and the rest is dropped.
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..pos].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if self.pending.ends_with(&s[..i]) {
                    hold = hold.max(i);
                }
            }
        }
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// Releases held-back text at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The callback asked to stop.
    Cancelled,
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerationRequest {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Token ids that end generation (not emitted).
    pub eos_token_ids: Vec<u32>,
    /// Strings that end generation (not emitted).
    pub stop_strings: Vec<String>,
}

/// Timing and counts of one generation.
#[derive(Clone, Debug)]
pub struct GenerationStats {
    /// Prompt tokens processed.
    pub prompt_tokens: usize,
    /// Seconds spent on the prompt (prefill).
    pub prefill_seconds: f64,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Seconds spent generating after the first token.
    pub decode_seconds: f64,
    /// Why it stopped.
    pub finish_reason: FinishReason,
    /// The generated ids (EOS excluded).
    pub tokens: Vec<u32>,
    /// Speculation counters, when speculating.
    pub speculation: Option<SpeculationStats>,
}

/// Runs the decode loop. `on_text` receives text as it becomes final (never broken UTF-8) and
/// returns `false` to cancel. Without a tokenizer no text is produced, ids only.
pub fn generate(
    model: &Model,
    tokenizer: Option<&Tokenizer>,
    cache: &mut SequenceCache,
    req: &GenerationRequest,
    on_text: impl FnMut(&str) -> bool,
) -> Result<GenerationStats, String> {
    generate_with(model, tokenizer, cache, req, None, on_text)
}

/// [`generate`], with speculative decoding when `speculation` is given: each round may produce
/// several tokens, the same ones (greedy) or ones distributed the same (sampling) as without.
pub fn generate_with(
    model: &Model,
    tokenizer: Option<&Tokenizer>,
    cache: &mut SequenceCache,
    req: &GenerationRequest,
    mut speculation: Option<&mut Speculation>,
    mut on_text: impl FnMut(&str) -> bool,
) -> Result<GenerationStats, String> {
    if req.prompt.is_empty() {
        return Err("the prompt is empty".into());
    }
    model.check_tokens(&req.prompt)?;
    let ctx = model.config.max_position_embeddings;
    if cache.len() + req.prompt.len() > ctx {
        return Err(format!(
            "prompt of {} tokens exceeds the context of {ctx} tokens",
            cache.len() + req.prompt.len()
        ));
    }
    let mut sampler = Sampler::new(req.sampling.clone());
    let mut stops = StopStrings::new(req.stop_strings.clone());
    let mut decoder = IncrementalDecoder::with_context(&req.prompt, true);
    let mut history = req.prompt.clone();
    let t0 = Instant::now();
    let mut logits = model
        .forward(&req.prompt, cache, Logits::Last)
        .map_err(|e| e.to_string())?;
    if let Some(spec) = speculation.as_deref_mut() {
        spec.prefill(&req.prompt)?;
    }
    let prefill_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut tokens = Vec::new();
    let mut finish = FinishReason::Length;
    // Ended by an end-of-sequence token (not by a stop string, whose text is dropped).
    let mut eos = false;
    let mut chosen = if req.max_tokens > 0 {
        vec![sampler.sample(&mut logits, &history)]
    } else {
        Vec::new()
    };
    'generation: while !chosen.is_empty() {
        for next in chosen.drain(..) {
            if req.eos_token_ids.contains(&next) {
                finish = FinishReason::Stop;
                eos = true;
                break 'generation;
            }
            tokens.push(next);
            history.push(next);
            if let Some(tok) = tokenizer {
                let piece = decoder.push(tok, next).map_err(|e| e.to_string())?;
                let (out, stopped) = stops.push(&piece);
                if !out.is_empty() && !on_text(&out) {
                    finish = FinishReason::Cancelled;
                    break 'generation;
                }
                if stopped {
                    finish = FinishReason::Stop;
                    break 'generation;
                }
            }
            if tokens.len() == req.max_tokens {
                break 'generation;
            }
        }
        if cache.len() >= ctx {
            break;
        }
        chosen = match speculation.as_deref_mut() {
            Some(spec) => {
                let limit = req.max_tokens - tokens.len();
                let mut no_adjustment = |_: &mut [f32], _: &[u32]| {};
                spec.round(
                    model,
                    cache,
                    &history,
                    &mut sampler,
                    limit,
                    &mut no_adjustment,
                )?
                .tokens
            }
            None => {
                let next = history[history.len() - 1];
                let mut logits = model
                    .forward(&[next], cache, Logits::Last)
                    .map_err(|e| e.to_string())?;
                vec![sampler.sample(&mut logits, &history)]
            }
        };
    }
    // At the length limit or EOS, release what was held back: the bytes of a character not yet
    // complete, and text that could have begun a stop string that never came.
    if let (Some(tok), true) = (tokenizer, finish == FinishReason::Length || eos) {
        let rest = decoder.flush(tok).map_err(|e| e.to_string())?;
        let (mut out, _) = stops.push(&rest);
        out.push_str(&stops.finish());
        if !out.is_empty() {
            on_text(&out);
        }
    }
    let generated = tokens.len();
    Ok(GenerationStats {
        prompt_tokens: req.prompt.len(),
        prefill_seconds,
        generated_tokens: generated,
        decode_seconds: if generated > 1 {
            t1.elapsed().as_secs_f64()
        } else {
            0.0
        },
        finish_reason: finish,
        tokens,
        speculation: speculation.map(|s| s.stats),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_argmax() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.0], &[]), 1);
    }

    #[test]
    fn repetition_penalty_changes_choice() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        assert_eq!(s.sample(&mut [2.9, 3.0], &[1]), 0);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_reproduces() {
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.0, 1.0, 0.5], &[]), 1);
        }
        let p = SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..50)
                .map(|_| s.sample(&mut [0.0, 0.1, 0.2, 0.3], &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(&p), draw(&p));
        assert!(draw(&p).iter().any(|&t| t != draw(&p)[0]));
    }

    #[test]
    fn sampling_follows_distribution() {
        let p = SamplingParams {
            temperature: 1.0,
            seed: 3,
            ..Default::default()
        };
        let mut s = Sampler::new(p);
        let logits = [0.0f32, (3.0f32).ln()];
        let ones = (0..4000)
            .filter(|_| s.sample(&mut logits.clone(), &[]) == 1)
            .count();
        assert!((ones as f64 / 4000.0 - 0.75).abs() < 0.03, "{ones}");
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        let logits = [10.0f32, 9.0, 0.0, 0.0];
        for p in [
            SamplingParams {
                temperature: 1.0,
                top_p: 0.5,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                min_p: 0.5,
                ..Default::default()
            },
        ] {
            let mut s = Sampler::new(p);
            for _ in 0..100 {
                assert_eq!(s.sample(&mut logits.clone(), &[]), 0);
            }
        }
    }

    /// Whatever the draft's distribution, the tokens rejection sampling lets through are
    /// distributed as the target's (chi-square-like bound on 20000 draws).
    #[test]
    fn rejection_sampling_yields_the_target_distribution() {
        let p = Distribution {
            candidates: vec![(0, 0.5), (1, 0.3), (2, 0.2)],
        };
        let drafts = [
            Distribution {
                candidates: vec![(2, 0.6), (3, 0.3), (0, 0.1)],
            },
            Distribution::certain(1),
            p.clone(),
        ];
        for q in &drafts {
            let params = SamplingParams {
                temperature: 1.0,
                seed: 11,
                ..Default::default()
            };
            let mut s = Sampler::new(params);
            let n = 20000;
            let mut counts = [0usize; 4];
            for _ in 0..n {
                let x = s.draw(q);
                let out = s.accept(&p, q, x).unwrap_or(x);
                counts[out as usize] += 1;
            }
            for (id, want) in [(0u32, 0.5), (1, 0.3), (2, 0.2), (3, 0.0)] {
                let got = counts[id as usize] as f64 / n as f64;
                assert!(
                    (got - want).abs() < 0.015,
                    "{q:?}: token {id} {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn greedy_acceptance_keeps_only_the_argmax() {
        let mut s = Sampler::new(SamplingParams::default());
        let p = s.distribution(&mut [0.1, 3.0, 2.0], &[]);
        assert_eq!(p, Distribution::certain(1));
        assert_eq!(s.accept(&p, &Distribution::certain(1), 1), None);
        assert_eq!(s.accept(&p, &Distribution::certain(2), 2), Some(1));
    }

    #[test]
    fn stop_strings_hold_back_prefixes() {
        let mut s = StopStrings::new(vec!["</end>".into()]);
        assert_eq!(s.push("hello </"), ("hello ".to_string(), false));
        assert_eq!(s.push("en"), (String::new(), false));
        assert_eq!(s.push("d> more"), (String::new(), true));
        let mut s = StopStrings::new(vec!["xyz".into()]);
        assert_eq!(s.push("ab x"), ("ab ".to_string(), false));
        assert_eq!(s.push("a"), ("xa".to_string(), false));
        assert_eq!(s.finish(), "");
    }
}
