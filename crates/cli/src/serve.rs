//! `moestream serve`: loads a model as `run` does (same engine and sampling options) and hands it
//! to the OpenAI-compatible server of `moestream-server`.
use crate::commands::SamplingArgs;
use crate::loaded::{EngineArgs, Loaded, SpeculationArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use moestream_engine::models::blocks::FeedForward;
use moestream_engine::models::Model;
use moestream_server::{Engine, LoadError, ServerOptions, WeightBytes};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args)]
pub struct ServeArgs {
    /// Model folder or Hugging Face repository id.
    #[arg(long)]
    model: PathBuf,
    /// Address to listen on (loopback unless told otherwise).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free port; the one chosen is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health. Also MOESTREAM_API_KEY.
    #[arg(long, env = "MOESTREAM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Sequences generated at once (interleaved token by token).
    #[arg(long, default_value_t = 4, value_name = "N")]
    max_concurrent: usize,
    /// Requests that may wait for a free sequence; more are answered 503.
    #[arg(long, default_value_t = 64, value_name = "N")]
    max_queue: usize,
    /// Most tokens per sequence, prompt and completion together (default: the model's context).
    #[arg(long, value_name = "N")]
    ctx_size: Option<usize>,
    /// Model name clients use (default: the model folder's name).
    #[arg(long, value_name = "NAME")]
    served_model_name: Option<String>,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 4 << 20, value_name = "BYTES")]
    max_body_bytes: usize,
    /// Seconds in-flight requests may run after SIGINT/SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    shutdown_grace: f64,
    /// Testing only: a JSON array of strings; each request in turn gets the next one as its
    /// generated text (tokenized and fed through the model) instead of sampled tokens.
    #[arg(long, hide = true, value_name = "FILE")]
    scripted_replies: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    speculation: SpeculationArgs,
}

pub fn serve(a: ServeArgs) -> Result<()> {
    if a.max_concurrent == 0 || a.max_queue == 0 {
        bail!("--max-concurrent and --max-queue must be at least 1");
    }
    if !(a.shutdown_grace >= 0.0 && a.shutdown_grace.is_finite()) {
        bail!("--shutdown-grace must be a number of seconds");
    }
    let name = a.served_model_name.clone().unwrap_or_else(|| {
        let s = a.model.to_string_lossy();
        let s = s.trim_end_matches('/');
        match s.rsplit_once('/') {
            // A Hugging Face id (org/name) keeps its org; a folder path keeps its last part.
            Some((org, last)) if !a.model.exists() && !org.contains('/') => format!("{org}/{last}"),
            Some((_, last)) => last.to_owned(),
            None => s.to_owned(),
        }
    });
    let options = ServerOptions {
        host: a.host.clone(),
        port: a.port,
        api_key: a.api_key.clone().filter(|k| !k.is_empty()),
        served_model_name: name,
        max_concurrent: a.max_concurrent,
        max_queue: a.max_queue,
        max_body_bytes: a.max_body_bytes,
        shutdown_grace: Duration::from_secs_f64(a.shutdown_grace),
    };
    if options.host != "127.0.0.1" && options.host != "localhost" && options.api_key.is_none() {
        eprintln!("warning: listening on {} without --api-key", options.host);
    }
    moestream_server::serve(options, move || {
        load(&a).map_err(|e| LoadError::from(format!("{e:#}")))
    })?;
    Ok(())
}

fn load(a: &ServeArgs) -> Result<Engine> {
    let draft = a.speculation.load_draft()?;
    let l = Loaded::open(&a.model, &a.engine)?;
    let tokenizer = l.tokenizer.clone().with_context(|| {
        format!(
            "{}: no tokenizer.json; the server needs one",
            l.dir.display()
        )
    })?;
    let model_ctx = l.model.config.max_position_embeddings;
    let ctx_size = match a.ctx_size {
        None => model_ctx,
        Some(n) if n >= 2 && n <= model_ctx => n,
        Some(n) => {
            bail!("--ctx-size {n}: must be between 2 and the model's context of {model_ctx}")
        }
    };
    let scripted_replies = match &a.scripted_replies {
        None => vec![],
        Some(f) => {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            let replies: Vec<String> = serde_json::from_str(&text)
                .with_context(|| format!("{}: expected a JSON array of strings", f.display()))?;
            replies
                .iter()
                .map(|r| tokenizer.encode(r, false).map_err(anyhow::Error::from))
                .collect::<Result<_>>()?
        }
    };
    let defaults = a.sampling.params(&l);
    let eos_token_ids = l.eos_ids();
    let weight_bytes = weight_bytes(&l.model);
    let speculation =
        a.speculation
            .proposer(draft, &l)?
            .map(|proposer| moestream_server::SpeculationConfig {
                proposer,
                max_draft: a.speculation.num_draft_tokens,
                fixed: a.speculation.fixed_draft_length,
            });
    Ok(Engine {
        model: l.model,
        tokenizer,
        template: l.template,
        eos_token_ids,
        ctx_size,
        defaults,
        weight_bytes,
        scripted_replies,
        speculation,
    })
}

/// Bytes of the model's weights, and of its experts (as stored, resident or streamed).
fn weight_bytes(m: &Model) -> WeightBytes {
    let mut total = m.embed_tokens.size_bytes() as u64;
    if !std::ptr::eq(&m.embed_tokens, &m.lm_head) && !m.config.tie_word_embeddings {
        total += m.lm_head.size_bytes() as u64;
    }
    let mut experts = 0u64;
    for (i, layer) in m.layers.iter().enumerate() {
        total += layer
            .mixer
            .linears()
            .iter()
            .map(|l| l.size_bytes() as u64)
            .sum::<u64>();
        match &layer.mlp {
            FeedForward::Dense(mlp) => {
                total += [&mlp.gate_proj, &mlp.up_proj, &mlp.down_proj]
                    .iter()
                    .map(|l| l.size_bytes() as u64)
                    .sum::<u64>();
            }
            FeedForward::Sparse(moe) => {
                total += moe.router.size_bytes() as u64;
                if let Some(s) = &moe.shared {
                    total += [&s.mlp.gate_proj, &s.mlp.up_proj, &s.mlp.down_proj, &s.gate]
                        .iter()
                        .map(|l| l.size_bytes() as u64)
                        .sum::<u64>();
                }
                experts += (m.experts.expert_bytes(i) * m.experts.experts_in(i)) as u64;
            }
        }
    }
    WeightBytes {
        total: total + experts,
        experts,
    }
}
