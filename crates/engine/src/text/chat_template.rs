//! [`ChatTemplate`]: a model's Jinja chat template, rendered as Hugging Face transformers renders it.
//!
//! The prompt a model was trained on is whatever `tokenizer.apply_chat_template(messages, tokenize=False, ...)`
//! produced, so the aim is byte-identical output. transformers (`utils/chat_template_utils.py`) compiles templates
//! in a sandboxed Jinja2 environment with `trim_blocks` and `lstrip_blocks` on, `keep_trailing_newline` off (Jinja's
//! default: one final newline of the template is dropped) and the `loopcontrols` extension, and adds the globals
//! `raise_exception` and `strftime_now` and its own `tojson`. Before rendering, transformers 5 drops `None`-valued keys
//! of each message, copies the reasoning of a message (`reasoning_content`, `thinking` or `reasoning`) to both
//! `thinking` and `reasoning_content`, and passes `messages`, `tools` and `documents` (`None` when absent, so
//! `tools is defined` holds), `add_generation_prompt`, the tokenizer's special tokens (`bos_token`, ...) and the
//! caller's extra keyword arguments, which override the special tokens. This module does the same with minijinja;
//! the sibling module `python_compat` supplies the Python behaviour templates expect.
//!
//! Map keys keep their order (serde_json's `preserve_order`), so `tools | tojson` prints a tool schema the way the
//! client wrote it, as Python's dicts do.

use std::path::Path;

use minijinja::Environment;
use serde_json::{Map, Value};

use super::config::{SpecialTokens, TokenizerConfig};
use super::{python_compat, read_to_string, Result, TextError};

/// Names a message's reasoning can come under; the first non-null one is copied to `thinking` and
/// `reasoning_content`, as transformers' `_alias_reasoning_fields` does.
const REASONING_FIELDS: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];

/// Template variables [`ChatTemplate::render`] sets itself.
const RESERVED_VARIABLES: [&str; 2] = ["messages", "add_generation_prompt"];

/// A compiled chat template plus the special tokens it is rendered with.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    name: String,
    source: String,
    special_tokens: SpecialTokens,
}

impl ChatTemplate {
    /// Compiles `source`. `name` identifies the template in errors (e.g. the file it came from).
    pub fn new(
        name: impl Into<String>,
        source: impl Into<String>,
        special_tokens: SpecialTokens,
    ) -> Result<Self> {
        let name = name.into();
        let source = source.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        python_compat::configure(&mut env);
        env.add_template_owned(name.clone(), source.clone())
            .map_err(|source| TextError::TemplateSyntax {
                template: name.clone(),
                source,
            })?;
        Ok(Self {
            env,
            name,
            source,
            special_tokens,
        })
    }

    /// The template of a model folder, found as transformers finds it: `chat_template.jinja` if present, else the
    /// `chat_template` of `tokenizer_config.json` (its `"default"` entry if it is a list). `None` if neither has
    /// one (base models). Special tokens come from `tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        Self::from_dir_named(dir, "default")
    }

    /// As [`ChatTemplate::from_dir`], choosing a named template of a `tokenizer_config.json` list (e.g.
    /// `"tool_use"`); `chat_template.jinja` counts as `"default"`.
    pub fn from_dir_named(dir: &Path, name: &str) -> Result<Option<Self>> {
        let config = TokenizerConfig::from_dir(dir)?;
        let jinja_path = dir.join("chat_template.jinja");
        if name == "default" && jinja_path.exists() {
            let source = read_to_string(&jinja_path)?;
            return Self::new(
                jinja_path.display().to_string(),
                source,
                config.special_tokens,
            )
            .map(Some);
        }
        let Some(template) = config.chat_template_named(name) else {
            return Ok(None);
        };
        let config_path = dir.join("tokenizer_config.json");
        let label = if config.chat_templates.len() > 1 {
            format!("{} (chat_template \"{name}\")", config_path.display())
        } else {
            format!("{} (chat_template)", config_path.display())
        };
        Self::new(
            label,
            template.source.clone(),
            config.special_tokens.clone(),
        )
        .map(Some)
    }

    /// Where the template came from, as used in errors.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The special tokens passed to the template.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special_tokens
    }

    /// Renders `messages` (an array of message objects: `role`, `content`, optionally `tool_calls`,
    /// `reasoning_content`, ...) into the prompt text. `add_generation_prompt` appends the header of the assistant's
    /// reply. `extra` holds further template variables, as `apply_chat_template`'s keyword arguments: `tools` (a
    /// list of JSON schemas), `documents`, `enable_thinking`, ... A template that calls `raise_exception` gives
    /// [`TextError::TemplateRaised`] with its message.
    pub fn render(
        &self,
        messages: &Value,
        add_generation_prompt: bool,
        extra: &Map<String, Value>,
    ) -> Result<String> {
        let messages = self.normalize_messages(messages)?;
        if let Some(key) = RESERVED_VARIABLES.iter().find(|k| extra.contains_key(**k)) {
            return Err(self.invalid(format!(
                "`{key}` cannot be an extra template variable: it is set by render()"
            )));
        }
        // Same precedence as transformers: special tokens, then caller's kwargs over them.
        let mut context = Map::new();
        for (name, token) in self.special_tokens.template_variables() {
            context.insert(name.to_owned(), Value::String(token.to_owned()));
        }
        for (key, value) in extra {
            context.insert(key.clone(), value.clone());
        }
        for key in ["tools", "documents"] {
            context.entry(key).or_insert(Value::Null);
        }
        context.insert("messages".into(), Value::Array(messages));
        context.insert(
            "add_generation_prompt".into(),
            Value::Bool(add_generation_prompt),
        );

        let template = self
            .env
            .get_template(&self.name)
            .map_err(|source| self.render_error(source))?;
        template
            .render(minijinja::Value::from_serialize(&context))
            .map_err(|source| self.render_error(source))
    }

    /// transformers' message preparation: objects only, `null` fields dropped, reasoning aliased.
    fn normalize_messages(&self, messages: &Value) -> Result<Vec<Value>> {
        let list = messages.as_array().ok_or_else(|| {
            self.invalid("messages must be a JSON array of message objects".into())
        })?;
        if list.is_empty() {
            return Err(self.invalid(
                "cannot apply a chat template to an empty conversation; give at least one message"
                    .into(),
            ));
        }
        list.iter()
            .enumerate()
            .map(|(i, message)| {
                let fields = message.as_object().ok_or_else(|| {
                    self.invalid(format!("message {i} is not a JSON object: {message}"))
                })?;
                let present: Map<String, Value> = fields
                    .iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let reasoning = REASONING_FIELDS
                    .iter()
                    .find_map(|k| present.get(*k))
                    .cloned();
                let Some(reasoning) = reasoning else {
                    return Ok(Value::Object(present));
                };
                // Python: {"thinking": r, **message, "reasoning_content": r}; an existing key keeps its place.
                let mut aliased = Map::new();
                aliased.insert("thinking".into(), reasoning.clone());
                for (k, v) in present {
                    aliased.insert(k, v);
                }
                aliased.insert("reasoning_content".into(), reasoning);
                Ok(Value::Object(aliased))
            })
            .collect()
    }

    fn invalid(&self, reason: String) -> TextError {
        TextError::InvalidChat {
            template: self.name.clone(),
            reason,
        }
    }

    fn render_error(&self, source: minijinja::Error) -> TextError {
        match python_compat::raised_message(&source) {
            Some(message) => TextError::TemplateRaised {
                template: self.name.clone(),
                message,
            },
            None => TextError::TemplateRender {
                template: self.name.clone(),
                source,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn render(source: &str, messages: Value, extra: Value) -> Result<String> {
        let template = ChatTemplate::new("test", source, SpecialTokens::default())?;
        let extra = extra.as_object().cloned().unwrap_or_default();
        template.render(&messages, false, &extra)
    }

    #[test]
    fn text_template_whitespace_control_as_hf() {
        // trim_blocks + lstrip_blocks, and the final newline of the template dropped
        let source = "{% for m in messages %}\n    {% if true %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}\n";
        let out = render(
            source,
            json!([{"role": "user", "content": "a"}, {"content": "b"}]),
            json!({}),
        )
        .unwrap();
        assert_eq!(out, "[a]\n[b]\n");
    }

    #[test]
    fn text_template_normalizes_messages() {
        let source = "{% for m in messages %}{{ m | tojson }}\n{% endfor %}{{ tools is defined }} {{ tools }}";
        let messages = json!([
            {"role": "assistant", "content": null, "reasoning": "r"},
            {"role": "user", "thinking": "t", "content": "c"}
        ]);
        let out = render(source, messages, json!({})).unwrap();
        assert_eq!(
            out,
            "{\"thinking\": \"r\", \"role\": \"assistant\", \"reasoning\": \"r\", \"reasoning_content\": \"r\"}\n\
             {\"thinking\": \"t\", \"role\": \"user\", \"content\": \"c\", \"reasoning_content\": \"t\"}\n\
             True None"
        );
    }

    #[test]
    fn text_template_errors() {
        let raised = render(
            "{{ raise_exception('no ' + messages[0].role) }}",
            json!([{"role": "x"}]),
            json!({}),
        );
        match raised {
            Err(TextError::TemplateRaised { template, message }) => {
                assert_eq!(template, "test");
                assert_eq!(message, "no x");
            }
            other => panic!("{other:?}"),
        }
        let syntax =
            ChatTemplate::new("broken.jinja", "{% if %}", SpecialTokens::default()).unwrap_err();
        assert!(matches!(syntax, TextError::TemplateSyntax { .. }));
        assert!(syntax.to_string().contains("broken.jinja"), "{syntax}");
        let runtime = render(
            "{{ messages[0].content.nosuchmethod() }}",
            json!([{"content": "x"}]),
            json!({}),
        );
        assert!(
            matches!(runtime, Err(TextError::TemplateRender { .. })),
            "{runtime:?}"
        );
        for bad in [json!([]), json!({"role": "user"}), json!(["text"])] {
            let err = render("x", bad, json!({})).unwrap_err();
            assert!(matches!(err, TextError::InvalidChat { .. }), "{err:?}");
        }
        let reserved = render("x", json!([{}]), json!({"messages": []})).unwrap_err();
        assert!(reserved.to_string().contains("messages"), "{reserved}");
    }

    #[test]
    fn text_template_loop_controls_and_kwargs_override_tokens() {
        let template = ChatTemplate::new(
            "t",
            "{{ bos_token }}{% for i in range(9) %}{% if i > 2 %}{% break %}{% endif %}{{ i }}{% endfor %}{{ eos_token }}",
            SpecialTokens {
                bos: Some("<s>".into()),
                eos: Some("</s>".into()),
                ..SpecialTokens::default()
            },
        )
        .unwrap();
        let mut extra = Map::new();
        let messages = json!([{"role": "user", "content": "x"}]);
        assert_eq!(
            template.render(&messages, true, &extra).unwrap(),
            "<s>012</s>"
        );
        extra.insert("eos_token".into(), json!("<END>"));
        assert_eq!(
            template.render(&messages, true, &extra).unwrap(),
            "<s>012<END>"
        );
    }

    #[test]
    fn text_template_from_dir_precedence() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ChatTemplate::from_dir(dir.path()).unwrap().is_none());
        let config = json!({
            "eos_token": {"content": "</s>"},
            "chat_template": [
                {"name": "default", "template": "D{{ eos_token }}"},
                {"name": "tool_use", "template": "T"}
            ]
        });
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        let messages = json!([{"role": "user", "content": "x"}]);
        let default = ChatTemplate::from_dir(dir.path()).unwrap().unwrap();
        assert_eq!(
            default.render(&messages, false, &Map::new()).unwrap(),
            "D</s>"
        );
        assert!(
            default.name().contains("tokenizer_config.json"),
            "{}",
            default.name()
        );
        let tool_use = ChatTemplate::from_dir_named(dir.path(), "tool_use")
            .unwrap()
            .unwrap();
        assert_eq!(tool_use.render(&messages, false, &Map::new()).unwrap(), "T");

        std::fs::write(dir.path().join("chat_template.jinja"), "J{{ eos_token }}\n").unwrap();
        let jinja = ChatTemplate::from_dir(dir.path()).unwrap().unwrap();
        assert_eq!(
            jinja.render(&messages, false, &Map::new()).unwrap(),
            "J</s>"
        );
        assert!(
            jinja.name().ends_with("chat_template.jinja"),
            "{}",
            jinja.name()
        );
    }
}
