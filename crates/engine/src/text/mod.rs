//! Text in and out of the model: tokenization, streaming detokenization and chat templates.
//!
//! - [`Tokenizer`] wraps the `tokenizers` crate on a model folder's `tokenizer.json`, plus the special tokens and
//!   `add_bos_token` of its `tokenizer_config.json` ([`TokenizerConfig`]).
//! - [`IncrementalDecoder`] turns generated token ids into text one token at a time without ever emitting half a
//!   UTF-8 character, such that the pieces concatenate to exactly `decode(all_ids)`.
//! - [`ChatTemplate`] renders a conversation into the prompt string with the model's Jinja chat template, byte for
//!   byte as Hugging Face transformers' `apply_chat_template(..., tokenize=False)` does.
//!
//! ```no_run
//! use moestream_engine::text::{ChatTemplate, IncrementalDecoder, Tokenizer};
//! # fn main() -> Result<(), moestream_engine::text::TextError> {
//! let dir = std::path::Path::new("Qwen3-30B-A3B");
//! let tokenizer = Tokenizer::from_dir(dir)?;
//! let Some(template) = ChatTemplate::from_dir(dir)? else {
//!     return Ok(()); // a base model: no chat template
//! };
//! let messages = serde_json::json!([{"role": "user", "content": "Hello!"}]);
//! let prompt = template.render(&messages, true, &serde_json::Map::new())?;
//! let prompt_ids = tokenizer.encode(&prompt, false)?;
//! # let generated: Vec<u32> = prompt_ids;
//! let mut decoder = IncrementalDecoder::new(true);
//! for id in generated {
//!     print!("{}", decoder.push(&tokenizer, id)?);
//! }
//! print!("{}", decoder.flush(&tokenizer)?);
//! # Ok(())
//! # }
//! ```
//!
//! Reference outputs for the tests come from `scripts/text/make_expected.py` (transformers) and live in
//! `tests/fixtures/text/`, together with copies of the tokenizer files and templates they need.

mod chat_template;
mod config;
mod detokenizer;
mod python_compat;
mod strftime;
mod tokenizer;

#[cfg(test)]
mod fixture_tests;

use std::path::{Path, PathBuf};

pub use chat_template::ChatTemplate;
pub use config::{NamedChatTemplate, SpecialTokens, TokenizerConfig};
pub use detokenizer::IncrementalDecoder;
pub use tokenizer::Tokenizer;

/// Errors of the text module. Each names the file or template involved; the underlying error is the `source()`.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// A file could not be read (missing, unreadable, not UTF-8).
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file did not parse.
    #[error("{} is not valid JSON", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's complaint, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// A field of a configuration file has the wrong shape.
    #[error("{}: `{field}` {reason}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// The field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `tokenizer.json` was read but the `tokenizers` crate could not build a tokenizer from it.
    #[error("cannot load tokenizer {}", path.display())]
    LoadTokenizer {
        /// The `tokenizer.json`.
        path: PathBuf,
        /// The `tokenizers` crate's error.
        #[source]
        source: tokenizers::Error,
    },
    /// Encoding failed inside the `tokenizers` crate.
    #[error("tokenizer {} failed to encode a text of {text_bytes} bytes", path.display())]
    Encode {
        /// The `tokenizer.json`.
        path: PathBuf,
        /// Length of the input, for the log (the text itself may be private).
        text_bytes: usize,
        /// The `tokenizers` crate's error.
        #[source]
        source: tokenizers::Error,
    },
    /// Decoding failed inside the `tokenizers` crate.
    #[error("tokenizer {} failed to decode {count} token ids", path.display())]
    Decode {
        /// The `tokenizer.json`.
        path: PathBuf,
        /// How many ids were given.
        count: usize,
        /// The `tokenizers` crate's error.
        #[source]
        source: tokenizers::Error,
    },
    /// The chat template is not valid Jinja (for minijinja).
    #[error("chat template {template} does not compile")]
    TemplateSyntax {
        /// Where the template came from.
        template: String,
        /// minijinja's error, with the line.
        #[source]
        source: minijinja::Error,
    },
    /// Rendering failed: an undefined method or filter, a type error, ...
    #[error("chat template {template} failed to render")]
    TemplateRender {
        /// Where the template came from.
        template: String,
        /// minijinja's error, with the line.
        #[source]
        source: minijinja::Error,
    },
    /// The template called `raise_exception(message)`: it refuses this conversation (e.g. roles that do not
    /// alternate).
    #[error("chat template {template} rejected the conversation: {message}")]
    TemplateRaised {
        /// Where the template came from.
        template: String,
        /// The template's own message.
        message: String,
    },
    /// The messages or extra variables given to [`ChatTemplate::render`] have the wrong shape.
    #[error("chat template {template}: {reason}")]
    InvalidChat {
        /// Where the template came from.
        template: String,
        /// What is wrong.
        reason: String,
    },
}

/// Result of this module.
pub type Result<T, E = TextError> = std::result::Result<T, E>;

fn read_to_string(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| TextError::Read {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::path::PathBuf;
    use std::sync::OnceLock;

    use super::Tokenizer;

    /// `tests/fixtures/text/` of the workspace.
    pub fn fixtures_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/text")
    }

    /// The Qwen3 tokenizer (byte-level BPE), loaded once per test binary: its tokenizer.json is 11 MB.
    pub fn qwen3() -> &'static Tokenizer {
        static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
        TOKENIZER.get_or_init(|| Tokenizer::from_dir(&fixtures_dir().join("qwen3")).unwrap())
    }

    /// The Mixtral tokenizer (SentencePiece BPE with byte fallback), loaded once per test binary.
    pub fn mixtral() -> &'static Tokenizer {
        static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
        TOKENIZER.get_or_init(|| Tokenizer::from_dir(&fixtures_dir().join("mixtral")).unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::{ChatTemplate, IncrementalDecoder, Tokenizer};

    /// The server shares tokenizers and templates across threads and moves decoders between them.
    #[test]
    fn text_types_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Tokenizer>();
        check::<ChatTemplate>();
        check::<IncrementalDecoder>();
    }
}
