//! SDXL's text side and sampling loop (tiny random, `fixtures/tiny-sdxl`) against diffusers:
//! both text encoders and the projected pooled token, `encode_prompt`'s cases, and the whole
//! 3-step Euler call with guidance and non-default time ids, to the decoded image.
mod common;

use std::path::Path;

use knobs_diffusion::clip::ClipTextModel;
use knobs_nn::burn::tensor::{Int, TensorData};
use knobs_nn::io::{StateDict, read_safetensors};
use common::{golden_request, rel_err, tiny_sdxl as fixture};
use knobs_nn::{Tensor, cpu};

fn ids(g: &StateDict, key: &str) -> Tensor<2, Int> {
    let d = g.get(key).unwrap().clone();
    let shape = d.shape().as_slice().to_vec();
    let v: Vec<i64> = d.convert::<i64>().try_into_vec::<i64>().unwrap();
    Tensor::from_data(TensorData::new(v, shape), &cpu())
}

#[test]
fn both_sdxl_text_encoders_match_transformers() {
    let g = read_safetensors(fixture().join("goldens/text_encoders.safetensors")).unwrap();
    let te1 = ClipTextModel::from_dir(fixture().join("text_encoder"), &cpu()).unwrap();
    let te2 = ClipTextModel::from_dir(fixture().join("text_encoder_2"), &cpu()).unwrap();
    assert!(te1.text_projection.is_none() && te2.text_projection.is_some());

    let out1 = te1.forward(ids(&g, "tok1_ids"));
    let n1 = out1.hidden_states.len();
    let e = rel_err(out1.hidden_states[n1 - 2].clone(), &g, "te1.hidden_states_m2");
    assert!(e < 1e-5, "te1 penultimate {e}");

    let out2 = te2.forward(ids(&g, "tok2_ids"));
    let n2 = out2.hidden_states.len();
    for (got, key) in [(out2.hidden_states[n2 - 2].clone(), "te2.hidden_states_m2"), (out2.last_hidden_state.clone(), "te2.last_hidden_state")] {
        let e = rel_err(got, &g, key);
        assert!(e < 1e-5, "{key} {e}");
    }
    let e = rel_err(te2.text_embeds(&out2).unwrap(), &g, "te2.text_embeds");
    println!("te2 text_embeds rel {e:.2e}");
    assert!(e < 1e-5, "text_embeds {e}");
}

/// `StableDiffusionXLPipeline.encode_prompt`'s five cases: a negative prompt, zeros for an
/// empty one (`force_zeros_for_empty_prompt`), "" without it, `prompt_2`, and `clip_skip`
/// (positive branch only).
#[test]
fn sdxl_encode_prompt_matches_diffusers() {
    use knobs_diffusion::clip::ClipTokenizer;
    use knobs_diffusion::pipeline::sdxl::SdxlText;
    let device = cpu();
    let g = read_safetensors(fixture().join("goldens/text_encoders.safetensors")).unwrap();
    let te1 = ClipTextModel::from_dir(fixture().join("text_encoder"), &device).unwrap();
    let te2 = ClipTextModel::from_dir(fixture().join("text_encoder_2"), &device).unwrap();
    let tok1 = ClipTokenizer::from_dir(fixture().join("tokenizer")).unwrap();
    let tok2 = ClipTokenizer::from_dir(fixture().join("tokenizer_2")).unwrap();
    // The tokenizers give transformers' ids ("!" is the second tokenizer's pad, id 0).
    let want2: Vec<i64> = g.get("tok2_ids").unwrap().clone().convert::<i64>().try_into_vec::<i64>().unwrap();
    let got2: Vec<i64> = tok2.encode("a photo of a sks dog, high quality!").unwrap().into_iter().map(i64::from).collect();
    assert_eq!(got2, want2[..77], "tokenizer_2 ids");
    let text = SdxlText { te1: &te1, tok1: &tok1, te2: &te2, tok2: &tok2 };
    let prompt = "a photo of a sks dog, high quality!";
    let check = |case: &str, p: &knobs_diffusion::pipeline::sdxl::SdxlPrompt, neg: bool| {
        let pre = if neg { "negative_" } else { "" };
        let e = rel_err(p.embeds.clone(), &g, &format!("encode.{case}.{pre}prompt_embeds"));
        assert!(e < 1e-5, "{case} {pre}prompt_embeds {e}");
        if g.tensors.contains_key(&format!("encode.{case}.{pre}pooled_prompt_embeds")) {
            let e = rel_err(p.pooled.clone(), &g, &format!("encode.{case}.{pre}pooled_prompt_embeds"));
            assert!(e < 1e-5, "{case} {pre}pooled {e}");
        }
    };
    let pos = text.encode(prompt, None, 0, &device).unwrap();
    check("neg", &pos, false);
    check("neg", &text.negative(Some("blurry, dark"), None, true, &pos, &device).unwrap(), true);
    let zeros = text.negative(None, None, true, &pos, &device).unwrap();
    // diffusers' goldens are all zeros here (a relative error has nothing to divide by).
    for key in ["encode.zeros.negative_prompt_embeds", "encode.zeros.negative_pooled_prompt_embeds"] {
        assert!(g.f32(key).unwrap().0.iter().all(|v| *v == 0.0), "{key}");
    }
    assert_eq!(zeros.embeds.dims(), pos.embeds.dims());
    assert_eq!(zeros.embeds.abs().sum().into_scalar::<f32>() + zeros.pooled.abs().sum().into_scalar::<f32>(), 0.0);
    check("nozeros", &text.negative(None, None, false, &pos, &device).unwrap(), true);
    check("prompt_2", &text.encode(prompt, Some("an oil painting of a cat"), 0, &device).unwrap(), false);
    check("clip_skip1", &text.encode(prompt, None, 1, &device).unwrap(), false);
    check("clip_skip1", &text.negative(Some("blurry, dark"), None, true, &pos, &device).unwrap(), true);
    assert!(text.encode(prompt, None, 5, &device).unwrap_err().to_string().contains("clip_skip"));
}

/// The whole SDXL call of the golden through `StableDiffusion` loaded from the folder (3
/// Euler steps, guidance 5, negative prompt, original size (96, 128), crop (8, 16), target
/// (64, 80), 32x48): the final latents and the decoded image as diffusers gives them.
#[test]
fn sdxl_pipeline_matches_diffusers() {
    use knobs_diffusion::pipeline::sdxl::time_ids;
    use knobs_diffusion::pipeline::{SchedulerKind, StableDiffusion};
    let device = cpu();
    let g = read_safetensors(fixture().join("goldens/pipeline.safetensors")).unwrap();
    let sd = StableDiffusion::from_dir(fixture(), &device).unwrap();
    assert!(sd.is_sdxl() && sd.force_zeros_for_empty_prompt);
    assert_eq!(sd.default_scheduler(), SchedulerKind::Euler);
    assert_eq!(time_ids((96, 128), (8, 16), (64, 80)).to_vec(), g.f32("add_time_ids").unwrap().0);
    let req = golden_request(&g, "latents");
    let cond = sd.condition(&req, 32, 48).unwrap();
    let added = cond.added.as_ref().expect("SDXL conditioning");
    for (got, key) in [(cond.context.clone().reshape([2, 77 * 48]), "cfg.prompt_embeds"), (added.text_embeds.clone(), "cfg.text_embeds"), (added.time_ids.clone(), "cfg.time_ids")] {
        let e = rel_err(got, &g, key);
        assert!(e < 1e-5, "{key} {e}");
    }
    let out = sd.generate_latents(&req).unwrap();
    let e = rel_err(out.clone(), &g, "final_latents");
    println!("SDXL 3-step latents rel {e:.2e}");
    assert!(e < 1e-4, "final latents {e}");
    let e = rel_err(sd.decode_latents(out).permute([0, 2, 3, 1]), &g, "image");
    println!("SDXL image rel {e:.2e}");
    assert!(e < 1e-4, "image {e}");
}

/// Without a negative prompt SDXL's unconditional branch is zeros; `num_images` repeats
/// every row; SDXL fields on an SD-1.x model are refused by name.
#[test]
fn sdxl_request_shapes_and_refusals() {
    use knobs_diffusion::pipeline::{GenerateRequest, StableDiffusion};
    let device = cpu();
    let sd = StableDiffusion::from_dir(fixture(), &device).unwrap();
    let req = GenerateRequest { num_images: 2, crop_top_left: Some((4, 2)), ..GenerateRequest::new("a dog") };
    let cond = sd.condition(&req, 32, 48).unwrap();
    assert_eq!(cond.context.dims(), [4, 77, 48]);
    let added = cond.added.unwrap();
    let ids: Vec<f32> = added.time_ids.into_data().convert::<f32>().try_into_vec().unwrap();
    assert_eq!(ids, [32., 48., 4., 2., 32., 48.].repeat(4));
    let uncond: Vec<f32> = cond.context.narrow(0, 0, 2).into_data().convert::<f32>().try_into_vec().unwrap();
    assert!(uncond.iter().all(|v| *v == 0.0));
    let pooled: Vec<f32> = added.text_embeds.narrow(0, 2, 2).into_data().convert::<f32>().try_into_vec().unwrap();
    assert!(pooled.iter().any(|v| *v != 0.0));

    let sd1 = StableDiffusion::from_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/golden/tiny-sd"), &device).unwrap();
    assert!(!sd1.is_sdxl());
    let err = sd1.generate_latents(&GenerateRequest { steps: 1, prompt_2: Some("x".into()), ..GenerateRequest::new("a dog") }).unwrap_err().to_string();
    assert!(err.contains("prompt_2"), "{err}");
}

/// An SDXL embedding (`clip_l` / `clip_g`) loaded as diffusers' `load_textual_inversion` into
/// both encoders gives diffusers' prompt embeddings, the pooled one taken at the new token
/// (te2 pools at argmax(ids)); an SD-1.x embedding is refused by an SDXL pipeline.
#[test]
fn sdxl_textual_inversion_matches_diffusers() {
    use knobs_diffusion::loaders::PipelineAdapters;
    use knobs_diffusion::pipeline::{GenerateRequest, StableDiffusion};
    let device = cpu();
    let g = read_safetensors(fixture().join("goldens/textual_inversion.safetensors")).unwrap();
    let mut sd = StableDiffusion::from_dir(fixture(), &device).unwrap();
    let mut adapters = PipelineAdapters::new(0);
    let file = fixture().join("goldens/textual_inversion/tiny-ti.safetensors");
    let (emb, ids) = adapters.load_embedding_as(&mut sd, &file, Some("<tiny-ti>")).unwrap();
    assert_eq!((emb.token.as_str(), ids), ("<tiny-ti>", vec![1000]));
    let req = GenerateRequest { negative_prompt: "blurry, dark".into(), ..GenerateRequest::new("a photo of <tiny-ti> on the beach") };
    let cond = sd.condition(&req, 32, 48).unwrap();
    let added = cond.added.unwrap();
    for (i, side) in [(1, ""), (0, "negative_")] {
        let e = rel_err(cond.context.clone().narrow(0, i, 1), &g, &format!("encode.neg.{side}prompt_embeds"));
        assert!(e < 1e-5, "{side}prompt_embeds {e}");
        let e = rel_err(added.text_embeds.clone().narrow(0, i, 1), &g, &format!("encode.neg.{side}pooled_prompt_embeds"));
        assert!(e < 1e-5, "{side}pooled {e}");
    }
    // Loading it again is refused (the token exists), and leaves both tokenizers as they were.
    assert!(adapters.load_embedding_as(&mut sd, &file, Some("<tiny-ti>")).unwrap_err().to_string().contains("<tiny-ti>"));
    assert_eq!(sd.tokenizer_2.as_ref().unwrap().vocab_size(), 1001);
    let tmp = tempfile::tempdir().unwrap();
    let sd1 = tmp.path().join("learned_embeds.safetensors");
    let one = knobs_diffusion::clip::embeddings::LearnedEmbedding { token: "<x>".into(), vectors: vec![vec![0.5; 16]], file: sd1.clone() };
    knobs_diffusion::clip::embeddings::save_diffusers(&sd1, &one).unwrap();
    let err = adapters.load_embedding(&mut sd, &sd1).unwrap_err().to_string();
    assert!(err.contains("clip_l"), "{err}");
}
