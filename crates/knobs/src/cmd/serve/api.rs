//! The HTTP API: routes, request bodies, and errors as JSON that name the field at fault.
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use base64::Engine;
use knobs_diffusion::pipeline::{GenerateRequest, SchedulerKind};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::metrics::Metrics;
use super::store::{Store, check_name};
use super::worker::{GenerateJob, Job, Shared};
use crate::cmd::generate::grid;

/// A failed request: its status, the request field at fault (when one is) and why.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub field: Option<String>,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, field: Option<&str>, message: impl Into<String>) -> Self {
        ApiError { status, field: field.map(str::to_string), message: message.into() }
    }
    pub fn bad_request(field: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, Some(field), message)
    }
    pub fn not_found(field: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, Some(field), message)
    }
    pub fn unprocessable(field: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, Some(field), message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, None, message)
    }
    /// The pipeline's own checks name the request setting (`height`, `latents`, ...).
    pub fn from_param(e: knobs_nn::Error) -> Self {
        match &e {
            knobs_nn::Error::Param { key, .. } => Self::bad_request(key, e.to_string()),
            _ => Self::internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(json!({ "error": self.message, "field": self.field }))).into_response()
    }
}

/// `POST /v1/generate`. Defaults are `knobs generate`'s.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateBody {
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: String,
    #[serde(default)]
    pub adapters: Vec<AdapterRef>,
    #[serde(default)]
    pub embeddings: Vec<String>,
    #[serde(default = "default_steps")]
    pub steps: usize,
    #[serde(default = "default_guidance")]
    pub guidance: f64,
    #[serde(default)]
    pub seed: u64,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub scheduler: Option<String>,
    #[serde(default = "one")]
    pub num_images: usize,
    /// `png` (default; several images come as one grid) or `json` (each image as base64).
    #[serde(default)]
    pub format: Option<String>,
    /// SDXL only (as `knobs generate --prompt-2 ...`): the second encoder's prompts and the
    /// micro-conditioning sizes, `[height, width]` / `[top, left]`.
    pub prompt_2: Option<String>,
    pub negative_prompt_2: Option<String>,
    pub original_size: Option<(usize, usize)>,
    pub crop_top_left: Option<(usize, usize)>,
    pub target_size: Option<(usize, usize)>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterRef {
    pub name: String,
    #[serde(default = "weight_one")]
    pub weight: f32,
}

fn default_steps() -> usize {
    50
}
fn default_guidance() -> f64 {
    7.5
}
fn one() -> usize {
    1
}
fn weight_one() -> f32 {
    1.0
}

/// Limits that keep one request from holding the worker for hours.
const MAX_STEPS: usize = 1000;
const MAX_IMAGES: usize = 16;
const MAX_SIDE: usize = 4096;

/// The serde error's field name (`unknown field `x``, `missing field `prompt``), else `body`.
fn json_field(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let named = text.split('`').nth(1).filter(|_| text.contains("field"));
    named.map_or_else(|| "body".to_string(), str::to_string)
}

impl GenerateBody {
    pub fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        serde_json::from_slice(bytes).map_err(|e| ApiError::bad_request(&json_field(&e), format!("malformed request: {e}")))
    }

    pub fn into_job(self) -> Result<(GenerateJob, bool), ApiError> {
        if !(1..=MAX_STEPS).contains(&self.steps) {
            return Err(ApiError::bad_request("steps", format!("{} is outside 1..={MAX_STEPS}", self.steps)));
        }
        if !(1..=MAX_IMAGES).contains(&self.num_images) {
            return Err(ApiError::bad_request("num_images", format!("{} is outside 1..={MAX_IMAGES}", self.num_images)));
        }
        if !self.guidance.is_finite() {
            return Err(ApiError::bad_request("guidance", "must be a finite number"));
        }
        for (key, v) in [("width", self.width), ("height", self.height)] {
            if let Some(v) = v.filter(|v| *v == 0 || *v > MAX_SIDE) {
                return Err(ApiError::bad_request(key, format!("{v} is outside 1..={MAX_SIDE} pixels")));
            }
        }
        let scheduler = match &self.scheduler {
            Some(s) => Some(s.parse::<SchedulerKind>().map_err(|e| ApiError::bad_request("scheduler", e.to_string()))?),
            None => None,
        };
        for (i, a) in self.adapters.iter().enumerate() {
            check_name(&a.name).map_err(|e| ApiError::bad_request(&format!("adapters[{i}].name"), e.to_string()))?;
            if !a.weight.is_finite() {
                return Err(ApiError::bad_request(&format!("adapters[{i}].weight"), "must be a finite number"));
            }
            if self.adapters[..i].iter().any(|b| b.name == a.name) {
                return Err(ApiError::bad_request(&format!("adapters[{i}].name"), format!("`{}` is listed twice", a.name)));
            }
        }
        for (i, e) in self.embeddings.iter().enumerate() {
            check_name(e).map_err(|err| ApiError::bad_request(&format!("embeddings[{i}]"), err.to_string()))?;
        }
        let json = match self.format.as_deref() {
            None | Some("png") => false,
            Some("json") => true,
            Some(other) => return Err(ApiError::bad_request("format", format!("`{other}`: use png or json"))),
        };
        let request = GenerateRequest {
            prompt: self.prompt,
            negative_prompt: self.negative_prompt,
            steps: self.steps,
            guidance_scale: self.guidance,
            scheduler,
            height: self.height,
            width: self.width,
            num_images: self.num_images,
            seed: self.seed,
            prompt_2: self.prompt_2,
            negative_prompt_2: self.negative_prompt_2,
            original_size: self.original_size,
            crop_top_left: self.crop_top_left,
            target_size: self.target_size,
            ..Default::default()
        };
        let adapters = self.adapters.into_iter().map(|a| (a.name, a.weight)).collect();
        Ok((GenerateJob { request, adapters, embeddings: self.embeddings }, json))
    }
}

#[derive(Clone)]
pub struct AppState {
    pub jobs: SyncSender<Job>,
    pub store: Arc<Store>,
    pub shared: Arc<Shared>,
    pub metrics: Arc<Metrics>,
}

impl AppState {
    /// Queues a job and waits for its answer; a full queue is 503 at once.
    async fn submit<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T, ApiError>>) -> Job) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.metrics.queue_depth.inc();
        match self.jobs.try_send(make(tx)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.metrics.queue_depth.dec();
                return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, None, "the queue is full (--max-queue); try again later"));
            }
            Err(TrySendError::Disconnected(_)) => {
                self.metrics.queue_depth.dec();
                return Err(ApiError::internal("the worker has stopped"));
            }
        }
        rx.await.map_err(|_| ApiError::internal("the worker dropped the request"))?
    }
}

fn png(img: &image::RgbImage) -> Result<Vec<u8>, ApiError> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).map_err(|e| ApiError::internal(format!("encoding PNG: {e}")))?;
    Ok(out.into_inner())
}

async fn generate(State(app): State<AppState>, body: Bytes) -> Response {
    let start = Instant::now();
    let result = async {
        let (job, as_json) = GenerateBody::parse(&body)?.into_job()?;
        let seed = job.request.seed;
        let done = app.submit(|tx| Job::Generate(Box::new(job), tx)).await?;
        if as_json {
            let images: Vec<String> =
                done.images.iter().map(|i| png(i).map(|b| base64::engine::general_purpose::STANDARD.encode(b))).collect::<Result<_, _>>()?;
            let (w, h) = done.images[0].dimensions();
            Ok(axum::Json(json!({ "images": images, "width": w, "height": h, "seed": seed, "seconds": done.seconds })).into_response())
        } else {
            let img = if done.images.len() == 1 { png(&done.images[0])? } else { png(&grid(&done.images))? };
            Ok(([(header::CONTENT_TYPE, "image/png")], img).into_response())
        }
    }
    .await;
    finish(&app, "generate", start, result)
}

fn finish(app: &AppState, route: &str, start: Instant, result: Result<Response, ApiError>) -> Response {
    let response = result.unwrap_or_else(IntoResponse::into_response);
    app.metrics.observe(route, response.status().as_u16(), start.elapsed().as_secs_f64());
    response
}

async fn list_adapters(State(app): State<AppState>) -> Response {
    let start = Instant::now();
    let loaded = app.shared.loaded.lock().expect("loaded list").clone();
    let result = app.store.list().map_err(|e| ApiError::internal(format!("{e:#}"))).map(|entries| {
        let rows: Vec<Value> = entries.iter().map(|e| app.store.describe(e, loaded.contains(&e.name))).collect();
        axum::Json(json!({ "adapters": rows, "loaded": loaded })).into_response()
    });
    finish(&app, "adapters", start, result)
}

#[derive(Deserialize)]
struct UploadQuery {
    name: Option<String>,
}

/// `POST /v1/adapters?name=NAME` with the `.safetensors` file as the body.
async fn upload(State(app): State<AppState>, Query(q): Query<UploadQuery>, body: Bytes) -> Response {
    let start = Instant::now();
    let result = async {
        let name = q.name.ok_or_else(|| ApiError::bad_request("name", "give the adapter's name: POST /v1/adapters?name=NAME"))?;
        check_name(&name).map_err(|e| ApiError::bad_request("name", e.to_string()))?;
        if app.store.get(&name).is_some() {
            return Err(ApiError::new(StatusCode::CONFLICT, Some("name"), format!("`{name}` is already in the store; DELETE it first")));
        }
        if body.is_empty() {
            return Err(ApiError::bad_request("body", "empty: send the .safetensors file as the request body"));
        }
        let staged = app.store.staging(&name);
        tokio::fs::write(&staged, &body).await.map_err(|e| ApiError::internal(format!("writing {}: {e}", staged.display())))?;
        let entry = app.submit(|tx| Job::Upload(name, tx)).await?;
        Ok((StatusCode::CREATED, axum::Json(app.store.describe(&entry, false))).into_response())
    }
    .await;
    finish(&app, "upload", start, result)
}

async fn remove(State(app): State<AppState>, Path(name): Path<String>) -> Response {
    let start = Instant::now();
    let result = async {
        check_name(&name).map_err(|e| ApiError::bad_request("name", e.to_string()))?;
        app.submit(|tx| Job::Delete(name.clone(), tx)).await?;
        Ok(axum::Json(json!({ "deleted": name })).into_response())
    }
    .await;
    finish(&app, "delete", start, result)
}

async fn metrics(State(app): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.encode()).into_response()
}

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

pub fn router(app: AppState, max_upload_bytes: usize) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/v1/generate", post(generate))
        .route("/v1/adapters", get(list_adapters).post(upload))
        .route("/v1/adapters/{name}", delete(remove))
        .layer(DefaultBodyLimit::max(max_upload_bytes))
        .with_state(app)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_bodies_name_the_field() {
        let err = GenerateBody::parse(br#"{"prompt": "a", "stpes": 3}"#).unwrap_err();
        assert_eq!((err.status, err.field.as_deref()), (StatusCode::BAD_REQUEST, Some("stpes")));
        let err = GenerateBody::parse(br#"{"steps": 3}"#).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("prompt"));
        let err = GenerateBody::parse(b"{not json").unwrap_err();
        assert_eq!(err.field.as_deref(), Some("body"));
        let bad = |body: &str| GenerateBody::parse(body.as_bytes()).unwrap().into_job().unwrap_err().field.unwrap();
        assert_eq!(bad(r#"{"prompt": "a", "steps": 0}"#), "steps");
        assert_eq!(bad(r#"{"prompt": "a", "width": 0}"#), "width");
        assert_eq!(bad(r#"{"prompt": "a", "scheduler": "plms"}"#), "scheduler");
        assert_eq!(bad(r#"{"prompt": "a", "adapters": [{"name": "../x"}]}"#), "adapters[0].name");
        assert_eq!(bad(r#"{"prompt": "a", "adapters": [{"name": "x"}, {"name": "x"}]}"#), "adapters[1].name");
        assert_eq!(bad(r#"{"prompt": "a", "format": "gif"}"#), "format");
        let (job, json) = GenerateBody::parse(br#"{"prompt": "a", "adapters": [{"name": "x", "weight": 0.5}]}"#).unwrap().into_job().unwrap();
        assert!(!json);
        assert_eq!((job.request.steps, job.request.guidance_scale, job.adapters), (50, 7.5, vec![("x".to_string(), 0.5)]));
    }
}
