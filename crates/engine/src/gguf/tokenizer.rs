//! The tokenizer and chat template of a GGUF file (`tokenizer.ggml.*`, `tokenizer.chat_template`).
//!
//! A `gpt2` (byte-level BPE) vocabulary is rebuilt as the `tokenizer.json` Hugging Face would
//! ship: the tokens as the BPE vocabulary, `tokenizer.ggml.merges` as its merges, control and
//! user-defined tokens (`token_type` 3 and 4) as added tokens matched before pre-tokenization,
//! and the pre-tokenizer that `tokenizer.ggml.pre` names (`qwen2`, `qwen35`: Qwen2's split
//! regex then byte-level mapping). No normaliser: llama.cpp applies none (Qwen's own
//! `tokenizer.json` has NFC, which changes only text that is not already NFC). A BOS is
//! prepended when `tokenizer.ggml.add_bos_token` says so.
//!
//! A `llama` (SentencePiece BPE, as Mixtral and Llama files have) vocabulary is rebuilt as
//! transformers' `LlamaTokenizerFast` would: the tokens as a BPE vocabulary with byte fallback
//! (`<0xXX>` tokens) and `<unk>` for the rest, merges derived from the scores (every split of a
//! token into two tokens, ordered by the merged token's score, highest first: SentencePiece and
//! llama.cpp merge the adjacent pair whose union scores highest), spaces as `▁` with one
//! prepended (llama.cpp's `add_space_prefix`). Control, user-defined and unknown tokens
//! (`token_type` 3, 4, 2) are added tokens. Checked against llama.cpp's own test vocabulary
//! (`ggml-vocab-llama-spm.gguf` and its expected ids).
//!
//! Other tokenizer models are an error that says to put the model's `tokenizer.json` beside
//! the file; one there always wins.
use super::GgufSource;
use crate::text::{SpecialTokens, TextError, Tokenizer, TokenizerConfig};
use moestream_formats::gguf::MetadataArray;
use serde_json::{json, Map, Value};

/// Qwen2's pre-tokenizer split (the same regex as in Qwen's `tokenizer.json`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl GgufSource {
    fn tokenizer_error(&self, field: &str, reason: impl Into<String>) -> TextError {
        TextError::Config {
            path: self.index.path().to_path_buf(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn strings(&self, key: &str) -> Result<&[String], TextError> {
        match self.index.get_metadata(key).and_then(|v| v.as_array()) {
            Some(MetadataArray::String(v)) => Ok(v),
            _ => Err(self.tokenizer_error(key, "is missing or not an array of strings")),
        }
    }

    /// The `tokenizer.json` this file's metadata describe.
    pub fn tokenizer_json(&self) -> Result<Value, TextError> {
        let model = self
            .index
            .get_metadata("tokenizer.ggml.model")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        match model {
            "gpt2" => self.byte_level_bpe_json(),
            "llama" => self.sentencepiece_bpe_json(),
            _ => Err(self.tokenizer_error(
                "tokenizer.ggml.model",
                format!("is `{model}`; `gpt2` (byte-level BPE) and `llama` (SentencePiece BPE) are built from GGUF metadata: put the model's tokenizer.json beside the file"),
            )),
        }
    }

    /// `tokenizer.ggml.token_type` (all normal when absent), one per token.
    fn token_types(&self, tokens: usize) -> Result<Vec<i64>, TextError> {
        match self.index.get_metadata("tokenizer.ggml.token_type") {
            None => Ok(vec![1; tokens]),
            Some(v) => v
                .as_array()
                .and_then(MetadataArray::as_integers)
                .filter(|t| t.len() == tokens)
                .ok_or_else(|| {
                    self.tokenizer_error(
                        "tokenizer.ggml.token_type",
                        format!("must be {tokens} integers"),
                    )
                }),
        }
    }

    /// The vocabulary as a BPE `vocab` object, and the tokens of `types` as added tokens.
    fn vocab_and_added(
        tokens: &[String],
        types: &[i64],
        added_types: &[i64],
    ) -> (Map<String, Value>, Vec<Value>) {
        let mut vocab = Map::with_capacity(tokens.len());
        let mut added = Vec::new();
        for (id, (tok, ty)) in tokens.iter().zip(types).enumerate() {
            vocab.insert(tok.clone(), json!(id));
            if added_types.contains(ty) {
                added.push(json!({
                    "id": id, "content": tok, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": *ty != 4,
                }));
            }
        }
        (vocab, added)
    }

    /// A BOS before every sequence when `tokenizer.ggml.add_bos_token` says so (else `other`).
    fn bos_post_processor(&self, tokens: &[String], other: Value) -> Value {
        let add_bos = self
            .index
            .get_metadata("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let bos = self
            .index
            .get_metadata("tokenizer.ggml.bos_token_id")
            .and_then(|v| v.as_u64())
            .and_then(|i| tokens.get(i as usize).map(|t| (i, t)));
        match (add_bos, bos) {
            (true, Some((id, tok))) => json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": tok, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {tok.clone(): {"id": tok, "ids": [id], "tokens": [tok]}},
            }),
            _ => other,
        }
    }

    /// SentencePiece BPE (`llama`): see the module docs.
    fn sentencepiece_bpe_json(&self) -> Result<Value, TextError> {
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let scores = match self
            .index
            .get_metadata("tokenizer.ggml.scores")
            .and_then(|v| v.as_array())
        {
            Some(MetadataArray::F32(s)) if s.len() == tokens.len() => s,
            _ => {
                return Err(self.tokenizer_error(
                    "tokenizer.ggml.scores",
                    format!("must be {} f32 values", tokens.len()),
                ))
            }
        };
        let types = self.token_types(tokens.len())?;
        let (vocab, added) = Self::vocab_and_added(tokens, &types, &[2, 3, 4]);
        // Merges: every split of a normal token into two tokens, by the token's score.
        let ids: std::collections::HashMap<&str, usize> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        let mut merges: Vec<(f32, usize, usize)> = Vec::new();
        for (id, tok) in tokens.iter().enumerate() {
            if !matches!(types[id], 1 | 4) {
                continue;
            }
            let mut local: Vec<(usize, usize)> = tok
                .char_indices()
                .skip(1)
                .filter_map(|(at, _)| Some((*ids.get(&tok[..at])?, *ids.get(&tok[at..])?)))
                .collect();
            local.sort_unstable();
            merges.extend(local.into_iter().map(|(l, r)| (scores[id], l, r)));
        }
        // Highest score first; equal scores in token order (a stable sort).
        merges.sort_by(|a, b| b.0.total_cmp(&a.0));
        let merges: Vec<Value> = merges
            .iter()
            .map(|&(_, l, r)| json!([tokens[l], tokens[r]]))
            .collect();
        let unk = self
            .index
            .get_metadata("tokenizer.ggml.unknown_token_id")
            .and_then(|v| v.as_u64())
            .and_then(|i| tokens.get(i as usize))
            .cloned();
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u{2581}"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
            ]},
            "pre_tokenizer": null,
            "post_processor": self.bos_post_processor(tokens, Value::Null),
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ]},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                "ignore_merges": false, "vocab": vocab, "merges": merges,
            },
        }))
    }

    /// Byte-level BPE (`gpt2`): see the module docs.
    fn byte_level_bpe_json(&self) -> Result<Value, TextError> {
        let pre = self
            .index
            .get_metadata("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        if !matches!(pre, "qwen2" | "qwen35") {
            return Err(self.tokenizer_error(
                "tokenizer.ggml.pre",
                format!("is `{pre}`; supported: qwen2, qwen35 (or put a tokenizer.json beside the file)"),
            ));
        }
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let merges = self.strings("tokenizer.ggml.merges")?;
        let types = self.token_types(tokens.len())?;
        let (vocab, added) = Self::vocab_and_added(tokens, &types, &[3, 4]);
        let merges: Vec<Value> = merges
            .iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) => Ok(json!([a, b])),
                None => Err(self.tokenizer_error(
                    "tokenizer.ggml.merges",
                    format!("entry `{m}` is not two tokens separated by a space"),
                )),
            })
            .collect::<Result<_, _>>()?;
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
        let post = self.bos_post_processor(tokens, byte_level.clone());
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
                byte_level,
            ]},
            "post_processor": post,
            "decoder": byte_level,
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": false, "vocab": vocab, "merges": merges,
            },
        }))
    }

    /// The special-token strings the metadata name (for the chat template and the tokenizer).
    pub fn special_tokens(&self) -> SpecialTokens {
        let tok = |k: &str| {
            let id = self
                .index
                .get_metadata(&format!("tokenizer.ggml.{k}_token_id"))?
                .as_u64()?;
            match self
                .index
                .get_metadata("tokenizer.ggml.tokens")?
                .as_array()?
            {
                MetadataArray::String(v) => v.get(usize::try_from(id).ok()?).cloned(),
                _ => None,
            }
        };
        SpecialTokens {
            bos: tok("bos"),
            eos: tok("eos"),
            unk: tok("unknown"),
            pad: tok("padding"),
            ..SpecialTokens::default()
        }
    }

    /// The tokenizer built from the metadata.
    pub fn tokenizer(&self) -> Result<Tokenizer, TextError> {
        let json = self.tokenizer_json()?;
        let bytes = serde_json::to_vec(&json).map_err(|source| TextError::Json {
            path: self.index.path().to_path_buf(),
            source,
        })?;
        let config = TokenizerConfig {
            path: Some(self.index.path().to_path_buf()),
            special_tokens: self.special_tokens(),
            add_bos_token: self
                .index
                .get_metadata("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.as_bool()),
            ..TokenizerConfig::default()
        };
        Tokenizer::from_json_bytes(&bytes, config, self.index.path())
    }

    /// `tokenizer.chat_template`, if the file has one.
    pub fn chat_template_source(&self) -> Option<&str> {
        self.index
            .get_metadata("tokenizer.chat_template")
            .and_then(|v| v.as_str())
    }
}
