//! Training examples: the instance images (a built-in concept or a folder of png/jpg with
//! optional same-named `.txt` captions) and, for prior preservation, class images that the
//! base model generates once into a cache folder.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use image::imageops::FilterType;
use image::RgbImage;
use knobs_diffusion::pipeline::{GenerateRequest, StableDiffusion};
use knobs_world::concept::{ConceptSpec, DEFAULT_INSTANCES, by_name, held_out};
use knobs_world::images::from_tensor;
use rand::Rng;
use rand::rngs::StdRng;

use super::buckets::{Buckets, Size, cover};
use super::config::TrainConfig;
use crate::objective::ImageSizes;

#[derive(Debug, Clone)]
pub struct Example {
    /// Resized so that the shorter side is the training resolution; cropped per step.
    pub image: RgbImage,
    pub prompt: String,
    /// `(height, width)` before resizing (SDXL's `original_size`).
    pub original_size: (u32, u32),
    /// The `(width, height)` it trains at: the square resolution, or its bucket.
    pub size: Size,
}

impl Example {
    /// An image and its prompt, resized to `res` on the shorter side.
    pub fn new(image: RgbImage, prompt: String, res: u32) -> Self {
        let original_size = (image.height(), image.width());
        Example { image: resize_short_side(image, res), prompt, original_size, size: (res, res) }
    }

    /// An image and its prompt in the bucket nearest its ratio, resized to cover it.
    pub fn bucketed(image: RgbImage, prompt: String, buckets: &Buckets) -> Self {
        let original_size = (image.height(), image.width());
        let size = buckets.nearest(image.dimensions());
        Example { image: resize_to_cover(image, size), prompt, original_size, size }
    }
}

fn resize_to_cover(image: RgbImage, size: Size) -> RgbImage {
    let (w, h) = cover(image.dimensions(), size);
    if (w, h) == image.dimensions() { image } else { image::imageops::resize(&image, w, h, FilterType::CatmullRom) }
}

pub fn concept(name: &str) -> Result<ConceptSpec> {
    by_name(name).with_context(|| {
        let known: Vec<String> = held_out().into_iter().map(|c| c.name).collect();
        format!("--concept: unknown concept `{name}`; built-in concepts: {}", known.join(", "))
    })
}

fn resize_short_side(img: RgbImage, res: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if w.min(h) == res {
        return img;
    }
    let s = res as f64 / w.min(h) as f64;
    let (nw, nh) = (((w as f64 * s).round() as u32).max(res), ((h as f64 * s).round() as u32).max(res));
    image::imageops::resize(&img, nw, nh, FilterType::CatmullRom)
}

/// The instance examples with their prompts (`--instance-prompt` overrides per-image captions;
/// `--caption-prefix` goes before each).
pub fn instance_examples(cfg: &TrainConfig, res: u32) -> Result<Vec<Example>> {
    instance_examples_with(cfg, res, &|image, prompt| Example::new(image, prompt, res))
}

/// [`instance_examples`], each in the bucket nearest its ratio (`--bucket`).
pub fn instance_examples_bucketed(cfg: &TrainConfig, res: u32, buckets: &Buckets) -> Result<Vec<Example>> {
    instance_examples_with(cfg, res, &|image, prompt| Example::bucketed(image, prompt, buckets))
}

type MakeExample<'a> = &'a dyn Fn(RgbImage, String) -> Example;

fn instance_examples_with(cfg: &TrainConfig, res: u32, make: MakeExample) -> Result<Vec<Example>> {
    let mut examples = instance_examples_as_given(cfg, res, make)?;
    if let Some(prefix) = &cfg.data.caption_prefix {
        for ex in &mut examples {
            ex.prompt = format!("{prefix} {}", ex.prompt);
        }
    }
    Ok(examples)
}

fn instance_examples_as_given(cfg: &TrainConfig, res: u32, make: MakeExample) -> Result<Vec<Example>> {
    if let Some(name) = &cfg.data.concept {
        let spec = concept(name)?;
        let prompt = cfg.data.instance_prompt.clone().unwrap_or_else(|| spec.instance_prompt());
        return Ok(spec.instance_images(DEFAULT_INSTANCES, res).into_iter().map(|(image, _)| make(image, prompt.clone())).collect());
    }
    let dir = cfg.data.instance_dir.as_ref().expect("validated: concept or instance dir");
    image_files(dir, "--instance-dir")?
        .iter()
        .map(|path| {
            let image = open_rgb(path)?;
            let caption = path.with_extension("txt");
            let prompt = match (&cfg.data.instance_prompt, caption.exists()) {
                (Some(p), _) => p.clone(),
                (None, true) => std::fs::read_to_string(&caption).with_context(|| format!("{}: cannot read", caption.display()))?.trim().to_string(),
                (None, false) => bail!("{}: no caption file {} and no --instance-prompt", path.display(), caption.display()),
            };
            Ok(make(image, prompt))
        })
        .collect()
}

/// The .png / .jpg files of an image folder, sorted by name; an error naming `flag` when there
/// are none.
pub fn image_files(dir: &Path, flag: &str) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{flag} {}: cannot read", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()).map(str::to_lowercase).as_deref(), Some("png" | "jpg" | "jpeg")))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{flag} {}: no .png or .jpg images", dir.display());
    }
    Ok(files)
}

/// An image file as RGB, naming the file when it cannot be decoded.
pub fn open_rgb(path: &Path) -> Result<RgbImage> {
    Ok(image::open(path).with_context(|| format!("{}: cannot decode image", path.display()))?.to_rgb8())
}

/// A `res` x `res` crop (centred or random) with an optional random horizontal flip.
pub fn crop(ex: &Example, res: u32, center: bool, flip: bool, rng: &mut StdRng) -> RgbImage {
    crop_sized(ex, res, center, flip, rng).0
}

/// [`crop`], also giving the image's SDXL sizes: its original size and the crop's top-left
/// corner in the resized image, as diffusers' SDXL scripts count it (they flip before
/// cropping, so a flipped crop's left edge is measured from the other side).
pub fn crop_sized(ex: &Example, res: u32, center: bool, flip: bool, rng: &mut StdRng) -> (RgbImage, ImageSizes) {
    crop_to(ex, (res, res), center, flip, rng)
}

/// [`crop_sized`] to a `(width, height)`; an image that does not cover it (a square class
/// image in a bucket) is first resized to cover it.
pub fn crop_to(ex: &Example, (cw, ch): Size, center: bool, flip: bool, rng: &mut StdRng) -> (RgbImage, ImageSizes) {
    let (w, h) = ex.image.dimensions();
    let resized;
    let (image, (w, h)) = if w < cw || h < ch {
        resized = resize_to_cover(ex.image.clone(), (cw, ch));
        let dims = resized.dimensions();
        (&resized, dims)
    } else {
        (&ex.image, (w, h))
    };
    let (x, y) = if center { ((w - cw) / 2, (h - ch) / 2) } else { (rng.random_range(0..=w - cw), rng.random_range(0..=h - ch)) };
    let mut out = image::imageops::crop_imm(image, x, y, cw, ch).to_image();
    let mut left = x;
    if flip && rng.random_bool(0.5) {
        out = image::imageops::flip_horizontal(&out);
        left = w - cw - x;
    }
    (out, ImageSizes { original: ex.original_size, crop_top_left: (y, left) })
}

fn class_image_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("class-{i:05}.png"))
}

/// The class images of `cfg.data.class_prompt`, generated by the base model into
/// `cfg.class_dir()` where missing (diffusers' DreamBooth does the same). Deterministic:
/// image `i` uses seed `i`, so an interrupted generation resumes where it stopped.
pub fn class_examples(cfg: &TrainConfig, model: &Path, res: u32) -> Result<Vec<Example>> {
    let prompt = cfg.data.class_prompt.clone().expect("prior preservation needs a class prompt");
    let dir = cfg.class_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create class image folder {}", dir.display()))?;
    let missing: Vec<usize> = (0..cfg.data.num_class_images).filter(|&i| !class_image_path(&dir, i).exists()).collect();
    if !missing.is_empty() {
        let sd = StableDiffusion::load(model, &knobs_nn::device::inference())?;
        for i in missing {
            let mut req = GenerateRequest::new(prompt.clone());
            req.steps = cfg.run.sample_steps;
            req.guidance_scale = cfg.run.guidance_scale;
            req.seed = i as u64;
            let img = from_tensor(sd.generate(&req)?.mul_scalar(2.0).sub_scalar(1.0))?.remove(0);
            let bytes = knobs_world::dataset::encode_png(&img)?;
            knobs_world::dataset::write_atomic(&class_image_path(&dir, i), &bytes)?;
        }
    }
    (0..cfg.data.num_class_images)
        .map(|i| {
            let path = class_image_path(&dir, i);
            let image = image::open(&path).with_context(|| format!("{}: cannot decode class image", path.display()))?.to_rgb8();
            Ok(Example::new(image, prompt.clone(), res))
        })
        .collect()
}
