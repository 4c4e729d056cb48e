//! The HTTP surface: routes, the API-key check, request counting, the informational endpoints
//! (`/health`, `/v1/models`, `/metrics`), and the generation handlers' common path (body size
//! and type, engine readiness, the queue). The generation endpoints themselves are in
//! `completions`, their streamed form in `streaming`.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::completions;
use crate::error::ApiError;
use crate::metrics::EngineSnapshot;
use crate::protocol;
use crate::worker::{Event, Job};
use crate::{Engine, Shared};

/// Endpoints, as labelled in `/metrics`.
const ENDPOINTS: [&str; 6] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/health",
    "/metrics",
    "/v1/models/{model}",
];

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(completions::chat))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{model}", get(model))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(shared.clone(), require_key))
        .layer(middleware::from_fn_with_state(shared.clone(), count))
        .with_state(shared)
}

async fn count(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let endpoint = if path.starts_with("/v1/models/") {
        "/v1/models/{model}"
    } else {
        ENDPOINTS
            .iter()
            .find(|e| **e == path)
            .copied()
            .unwrap_or("other")
    };
    let response = next.run(req).await;
    shared.metrics.request(endpoint, response.status().as_u16());
    response
}

/// Compares in time that depends on the lengths only, not on where the bytes differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
        diff |= u64::from(std::hint::black_box(x));
    }
    diff == 0
}

async fn require_key(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let Some(key) = shared.options.api_key.as_deref() else {
        return next.run(req).await;
    };
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if same_secret(g.trim().as_bytes(), key.as_bytes()) => next.run(req).await,
        Some(_) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "the API key is not valid",
        )
        .with_code("invalid_api_key")
        .into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "an API key is required: send `Authorization: Bearer KEY`",
        )
        .with_code("missing_api_key")
        .into_response(),
    }
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("no such endpoint: {} {}", req.method(), req.uri().path()),
    )
    .with_code("unknown_url")
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

fn resident_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

async fn health(State(shared): State<Arc<Shared>>) -> Response {
    let Some(engine) = shared.engine.get() else {
        let body = json!({"status": "loading", "memory": {"resident_bytes": resident_bytes()}});
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    };
    let stats = engine.model.experts.stats();
    let streamed = engine.model.experts.is_streamed();
    let disk = moestream_engine::store::disk_read_bytes();
    // What the page cache served of the expert bytes read: reads that did not reach the disk.
    let page_cache_hit_rate = match disk {
        Some(d) if streamed && stats.bytes_read > 0 => {
            Some((1.0 - d as f64 / stats.bytes_read as f64).clamp(0.0, 1.0))
        }
        _ => None,
    };
    let expert_cache_hit_rate = (streamed && stats.experts_needed > 0)
        .then(|| stats.slot_hits as f64 / stats.experts_needed as f64);
    let status = if shared.draining.load(Ordering::Relaxed) {
        "draining"
    } else {
        "ready"
    };
    Json(json!({
        "status": status,
        "model": shared.options.served_model_name,
        "memory": {
            "resident_bytes": resident_bytes(),
            "model_bytes": engine.weight_bytes.total,
            "expert_bytes": engine.weight_bytes.experts,
            "expert_buffer_bytes": engine.model.experts.memory().slot_bytes,
            "streaming_experts": streamed,
            "page_cache_hit_rate": page_cache_hit_rate,
            "expert_cache_hit_rate": expert_cache_hit_rate,
            "prefetch_hit_rate": stats.prefetch_hit_rate(),
            "disk_read_bytes": disk,
        },
        "queue_depth": shared.metrics.queue_depth.load(Ordering::Relaxed),
        "active_sequences": shared.metrics.active_sequences.load(Ordering::Relaxed),
        "context_tokens": engine.ctx_size,
    }))
    .into_response()
}

fn model_card(shared: &Shared) -> Value {
    json!({"id": shared.options.served_model_name, "object": "model",
           "created": shared.started, "owned_by": "moestream"})
}

async fn models(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_card(&shared)]}))
}

async fn model(
    State(shared): State<Arc<Shared>>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    protocol::check_model(Some(&name), &shared.options.served_model_name)?;
    Ok(Json(model_card(&shared)))
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let snapshot = match shared.engine.get() {
        Some(e) => EngineSnapshot {
            store: e.model.experts.stats(),
            streamed: e.model.experts.is_streamed(),
            disk_read_bytes: moestream_engine::store::disk_read_bytes(),
            resident_bytes: resident_bytes(),
        },
        None => EngineSnapshot {
            store: Default::default(),
            streamed: false,
            disk_read_bytes: None,
            resident_bytes: resident_bytes(),
        },
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        shared.metrics.render(&snapshot),
    )
        .into_response()
}

/// The engine, or 503 while loading or shutting down.
pub(crate) fn ready_engine(shared: &Shared) -> Result<Arc<Engine>, ApiError> {
    if shared.draining.load(Ordering::Relaxed) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the server is shutting down",
        ));
    }
    shared.engine.get().cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the model is still loading; retry when GET /health says ok",
        )
        .with_code("model_loading")
    })
}

/// The body of a JSON request, within the size limit.
pub(crate) async fn json_body(
    shared: &Shared,
    headers: &HeaderMap,
    body: Body,
) -> Result<Vec<u8>, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim();
    if !media.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            format!("Content-Type is {content_type:?}; send application/json"),
        ));
    }
    let limit = shared.options.max_body_bytes;
    axum::body::to_bytes(body, limit)
        .await
        .map(|b| b.to_vec())
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("the request body is larger than {limit} bytes (or could not be read)"),
            )
            .with_code("request_too_large")
        })
}

/// Puts a job on the engine's queue.
pub(crate) fn submit(
    shared: &Shared,
    mut job: Job,
) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
    let (tx, rx) = mpsc::unbounded_channel();
    job.events = tx;
    let queue = shared
        .jobs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the engine is not running",
            )
        })?;
    shared.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
    queue.try_send(job).map_err(|e| {
        shared.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
        match e {
            mpsc::error::TrySendError::Full(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                format!(
                    "the server is busy: {} requests are already waiting; retry later",
                    shared.options.max_queue
                ),
            )
            .with_code("queue_full"),
            mpsc::error::TrySendError::Closed(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the engine has stopped",
            ),
        }
    })?;
    Ok(rx)
}

pub(crate) fn new_job(
    prompt: Vec<u32>,
    max_tokens: usize,
    s: protocol::Sampling,
    logprobs: Option<usize>,
    arrived: Instant,
    speculate: bool,
) -> Job {
    let (events, _) = mpsc::unbounded_channel();
    Job {
        speculate,
        prompt,
        max_tokens,
        sampling: s.params,
        adjustments: s.adjustments,
        stop: s.stop,
        logprobs,
        arrived,
        events,
    }
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn secrets_compare_exactly() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
        assert!(!same_secret(b"", b"a"));
        assert!(same_secret(b"", b""));
    }
}
