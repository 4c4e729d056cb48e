//! Counters and histograms for `GET /metrics`, in Prometheus' text exposition format.
//!
//! Handlers count requests by endpoint and status (one middleware, so every answer is counted,
//! errors included); the engine worker counts tokens, finished generations and latencies. Expert
//! traffic comes from the expert store's own counters at scrape time. One mutex guards it all: it
//! is taken once per request and once per generated token, far below contention.
use moestream_engine::speculative::SpeculationStats;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use moestream_engine::store::StoreStats;

/// Upper bounds (seconds) of the latency histograms' buckets.
const LATENCY_BUCKETS_S: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A cumulative histogram with fixed buckets.
#[derive(Clone, Debug, Default)]
struct Histogram {
    counts: [u64; LATENCY_BUCKETS_S.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (c, &le) in self.counts.iter_mut().zip(&LATENCY_BUCKETS_S) {
            if seconds <= le {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, le) in self.counts.iter().zip(&LATENCY_BUCKETS_S) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

#[derive(Debug, Default)]
struct Counters {
    requests: BTreeMap<(String, u16), u64>,
    prompt_tokens: u64,
    completion_tokens: u64,
    finished: BTreeMap<&'static str, u64>,
    time_to_first_token: Histogram,
    inter_token_latency: Histogram,
    last_scrape: Option<(Instant, u64)>,
    speculation: SpeculationStats,
}

/// What the server counts.
#[derive(Debug, Default)]
pub struct Metrics {
    counters: Mutex<Counters>,
    /// Requests accepted and waiting for the engine.
    pub queue_depth: AtomicUsize,
    /// Sequences the engine is generating.
    pub active_sequences: AtomicUsize,
}

/// Engine-side figures read at scrape time.
pub struct EngineSnapshot {
    /// The expert store's counters.
    pub store: StoreStats,
    /// Whether experts are streamed from disk.
    pub streamed: bool,
    /// Bytes this process read from storage, if the kernel says.
    pub disk_read_bytes: Option<u64>,
    /// Resident memory of the process.
    pub resident_bytes: Option<u64>,
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one answered request.
    pub fn request(&self, endpoint: &str, status: u16) {
        *self
            .lock()
            .requests
            .entry((endpoint.to_owned(), status))
            .or_default() += 1;
    }

    /// Counts one finished generation (`reason`: stop, length, cancelled, error).
    pub fn finished(&self, reason: &'static str, prompt_tokens: usize, completion_tokens: usize) {
        let mut c = self.lock();
        *c.finished.entry(reason).or_default() += 1;
        c.prompt_tokens += prompt_tokens as u64;
        c.completion_tokens += completion_tokens as u64;
    }

    /// Records the time from a request's arrival to its first token.
    pub fn first_token(&self, seconds: f64) {
        self.lock().time_to_first_token.observe(seconds);
    }

    /// Adds a finished sequence's speculation counters.
    pub fn speculation(&self, s: &SpeculationStats) {
        self.lock().speculation.add(s);
    }

    /// Records the time between two tokens of one sequence.
    pub fn next_token(&self, seconds: f64) {
        self.lock().inter_token_latency.observe(seconds);
    }

    /// The exposition text.
    pub fn render(&self, engine: &EngineSnapshot) -> String {
        let mut c = self.lock();
        let mut out = String::new();
        let w = &mut out;
        let _ = writeln!(w, "# HELP moestream_requests_total HTTP requests answered, by endpoint and status.\n# TYPE moestream_requests_total counter");
        for ((endpoint, status), n) in &c.requests {
            let _ = writeln!(
                w,
                "moestream_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        let _ = writeln!(w, "# HELP moestream_generations_total Generations finished, by reason (stop, length, cancelled, error).\n# TYPE moestream_generations_total counter");
        for (reason, n) in &c.finished {
            let _ = writeln!(w, "moestream_generations_total{{reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(w, "# HELP moestream_prompt_tokens_total Prompt tokens processed.\n# TYPE moestream_prompt_tokens_total counter\nmoestream_prompt_tokens_total {}", c.prompt_tokens);
        let _ = writeln!(w, "# HELP moestream_generation_tokens_total Tokens generated.\n# TYPE moestream_generation_tokens_total counter\nmoestream_generation_tokens_total {}", c.completion_tokens);
        c.time_to_first_token.render(
            w,
            "moestream_time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token.",
        );
        c.inter_token_latency.render(
            w,
            "moestream_inter_token_latency_seconds",
            "Time between consecutive tokens of one sequence.",
        );
        let _ = writeln!(w, "# HELP moestream_queue_depth Requests waiting for the engine.\n# TYPE moestream_queue_depth gauge\nmoestream_queue_depth {}", self.queue_depth.load(Ordering::Relaxed));
        let _ = writeln!(w, "# HELP moestream_active_sequences Sequences being generated.\n# TYPE moestream_active_sequences gauge\nmoestream_active_sequences {}", self.active_sequences.load(Ordering::Relaxed));
        let sp = c.speculation;
        if sp.verify_passes + sp.plain_steps > 0 {
            let _ = writeln!(w, "# HELP moestream_speculative_verify_passes_total Target passes that verified proposed tokens (finished sequences).\n# TYPE moestream_speculative_verify_passes_total counter\nmoestream_speculative_verify_passes_total {}", sp.verify_passes);
            let _ = writeln!(w, "# HELP moestream_speculative_proposed_tokens_total Tokens proposed by the draft.\n# TYPE moestream_speculative_proposed_tokens_total counter\nmoestream_speculative_proposed_tokens_total {}", sp.proposed);
            let _ = writeln!(w, "# HELP moestream_speculative_accepted_tokens_total Proposed tokens the target kept.\n# TYPE moestream_speculative_accepted_tokens_total counter\nmoestream_speculative_accepted_tokens_total {}", sp.accepted);
            let _ = writeln!(w, "# HELP moestream_speculative_plain_steps_total Decode steps taken without proposals (the draft length controller chose none).\n# TYPE moestream_speculative_plain_steps_total counter\nmoestream_speculative_plain_steps_total {}", sp.plain_steps);
            let _ = writeln!(w, "# HELP moestream_speculative_verify_experts_total Distinct experts applied by verification passes.\n# TYPE moestream_speculative_verify_experts_total counter\nmoestream_speculative_verify_experts_total {}", sp.verify_experts);
            let _ = writeln!(w, "# HELP moestream_speculative_acceptance_ratio Share of proposed tokens kept.\n# TYPE moestream_speculative_acceptance_ratio gauge\nmoestream_speculative_acceptance_ratio {}", sp.acceptance_rate().unwrap_or(0.0));
            let _ = writeln!(w, "# HELP moestream_speculative_tokens_per_pass Tokens produced per verification pass.\n# TYPE moestream_speculative_tokens_per_pass gauge\nmoestream_speculative_tokens_per_pass {}", sp.tokens_per_pass().unwrap_or(0.0));
        }
        let s = &engine.store;
        let _ = writeln!(w, "# HELP moestream_expert_bytes_needed_total Bytes of the experts tokens used.\n# TYPE moestream_expert_bytes_needed_total counter\nmoestream_expert_bytes_needed_total {}", s.bytes_needed);
        let _ = writeln!(w, "# HELP moestream_expert_bytes_read_total Bytes of expert reads issued (streamed experts only).\n# TYPE moestream_expert_bytes_read_total counter\nmoestream_expert_bytes_read_total {}", s.bytes_read);
        let _ = writeln!(w, "# HELP moestream_expert_read_wait_seconds_total Time the engine waited for expert reads.\n# TYPE moestream_expert_read_wait_seconds_total counter\nmoestream_expert_read_wait_seconds_total {}", s.wait_ns as f64 / 1e9);
        if let Some(d) = engine.disk_read_bytes {
            let _ = writeln!(w, "# HELP moestream_disk_read_bytes_total Bytes the process read from storage (what the page cache did not serve).\n# TYPE moestream_disk_read_bytes_total counter\nmoestream_disk_read_bytes_total {d}");
        }
        // Throughput over the interval since the previous scrape (0 on the first).
        let now = Instant::now();
        let throughput = match c.last_scrape {
            Some((t, bytes)) if now > t => {
                s.bytes_read.saturating_sub(bytes) as f64 / (now - t).as_secs_f64()
            }
            _ => 0.0,
        };
        c.last_scrape = Some((now, s.bytes_read));
        let _ = writeln!(w, "# HELP moestream_expert_read_bytes_per_second Expert bytes read per second since the previous scrape.\n# TYPE moestream_expert_read_bytes_per_second gauge\nmoestream_expert_read_bytes_per_second {throughput}");
        let _ = writeln!(w, "# HELP moestream_prefetch_hit_ratio Needed experts a prefetch had brought in, where predictions were made.\n# TYPE moestream_prefetch_hit_ratio gauge\nmoestream_prefetch_hit_ratio {}", s.prefetch_hit_rate().unwrap_or(0.0));
        let _ = writeln!(w, "# HELP moestream_experts_streamed Whether expert weights are streamed from disk.\n# TYPE moestream_experts_streamed gauge\nmoestream_experts_streamed {}", u8::from(engine.streamed));
        if let Some(r) = engine.resident_bytes {
            let _ = writeln!(w, "# HELP moestream_resident_memory_bytes Resident memory of the process.\n# TYPE moestream_resident_memory_bytes gauge\nmoestream_resident_memory_bytes {r}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::default();
        h.observe(0.003);
        h.observe(0.2);
        h.observe(100.0);
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.25\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"30\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }

    #[test]
    fn requests_are_counted_by_endpoint_and_status() {
        let m = Metrics::default();
        m.request("/v1/models", 200);
        m.request("/v1/models", 200);
        m.request("/v1/chat/completions", 400);
        let snap = EngineSnapshot {
            store: StoreStats::default(),
            streamed: false,
            disk_read_bytes: None,
            resident_bytes: None,
        };
        let text = m.render(&snap);
        assert!(text.contains("moestream_requests_total{endpoint=\"/v1/models\",status=\"200\"} 2"));
        assert!(text.contains(
            "moestream_requests_total{endpoint=\"/v1/chat/completions\",status=\"400\"} 1"
        ));
    }
}
