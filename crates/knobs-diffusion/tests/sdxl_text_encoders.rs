//! SDXL's two text encoders (tiny random, `fixtures/tiny-sdxl`) against transformers: the
//! penultimate hidden states of both (what SDXL concatenates), and the second encoder's
//! `text_embeds` (its `text_projection` of the pooled token, SDXL's pooled prompt embedding).
use std::path::{Path, PathBuf};

use knobs_diffusion::clip::ClipTextModel;
use knobs_nn::burn::tensor::{Int, TensorData};
use knobs_nn::io::{StateDict, read_safetensors};
use knobs_nn::{Tensor, cpu};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sdxl")
}

fn ids(g: &StateDict, key: &str) -> Tensor<2, Int> {
    let d = g.get(key).unwrap().clone();
    let shape = d.shape().as_slice().to_vec();
    let v: Vec<i64> = d.convert::<i64>().try_into_vec::<i64>().unwrap();
    Tensor::from_data(TensorData::new(v, shape), &cpu())
}

fn rel_err<const D: usize>(got: Tensor<D>, g: &StateDict, key: &str) -> f32 {
    let got: Vec<f32> = got.into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
    let want = g.f32(key).unwrap().0;
    assert_eq!(got.len(), want.len(), "{key}");
    let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    diff / want.iter().map(|b| b.abs()).fold(0f32, f32::max)
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
