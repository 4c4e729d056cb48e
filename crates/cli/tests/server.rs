//! `moestream serve` over real sockets: hostile and malformed requests (each answered with an
//! OpenAI-shaped 4xx, the server still serving afterwards), the API key, the context limit, the
//! bounded queue, greedy equivalence with `moestream run`, graceful shutdown; and the Python
//! drivers in scripts/server/ (the official `openai` client, the load test).
use crate::common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running `moestream serve` on a free loopback port; killed when dropped.
pub struct Server {
    child: Child,
    pub port: u16,
}

impl Server {
    pub fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(bin())
            .args(["serve", "--model", model.to_str().unwrap(), "--port", "0"])
            .args(extra)
            .env("MOESTREAM_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn moestream serve");
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let mut port = None;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(rest) = line.split("http://127.0.0.1:").nth(1) {
                port = rest.split_whitespace().next().and_then(|p| p.parse().ok());
            }
            if line.contains("ready") {
                break;
            }
            assert!(!line.contains("error"), "server failed: {line}");
        }
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            port: port.expect("the server prints its address"),
        }
    }

    /// Sends raw bytes, returns (status, body).
    pub fn raw(&self, request: &[u8]) -> (u16, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        // The server may answer (413) before reading a huge body; a write error is then fine.
        let _ = s.write_all(request);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
        let body = text.split_once("\r\n\r\n").map_or("", |x| x.1).to_owned();
        (status, dechunk(&body))
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[&str],
        body: &[u8],
    ) -> (u16, String) {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        )
        .into_bytes();
        for h in headers {
            req.extend_from_slice(h.as_bytes());
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"\r\n");
        req.extend_from_slice(body);
        self.raw(&req)
    }

    pub fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = self.request(
            "POST",
            path,
            &["Content-Type: application/json"],
            body.to_string().as_bytes(),
        );
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Undoes chunked transfer encoding if the body uses it.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            return body.to_owned();
        };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_owned();
        };
        if n == 0 || after.len() < n {
            return if n == 0 { out } else { body.to_owned() };
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
}

/// Label, method, path, headers, body.
type RawCase = (
    &'static str,
    &'static str,
    &'static str,
    Vec<&'static str>,
    Vec<u8>,
);

fn tiny(dir: &Path) -> PathBuf {
    synth(dir, "qwen3_moe", "hf-f32")
}

fn chat_body(content: &str, max_tokens: u64) -> Value {
    json!({"model": "qwen3_moe-hf-f32", "messages": [{"role": "user", "content": content}],
           "max_tokens": max_tokens, "temperature": 0})
}

/// Asserts OpenAI's error shape and a status in the 4xx range.
fn assert_api_error(label: &str, status: u16, body: &str) {
    assert!(
        (400..500).contains(&status),
        "{label}: status {status}: {body}"
    );
    let v: Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("{label}: not JSON: {body:?}"));
    let e = &v["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{label}: {body}"
    );
    assert!(e["type"].is_string(), "{label}: {body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{label}: {body}"
    );
}

#[test]
fn hostile_requests_get_json_errors_and_the_server_keeps_serving() {
    let t = tempfile::tempdir().unwrap();
    let m = tiny(t.path());
    let s = Server::start(&m, &["--max-body-bytes", "1048576"]);
    let ok = chat_body("hello", 4);
    let with = |k: &str, v: Value| {
        let mut b = ok.clone();
        b[k] = v;
        b
    };
    let without = |k: &str| {
        let mut b = ok.clone();
        b.as_object_mut().unwrap().remove(k);
        b
    };
    let json_cases: Vec<(&str, Value)> = vec![
        ("negative max_tokens", with("max_tokens", json!(-1))),
        ("zero max_tokens", with("max_tokens", json!(0))),
        ("huge max_tokens", with("max_tokens", json!(1u64 << 62))),
        ("max_tokens beyond i64", with("max_tokens", json!(u64::MAX))),
        ("float max_tokens", with("max_tokens", json!(1.5))),
        ("string max_tokens", with("max_tokens", json!("10"))),
        (
            "negative max_completion_tokens",
            with("max_completion_tokens", json!(-5)),
        ),
        ("temperature too high", with("temperature", json!(2.5))),
        ("negative temperature", with("temperature", json!(-1))),
        ("huge temperature", with("temperature", json!(1e300))),
        ("string temperature", with("temperature", json!("hot"))),
        ("top_p zero", with("top_p", json!(0))),
        ("top_p above one", with("top_p", json!(1.5))),
        ("top_k negative", with("top_k", json!(-7))),
        ("top_k beyond vocabulary", with("top_k", json!(1_000_000))),
        ("min_p above one", with("min_p", json!(2))),
        (
            "presence_penalty out of range",
            with("presence_penalty", json!(3)),
        ),
        (
            "frequency_penalty out of range",
            with("frequency_penalty", json!(-3)),
        ),
        (
            "repetition_penalty zero",
            with("repetition_penalty", json!(0)),
        ),
        ("n zero", with("n", json!(0))),
        ("n two", with("n", json!(2))),
        ("seed string", with("seed", json!("abc"))),
        ("stop number", with("stop", json!(5))),
        ("stop too many", with("stop", json!(vec!["x"; 40]))),
        (
            "top_logprobs without logprobs",
            with("top_logprobs", json!(3)),
        ),
        ("top_logprobs too many", {
            let mut b = with("logprobs", json!(true));
            b["top_logprobs"] = json!(50);
            b
        }),
        ("logprobs string", with("logprobs", json!("yes"))),
        ("logit_bias bad key", with("logit_bias", json!({"abc": 1}))),
        (
            "logit_bias out of range",
            with("logit_bias", json!({"5": 500})),
        ),
        ("stream string", with("stream", json!("yes"))),
        (
            "stream_options without stream",
            with("stream_options", json!({"include_usage": true})),
        ),
        ("unknown field", with("frobnicate", json!(true))),
        ("misspelt field", with("max_token", json!(5))),
        ("unknown model", with("model", json!("gpt-17"))),
        ("model number", with("model", json!(17))),
        ("missing model", without("model")),
        ("missing messages", without("messages")),
        ("empty messages", with("messages", json!([]))),
        ("messages not a list", with("messages", json!("hello"))),
        ("message not an object", with("messages", json!(["hello"]))),
        (
            "message without role",
            with("messages", json!([{"content": "hi"}])),
        ),
        (
            "message with bad role",
            with("messages", json!([{"role": "wizard", "content": "hi"}])),
        ),
        (
            "user message without content",
            with("messages", json!([{"role": "user"}])),
        ),
        (
            "image content part",
            with(
                "messages",
                json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
            ),
        ),
        (
            "content number",
            with("messages", json!([{"role": "user", "content": 5}])),
        ),
        (
            "tools not functions",
            with("tools", json!([{"type": "retrieval"}])),
        ),
        (
            "tool_choice required",
            with("tool_choice", json!("required")),
        ),
        (
            "chat_template_kwargs overriding messages",
            with("chat_template_kwargs", json!({"messages": []})),
        ),
        (
            "deeply nested content",
            with(
                "messages",
                json!([{"role": "user", "content": [[[[["x"]]]]]}]),
            ),
        ),
        ("body is an array", json!([1, 2, 3])),
        ("body is a string", json!("hello")),
        ("body is null", Value::Null),
    ];
    let mut count = 0;
    for (label, body) in &json_cases {
        let (status, text) = s.request(
            "POST",
            "/v1/chat/completions",
            &["Content-Type: application/json"],
            body.to_string().as_bytes(),
        );
        assert_api_error(label, status, &text);
        count += 1;
    }
    let ten_mb = {
        let mut b =
            br#"{"model": "qwen3_moe-hf-f32", "messages": [{"role": "user", "content": ""#.to_vec();
        b.extend(std::iter::repeat_n(b'a', 10 << 20));
        b.extend_from_slice(br#""}]}"#);
        b
    };
    let raw_cases: Vec<RawCase> = vec![
        ("malformed JSON", "POST", "/v1/chat/completions", vec!["Content-Type: application/json"], b"{\"model\": ".to_vec()),
        ("trailing garbage", "POST", "/v1/chat/completions", vec!["Content-Type: application/json"], b"{} xyz".to_vec()),
        ("empty body", "POST", "/v1/chat/completions", vec!["Content-Type: application/json"], vec![]),
        ("invalid UTF-8", "POST", "/v1/chat/completions", vec!["Content-Type: application/json"],
            b"{\"model\": \"qwen3_moe-hf-f32\", \"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\xc3\"}]}".to_vec()),
        ("lone surrogate escape", "POST", "/v1/chat/completions", vec!["Content-Type: application/json"],
            br#"{"model": "qwen3_moe-hf-f32", "messages": [{"role": "user", "content": "\ud800"}]}"#.to_vec()),
        ("number too large for JSON", "POST", "/v1/chat/completions", vec!["Content-Type: application/json"],
            br#"{"model": "qwen3_moe-hf-f32", "messages": [{"role": "user", "content": "x"}], "temperature": 1e999}"#.to_vec()),
        ("10 MB body", "POST", "/v1/chat/completions", vec!["Content-Type: application/json"], ten_mb),
        ("no content type", "POST", "/v1/chat/completions", vec![], ok.to_string().into_bytes()),
        ("text/plain", "POST", "/v1/chat/completions", vec!["Content-Type: text/plain"], ok.to_string().into_bytes()),
        ("form encoded", "POST", "/v1/completions", vec!["Content-Type: application/x-www-form-urlencoded"], b"model=x&prompt=y".to_vec()),
        ("GET on a POST route", "GET", "/v1/chat/completions", vec![], vec![]),
        ("DELETE models", "DELETE", "/v1/models", vec![], vec![]),
        ("unknown path", "GET", "/v1/engines", vec![], vec![]),
        ("unknown model card", "GET", "/v1/models/nope", vec![], vec![]),
        ("completions without prompt", "POST", "/v1/completions", vec!["Content-Type: application/json"], br#"{"model": "qwen3_moe-hf-f32"}"#.to_vec()),
        ("completions token id out of vocabulary", "POST", "/v1/completions", vec!["Content-Type: application/json"],
            br#"{"model": "qwen3_moe-hf-f32", "prompt": [1, 2, 99999999]}"#.to_vec()),
        ("completions negative token id", "POST", "/v1/completions", vec!["Content-Type: application/json"],
            br#"{"model": "qwen3_moe-hf-f32", "prompt": [1, -2]}"#.to_vec()),
        ("completions several prompts", "POST", "/v1/completions", vec!["Content-Type: application/json"],
            br#"{"model": "qwen3_moe-hf-f32", "prompt": ["a", "b"]}"#.to_vec()),
        ("completions empty prompt", "POST", "/v1/completions", vec!["Content-Type: application/json"],
            br#"{"model": "qwen3_moe-hf-f32", "prompt": ""}"#.to_vec()),
        ("completions echo", "POST", "/v1/completions", vec!["Content-Type: application/json"],
            br#"{"model": "qwen3_moe-hf-f32", "prompt": "a", "echo": true}"#.to_vec()),
        ("completions logprobs too many", "POST", "/v1/completions", vec!["Content-Type: application/json"],
            br#"{"model": "qwen3_moe-hf-f32", "prompt": "a", "logprobs": 99}"#.to_vec()),
    ];
    for (label, method, path, headers, body) in &raw_cases {
        let (status, text) = s.request(method, path, headers, body);
        assert_api_error(label, status, &text);
        count += 1;
    }
    assert!(count >= 50, "{count} hostile requests");
    // Still serving, and correctly: the same greedy request twice gives the same reply.
    let (status, a) = s.post_json("/v1/chat/completions", &ok);
    assert_eq!(status, 200, "{a}");
    let (_, b) = s.post_json("/v1/chat/completions", &ok);
    assert_eq!(a["choices"][0]["message"], b["choices"][0]["message"]);
    assert!(a["usage"]["completion_tokens"].as_u64().unwrap() <= 4);
    let (status, h) = s.post_json(
        "/v1/completions",
        &json!({"model": "qwen3_moe-hf-f32", "prompt": "hi", "max_tokens": 2}),
    );
    assert_eq!(status, 200, "{h}");
}

#[test]
fn api_key_guards_everything_but_health() {
    let t = tempfile::tempdir().unwrap();
    let m = tiny(t.path());
    let s = Server::start(&m, &["--api-key", "sekrit-key"]);
    let (status, _) = s.request("GET", "/health", &[], b"");
    assert_eq!(status, 200);
    for (label, headers) in [
        ("missing key", vec![]),
        ("wrong key", vec!["Authorization: Bearer sekrit-kez"]),
        ("prefix of the key", vec!["Authorization: Bearer sekrit"]),
        ("not bearer", vec!["Authorization: Basic c2Vrcml0LWtleQ=="]),
    ] {
        for path in ["/v1/models", "/metrics"] {
            let (status, body) = s.request("GET", path, &headers, b"");
            assert_eq!(status, 401, "{label} {path}: {body}");
            assert_api_error(label, status, &body);
        }
    }
    let (status, body) = s.request(
        "GET",
        "/v1/models",
        &["Authorization: Bearer sekrit-key"],
        b"",
    );
    assert_eq!(status, 200, "{body}");
}

#[test]
fn prompt_longer_than_the_context_is_rejected_with_the_limits() {
    let t = tempfile::tempdir().unwrap();
    let m = tiny(t.path());
    let s = Server::start(&m, &["--ctx-size", "64"]);
    let (status, v) = s.post_json("/v1/chat/completions", &chat_body(&"x".repeat(200), 4));
    assert_eq!(status, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("64") && msg.contains("tokens"), "{msg}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    // A prompt that fits, asking for more than the rest of the context.
    let (status, v) = s.post_json("/v1/chat/completions", &chat_body("hi", 60));
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "max_tokens");
    // Without max_tokens the completion may use the rest of the context.
    let mut body = chat_body("hi", 1);
    body.as_object_mut().unwrap().remove("max_tokens");
    let (status, v) = s.post_json("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    let u = &v["usage"];
    assert!(u["total_tokens"].as_u64().unwrap() <= 64, "{v}");
}

#[test]
fn greedy_chat_equals_moestream_run() {
    // An MoE, a hybrid (Gated DeltaNet) and a Mixtral model, each with its family's template.
    let t = tempfile::tempdir().unwrap();
    for arch in ["qwen3_moe", "qwen3_5_moe", "mixtral"] {
        let m = synth(t.path(), arch, "hf-f32");
        let name = format!("{arch}-hf-f32");
        let s = Server::start(&m, &[]);
        let mut compared = 0;
        for prompt in [
            "Why is the sky blue?",
            "hello",
            "Tell me a story.",
            "2+2=",
            "abc",
        ] {
            let o = moestream(&[
                "run",
                "--model",
                m.to_str().unwrap(),
                "--prompt",
                prompt,
                "--system",
                "Be brief.",
                "--enable-thinking",
                "false",
                "--max-tokens",
                "24",
                "--temperature",
                "0",
                "--json",
            ]);
            assert!(o.status.success(), "{}", stderr(&o));
            let run: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
            let body = json!({"model": name, "max_tokens": 24, "temperature": 0,
                "chat_template_kwargs": {"enable_thinking": false},
                "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]});
            let (status, v) = s.post_json("/v1/chat/completions", &body);
            assert_eq!(status, 200, "{v}");
            let choice = &v["choices"][0];
            let generated = run["generated_tokens"].as_array().unwrap().len();
            assert_eq!(
                v["usage"]["completion_tokens"], generated,
                "{arch}: {prompt}"
            );
            let prompt_tokens = run["prompt_tokens"].as_array().unwrap().len();
            assert_eq!(
                v["usage"]["prompt_tokens"], prompt_tokens,
                "{arch}: {prompt}"
            );
            // Both release held-back text at EOS and at the length limit; a reply with
            // reasoning is split by the server, so only the others compare as one text.
            if choice["message"].get("reasoning_content").is_none() {
                assert_eq!(
                    choice["message"]["content"], run["text"],
                    "{arch}: {prompt}"
                );
                compared += 1;
            }
        }
        assert!(
            compared >= 2,
            "{arch}: only {compared} replies without reasoning to compare"
        );
    }
}

#[test]
fn streamed_experts_are_served_and_reported() {
    let t = tempfile::tempdir().unwrap();
    let m = tiny(t.path());
    let s = Server::start(&m, &["--stream-experts", "on", "--expert-cache", "0"]);
    let (status, v) = s.post_json("/v1/chat/completions", &chat_body("hello", 8));
    assert_eq!(status, 200, "{v}");
    let (status, h) = s.request("GET", "/health", &[], b"");
    assert_eq!(status, 200);
    let h: Value = serde_json::from_str(&h).unwrap();
    assert_eq!(h["status"], "ready");
    let mem = &h["memory"];
    assert_eq!(mem["streaming_experts"], true, "{h}");
    assert!(mem["expert_bytes"].as_u64().unwrap() > 0, "{h}");
    assert!(
        mem["model_bytes"].as_u64() > mem["expert_bytes"].as_u64(),
        "{h}"
    );
    assert!(mem["resident_bytes"].as_u64().unwrap() > 0, "{h}");
    let (_, metrics) = s.request("GET", "/metrics", &[], b"");
    let value = |name: &str| -> f64 {
        let line = metrics.lines().find(|l| l.starts_with(&format!("{name} ")));
        let line = line.unwrap_or_else(|| panic!("no {name} in {metrics}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    assert_eq!(value("moestream_experts_streamed"), 1.0);
    assert!(
        value("moestream_expert_bytes_read_total") > 0.0,
        "{metrics}"
    );
    assert!(
        value("moestream_expert_bytes_needed_total") > 0.0,
        "{metrics}"
    );
    let ratio = value("moestream_prefetch_hit_ratio");
    assert!((0.0..=1.0).contains(&ratio), "{metrics}");
    assert!(
        metrics.contains("moestream_time_to_first_token_seconds_count 1"),
        "{metrics}"
    );
}

#[test]
fn a_model_that_does_not_load_ends_the_server_with_its_error() {
    let t = tempfile::tempdir().unwrap();
    let o = Command::new(bin())
        .args(["serve", "--port", "0", "--model"])
        .arg(t.path().join("nothing-here"))
        .output()
        .unwrap();
    assert_clean_error(&o, &["nothing-here", "not found"]);
}

/// The synthetic Qwen tokenizer's special tokens (EOS among them), banned so that a random
/// model generates exactly `max_tokens`.
fn no_eos() -> Value {
    json!({"256": -100, "257": -100, "258": -100})
}

/// Sends a request on a new connection without reading the answer.
fn send(port: u16, path: &str, body: &Value) -> TcpStream {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let b = body.to_string();
    write!(
        c,
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
        b.len()
    )
    .unwrap();
    c
}

/// Reads from `c` until `needle` has arrived.
fn read_until(c: &mut TcpStream, needle: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let n = c.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "connection closed before {needle:?}: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[test]
fn full_queue_is_answered_503_at_once() {
    let t = tempfile::tempdir().unwrap();
    let m = tiny(t.path());
    let s = Server::start(&m, &["--max-concurrent", "1", "--max-queue", "1"]);
    let long = json!({"model": "qwen3_moe-hf-f32", "prompt": "a", "max_tokens": 4000,
                      "temperature": 1, "stream": true, "logit_bias": no_eos()});
    // One long generation running (its tokens are arriving), one waiting in the queue.
    let mut running = send(s.port, "/v1/completions", &long);
    read_until(&mut running, "\"text\":\"");
    let mut queued = send(s.port, "/v1/completions", &long);
    read_until(&mut queued, "200 OK");
    let small = json!({"model": "qwen3_moe-hf-f32", "prompt": "a", "max_tokens": 2});
    let (status, v) = s.post_json("/v1/completions", &small);
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "queue_full");
    // Closing both streams cancels both generations: the engine is free again at once.
    drop((running, queued));
    let t0 = std::time::Instant::now();
    let served = (0..100).any(|_| {
        let (status, _) = s.post_json("/v1/completions", &small);
        std::thread::sleep(Duration::from_millis(20));
        status == 200
    });
    assert!(served, "the cancelled generations still hold the engine");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let (_, metrics) = s.request("GET", "/metrics", &[], b"");
    assert!(
        metrics.contains("moestream_generations_total{reason=\"cancelled\"} 2"),
        "{metrics}"
    );
}

#[test]
fn a_client_that_never_reads_stalls_nobody() {
    let t = tempfile::tempdir().unwrap();
    let m = tiny(t.path());
    let s = Server::start(&m, &["--max-concurrent", "2"]);
    // 3000 streamed tokens (about 1 MB of events) for a client that reads nothing: far more
    // than the socket buffers hold.
    let long = json!({"model": "qwen3_moe-hf-f32", "prompt": "a", "max_tokens": 3000,
                      "temperature": 1, "stream": true, "logit_bias": no_eos()});
    let _sleeper = send(s.port, "/v1/completions", &long);
    let small =
        json!({"model": "qwen3_moe-hf-f32", "prompt": "b", "max_tokens": 4, "temperature": 0});
    for _ in 0..5 {
        let (status, v) = s.post_json("/v1/completions", &small);
        assert_eq!(status, 200, "{v}");
    }
    // The engine finishes the unread generation too: its events wait in memory, not the engine.
    let idle = (0..500).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        let (_, h) = s.request("GET", "/health", &[], b"");
        h.contains("\"active_sequences\":0")
    });
    assert!(idle, "the unread generation did not finish");
}

#[test]
fn sigterm_lets_in_flight_requests_finish_then_exits_zero() {
    let t = tempfile::tempdir().unwrap();
    let m = tiny(t.path());
    let mut s = Server::start(&m, &["--shutdown-grace", "60"]);
    let port = s.port;
    let body = json!({"model": "qwen3_moe-hf-f32", "prompt": "a", "max_tokens": 1500,
                      "temperature": 1, "logit_bias": no_eos()});
    let mut c = send(port, "/v1/completions", &body);
    // Wait until the generation runs.
    let busy = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(10));
        let (_, h) = s.request("GET", "/health", &[], b"");
        h.contains("\"active_sequences\":1")
    });
    assert!(busy);
    let status = s.terminate();
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    let mut reply = String::new();
    c.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let body = reply.split_once("\r\n\r\n").unwrap().1;
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{body:?}"));
    assert_eq!(v["usage"]["completion_tokens"], 1500, "{v}");
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "still listening"
    );
}

#[test]
fn sigterm_cancels_what_outlasts_the_grace_period() {
    let t = tempfile::tempdir().unwrap();
    let m = tiny(t.path());
    let mut s = Server::start(&m, &["--shutdown-grace", "0.2"]);
    let long = json!({"model": "qwen3_moe-hf-f32", "prompt": "a", "max_tokens": 4000,
                      "temperature": 1, "logit_bias": no_eos()});
    let mut plain = send(s.port, "/v1/completions", &long);
    let mut streamed = long.clone();
    streamed["stream"] = json!(true);
    let mut stream = send(s.port, "/v1/completions", &streamed);
    read_until(&mut stream, "data:");
    let t0 = std::time::Instant::now();
    let status = s.terminate();
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let mut reply = String::new();
    plain.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    assert!(reply.contains("server_shutting_down"), "{reply}");
    let mut events = String::new();
    stream.read_to_string(&mut events).unwrap();
    assert!(
        events.contains("server_shutting_down") && events.contains("data: [DONE]"),
        "{events}"
    );
}

/// Runs a Python driver of scripts/server/ against the binary. Skipped (with a note) when the
/// `openai` package is missing, except under CI, where it must be installed.
fn python_driver(script: &str) {
    let has_openai = Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_openai {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the openai Python package is not installed (pip install openai)"
        );
        eprintln!("note: `pip install openai` to run {script}; skipped");
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let o = Command::new("python3")
        .arg(root.join("scripts/server").join(script))
        .args(["--bin", bin().to_str().unwrap()])
        .output()
        .expect("run python3");
    let out = format!("{}{}", stdout(&o), stderr(&o));
    eprintln!("{out}");
    assert!(o.status.success(), "{script} failed:\n{out}");
}

#[test]
fn openai_python_client_suite() {
    python_driver("openai_client.py");
}

#[test]
fn load_test_with_disconnects() {
    python_driver("load_test.py");
}

/// A server with a draft model answers greedy requests with the text of a server without one
/// (with log-probabilities, several requests interleaved), and counts its speculation in
/// /metrics.
#[test]
fn speculative_server_answers_as_without() {
    let t = tempfile::tempdir().unwrap();
    let m = synth(t.path(), "qwen3_moe", "hf-f32");
    let draft = synth(t.path(), "qwen3_moe", "mlx8");
    let plain = Server::start(&m, &[]);
    let spec = Server::start(
        &m,
        &[
            "--draft-model",
            draft.to_str().unwrap(),
            "--fixed-draft-length",
            "--num-draft-tokens",
            "3",
            "--max-concurrent",
            "2",
        ],
    );
    for prompt in ["Why is the sky blue?", "hello", "Tell me a story."] {
        let body = json!({"model": "qwen3_moe-hf-f32", "max_tokens": 30, "temperature": 0, "logprobs": true,
            "top_logprobs": 2, "messages": [{"role": "user", "content": prompt}]});
        let (s1, want) = plain.post_json("/v1/chat/completions", &body);
        let (s2, got) = spec.post_json("/v1/chat/completions", &body);
        assert_eq!((s1, s2), (200, 200), "{want} {got}");
        let (a, b) = (&want["choices"][0], &got["choices"][0]);
        assert_eq!(a["message"], b["message"], "{prompt}");
        assert_eq!(want["usage"], got["usage"], "{prompt}");
        let lp = |c: &Value| -> Vec<f64> {
            c["logprobs"]["content"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["logprob"].as_f64().unwrap())
                .collect()
        };
        // Verified positions have the bits of decode steps.
        assert_eq!(lp(a), lp(b), "{prompt}");
    }
    let (_, metrics) = spec.request("GET", "/metrics", &[], b"");
    let value = |name: &str| -> f64 {
        let line = metrics.lines().find(|l| l.starts_with(&format!("{name} ")));
        let line = line.unwrap_or_else(|| panic!("no {name} in {metrics}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    assert!(value("moestream_speculative_verify_passes_total") > 0.0);
    assert!(value("moestream_speculative_proposed_tokens_total") > 0.0);
    let r = value("moestream_speculative_acceptance_ratio");
    assert!((0.0..=1.0).contains(&r), "{metrics}");
    // A request can turn speculation off: the same answer, and no verification pass.
    let passes = value("moestream_speculative_verify_passes_total");
    let body = json!({"model": "qwen3_moe-hf-f32", "max_tokens": 30, "temperature": 0,
        "messages": [{"role": "user", "content": "hello"}]});
    let mut off = body.clone();
    off["speculative"] = json!(false);
    let (_, want) = plain.post_json("/v1/chat/completions", &body);
    let (status, got) = spec.post_json("/v1/chat/completions", &off);
    assert_eq!(status, 200, "{got}");
    assert_eq!(want["choices"][0]["message"], got["choices"][0]["message"]);
    let (_, metrics) = spec.request("GET", "/metrics", &[], b"");
    let after: f64 = metrics
        .lines()
        .find(|l| l.starts_with("moestream_speculative_verify_passes_total "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("verify passes metric");
    assert_eq!(
        after, passes,
        "a request with speculative: false was speculated"
    );
    let (status, err) = spec.post_json(
        "/v1/chat/completions",
        &json!({"speculative": "no",
        "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(status, 400, "{err}");
}
