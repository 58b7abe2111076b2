//! `knobs serve`: one base model loaded once, many adapters attached and detached per request
//! from a store folder, over HTTP (axum on tokio). A single worker thread owns the pipeline;
//! requests wait in a bounded queue, and a full queue answers 503 at once.
pub mod api;
mod cache;
mod metrics;
mod store;
mod worker;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use knobs_diffusion::pipeline::StableDiffusion;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The base model: a diffusers folder or a single-file checkpoint; default: the built-in
    /// base model (models/knobs-base).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The adapter store: NAME.safetensors files (LoRA, LyCORIS, kohya, diffusers, or
    /// textual-inversion embeddings) and NAME/ PEFT folders; created if missing.
    #[arg(long)]
    pub adapters: PathBuf,
    /// Address to listen on; port 0 picks a free one (the first line printed names it).
    #[arg(long, default_value = "127.0.0.1:7860")]
    pub addr: SocketAddr,
    /// Adapters kept attached between requests, by file size; the least recently used is
    /// detached first.
    #[arg(long, default_value_t = 1024.0)]
    pub cache_mb: f64,
    /// Requests that may wait for the worker; more get 503.
    #[arg(long, default_value_t = 16)]
    pub max_queue: usize,
    /// Largest adapter upload accepted.
    #[arg(long, default_value_t = 512)]
    pub max_upload_mb: usize,
}

pub fn run(args: Args) -> Result<()> {
    ensure!(args.max_queue >= 1, "--max-queue must be at least 1");
    ensure!(args.cache_mb >= 0.0 && args.cache_mb.is_finite(), "--cache-mb must be a size in MiB, at least 0");
    let model = knobs_train::builtin::model_or_default(args.model.as_deref())?;
    let store = Arc::new(store::Store::open(&args.adapters)?);
    let metrics = Arc::new(metrics::Metrics::new());
    let shared = Arc::new(worker::Shared::default());

    let start = Instant::now();
    let sd = StableDiffusion::load(&model, &knobs_nn::device::inference()).with_context(|| format!("--model {}", model.display()))?;
    let load_seconds = start.elapsed().as_secs_f64();
    metrics.base_load_seconds.set(load_seconds);
    let (jobs, queue) = std::sync::mpsc::sync_channel(args.max_queue);
    let w = worker::Worker::new(sd, (args.cache_mb * 1024.0 * 1024.0) as u64, store.clone(), shared.clone(), metrics.clone());
    std::thread::Builder::new().name("knobs-worker".into()).spawn(move || knobs_nn::on_worker(move || w.run(queue))).context("cannot start the worker thread")?;

    let app = api::AppState { jobs, store, shared, metrics };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.addr).await.with_context(|| format!("--addr {}: cannot listen", args.addr))?;
        let addr = listener.local_addr()?;
        println!("listening on http://{addr} (model {} loaded in {load_seconds:.2} s, adapters in {})", model.display(), args.adapters.display());
        std::io::stdout().flush()?;
        let router = api::router(app, args.max_upload_mb * 1024 * 1024);
        axum::serve(listener, router).with_graceful_shutdown(async { tokio::signal::ctrl_c().await.ok(); }).await.context("the server stopped")
    })
}
