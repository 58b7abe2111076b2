//! The shipped base model, judged by the shipped judge on the fixed prompt set (every shape x
//! colour, one image each). Issue 4's bar is shape and colour in 90% of generations and the
//! background in 80%. The background bar is met; shape and colour are not yet (0.31 measured,
//! see models/knobs-base/RECIPE.md), so this pins a floor under the measured value: a model
//! that regresses to the first recipe's 0.16 fails here.
mod common;

use common::ok;

#[test]
fn the_shipped_base_model_keeps_its_measured_quality() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let model = format!("{root}/models/knobs-base");
    let judge = format!("{root}/models/judge");
    let out = ok(&["eval", "--model", &model, "--judge", &judge, "--images-per-prompt", "1", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let shape_colour = v["shape_colour_accuracy"].as_f64().unwrap();
    let background = v["background_accuracy"].as_f64().unwrap();
    assert!(background >= 0.8, "background right in {background} of generations (issue 4's bar: 0.8)");
    assert!(shape_colour >= 0.25, "shape and colour right in {shape_colour} of generations (measured 0.31; floor 0.25)");
}
