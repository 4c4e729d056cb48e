//! Server-sent events for `stream: true`, as OpenAI sends them: every chunk carries the same `id`;
//! chat starts with a role chunk, then content (or reasoning, or tool call) deltas, then a chunk
//! with `finish_reason`, then, with `stream_options.include_usage`, a chunk with empty `choices`
//! and the token counts; then `data: [DONE]`. An engine failure mid-stream is sent as an
//! `{"error": ...}` event, which the `openai` client raises as an `APIError`.
//!
//! The response body owns the job's event receiver: when the client goes away, hyper drops the
//! body, the receiver with it, and the engine cancels the generation before its next token.
use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::completions::{
    chat_logprob, completion_logprobs, finish_reason, tool_calls_json, usage, ParserSetup,
};
use crate::error::ApiError;
use crate::output::{Delta, OutputParser};
use crate::worker::{Event, TokenLogprob};

/// The fields every chunk of a response repeats.
pub(crate) struct ResponseMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl ResponseMeta {
    /// A new response of the served `model`: a fresh id with `prefix` (`chatcmpl`, `cmpl`), now.
    pub fn new(prefix: &str, model: &str) -> ResponseMeta {
        ResponseMeta {
            id: crate::protocol::new_id(prefix),
            created: crate::protocol::unix_time(),
            model: model.to_owned(),
        }
    }
}

/// Which endpoint's chunks to write.
enum Shape {
    Chat {
        parser: OutputParser,
        tool_calls: usize,
        reasoning: bool,
    },
    Completion {
        text_offset: usize,
    },
}

struct StreamState {
    meta: ResponseMeta,
    rx: mpsc::UnboundedReceiver<Event>,
    shape: Shape,
    include_usage: bool,
    logprobs: bool,
    out: VecDeque<SseEvent>,
    ended: bool,
}

pub(crate) fn chat(
    meta: ResponseMeta,
    rx: mpsc::UnboundedReceiver<Event>,
    setup: ParserSetup,
    include_usage: bool,
    logprobs: bool,
) -> Response {
    let mut state = StreamState {
        meta,
        rx,
        shape: Shape::Chat {
            parser: setup.parser(),
            tool_calls: 0,
            reasoning: setup.reasoning,
        },
        include_usage,
        logprobs,
        out: VecDeque::new(),
        ended: false,
    };
    let role = json!({"role": "assistant", "content": ""});
    state.push_chat(role, None, None);
    respond(state)
}

pub(crate) fn completion(
    meta: ResponseMeta,
    rx: mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
    logprobs: bool,
) -> Response {
    respond(StreamState {
        meta,
        rx,
        shape: Shape::Completion { text_offset: 0 },
        include_usage,
        logprobs,
        out: VecDeque::new(),
        ended: false,
    })
}

fn respond(state: StreamState) -> Response {
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(ev) = st.out.pop_front() {
                return Some((Ok::<_, Infallible>(ev), st));
            }
            if st.ended {
                return None;
            }
            match st.rx.recv().await {
                Some(event) => st.handle(event),
                None => {
                    let e = ApiError::internal("the engine stopped before the generation finished");
                    st.out
                        .push_back(SseEvent::default().data(e.body().to_string()));
                    st.out.push_back(SseEvent::default().data("[DONE]"));
                    st.ended = true;
                }
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

impl StreamState {
    fn chunk_base(&self, object: &str) -> Value {
        let mut v = json!({"id": self.meta.id, "object": object, "created": self.meta.created, "model": self.meta.model});
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    fn push_chat(&mut self, delta: Value, logprobs: Option<Value>, finish: Option<&str>) {
        let mut v = self.chunk_base("chat.completion.chunk");
        v["choices"] =
            json!([{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]);
        self.out.push_back(SseEvent::default().data(v.to_string()));
    }

    fn push_completion(&mut self, text: &str, logprobs: Option<Value>, finish: Option<&str>) {
        let mut v = self.chunk_base("text_completion");
        v["choices"] =
            json!([{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]);
        self.out.push_back(SseEvent::default().data(v.to_string()));
    }

    /// A chat delta object, or None when it adds nothing.
    fn chat_delta(&mut self, d: Delta) -> Option<Value> {
        let Shape::Chat {
            tool_calls,
            reasoning,
            ..
        } = &mut self.shape
        else {
            return None;
        };
        if d.is_empty() {
            return None;
        }
        let mut delta = json!({});
        if !d.content.is_empty() {
            delta["content"] = Value::String(d.content);
        }
        if *reasoning && !d.reasoning.is_empty() {
            delta["reasoning_content"] = Value::String(d.reasoning);
        }
        if !d.tool_calls.is_empty() {
            delta["tool_calls"] = Value::Array(tool_calls_json(&d.tool_calls, *tool_calls));
            *tool_calls += d.tool_calls.len();
        }
        Some(delta)
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Token { text, logprob } => self.token(&text, logprob),
            Event::Done {
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                let calls = match &mut self.shape {
                    Shape::Chat {
                        parser, tool_calls, ..
                    } => {
                        let rest = parser.finish();
                        let had = *tool_calls > 0 || !rest.tool_calls.is_empty();
                        if let Some(delta) = self.chat_delta(rest) {
                            self.push_chat(delta, None, None);
                        }
                        had
                    }
                    Shape::Completion { .. } => false,
                };
                let finish = finish_reason(reason, calls);
                match self.shape {
                    Shape::Chat { .. } => self.push_chat(json!({}), None, Some(finish)),
                    Shape::Completion { .. } => self.push_completion("", None, Some(finish)),
                }
                if self.include_usage {
                    let object = match self.shape {
                        Shape::Chat { .. } => "chat.completion.chunk",
                        Shape::Completion { .. } => "text_completion",
                    };
                    let mut v = self.chunk_base(object);
                    v["choices"] = json!([]);
                    v["usage"] = usage(prompt_tokens, completion_tokens);
                    self.out.push_back(SseEvent::default().data(v.to_string()));
                }
                self.out.push_back(SseEvent::default().data("[DONE]"));
                self.ended = true;
            }
            Event::Failed(_) | Event::ShutDown => {
                let e = match event {
                    Event::Failed(message) => ApiError::internal(message),
                    _ => ApiError::shutting_down(),
                };
                self.out
                    .push_back(SseEvent::default().data(e.body().to_string()));
                self.out.push_back(SseEvent::default().data("[DONE]"));
                self.ended = true;
            }
        }
    }

    fn token(&mut self, text: &str, logprob: Option<TokenLogprob>) {
        let lps: Vec<TokenLogprob> = logprob.into_iter().filter(|_| self.logprobs).collect();
        match &mut self.shape {
            Shape::Chat { parser, .. } => {
                let d = parser.push(text);
                let logprobs = (!lps.is_empty())
                    .then(|| json!({"content": lps.iter().map(chat_logprob).collect::<Vec<_>>()}));
                match self.chat_delta(d) {
                    Some(delta) => self.push_chat(delta, logprobs, None),
                    // Held back (a tag prefix): the logprobs still go out, with an empty delta.
                    None if logprobs.is_some() => self.push_chat(json!({}), logprobs, None),
                    None => {}
                }
            }
            Shape::Completion { text_offset } => {
                let offset = *text_offset;
                *text_offset += lps.iter().map(|l| l.token.text.len()).sum::<usize>();
                let logprobs = (!lps.is_empty()).then(|| completion_logprobs(&lps, offset));
                if !text.is_empty() || logprobs.is_some() {
                    self.push_completion(text, logprobs, None);
                }
            }
        }
    }
}
