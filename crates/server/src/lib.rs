//! An OpenAI-compatible HTTP server over the moestream engine: `POST /v1/chat/completions`,
//! `POST /v1/completions`, `GET /v1/models`, `GET /health`, `GET /metrics`.
//!
//! Threads: axum handlers run on a tokio runtime; one engine thread ([`worker::Worker`]) owns the
//! sequences and runs every forward pass. Handlers validate a request, render and tokenize its
//! prompt (on tokio's blocking pool: a long prompt must not stall other connections), and put a
//! [`worker::Job`] on a bounded queue; a full queue is answered at once with 503. The engine sends
//! tokens back on a channel per request and never waits for a client. A dropped receiver (client
//! gone) cancels the generation before its next token.
//!
//! The model loads after the port is bound, so `/health` can say `loading`; until then the
//! generation endpoints answer 503 and `/health` says `ready` once it has loaded.
//!
//! ```no_run
//! use moestream_server::{serve, Engine, ServerOptions};
//! # fn load() -> Result<Engine, Box<dyn std::error::Error + Send + Sync>> { unimplemented!() }
//! serve(ServerOptions::default(), load).unwrap();
//! ```
#![deny(missing_docs)]

mod completions;
pub mod error;
pub mod metrics;
pub mod output;
mod protocol;
mod routes;
mod streaming;
mod token_bytes;
pub mod worker;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use moestream_engine::generate::SamplingParams;
use moestream_engine::models::Model;
use moestream_engine::text::{ChatTemplate, Tokenizer};
use tokio::sync::mpsc;

pub use error::{ApiError, ServerError};
use metrics::Metrics;
use worker::{Job, Worker};

/// A loaded model and what serving it needs.
pub struct Engine {
    /// The model.
    pub model: Model,
    /// Its tokenizer (the server works on text).
    pub tokenizer: Tokenizer,
    /// Its chat template; without one only `/v1/completions` works.
    pub template: Option<ChatTemplate>,
    /// Token ids that end generation.
    pub eos_token_ids: Vec<u32>,
    /// Most tokens of a sequence, prompt and generation together.
    pub ctx_size: usize,
    /// Sampling settings a request does not set (temperature, top-k, top-p, min-p, repetition
    /// penalty; the seed is per request).
    pub defaults: SamplingParams,
    /// Bytes of all weights, and of the expert weights among them.
    pub weight_bytes: WeightBytes,
    /// For tests of the tool-call and reasoning paths on random-weight models: token sequences
    /// emitted, one per request in turn, instead of sampled ones. Empty in normal use.
    pub scripted_replies: Vec<Vec<u32>>,
    /// Speculative decoding for every sequence, when set.
    pub speculation: Option<SpeculationConfig>,
}

/// How sequences speculate.
#[derive(Clone)]
pub struct SpeculationConfig {
    /// Where proposals come from (a draft model is shared by all sequences; each has its own
    /// draft cache).
    pub proposer: moestream_engine::speculative::Proposer,
    /// Most tokens proposed per round.
    pub max_draft: usize,
    /// Always propose `max_draft` tokens.
    pub fixed: bool,
}

/// Sizes of a model's weights.
#[derive(Clone, Copy, Debug, Default)]
pub struct WeightBytes {
    /// All weights.
    pub total: u64,
    /// Expert weights (streamed from disk when streaming is on).
    pub experts: u64,
}

/// How the server listens and admits requests.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Address to bind (127.0.0.1 unless told otherwise).
    pub host: String,
    /// Port (0: any free port; the chosen one is printed).
    pub port: u16,
    /// Bearer key every endpoint but `/health` requires, if set.
    pub api_key: Option<String>,
    /// The model name clients use (`model` field, `/v1/models`).
    pub served_model_name: String,
    /// Sequences the engine interleaves at most.
    pub max_concurrent: usize,
    /// Requests that may wait for the engine; more get 503.
    pub max_queue: usize,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// After SIGINT/SIGTERM, how long in-flight requests may run before they are cancelled.
    pub shutdown_grace: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: None,
            served_model_name: "moestream".into(),
            max_concurrent: 4,
            max_queue: 64,
            max_body_bytes: 4 << 20,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Boxed error of a model loader.
pub type LoadError = Box<dyn std::error::Error + Send + Sync>;

/// What handlers share.
struct Shared {
    options: ServerOptions,
    metrics: Arc<Metrics>,
    engine: OnceLock<Arc<Engine>>,
    /// The engine's queue, taken away at shutdown so that the worker sees it close.
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    /// Set at SIGINT/SIGTERM: new requests are refused.
    draining: AtomicBool,
    /// Unix time the server started (the model's `created`).
    started: u64,
}

/// Binds, loads the model with `load` (on its own thread, `/health` saying `loading` meanwhile),
/// serves until SIGINT or SIGTERM, then drains: stops accepting, lets in-flight requests finish
/// for `shutdown_grace`, cancels the rest, and returns. A failed load ends the server with the
/// loader's error.
pub fn serve(
    options: ServerOptions,
    load: impl FnOnce() -> Result<Engine, LoadError> + Send + 'static,
) -> Result<(), ServerError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Prompt rendering and tokenizing run here: CPU work, a few threads are enough, and
        // each thread more is another allocator arena.
        .max_blocking_threads(4)
        .enable_all()
        .build()
        .map_err(|source| ServerError::Runtime {
            what: "cannot start the async runtime".into(),
            source,
        })?;
    runtime.block_on(serve_async(options, load))
}

async fn serve_async(
    options: ServerOptions,
    load: impl FnOnce() -> Result<Engine, LoadError> + Send + 'static,
) -> Result<(), ServerError> {
    let addr = format!("{}:{}", options.host, options.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| ServerError::Bind {
            addr: addr.clone(),
            source,
        })?;
    let local: SocketAddr = listener
        .local_addr()
        .map_err(|source| ServerError::Bind { addr, source })?;
    let shared = Arc::new(Shared {
        metrics: Arc::new(Metrics::default()),
        engine: OnceLock::new(),
        jobs: Mutex::new(None),
        draining: AtomicBool::new(false),
        started: protocol::unix_time(),
        options,
    });
    let cancel_all = Arc::new(AtomicBool::new(false));
    let (load_failed_tx, load_failed_rx) = tokio::sync::oneshot::channel::<String>();
    let load_error = Arc::new(Mutex::new(None::<String>));
    // Said before the loader starts, so that it always comes before "ready".
    say(&format!("listening on http://{local} (model loading)"));
    let worker = spawn_loader(shared.clone(), cancel_all.clone(), load, load_failed_tx)?;
    let app = routes::router(shared.clone());
    let drain = {
        let shared = shared.clone();
        let cancel_all = cancel_all.clone();
        let load_error = load_error.clone();
        async move {
            let reason = tokio::select! {
                s = shutdown_signal() => s,
                Ok(e) = load_failed_rx => {
                    let reason = format!("the model failed to load: {e}");
                    *load_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    reason
                }
            };
            say(&format!("{reason}; stopping"));
            shared.draining.store(true, Ordering::SeqCst);
            let grace = shared.options.shutdown_grace;
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                cancel_all.store(true, Ordering::SeqCst);
            });
        }
    };
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(drain)
        .await;
    // Let the worker see the queue close once the last handler is gone.
    let failed = shared.engine.get().is_none();
    shared.jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
    drop(shared);
    cancel_all.store(true, Ordering::SeqCst);
    if let Ok(Some(handle)) = worker.join() {
        let _ = handle.join();
    }
    served.map_err(|source| ServerError::Runtime {
        what: "serving failed".into(),
        source,
    })?;
    if failed {
        let message = load_error.lock().unwrap_or_else(|p| p.into_inner()).take();
        return Err(ServerError::Load(
            message.unwrap_or_else(|| "stopped before the model had loaded".into()),
        ));
    }
    say("stopped");
    Ok(())
}

/// Loads on a thread of its own, then becomes (hands over to) the engine worker thread.
fn spawn_loader(
    shared: Arc<Shared>,
    cancel_all: Arc<AtomicBool>,
    load: impl FnOnce() -> Result<Engine, LoadError> + Send + 'static,
    load_failed: tokio::sync::oneshot::Sender<String>,
) -> Result<std::thread::JoinHandle<Option<std::thread::JoinHandle<()>>>, ServerError> {
    std::thread::Builder::new()
        .name("moestream-load".into())
        .spawn(move || {
            let engine = match load() {
                Ok(e) => Arc::new(e),
                Err(e) => {
                    let _ = load_failed.send(format!("{e}"));
                    return None;
                }
            };
            let (tx, rx) = mpsc::channel(shared.options.max_queue.max(1));
            let worker = Worker {
                queue: rx,
                engine: engine.clone(),
                metrics: shared.metrics.clone(),
                cancel_all,
                max_concurrent: shared.options.max_concurrent,
            };
            let handle = std::thread::Builder::new()
                .name("moestream-engine".into())
                .spawn(move || worker.run());
            *shared.jobs.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
            let _ = shared.engine.set(engine);
            drop(shared);
            match handle {
                Ok(h) => {
                    say("model loaded; ready");
                    Some(h)
                }
                Err(e) => {
                    let _ = load_failed.send(format!("cannot start the engine thread: {e}"));
                    None
                }
            }
        })
        .map_err(ServerError::Worker)
}

/// A line on stderr; a closed stderr must not stop the server (`eprintln!` would panic).
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "moestream: {line}");
}

async fn shutdown_signal() -> String {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the server runs until killed.
        std::future::pending::<()>().await;
        return String::new();
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM".into(),
        _ = int.recv() => "SIGINT".into(),
    }
}
