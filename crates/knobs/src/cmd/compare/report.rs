//! The report of a compare run: `results.json` (every number), `report.md` (a table per
//! concept and the mean over concepts), `fidelity_vs_size.png`, and `report.html`, one
//! self-contained page (images inlined as base64 PNG data URIs).
use std::path::Path;

use anyhow::{Context, Result};
use image::Rgb;
use knobs_train::finetune::plot::{Scatter, Series, scatter};
use serde_json::{Map, Value, json};

use super::plan::{BASE, Plan, known_methods, write_json};

/// A column of the tables: its key in a run's `metrics`, its heading, its format.
struct Column {
    key: &'static str,
    header: &'static str,
    fmt: fn(f64) -> String,
}

fn int(x: f64) -> String {
    let s = format!("{}", x.round() as i64);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 && c != '-' {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn bytes(x: f64) -> String {
    match x {
        x if x >= 1024.0 * 1024.0 => format!("{:.1} MiB", x / (1024.0 * 1024.0)),
        x if x >= 1024.0 => format!("{:.1} KiB", x / 1024.0),
        x => format!("{x:.0} B"),
    }
}

const COLUMNS: [Column; 13] = [
    Column { key: "trainable_params", header: "trainable params", fmt: int },
    Column { key: "file_bytes", header: "file size", fmt: bytes },
    Column { key: "seconds_per_step", header: "s/step", fmt: |x| format!("{x:.3}") },
    Column { key: "train_seconds", header: "train s", fmt: |x| format!("{x:.1}") },
    Column { key: "peak_rss_mib", header: "peak RSS MiB", fmt: |x| format!("{x:.0}") },
    Column { key: "subject_fidelity", header: "subject fidelity", fmt: |x| format!("{x:.3}") },
    Column { key: "prompt_fidelity", header: "prompt fidelity", fmt: |x| format!("{x:.3}") },
    Column { key: "prior_preservation", header: "prior preservation", fmt: |x| format!("{x:.3}") },
    Column { key: "language_drift", header: "language drift", fmt: |x| format!("{x:.3}") },
    Column { key: "diversity", header: "diversity", fmt: |x| format!("{x:.3}") },
    Column { key: "gen_ms_base", header: "gen ms base", fmt: |x| format!("{x:.1}") },
    Column { key: "gen_ms_unmerged", header: "gen ms unmerged", fmt: |x| format!("{x:.1}") },
    Column { key: "gen_ms_merged", header: "gen ms merged", fmt: |x| format!("{x:.1}") },
];

/// A fixed colour per method (by its place among the known methods), for the plot and legend.
fn colour(method: &str) -> Rgb<u8> {
    const PALETTE: [[u8; 3]; 8] =
        [[214, 39, 40], [31, 119, 180], [44, 160, 44], [255, 127, 14], [148, 103, 189], [140, 86, 75], [227, 119, 194], [23, 190, 207]];
    let i = known_methods().iter().position(|m| m == method).unwrap_or(PALETTE.len() - 1);
    Rgb(PALETTE[i % PALETTE.len()])
}

/// Per method (in run order), the mean over concepts of each metric's measurable values.
fn means(runs: &[Value]) -> Vec<(String, Value)> {
    let mut order: Vec<String> = Vec::new();
    for r in runs {
        let m = r["method"].as_str().unwrap_or_default().to_string();
        if !order.contains(&m) {
            order.push(m);
        }
    }
    order
        .into_iter()
        .map(|m| {
            let rows: Vec<&Value> = runs.iter().filter(|r| r["method"] == m.as_str()).map(|r| &r["metrics"]).collect();
            let mut out = Map::new();
            for c in &COLUMNS {
                let v: Vec<f64> = rows.iter().filter_map(|r| r[c.key].as_f64()).filter(|x| x.is_finite()).collect();
                out.insert(c.key.into(), if v.is_empty() { Value::Null } else { Value::from(v.iter().sum::<f64>() / v.len() as f64) });
            }
            (m, Value::Object(out))
        })
        .collect()
}

fn cells(metrics: &Value) -> Vec<String> {
    COLUMNS.iter().map(|c| metrics[c.key].as_f64().filter(|x| x.is_finite()).map_or("n/a".into(), c.fmt)).collect()
}

fn markdown_table(rows: &[(String, Value)]) -> String {
    let mut s = format!("| method | {} |\n|{}\n", COLUMNS.map(|c| c.header).join(" | "), " --- |".repeat(COLUMNS.len() + 1));
    for (m, metrics) in rows {
        s.push_str(&format!("| {m} | {} |\n", cells(metrics).join(" | ")));
    }
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn html_table(rows: &[(String, Value)]) -> String {
    let head: String = COLUMNS.iter().map(|c| format!("<th>{}</th>", c.header)).collect();
    let mut s = format!("<table><tr><th>method</th>{head}</tr>\n");
    for (m, metrics) in rows {
        let Rgb([r, g, b]) = colour(m);
        let swatch = if m == BASE { String::new() } else { format!("<span class=\"sw\" style=\"background:rgb({r},{g},{b})\"></span>") };
        let tds: String = cells(metrics).iter().map(|c| format!("<td>{c}</td>")).collect();
        s.push_str(&format!("<tr><td>{swatch}{}</td>{tds}</tr>\n", escape(m)));
    }
    s + "</table>\n"
}

/// RFC 4648 base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            out.push(if i <= chunk.len() { A[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

fn img_tag(path: &Path, alt: &str, class: &str) -> Result<String> {
    let data = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(format!("<img class=\"{class}\" alt=\"{}\" src=\"data:image/png;base64,{}\">", escape(alt), base64(&data)))
}

fn by_concept(runs: &[Value]) -> Vec<(String, Vec<&Value>)> {
    let mut out: Vec<(String, Vec<&Value>)> = Vec::new();
    for r in runs {
        let c = r["concept"].as_str().unwrap_or_default().to_string();
        match out.iter_mut().find(|(n, _)| *n == c) {
            Some((_, v)) => v.push(r),
            None => out.push((c, vec![r])),
        }
    }
    out
}

fn rows_of(runs: &[&Value]) -> Vec<(String, Value)> {
    runs.iter().map(|r| (r["method"].as_str().unwrap_or_default().to_string(), r["metrics"].clone())).collect()
}

const NOTES: &str = "Columns: trainable params and s/step, train s (wall time of the whole `knobs train` run, model loading included) and \
peak RSS (of that training process) come from `knobs train --json`; file size is what a user keeps to use the result (the LoRA file, \
the embedding, the IA3 folder, or DreamBooth's whole model folder). The judge's measures come from `knobs eval --concept` (or `--instance-dir`): subject \
fidelity (mean cosine of generations to the instance images), prompt fidelity, prior preservation (other-class prompt fidelity \
relative to the base model, 1 = unchanged), language drift (share of the plain class prompt's images that look like the subject; lower \
is better) and diversity (mean pairwise 1 - cosine; n/a with one image per prompt). gen ms: one image of the instance prompt, best of \
several runs in one process, with the bare base model, with the adapters attached (unmerged), and merged into the weights. \
IA3 is evaluated merged into a model folder (the same function; `knobs eval` loads LoRA files and embeddings only).";

/// Writes every report file; returns the `results.json` object.
pub fn write(plan: &Plan, runs: &[Value]) -> Result<Value> {
    let mean_rows = means(runs);
    let mut mean = Map::new();
    for (m, v) in &mean_rows {
        mean.insert(m.clone(), v.clone());
    }
    let settings = json!({
        "model": plan.model.display().to_string(),
        "judge": plan.judge.display().to_string(),
        "concepts": plan.subjects.iter().map(|c| c.name.clone()).collect::<Vec<_>>(),
        "methods": plan.methods,
        "budget_steps": plan.budget_steps,
        "images_per_prompt": plan.images_per_prompt,
        "eval_steps": plan.eval_steps,
    });
    let results = json!({ "settings": settings, "columns": COLUMNS.map(|c| c.key), "mean": mean, "runs": runs });
    write_json(&plan.out.join("results.json"), &results)?;

    // The scatter plot: one point per trained run, a series (colour, legend entry) per method.
    let mut series: Vec<Series> = Vec::new();
    for r in runs {
        let m = &r["metrics"];
        let (Some(x), Some(y), Some(method)) = (m["file_bytes"].as_f64(), m["subject_fidelity"].as_f64(), r["method"].as_str()) else {
            continue;
        };
        match series.iter_mut().find(|s| s.label == method) {
            Some(s) => s.points.push((x, y)),
            None => series.push(Series { label: method.to_string(), colour: colour(method), points: vec![(x, y)] }),
        }
    }
    let n_points: usize = series.iter().map(|s| s.points.len()).sum();
    let plot = scatter(
        &Scatter { title: "Subject fidelity against file size", x_title: "file size (bytes, log scale)", y_title: "subject fidelity", log_x: true },
        &series,
    );
    let plot_path = plan.out.join("fidelity_vs_size.png");
    knobs_world::dataset::write_atomic(&plot_path, &knobs_world::dataset::encode_png(&plot)?)?;
    let plot_caption = format!("Subject fidelity against file size (log scale), one point per trained run ({n_points} points), a colour per method.");

    let header = format!(
        "Base model `{}`, {} training steps per method (each with its own default learning rate), judge `{}`. Evaluation: {} image(s) per prompt, \
         {} denoising steps, guidance 5, seed 0, the same prompts and seeds for every method.",
        plan.model.display(),
        plan.budget_steps,
        plan.judge.display(),
        plan.images_per_prompt,
        plan.eval_steps
    );
    let concepts = by_concept(runs);
    let mut md = format!("# knobs compare\n\n{header}\n\n## Mean over {} concept(s)\n\n{}\n", concepts.len(), markdown_table(&mean_rows));
    for (c, rs) in &concepts {
        md.push_str(&format!("## {c}\n\n{}\n", markdown_table(&rows_of(rs))));
    }
    md.push_str(&format!(
        "## Fidelity against size\n\n![fidelity vs size](fidelity_vs_size.png)\n\n{plot_caption}\n\n{NOTES}\n"
    ));
    knobs_world::dataset::write_atomic(&plan.out.join("report.md"), md.as_bytes())?;

    let mut html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>knobs compare</title><style>\
         body{{font-family:sans-serif;margin:2em;max-width:90em}} table{{border-collapse:collapse;margin:1em 0}} \
         td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} td:first-child{{text-align:left}} \
         .sw{{display:inline-block;width:.8em;height:.8em;margin-right:.4em}} img.px{{image-rendering:pixelated;width:auto;height:auto;zoom:2}} \
         figure{{display:inline-block;vertical-align:top;margin:0 1em 1em 0}}</style></head><body>\n\
         <h1>knobs compare</h1><p>{}</p>\n<h2>Mean over {} concept(s)</h2>\n{}",
        escape(&header.replace('`', "")),
        concepts.len(),
        html_table(&mean_rows)
    );
    html.push_str(&format!("<h2>Fidelity against size</h2><p>{}</p>{}\n", escape(&plot_caption), img_tag(&plot_path, "fidelity vs size", "")?));
    for (c, rs) in &concepts {
        html.push_str(&format!("<h2>{}</h2>\n{}", escape(c), html_table(&rows_of(rs))));
        html.push_str("<p>Sample grids: first row the instance images, then the subject prompts, the class prompt and the other-class prompts \
                       (and, where prior preservation needs it, the same with the base model), the same seeds for every method.</p>\n");
        for r in rs {
            let m = r["method"].as_str().unwrap_or_default();
            let dir = plan.out.join("runs").join(c).join(m);
            html.push_str(&format!("<figure><figcaption>{}</figcaption>", escape(m)));
            for (key, alt, class) in [("eval_grid", "sample grid", "px"), ("loss_curve", "loss curve", "")] {
                if let Some(name) = r["files"][key].as_str() {
                    html.push_str(&img_tag(&dir.join(name), &format!("{m} {alt}"), class)?);
                }
            }
            html.push_str("</figure>\n");
        }
    }
    html.push_str(&format!("<p>{}</p></body></html>\n", escape(&NOTES.replace('`', ""))));
    knobs_world::dataset::write_atomic(&plan.out.join("report.html"), html.as_bytes())?;
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648() {
        for (input, want) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foobar", "Zm9vYmFy")] {
            assert_eq!(base64(input.as_bytes()), want);
        }
    }

    #[test]
    fn the_scatter_plot_has_a_dot_per_run_in_its_method_colour() {
        use knobs_train::finetune::plot::SCATTER_SIZE;
        let tmp = tempfile::tempdir().unwrap();
        let plan = Plan {
            out: tmp.path().to_path_buf(),
            model: "m".into(),
            judge: "j".into(),
            subjects: vec![],
            methods: vec!["lora".into(), "textual-inversion".into()],
            budget_steps: 3,
            images_per_prompt: 1,
            eval_steps: 2,
            hypernetwork_dir: None,
        };
        let run = |method: &str, concept: &str, bytes: Option<f64>, fidelity: f64| {
            json!({ "method": method, "concept": concept, "metrics": { "file_bytes": bytes, "subject_fidelity": fidelity }, "files": {} })
        };
        let runs = [
            run(BASE, "a", None, 0.1),
            run("lora", "a", Some(2.0e5), 0.6),
            run("lora", "b", Some(2.1e5), 0.5),
            run("textual-inversion", "a", Some(3.0e3), 0.3),
        ];
        write(&plan, &runs).unwrap();
        let img = image::open(tmp.path().join("fidelity_vs_size.png")).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), SCATTER_SIZE);
        // Two lora dots and one textual-inversion dot, each colour also once in the legend;
        // nothing for the base model (no file).
        let px = |m: &str| img.pixels().filter(|p| **p == colour(m)).count();
        let (lora, ti) = (px("lora"), px("textual-inversion"));
        assert!(lora > 3 * 40 && lora < 3 * 70, "{lora}");
        assert!(ti > 2 * 40 && ti < 2 * 70, "{ti}");
        assert_eq!(px(BASE), 0);
        let md = std::fs::read_to_string(tmp.path().join("report.md")).unwrap();
        assert!(md.contains("![fidelity vs size](fidelity_vs_size.png)") && md.contains("(3 points)"), "{md}");
        let html = std::fs::read_to_string(tmp.path().join("report.html")).unwrap();
        assert_eq!(html.matches("src=\"data:image/png;base64,iVBORw0KGgo").count(), 1, "the plot is inlined as a PNG");
    }

    #[test]
    fn thousands() {
        assert_eq!(int(33152.0), "33,152");
        assert_eq!(int(64.0), "64");
        assert_eq!(int(2380516.0), "2,380,516");
    }
}
