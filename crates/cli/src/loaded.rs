//! A model folder loaded for the commands: weights, tokenizer, chat template, generation
//! defaults, and the engine options every model-running command shares (expert streaming, the
//! active-expert override).
use anyhow::{Context, Result};
use clap::Args;
use moestream_engine::config::GenerationConfig;
use moestream_engine::models::Model;
use moestream_engine::speculative::{check_vocabularies, Proposer, Speculation};
use moestream_engine::store::io::IoBackend;
use moestream_engine::store::{
    self, CacheSize, DirectIo, Eviction, Prefetch, ReadMode, StoreOptions, StoreStats, StreamMode,
};
use moestream_engine::text::{ChatTemplate, Tokenizer};
use moestream_kernels::features::ActivationPrecision;
use std::path::{Path, PathBuf};

/// How the engine runs a model: shared by `run`, `score` and `perplexity`.
#[derive(Args, Clone, Debug, Default)]
pub struct EngineArgs {
    /// Experts each token uses (1 to the model's own): fewer is faster and less exact. Also
    /// MOESTREAM_TOP_K.
    #[arg(long = "top-k", env = "MOESTREAM_TOP_K", value_name = "N")]
    pub top_k: Option<usize>,
    /// Activations of products with quantized weights: int8 (llama.cpp block formats, GGUF:
    /// every token rounded to int8 per 32 columns, in decode steps and prompts, as llama.cpp
    /// does; other weights as int16), int16 (decode steps only, rounded per group; ~1.2-1.4x
    /// faster than f32; log-probabilities within ~1e-2 of f32, greedy tokens the same in every
    /// test) or f32 (exact up to summation order). Default: int8 to generate (run, bench,
    /// serve), f32 to measure (score, perplexity). MOESTREAM_EXACT_MATMUL=1 forces f32.
    #[arg(long, value_name = "int8|int16|f32")]
    pub decode_activations: Option<ActivationPrecision>,
    #[command(flatten)]
    pub device: crate::device::DeviceArgs,
    #[command(flatten)]
    pub stream: StreamArgs,
}

/// Speculative decoding (`run`, `bench`, `serve`).
#[derive(Args, Clone, Debug, Default)]
pub struct SpeculationArgs {
    /// A small model with the same tokenizer that proposes tokens for this one to verify
    /// (speculative decoding; lossless). Loaded in memory, never streamed.
    #[arg(long, value_name = "DIR")]
    pub draft_model: Option<PathBuf>,
    /// Propose tokens by prompt lookup (the continuation of the latest earlier occurrence of
    /// the last few tokens): free, pays on repetitive text.
    #[arg(long, conflicts_with = "draft_model")]
    pub prompt_lookup: bool,
    /// Draft with the model's own multi-token-prediction head (Qwen3-Next and Qwen3.5
    /// checkpoints from the Hub ship one; MLX conversions drop it): one extra decoder layer a
    /// draft token, no second model. CPU only for now.
    #[arg(long, conflicts_with_all = ["draft_model", "prompt_lookup"])]
    pub mtp: bool,
    /// Most tokens proposed per round; the number used adapts to the measured acceptance and
    /// costs (0 turns speculation off).
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub num_draft_tokens: usize,
    /// Always propose --num-draft-tokens tokens, whatever the measured acceptance and costs
    /// (for tests and measurements).
    #[arg(long)]
    pub fixed_draft_length: bool,
}

impl SpeculationArgs {
    /// Speculation state for one sequence, if these options ask for it.
    pub fn speculation(
        &self,
        proposer: &Option<Proposer>,
        sampling: &moestream_engine::generate::SamplingParams,
    ) -> Option<Speculation> {
        proposer
            .clone()
            .map(|p| Speculation::new(p, self.num_draft_tokens, self.fixed_draft_length, sampling))
    }

    /// Loads the draft model, if any, into process memory. Called before the target is
    /// loaded, so that the target's automatic expert cache leaves the draft its memory.
    pub fn load_draft(&self) -> Result<Option<Draft>> {
        if self.num_draft_tokens > 16 {
            anyhow::bail!("--num-draft-tokens must be at most 16");
        }
        let Some(dir) = self
            .draft_model
            .as_ref()
            .filter(|_| self.num_draft_tokens > 0)
        else {
            return Ok(None);
        };
        let dir = crate::hub::resolve_model(dir)?;
        let options = StoreOptions {
            stream: StreamMode::Off,
            ..StoreOptions::default()
        };
        let model = Model::load_with(&dir, &options)
            .with_context(|| format!("loading the draft model {}", dir.display()))?
            .into_memory();
        let tokenizer = if moestream_engine::gguf::is_gguf_path(&dir) && dir.is_file() {
            // A GGUF draft's vocabulary: a tokenizer.json beside it, else its own metadata.
            gguf_text(&dir)?.0
        } else if dir.join("tokenizer.json").is_file() {
            Some(Tokenizer::from_dir(&dir)?)
        } else {
            None
        };
        Ok(Some(Draft {
            dir,
            model,
            tokenizer,
        }))
    }

    /// The proposer these options ask for, the draft checked against `target` (`None`: no
    /// speculation).
    pub fn proposer(&self, draft: Option<Draft>, target: &Loaded) -> Result<Option<Proposer>> {
        if self.num_draft_tokens == 0 {
            return Ok(None);
        }
        if self.prompt_lookup {
            return Ok(Some(Proposer::PromptLookup));
        }
        if self.mtp {
            let model = &target.model;
            if model.mtp.is_none() {
                anyhow::bail!(
                    "--mtp: {} has no MTP head (mtp.* tensors; mlx-lm drops them on conversion)",
                    target.dir.display()
                );
            }
            if model.accelerator().is_some() {
                anyhow::bail!("--mtp runs on the CPU only for now: add --device cpu");
            }
            model.set_keep_hidden(true);
            return Ok(Some(Proposer::Mtp));
        }
        let Some(draft) = draft else {
            return Ok(None);
        };
        check_vocabularies(
            target.tokenizer.as_ref(),
            target.model.config.vocab_size,
            draft.tokenizer.as_ref(),
            draft.model.config.vocab_size,
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "the draft model {} cannot draft for {}: {e}",
                draft.dir.display(),
                target.dir.display()
            )
        })?;
        Ok(Some(Proposer::Draft(std::sync::Arc::new(draft.model))))
    }
}

/// A draft model loaded for speculative decoding.
pub struct Draft {
    dir: PathBuf,
    model: Model,
    tokenizer: Option<Tokenizer>,
}

/// Where expert weights come from (`bench` takes these without `--top-k`, which it sweeps).
#[derive(Args, Clone, Debug)]
pub struct StreamArgs {
    /// Stream expert weights from disk instead of mapping them: auto (when the model does not
    /// fit in available memory), on, off.
    #[arg(long, default_value = "auto", value_name = "auto|on|off")]
    pub stream_experts: StreamMode,
    /// How streamed experts reach the kernels: copy (io_uring or pread into the engine's own
    /// buffers) or map (reader threads fault the expert's pages of the file mapping in, and the
    /// kernels use the page cache in place; no --direct-io).
    #[arg(long, default_value = "copy", value_name = "copy|map")]
    pub stream_reads: ReadMode,
    /// Read expert weights with O_DIRECT, bypassing the page cache: auto (when the expert cache
    /// is not empty and the file system allows it), on (`--direct-io` alone), off.
    #[arg(
        long,
        default_value = "auto",
        value_name = "auto|on|off",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "on"
    )]
    pub direct_io: DirectIo,
    /// The in-process expert cache (when streaming with --stream-reads copy): a size (2G, 512M;
    /// 0 leaves caching to the page cache) or auto, the memory available after loading less
    /// 768 MiB. It replaces the page cache rather than doubling it (see --direct-io and
    /// BENCHMARKS.md).
    #[arg(long, value_name = "SIZE|auto", value_parser = parse_cache_size, default_value = "auto")]
    pub expert_cache: CacheSize,
    /// Which cached expert a new one replaces: lfu (least frequently used over recent tokens)
    /// or lru (least recently used).
    #[arg(long, default_value = "lfu", value_name = "lfu|lru")]
    pub expert_eviction: Eviction,
    /// Expert reads in flight at most (when streaming).
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub queue_depth: usize,
    /// Read backend: auto (io_uring where the kernel allows it), io_uring, threads.
    #[arg(long, default_value = "auto", value_name = "auto|io_uring|threads")]
    pub io_backend: IoBackend,
    /// How the next layer's experts are predicted and read ahead: router (the next layer's
    /// router on the current hidden state), previous (the previous token's choice), none, auto
    /// (router when reading through the page cache, none with an expert cache: measured faster).
    #[arg(long, default_value = "auto", value_name = "auto|router|previous|none")]
    pub prefetch: Prefetch,
}

impl Default for StreamArgs {
    fn default() -> Self {
        let o = StoreOptions::default();
        StreamArgs {
            stream_experts: o.stream,
            stream_reads: o.reads,
            direct_io: o.direct_io,
            expert_cache: o.cache,
            expert_eviction: o.eviction,
            queue_depth: o.queue_depth,
            io_backend: o.io,
            prefetch: o.prefetch,
        }
    }
}

impl StreamArgs {
    /// The expert store's options.
    pub fn store_options(&self) -> Result<StoreOptions> {
        let fail_read = match std::env::var("MOESTREAM_FAIL_READ") {
            Ok(v) => Some(
                v.parse::<u64>()
                    .with_context(|| format!("MOESTREAM_FAIL_READ={v:?} is not a number"))?,
            ),
            Err(_) => None,
        };
        if self.queue_depth == 0 || self.queue_depth > 4096 {
            anyhow::bail!("--queue-depth must be between 1 and 4096");
        }
        Ok(StoreOptions {
            stream: self.stream_experts,
            io: self.io_backend,
            queue_depth: self.queue_depth,
            reads: if self.direct_io == DirectIo::On {
                ReadMode::Copy
            } else {
                self.stream_reads
            },
            direct_io: self.direct_io,
            cache: self.expert_cache,
            eviction: self.expert_eviction,
            prefetch: self.prefetch,
            fail_read,
        })
    }
}

fn parse_cache_size(s: &str) -> Result<CacheSize, String> {
    if s == "auto" {
        Ok(CacheSize::Auto)
    } else {
        parse_size(s).map(CacheSize::Bytes)
    }
}

/// `123`, `512K`, `64M`, `2G`, `1.5G` (binary units) in bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = t[i..].to_ascii_uppercase();
            let m: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("unknown size unit in {s:?} (use K, M, G, T)")),
            };
            (&t[..i], m)
        }
        None => (t, 1),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 512M, 2G)"))?;
    if !(v >= 0.0 && v.is_finite()) {
        return Err(format!("{s:?} is not a size"));
    }
    Ok((v * mult as f64) as u64)
}

/// Everything `run`/`score`/`perplexity` need from a model folder.
pub struct Loaded {
    pub dir: PathBuf,
    pub model: Model,
    pub tokenizer: Option<Tokenizer>,
    pub template: Option<ChatTemplate>,
    pub generation: GenerationConfig,
}

impl Loaded {
    /// Opens a local folder, a GGUF file (or the first part of a split one), or a Hugging Face
    /// repository id (see [`crate::hub`]).
    pub fn open(spec: &Path, engine: &EngineArgs) -> Result<Loaded> {
        let dir = &crate::hub::resolve_model(spec)?;
        let gguf = moestream_engine::gguf::is_gguf_path(dir) && dir.is_file();
        if !dir.is_dir() && !gguf {
            anyhow::bail!("{}: not a model folder or GGUF file", dir.display());
        }
        moestream_kernels::features::set_activation_precision(
            engine
                .decode_activations
                .unwrap_or(ActivationPrecision::Int8),
        );
        let mut model = Model::load_with(dir, &engine.stream.store_options()?)?;
        if let Some(k) = engine.top_k {
            model.set_top_k(k).map_err(anyhow::Error::msg)?;
        }
        engine.device.place(&mut model)?;
        let (tokenizer, template, generation) = if gguf {
            gguf_text(dir)?
        } else {
            let tokenizer = if dir.join("tokenizer.json").is_file() {
                Some(Tokenizer::from_dir(dir)?)
            } else {
                None
            };
            (
                tokenizer,
                ChatTemplate::from_dir(dir)?,
                GenerationConfig::from_dir(dir)?,
            )
        };
        Ok(Loaded {
            dir: dir.to_path_buf(),
            model,
            tokenizer,
            template,
            generation,
        })
    }

    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().with_context(|| {
            format!(
                "{}: no tokenizer.json; pass token ids instead of text",
                self.dir.display()
            )
        })
    }

    /// Stop ids: generation_config's, plus the tokenizer's EOS.
    pub fn eos_ids(&self) -> Vec<u32> {
        let mut ids = self.generation.eos_token_ids.clone();
        if let Some(id) = self.tokenizer.as_ref().and_then(|t| t.eos_token_id()) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }
}

/// Tokenizer, chat template and stop ids of a GGUF file: a `tokenizer.json` beside the file
/// wins (with the folder's `tokenizer_config.json`, chat template and generation config); else
/// they come from the file's metadata. A tokenizer that cannot be built from the metadata is a
/// warning, not an error: token ids still work.
fn gguf_text(path: &Path) -> Result<(Option<Tokenizer>, Option<ChatTemplate>, GenerationConfig)> {
    let folder = path.parent().unwrap_or(Path::new("."));
    let source = moestream_engine::gguf::GgufSource::open(path, false)?;
    let mut generation = source.generation_config();
    if folder.join("tokenizer.json").is_file() {
        let tokenizer = Tokenizer::from_dir(folder)?;
        let template = match ChatTemplate::from_dir(folder)? {
            Some(t) => Some(t),
            None => source
                .chat_template_source()
                .map(|t| ChatTemplate::new("tokenizer.chat_template", t, source.special_tokens()))
                .transpose()?,
        };
        let beside = GenerationConfig::from_dir(folder)?;
        if !beside.eos_token_ids.is_empty() {
            generation = beside;
        }
        return Ok((Some(tokenizer), template, generation));
    }
    let tokenizer = match source.tokenizer() {
        Ok(t) => Some(t),
        Err(e) => {
            eprintln!("warning: {e:#}; pass token ids instead of text");
            None
        }
    };
    let template = source
        .chat_template_source()
        .map(|t| ChatTemplate::new("tokenizer.chat_template", t, source.special_tokens()))
        .transpose()?;
    Ok((tokenizer, template, generation))
}

/// Peak resident memory of this process in bytes (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.2} {}", units[u])
}

/// Expert traffic and disk reads at one moment, to report an interval's difference.
#[derive(Clone, Copy, Debug)]
pub struct Traffic {
    pub store: StoreStats,
    pub disk_read_bytes: Option<u64>,
}

impl Traffic {
    pub fn now(model: &Model) -> Traffic {
        Traffic {
            store: model.experts.stats(),
            disk_read_bytes: store::disk_read_bytes(),
        }
    }

    /// One line describing the expert traffic since `self`, over `tokens` tokens.
    pub fn report_since(&self, model: &Model, tokens: usize, seconds: f64) -> String {
        let now = Traffic::now(model);
        let s = now.store.since(&self.store);
        let per = |b: u64| human_bytes(b / tokens.max(1) as u64);
        let mut parts = vec![format!(
            "experts: {} (top-k {})",
            if model.experts.is_streamed() {
                format!(
                    "streamed, {} via {}",
                    match model.experts.read_mode() {
                        Some(ReadMode::Map) => "mapped",
                        _ => "copied",
                    },
                    model.experts.io_backend().unwrap_or("?")
                )
            } else {
                "memory-mapped".to_string()
            },
            model.top_k()
        )];
        parts.push(format!("{}/tok requested", per(s.bytes_needed)));
        if model.experts.is_streamed() {
            parts.push(format!("{}/tok read", per(s.bytes_read)));
        }
        if let (Some(a), Some(b)) = (self.disk_read_bytes, now.disk_read_bytes) {
            let disk = b.saturating_sub(a);
            parts.push(format!(
                "{}/tok from disk ({}/s)",
                per(disk),
                human_bytes((disk as f64 / seconds.max(1e-9)) as u64)
            ));
        }
        if let Some(r) = s.prefetch_hit_rate() {
            parts.push(format!("prefetch hit {:.0}%", r * 100.0));
        }
        if model.experts.is_streamed() {
            parts.push(format!(
                "I/O wait {:.0}% / expert compute {:.0}% of {:.2} s",
                s.wait_ns as f64 / 1e9 / seconds.max(1e-9) * 100.0,
                s.compute_ns as f64 / 1e9 / seconds.max(1e-9) * 100.0,
                seconds
            ));
        }
        if let Some(device) = model.accelerator() {
            for (k, v) in device.stats() {
                parts.push(format!("{k} {v}"));
            }
        }
        format!("[{}]", parts.join(" | "))
    }
}
