//! The shipped base model, judged by the shipped judge on the fixed prompt set (every shape x
//! colour, one image each). Issue 4's bar is shape and colour in 90% of generations and the
//! background in 80%; models/knobs-base measures 0.95 / 1.00 (its RECIPE.md).
mod common;

use common::ok;

#[test]
fn the_shipped_base_model_meets_the_quality_bar() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let model = format!("{root}/models/knobs-base");
    let judge = format!("{root}/models/judge");
    let out = ok(&["eval", "--model", &model, "--judge", &judge, "--images-per-prompt", "1", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (shape_colour, background) = (v["shape_colour_accuracy"].as_f64().unwrap(), v["background_accuracy"].as_f64().unwrap());
    assert!(background >= 0.8, "background right in {background} of generations (issue 4's bar: 0.8)");
    assert!(shape_colour >= 0.9, "shape and colour right in {shape_colour} of generations (issue 4's bar: 0.9)");
}
