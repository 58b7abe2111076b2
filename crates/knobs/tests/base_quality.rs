//! The shipped base models, judged by the shipped judge on the fixed prompt set (every shape x
//! colour, one image each). Issue 4's bar is shape and colour in 90% of generations and the
//! background in 80%. The default model (8x8x8 latents) meets the background bar but not the
//! shape one (0.31 measured, see models/knobs-base/RECIPE.md), so its test pins a floor under
//! the measured value. The next recipe's model (16x16x4 latents, models/knobs-base-latent16)
//! meets both bars (0.95 / 1.00 measured) and is held to them.
mod common;

use common::ok;

/// (shape and colour, background) accuracies of `knobs eval` on `models/<name>`.
fn judged(name: &str) -> (f64, f64) {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let model = format!("{root}/models/{name}");
    let judge = format!("{root}/models/judge");
    let out = ok(&["eval", "--model", &model, "--judge", &judge, "--images-per-prompt", "1", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    (v["shape_colour_accuracy"].as_f64().unwrap(), v["background_accuracy"].as_f64().unwrap())
}

#[test]
fn the_shipped_base_model_keeps_its_measured_quality() {
    let (shape_colour, background) = judged("knobs-base");
    assert!(background >= 0.8, "background right in {background} of generations (issue 4's bar: 0.8)");
    assert!(shape_colour >= 0.25, "shape and colour right in {shape_colour} of generations (measured 0.31; floor 0.25)");
}

#[test]
fn the_latent16_base_model_meets_the_quality_bar() {
    let (shape_colour, background) = judged("knobs-base-latent16");
    assert!(background >= 0.8, "background right in {background} of generations (issue 4's bar: 0.8)");
    assert!(shape_colour >= 0.9, "shape and colour right in {shape_colour} of generations (issue 4's bar: 0.9)");
}
