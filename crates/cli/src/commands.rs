//! The subcommands.
use crate::kl;
use crate::loaded::{human_bytes, peak_rss_bytes, EngineArgs, Loaded, SpeculationArgs, Traffic};
use crate::synth::{self, SynthFormat};
use anyhow::{bail, Context, Result};
use clap::Args;
use moestream_engine::generate::{
    generate_with, GenerationRequest, GenerationStats, SamplingParams,
};
use moestream_engine::models::blocks::FeedForward;
use moestream_engine::models::Logits;
use moestream_engine::speculative::{Proposer, SpeculationStats};
use moestream_kernels::features::ActivationPrecision;
use moestream_kernels::ops::log_softmax_at;
use serde_json::{json, Value};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Sampling temperature (0 = greedy). Default: the model's generation_config.json, else 0.7.
    #[arg(long)]
    temperature: Option<f32>,
    /// Sampling top-k cutoff (0 = off). (`--top-k` sets the number of active experts.)
    #[arg(long = "sample-top-k", value_name = "K")]
    top_k: Option<usize>,
    /// Nucleus sampling mass (1 = off).
    #[arg(long)]
    top_p: Option<f32>,
    /// Min-p cutoff relative to the most likely token (0 = off).
    #[arg(long)]
    min_p: Option<f32>,
    /// Repetition penalty (1 = off).
    #[arg(long)]
    repetition_penalty: Option<f32>,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    pub fn params(&self, l: &Loaded) -> SamplingParams {
        let g = &l.generation;
        SamplingParams {
            temperature: self.temperature.or(g.temperature).unwrap_or(0.7),
            top_k: self.top_k.or(g.top_k).unwrap_or(0),
            top_p: self.top_p.or(g.top_p).unwrap_or(1.0),
            min_p: self.min_p.or(g.min_p).unwrap_or(0.0),
            repetition_penalty: self
                .repetition_penalty
                .or(g.repetition_penalty)
                .unwrap_or(1.0),
            seed: self.seed,
        }
    }
}

#[derive(Args)]
pub struct RunArgs {
    /// Model folder. Without it, a small random-weight demo model is generated once into the
    /// cache folder and used (its output is noise).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt text (rendered through the model's chat template unless --raw). Without a prompt,
    /// an interactive chat reads lines from stdin.
    #[arg(long)]
    prompt: Option<String>,
    /// Prompt as token ids ("ID ID ..."), fed as is.
    #[arg(long, conflicts_with = "prompt")]
    prompt_tokens: Option<String>,
    /// System message for chat.
    #[arg(long)]
    system: Option<String>,
    /// Feed the prompt text without the chat template.
    #[arg(long)]
    raw: bool,
    /// Pass enable_thinking to the chat template (Qwen3: true/false).
    #[arg(long)]
    enable_thinking: Option<bool>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Stop when this string is generated (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Do not stop at end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object (prompt and generated token ids, text, statistics) instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    speculation: SpeculationArgs,
}

fn parse_ids(s: &str) -> Result<Vec<u32>> {
    s.split(|c: char| c.is_whitespace() || c == ',')
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>()
                .with_context(|| format!("`{t}` is not a token id"))
        })
        .collect()
}

fn demo_model_dir() -> Result<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .context("neither XDG_CACHE_HOME nor HOME is set; pass --model")?;
    let dir = base.join("moestream").join("demo-qwen3_moe-tiny");
    if !dir.join("config.json").is_file() {
        eprintln!(
            "note: generating the random-weight demo model into {} (once)",
            dir.display()
        );
        let tmp = dir.with_extension("partial");
        let _ = std::fs::remove_dir_all(&tmp);
        synth::synth("qwen3_moe", "tiny", SynthFormat::HfBf16, 0, &tmp, false)?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir)
            .with_context(|| format!("moving the demo model into {}", dir.display()))?;
    }
    eprintln!("note: no --model given: running a tiny model with RANDOM weights ({}); its output is noise. Pass --model DIR for a real model.", dir.display());
    Ok(dir)
}

fn print_stats(s: &GenerationStats, l: &Loaded, before: &Traffic) {
    let rate = |n: usize, t: f64| if t > 0.0 { n as f64 / t } else { 0.0 };
    let decode_tokens = s.generated_tokens.saturating_sub(1);
    eprintln!(
        "\n[prompt {} tok, prefill {:.1} tok/s | generated {} tok, decode {:.2} tok/s | peak resident {}]",
        s.prompt_tokens,
        rate(s.prompt_tokens, s.prefill_seconds),
        s.generated_tokens,
        rate(decode_tokens, s.decode_seconds),
        peak_rss_bytes().map(human_bytes).unwrap_or_else(|| "?".into())
    );
    if let Some(spec) = &s.speculation {
        eprintln!("{}", speculation_summary(spec, &l.model));
    }
    if has_moe(l) {
        eprintln!(
            "{}",
            before.report_since(
                &l.model,
                s.prompt_tokens + s.generated_tokens,
                s.prefill_seconds + s.decode_seconds
            )
        );
    }
}

/// One line of speculation counters: acceptance, tokens and experts per verification pass.
pub fn speculation_summary(
    s: &SpeculationStats,
    model: &moestream_engine::models::Model,
) -> String {
    let pct = |x: Option<f64>| x.map_or("-".into(), |v| format!("{:.0}%", v * 100.0));
    let num = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.2}"));
    let mut parts = vec![
        format!(
            "{} passes verified {} proposed tokens, {} accepted",
            s.verify_passes,
            s.proposed,
            pct(s.acceptance_rate())
        ),
        format!("{} tokens/pass", num(s.tokens_per_pass())),
        format!("{} plain steps", s.plain_steps),
    ];
    let sparse = model
        .layers
        .iter()
        .filter(|x| matches!(x.mlp, FeedForward::Sparse(_)))
        .count();
    if sparse > 0 && s.verify_passes > 0 {
        parts.push(format!(
            "{} experts/pass for {:.2} tokens (one token: {})",
            num(s.experts_per_pass()),
            s.verify_tokens as f64 / s.verify_passes as f64,
            sparse * model.top_k()
        ));
    }
    parts.push(format!(
        "draft {:.2} s, target {:.2} s",
        s.draft_seconds, s.target_seconds
    ));
    format!("[speculation: {}]", parts.join(" | "))
}

fn has_moe(l: &Loaded) -> bool {
    l.model
        .layers
        .iter()
        .any(|x| matches!(x.mlp, FeedForward::Sparse(_)))
}

pub fn run(a: RunArgs) -> Result<()> {
    let dir = match &a.model {
        Some(d) => d.clone(),
        None => demo_model_dir()?,
    };
    let draft = a.speculation.load_draft()?;
    let l = Loaded::open(&dir, &a.engine)?;
    let mut sampling = a.sampling.params(&l);
    if a.json && a.sampling.temperature.is_none() {
        sampling.temperature = 0.0;
    }
    let eos = if a.ignore_eos { vec![] } else { l.eos_ids() };
    let mut extra = serde_json::Map::new();
    if let Some(t) = a.enable_thinking {
        extra.insert("enable_thinking".into(), json!(t));
    }
    let ctx = l.model.config.max_position_embeddings;
    let proposer = a.speculation.proposer(draft, &l)?;
    let speculation = |proposer: &Option<Proposer>| a.speculation.speculation(proposer, &sampling);
    let one_shot = |prompt: Vec<u32>| -> Result<()> {
        let req = GenerationRequest {
            prompt: prompt.clone(),
            max_tokens: a.max_tokens,
            sampling: sampling.clone(),
            eos_token_ids: eos.clone(),
            stop_strings: a.stop.clone(),
        };
        let mut cache = l.model.new_cache(prompt.len() + a.max_tokens);
        let before = Traffic::now(&l.model);
        let mut text = String::new();
        let mut out = std::io::stdout().lock();
        let mut spec = speculation(&proposer);
        let stats = generate_with(
            &l.model,
            l.tokenizer.as_ref(),
            &mut cache,
            &req,
            spec.as_mut(),
            |piece| {
                if a.json {
                    text.push_str(piece);
                } else {
                    let _ = write!(out, "{piece}");
                    let _ = out.flush();
                }
                true
            },
        )
        .map_err(anyhow::Error::msg)?;
        if a.json {
            let mut v = json!({"prompt_tokens": prompt, "generated_tokens": stats.tokens, "text": text,
                "finish_reason": format!("{:?}", stats.finish_reason).to_lowercase(),
                "prefill_seconds": stats.prefill_seconds, "decode_seconds": stats.decode_seconds});
            if let Some(s) = &stats.speculation {
                v["speculation"] = json!({"verify_passes": s.verify_passes, "proposed": s.proposed,
                    "accepted": s.accepted, "plain_steps": s.plain_steps,
                    "verify_experts": s.verify_experts, "verify_tokens": s.verify_tokens});
            }
            writeln!(out, "{v}")?;
        } else {
            writeln!(out)?;
        }
        drop(out);
        print_stats(&stats, &l, &before);
        Ok(())
    };
    if let Some(ids) = &a.prompt_tokens {
        return one_shot(parse_ids(ids)?);
    }
    if let Some(p) = &a.prompt {
        let tok = l.tokenizer()?;
        let text = match (&l.template, a.raw) {
            (Some(t), false) => {
                let mut msgs = vec![];
                if let Some(s) = &a.system {
                    msgs.push(json!({"role": "system", "content": s}));
                }
                msgs.push(json!({"role": "user", "content": p}));
                t.render(&Value::Array(msgs), true, &extra)?
            }
            _ => p.clone(),
        };
        let add_special = l.template.is_none() || a.raw;
        let ids = tok.encode(&text, add_special)?;
        if ids.len() + 1 > ctx {
            bail!(
                "the prompt has {} tokens; the model's context is {ctx} tokens",
                ids.len()
            );
        }
        return one_shot(ids);
    }
    chat(&l, &a, sampling.clone(), eos, extra, &proposer)
}

/// Interactive chat: the whole conversation is re-rendered each turn; the KV cache is kept for
/// the longest common token prefix, so only the new turn is computed.
fn chat(
    l: &Loaded,
    a: &RunArgs,
    sampling: SamplingParams,
    eos: Vec<u32>,
    extra: serde_json::Map<String, Value>,
    proposer: &Option<Proposer>,
) -> Result<()> {
    let tok = l.tokenizer()?;
    let template = l.template.as_ref().with_context(|| {
        format!(
            "{}: no chat template; use --prompt with --raw",
            l.dir.display()
        )
    })?;
    let mut messages: Vec<Value> = vec![];
    if let Some(s) = &a.system {
        messages.push(json!({"role": "system", "content": s}));
    }
    let ctx = l.model.config.max_position_embeddings;
    let mut cache = l.model.new_cache(1024);
    let mut cached: Vec<u32> = vec![];
    eprintln!(
        "chat with {} (empty line or Ctrl-D to quit)",
        l.dir.display()
    );
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            return Ok(());
        }
        messages.push(json!({"role": "user", "content": line.trim_end()}));
        let text = template.render(&Value::Array(messages.clone()), true, &extra)?;
        let ids = tok.encode(&text, false)?;
        if ids.len() + 1 > ctx {
            bail!(
                "the conversation has {} tokens; the model's context is {ctx} tokens",
                ids.len()
            );
        }
        let mut common = cached
            .iter()
            .zip(&ids)
            .take_while(|(x, y)| x == y)
            .count()
            .min(ids.len() - 1);
        if !cache.truncate(common) {
            // A recurrent (hybrid) state cannot be cut back: run the conversation from the start.
            let _ = cache.truncate(0);
            common = 0;
        }
        let req = GenerationRequest {
            prompt: ids[common..].to_vec(),
            max_tokens: a.max_tokens,
            sampling: sampling.clone(),
            eos_token_ids: eos.clone(),
            stop_strings: a.stop.clone(),
        };
        let mut reply = String::new();
        let before = Traffic::now(&l.model);
        let mut out = std::io::stdout().lock();
        let mut spec = a.speculation.speculation(proposer, &sampling);
        let stats = generate_with(
            &l.model,
            Some(tok),
            &mut cache,
            &req,
            spec.as_mut(),
            |piece| {
                reply.push_str(piece);
                let _ = write!(out, "{piece}");
                let _ = out.flush();
                true
            },
        )
        .map_err(anyhow::Error::msg)?;
        writeln!(out)?;
        drop(out);
        print_stats(&stats, l, &before);
        cached = ids;
        cached.extend(&stats.tokens);
        // A hybrid state that cannot be cut is reset at the next turn (see above).
        let _ = cache.truncate(cached.len());
        messages.push(json!({"role": "assistant", "content": reply}));
    }
}

#[derive(Args)]
pub struct ScoreArgs {
    /// Model folder.
    #[arg(long)]
    model: PathBuf,
    /// Token ids, "ID ID ...".
    #[arg(long, conflicts_with = "text")]
    tokens: Option<String>,
    /// Text to tokenize (with the tokenizer's special tokens, e.g. BOS).
    #[arg(long)]
    text: Option<String>,
    /// Tokens per forward pass (as llama.cpp's --ubatch-size). 1 runs every token as a decode
    /// step against the cache, which checks the decode path against the prefill one.
    #[arg(long, default_value_t = SCORE_CHUNK, value_name = "N")]
    ubatch: usize,
    #[command(flatten)]
    engine: EngineArgs,
}

/// Chunk of tokens run per forward call when scoring: bounds the logits buffer.
const SCORE_CHUNK: usize = 256;

/// ln p(tokens[i+1] | tokens[..=i]) for every i, computed from an empty cache `ubatch` tokens
/// per forward pass.
fn logprobs(l: &Loaded, tokens: &[u32], ubatch: usize) -> Result<Vec<f64>> {
    logprobs_visiting(l, tokens, ubatch, usize::MAX, |_, _| Ok(()))
}

pub fn score(mut a: ScoreArgs) -> Result<()> {
    // A measurement: exact activations unless asked otherwise.
    a.engine
        .decode_activations
        .get_or_insert(ActivationPrecision::F32);
    let l = Loaded::open(&a.model, &a.engine)?;
    let tokens = match (&a.tokens, &a.text) {
        (Some(t), _) => parse_ids(t)?,
        (None, Some(text)) => l.tokenizer()?.encode(text, true)?,
        (None, None) => bail!("give --tokens or --text"),
    };
    if tokens.is_empty() {
        bail!("no tokens to score");
    }
    l.model.check_tokens(&tokens).map_err(anyhow::Error::msg)?;
    let ctx = l.model.config.max_position_embeddings;
    if tokens.len() > ctx {
        bail!(
            "{} tokens exceed the model's context of {ctx}",
            tokens.len()
        );
    }
    if a.ubatch == 0 {
        bail!("--ubatch must be at least 1");
    }
    let lp = logprobs(&l, &tokens, a.ubatch)?;
    println!("{}", json!({"tokens": tokens, "logprobs": lp}));
    Ok(())
}

#[derive(Args)]
pub struct PerplexityArgs {
    /// Model folder.
    #[arg(long)]
    model: PathBuf,
    /// Text file.
    #[arg(long)]
    file: PathBuf,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Evaluate at most this many chunks.
    #[arg(long)]
    chunks: Option<usize>,
    /// Write the model's next-token distribution at every scored position to FILE (the base
    /// for --kl-divergence); with --kl-divergence, read it instead.
    #[arg(long, value_name = "FILE")]
    kl_divergence_base: Option<PathBuf>,
    /// Compare with the distributions in --kl-divergence-base FILE (same text and --ctx): KL
    /// divergence, same top token, Δp of the correct token, both perplexities.
    #[arg(long, requires = "kl_divergence_base")]
    kl_divergence: bool,
    #[command(flatten)]
    engine: EngineArgs,
}

/// [`logprobs`], also handing `visit` the logits rows at positions `from..` after each forward
/// pass, with the tokens that follow them (the KL-divergence modes).
fn logprobs_visiting(
    l: &Loaded,
    tokens: &[u32],
    ubatch: usize,
    from: usize,
    mut visit: impl FnMut(&[&[f32]], &[u32]) -> Result<()>,
) -> Result<Vec<f64>> {
    let v = l.model.config.vocab_size;
    let mut cache = l.model.new_cache(tokens.len());
    let mut out = Vec::with_capacity(tokens.len().saturating_sub(1));
    for (c, chunk) in tokens.chunks(ubatch).enumerate() {
        let logits = l.model.forward(chunk, &mut cache, Logits::All)?;
        let (mut rows, mut next) = (vec![], vec![]);
        for (j, row) in logits.chunks_exact(v).enumerate() {
            let i = c * ubatch + j;
            if i + 1 < tokens.len() {
                out.push(log_softmax_at(row, tokens[i + 1] as usize));
                if i >= from {
                    rows.push(row);
                    next.push(tokens[i + 1]);
                }
            }
        }
        if !rows.is_empty() {
            visit(&rows, &next)?;
        }
    }
    Ok(out)
}

/// llama-perplexity's method: split the tokenized file into chunks of `ctx` tokens (the first of
/// each replaced by BOS when the tokenizer adds one), run each chunk from an empty cache, and score
/// only the second half of each chunk, so every scored token has at least ctx/2 tokens of context.
pub fn perplexity(mut a: PerplexityArgs) -> Result<()> {
    a.engine
        .decode_activations
        .get_or_insert(ActivationPrecision::F32);
    let l = Loaded::open(&a.model, &a.engine)?;
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let tok = l.tokenizer()?;
    let tokens = tok.encode(&text, false)?;
    if a.ctx < 4 {
        bail!("--ctx must be at least 4");
    }
    if a.ctx > l.model.config.max_position_embeddings {
        bail!(
            "--ctx {} exceeds the model's context of {}",
            a.ctx,
            l.model.config.max_position_embeddings
        );
    }
    let mut n_chunks = tokens.len() / a.ctx;
    // --kl-divergence: the base file holds the chunks to evaluate (at most --chunks of them).
    let base = match (&a.kl_divergence_base, a.kl_divergence) {
        (Some(f), true) => Some(kl::BaseReader::open(f)?),
        _ => None,
    };
    if let Some(b) = &base {
        b.check(l.model.config.vocab_size, a.ctx, a.ctx / 2)?;
        if n_chunks < b.header.chunks && a.chunks.unwrap_or(usize::MAX) > n_chunks {
            bail!(
                "{}: {} tokens make {n_chunks} chunks of --ctx {}; the base file {} holds {} \
                 (not the text it was computed from?)",
                a.file.display(),
                tokens.len(),
                a.ctx,
                b.path().display(),
                b.header.chunks
            );
        }
        n_chunks = n_chunks.min(b.header.chunks);
    }
    if let Some(c) = a.chunks {
        n_chunks = n_chunks.min(c);
    }
    if n_chunks == 0 {
        bail!(
            "{}: {} tokens; at least {} are needed for one chunk of --ctx {}",
            a.file.display(),
            tokens.len(),
            a.ctx,
            a.ctx
        );
    }
    let bos = if tok.add_bos_token().unwrap_or(false) {
        tok.bos_token_id()
    } else {
        None
    };
    let first = a.ctx / 2;
    // The evaluated tokens, chunk after chunk, the first of each replaced by BOS.
    let mut eval = tokens[..n_chunks * a.ctx].to_vec();
    if let Some(b) = bos {
        eval.iter_mut().step_by(a.ctx).for_each(|t| *t = b);
    }
    let vocab = l.model.config.vocab_size;
    let mut kl = match (base, &a.kl_divergence_base) {
        (Some(b), _) => {
            b.check_tokens(&eval)?;
            Some(kl::KlMode::Compare(b, kl::KlStats::default()))
        }
        (None, Some(f)) => {
            l.model.check_tokens(&eval).map_err(anyhow::Error::msg)?;
            let header = kl::BaseHeader {
                vocab,
                ctx: a.ctx,
                chunks: n_chunks,
                first,
                model: l.dir.display().to_string(),
                tokens: eval.clone(),
            };
            Some(kl::KlMode::Write(kl::BaseWriter::create(f, header)?))
        }
        (None, None) => None,
    };
    let (mut nll, mut nll2, mut count) = (0f64, 0f64, 0usize);
    let t0 = std::time::Instant::now();
    eprintln!(
        "perplexity: {} tokens, {n_chunks} chunks of {}",
        tokens.len(),
        a.ctx
    );
    for c in 0..n_chunks {
        let chunk = &eval[c * a.ctx..(c + 1) * a.ctx];
        let lp = logprobs_visiting(&l, chunk, SCORE_CHUNK, first - 1, |rows, next| {
            match kl.as_mut() {
                Some(k) => k.visit(rows, next),
                None => Ok(()),
            }
        })?;
        for &x in &lp[first - 1..] {
            nll -= x;
            nll2 += x * x;
            count += 1;
        }
        print!("[{}]{:.4},", c + 1, (nll / count as f64).exp());
        std::io::stdout().flush()?;
    }
    let mean = nll / count as f64;
    let var = (nll2 / count as f64 - mean * mean).max(0.0);
    let ppl = mean.exp();
    let err = ppl * (var / (count as f64 - 1.0).max(1.0)).sqrt();
    println!("\nFinal estimate: PPL = {ppl:.4} +/- {err:.5}");
    eprintln!(
        "[{count} tokens scored in {:.1} s]",
        t0.elapsed().as_secs_f64()
    );
    if let Some(k) = kl {
        k.finish()?;
    }
    Ok(())
}

#[derive(Args)]
pub struct InspectArgs {
    /// Model folder.
    #[arg(long)]
    model: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// A GGUF file's quantization recipe, from `general.file_type` (the tensor types themselves are
/// listed by format below it).
fn gguf_quantization(index: &moestream_formats::gguf::GgufIndex) -> String {
    let file_type = index
        .get_metadata("general.file_type")
        .and_then(|v| v.as_u64());
    match file_type {
        Some(t) => match moestream_formats::gguf::file_type_name(t) {
            Some(name) => format!("GGUF {name} (general.file_type {t})"),
            None => format!("GGUF, general.file_type {t} (not one llama.cpp names)"),
        },
        None => "GGUF, no general.file_type".into(),
    }
}

pub fn inspect(a: InspectArgs) -> Result<()> {
    // Inspect describes the checkpoint as mapped; it never streams.
    let mut engine = EngineArgs::default();
    engine.stream.stream_experts = moestream_engine::store::StreamMode::Off;
    let l = Loaded::open(&a.model, &engine)?;
    let m = &l.model;
    let c = &m.config;
    let (mut expert_bytes, mut expert_params) = (0u64, 0u64);
    let (mut dense_bytes, mut dense_params) = (0u64, 0u64);
    let mut formats = std::collections::BTreeMap::<String, u64>::new();
    let mut add_linear = |lin: &moestream_engine::weights::Linear, expert: bool| {
        let (b, p) = (lin.size_bytes() as u64, (lin.rows * lin.cols) as u64);
        *formats.entry(lin.format_name()).or_default() += b;
        if expert {
            expert_bytes += b;
            expert_params += p;
        } else {
            dense_bytes += b;
            dense_params += p;
        }
    };
    let mut active_expert_bytes = 0u64;
    add_linear(&m.embed_tokens, false);
    let tied = std::ptr::eq(&m.embed_tokens, &m.lm_head) || c.tie_word_embeddings;
    if !tied {
        add_linear(&m.lm_head, false);
    }
    let mut norm_params = c.hidden_size as u64;
    for (li, layer) in m.layers.iter().enumerate() {
        for lin in layer.mixer.linears() {
            add_linear(lin, false);
        }
        norm_params += 2 * c.hidden_size as u64 + layer.mixer.vector_params() as u64;
        match &layer.mlp {
            FeedForward::Dense(mlp) => {
                for lin in [&mlp.gate_proj, &mlp.up_proj, &mlp.down_proj] {
                    add_linear(lin, false);
                }
            }
            FeedForward::Sparse(moe) => {
                add_linear(&moe.router, false);
                if let Some(s) = &moe.shared {
                    for lin in [&s.mlp.gate_proj, &s.mlp.up_proj, &s.mlp.down_proj, &s.gate] {
                        add_linear(lin, false);
                    }
                }
                let experts = m.experts.resident_experts(li).unwrap_or(&[]);
                for e in experts {
                    for lin in [&e.gate_proj, &e.up_proj, &e.down_proj] {
                        add_linear(lin, true);
                    }
                }
                if let Some(e) = experts.first() {
                    active_expert_bytes += (e.size_bytes() * moe.rule.top_k) as u64;
                }
            }
        }
    }
    let gguf = if moestream_engine::gguf::is_gguf_path(&l.dir) {
        Some(moestream_formats::gguf::GgufIndex::open(&l.dir)?)
    } else {
        None
    };
    let files: u64 = match &gguf {
        Some(index) => index.total_bytes(),
        None => moestream_formats::SafetensorsIndex::open(&l.dir)?
            .files()
            .iter()
            .map(|f| f.bytes().len() as u64)
            .sum(),
    };
    let moe_layers = (0..c.num_hidden_layers)
        .filter(|&i| c.is_moe_layer(i))
        .count();
    let linear_layers = c
        .layer_types
        .iter()
        .filter(|&&t| t == moestream_engine::config::LayerKind::LinearAttention)
        .count();
    let quant = match &c.quantization {
        Some(q) => format!(
            "MLX affine {}-bit, group size {} ({} per-module overrides)",
            q.default.bits,
            q.default.group_size,
            q.overrides.len()
        ),
        None => match &gguf {
            Some(index) => gguf_quantization(index),
            None => "none (float)".into(),
        },
    };
    let v = json!({
        "model": l.dir, "architecture": c.arch.model_type(), "layers": c.num_hidden_layers, "moe_layers": moe_layers,
        "hidden_size": c.hidden_size, "attention_heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
        "head_dim": c.head_dim, "vocab_size": c.vocab_size, "experts": c.num_experts, "experts_per_token": c.num_experts_per_tok,
        "expert_intermediate_size": c.moe_intermediate_size, "tied_embeddings": c.tie_word_embeddings,
        "parameters": expert_params + dense_params + norm_params, "expert_parameters": expert_params,
        "quantization": quant, "bytes_by_format": formats, "expert_bytes": expert_bytes, "non_expert_bytes": dense_bytes,
        "active_expert_bytes_per_token": active_expert_bytes, "file_bytes": files,
        "tokenizer": l.tokenizer.is_some(), "chat_template": l.template.is_some(), "eos_token_ids": l.eos_ids(),
        "linear_attention_layers": linear_layers, "linear_attention": c.linear.map(|g| json!({
            "key_heads": g.num_key_heads, "value_heads": g.num_value_heads, "key_head_dim": g.key_head_dim,
            "value_head_dim": g.value_head_dim, "conv_kernel": g.conv_kernel})),
        "rotary_dim": c.rotary_dim, "shared_expert_intermediate_size": c.shared_expert_intermediate_size,
        "mtp": m.mtp.as_ref().map(|h| json!({
            "layers": h.layers.len(), "experts_per_layer": h.experts.experts_in(0), "bytes": h.size_bytes(),
            "tensors": h.tensors})),
    });
    if a.json {
        println!("{v}");
        return Ok(());
    }
    println!("model           {}", l.dir.display());
    println!(
        "architecture    {} ({} layers, {} MoE)",
        c.arch.model_type(),
        c.num_hidden_layers,
        moe_layers
    );
    println!(
        "geometry        hidden {}, heads {}/{} x {}, vocab {}",
        c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size
    );
    if let Some(g) = &c.linear {
        println!(
            "linear attn     {linear_layers} Gated DeltaNet layers: {}/{} q-k/v heads x {}/{}, conv {}; rotary {} of {} dims",
            g.num_key_heads, g.num_value_heads, g.key_head_dim, g.value_head_dim, g.conv_kernel,
            c.rotary_dim, c.head_dim
        );
    }
    if c.num_experts > 0 {
        println!(
            "experts         {} per layer, {} active, width {}",
            c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size
        );
        if c.shared_expert_intermediate_size > 0 {
            println!(
                "shared expert   width {}",
                c.shared_expert_intermediate_size
            );
        }
    }
    if let Some(h) = &m.mtp {
        let ffn = match h.experts.experts_in(0) {
            0 => "dense MLP".to_string(),
            e => format!("{e} experts"),
        };
        println!(
            "mtp             multi-token prediction head: {} full-attention layer(s) with {ffn}, {:.1} MiB in {} tensors (loaded, not used by the trunk)",
            h.layers.len(),
            h.size_bytes() as f64 / (1u64 << 20) as f64,
            h.tensors.len()
        );
    }
    println!(
        "parameters      {:.3} B ({:.3} B in experts)",
        (expert_params + dense_params + norm_params) as f64 / 1e9,
        expert_params as f64 / 1e9
    );
    println!("quantization    {quant}");
    for (f, b) in &formats {
        println!("  {f:<12}  {}", human_bytes(*b));
    }
    println!(
        "expert bytes    {} ({} active per token)",
        human_bytes(expert_bytes),
        human_bytes(active_expert_bytes)
    );
    println!("non-expert      {}", human_bytes(dense_bytes));
    println!("files           {}", human_bytes(files));
    println!(
        "tokenizer       {}, chat template {}",
        if l.tokenizer.is_some() { "yes" } else { "no" },
        if l.template.is_some() { "yes" } else { "no" }
    );
    Ok(())
}

#[derive(Args)]
pub struct SynthArgs {
    /// Architecture: qwen3_moe, qwen3, mixtral.
    #[arg(long)]
    arch: String,
    /// Geometry preset (tiny, qwen3-30b-a3b, qwen3-235b-a22b, qwen3-0.6b, mixtral-8x7b).
    #[arg(long, default_value = "tiny")]
    preset: String,
    /// File layout and precision.
    #[arg(long, value_enum, default_value = "hf-bf16")]
    format: SynthFormat,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep only the first N decoder layers. With the same seed, the model holds exactly the
    /// full model's embedding, first layers and output head: a draft for speculative decoding.
    #[arg(long, value_name = "N")]
    layers: Option<usize>,
    /// Multiply the weights of the projections that add to the residual stream (o_proj, down
    /// projections) by S. Well below 1 (e.g. 0.02) the next token is almost a function of the
    /// current one, so a `--layers 1` model of the same seed and scale drafts the full model's
    /// greedy tokens: a high-acceptance pair with realistic expert choices, for speculation
    /// benchmarks.
    #[arg(long, value_name = "S", default_value_t = 1.0)]
    residual_scale: f32,
    /// Output folder.
    out: PathBuf,
}

pub fn synth(a: SynthArgs) -> Result<()> {
    if a.out.join("config.json").exists() {
        bail!(
            "{}: already holds a model; choose an empty folder",
            a.out.display()
        );
    }
    let t0 = std::time::Instant::now();
    let bytes = synth::synth_layers(
        &a.arch,
        &a.preset,
        a.format,
        a.seed,
        a.layers,
        a.residual_scale,
        &a.out,
        true,
    )?;
    eprintln!(
        "wrote {} of weights to {} in {:.1} s (random weights: output is noise)",
        human_bytes(bytes),
        display(&a.out),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
