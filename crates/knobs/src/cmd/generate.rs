//! `knobs generate`: text to image with a diffusers Stable Diffusion folder. Loading the
//! pipeline ([`load`]), building the request ([`request`]) and sampling ([`generate`]) are
//! separate steps, so adapters and embeddings can be attached to the loaded pipeline before
//! sampling.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use image::{ImageFormat, RgbImage};
use indicatif::{ProgressBar, ProgressStyle};
use knobs_diffusion::loaders::PipelineAdapters;
use knobs_diffusion::pipeline::{GenerateRequest, SchedulerKind, StableDiffusion};
use knobs_nn::burn::tensor::TensorData;
use knobs_nn::io::{FloatDtype, read_safetensors};
use knobs_nn::Tensor;
use knobs_train::finetune::config::MixedPrecision;

/// The adapter flags `generate` and `eval` share, and applying them to a loaded pipeline.
#[derive(clap::Args, Debug, Clone)]
pub struct AdapterArgs {
    /// A LoRA to apply: a PEFT folder, or a diffusers or kohya .safetensors file; `:SCALE`
    /// sets its weight (default 1). Several are applied together, as diffusers' `set_adapters`.
    #[arg(long = "lora", value_name = "PATH[:SCALE]")]
    pub lora: Vec<String>,
    /// A textual-inversion embedding: diffusers `learned_embeds.safetensors` or an A1111
    /// safetensors file (its token is the file name without extension).
    #[arg(long = "embedding", value_name = "PATH")]
    pub embedding: Vec<PathBuf>,
    /// An A1111-style hypernetwork (.safetensors, as `knobs train --method hypernetwork`
    /// writes it; pickled .pt files are refused); `:STRENGTH` is A1111's multiplier (default
    /// 1, 0 is the base model). Several are applied one after another.
    #[arg(long = "hypernetwork", value_name = "PATH[:STRENGTH]")]
    pub hypernetwork: Vec<String>,
}

impl AdapterArgs {
    /// Loads every `--lora` onto the components it carries weights for, adds the embeddings
    /// and attaches the hypernetworks, all through one [`PipelineAdapters`], then takes the
    /// pipeline out of autodiff: loaded weights still carry autodiff state, and sampling is
    /// measurably faster without it.
    pub fn apply(&self, sd: &mut StableDiffusion) -> Result<PipelineAdapters> {
        let mut adapters = PipelineAdapters::new(0);
        for (i, spec) in self.lora.iter().enumerate() {
            let (path, scale) = lora_spec(spec);
            adapters.load_lora(sd, &path, &format!("lora{i}"), scale).with_context(|| format!("--lora {}", path.display()))?;
            tracing::info!("attached {} with scale {scale}", path.display());
        }
        adapters.activate_all(sd)?;
        for path in &self.embedding {
            let (emb, ids) = adapters.load_embedding(sd, path)?;
            tracing::info!("token {} ({} vectors, ids {ids:?}) from {}", emb.token, emb.vectors.len(), path.display());
        }
        // The last one attached transforms the context first, so they are attached in
        // reverse: the first given is applied first, as A1111 applies its list.
        for (i, spec) in self.hypernetwork.iter().enumerate().rev() {
            let (path, strength) = lora_spec(spec);
            let layers = adapters.load_hypernetwork(sd, &path, &format!("hypernetwork{i}"), strength).with_context(|| format!("--hypernetwork {}", path.display()))?;
            tracing::info!("attached {} to {} layers with strength {strength}", path.display(), layers.len());
        }
        knobs_nn::ModuleExt::for_inference(sd);
        Ok(adapters)
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// A diffusers pipeline folder (model_index.json, tokenizer/, text_encoder/, unet/, vae/,
    /// scheduler/; SDXL also tokenizer_2/, text_encoder_2/) or a single-file SD-1.x/2.x/SDXL `.safetensors` checkpoint; default: the built-in base model (models/knobs-base, found at run time).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// What to draw.
    #[arg(long)]
    pub prompt: String,
    /// What to steer away from (the unconditional branch of classifier-free guidance). On
    /// SDXL, none (or "") gives zero embeddings when the model sets
    /// `force_zeros_for_empty_prompt`, as diffusers without a negative prompt.
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// SDXL: the prompt of the second text encoder (default: --prompt).
    #[arg(long)]
    pub prompt_2: Option<String>,
    /// SDXL: the negative prompt of the second text encoder (default: --negative-prompt).
    #[arg(long)]
    pub negative_prompt_2: Option<String>,
    /// SDXL micro-conditioning: the size HEIGHTxWIDTH the image is meant to come from
    /// (default: the output size; smaller values look like upscaled small images).
    #[arg(long, value_name = "HxW", value_parser = parse_size)]
    pub original_size: Option<(usize, usize)>,
    /// SDXL: the top-left corner TOP,LEFT of the crop the image is meant to be (default 0,0:
    /// centred, uncropped subjects).
    #[arg(long, value_name = "TOP,LEFT", value_parser = parse_crop)]
    pub crop: Option<(usize, usize)>,
    /// SDXL: the target size HEIGHTxWIDTH (default: the output size).
    #[arg(long, value_name = "HxW", value_parser = parse_size)]
    pub target_size: Option<(usize, usize)>,
    /// Denoising steps.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Classifier-free guidance scale; 1 or less turns guidance off.
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// ddim, euler, euler-a or ddpm (default: the model's own scheduler, DDIM if unsupported).
    #[arg(long)]
    pub scheduler: Option<SchedulerKind>,
    /// Seeds the initial noise and the noise of stochastic samplers.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Initial latents: a safetensors file with a `latents` tensor [N, C, H/f, W/f] of unit
    /// variance (diffusers' `latents=`); fixes the size and number of images.
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Image height in pixels (default: from the model).
    #[arg(long)]
    pub height: Option<usize>,
    /// Image width in pixels (default: from the model).
    #[arg(long)]
    pub width: Option<usize>,
    /// Number of images; with more than one, each is written as OUT-<i>.png and OUT is a grid.
    #[arg(long)]
    pub num_images: Option<usize>,
    #[command(flatten)]
    pub adapters: AdapterArgs,
    /// Keep the weight matrices and kernels in f32, f16 or bf16 (computed with in f32): half the
    /// memory; exact for f16 when the model's files are fp16. Default: f32, except the UNet's
    /// and VAE's under `--mixed-precision bf16` on a CPU with AMX, kept in bf16 (their
    /// products round them to bf16 anyway: the same images, at half their memory).
    #[arg(long)]
    pub weights_dtype: Option<FloatDtype>,
    /// Compute the UNet in bf16 or fp16 (and, under bf16, the VAE too), over the weights as
    /// kept: what a diffusers pipeline loaded with `torch_dtype=torch.bfloat16` computes. On
    /// CPUs with AVX512-BF16 or AMX the products run in bf16 (see the README's "Speed").
    #[arg(long, value_enum, default_value_t = MixedPrecision::No)]
    pub mixed_precision: MixedPrecision,
    /// Output PNG file.
    #[arg(long)]
    pub out: PathBuf,
}

fn parse_pair(s: &str, sep: char, what: &str) -> std::result::Result<(usize, usize), String> {
    let bad = || format!("`{s}`: expected {what}, two whole numbers such as 1024{sep}768");
    let (a, b) = s.split_once(sep).ok_or_else(bad)?;
    Ok((a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?))
}

/// `HEIGHTxWIDTH`.
fn parse_size(s: &str) -> std::result::Result<(usize, usize), String> {
    parse_pair(s, 'x', "HEIGHTxWIDTH")
}

/// `TOP,LEFT`.
fn parse_crop(s: &str) -> std::result::Result<(usize, usize), String> {
    parse_pair(s, ',', "TOP,LEFT")
}

/// `PATH[:SCALE]`; a suffix that is not a number belongs to the path.
pub fn lora_spec(spec: &str) -> (PathBuf, f32) {
    match spec.rsplit_once(':') {
        Some((path, scale)) if !path.is_empty() => match scale.parse() {
            Ok(s) => (PathBuf::from(path), s),
            Err(_) => (PathBuf::from(spec), 1.0),
        },
        _ => (PathBuf::from(spec), 1.0),
    }
}

/// Loads the pipeline named by `--model` for one generation: the UNet's weights are read
/// once the prompt is encoded and the text encoders are gone ([`generate`]).
pub fn load(args: &Args) -> Result<StableDiffusion> {
    let start = Instant::now();
    let model = knobs_train::builtin::model_or_default(args.model.as_deref())?;
    // Errors already name the folder or file at fault.
    // Narrowed as it loads, before adapters attach: only the model's own weights are.
    let weights = args.mixed_precision.generation_weights(args.weights_dtype);
    let mut sd = StableDiffusion::load_for_one_generation(&model, &knobs_nn::device::inference(), weights)?;
    args.mixed_precision.apply(&mut sd);
    if args.scheduler.is_none() && sd.default_scheduler_is_substitute() {
        tracing::warn!("the model's scheduler {} is not implemented; sampling with ddim", sd.scheduler_class);
    }
    tracing::info!("loaded {} in {:.2} s", model.display(), start.elapsed().as_secs_f64());
    Ok(sd)
}

/// Reads `--latents`: key `latents`, a 4-D float tensor.
fn read_latents(path: &Path) -> Result<Tensor<4>> {
    let file = read_safetensors(path)?;
    let (values, shape) = file.f32("latents")?;
    let Ok(shape4) = <[usize; 4]>::try_from(shape.as_slice()) else {
        bail!("{}: key `latents`: shape {shape:?}, need 4 dimensions [N, C, H, W]", path.display());
    };
    Ok(Tensor::from_data(TensorData::new(values, shape4), &knobs_nn::device::inference()))
}

/// The request the arguments describe, checked against the loaded model.
pub fn request(args: &Args, sd: &StableDiffusion) -> Result<GenerateRequest> {
    let latents = args.latents.as_deref().map(read_latents).transpose()?;
    let num_images = match (&latents, args.num_images) {
        (Some(l), None) => l.dims()[0],
        (_, n) => n.unwrap_or(1),
    };
    let req = GenerateRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        steps: args.steps,
        guidance_scale: args.guidance,
        scheduler: args.scheduler,
        height: args.height,
        width: args.width,
        num_images,
        seed: args.seed,
        latents,
        prompt_2: args.prompt_2.clone(),
        negative_prompt_2: args.negative_prompt_2.clone(),
        original_size: args.original_size,
        crop_top_left: args.crop,
        target_size: args.target_size,
        conditioning: None,
    };
    if let (false, Some(field)) = (sd.is_sdxl(), req.sdxl_fields().first()) {
        let flag = if *field == "crop_top_left" { "--crop".to_string() } else { format!("--{}", field.replace('_', "-")) };
        bail!("{flag} is SDXL conditioning; {} is an SD-1.x/2.x model", sd.dir.display());
    }
    if let Err(e) = sd.latent_shape(&req) {
        match &args.latents {
            Some(p) => bail!("{}: key `latents`: {e}", p.display()),
            None => return Err(e.into()),
        }
    }
    Ok(req)
}

/// Samples with a progress bar; images `[N, 3, H, W]` in [0, 1]. The text encoders are
/// released once the prompt is encoded and the UNet once the latents are denoised
/// (`generate_once`): nothing here runs them again.
pub fn generate(sd: &mut StableDiffusion, req: &GenerateRequest) -> Result<Tensor<4>> {
    let bar = ProgressBar::new(req.steps as u64);
    bar.set_style(ProgressStyle::with_template("denoise [{bar:30}] {pos}/{len} {per_sec} eta {eta}").unwrap());
    let images = sd.generate_once(req, &mut |done, _| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    Ok(images)
}

/// 8-bit RGB images as diffusers' `numpy_to_pil`: `round(x * 255)`.
pub fn to_rgb(images: Tensor<4>) -> Result<Vec<RgbImage>> {
    let [n, c, h, w] = images.dims();
    if c != 3 {
        bail!("the VAE produced {c} channels; PNG output needs 3");
    }
    let v: Vec<f32> = images.into_data().convert::<f32>().try_into_vec().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let plane = h * w;
    Ok((0..n)
        .map(|i| {
            RgbImage::from_fn(w as u32, h as u32, |x, y| {
                let at = |ch: usize| {
                    let p = v[(i * 3 + ch) * plane + y as usize * w + x as usize];
                    (p.clamp(0.0, 1.0) * 255.0).round() as u8
                };
                image::Rgb([at(0), at(1), at(2)])
            })
        })
        .collect())
}

/// The images side by side in a near-square grid (row-major), black where a row is short.
pub fn grid(images: &[RgbImage]) -> RgbImage {
    let n = images.len() as u32;
    let cols = (n as f64).sqrt().ceil() as u32;
    let rows = n.div_ceil(cols);
    let (w, h) = images[0].dimensions();
    let mut out = RgbImage::new(cols * w, rows * h);
    for (i, img) in images.iter().enumerate() {
        let i = i as u32;
        image::imageops::replace(&mut out, img, ((i % cols) * w) as i64, ((i / cols) * h) as i64);
    }
    out
}

fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    img.save_with_format(path, ImageFormat::Png).with_context(|| format!("writing {}", path.display()))
}

/// Writes `out` (one image, or the grid) and, for several images, `out-<i>.png` beside it.
pub fn save(images: &[RgbImage], out: &Path) -> Result<Vec<PathBuf>> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut written = Vec::new();
    if images.len() > 1 {
        let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
        let ext = out.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_else(|| "png".into());
        for (i, img) in images.iter().enumerate() {
            let path = out.with_file_name(format!("{stem}-{i}.{ext}"));
            save_png(img, &path)?;
            written.push(path);
        }
        save_png(&grid(images), out)?;
    } else {
        save_png(&images[0], out)?;
    }
    written.push(out.to_path_buf());
    Ok(written)
}

pub fn run(args: Args) -> Result<()> {
    let loading = Instant::now();
    let mut sd = load(&args)?;
    args.adapters.apply(&mut sd)?;
    let req = request(&args, &sd)?;
    let start = Instant::now();
    let images = generate(&mut sd, &req)?;
    let secs = start.elapsed().as_secs_f64();
    // The UNet's weights are read inside the call, once the prompt is encoded.
    let with_load = loading.elapsed().as_secs_f64();
    let [n, _, h, w] = images.dims();
    let written = save(&to_rgb(images)?, &args.out)?;
    let scheduler = req.scheduler.unwrap_or_else(|| sd.default_scheduler());
    println!("{n} image(s) {w}x{h}, {} {scheduler} steps, guidance {}, seed {}: {secs:.2} s ({with_load:.2} s with the load)", req.steps, req.guidance_scale, req.seed);
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(())
}
