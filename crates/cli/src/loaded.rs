//! A model folder loaded for the commands: weights, tokenizer, chat template, generation defaults.
use anyhow::{Context, Result};
use moestream_engine::config::GenerationConfig;
use moestream_engine::models::Model;
use moestream_engine::text::{ChatTemplate, Tokenizer};
use std::path::{Path, PathBuf};

/// Everything `run`/`score`/`perplexity` need from a model folder.
pub struct Loaded {
    pub dir: PathBuf,
    pub model: Model,
    pub tokenizer: Option<Tokenizer>,
    pub template: Option<ChatTemplate>,
    pub generation: GenerationConfig,
}

impl Loaded {
    /// Opens a local folder or a Hugging Face repository id (see [`crate::hub`]).
    pub fn open(spec: &Path) -> Result<Loaded> {
        let dir = &crate::hub::resolve_model(spec)?;
        if !dir.is_dir() {
            anyhow::bail!("{}: not a model folder", dir.display());
        }
        let model = Model::load(dir)?;
        let tokenizer = if dir.join("tokenizer.json").is_file() {
            Some(Tokenizer::from_dir(dir)?)
        } else {
            None
        };
        let template = ChatTemplate::from_dir(dir)?;
        let generation = GenerationConfig::from_dir(dir)?;
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
