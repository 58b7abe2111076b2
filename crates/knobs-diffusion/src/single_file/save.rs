//! Writing a pipeline out: as one original-layout file, or as a diffusers folder.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use knobs_nn::burn::tensor::TensorData;
use knobs_nn::io::{FloatDtype, TensorRef, atomic_write, param_refs, write_tensor_refs};
use knobs_nn::{Error, Module, Result};
use serde_json::{Value, json};

use super::PipelineConfigs;
use super::keys::{self, Source};
use crate::pipeline::StableDiffusion;

/// Writes `sd` as one original-layout file: SDXL's (`conditioner.embedders.*`) for an SDXL
/// pipeline, SD-2.x's (OpenCLIP) when its text encoder is a GELU CLIP, as only SD-2.x's is,
/// else SD-1.x's. Atomic.
pub fn save_single_file(sd: &StableDiffusion, path: impl AsRef<Path>, dtype: FloatDtype) -> Result<()> {
    let path = path.as_ref();
    sd.unet.check_weights_in_memory()?;
    let mut out = BTreeMap::new();
    let layout = keys::UnetLayout::of(&sd.unet.config)?;
    place(&sd.unet, |p| keys::unet(p, &layout), &mut out)?;
    let levels = sd.vae.config.block_out_channels.len();
    place(&sd.vae, |p| keys::vae(p, levels), &mut out)?;
    if let Some(te2) = &sd.text_encoder_2 {
        place(&sd.text_encoder, |p| keys::clip_at(keys::SDXL_CLIP, p), &mut out)?;
        place(te2, |p| keys::open_clip_at(keys::SDXL_OPEN_CLIP, p), &mut out)?;
    } else if sd.text_encoder.config.hidden_act == "gelu" {
        place(&sd.text_encoder, keys::open_clip, &mut out)?;
    } else {
        place(&sd.text_encoder, keys::clip, &mut out)?;
    }
    let tensors = out.into_iter().map(|(k, parts)| Ok((k.clone(), parts.finish(&k)?))).collect::<Result<BTreeMap<_, _>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_tensor_refs(path, &tensors, &meta, dtype)
}

/// A tensor of the file being assembled: whole (the parameter itself, shared, or a reshaped
/// copy), or the thirds of a fused q/k/v tensor, copied to be joined.
enum Parts {
    Whole(TensorRef<'static>),
    Thirds([Option<TensorData>; 3]),
}

impl Parts {
    fn finish(self, key: &str) -> Result<TensorRef<'static>> {
        match self {
            Parts::Whole(t) => Ok(t),
            Parts::Thirds(parts) => {
                let mut values = Vec::new();
                let mut shape = Vec::new();
                for (i, part) in parts.into_iter().enumerate() {
                    let part = part.ok_or_else(|| Error::param(key, format!("part {i} of q/k/v is missing")))?;
                    shape = part.shape().as_slice().to_vec();
                    values.extend(part.convert::<f32>().try_into_vec::<f32>().map_err(|e| Error::param(key, format!("{e:?}")))?);
                }
                shape[0] *= 3;
                Ok(TensorRef::Owned(TensorData::new(values, shape)))
            }
        }
    }
}

fn place<M: Module>(model: &M, map: impl Fn(&str) -> Option<Source>, out: &mut BTreeMap<String, Parts>) -> Result<()> {
    for (path, tensor) in param_refs(model) {
        let src = map(&path).ok_or_else(|| Error::param(&path, "has no place in the single-file layout"))?;
        let tensor = if src.conv1x1 || src.transposed {
            let data = tensor.to_data();
            let s = data.shape().as_slice().to_vec();
            let values = data.convert::<f32>().try_into_vec::<f32>().map_err(|e| Error::param(&path, format!("{e:?}")))?;
            TensorRef::Owned(if src.transposed { super::transpose(&values, s[0], s[1]) } else { TensorData::new(values, [s[0], s[1], 1, 1]) })
        } else {
            tensor
        };
        match src.third {
            None => {
                out.insert(src.key, Parts::Whole(tensor));
            }
            Some(i) => {
                let entry = out.entry(src.key).or_insert_with(|| Parts::Thirds([None, None, None]));
                if let Parts::Thirds(parts) = entry {
                    parts[i] = Some(tensor.to_data());
                }
            }
        }
    }
    Ok(())
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    atomic_write(path, serde_json::to_string_pretty(value).expect("JSON").as_bytes())
}

/// Writes `sd` as a diffusers pipeline folder with `configs` as its components' configs.
pub fn save_pretrained(sd: &StableDiffusion, configs: &PipelineConfigs, dir: impl AsRef<Path>, dtype: FloatDtype) -> Result<()> {
    let dir = dir.as_ref();
    sd.unet.check_weights_in_memory()?;
    let scheduler = configs.scheduler["_class_name"].as_str().unwrap_or("DDIMScheduler");
    let mut index = json!({
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [null, null],
        "safety_checker": [null, null],
        "requires_safety_checker": false,
        "scheduler": ["diffusers", scheduler],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    });
    let sdxl = match (&sd.text_encoder_2, &sd.tokenizer_2, &configs.text_encoder_2) {
        (Some(te2), Some(tok2), Some(config)) => Some((te2, tok2, config)),
        (None, _, _) => None,
        _ => return Err(Error::file(dir, "an SDXL pipeline needs its second tokenizer and text-encoder config to be saved")),
    };
    if sdxl.is_some() {
        let fields = index.as_object_mut().expect("object");
        fields.remove("safety_checker");
        fields.remove("requires_safety_checker");
        fields.insert("_class_name".into(), json!("StableDiffusionXLPipeline"));
        fields.insert("image_encoder".into(), json!([null, null]));
        fields.insert("force_zeros_for_empty_prompt".into(), json!(sd.force_zeros_for_empty_prompt));
        fields.insert("text_encoder_2".into(), json!(["transformers", "CLIPTextModelWithProjection"]));
        fields.insert("tokenizer_2".into(), json!(["transformers", "CLIPTokenizer"]));
    }
    write_json(&dir.join("model_index.json"), &index)?;
    let none = HashMap::new();
    let weights = "diffusion_pytorch_model.safetensors";
    write_json(&dir.join("unet/config.json"), &configs.unet)?;
    write_tensor_refs(dir.join("unet").join(weights), &param_refs(&sd.unet), &none, dtype)?;
    write_json(&dir.join("vae/config.json"), &configs.vae)?;
    write_tensor_refs(dir.join("vae").join(weights), &param_refs(&sd.vae), &none, dtype)?;
    write_json(&dir.join("text_encoder/config.json"), &configs.text_encoder)?;
    write_tensor_refs(dir.join("text_encoder/model.safetensors"), &param_refs(&sd.text_encoder), &none, dtype)?;
    if let Some((te2, tok2, config)) = sdxl {
        write_json(&dir.join("text_encoder_2/config.json"), config)?;
        write_tensor_refs(dir.join("text_encoder_2/model.safetensors"), &param_refs(te2), &none, dtype)?;
        tok2.save_dir(dir.join("tokenizer_2"))?;
    }
    write_json(&dir.join("scheduler/scheduler_config.json"), &configs.scheduler)?;
    sd.tokenizer.save_dir(dir.join("tokenizer"))
}
