//! Single-file checkpoints against the layout diffusers reads (`fixtures/single_file_layout.json`,
//! made by `scripts/make_single_file_goldens.py` and checked there with diffusers'
//! `from_single_file`): writing a pipeline gives exactly those keys, shapes and values, and
//! reading the file back gives the folder's weights and the folder's image.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use knobs_diffusion::clip::{ClipTextConfig, ClipTextModel, ClipTokenizer};
use knobs_diffusion::pipeline::{GenerateRequest, StableDiffusion};
use knobs_diffusion::schedulers::SchedulerConfig;
use knobs_diffusion::single_file::{Family, PipelineConfigs, SingleFile, SingleFileOptions, infer, save_pretrained, save_single_file};
use knobs_diffusion::unet::{UNet2DConditionModel, UNetConfig};
use knobs_diffusion::vae::{AutoencoderKL, VaeConfig};
use knobs_nn::io::{FloatDtype, SafetensorsReader, state_dict};
use knobs_nn::{Init, cpu};
use serde_json::Value;

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden");

fn tiny_sd() -> PathBuf {
    PathBuf::from(GOLDEN).join("tiny-sd")
}

fn layout() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/single_file_layout.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn values(file: &SafetensorsReader, key: &str) -> Vec<f32> {
    file.read(key).unwrap().convert::<f32>().try_into_vec::<f32>().unwrap()
}

/// Every parameter of the three models, bit for bit.
fn assert_same_weights(a: &StableDiffusion, b: &StableDiffusion) {
    for (name, x, y) in [
        ("unet", state_dict(&a.unet), state_dict(&b.unet)),
        ("vae", state_dict(&a.vae), state_dict(&b.vae)),
        ("text_encoder", state_dict(&a.text_encoder), state_dict(&b.text_encoder)),
    ] {
        assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>(), "{name}");
        for (k, v) in &x {
            assert_eq!(v, &y[k], "{name}.{k}");
        }
    }
}

fn image(sd: &StableDiffusion) -> Vec<f32> {
    let req = GenerateRequest { steps: 2, seed: 7, height: Some(32), width: Some(32), ..GenerateRequest::new("a red star") };
    sd.generate(&req).unwrap().into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn sd1_single_file_has_the_layout_and_values_diffusers_reads() {
    let folder = StableDiffusion::from_dir(tiny_sd(), &cpu()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-sd.safetensors");
    save_single_file(&folder, &path, FloatDtype::F32).unwrap();

    let file = SafetensorsReader::open(&path).unwrap();
    let golden = layout();
    let want: BTreeMap<&String, &Value> = golden["sd1"].as_object().unwrap().iter().collect();
    assert_eq!(file.keys().collect::<Vec<_>>(), want.keys().map(|k| k.as_str()).collect::<Vec<_>>());
    for (key, g) in want {
        let shape: Vec<usize> = serde_json::from_value(g["shape"].clone()).unwrap();
        assert_eq!(file.shape(key).unwrap(), shape.as_slice(), "{key}");
        let v = values(&file, key);
        let sum: f64 = v.iter().map(|x| *x as f64).sum();
        let weighted: f64 = v.iter().enumerate().map(|(i, x)| *x as f64 * (i % 7 + 1) as f64).sum();
        let scale: f64 = v.iter().map(|x| x.abs() as f64).sum::<f64>() * 7.0 + 1e-12;
        for (got, want) in [sum, weighted].into_iter().zip(g["checksums"].as_array().unwrap()) {
            assert!((got - want.as_f64().unwrap()).abs() <= 1e-9 * scale, "{key}: checksum {got} vs {want}");
        }
    }

    // Back through the same map, with the folder's configs (tiny CLIP heads are not inferable).
    let opts = SingleFileOptions { config: Some(tiny_sd()), ..Default::default() };
    let single = SingleFile::open(&path, &opts).unwrap();
    assert_eq!(single.family, Family::Sd1);
    let loaded = single.load(&cpu()).unwrap();
    assert_same_weights(&folder, &loaded);
    assert_eq!(max_abs_diff(&image(&folder), &image(&loaded)), 0.0);

    // The shapes alone give the tiny UNet's and VAE's architecture.
    let unet = infer::unet(&file, Family::Sd1, 64, 2).unwrap();
    let cfg = UNetConfig::from_file(tiny_sd().join("unet/config.json")).unwrap();
    assert_eq!(unet["block_out_channels"], serde_json::json!(cfg.block_out_channels));
    assert_eq!(unet["down_block_types"], serde_json::json!(cfg.down_block_types));
    assert_eq!(unet["up_block_types"], serde_json::json!(cfg.up_block_types));
    assert_eq!((unet["layers_per_block"].as_u64(), unet["cross_attention_dim"].as_u64()), (Some(2), Some(32)));
    assert_eq!((unet["attention_head_dim"].as_u64(), unet["use_linear_projection"].as_bool()), (Some(8), Some(false)));
    let vae = infer::vae(&file, 64).unwrap();
    assert_eq!(VaeConfig::from_json_str(&vae.to_string()).unwrap(), VaeConfig::from_file(tiny_sd().join("vae/config.json")).unwrap());
}

/// A tiny SD-2.x-style pipeline with the golden configs and random weights.
fn tiny_sd2(golden: &Value) -> (StableDiffusion, PipelineConfigs) {
    let configs = PipelineConfigs {
        unet: golden["unet"].clone(),
        vae: golden["vae"].clone(),
        text_encoder: golden["text_encoder"].clone(),
        text_encoder_2: None,
        scheduler: infer::scheduler("v_prediction"),
    };
    let dev = cpu();
    let mut init = Init::new(3);
    let sd = StableDiffusion {
        dir: PathBuf::new(),
        tokenizer: ClipTokenizer::from_dir(tiny_sd().join("tokenizer")).unwrap().with_pad_token("!").unwrap(),
        text_encoder: ClipTextModel::new(ClipTextConfig::from_json(&configs.text_encoder.to_string()).unwrap(), &mut init, &dev).unwrap(),
        unet: UNet2DConditionModel::new(UNetConfig::from_json(&configs.unet.to_string()).unwrap(), &mut init, &dev).unwrap(),
        vae: AutoencoderKL::new(VaeConfig::from_json_str(&configs.vae.to_string()).unwrap(), &mut init, &dev).unwrap(),
        tokenizer_2: None,
        text_encoder_2: None,
        force_zeros_for_empty_prompt: false,
        scheduler_config: SchedulerConfig::from_json_str(&configs.scheduler.to_string()).unwrap(),
        scheduler_class: "DDIMScheduler".into(),
        device: dev,
    };
    (sd, configs)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn sd2_single_file_infers_v_prediction_and_gives_the_folder_image() {
    let golden = layout();
    let (sd, configs) = tiny_sd2(&golden["sd2"]["configs"]);
    let dir = tempfile::tempdir().unwrap();
    let folder_dir = dir.path().join("folder");
    save_pretrained(&sd, &configs, &folder_dir, FloatDtype::F32).unwrap();
    let folder = StableDiffusion::from_dir(&folder_dir, &cpu()).unwrap();

    let path = dir.path().join("model.safetensors");
    save_single_file(&folder, &path, FloatDtype::F32).unwrap();
    let file = SafetensorsReader::open(&path).unwrap();
    let mut want: BTreeMap<String, Vec<usize>> = serde_json::from_value(golden["sd2"]["keys"].clone()).unwrap();
    // OpenCLIP's projection is unused by SD (diffusers drops it too); a folder has none to write.
    want.remove("cond_stage_model.model.text_projection");
    let got: BTreeMap<String, Vec<usize>> = file.keys().map(|k| (k.to_string(), file.shape(k).unwrap().to_vec())).collect();
    assert_eq!(got, want);

    // No --config: everything from the shapes, the tokenizer from beside the file.
    copy_dir(&tiny_sd().join("tokenizer"), &dir.path().join("tokenizer"));
    let single = SingleFile::open(&path, &SingleFileOptions::default()).unwrap();
    assert_eq!(single.family, Family::Sd2);
    assert_eq!(single.configs.scheduler["prediction_type"], "v_prediction");
    assert_eq!(single.configs.unet["attention_head_dim"], serde_json::json!([1, 1]));
    assert_eq!(single.configs.text_encoder["hidden_act"], "gelu");
    let loaded = StableDiffusion::load(&path, &cpu()).unwrap();
    assert_eq!(loaded.tokenizer.pad_id(), loaded.tokenizer.token_to_id("!").unwrap());
    assert_same_weights(&folder, &loaded);
    let (a, b) = (image(&folder), image(&loaded));
    assert!(max_abs_diff(&a, &b) <= 1.0 / 255.0, "{}", max_abs_diff(&a, &b));

    // fp16 files read back to the f16-rounded weights.
    let half = dir.path().join("half.safetensors");
    save_single_file(&folder, &half, FloatDtype::F16).unwrap();
    let h = SafetensorsReader::open(&half).unwrap();
    let key = "model.diffusion_model.out.2.weight";
    let rounded: Vec<f32> = values(&file, key).iter().map(|x| half::f16::from_f32(*x).to_f32()).collect();
    assert_eq!(values(&h, key), rounded);

    // An fp16 file's weights kept in f16 in memory: the same image as widened to f32.
    let widened = StableDiffusion::load(&half, &cpu()).unwrap();
    let mut narrow = StableDiffusion::load(&half, &cpu()).unwrap();
    knobs_nn::ModuleExt::store_frozen_as(&mut narrow, knobs_nn::burn::tensor::DType::F16);
    let unet_weight = state_dict(&narrow.unet)["conv_in.weight"].dtype();
    assert_eq!(unet_weight, knobs_nn::burn::tensor::DType::F16);
    assert_eq!(image(&widened), image(&narrow));
}

#[test]
fn bad_single_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("model.ckpt");
    std::fs::write(&ckpt, b"PK\x03\x04").unwrap();
    let err = SingleFile::open(&ckpt, &SingleFileOptions::default()).err().unwrap().to_string();
    assert!(err.contains("model.ckpt") && err.contains("pickle"), "{err}");

    // A diffusers component file is not a pipeline checkpoint.
    let unet_only = tiny_sd().join("unet/diffusion_pytorch_model.safetensors");
    let err = SingleFile::open(&unet_only, &SingleFileOptions::default()).err().unwrap().to_string();
    assert!(err.contains("model.diffusion_model."), "{err}");

    // A file missing one tensor names that key.
    let folder = StableDiffusion::from_dir(tiny_sd(), &cpu()).unwrap();
    let full = dir.path().join("full.safetensors");
    save_single_file(&folder, &full, FloatDtype::F32).unwrap();
    let mut tensors = SafetensorsReader::open(&full).unwrap().read_all().unwrap().tensors;
    let gone = "first_stage_model.decoder.up.0.block.0.conv1.weight";
    assert!(tensors.remove(gone).is_some());
    let broken = dir.path().join("broken.safetensors");
    knobs_nn::io::write_safetensors(&broken, &tensors, &Default::default()).unwrap();
    let opts = SingleFileOptions { config: Some(tiny_sd()), ..Default::default() };
    let err = SingleFile::open(&broken, &opts).unwrap().load(&cpu()).err().unwrap().to_string();
    assert!(err.contains(gone) && err.contains("broken.safetensors"), "{err}");

    // A prediction type the schedulers lack is named with its flag.
    let opts = SingleFileOptions { config: Some(tiny_sd()), prediction_type: Some("sample".into()), ..Default::default() };
    let err = SingleFile::open(&full, &opts).err().unwrap().to_string();
    assert!(err.contains("--prediction-type") && err.contains("sample"), "{err}");

    // SD-2 inference needs 64-channel heads: a tiny SD-1 CLIP cannot be inferred, and says how.
    let err = SingleFile::open(&full, &SingleFileOptions::default()).err().unwrap().to_string();
    assert!(err.contains("--config"), "{err}");
}

#[test]
fn ema_weights_are_taken_on_request() {
    let folder = StableDiffusion::from_dir(tiny_sd(), &cpu()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.safetensors");
    save_single_file(&folder, &plain, FloatDtype::F32).unwrap();
    let mut tensors = SafetensorsReader::open(&plain).unwrap().read_all().unwrap().tensors;
    // An EMA copy of one UNet weight, under the original's flattened name.
    let bias = tensors["model.diffusion_model.out.2.bias"].clone();
    let n = bias.num_elements();
    let ema = knobs_nn::burn::tensor::TensorData::new((0..n).map(|i| i as f32 + 0.5).collect::<Vec<f32>>(), [n]);
    tensors.insert("model_ema.diffusion_modelout2bias".into(), ema.clone());
    let path = dir.path().join("with-ema.safetensors");
    knobs_nn::io::write_safetensors(&path, &tensors, &Default::default()).unwrap();
    let load = |ema: bool| {
        let opts = SingleFileOptions { config: Some(tiny_sd()), ema, ..Default::default() };
        state_dict(&SingleFile::open(&path, &opts).unwrap().load(&cpu()).unwrap().unet)["conv_out.bias"].clone()
    };
    assert_eq!(load(false), bias);
    assert_eq!(load(true), ema);
}

/// The pipeline folder written as one f32 single file in `dir`, with the options that read it
/// back with the folder's configs.
fn as_single_file(folder: &Path, dir: &Path) -> (PathBuf, SingleFileOptions) {
    let file = dir.join(format!("{}.safetensors", folder.file_name().unwrap().to_string_lossy()));
    save_single_file(&StableDiffusion::from_dir(folder, &cpu()).unwrap(), &file, FloatDtype::F32).unwrap();
    (file, SingleFileOptions { config: Some(folder.to_path_buf()), ..Default::default() })
}

/// `--weights-dtype`'s load: matrices and kernels are narrowed as each tensor is read, from a
/// folder or a single file, giving bit for bit the model that an f32 load narrowed afterwards
/// gives (so training and generation results do not change, only the load's peak).
#[test]
fn weights_load_straight_into_half_precision() {
    use knobs_nn::ModuleExt;
    use knobs_nn::burn::tensor::DType;
    let dir = tempfile::tempdir().unwrap();
    let (file, opts) = as_single_file(&tiny_sd(), dir.path());
    for dtype in [DType::F16, DType::BF16] {
        let mut narrowed = StableDiffusion::from_dir(tiny_sd(), &cpu()).unwrap();
        narrowed.store_frozen_as(dtype);
        let from_folder = StableDiffusion::load_as(tiny_sd(), &cpu(), dtype).unwrap();
        let from_file = SingleFile::open(&file, &opts).unwrap().load_as(&cpu(), dtype).unwrap();
        for loaded in [&from_folder, &from_file] {
            assert_same_weights(&narrowed, loaded);
            let unet = state_dict(&loaded.unet);
            assert_eq!(unet["conv_in.weight"].dtype(), dtype);
            assert_eq!(unet["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"].dtype(), dtype);
            assert_eq!(unet["conv_in.bias"].dtype(), DType::F32, "vectors stay f32");
            assert_eq!(state_dict(&loaded.text_encoder)["text_model.embeddings.token_embedding.weight"].dtype(), dtype);
        }
    }
}

/// A single file loaded for one generation reads its UNet inside `generate_once`, in the
/// dtype asked for: the image of the file loaded in full, SD-1.x and SDXL.
#[test]
fn a_single_file_loaded_for_one_generation_gives_the_full_load_image() {
    use knobs_nn::burn::tensor::DType;
    let dir = tempfile::tempdir().unwrap();
    for folder in [tiny_sd(), PathBuf::from(TINY_SDXL)] {
        let (file, opts) = as_single_file(&folder, dir.path());
        let full = SingleFile::open(&file, &opts).unwrap().load_as(&cpu(), DType::BF16).unwrap();
        let mut once = SingleFile::open(&file, &opts).unwrap().load_for_one_generation(&cpu(), DType::BF16).unwrap();
        assert!(once.unet.is_deferred());
        let req = GenerateRequest { steps: 2, seed: 7, height: Some(32), width: Some(32), ..GenerateRequest::new("a red star") };
        let want = full.generate(&req).unwrap().into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
        let got = once.generate_once(&req, &mut |_, _| {}).unwrap().into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
        assert_eq!(got, want, "{}", file.display());
        assert!(once.unet.is_released());
    }
}

/// fp16 and bf16 single files read for storage in their own dtype keep the file's values as
/// they lie, fused q/k/v thirds, 1x1 kernels and transposed projections included (moved as
/// 16-bit values): the model an f32 load narrowed afterwards gives, SD-1.x and SDXL.
#[test]
fn half_precision_single_files_load_as_stored() {
    use knobs_nn::burn::tensor::DType;
    let dir = tempfile::tempdir().unwrap();
    for (name, folder) in [("tiny-sd", tiny_sd()), ("tiny-sdxl", PathBuf::from(TINY_SDXL))] {
        let model = StableDiffusion::from_dir(&folder, &cpu()).unwrap();
        let opts = SingleFileOptions { config: Some(folder.clone()), ..Default::default() };
        for (dtype, stored) in [(DType::F16, FloatDtype::F16), (DType::BF16, FloatDtype::BF16)] {
            let file = dir.path().join(format!("{name}-{dtype:?}.safetensors"));
            save_single_file(&model, &file, stored).unwrap();
            // The reference: the same values through a folder, which has no fused or
            // transposed tensors to reshape.
            let half_folder = dir.path().join(format!("{name}-{dtype:?}"));
            save_pretrained(&model, &PipelineConfigs::from_dir(&folder).unwrap(), &half_folder, stored).unwrap();
            let narrowed = StableDiffusion::load_as(&half_folder, &cpu(), dtype).unwrap();
            let loaded = SingleFile::open(&file, &opts).unwrap().load_as(&cpu(), dtype).unwrap();
            assert_same_weights(&narrowed, &loaded);
            let unet = state_dict(&loaded.unet);
            assert_eq!(unet["conv_in.weight"].dtype(), dtype, "{name}");
            assert_eq!(unet["conv_in.bias"].dtype(), DType::F32, "{name}: vectors stay f32");
            if let Some(te2) = &loaded.text_encoder_2 {
                same_te2(&narrowed, &loaded);
                let te2 = state_dict(te2);
                assert_eq!(te2["text_model.encoder.layers.2.self_attn.v_proj.weight"].dtype(), dtype, "{name}: a fused q/k/v third");
                assert_eq!(te2["text_projection.weight"].dtype(), dtype, "{name}: a transposed projection");
            }
        }
    }
}

const TINY_SDXL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-sdxl");

/// The golden SDXL call (fixtures/tiny-sdxl/goldens/pipeline.safetensors) on `sd`.
fn sdxl_golden_latents(sd: &StableDiffusion) -> (Vec<f32>, Vec<f32>) {
    let g = knobs_nn::io::read_safetensors(Path::new(TINY_SDXL).join("goldens/pipeline.safetensors")).unwrap();
    let req = common::golden_request(&g, "latents");
    let got = sd.generate_latents(&req).unwrap().into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
    (got, g.f32("final_latents").unwrap().0)
}

fn same_te2(a: &StableDiffusion, b: &StableDiffusion) {
    let (x, y) = (state_dict(a.text_encoder_2.as_ref().unwrap()), state_dict(b.text_encoder_2.as_ref().unwrap()));
    assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
    for (k, v) in &x {
        assert_eq!(v, &y[k], "text_encoder_2.{k}");
    }
}

/// SDXL in SGM's layout: `conditioner.embedders.0.transformer.*` (CLIP-L),
/// `conditioner.embedders.1.model.*` (OpenCLIP bigG, fused q/k/v, `text_projection` as
/// `x @ P`), `label_emb` for the added conditioning; read back it gives diffusers' golden call.
#[test]
fn sdxl_single_file_round_trips_to_the_golden_call() {
    let folder = StableDiffusion::from_dir(TINY_SDXL, &cpu()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-sdxl.safetensors");
    save_single_file(&folder, &path, FloatDtype::F32).unwrap();
    let file = SafetensorsReader::open(&path).unwrap();
    for key in [
        "conditioner.embedders.0.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight",
        "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight",
        "conditioner.embedders.1.model.text_projection",
        "conditioner.embedders.1.model.ln_final.weight",
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.1.attn2.to_k.weight",
        "model.diffusion_model.output_blocks.2.1.transformer_blocks.1.ff.net.2.weight",
    ] {
        assert!(file.shape(key).is_some(), "{key}");
    }
    assert_eq!(file.shape("conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight").unwrap(), [96, 32]);
    // diffusers' Linear [projection, hidden] is stored as OpenCLIP's [hidden, projection].
    assert_eq!(file.shape("conditioner.embedders.1.model.text_projection").unwrap(), [32, 24]);

    let opts = SingleFileOptions { config: Some(TINY_SDXL.into()), ..Default::default() };
    let single = SingleFile::open(&path, &opts).unwrap();
    assert_eq!(single.family, Family::Sdxl);
    let loaded = single.load(&cpu()).unwrap();
    assert!(loaded.is_sdxl() && loaded.force_zeros_for_empty_prompt);
    assert_same_weights(&folder, &loaded);
    same_te2(&folder, &loaded);
    let (got, want) = sdxl_golden_latents(&loaded);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(max_abs_diff(&got, &want) / scale < 1e-4);
}

/// Without --config every SDXL setting comes from the shapes (64-channel heads per level,
/// transformer depth per level, the time-id width from `label_emb`, the second encoder's
/// projection), the scheduler and VAE scale are SDXL base's, and the tokenizers come from
/// beside the file: the pipeline is the one that was saved.
#[test]
fn sdxl_single_file_infers_its_configs() {
    let read = |p: &str| -> Value { serde_json::from_str(&std::fs::read_to_string(Path::new(TINY_SDXL).join(p)).unwrap()).unwrap() };
    let mut unet = read("unet/config.json");
    unet["block_out_channels"] = serde_json::json!([64, 128, 192]);
    unet["norm_num_groups"] = serde_json::json!(32);
    unet["cross_attention_dim"] = serde_json::json!(64 + 128);
    unet["projection_class_embeddings_input_dim"] = serde_json::json!(64 + 6 * 8);
    unet["sample_size"] = serde_json::json!(8);
    let mut te1 = read("text_encoder/config.json");
    te1["hidden_size"] = serde_json::json!(64);
    te1["num_attention_heads"] = serde_json::json!(1);
    let mut te2 = read("text_encoder_2/config.json");
    te2["hidden_size"] = serde_json::json!(128);
    te2["num_attention_heads"] = serde_json::json!(2);
    te2["projection_dim"] = serde_json::json!(64);
    let mut vae = read("vae/config.json");
    vae["block_out_channels"] = serde_json::json!([32, 32]);
    vae["norm_num_groups"] = serde_json::json!(32);
    let configs = PipelineConfigs { unet, vae, text_encoder: te1, text_encoder_2: Some(te2), scheduler: infer::sdxl_scheduler() };
    let dev = cpu();
    let mut init = Init::new(5);
    let te = |v: &Value, init: &mut Init| ClipTextModel::new(ClipTextConfig::from_json(&v.to_string()).unwrap(), init, &dev).unwrap();
    let sd = StableDiffusion {
        dir: PathBuf::new(),
        tokenizer: ClipTokenizer::from_dir(Path::new(TINY_SDXL).join("tokenizer")).unwrap(),
        text_encoder: te(&configs.text_encoder, &mut init),
        unet: UNet2DConditionModel::new(UNetConfig::from_json(&configs.unet.to_string()).unwrap(), &mut init, &dev).unwrap(),
        vae: AutoencoderKL::new(VaeConfig::from_json_str(&configs.vae.to_string()).unwrap(), &mut init, &dev).unwrap(),
        tokenizer_2: Some(ClipTokenizer::from_dir(Path::new(TINY_SDXL).join("tokenizer_2")).unwrap()),
        text_encoder_2: Some(te(configs.text_encoder_2.as_ref().unwrap(), &mut init)),
        force_zeros_for_empty_prompt: true,
        scheduler_config: SchedulerConfig::from_json_str(&configs.scheduler.to_string()).unwrap(),
        scheduler_class: "EulerDiscreteScheduler".into(),
        device: dev.clone(),
    };
    let dir = tempfile::tempdir().unwrap();
    let folder_dir = dir.path().join("folder");
    save_pretrained(&sd, &configs, &folder_dir, FloatDtype::F32).unwrap();
    let folder = StableDiffusion::from_dir(&folder_dir, &dev).unwrap();
    assert!(folder.is_sdxl());
    let path = dir.path().join("xl.safetensors");
    save_single_file(&folder, &path, FloatDtype::F32).unwrap();
    copy_dir(&Path::new(TINY_SDXL).join("tokenizer"), &dir.path().join("tokenizer"));
    copy_dir(&Path::new(TINY_SDXL).join("tokenizer_2"), &dir.path().join("tokenizer_2"));

    let single = SingleFile::open(&path, &SingleFileOptions::default()).unwrap();
    assert_eq!(single.family, Family::Sdxl);
    let u = &single.configs.unet;
    assert_eq!(u["attention_head_dim"], serde_json::json!([1, 2, 3]));
    assert_eq!(u["transformer_layers_per_block"], serde_json::json!([1, 1, 2]));
    assert_eq!((u["addition_time_embed_dim"].as_u64(), u["projection_class_embeddings_input_dim"].as_u64()), (Some(8), Some(112)));
    assert_eq!(u["cross_attention_dim"], 192);
    assert_eq!(single.configs.vae["scaling_factor"], 0.13025);
    assert_eq!(single.configs.text_encoder_2.as_ref().unwrap()["projection_dim"], 64);
    assert_eq!(single.configs.scheduler["_class_name"], "EulerDiscreteScheduler");
    let loaded = StableDiffusion::load(&path, &dev).unwrap();
    assert_same_weights(&folder, &loaded);
    same_te2(&folder, &loaded);
    let req = GenerateRequest { steps: 2, seed: 3, height: Some(32), width: Some(32), ..GenerateRequest::new("a red star") };
    let img = |sd: &StableDiffusion| sd.generate(&req).unwrap().into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
    assert_eq!(max_abs_diff(&img(&folder), &img(&loaded)), 0.0);

    // A file with only one SDXL text encoder (a refiner) is refused by name.
    let mut tensors = SafetensorsReader::open(&path).unwrap().read_all().unwrap().tensors;
    tensors.retain(|k, _| !k.starts_with("conditioner.embedders.0."));
    let refiner = dir.path().join("refiner.safetensors");
    knobs_nn::io::write_safetensors(&refiner, &tensors, &Default::default()).unwrap();
    let err = SingleFile::open(&refiner, &SingleFileOptions::default()).err().unwrap().to_string();
    assert!(err.contains("refiner") && err.contains("conditioner.embedders.0.transformer."), "{err}");
}
