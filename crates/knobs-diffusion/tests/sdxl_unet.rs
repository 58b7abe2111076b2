//! SDXL's UNet (tiny random, `fixtures/tiny-sdxl`, made by `scripts/make_tiny_sdxl.py`)
//! against diffusers: the `text_time` added embedding and the whole prediction, with
//! `transformer_layers_per_block` per level and a first level without attention.
mod common;

use knobs_diffusion::unet::{AddedCond, UNet2DConditionModel};
use common::{rel_err, tensor, tiny_sdxl as fixture};
use knobs_nn::io::read_safetensors;
use knobs_nn::cpu;

#[test]
fn sdxl_unet_matches_diffusers() {
    let device = cpu();
    let unet = UNet2DConditionModel::from_dir(fixture().join("unet"), &device).unwrap();
    let g = read_safetensors(fixture().join("goldens/unet.safetensors")).unwrap();
    let added = AddedCond { text_embeds: tensor(&g, "text_embeds", &device), time_ids: tensor(&g, "time_ids", &device) };
    let aug = unet.added_embedding(&added).expect("a text_time UNet");
    let e = rel_err(aug, &g, "intermediate.add_embedding");
    assert!(e < 1e-5, "add_embedding {e}");

    let (sample, t, ehs) = (tensor(&g, "sample", &device), tensor(&g, "timestep", &device), tensor(&g, "encoder_hidden_states", &device));
    let err = unet.check_inputs(&sample, &t, &ehs, None).unwrap_err().to_string();
    assert!(err.contains("forward_with_cond"), "{err}");
    let short = AddedCond { text_embeds: added.text_embeds.clone().narrow(1, 0, 20), time_ids: added.time_ids.clone() };
    let err = unet.check_inputs(&sample, &t, &ehs, Some(&short)).unwrap_err().to_string();
    assert!(err.contains("projection_class_embeddings_input_dim"), "{err}");
    unet.check_inputs(&sample, &t, &ehs, Some(&added)).unwrap();
    let out = unet.forward_with_cond(sample, t, ehs, Some(&added));
    let e = rel_err(out, &g, "out");
    println!("SDXL UNet: rel {e:.2e}");
    assert!(e < 1e-4, "output {e}");
}
