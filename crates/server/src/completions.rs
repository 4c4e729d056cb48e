//! The generation endpoints, `POST /v1/chat/completions` and `POST /v1/completions`: a request
//! is parsed and checked (`protocol`), its prompt rendered and tokenized on tokio's blocking pool,
//! queued for the engine (`routes::submit`), and its events turned into one JSON response, or
//! handed to `streaming` for SSE.
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use moestream_engine::generate::FinishReason;
use moestream_engine::text::TextError;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::output::{Delta, OutputParser};
use crate::protocol::{self, ChatRequest, CompletionRequest, SamplingFields};
use crate::routes::{json_body, new_job, ready_engine, submit};
use crate::streaming;
use crate::worker::{Event, TokenLogprob, TokenText};
use crate::{Engine, Shared};

/// What a finished non-streamed generation produced.
struct Collected {
    text: String,
    logprobs: Vec<TokenLogprob>,
    reason: FinishReason,
    prompt_tokens: usize,
    completion_tokens: usize,
}

async fn collect(mut rx: mpsc::UnboundedReceiver<Event>) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut logprobs = vec![];
    while let Some(event) = rx.recv().await {
        match event {
            Event::Token { text: t, logprob } => {
                text.push_str(&t);
                logprobs.extend(logprob);
            }
            Event::Done {
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                return Ok(Collected {
                    text,
                    logprobs,
                    reason,
                    prompt_tokens,
                    completion_tokens,
                })
            }
            Event::Failed(message) => return Err(ApiError::internal(message)),
            Event::ShutDown => return Err(ApiError::shutting_down()),
        }
    }
    Err(ApiError::internal(
        "the engine stopped before the generation finished",
    ))
}

pub(crate) fn finish_reason(reason: FinishReason, tool_calls: bool) -> &'static str {
    match reason {
        _ if tool_calls => "tool_calls",
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "abort",
    }
}

pub(crate) fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// A chat logprobs entry.
pub(crate) fn chat_logprob(lp: &TokenLogprob) -> Value {
    let one = |t: &TokenText, l: f32| json!({"token": t.text, "logprob": protocol::logprob_json(l), "bytes": t.bytes});
    let mut v = one(&lp.token, lp.logprob);
    v["top_logprobs"] = Value::Array(lp.top.iter().map(|(t, l)| one(t, *l)).collect());
    v
}

/// Legacy completions logprobs: parallel arrays.
pub(crate) fn completion_logprobs(lps: &[TokenLogprob], start_offset: usize) -> Value {
    let mut offset = start_offset;
    let mut offsets = vec![];
    for lp in lps {
        offsets.push(offset);
        offset += lp.token.text.len();
    }
    json!({
        "tokens": lps.iter().map(|l| l.token.text.clone()).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|l| protocol::logprob_json(l.logprob)).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|l| {
            Value::Object(l.top.iter().map(|(t, p)| (t.text.clone(), protocol::logprob_json(*p))).collect::<Map<_, _>>())
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

pub(crate) fn tool_calls_json(calls: &[crate::output::ToolCall], first_index: usize) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({"index": first_index + i, "id": protocol::new_id("call"), "type": "function",
                   "function": {"name": c.name, "arguments": c.arguments}})
        })
        .collect()
}

/// How to split a chat reply (see [`OutputParser::new`]).
#[derive(Clone, Copy)]
pub(crate) struct ParserSetup {
    pub reasoning: bool,
    pub in_reasoning: bool,
    pub tools: bool,
}

impl ParserSetup {
    pub fn parser(self) -> OutputParser {
        OutputParser::new(self.reasoning, self.in_reasoning, self.tools)
    }
}

pub(crate) async fn chat(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let arrived = Instant::now();
    chat_response(&shared, &headers, body, arrived)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

fn render_error(e: TextError) -> ApiError {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    ApiError::invalid("messages", msg)
}

async fn chat_response(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
    body: Body,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let engine = ready_engine(shared)?;
    let bytes = json_body(shared, headers, body).await?;
    let req: ChatRequest = protocol::parse_body(&bytes)?;
    protocol::check_model(req.model.as_deref(), &shared.options.served_model_name)?;
    let speculate = req.speculative.unwrap_or(true);
    let messages = req
        .messages
        .as_deref()
        .ok_or_else(|| ApiError::invalid("messages", "`messages` is required"))?;
    let messages = protocol::template_messages(messages)?;
    let tools = protocol::check_tools(req.tools.as_deref(), req.tool_choice.as_ref())?;
    let max_tokens = match (req.max_completion_tokens, req.max_tokens) {
        (Some(m), _) => Some((m, "max_completion_tokens")),
        (None, Some(m)) => Some((m, "max_tokens")),
        (None, None) => None,
    };
    let sampling = SamplingFields {
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        min_p: req.min_p,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        repetition_penalty: req.repetition_penalty,
        seed: req.seed,
        n: req.n,
        stop: req.stop.as_ref(),
        logit_bias: req.logit_bias.as_ref(),
        max_tokens,
    }
    .check(&engine)?;
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (true, None) => Some(0),
        (true, Some(n)) if (0..=protocol::MAX_TOP_LOGPROBS).contains(&n) => Some(n as usize),
        (true, Some(n)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!(
                    "`top_logprobs` is {n}; it must be in [0, {}]",
                    protocol::MAX_TOP_LOGPROBS
                ),
            ))
        }
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`",
            ))
        }
        (false, None) => None,
    };
    let stream = req.stream.unwrap_or(false);
    if req.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "`stream_options` is only allowed with `stream: true`",
        ));
    }
    let include_usage = protocol::StreamOptions::include_usage(req.stream_options.as_ref());
    let mut extra = req.chat_template_kwargs.clone().unwrap_or_default();
    if !tools.is_empty() {
        extra.insert("tools".into(), Value::Array(tools.clone()));
    }
    let rendering = engine.clone();
    let (prompt, prompt_text) =
        tokio::task::spawn_blocking(move || -> Result<(Vec<u32>, String), ApiError> {
            let template = rendering.template.as_ref().ok_or_else(|| {
                ApiError::bad_request("this model has no chat template; use /v1/completions")
            })?;
            let text = template
                .render(&Value::Array(messages), true, &extra)
                .map_err(render_error)?;
            let ids = rendering
                .tokenizer
                .encode(&text, false)
                .map_err(|e| ApiError::internal(e.to_string()))?;
            Ok((ids, text))
        })
        .await
        .map_err(|e| ApiError::internal(format!("prompt rendering failed: {e}")))??;
    let max_tokens = protocol::generation_budget(
        prompt.len(),
        sampling.max_tokens,
        engine.ctx_size,
        "messages",
    )?;
    let template_source = engine.template.as_ref().map_or("", |t| t.source());
    let setup = ParserSetup {
        reasoning: template_source.contains("</think>"),
        in_reasoning: prompt_text.trim_end().ends_with("<think>"),
        tools: !tools.is_empty(),
    };
    let rx = submit(
        shared,
        new_job(prompt, max_tokens, sampling, logprobs, arrived, speculate),
    )?;
    let meta = streaming::ResponseMeta::new("chatcmpl", &shared.options.served_model_name);
    if stream {
        return Ok(streaming::chat(
            meta,
            rx,
            setup,
            include_usage,
            logprobs.is_some(),
        ));
    }
    let c = collect(rx).await?;
    let Delta {
        reasoning,
        content,
        tool_calls,
    } = setup.parser().parse_all(&c.text);
    let mut message = json!({"role": "assistant"});
    message["content"] = if tool_calls.is_empty() {
        Value::String(content)
    } else if content.trim().is_empty() {
        Value::Null
    } else {
        Value::String(content.trim().to_owned())
    };
    if setup.reasoning && !reasoning.is_empty() {
        message["reasoning_content"] = Value::String(reasoning);
    }
    if !tool_calls.is_empty() {
        message["tool_calls"] = Value::Array(tool_calls_json(&tool_calls, 0));
    }
    let logprobs = logprobs
        .map(|_| json!({"content": c.logprobs.iter().map(chat_logprob).collect::<Vec<_>>()}));
    Ok(Json(json!({
        "id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
        "choices": [{"index": 0, "message": message, "logprobs": logprobs,
                     "finish_reason": finish_reason(c.reason, !tool_calls.is_empty())}],
        "usage": usage(c.prompt_tokens, c.completion_tokens),
    }))
    .into_response())
}

pub(crate) async fn completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let arrived = Instant::now();
    completion_response(&shared, &headers, body, arrived)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// `prompt`: a string, token ids, or a list holding one of either.
fn completion_prompt(prompt: Option<&Value>, engine: &Engine) -> Result<Vec<u32>, ApiError> {
    let bad = || {
        ApiError::invalid(
            "prompt",
            "`prompt` must be a string or an array of token ids (one prompt per request)",
        )
    };
    let ids = match prompt {
        None => return Err(ApiError::invalid("prompt", "`prompt` is required")),
        Some(Value::String(s)) => engine
            .tokenizer
            .encode(s, true)
            .map_err(|e| ApiError::internal(e.to_string()))?,
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => engine
                .tokenizer
                .encode(s, true)
                .map_err(|e| ApiError::internal(e.to_string()))?,
            [Value::Array(ids)] => token_ids(ids).ok_or_else(bad)?,
            ids if !ids.is_empty() && ids.iter().all(Value::is_number) => {
                token_ids(ids).ok_or_else(bad)?
            }
            _ => return Err(bad()),
        },
        Some(_) => return Err(bad()),
    };
    if ids.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    engine
        .model
        .check_tokens(&ids)
        .map_err(|e| ApiError::invalid("prompt", e))?;
    Ok(ids)
}

fn token_ids(items: &[Value]) -> Option<Vec<u32>> {
    items
        .iter()
        .map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()))
        .collect()
}

async fn completion_response(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
    body: Body,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let engine = ready_engine(shared)?;
    let bytes = json_body(shared, headers, body).await?;
    let req: CompletionRequest = protocol::parse_body(&bytes)?;
    let speculate = req.speculative.unwrap_or(true);
    protocol::check_model(req.model.as_deref(), &shared.options.served_model_name)?;
    if req.echo == Some(true) {
        return Err(ApiError::invalid("echo", "`echo: true` is not supported"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "`suffix` is not supported"));
    }
    if req.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::invalid("best_of", "`best_of` must be 1"));
    }
    let sampling = SamplingFields {
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        min_p: req.min_p,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        repetition_penalty: req.repetition_penalty,
        seed: req.seed,
        n: req.n,
        stop: req.stop.as_ref(),
        logit_bias: req.logit_bias.as_ref(),
        // OpenAI's default for this endpoint.
        max_tokens: Some((req.max_tokens.unwrap_or(16), "max_tokens")),
    }
    .check(&engine)?;
    let logprobs = match req.logprobs {
        None => None,
        Some(n) if (0..=protocol::MAX_TOP_LOGPROBS).contains(&n) => Some(n as usize),
        Some(n) => {
            return Err(ApiError::invalid(
                "logprobs",
                format!(
                    "`logprobs` is {n}; it must be in [0, {}]",
                    protocol::MAX_TOP_LOGPROBS
                ),
            ))
        }
    };
    let stream = req.stream.unwrap_or(false);
    if req.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "`stream_options` is only allowed with `stream: true`",
        ));
    }
    let include_usage = protocol::StreamOptions::include_usage(req.stream_options.as_ref());
    let tokenizing = engine.clone();
    let prompt_value = req.prompt.clone();
    let prompt =
        tokio::task::spawn_blocking(move || completion_prompt(prompt_value.as_ref(), &tokenizing))
            .await
            .map_err(|e| ApiError::internal(format!("tokenizing failed: {e}")))??;
    // An explicit max_tokens that does not fit is an error; the default of 16 is cut to fit.
    let asked = match (req.max_tokens, sampling.max_tokens) {
        (None, Some((m, n))) => Some((
            m.min(engine.ctx_size.saturating_sub(prompt.len()).max(1)),
            n,
        )),
        (_, asked) => asked,
    };
    let max_tokens = protocol::generation_budget(prompt.len(), asked, engine.ctx_size, "prompt")?;
    let rx = submit(
        shared,
        new_job(prompt, max_tokens, sampling, logprobs, arrived, speculate),
    )?;
    let meta = streaming::ResponseMeta::new("cmpl", &shared.options.served_model_name);
    if stream {
        return Ok(streaming::completion(
            meta,
            rx,
            include_usage,
            logprobs.is_some(),
        ));
    }
    let c = collect(rx).await?;
    let logprobs = logprobs.map(|_| completion_logprobs(&c.logprobs, 0));
    Ok(Json(json!({
        "id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
        "choices": [{"index": 0, "text": c.text, "logprobs": logprobs, "finish_reason": finish_reason(c.reason, false)}],
        "usage": usage(c.prompt_tokens, c.completion_tokens),
    }))
    .into_response())
}
