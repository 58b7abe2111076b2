//! Single-file checkpoints: one `.safetensors` holding UNet, VAE and text encoder(s) under the
//! original CompVis / A1111 / SGM key names (SD-1.x, SD-2.x and SDXL base), as most users have
//! their models.
//! The configs come from the tensor shapes ([`infer`]) or from a diffusers folder (`config`,
//! as diffusers' `from_single_file(config=...)`), the names from one map ([`keys`]), and the
//! tokenizer, which such files lack, from a folder found beside the file or in the Hugging
//! Face cache. The same map writes a pipeline back as one file.
pub mod infer;
pub mod keys;
mod save;

use std::path::{Path, PathBuf};

use knobs_nn::burn::tensor::{DType, TensorData};
use knobs_nn::io::{LoadOptions, SafetensorsReader, load_from, refuse_pickle};
use knobs_nn::{Device, Error, Init, Module, Result};
use serde_json::Value;

pub use infer::Family;
pub use save::{save_pretrained, save_single_file};

use crate::clip::{ClipTextConfig, ClipTextModel, ClipTokenizer};
use crate::pipeline::{StableDiffusion, WeightsAs};
use crate::schedulers::SchedulerConfig;
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKL, VaeConfig};
use keys::Source;

/// What a single file cannot say about itself.
#[derive(Debug, Clone, Default)]
pub struct SingleFileOptions {
    /// A diffusers pipeline folder whose configs, tokenizer and scheduler are used instead
    /// of the inferred ones (the tensors must fit them).
    pub config: Option<PathBuf>,
    /// A `tokenizer/` folder (vocab.json + merges.txt, or tokenizer.json).
    pub tokenizer: Option<PathBuf>,
    /// `epsilon` or `v_prediction`; default: SD-1.x epsilon, SD-2.x v_prediction.
    pub prediction_type: Option<String>,
    /// Default: 512 (SD-1.x), 768 (SD-2.x).
    pub image_size: Option<usize>,
    /// Load the UNet's EMA weights (`model_ema.*`) where the file has them.
    pub ema: bool,
}

/// The diffusers `config.json` of each component, as written into a pipeline folder.
#[derive(Debug, Clone)]
pub struct PipelineConfigs {
    pub unet: Value,
    pub vae: Value,
    pub text_encoder: Value,
    /// SDXL's second text encoder.
    pub text_encoder_2: Option<Value>,
    pub scheduler: Value,
}

impl PipelineConfigs {
    /// The component configs of a diffusers pipeline folder (SDXL's second text encoder's
    /// when it has one).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let te2 = dir.join("text_encoder_2/config.json");
        Ok(PipelineConfigs {
            unet: read_json(&dir.join("unet/config.json"))?,
            vae: read_json(&dir.join("vae/config.json"))?,
            text_encoder: read_json(&dir.join("text_encoder/config.json"))?,
            text_encoder_2: te2.exists().then(|| read_json(&te2)).transpose()?,
            scheduler: read_json(&dir.join("scheduler/scheduler_config.json"))?,
        })
    }
}

/// An opened single-file checkpoint: its header read, its configs settled.
pub struct SingleFile {
    pub file: SafetensorsReader,
    pub family: Family,
    pub configs: PipelineConfigs,
    tokenizer: PathBuf,
    /// SDXL's second tokenizer (the first one's folder when only that was given).
    tokenizer_2: Option<PathBuf>,
    /// Whether the tokenizer was found by search, not given (SD-2.x then pads with "!").
    tokenizer_searched: bool,
    ema: bool,
}

/// True when `path` names a file rather than a pipeline folder.
pub fn is_single_file(path: &Path) -> bool {
    path.is_file()
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))
}

impl SingleFile {
    pub fn open(path: impl AsRef<Path>, opts: &SingleFileOptions) -> Result<Self> {
        let path = path.as_ref();
        refuse_pickle(path, "e.g. with diffusers' convert_original_stable_diffusion_to_diffusers.py, or save its state dict with safetensors")?;
        let file = SafetensorsReader::open(path)?;
        let family = Family::of(&file)?;
        let mut configs = match &opts.config {
            Some(dir) => {
                let mut configs = PipelineConfigs::from_dir(dir)?;
                if family != Family::Sdxl {
                    configs.text_encoder_2 = None;
                }
                configs
            }
            None => {
                let image = opts.image_size.unwrap_or(family.image_size());
                let mut vae = infer::vae(&file, image)?;
                let scale = 1 << (vae["block_out_channels"].as_array().map_or(1, |a| a.len()) - 1);
                let sdxl = family == Family::Sdxl;
                if sdxl {
                    // SDXL's VAE: its own latent scale, and it overflows in fp16.
                    vae["scaling_factor"] = Value::from(0.13025);
                    vae["force_upcast"] = Value::from(true);
                }
                PipelineConfigs {
                    unet: infer::unet(&file, family, image, scale)?,
                    vae,
                    text_encoder: infer::text_encoder(&file, family)?,
                    text_encoder_2: sdxl.then(|| infer::text_encoder_2(&file)).transpose()?,
                    scheduler: if sdxl { infer::sdxl_scheduler() } else { infer::scheduler(family.prediction_type()) },
                }
            }
        };
        if let Some(p) = &opts.prediction_type {
            if p != "epsilon" && p != "v_prediction" {
                return Err(Error::param("--prediction-type", format!("`{p}` is not epsilon or v_prediction")));
            }
            configs.scheduler["prediction_type"] = Value::from(p.as_str());
        }
        let given = opts.tokenizer.clone().or_else(|| opts.config.as_ref().map(|d| d.join("tokenizer")));
        let tokenizer_searched = given.is_none();
        let tokenizer = match given {
            Some(dir) => dir,
            None => find_tokenizer(path, family, "tokenizer")?,
        };
        let tokenizer_2 = match (family, &opts.config, &opts.tokenizer) {
            (Family::Sdxl, Some(dir), None) => Some(dir.join("tokenizer_2")),
            (Family::Sdxl, _, Some(dir)) => Some(dir.clone()),
            (Family::Sdxl, None, None) => Some(find_tokenizer(path, family, "tokenizer_2")?),
            _ => None,
        };
        Ok(SingleFile { file, family, configs, tokenizer, tokenizer_2, tokenizer_searched, ema: opts.ema })
    }

    /// Builds the pipeline and reads every weight, one tensor at a time.
    pub fn load(&self, device: &Device) -> Result<StableDiffusion> {
        self.load_as(device, DType::F32)
    }

    /// [`Self::load`] with every weight matrix and kernel stored in `weights`' dtype for its
    /// part as it loads.
    pub fn load_as(&self, device: &Device, weights: impl Into<WeightsAs>) -> Result<StableDiffusion> {
        let weights = weights.into();
        // What a pipeline dropped before this one kept for its weights goes before this load.
        knobs_nn::ops::release_unused_weight_transforms();
        let mut unet = self.unet_placeholders(device)?;
        self.load_unet(&mut unet, weights.unet_and_vae)?;
        self.load_around(unet, device, weights)
    }

    /// [`Self::load_as`] with the UNet's weights left in the file until
    /// [`StableDiffusion::generate_once`] has encoded the prompt (see
    /// [`StableDiffusion::load_for_one_generation`]).
    pub fn load_for_one_generation(self, device: &Device, weights: impl Into<WeightsAs>) -> Result<StableDiffusion> {
        let weights = weights.into();
        knobs_nn::ops::release_unused_weight_transforms();
        let file = std::sync::Arc::new(self);
        let mut unet = file.unet_placeholders(device)?;
        let (from, dtype) = (std::sync::Arc::clone(&file), weights.unet_and_vae);
        unet.defer_weights(Box::new(move |unet| from.load_unet(unet, dtype)));
        file.load_around(unet, device, weights)
    }

    fn unet_placeholders(&self, device: &Device) -> Result<UNet2DConditionModel> {
        let config = UNetConfig::from_json(&self.configs.unet.to_string()).map_err(|e| e.in_file(self.file.path()))?;
        UNet2DConditionModel::new(config, &mut Init::for_loading(), device)
    }

    fn load_unet(&self, unet: &mut UNet2DConditionModel, weights: DType) -> Result<()> {
        let layout = keys::UnetLayout::of(&unet.config)?;
        self.load_into(weights, unet, |p| keys::unet(p, &layout))
    }

    /// The pipeline around `unet`: the VAE, the text encoders and tokenizers, the scheduler.
    fn load_around(&self, unet: UNet2DConditionModel, device: &Device, weights: WeightsAs) -> Result<StableDiffusion> {
        let cfg = |v: &Value| serde_json::to_string(v).expect("JSON");
        let vae_config = VaeConfig::from_json_str(&cfg(&self.configs.vae))?;
        let levels = vae_config.block_out_channels.len();
        let mut vae = AutoencoderKL::new(vae_config, &mut Init::for_loading(), device)?;
        self.load_into(weights.unet_and_vae, &mut vae, |p| keys::vae(p, levels))?;

        let te_config = ClipTextConfig::from_json(&cfg(&self.configs.text_encoder))?;
        let mut text_encoder = ClipTextModel::new(te_config, &mut Init::for_loading(), device)?;
        match self.family {
            Family::Sd1 => {
                let drop = infer::clip_prefix(&self.file);
                self.load_into(weights.text_encoders, &mut text_encoder, |p| keys::clip(p.strip_prefix(drop)?))?
            }
            Family::Sd2 => self.load_into(weights.text_encoders, &mut text_encoder, keys::open_clip)?,
            Family::Sdxl => self.load_into(weights.text_encoders, &mut text_encoder, |p| keys::clip_at(keys::SDXL_CLIP, p))?,
        }
        let (tokenizer_2, text_encoder_2) = match (&self.configs.text_encoder_2, &self.tokenizer_2) {
            (Some(config), Some(dir)) => {
                let config = ClipTextConfig::from_json(&cfg(config))?;
                let mut te2 = ClipTextModel::new(config, &mut Init::for_loading(), device)?;
                self.load_into(weights.text_encoders, &mut te2, |p| keys::open_clip_at(keys::SDXL_OPEN_CLIP, p))?;
                let mut tok2 = ClipTokenizer::from_dir(dir)?;
                // SDXL's second tokenizer pads with "!"; a copy of the first one does not.
                if tok2.token_to_id("!").is_some_and(|id| id != tok2.pad_id()) {
                    tok2 = tok2.with_pad_token("!")?;
                }
                (Some(tok2), Some(te2))
            }
            _ => (None, None),
        };

        let mut tokenizer = ClipTokenizer::from_dir(&self.tokenizer)?;
        if self.family == Family::Sd2 && self.tokenizer_searched {
            tokenizer = tokenizer.with_pad_token("!")?;
        }
        let scheduler_class = self.configs.scheduler["_class_name"].as_str().unwrap_or("DDIMScheduler").to_string();
        Ok(StableDiffusion {
            dir: self.file.path().to_path_buf(),
            tokenizer,
            text_encoder,
            unet,
            vae,
            tokenizer_2,
            text_encoder_2,
            force_zeros_for_empty_prompt: self.family == Family::Sdxl,
            scheduler_config: SchedulerConfig::from_json_str(&cfg(&self.configs.scheduler))?,
            scheduler_class,
            device: device.clone(),
        })
    }

    /// Every parameter of `model` from the file key `map` gives it; a parameter without a
    /// key, or a key the file lacks, is an error naming it.
    fn load_into<M: Module>(&self, weights: DType, model: &mut M, map: impl Fn(&str) -> Option<Source>) -> Result<()> {
        let path = self.file.path();
        load_from(model, path, &[], |param, keep| {
            let Some(src) = map(param) else {
                return Some(Err(Error::param(param, "has no place in the single-file layout")));
            };
            let key = match keys::ema(&src.key).filter(|k| self.ema && self.file.shape(k).is_some()) {
                Some(ema) => ema,
                None => src.key.clone(),
            };
            if self.file.shape(&key).is_none() {
                return Some(Err(Error::key(path, &key, format!("missing from the file (the model's `{param}`)"))));
            }
            Some(self.file.read_as(&key, keep).and_then(|d| reshape(d, &src, &key)).map_err(|e| e.in_file(path)))
        }, LoadOptions::frozen_as(weights))?;
        Ok(())
    }
}

/// One third of a fused q/k/v tensor, a 1x1 convolution as a linear weight, or a
/// right-multiplied projection as a Linear weight; in the dtype `data` holds (an fp16 file
/// read for f16 storage stays 16-bit: rows and dimensions move as bytes).
fn reshape(data: TensorData, src: &Source, key: &str) -> Result<TensorData> {
    let data = match data.dtype() {
        DType::F32 | DType::F16 | DType::BF16 => data,
        _ => data.convert::<f32>(),
    };
    let shape = data.shape().as_slice().to_vec();
    if let Some(third) = src.third {
        if shape.is_empty() || shape[0] % 3 != 0 {
            return Err(Error::param(key, format!("shape {shape:?}: a fused q/k/v tensor needs 3n rows")));
        }
        let rows = shape[0] / 3;
        let part = rows * data.as_bytes().len() / shape[0];
        let mut dims = shape.clone();
        dims[0] = rows;
        return Ok(TensorData::from_bytes_vec(data.as_bytes()[third * part..(third + 1) * part].to_vec(), dims, data.dtype()));
    }
    if src.conv1x1 && shape.len() == 4 && shape[2] == 1 && shape[3] == 1 {
        let (bytes, _, dtype) = data.into_parts();
        return Ok(TensorData::from_bytes(bytes, [shape[0], shape[1]], dtype));
    }
    if src.transposed {
        let [r, c] = shape[..] else { return Err(Error::param(key, format!("shape {shape:?}: a projection matrix has 2 dimensions"))) };
        let values = |e| Error::param(key, format!("{e:?}"));
        return match data.dtype() {
            DType::F16 => Ok(transpose(data.as_slice::<knobs_nn::burn::tensor::f16>().map_err(values)?, r, c)),
            DType::BF16 => Ok(transpose(data.as_slice::<knobs_nn::burn::tensor::bf16>().map_err(values)?, r, c)),
            _ => Ok(transpose(data.as_slice::<f32>().map_err(values)?, r, c)),
        };
    }
    Ok(data)
}

/// A row-major `[r, c]` matrix as `[c, r]`.
pub(crate) fn transpose<E: knobs_nn::burn::tensor::Element>(values: &[E], r: usize, c: usize) -> TensorData {
    let t: Vec<E> = (0..c * r).map(|i| values[(i % r) * c + i / r]).collect();
    TensorData::new(t, [c, r])
}

/// The tokenizer of a single file (`name`: `tokenizer`, or SDXL's `tokenizer_2`): a folder of
/// that name beside it, else the copy diffusers or transformers left in the Hugging Face cache.
fn find_tokenizer(file: &Path, family: Family, name: &str) -> Result<PathBuf> {
    let beside = file.parent().unwrap_or(Path::new(".")).join(name);
    let mut tried = vec![beside.clone()];
    if beside.is_dir() {
        return Ok(beside);
    }
    let hub = std::env::var_os("HF_HUB_CACHE").map(PathBuf::from).or_else(|| {
        let home = std::env::var_os("HF_HOME").map(PathBuf::from).or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
            Some(cache.join("huggingface"))
        })?;
        Some(home.join("hub"))
    });
    let repos: &[(&str, &str)] = match family {
        Family::Sd1 => &[
            ("openai--clip-vit-large-patch14", ""),
            ("stable-diffusion-v1-5--stable-diffusion-v1-5", "tokenizer"),
            ("runwayml--stable-diffusion-v1-5", "tokenizer"),
        ],
        Family::Sd2 => &[("stabilityai--stable-diffusion-2-1", "tokenizer"), ("stabilityai--stable-diffusion-2", "tokenizer")],
        Family::Sdxl if name == "tokenizer_2" => &[("stabilityai--stable-diffusion-xl-base-1.0", "tokenizer_2")],
        Family::Sdxl => &[("stabilityai--stable-diffusion-xl-base-1.0", "tokenizer"), ("openai--clip-vit-large-patch14", "")],
    };
    if let Some(hub) = hub {
        for (repo, sub) in repos {
            let snapshots = hub.join(format!("models--{repo}")).join("snapshots");
            tried.push(snapshots.join("*").join(sub));
            let Ok(entries) = std::fs::read_dir(&snapshots) else { continue };
            let mut found: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path().join(sub))).filter(|d| d.join("vocab.json").is_file() || d.join("tokenizer.json").is_file()).collect();
            found.sort();
            if let Some(dir) = found.pop() {
                return Ok(dir);
            }
        }
    }
    let tried = tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    Err(Error::file(file, format!("a single file has no tokenizer and none was found (looked in {tried}); pass --tokenizer DIR or --config DIR")))
}

impl StableDiffusion {
    /// A diffusers pipeline folder, or a single-file checkpoint with everything inferred.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::load_as(path, device, DType::F32)
    }

    /// [`Self::load`] with every weight matrix and kernel stored in `weights`' dtype for its
    /// part as it loads (`--weights-dtype`): the model [`knobs_nn::ModuleExt::store_frozen_as`] would make of
    /// an f32 load, without ever holding the f32 copy.
    pub fn load_as(path: impl AsRef<Path>, device: &Device, weights: impl Into<WeightsAs>) -> Result<Self> {
        let path = path.as_ref();
        if is_single_file(path) {
            SingleFile::open(path, &SingleFileOptions::default())?.load_as(device, weights)
        } else {
            Self::from_dir_as(path, device, weights)
        }
    }

    /// [`Self::load_as`] for one [`Self::generate_once`] (`knobs generate`): the UNet is built
    /// with placeholders and reads its weights only once the prompt is encoded and the text
    /// encoders are released, so the two are never in memory together. Adapters attach to it
    /// as to a loaded one; running, merging into or saving the UNet before then is an error
    /// naming `unet`. The same images as [`Self::load_as`].
    pub fn load_for_one_generation(path: impl AsRef<Path>, device: &Device, weights: impl Into<WeightsAs>) -> Result<Self> {
        let path = path.as_ref();
        if is_single_file(path) {
            SingleFile::open(path, &SingleFileOptions::default())?.load_for_one_generation(device, weights)
        } else {
            Self::from_dir_with(path, device, weights.into(), true)
        }
    }

    /// [`Self::load`], also giving the component configs the pipeline was built from (to
    /// write it back as a folder); a single file is opened once for both.
    pub fn load_with_configs(path: impl AsRef<Path>, device: &Device) -> Result<(Self, PipelineConfigs)> {
        let path = path.as_ref();
        if is_single_file(path) {
            let file = SingleFile::open(path, &SingleFileOptions::default())?;
            let sd = file.load(device)?;
            Ok((sd, file.configs))
        } else {
            Ok((Self::from_dir(path, device)?, PipelineConfigs::from_dir(path)?))
        }
    }
}
