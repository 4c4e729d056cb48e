//! `tokenizer_config.json`: the special tokens, `add_bos_token`/`add_eos_token` and chat templates that Hugging Face
//! keeps beside `tokenizer.json`.
//!
//! Only the fields this module uses are read; the rest of the file is ignored. Token fields may be written as plain
//! strings or as serialised `AddedToken` objects (`{"content": "<s>", "lstrip": false, ...}`), and `null` means
//! "not set", as in transformers.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{read_to_string, Result, TextError};

/// The special tokens a tokenizer declares, as transformers' `special_tokens_map` (the strings, not ids).
///
/// Chat templates receive the ones that are set as `bos_token`, `eos_token`, ... variables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning-of-sequence token, e.g. `<s>`; Qwen3 has none.
    pub bos: Option<String>,
    /// End-of-sequence token, e.g. `</s>` or Qwen3's `<|im_end|>`.
    pub eos: Option<String>,
    /// Unknown-token placeholder.
    pub unk: Option<String>,
    /// Padding token.
    pub pad: Option<String>,
    /// Separator token (BERT-style models).
    pub sep: Option<String>,
    /// Classifier token (BERT-style models).
    pub cls: Option<String>,
    /// Mask token (masked language models).
    pub mask: Option<String>,
}

impl SpecialTokens {
    /// `(template variable name, token)` for every token that is set, in transformers' order.
    pub fn template_variables(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("bos_token", &self.bos),
            ("eos_token", &self.eos),
            ("unk_token", &self.unk),
            ("sep_token", &self.sep),
            ("pad_token", &self.pad),
            ("cls_token", &self.cls),
            ("mask_token", &self.mask),
        ]
        .into_iter()
        .filter_map(|(name, token)| token.as_deref().map(|t| (name, t)))
    }
}

/// A chat template found in `tokenizer_config.json`, with the name HF gives it (`"default"` for a lone string).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedChatTemplate {
    /// `"default"`, `"tool_use"`, `"rag"`, ...
    pub name: String,
    /// The Jinja source.
    pub source: String,
}

/// The parts of `tokenizer_config.json` this module uses.
#[derive(Debug, Clone, Default)]
pub struct TokenizerConfig {
    /// The file this came from; `None` for a default (no file).
    pub path: Option<PathBuf>,
    /// `bos_token`, `eos_token`, ...
    pub special_tokens: SpecialTokens,
    /// `add_bos_token`, when the file says.
    pub add_bos_token: Option<bool>,
    /// `add_eos_token`, when the file says.
    pub add_eos_token: Option<bool>,
    /// `chat_template`: a string becomes one template named `"default"`; a list of `{name, template}` is kept whole.
    pub chat_templates: Vec<NamedChatTemplate>,
}

impl TokenizerConfig {
    /// Reads and parses `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = read_to_string(path)?;
        Self::from_json_str(&text, path)
    }

    /// Reads `dir/tokenizer_config.json` if it exists; a folder without one gives the default (nothing set).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        if path.exists() {
            Self::from_file(&path)
        } else {
            Ok(Self::default())
        }
    }

    /// Parses the contents of a `tokenizer_config.json`; `path` only names it in errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let json: Value = serde_json::from_str(text).map_err(|source| TextError::Json {
            path: path.to_owned(),
            source,
        })?;
        let object = json.as_object().ok_or_else(|| TextError::Config {
            path: path.to_owned(),
            field: "(top level)".into(),
            reason: "is not a JSON object".into(),
        })?;
        let token = |field: &str| token_field(object.get(field), path, field);
        let flag = |field: &str| -> Result<Option<bool>> {
            match object.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Bool(b)) => Ok(Some(*b)),
                Some(_) => Err(TextError::Config {
                    path: path.to_owned(),
                    field: field.into(),
                    reason: "must be true, false or null".into(),
                }),
            }
        };
        Ok(Self {
            path: Some(path.to_owned()),
            special_tokens: SpecialTokens {
                bos: token("bos_token")?,
                eos: token("eos_token")?,
                unk: token("unk_token")?,
                pad: token("pad_token")?,
                sep: token("sep_token")?,
                cls: token("cls_token")?,
                mask: token("mask_token")?,
            },
            add_bos_token: flag("add_bos_token")?,
            add_eos_token: flag("add_eos_token")?,
            chat_templates: chat_templates(object.get("chat_template"), path)?,
        })
    }

    /// The template HF uses when no name is asked for: the only one, or the one named `"default"`.
    pub fn default_chat_template(&self) -> Option<&NamedChatTemplate> {
        self.chat_template_named("default")
    }

    /// The template called `name`.
    pub fn chat_template_named(&self, name: &str) -> Option<&NamedChatTemplate> {
        self.chat_templates.iter().find(|t| t.name == name)
    }
}

fn token_field(value: Option<&Value>, path: &Path, field: &str) -> Result<Option<String>> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(TextError::Config {
                path: path.to_owned(),
                field: field.into(),
                reason: "is an object without a string \"content\"".into(),
            }),
        },
        Some(_) => Err(TextError::Config {
            path: path.to_owned(),
            field: field.into(),
            reason: "must be a string, an object with \"content\", or null".into(),
        }),
    }
}

fn chat_templates(value: Option<&Value>, path: &Path) -> Result<Vec<NamedChatTemplate>> {
    let bad = |reason: &str| TextError::Config {
        path: path.to_owned(),
        field: "chat_template".into(),
        reason: reason.into(),
    };
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![NamedChatTemplate {
            name: "default".into(),
            source: s.clone(),
        }]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match (item.get("name"), item.get("template")) {
                (Some(Value::String(name)), Some(Value::String(source))) => Ok(NamedChatTemplate {
                    name: name.clone(),
                    source: source.clone(),
                }),
                _ => Err(bad(
                    "list entries must be {\"name\": string, \"template\": string}",
                )),
            })
            .collect(),
        Some(_) => Err(bad("must be a string or a list of {name, template}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<TokenizerConfig> {
        TokenizerConfig::from_json_str(text, Path::new("dir/tokenizer_config.json"))
    }

    #[test]
    fn text_config_reads_string_and_object_tokens() {
        let config = parse(
            r#"{"bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
                "eos_token": "</s>", "pad_token": null, "add_bos_token": true}"#,
        )
        .unwrap();
        assert_eq!(config.special_tokens.bos.as_deref(), Some("<s>"));
        assert_eq!(config.special_tokens.eos.as_deref(), Some("</s>"));
        assert_eq!(config.special_tokens.pad, None);
        assert_eq!(config.add_bos_token, Some(true));
        assert_eq!(config.add_eos_token, None);
        let vars: Vec<_> = config.special_tokens.template_variables().collect();
        assert_eq!(vars, [("bos_token", "<s>"), ("eos_token", "</s>")]);
    }

    #[test]
    fn text_config_reads_template_list() {
        let config = parse(
            r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#,
        )
        .unwrap();
        assert_eq!(config.default_chat_template().unwrap().source, "D");
        assert_eq!(config.chat_template_named("tool_use").unwrap().source, "T");
        let single = parse(r#"{"chat_template": "S"}"#).unwrap();
        assert_eq!(single.default_chat_template().unwrap().source, "S");
    }

    #[test]
    fn text_config_errors_name_file_and_field() {
        let err = parse(r#"{"eos_token": 5}"#).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("dir/tokenizer_config.json"), "{message}");
        assert!(message.contains("eos_token"), "{message}");
        let err = parse(r#"{"chat_template": [{"name": "x"}]}"#).unwrap_err();
        assert!(err.to_string().contains("chat_template"), "{err}");
        let err = parse("{not json").unwrap_err();
        assert!(matches!(err, TextError::Json { .. }), "{err:?}");
        assert!(
            err.to_string().contains("dir/tokenizer_config.json"),
            "{err}"
        );
    }
}
