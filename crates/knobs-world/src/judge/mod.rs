//! The judge: a small CNN that reads a 32x32 image of the world back into its attributes
//! (shape, colour, background, size, position) and gives an image embedding that tells
//! concepts apart. It reads RGB plus a silhouette channel (each pixel's distance from the
//! border's median colour, see `data::network_input`); images of other sizes are resized. `metrics` turns its outputs into the DreamBooth paper's measures (subject
//! and prompt fidelity, prior preservation, language drift, diversity) and a base-model
//! quality score.
//!
//! A judge folder holds `config.json` (architecture, embedding rule, how it was trained and
//! its held-out accuracy) and `judge.safetensors`. The committed one is `models/judge`.
pub mod data;
pub mod metrics;
pub mod model;
pub mod train;

use std::borrow::Cow;
use std::path::Path;

use anyhow::{Context, Result, bail};
use image::RgbImage;
use knobs_nn::burn::tensor::TensorData;
use knobs_nn::burn::tensor::activation::softmax;
use knobs_nn::io::{LoadOptions, load_state_dict, read_safetensors};
use knobs_nn::{ModuleExt, Tensor, cpu};
use serde::{Deserialize, Serialize};

use crate::caption::PromptAttributes;
use crate::concept::Pattern;
use crate::scene::{Attributes, Background, Colour, Position, Shape, Size};
use model::{HEADS, JudgeNet, NetConfig};

pub use metrics::*;

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "judge.safetensors";
pub const FORMAT: &str = "knobs-judge";
/// Images per forward pass at inference.
const CHUNK: usize = 256;

/// How the embedding is built from one forward pass: the feature (what the attribute heads
/// and the auxiliary pattern / mark heads read, so it knows patterns and marks, not only
/// attributes) and the channel-mean of the texture stage, each centred on its mean over
/// generic world images (so that cosines measure what is specific to an image rather than what
/// every image shares), L2-normalised, scaled by its weight, concatenated and renormalised.
///
/// The default weighs the texture part 0: measured on the held-out concepts, the centred
/// feature alone separates a concept from plain objects of its class and colour and from the
/// other concepts best (see the crate's `judge` tests); adding the texture means narrowed
/// both gaps. The part stays in the rule so a judge can be re-weighed without retraining.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingRule {
    pub feature_weight: f32,
    pub texture_weight: f32,
    /// Subtracted from the feature (empty: nothing).
    #[serde(default)]
    pub feature_centre: Vec<f32>,
    /// Subtracted from the texture channel-means (empty: nothing).
    #[serde(default)]
    pub texture_centre: Vec<f32>,
}

impl Default for EmbeddingRule {
    fn default() -> Self {
        EmbeddingRule { feature_weight: 1.0, texture_weight: 0.0, feature_centre: Vec::new(), texture_centre: Vec::new() }
    }
}

/// Images the embedding centres are the mean over: clean draws of the training distribution
/// (base scenes and procedural concepts) from a stream training never uses.
pub const CENTRE_IMAGES: usize = 1024;

/// One head's classes, for readers of `config.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeadInfo {
    pub name: String,
    pub classes: Vec<String>,
}

/// `config.json` of a judge folder.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JudgeFile {
    pub format: String,
    pub version: u32,
    pub net: NetConfig,
    pub embedding: EmbeddingRule,
    pub heads: Vec<HeadInfo>,
    #[serde(default)]
    pub training: Option<train::TrainRecord>,
}

fn class_names(head: usize) -> Vec<String> {
    let names = |v: Vec<&str>| v.into_iter().map(String::from).collect();
    match head {
        model::SHAPE => names(Shape::ALL.iter().map(|s| s.name()).collect()),
        model::COLOUR => names(Colour::ALL.iter().map(|s| s.name()).collect()),
        model::BACKGROUND => names(Background::ALL.iter().map(|s| s.name()).collect()),
        model::SIZE => names(Size::ALL.iter().map(|s| s.name()).collect()),
        model::POSITION => names(Position::ALL.iter().map(|s| s.name()).collect()),
        model::PATTERN => names(std::iter::once("none").chain(Pattern::KINDS).collect()),
        _ => names(vec!["none", "mark"]),
    }
}

impl JudgeFile {
    pub fn new(net: NetConfig, training: Option<train::TrainRecord>) -> Self {
        let heads = HEADS.iter().enumerate().map(|(i, (name, _))| HeadInfo { name: name.to_string(), classes: class_names(i) }).collect();
        JudgeFile { format: FORMAT.into(), version: 1, net, embedding: EmbeddingRule::default(), heads, training }
    }
}

/// A predicted class with its softmax probability.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Scored<T> {
    pub value: T,
    pub prob: f32,
}

/// What the judge sees in one image: each attribute's argmax and probability, plus the
/// auxiliary pattern kind (`"none"` for a plain object) and whether there is a centre mark.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Prediction {
    pub shape: Scored<Shape>,
    pub colour: Scored<Colour>,
    pub background: Scored<Background>,
    pub size: Scored<Size>,
    pub position: Scored<Position>,
    pub pattern: Scored<&'static str>,
    pub mark: Scored<bool>,
}

impl Prediction {
    pub fn attributes(&self) -> Attributes {
        Attributes {
            shape: self.shape.value,
            colour: self.colour.value,
            background: self.background.value,
            size: self.size.value,
            position: self.position.value,
        }
    }

    /// (attributes the prompt states that the image shows, attributes the prompt states).
    pub fn agreement(&self, prompt: &PromptAttributes) -> (usize, usize) {
        let a = self.attributes();
        let checks = [
            prompt.shape.map(|v| v == a.shape),
            prompt.colour.map(|v| v == a.colour),
            prompt.background.map(|v| v == a.background),
            prompt.size.map(|v| v == a.size),
            prompt.position.map(|v| v == a.position),
        ];
        let stated = checks.iter().flatten().count();
        let found = checks.iter().flatten().filter(|b| **b).count();
        (found, stated)
    }
}

/// Per-image outputs of one pass: the prediction and the embedding.
#[derive(Clone, Debug)]
pub struct Judged {
    pub prediction: Prediction,
    pub embedding: Vec<f32>,
}

pub struct Judge {
    pub net: JudgeNet,
    pub file: JudgeFile,
}

/// The network's input tensor from RGB pixels `[N, 3, S, S]` in [-1, 1].
pub fn input_tensor(rgb: Vec<f32>, config: &NetConfig, device: &knobs_nn::Device) -> Tensor<4> {
    let s = config.image_size;
    let v = if config.in_channels == 4 { data::network_input(&rgb, s) } else { rgb };
    let n = v.len() / (config.in_channels * s * s);
    Tensor::from_data(TensorData::new(v, [n, config.in_channels, s, s]), device)
}

fn normalise(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

fn rows(t: Tensor<2>) -> Vec<Vec<f32>> {
    let [n, d] = t.dims();
    let v: Vec<f32> = t.into_data().convert::<f32>().try_into_vec().expect("f32 tensor");
    (0..n).map(|i| v[i * d..(i + 1) * d].to_vec()).collect()
}

fn argmax(p: &[f32]) -> (usize, f32) {
    p.iter().enumerate().fold((0, f32::MIN), |best, (i, &x)| if x > best.1 { (i, x) } else { best })
}

impl Judge {
    /// Reads a judge folder (`config.json` + `judge.safetensors`).
    pub fn load(dir: impl AsRef<Path>) -> Result<Judge> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            bail!("{}: judge folder not found (train one with `knobs judge train --out DIR`)", dir.display());
        }
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        let file: JudgeFile = serde_json::from_str(&text).with_context(|| format!("{}: not a judge config", path.display()))?;
        if file.format != FORMAT {
            bail!("{}: format is `{}`, expected `{FORMAT}`", path.display(), file.format);
        }
        let mut net = JudgeNet::new(file.net.clone(), 0, &cpu());
        let sd = read_safetensors(dir.join(WEIGHTS_FILE))?;
        load_state_dict(&mut net, &sd, LoadOptions::default())?;
        net.for_inference();
        Ok(Judge { net, file })
    }

    /// A judge around a trained network (default embedding rule, no training record).
    pub fn from_net(mut net: JudgeNet) -> Judge {
        net.for_inference();
        let file = JudgeFile::new(net.config.clone(), None);
        Judge { net, file }
    }

    /// The side, in pixels, of the images the judge reads.
    pub fn image_size(&self) -> u32 {
        self.net.config.image_size as u32
    }

    /// The image at the judge's size: unchanged if it already is, else resized (Lanczos3 when
    /// shrinking, bilinear when enlarging) and, if not square, stretched.
    pub fn prepare<'a>(&self, img: &'a RgbImage) -> Cow<'a, RgbImage> {
        let s = self.image_size();
        if img.dimensions() == (s, s) {
            return Cow::Borrowed(img);
        }
        let filter = if img.width() > s { image::imageops::FilterType::Lanczos3 } else { image::imageops::FilterType::Triangle };
        Cow::Owned(image::imageops::resize(img, s, s, filter))
    }

    /// Sets the embedding centres to the mean feature and texture over [`CENTRE_IMAGES`]
    /// clean images of the training distribution (see [`data::centre_images`]).
    pub fn calibrate_embedding(&mut self) {
        let images = data::centre_images(CENTRE_IMAGES, self.image_size());
        let (mut f, mut t): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (Vec::new(), Vec::new());
        for chunk in images.chunks(CHUNK) {
            let o = self.net.forward(input_tensor(data::pixels(chunk), &self.net.config, &cpu()));
            f.extend(rows(o.feature));
            t.extend(rows(o.texture));
        }
        self.file.embedding.feature_centre = metrics::centroid(&f);
        self.file.embedding.texture_centre = metrics::centroid(&t);
    }

    /// Predictions and embeddings of `images` (resized to the judge's size where needed).
    pub fn judge(&self, images: &[RgbImage]) -> Vec<Judged> {
        let rule = &self.file.embedding;
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(CHUNK) {
            let prepared: Vec<RgbImage> = chunk.iter().map(|i| self.prepare(i).into_owned()).collect();
            let x = input_tensor(data::pixels(&prepared), &self.net.config, &cpu());
            let o = self.net.forward(x);
            let probs: Vec<Vec<Vec<f32>>> = o.logits.into_iter().map(|l| rows(softmax(l, 1))).collect();
            let features = rows(o.feature);
            let textures = rows(o.texture);
            for i in 0..chunk.len() {
                let pick = |h: usize| -> Scored<usize> {
                    let (value, prob) = argmax(&probs[h][i]);
                    Scored { value, prob }
                };
                let (sh, co, bg, sz, po, pa, ma) = (pick(0), pick(1), pick(2), pick(3), pick(4), pick(5), pick(6));
                let prediction = Prediction {
                    shape: Scored { value: Shape::ALL[sh.value], prob: sh.prob },
                    colour: Scored { value: Colour::ALL[co.value], prob: co.prob },
                    background: Scored { value: Background::ALL[bg.value], prob: bg.prob },
                    size: Scored { value: Size::ALL[sz.value], prob: sz.prob },
                    position: Scored { value: Position::ALL[po.value], prob: po.prob },
                    pattern: Scored {
                        value: if pa.value == 0 { "none" } else { Pattern::KINDS[pa.value - 1] },
                        prob: pa.prob,
                    },
                    mark: Scored { value: ma.value == 1, prob: ma.prob },
                };
                let centred = |v: &[f32], c: &[f32]| -> Vec<f32> {
                    if c.len() == v.len() { v.iter().zip(c).map(|(x, m)| x - m).collect() } else { v.to_vec() }
                };
                let mut f = centred(&features[i], &rule.feature_centre);
                let mut t = centred(&textures[i], &rule.texture_centre);
                normalise(&mut f);
                normalise(&mut t);
                // A part weighed 0 is left out rather than written as zeros.
                let mut embedding: Vec<f32> = Vec::with_capacity(f.len() + t.len());
                for (part, w) in [(&f, rule.feature_weight), (&t, rule.texture_weight)] {
                    if w != 0.0 {
                        embedding.extend(part.iter().map(|x| x * w));
                    }
                }
                normalise(&mut embedding);
                out.push(Judged { prediction, embedding });
            }
        }
        out
    }

    /// Each attribute's argmax and probability, per image.
    pub fn predict(&self, images: &[RgbImage]) -> Vec<Prediction> {
        self.judge(images).into_iter().map(|j| j.prediction).collect()
    }

    /// L2-normalised embeddings, per image.
    pub fn embed(&self, images: &[RgbImage]) -> Vec<Vec<f32>> {
        self.judge(images).into_iter().map(|j| j.embedding).collect()
    }

    /// Accuracy per attribute (`shape`, `colour`, `background`, `size`, `position`) on `n`
    /// held-out renderings from index `start` (see [`data::HELDOUT_SEED`]).
    pub fn heldout_accuracy(&self, start: u64, n: usize) -> Vec<(&'static str, f64)> {
        let set = data::heldout(start, n, self.image_size());
        let (images, truth): (Vec<RgbImage>, Vec<Attributes>) = set.into_iter().unzip();
        let preds = self.predict(&images);
        let mut hits = [0usize; 5];
        for (p, t) in preds.iter().zip(&truth) {
            let got = data::attribute_labels(&p.attributes());
            let want = data::attribute_labels(t);
            for k in 0..5 {
                hits[k] += usize::from(got[k] == want[k]);
            }
        }
        (0..5).map(|k| (HEADS[k].0, hits[k] as f64 / n.max(1) as f64)).collect()
    }
}
