//! `GET /metrics`: Prometheus text (OpenMetrics) through the
//! `prometheus-client` crate, under vLLM's metric names and meanings, so
//! that dashboards and the Kubernetes inference gateway's endpoint picker
//! (which reads `vllm:num_requests_waiting`, `vllm:num_requests_running`
//! and `vllm:kv_cache_usage_perc` by default) work unchanged.
//! Reference: vLLM's `vllm/v1/metrics/loggers.py`.

use crate::engine::{Engine, Outcome, StopReason};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Finished {
    finished_reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    running: Gauge,
    waiting: Gauge,
    kv_usage: Gauge<f64, AtomicU64>,
    prompt_tokens: Counter,
    generation_tokens: Counter,
    prefix_queries: Counter,
    prefix_hits: Counter,
    finished: Family<Finished, Counter>,
    ttft: Histogram,
    inter_token: Histogram,
    e2e: Histogram,
    queue: Histogram,
}

/// Seconds: 1 ms to 5 minutes (a 2-core CPU answers slowly).
const SECONDS: [f64; 16] = [
    0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0, 120.0, 300.0,
];

impl Metrics {
    /// The metrics of a server of `model_name` (the served name): every
    /// series carries it as the `model_name` label, as vLLM's do, so that
    /// dashboards filtering on it work.
    pub fn new(model_name: &str) -> Self {
        let mut registry = Registry::with_labels(std::iter::once((
            std::borrow::Cow::Borrowed("model_name"),
            std::borrow::Cow::Owned(model_name.to_string()),
        )));
        let m = Self {
            running: Gauge::default(),
            waiting: Gauge::default(),
            kv_usage: Gauge::default(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            prefix_queries: Counter::default(),
            prefix_hits: Counter::default(),
            finished: Family::default(),
            ttft: Histogram::new(SECONDS),
            inter_token: Histogram::new(SECONDS),
            e2e: Histogram::new(SECONDS),
            queue: Histogram::new(SECONDS),
            registry: Registry::default(),
        };
        registry.register(
            "vllm:num_requests_running",
            "Sequences in a KV slot (prefilling or decoding)",
            m.running.clone(),
        );
        registry.register(
            "vllm:num_requests_waiting",
            "Sequences queued for a slot",
            m.waiting.clone(),
        );
        registry.register(
            "vllm:kv_cache_usage_perc",
            "Fraction of the KV budget the running sequences hold (1 = full)",
            m.kv_usage.clone(),
        );
        registry.register(
            "vllm:prompt_tokens",
            "Prompt tokens computed (not those found in a kept prefix)",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "vllm:generation_tokens",
            "Tokens generated",
            m.generation_tokens.clone(),
        );
        registry.register(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the kept prefixes",
            m.prefix_queries.clone(),
        );
        registry.register(
            "vllm:prefix_cache_hits",
            "Prompt tokens found in a kept prefix",
            m.prefix_hits.clone(),
        );
        registry.register(
            "vllm:request_success",
            "Answers finished, by reason (stop, length, abort)",
            m.finished.clone(),
        );
        registry.register(
            "vllm:time_to_first_token_seconds",
            "From the request's arrival to its first token",
            m.ttft.clone(),
        );
        registry.register(
            "vllm:inter_token_latency_seconds",
            "Mean time between an answer's tokens",
            m.inter_token.clone(),
        );
        registry.register(
            "vllm:e2e_request_latency_seconds",
            "From the request's arrival to its last token",
            m.e2e.clone(),
        );
        registry.register(
            "vllm:request_queue_time_seconds",
            "From the request's arrival until it got a KV slot",
            m.queue.clone(),
        );
        Self { registry, ..m }
    }

    /// Counts one generated token as it comes (vLLM's counters move with
    /// each step, not at the end of a request); `ttft_s` with an answer's first.
    pub fn token(&self, ttft_s: Option<f64>) {
        self.generation_tokens.inc();
        if let Some(ttft) = ttft_s {
            self.ttft.observe(ttft);
        }
    }

    /// Counts one finished answer (`e2e_s`: its whole request's time).
    pub fn observe(&self, outcome: &Outcome, e2e_s: f64) {
        let s = &outcome.stats;
        self.prompt_tokens.inc_by(s.new_tokens as u64);
        self.prefix_queries.inc_by(s.prompt_tokens as u64);
        self.prefix_hits.inc_by(s.cached_tokens as u64);
        let reason = match outcome.stop {
            StopReason::EndToken | StopReason::StopText => "stop",
            StopReason::MaxTokens | StopReason::ContextFull => "length",
            StopReason::Interrupted => "abort",
        };
        self.finished
            .get_or_create(&Finished {
                finished_reason: reason,
            })
            .inc();
        if s.gen_tokens > 1 {
            self.inter_token
                .observe(s.gen_s / (s.gen_tokens - 1) as f64);
        }
        self.e2e.observe(e2e_s);
        self.queue.observe(s.queue_s);
    }

    /// The text Prometheus scrapes, with the engine's gauges as of now.
    pub fn render(&self, engine: &Engine) -> String {
        let load = engine.load();
        self.running.set(load.running() as i64);
        self.waiting.set(load.waiting() as i64);
        self.kv_usage
            .set(load.kv_used() as f64 / engine.kv_capacity().max(1) as f64);
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
