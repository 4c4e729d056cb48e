//! [`Tokenizer`]: a model folder's `tokenizer.json`, run by the `tokenizers` crate, with the special tokens of its
//! `tokenizer_config.json`.
//!
//! `tokenizer.json` fully defines encoding and decoding (normaliser, pre-tokeniser, model, post-processor that
//! adds BOS, decoder), so the `tokenizers` crate reproduces Hugging Face's fast tokenizers exactly. Note that
//! transformers 5's `LlamaTokenizer` rebuilds the SentencePiece pre-tokeniser instead of using the file and differs
//! from it (and from SentencePiece itself) on text that starts with a space; we follow the file.
//!
//! `tokenizer_config.json` is where HF keeps the special-token strings (`bos_token`, `eos_token`) and
//! `add_bos_token`; it is optional.

use std::path::{Path, PathBuf};

use super::config::{SpecialTokens, TokenizerConfig};
use super::{Result, TextError};

/// A Hugging Face tokenizer loaded from `tokenizer.json`. All methods take `&self` and it is `Send + Sync`: share
/// one behind an `Arc` rather than cloning (a clone copies the whole vocabulary).
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    config: TokenizerConfig,
    path: PathBuf,
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and, if present, `dir/tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config = TokenizerConfig::from_dir(dir)?;
        Self::from_file(&dir.join("tokenizer.json"), config)
    }

    /// Loads a `tokenizer.json` with an already-read configuration (use `TokenizerConfig::default()` for none).
    pub fn from_file(tokenizer_json: &Path, config: TokenizerConfig) -> Result<Self> {
        // Read the bytes ourselves so a missing or unreadable file is told apart from a malformed one.
        let bytes = std::fs::read(tokenizer_json).map_err(|source| TextError::Read {
            path: tokenizer_json.to_owned(),
            source,
        })?;
        Self::from_json_bytes(&bytes, config, tokenizer_json)
    }

    /// Builds a tokenizer from the contents of a `tokenizer.json` (e.g. one made from GGUF
    /// metadata); `path` names its origin in errors.
    pub fn from_json_bytes(bytes: &[u8], config: TokenizerConfig, path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|source| {
            TextError::LoadTokenizer {
                path: path.to_owned(),
                source,
            }
        })?;
        Ok(Self {
            inner,
            config,
            path: path.to_owned(),
        })
    }

    /// Token ids of `text`. `add_special_tokens` runs the post-processor of `tokenizer.json` (e.g. Mixtral's BOS);
    /// it is off for text rendered by a chat template, which writes its special tokens itself. Special-token text
    /// such as `<|im_start|>` in `text` becomes the special token either way, as in HF.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|source| TextError::Encode {
                path: self.path.clone(),
                text_bytes: text.len(),
                source,
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`. Incomplete UTF-8 sequences (a character whose bytes are split over tokens that are not all
    /// here) become U+FFFD; ids outside the vocabulary are skipped, as the `tokenizers` crate does.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|source| TextError::Decode {
                path: self.path.clone(),
                count: ids.len(),
                source,
            })
    }

    /// Id of a token string (vocabulary entry or added token), e.g. `"<|im_end|>"`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token string of an id, in the vocabulary's own spelling (`Ġ`/`▁` for spaces, `<0x0A>` for bytes).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of token ids the tokenizer knows, added tokens included (151669 for Qwen3). The model's
    /// embedding table can be larger (151936): ids beyond this decode to nothing.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// `bos_token` of `tokenizer_config.json`.
    pub fn bos_token(&self) -> Option<&str> {
        self.config.special_tokens.bos.as_deref()
    }

    /// `eos_token` of `tokenizer_config.json`.
    pub fn eos_token(&self) -> Option<&str> {
        self.config.special_tokens.eos.as_deref()
    }

    /// Id of [`Tokenizer::bos_token`].
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token().and_then(|t| self.token_to_id(t))
    }

    /// Id of [`Tokenizer::eos_token`]. Generation usually stops on more ids than this one (see the model's
    /// `generation_config.json`).
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token().and_then(|t| self.token_to_id(t))
    }

    /// `add_bos_token` of `tokenizer_config.json`, when it says. Informational: whether [`Tokenizer::encode`]
    /// adds BOS is decided by the post-processor in `tokenizer.json`.
    pub fn add_bos_token(&self) -> Option<bool> {
        self.config.add_bos_token
    }

    /// All special-token strings of `tokenizer_config.json`.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.config.special_tokens
    }

    /// The parsed `tokenizer_config.json` (default if there was none).
    pub fn config(&self) -> &TokenizerConfig {
        &self.config
    }

    /// The `tokenizer.json` this was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying `tokenizers` tokenizer, for what this wrapper does not expose.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::test_support::{mixtral, qwen3};

    #[test]
    fn text_tokenizer_special_tokens() {
        let qwen = qwen3();
        assert_eq!(qwen.bos_token(), None);
        assert_eq!(qwen.eos_token(), Some("<|im_end|>"));
        assert_eq!(qwen.eos_token_id(), Some(151645));
        assert_eq!(qwen.add_bos_token(), Some(false));
        assert_eq!(qwen.special_tokens().pad.as_deref(), Some("<|endoftext|>"));
        assert_eq!(qwen.token_to_id("<think>"), Some(151667));
        assert_eq!(qwen.id_to_token(151668).as_deref(), Some("</think>"));
        assert_eq!(qwen.vocab_size(), 151669);

        let mistral = mixtral();
        assert_eq!(mistral.bos_token(), Some("<s>"));
        assert_eq!(mistral.bos_token_id(), Some(1));
        assert_eq!(mistral.eos_token_id(), Some(2));
        assert_eq!(mistral.add_bos_token(), Some(true));
        assert_eq!(mistral.vocab_size(), 32000);
        assert_eq!(mistral.encode("Hello", true).unwrap(), [1, 22557]);
        assert_eq!(mistral.encode("Hello", false).unwrap(), [22557]);
    }

    #[test]
    fn text_tokenizer_load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = Tokenizer::from_dir(dir.path()).unwrap_err();
        assert!(
            matches!(&missing, TextError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
        );
        assert!(missing.to_string().contains("tokenizer.json"), "{missing}");

        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, "{\"model\": 3}").unwrap();
        let malformed = Tokenizer::from_dir(dir.path()).unwrap_err();
        assert!(
            matches!(malformed, TextError::LoadTokenizer { .. }),
            "{malformed:?}"
        );
        assert!(
            malformed.to_string().contains(&path.display().to_string()),
            "{malformed}"
        );

        std::fs::write(dir.path().join("tokenizer_config.json"), "[oops").unwrap();
        let config = Tokenizer::from_dir(dir.path()).unwrap_err();
        assert!(
            config.to_string().contains("tokenizer_config.json"),
            "{config}"
        );
    }
}
