//! Where `--model` points: a local folder, or a Hugging Face Hub repository id (`owner/name`,
//! optionally `owner/name@revision`) fetched through `hf-hub` into its standard cache
//! (`HF_HOME`, default `~/.cache/huggingface`). Files already in the cache are used without the
//! network; with `HF_HUB_OFFLINE=1` only the cache is consulted.
use anyhow::{bail, Context, Result};
use hf_hub::{api::sync::ApiBuilder, Cache, Repo, RepoType};
use std::path::{Path, PathBuf};

/// Gets one file of the repository as a local path.
type Fetch<'a> = Box<dyn FnMut(&str) -> Result<PathBuf> + 'a>;

/// Files a model folder may have beside its weights.
const OPTIONAL_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
];

/// Resolves `spec` to a local model folder, downloading from the Hub when needed.
pub fn resolve_model(spec: &Path) -> Result<PathBuf> {
    if spec.exists() {
        return Ok(spec.to_path_buf());
    }
    let s = spec.to_string_lossy();
    let (id, revision) = match s.split_once('@') {
        Some((id, rev)) => (id.to_string(), rev.to_string()),
        None => (s.to_string(), "main".to_string()),
    };
    let looks_like_repo = id.split('/').count() == 2
        && !id.starts_with('.')
        && !id.starts_with('/')
        && id.split('/').all(|p| !p.is_empty());
    if !looks_like_repo {
        bail!("{}: model folder not found (and not a Hugging Face repository id like `Qwen/Qwen3-30B-A3B`)", spec.display());
    }
    let repo = Repo::with_revision(id.clone(), RepoType::Model, revision);
    let offline =
        std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let cache = Cache::from_env().repo(repo.clone());
    let cached = |f: &str| cache.get(f);
    let mut fetch: Fetch = if offline {
        Box::new(|f: &str| {
            cached(f).with_context(|| {
                format!("{id}: `{f}` is not in the Hugging Face cache and HF_HUB_OFFLINE is set")
            })
        })
    } else {
        let api = ApiBuilder::from_env()
            .with_progress(true)
            .build()
            .with_context(|| format!("{id}: cannot set up the Hugging Face Hub client"))?;
        let api_repo = api.repo(repo.clone());
        Box::new(move |f: &str| match cached(f) {
            Some(p) => Ok(p),
            None => api_repo
                .get(f)
                .with_context(|| format!("{id}: downloading `{f}` from the Hugging Face Hub")),
        })
    };
    let config = fetch("config.json")?;
    let dir = config
        .parent()
        .context("cache path has no parent")?
        .to_path_buf();
    for f in OPTIONAL_FILES {
        let _ = fetch(f);
    }
    match fetch("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index)
                .with_context(|| format!("reading {}", index.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: malformed JSON", index.display()))?;
            let mut files: Vec<String> = json["weight_map"]
                .as_object()
                .with_context(|| format!("{}: no `weight_map`", index.display()))?
                .values()
                .filter_map(|v| v.as_str().map(String::from))
                .collect();
            files.sort();
            files.dedup();
            for f in files {
                fetch(&f)?;
            }
        }
        Err(_) => {
            fetch("model.safetensors")?;
        }
    }
    Ok(dir)
}
