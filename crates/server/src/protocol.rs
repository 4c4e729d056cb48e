//! The OpenAI request bodies, and their checks: every field is typed, unknown fields are refused
//! (a misspelt `max_token` must not be silently ignored), and each out-of-range value is reported
//! with its field name and the accepted range.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::StatusCode;
use moestream_engine::generate::SamplingParams;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::worker::LogitAdjustments;
use crate::Engine;

/// Most alternatives `top_logprobs` / `logprobs` may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: i64 = 20;
/// Most stop strings.
const MAX_STOP_STRINGS: usize = 16;

/// Seconds since 1970.
pub fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fresh 64-bit value (for response ids and default seeds): a counter mixed with the clock.
pub fn fresh_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut z = nanos
        ^ COUNTER
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .rotate_left(17);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `prefix-` and 24 hex digits.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}{:08x}", fresh_u64(), fresh_u64() as u32)
}

/// `stop`: one string or a list.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Stop {
    /// One string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a last chunk with the token counts.
    pub include_usage: Option<bool>,
}

impl StreamOptions {
    /// Whether a request's `stream_options` (if any) ask for the usage chunk.
    pub fn include_usage(options: Option<&StreamOptions>) -> bool {
        options.and_then(|o| o.include_usage).unwrap_or(false)
    }
}

/// `POST /v1/chat/completions`. Every field is optional here so that a type error can be traced
/// to its field (see [`parse_body`]); required ones are checked afterwards.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<Value>>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub n: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub logit_bias: Option<BTreeMap<String, f64>>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    #[allow(dead_code)] // accepted, no effect
    pub parallel_tool_calls: Option<bool>,
    pub chat_template_kwargs: Option<Map<String, Value>>,
    #[allow(dead_code)] // accepted, no effect
    pub user: Option<String>,
    #[allow(dead_code)] // accepted, no effect
    pub metadata: Option<Value>,
    #[allow(dead_code)] // accepted, no effect
    pub store: Option<bool>,
    /// moestream extension: `false` runs this request without the server's speculative
    /// decoding (`--draft-model`, `--prompt-lookup`); absent or `true` uses it when configured.
    pub speculative: Option<bool>,
}

/// `POST /v1/completions`.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Option<Value>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub n: Option<i64>,
    pub best_of: Option<i64>,
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub logit_bias: Option<BTreeMap<String, f64>>,
    #[allow(dead_code)] // accepted, no effect
    pub user: Option<String>,
    /// moestream extension: `false` runs this request without the server's speculative
    /// decoding (`--draft-model`, `--prompt-lookup`); absent or `true` uses it when configured.
    pub speculative: Option<bool>,
}

/// Parses a JSON body into `T`, answering OpenAI-shaped 400s that name the offending field.
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the request body is not valid JSON ({e}); send a JSON object with \
             Content-Type: application/json"
        ))
        .with_code("invalid_json")
    })?;
    let Value::Object(fields) = value else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    };
    match serde_json::from_value::<T>(Value::Object(fields.clone())) {
        Ok(t) => Ok(t),
        Err(whole) => {
            // All fields are optional, so a one-field object fails only because of its field.
            for (key, value) in fields {
                let one = Value::Object(Map::from_iter([(key.clone(), value)]));
                if let Err(e) = serde_json::from_value::<T>(one) {
                    let msg = e.to_string();
                    let msg = if msg.starts_with("unknown field") {
                        format!("unrecognized request argument: `{key}`")
                    } else {
                        format!("`{key}`: {msg}")
                    };
                    return Err(ApiError::invalid(key, msg));
                }
            }
            Err(ApiError::bad_request(whole.to_string()))
        }
    }
}

/// The sampling-related fields both endpoints share, before checking.
pub struct SamplingFields<'a> {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub n: Option<i64>,
    pub stop: Option<&'a Stop>,
    pub logit_bias: Option<&'a BTreeMap<String, f64>>,
    /// The value and the name of the field it came from.
    pub max_tokens: Option<(i64, &'static str)>,
}

/// Checked sampling settings.
pub struct Sampling {
    pub params: SamplingParams,
    pub adjustments: LogitAdjustments,
    pub stop: Vec<String>,
    pub max_tokens: Option<(usize, &'static str)>,
}

fn in_range(
    name: &str,
    v: Option<f64>,
    lo: f64,
    hi: f64,
    lo_open: bool,
) -> Result<Option<f32>, ApiError> {
    let Some(x) = v else { return Ok(None) };
    let ok = x.is_finite() && x <= hi && if lo_open { x > lo } else { x >= lo };
    if !ok {
        let open = if lo_open { "(" } else { "[" };
        return Err(ApiError::invalid(
            name,
            format!("`{name}` is {x}; it must be in {open}{lo}, {hi}]"),
        ));
    }
    Ok(Some(x as f32))
}

impl SamplingFields<'_> {
    /// Checks ranges and merges with the server's defaults.
    pub fn check(&self, engine: &Engine) -> Result<Sampling, ApiError> {
        let d = &engine.defaults;
        match self.n {
            None | Some(1) => {}
            Some(n) if n < 1 => {
                return Err(ApiError::invalid(
                    "n",
                    format!("`n` is {n}; it must be at least 1"),
                ))
            }
            Some(n) => {
                return Err(ApiError::invalid(
                    "n",
                    format!("`n` is {n}; this server generates one choice per request (n = 1)"),
                ))
            }
        }
        let temperature = in_range("temperature", self.temperature, 0.0, 2.0, false)?;
        let top_p = in_range("top_p", self.top_p, 0.0, 1.0, true)?;
        let min_p = in_range("min_p", self.min_p, 0.0, 1.0, false)?;
        let presence = in_range("presence_penalty", self.presence_penalty, -2.0, 2.0, false)?;
        let frequency = in_range(
            "frequency_penalty",
            self.frequency_penalty,
            -2.0,
            2.0,
            false,
        )?;
        let repetition = in_range(
            "repetition_penalty",
            self.repetition_penalty,
            0.0,
            10.0,
            true,
        )?;
        let vocab = engine.model.config.vocab_size;
        let top_k = match self.top_k {
            None => None,
            Some(k) if k == -1 || k == 0 => Some(0),
            Some(k) if k > 0 && k <= vocab as i64 => Some(k as usize),
            Some(k) => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("`top_k` is {k}; it must be -1 or 0 (off) or 1 to {vocab}"),
                ))
            }
        };
        let max_tokens = match self.max_tokens {
            None => None,
            Some((m, name)) if m >= 1 => Some((usize::try_from(m).unwrap_or(usize::MAX), name)),
            Some((m, name)) => {
                return Err(ApiError::invalid(
                    name,
                    format!("`{name}` is {m}; it must be at least 1"),
                ))
            }
        };
        let stop = match self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOP_STRINGS {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "`stop` has {} strings; at most {MAX_STOP_STRINGS} are accepted",
                    stop.len()
                ),
            ));
        }
        let mut logit_bias = vec![];
        for (key, &bias) in self.logit_bias.into_iter().flatten() {
            let id = key.parse::<u32>().ok().filter(|&id| (id as usize) < vocab);
            let Some(id) = id else {
                return Err(ApiError::invalid(
                    "logit_bias",
                    format!("`logit_bias` key {key:?} is not a token id below {vocab}"),
                ));
            };
            let bias = in_range("logit_bias", Some(bias), -100.0, 100.0, false)?.unwrap_or(0.0);
            logit_bias.push((id, bias));
        }
        let params = SamplingParams {
            temperature: temperature.unwrap_or(d.temperature),
            top_k: top_k.unwrap_or(d.top_k),
            top_p: top_p.unwrap_or(d.top_p),
            min_p: min_p.unwrap_or(d.min_p),
            repetition_penalty: repetition.unwrap_or(d.repetition_penalty),
            seed: self.seed.map_or_else(fresh_u64, |s| s as u64),
        };
        Ok(Sampling {
            params,
            adjustments: LogitAdjustments {
                presence_penalty: presence.unwrap_or(0.0),
                frequency_penalty: frequency.unwrap_or(0.0),
                logit_bias,
            },
            stop,
            max_tokens,
        })
    }
}

/// Checks `model` against the served name.
pub fn check_model(model: Option<&str>, served: &str) -> Result<(), ApiError> {
    match model {
        None => Err(ApiError::invalid("model", "`model` is required")),
        Some(m) if m == served => Ok(()),
        Some(m) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("the model `{m}` does not exist; this server serves `{served}`"),
        )
        .with_param("model")
        .with_code("model_not_found")),
    }
}

/// Tokens to generate: what was asked, within the context; or all that fits.
pub fn generation_budget(
    prompt_tokens: usize,
    asked: Option<(usize, &'static str)>,
    ctx: usize,
    prompt_param: &str,
) -> Result<usize, ApiError> {
    if prompt_tokens >= ctx {
        return Err(ApiError::invalid(
            prompt_param,
            format!(
                "the prompt has {prompt_tokens} tokens; the context is {ctx} tokens \
                 (prompt and completion together), so at most {} prompt tokens fit",
                ctx - 1
            ),
        )
        .with_code("context_length_exceeded"));
    }
    match asked {
        None => Ok(ctx - prompt_tokens),
        Some((m, name)) if prompt_tokens.saturating_add(m) <= ctx => {
            let _ = name;
            Ok(m)
        }
        Some((m, name)) => Err(ApiError::invalid(
            name,
            format!(
                "the context is {ctx} tokens; the prompt has {prompt_tokens} tokens and \
                 `{name}` asks for {m} more; lower `{name}` to at most {}",
                ctx - prompt_tokens
            ),
        )
        .with_code("context_length_exceeded")),
    }
}

/// Messages in the shape chat templates expect: text content as a string (content parts
/// joined), `developer` as `system`.
pub fn template_messages(messages: &[Value]) -> Result<Vec<Value>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` is empty"));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let param = format!("messages[{i}]");
        let Some(obj) = m.as_object() else {
            return Err(ApiError::invalid(
                param,
                format!("messages[{i}] is not an object"),
            ));
        };
        let role = match obj.get("role").and_then(Value::as_str) {
            Some("developer") => "system",
            Some(r @ ("system" | "user" | "assistant" | "tool")) => r,
            Some(r) => {
                return Err(ApiError::invalid(
                    format!("{param}.role"),
                    format!("messages[{i}].role is {r:?}; expected system, developer, user, assistant or tool"),
                ))
            }
            None => {
                return Err(ApiError::invalid(
                    format!("{param}.role"),
                    format!("messages[{i}].role is missing or not a string"),
                ))
            }
        };
        let content = match obj.get("content") {
            None | Some(Value::Null) if role == "assistant" => Value::Null,
            None | Some(Value::Null) => {
                return Err(ApiError::invalid(
                    format!("{param}.content"),
                    format!("messages[{i}].content is missing"),
                ))
            }
            Some(Value::String(s)) => Value::String(s.clone()),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::invalid(
                                format!("{param}.content[{j}]"),
                                format!("messages[{i}].content[{j}]: only {{\"type\": \"text\", \"text\": ...}} parts are supported"),
                            ))
                        }
                    }
                }
                Value::String(text)
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    format!("{param}.content"),
                    format!("messages[{i}].content must be a string or an array of text parts"),
                ))
            }
        };
        let mut msg = obj.clone();
        msg.insert("role".into(), Value::String(role.into()));
        msg.insert("content".into(), content);
        out.push(Value::Object(msg));
    }
    Ok(out)
}

/// Checks `tools` and `tool_choice`; returns the tools to render (none for `tool_choice: "none"`).
pub fn check_tools(
    tools: Option<&[Value]>,
    choice: Option<&Value>,
) -> Result<Vec<Value>, ApiError> {
    let tools = tools.unwrap_or(&[]);
    for (i, t) in tools.iter().enumerate() {
        let ok = t.get("type").and_then(Value::as_str) == Some("function")
            && t.pointer("/function/name")
                .and_then(Value::as_str)
                .is_some();
        if !ok {
            return Err(ApiError::invalid(
                format!("tools[{i}]"),
                format!("tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., \"parameters\": ...}}}}"),
            ));
        }
    }
    match choice {
        None | Some(Value::Null) => Ok(tools.to_vec()),
        Some(Value::String(s)) if s == "auto" => Ok(tools.to_vec()),
        Some(Value::String(s)) if s == "none" => Ok(vec![]),
        Some(other) => Err(ApiError::invalid(
            "tool_choice",
            format!("`tool_choice` {other} is not supported: use \"auto\" or \"none\" (the model decides whether to call a tool)"),
        )),
    }
}

/// `logprob` as JSON: finite (OpenAI writes -9999.0 for an impossible token).
pub fn logprob_json(lp: f32) -> Value {
    Value::from(if lp.is_finite() { lp as f64 } else { -9999.0 })
}
