//! The one thread that owns the served pipeline. Jobs arrive through a bounded queue and run
//! one at a time: generation (attach what the request names, activate exactly that set,
//! sample), upload checks and deletions. Adapters stay attached between requests within the
//! cache budget, so switching the active set never reloads the base model; a request sees only
//! its own adapters and embeddings, as `knobs generate` with the same flags would.
use std::sync::{Arc, Mutex};
use std::time::Instant;

use image::RgbImage;
use knobs_diffusion::clip::{ClipTextModel, ClipTokenizer};
use knobs_diffusion::loaders::PipelineAdapters;
use knobs_diffusion::pipeline::{GenerateRequest, StableDiffusion};
use knobs_nn::{ModuleExt, Tensor};
use tokio::sync::oneshot;

use super::api::ApiError;
use super::cache::Lru;
use super::metrics::Metrics;
use super::store::{Entry, Store};
use crate::cmd::generate::to_rgb;

/// One request's sampling settings and what it attaches.
#[derive(Debug)]
pub struct GenerateJob {
    pub request: GenerateRequest,
    /// (name, weight) in the order given: the order `knobs generate --lora` flags would have.
    pub adapters: Vec<(String, f32)>,
    pub embeddings: Vec<String>,
}

pub struct Generated {
    pub images: Vec<RgbImage>,
    pub seconds: f64,
}

pub enum Job {
    Generate(Box<GenerateJob>, oneshot::Sender<Result<Generated, ApiError>>),
    /// Check the staged upload of this name by loading it; store it if it loads.
    Upload(String, oneshot::Sender<Result<Entry, ApiError>>),
    Delete(String, oneshot::Sender<Result<(), ApiError>>),
}

/// What the HTTP side may read without waiting for the queue.
#[derive(Default)]
pub struct Shared {
    /// Loaded adapter names, least recently used first.
    pub loaded: Mutex<Vec<String>>,
}

pub struct Worker {
    sd: StableDiffusion,
    adapters: PipelineAdapters,
    lru: Lru,
    store: Arc<Store>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
}

/// What loading an embedding changes: the tokenizers and the text encoders' token tables
/// (new rows go at the end; every other weight stays as it is).
struct TextSnapshot {
    tokenizers: (ClipTokenizer, Option<ClipTokenizer>),
    tables: Vec<(Tensor<2>, usize)>,
}

impl TextSnapshot {
    fn take(sd: &StableDiffusion) -> Self {
        let table = |te: &ClipTextModel| (te.text_model.embeddings.token_embedding.weight.clone(), te.config.vocab_size);
        let tables = std::iter::once(&sd.text_encoder).chain(sd.text_encoder_2.as_ref()).map(table).collect();
        TextSnapshot { tokenizers: (sd.tokenizer.clone(), sd.tokenizer_2.clone()), tables }
    }

    fn restore(self, sd: &mut StableDiffusion) {
        (sd.tokenizer, sd.tokenizer_2) = self.tokenizers;
        for (te, (weight, vocab)) in std::iter::once(&mut sd.text_encoder).chain(sd.text_encoder_2.as_mut()).zip(self.tables) {
            te.text_model.embeddings.token_embedding.weight = weight;
            te.config.vocab_size = vocab;
        }
    }
}

impl Worker {
    pub fn new(mut sd: StableDiffusion, cache_bytes: u64, store: Arc<Store>, shared: Arc<Shared>, metrics: Arc<Metrics>) -> Self {
        sd.for_inference();
        Worker { sd, adapters: PipelineAdapters::new(0), lru: Lru::new(cache_bytes), store, shared, metrics }
    }

    pub fn run(mut self, jobs: std::sync::mpsc::Receiver<Job>) {
        while let Ok(job) = jobs.recv() {
            self.metrics.queue_depth.dec();
            match job {
                Job::Generate(g, reply) => {
                    let _ = reply.send(self.generate(*g));
                }
                Job::Upload(name, reply) => {
                    let _ = reply.send(self.upload(&name));
                }
                Job::Delete(name, reply) => {
                    let _ = reply.send(self.delete(&name));
                }
            }
            *self.shared.loaded.lock().expect("loaded list") = self.lru.names();
        }
    }

    fn entry(&self, name: &str, at: &str, embedding: bool) -> Result<Entry, ApiError> {
        let e = self.store.get(name).ok_or_else(|| ApiError::not_found(at, format!("no adapter `{name}` in the store")))?;
        match (e.embedding, embedding) {
            (true, false) => Err(ApiError::bad_request(at, format!("`{name}` is a textual-inversion embedding: list it under embeddings"))),
            (false, true) => Err(ApiError::bad_request(at, format!("`{name}` is an adapter, not an embedding: list it under adapters"))),
            _ => Ok(e),
        }
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.adapters.attached().iter().position(|a| a.name == name)
    }

    fn unload(&mut self, name: &str) -> Result<(), ApiError> {
        self.lru.remove(name);
        self.adapters.delete(&mut self.sd, name).map_err(|e| ApiError::internal(format!("unloading `{name}`: {e}")))
    }

    /// Attaches every adapter of the request, in its order, reusing what is loaded. Adapters
    /// apply in the order they were attached, so one loaded out of the request's order is
    /// attached again (at the end) to sum as `knobs generate` sums.
    fn attach(&mut self, wanted: &[(String, f32)]) -> Result<(), ApiError> {
        let mut entries = Vec::with_capacity(wanted.len());
        for (i, (name, _)) in wanted.iter().enumerate() {
            entries.push(self.entry(name, &format!("adapters[{i}].name"), false)?);
        }
        let (mut last, mut reattach_rest) = (None, false);
        for (name, _) in wanted {
            match self.position(name) {
                Some(p) if !reattach_rest && last.is_none_or(|l| p > l) => last = Some(p),
                Some(_) => {
                    self.unload(name)?;
                    reattach_rest = true;
                }
                None => reattach_rest = true,
            }
        }
        let keep: Vec<&str> = wanted.iter().map(|(n, _)| n.as_str()).collect();
        for (i, ((name, weight), entry)) in wanted.iter().zip(&entries).enumerate() {
            if self.lru.touch(name) {
                self.metrics.cache_hits.inc();
                continue;
            }
            let start = Instant::now();
            self.adapters
                .load_lora(&mut self.sd, &entry.path, name, *weight)
                .map_err(|e| ApiError::bad_request(&format!("adapters[{i}].name"), format!("`{name}` does not load onto this model: {e}")))?;
            self.sd.for_inference();
            self.metrics.cache_misses.inc();
            self.metrics.bytes_loaded.inc_by(entry.bytes);
            self.metrics.adapter_load_seconds.observe(start.elapsed().as_secs_f64());
            for evicted in self.lru.insert(name, entry.bytes, &keep) {
                self.unload(&evicted)?;
                self.metrics.cache_evictions.inc();
            }
        }
        let weights: Vec<(&str, f32)> = wanted.iter().map(|(n, w)| (n.as_str(), *w)).collect();
        self.adapters.set_adapters(&mut self.sd, &weights).map_err(|e| ApiError::internal(format!("activating the adapters: {e}")))
    }

    fn generate(&mut self, job: GenerateJob) -> Result<Generated, ApiError> {
        if let (false, Some(field)) = (self.sd.is_sdxl(), job.request.sdxl_fields().first()) {
            return Err(ApiError::bad_request(field, format!("is SDXL conditioning; {} is an SD-1.x/2.x model", self.sd.dir.display())));
        }
        self.attach(&job.adapters)?;
        let embeddings: Vec<Entry> =
            job.embeddings.iter().enumerate().map(|(i, n)| self.entry(n, &format!("embeddings[{i}]"), true)).collect::<Result<_, _>>()?;
        // Embeddings add tokens and token-table rows; both are put back afterwards, so no later
        // request sees them.
        let saved = (!embeddings.is_empty()).then(|| TextSnapshot::take(&self.sd));
        let result = self.sample(&job.request, &embeddings);
        if let Some(saved) = saved {
            saved.restore(&mut self.sd);
        }
        result
    }

    fn sample(&mut self, req: &GenerateRequest, embeddings: &[Entry]) -> Result<Generated, ApiError> {
        let mut scratch = PipelineAdapters::new(0);
        for (i, e) in embeddings.iter().enumerate() {
            scratch.load_embedding(&mut self.sd, &e.path).map_err(|err| ApiError::bad_request(&format!("embeddings[{i}]"), format!("`{}`: {err}", e.name)))?;
        }
        if !embeddings.is_empty() {
            self.sd.for_inference();
        }
        let start = Instant::now();
        let images = self.sd.generate(req).map_err(ApiError::from_param)?;
        let seconds = start.elapsed().as_secs_f64();
        let images = to_rgb(images).map_err(|e| ApiError::internal(format!("{e:#}")))?;
        Ok(Generated { images, seconds })
    }

    /// Loads the staged file as a scratch adapter (or embedding, into copies) to prove it fits
    /// this model, removes it again, then stores it.
    fn upload(&mut self, name: &str) -> Result<Entry, ApiError> {
        let staged = self.store.staging(name);
        let discard = |e: ApiError| {
            let _ = std::fs::remove_file(&staged);
            e
        };
        let as_embedding = crate::cmd::adapter::is_embedding(&staged);
        let check = if as_embedding {
            let saved = TextSnapshot::take(&self.sd);
            let r = PipelineAdapters::new(0).load_embedding(&mut self.sd, &staged).map(drop);
            saved.restore(&mut self.sd);
            r
        } else {
            let scratch = "_upload_check";
            let r = self.adapters.load_lora(&mut self.sd, &staged, scratch, 1.0).map(drop);
            if r.is_ok() {
                self.adapters.delete(&mut self.sd, scratch).map_err(|e| discard(ApiError::internal(format!("{e}"))))?;
            }
            r
        };
        check.map_err(|e| discard(ApiError::unprocessable("body", format!("not an adapter or embedding for this model: {e}"))))?;
        self.store.commit(name).map_err(|e| discard(ApiError::internal(format!("{e:#}"))))
    }

    fn delete(&mut self, name: &str) -> Result<(), ApiError> {
        let entry = self.store.get(name).ok_or_else(|| ApiError::not_found("name", format!("no adapter `{name}` in the store")))?;
        if self.position(name).is_some() {
            self.unload(name)?;
        }
        self.store.remove(&entry).map_err(|e| ApiError::internal(format!("{e:#}")))
    }
}
