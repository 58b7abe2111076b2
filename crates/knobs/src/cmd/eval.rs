//! `knobs eval`: generate with a model (plus any adapters) and measure the images with the
//! judge. Without a subject: base-model quality on a fixed prompt set covering every shape x
//! colour. With `--concept NAME` (a held-out concept) or `--instance-dir DIR` (the user's own
//! images with their prompts): DreamBooth's measures for that subject (subject and prompt
//! fidelity, prior preservation, language drift, diversity).
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};
use knobs_diffusion::clip::embeddings;
use knobs_diffusion::pipeline::{GenerateRequest, SchedulerKind, StableDiffusion};
use knobs_world::concept::{by_name, held_out};
use knobs_world::judge::metrics::{
    base_quality, base_quality_prompts, diversity, drift_threshold, language_drift, other_class_prompts, prior_preservation,
    prompt_fidelity, subject_fidelity,
};
use knobs_world::judge::{Judge, Judged};
use knobs_world::{Background, PromptAttributes, parse_prompt};
use serde_json::{Map, Value, json};

use super::generate::{AdapterArgs, to_rgb};
use super::judge::load_judge;
use super::subject::{FolderArgs, Subject};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The model to evaluate: a diffusers pipeline folder (a DreamBooth output, or the base);
    /// default: the built-in base model (models/knobs-base, found at run time).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub adapters: AdapterArgs,
    /// A held-out concept (`knobs world concepts --list`); without it or --instance-dir,
    /// base-model quality.
    #[arg(long, conflicts_with = "instance_dir")]
    pub concept: Option<String>,
    #[command(flatten)]
    pub folder: FolderArgs,
    /// The subject's word in prompts (default: the first --embedding's token, else the
    /// concept's own token, e.g. `sks`).
    #[arg(long, conflicts_with = "instance_dir")]
    pub token: Option<String>,
    /// The model prior preservation compares with. Default: for adapters, the same model
    /// without them; for a full model, models/knobs-base if it exists.
    #[arg(long)]
    pub base_model: Option<PathBuf>,
    /// Images generated per prompt.
    #[arg(long, default_value_t = 4)]
    pub images_per_prompt: usize,
    /// Denoising steps.
    #[arg(long, default_value_t = 25)]
    pub steps: usize,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 5.0)]
    pub guidance: f64,
    /// ddim, euler, euler-a or ddpm (default: the model's own).
    #[arg(long)]
    pub scheduler: Option<SchedulerKind>,
    /// Seeds every prompt's batch (the same noise for the same prompt across models).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Judge folder (default: models/judge).
    #[arg(long)]
    pub judge: Option<PathBuf>,
    /// Write every generated image to one PNG: a row per prompt (instance images first).
    #[arg(long, value_name = "PNG")]
    pub save_grid: Option<PathBuf>,
    /// Print exactly one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Loads a pipeline folder or single file, naming the flag it came from in errors.
fn load_pipeline(dir: &Path, flag: &str) -> Result<StableDiffusion> {
    if !dir.exists() {
        bail!("{flag} {}: model folder not found", dir.display());
    }
    let mut sd = StableDiffusion::load(dir, &knobs_nn::device::inference()).with_context(|| format!("{flag} {}", dir.display()))?;
    knobs_nn::ModuleExt::for_inference(&mut sd);
    Ok(sd)
}

/// The images of one prompt and what the judge made of them.
struct Batch {
    attributes: PromptAttributes,
    images: Vec<RgbImage>,
    judged: Vec<Judged>,
}

impl Batch {
    fn embeddings(&self) -> Vec<Vec<f32>> {
        self.judged.iter().map(|j| j.embedding.clone()).collect()
    }
    fn items(&self) -> Vec<(PromptAttributes, knobs_world::judge::Prediction)> {
        self.judged.iter().map(|j| (self.attributes, j.prediction)).collect()
    }
}

struct Generator<'a> {
    args: &'a Args,
    judge: &'a Judge,
    bar: ProgressBar,
    generate_seconds: f64,
    judge_seconds: f64,
    images: usize,
}

impl Generator<'_> {
    fn run(&mut self, sd: &StableDiffusion, prompts: &[String]) -> Result<Vec<Batch>> {
        let mut out = Vec::with_capacity(prompts.len());
        for prompt in prompts {
            self.bar.set_message(prompt.clone());
            let req = GenerateRequest {
                prompt: prompt.clone(),
                steps: self.args.steps,
                guidance_scale: self.args.guidance,
                scheduler: self.args.scheduler,
                num_images: self.args.images_per_prompt,
                seed: self.args.seed,
                ..Default::default()
            };
            let start = Instant::now();
            let images = to_rgb(sd.generate(&req).with_context(|| format!("generating \"{prompt}\""))?)?;
            self.generate_seconds += start.elapsed().as_secs_f64();
            let start = Instant::now();
            let judged = self.judge.judge(&images);
            self.judge_seconds += start.elapsed().as_secs_f64();
            self.images += images.len();
            self.bar.inc(1);
            out.push(Batch { attributes: parse_prompt(prompt), images, judged });
        }
        Ok(out)
    }
}

fn all<T: Clone>(batches: &[Batch], f: impl Fn(&Batch) -> Vec<T>) -> Vec<T> {
    batches.iter().flat_map(f).collect()
}

/// Mean over prompts of the diversity among that prompt's images.
fn mean_diversity(batches: &[Batch]) -> f64 {
    let v: Vec<f64> = batches.iter().map(|b| diversity(&b.embeddings())).filter(|d| !d.is_nan()).collect();
    if v.is_empty() { f64::NAN } else { v.iter().sum::<f64>() / v.len() as f64 }
}

fn num(x: f64) -> Value {
    // NaN (not measurable, e.g. diversity of one image) becomes null.
    Value::from(x)
}

fn fmt(x: f64) -> String {
    if x.is_nan() { "n/a".into() } else { format!("{x:.4}") }
}

/// The subject's word: --token, else the first embedding's token, else the concept's.
fn subject_token(args: &Args, concept: &knobs_world::ConceptSpec) -> Result<String> {
    if let Some(t) = &args.token {
        ensure!(!t.trim().is_empty(), "--token must not be empty");
        return Ok(t.clone());
    }
    if let Some(path) = args.adapters.embedding.first() {
        let emb = embeddings::read(path, None).with_context(|| format!("--embedding {}", path.display()))?;
        return Ok(emb.token);
    }
    Ok(concept.token.clone())
}

fn default_base_model() -> Option<PathBuf> {
    knobs_train::builtin::dir(knobs_train::builtin::BASE_MODEL)
}

pub fn run(args: Args) -> Result<()> {
    ensure!(args.images_per_prompt >= 1, "--images-per-prompt must be at least 1");
    ensure!(args.steps >= 1, "--steps must be at least 1");
    let subject = match (&args.concept, &args.folder.instance_dir) {
        (Some(name), _) => {
            let spec = by_name(name).ok_or_else(|| {
                let names: Vec<String> = held_out().into_iter().map(|c| c.name).collect();
                anyhow::anyhow!("--concept {name}: unknown concept; the held-out concepts are {}", names.join(", "))
            })?;
            let token = subject_token(&args, &spec)?;
            Some((Subject::concept(spec, &token), Some(token)))
        }
        (None, Some(_)) => args.folder.subject()?.map(|s| (s, None)),
        (None, None) => None,
    };
    let model = knobs_train::builtin::model_or_default(args.model.as_deref())?;
    let judge = load_judge(args.judge.as_deref())?;
    let load_start = Instant::now();
    let mut sd = load_pipeline(&model, "--model")?;
    args.adapters.apply(&mut sd)?;
    let mut load_seconds = load_start.elapsed().as_secs_f64();

    let mut settings = json!({
        "model": model.display().to_string(),
        "lora": args.adapters.lora,
        "hypernetwork": args.adapters.hypernetwork,
        "embedding": args.adapters.embedding.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "images_per_prompt": args.images_per_prompt,
        "steps": args.steps,
        "guidance": args.guidance,
        "scheduler": args.scheduler.unwrap_or_else(|| sd.default_scheduler()).name(),
        "seed": args.seed,
        "judge": super::judge::judge_dir(args.judge.as_deref()).display().to_string(),
    });

    let bar = if args.json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0).with_style(ProgressStyle::with_template("eval [{bar:30}] {pos}/{len} prompts {msg}").unwrap())
    };
    let mut runner = Generator { args: &args, judge: &judge, bar, generate_seconds: 0.0, judge_seconds: 0.0, images: 0 };
    let mut out = Map::new();
    let mut details = Map::new();
    let mut grid_rows: Vec<Vec<RgbImage>> = Vec::new();
    let mut lines: Vec<String> = Vec::new();

    match &subject {
        None => {
            let prompts = base_quality_prompts();
            runner.bar.set_length(prompts.len() as u64);
            let batches = runner.run(&sd, &prompts)?;
            let items = all(&batches, Batch::items);
            let quality = base_quality(&items);
            let fidelity = prompt_fidelity(&items);
            let div = mean_diversity(&batches);
            out.insert("shape_colour_accuracy".into(), num(quality.shape_colour_accuracy));
            out.insert("background_accuracy".into(), num(quality.background_accuracy));
            out.insert("prompt_fidelity".into(), num(fidelity));
            out.insert("diversity".into(), num(div));
            details.insert("prompts".into(), prompts.len().into());
            lines.push(format!("base quality of {} on {} prompts (every shape x colour, with backgrounds)", model.display(), prompts.len()));
            lines.push(format!("shape_colour_accuracy {}", fmt(quality.shape_colour_accuracy)));
            lines.push(format!("background_accuracy   {}", fmt(quality.background_accuracy)));
            lines.push(format!("prompt_fidelity       {}", fmt(fidelity)));
            lines.push(format!("diversity             {}", fmt(div)));
            grid_rows.extend(batches.into_iter().map(|b| b.images));
        }
        Some((subject, token)) => {
            match (&args.folder.instance_dir, token) {
                (Some(dir), _) => settings["instance_dir"] = dir.display().to_string().into(),
                (None, token) => {
                    settings["concept"] = subject.name.clone().into();
                    settings["token"] = token.clone().into();
                }
            }
            settings["instance_prompt"] = subject.instance_prompt.clone().into();
            let instance_prompt = subject.instance_prompt.clone();
            let mut subject_prompts = vec![instance_prompt.clone()];
            subject_prompts.extend(Background::ALL.iter().map(|b| format!("{instance_prompt} on a {} background", b.name())));
            let class_prompt = subject.class_prompt.clone();
            let other_prompts = other_class_prompts(subject.class);

            // The reference for prior preservation.
            // LoRAs and hypernetworks change the model's function; embeddings only add tokens.
            let no_model_adapters = args.adapters.lora.is_empty() && args.adapters.hypernetwork.is_empty();
            let base_source: Option<(PathBuf, bool)> = match (&args.base_model, no_model_adapters, args.adapters.embedding.is_empty()) {
                (Some(p), _, _) => Some((p.clone(), true)),
                (None, false, _) => Some((model.clone(), false)),
                // Embeddings only add tokens: other-class prompts run exactly as in the base.
                (None, true, false) => None,
                (None, true, true) => default_base_model().map(|p| (p, true)),
            };
            let base_kind = match (&base_source, no_model_adapters, args.adapters.embedding.is_empty()) {
                (Some((p, true)), _, _) => format!("{}", p.display()),
                (Some((p, false)), _, _) => format!("{} without its adapters", p.display()),
                (None, true, false) => "the same pipeline (embeddings only add tokens, so other-class prompts are unchanged)".into(),
                (None, _, _) => "none (no --base-model and no models/knobs-base)".into(),
            };
            let mut base_sd = None;
            if let Some((dir, _)) = &base_source {
                let start = Instant::now();
                let flag = if args.base_model.is_some() { "--base-model" } else { "--model" };
                base_sd = Some(load_pipeline(dir, flag)?);
                load_seconds += start.elapsed().as_secs_f64();
            }
            let n_prompts = subject_prompts.len() + 1 + other_prompts.len() * (1 + usize::from(base_sd.is_some()));
            runner.bar.set_length(n_prompts as u64);

            let subject_batches = runner.run(&sd, &subject_prompts)?;
            let class = runner.run(&sd, std::slice::from_ref(&class_prompt))?;
            let other = runner.run(&sd, &other_prompts)?;
            let other_fidelity = prompt_fidelity(&all(&other, Batch::items));
            let base_other_fidelity = match &base_sd {
                Some(b) => {
                    let base_other = runner.run(b, &other_prompts)?;
                    let f = prompt_fidelity(&all(&base_other, Batch::items));
                    grid_rows.extend(base_other.iter().map(|b| b.images.clone()));
                    Some(f)
                }
                None if base_source.is_none() && !args.adapters.embedding.is_empty() && no_model_adapters => Some(other_fidelity),
                None => None,
            };

            let instances = subject.instance_images(judge.image_size())?;
            let start = Instant::now();
            let instance_emb: Vec<Vec<f32>> = judge.embed(&instances);
            runner.judge_seconds += start.elapsed().as_secs_f64();

            let subject_emb = all(&subject_batches, Batch::embeddings);
            let sf = subject_fidelity(&subject_emb, &instance_emb);
            let pf = prompt_fidelity(&all(&subject_batches, Batch::items));
            let pp = base_other_fidelity.map_or(f64::NAN, |b| prior_preservation(other_fidelity, b));
            let drift = language_drift(&class[0].embeddings(), &instance_emb);
            let div = diversity(&subject_batches[0].embeddings());
            out.insert("subject_fidelity".into(), num(sf));
            out.insert("prompt_fidelity".into(), num(pf));
            out.insert("prior_preservation".into(), num(pp));
            out.insert("language_drift".into(), num(drift));
            out.insert("diversity".into(), num(div));
            let threshold = drift_threshold(&instance_emb);
            details.insert("instance_prompt".into(), instance_prompt.clone().into());
            details.insert("subject_prompts".into(), subject_prompts.clone().into());
            details.insert("class_prompt".into(), class_prompt.clone().into());
            details.insert("other_class_prompts".into(), other_prompts.clone().into());
            details.insert("other_class_prompt_fidelity".into(), num(other_fidelity));
            details.insert("base_other_class_prompt_fidelity".into(), base_other_fidelity.map_or(Value::Null, num));
            details.insert("prior_preservation_base".into(), base_kind.clone().into());
            details.insert("drift_threshold".into(), num(threshold));
            details.insert("class_prompt_fidelity".into(), num(prompt_fidelity(&class[0].items())));
            details.insert("instance_images".into(), instances.len().into());

            lines.push(format!(
                "{} {} (\"{instance_prompt}\") with {}{}",
                if args.folder.instance_dir.is_some() { "instances" } else { "concept" },
                subject.name,
                model.display(),
                adapters_note(&args)
            ));
            lines.push(format!("subject_fidelity   {}   mean cosine to the {} instance images", fmt(sf), instances.len()));
            lines.push(format!("prompt_fidelity    {}   over the instance prompt and its 4 background variants", fmt(pf)));
            lines.push(format!(
                "prior_preservation {}   other-class prompt fidelity {} vs {} with the base ({base_kind})",
                fmt(pp),
                fmt(other_fidelity),
                base_other_fidelity.map_or("n/a".into(), fmt)
            ));
            lines.push(format!("language_drift     {}   \"{class_prompt}\" images at cosine >= {} to the instances", fmt(drift), fmt(threshold)));
            lines.push(format!("diversity          {}   mean pairwise 1 - cosine among \"{instance_prompt}\" images", fmt(div)));

            let mut rows = vec![instances];
            rows.extend(subject_batches.into_iter().map(|b| b.images));
            rows.extend(class.into_iter().map(|b| b.images));
            rows.extend(other.into_iter().map(|b| b.images));
            rows.append(&mut grid_rows);
            grid_rows = rows;
        }
    }
    runner.bar.finish_and_clear();

    if let Some(path) = &args.save_grid {
        let cols = grid_rows.iter().map(Vec::len).max().unwrap_or(1);
        let size = grid_rows.iter().flatten().next().map_or((1, 1), |i| i.dimensions());
        let mut cells = Vec::new();
        for row in &grid_rows {
            for k in 0..cols {
                // Resize to a common cell (instance images are rendered at the judge's size).
                cells.push(match row.get(k) {
                    Some(img) if img.dimensions() == size => img.clone(),
                    Some(img) => image::imageops::resize(img, size.0, size.1, image::imageops::FilterType::Triangle),
                    None => RgbImage::new(size.0, size.1),
                });
            }
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("--save-grid {}: cannot create the folder", dir.display()))?;
        }
        knobs_world::images::grid(&cells, cols)
            .save_with_format(path, image::ImageFormat::Png)
            .with_context(|| format!("--save-grid {}", path.display()))?;
        lines.push(format!("wrote {} ({} rows x {cols})", path.display(), grid_rows.len()));
    }

    let seconds = json!({
        "load": load_seconds,
        "generate": runner.generate_seconds,
        "judge": runner.judge_seconds,
        "images": runner.images,
    });
    if args.json {
        out.insert("settings".into(), settings);
        out.insert("details".into(), Value::Object(details));
        out.insert("seconds".into(), seconds);
        println!("{}", Value::Object(out));
    } else {
        for l in lines {
            println!("{l}");
        }
        println!(
            "{} images ({} per prompt, {} steps, guidance {}, seed {}) generated in {:.1} s, judged in {:.2} s",
            runner.images, args.images_per_prompt, args.steps, args.guidance, args.seed, runner.generate_seconds, runner.judge_seconds
        );
    }
    Ok(())
}

fn adapters_note(args: &Args) -> String {
    let mut parts = Vec::new();
    parts.extend(args.adapters.lora.iter().map(|l| format!("--lora {l}")));
    parts.extend(args.adapters.hypernetwork.iter().map(|h| format!("--hypernetwork {h}")));
    parts.extend(args.adapters.embedding.iter().map(|e| format!("--embedding {}", e.display())));
    if parts.is_empty() { String::new() } else { format!(" + {}", parts.join(" ")) }
}
