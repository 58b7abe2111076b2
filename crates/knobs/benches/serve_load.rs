//! A bounded load test of `knobs serve` on loopback: 8 concurrent clients send a fixed number
//! of requests each (mixed adapters from a store of 5 LoRAs, a cache that holds 2, every 5th
//! request without adapters), then it stops and prints requests per second, p50 / p99 latency,
//! the cache hit rate, and the time to switch adapters (read + attach on a miss) against the
//! time to load the base model, from the server's own /metrics.
//!
//!     cargo bench -p knobs --bench serve_load
//!     KNOBS_LOAD_REQUESTS=25 KNOBS_LOAD_STEPS=25 KNOBS_LOAD_CLIENTS=8 (the defaults)
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn knobs() -> Command {
    Command::new(env!("CARGO_BIN_EXE_knobs"))
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let (clients, per_client, steps) = (env("KNOBS_LOAD_CLIENTS", 8), env("KNOBS_LOAD_REQUESTS", 25), env("KNOBS_LOAD_STEPS", 25));
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    for i in 0..5 {
        let out = tmp.path().join(format!("lora{i}"));
        let status = knobs()
            .args(["train", "--method", "lora", "--concept", "striped-star", "--max-train-steps", "1", "--num-samples", "0", "--rank", "4"])
            .args(["--seed", &i.to_string(), "--out", out.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "training LoRA {i} failed");
        std::fs::copy(out.join("pytorch_lora_weights.safetensors"), store.join(format!("a{i}.safetensors"))).unwrap();
    }
    let bytes = std::fs::metadata(store.join("a0.safetensors")).unwrap().len() as f64;
    let cache_mb = 2.5 * bytes / (1024.0 * 1024.0);
    let mut server = knobs()
        .args(["serve", "--adapters", store.to_str().unwrap(), "--addr", "127.0.0.1:0", "--max-queue", "64"])
        .args(["--cache-mb", &cache_mb.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.split_whitespace().nth(2).expect("the listening line").to_string();
    let threads = rayon_free_threads();

    let start = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let url = url.clone();
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
                let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ c as u64;
                let mut latencies = Vec::with_capacity(per_client);
                for r in 0..per_client {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let adapters = if (c + r) % 5 == 4 { "[]".to_string() } else { format!(r#"[{{"name": "a{}"}}]"#, (state >> 33) % 5) };
                    let body = format!(r#"{{"prompt": "a red circle", "steps": {steps}, "seed": {r}, "adapters": {adapters}}}"#);
                    let t = Instant::now();
                    let mut resp = agent.post(format!("{url}/v1/generate")).header("content-type", "application/json").send(body.as_bytes()).unwrap();
                    let _ = resp.body_mut().read_to_vec().unwrap();
                    assert_eq!(resp.status().as_u16(), 200, "client {c} request {r}");
                    latencies.push(t.elapsed().as_secs_f64());
                }
                latencies
            })
        })
        .collect();
    let mut latencies: Vec<f64> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let wall = start.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let metrics = ureq::get(format!("{url}/metrics")).call().unwrap().body_mut().read_to_string().unwrap();
    let _ = server.kill();
    let _ = server.wait();

    let (hits, misses) = (metric(&metrics, "knobs_adapter_cache_hits_total"), metric(&metrics, "knobs_adapter_cache_misses_total"));
    let switch = metric(&metrics, "knobs_adapter_load_seconds_sum") / metric(&metrics, "knobs_adapter_load_seconds_count");
    let base = metric(&metrics, "knobs_base_model_load_seconds");
    let n = latencies.len();
    println!("knobs serve load test: {clients} clients x {per_client} requests, {steps} steps each, built-in model, 5 LoRAs, cache of 2, {threads} threads");
    println!("requests          {n} in {wall:.1} s = {:.2} req/s", n as f64 / wall);
    println!("latency           p50 {:.3} s, p99 {:.3} s (queueing included)", quantile(&latencies, 0.5), quantile(&latencies, 0.99));
    println!("cache             {hits} hits, {misses} misses: hit rate {:.2}", hits / (hits + misses));
    println!("adapter switch    {:.1} ms mean on a miss (read + attach), base model load {:.1} ms: {:.1}x", switch * 1e3, base * 1e3, base / switch);
    println!(
        "{}",
        serde_json::json!({ "requests": n, "seconds": wall, "rps": n as f64 / wall, "p50": quantile(&latencies, 0.5), "p99": quantile(&latencies, 0.99),
            "hits": hits, "misses": misses, "switch_seconds": switch, "base_load_seconds": base, "adapter_bytes": bytes })
    );
}

/// The worker threads the server uses (its default: all cores).
fn rayon_free_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
