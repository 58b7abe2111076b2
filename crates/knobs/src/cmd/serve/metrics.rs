//! The Prometheus metrics of `GET /metrics`.
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Route {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    pub route: String,
    pub status: u16,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RouteStatus, Counter>,
    pub latency: Family<Route, Histogram>,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_evictions: Counter,
    pub bytes_loaded: Counter,
    pub adapter_load_seconds: Histogram,
    pub base_load_seconds: Gauge<f64, AtomicU64>,
    pub queue_depth: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("knobs");
        let requests = Family::<RouteStatus, Counter>::default();
        let latency = Family::<Route, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(0.005, 2.0, 16)));
        let adapter_load_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let m = Metrics {
            requests: requests.clone(),
            latency: latency.clone(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_evictions: Counter::default(),
            bytes_loaded: Counter::default(),
            adapter_load_seconds: adapter_load_seconds.clone(),
            base_load_seconds: Gauge::default(),
            queue_depth: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("requests", "HTTP requests by route and status", requests);
        registry.register("request_seconds", "Request latency by route, queueing included", latency);
        registry.register("adapter_cache_hits", "Requested adapters that were already attached", m.cache_hits.clone());
        registry.register("adapter_cache_misses", "Requested adapters read from the store and attached", m.cache_misses.clone());
        registry.register("adapter_cache_evictions", "Adapters detached to stay within --cache-mb", m.cache_evictions.clone());
        registry.register("adapter_bytes_loaded", "Bytes of adapter files read on cache misses", m.bytes_loaded.clone());
        registry.register("adapter_load_seconds", "Time to read and attach one adapter (a switch on a miss)", adapter_load_seconds);
        registry.register("base_model_load_seconds", "Time the base model took to load at start", m.base_load_seconds.clone());
        registry.register("queue_depth", "Jobs waiting for the worker", m.queue_depth.clone());
        Metrics { registry, ..m }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }

    pub fn observe(&self, route: &str, status: u16, seconds: f64) {
        self.requests.get_or_create(&RouteStatus { route: route.to_string(), status }).inc();
        self.latency.get_or_create(&Route { route: route.to_string() }).observe(seconds);
    }
}
