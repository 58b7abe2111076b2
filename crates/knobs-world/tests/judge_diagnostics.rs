//! Diagnostics for tuning a judge (ignored; run by hand):
//!
//!     KNOBS_JUDGE_DIR=/abs/path/to/judge cargo test -p knobs-world --test judge_diagnostics -- --ignored --nocapture
//!
//! `confusion`: the shape confusion matrix on 2000 held-out renderings, per size.
//! `embedding_rules`: for several feature / texture weights, each held-out concept's mean
//! cosine to itself / to plain objects of its class and colour / to the other concepts, and
//! language drift on plain class renders (want 0) and on fresh instance renders (want 1).
use knobs_world::concept::held_out;
use knobs_world::judge::metrics::{cosine, language_drift};
use knobs_world::judge::{Judge, data};
use knobs_world::{Colour, ConceptSpec, Shape, Size, render};

fn judge() -> Judge {
    let dir = std::env::var("KNOBS_JUDGE_DIR").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/judge").into());
    Judge::load(dir).unwrap()
}

#[test]
#[ignore]
fn confusion() {
    let judge = judge();
    let set = data::heldout(0, 2000, 32);
    let preds = judge.predict(&set.iter().map(|(i, _)| i.clone()).collect::<Vec<_>>());
    for size in Size::ALL {
        let mut m = [[0usize; 8]; 8];
        for ((_, a), p) in set.iter().zip(&preds) {
            if a.size == size {
                m[a.shape.index()][p.shape.value.index()] += 1;
            }
        }
        eprintln!("{size} (rows: truth, columns: predicted, in Shape::ALL order):");
        for s in Shape::ALL {
            eprintln!("{:>9} {:?}", s.name(), m[s.index()]);
        }
    }
}

fn mean_cos(a: &[Vec<f32>], b: &[Vec<f32>], same: bool) -> f64 {
    let (mut s, mut n) = (0.0, 0);
    for (i, x) in a.iter().enumerate() {
        for (j, y) in b.iter().enumerate() {
            if !(same && i == j) {
                s += cosine(x, y);
                n += 1;
            }
        }
    }
    s / n as f64
}

#[test]
#[ignore]
fn embedding_rules() {
    let mut judge = judge();
    let concepts = held_out();
    let inst = |c: &ConceptSpec, n: usize| c.instance_images(n, 32).into_iter().map(|(i, _)| i).collect::<Vec<_>>();
    for (fw, tw) in [(1.0, 0.0), (0.0, 1.0), (1.0, 0.5), (1.0, 1.0)] {
        judge.file.embedding.feature_weight = fw;
        judge.file.embedding.texture_weight = tw;
        let emb: Vec<Vec<Vec<f32>>> = concepts.iter().map(|c| judge.embed(&inst(c, 8))).collect();
        let mut line = format!("feature {fw} texture {tw}:");
        let mut drift = String::new();
        for (k, c) in concepts.iter().enumerate() {
            let plain: Vec<_> = c.instance_placements(8).iter().map(|p| render(&c.scene(p), 32)).collect();
            let others: Vec<Vec<f32>> = (0..concepts.len()).filter(|o| *o != k).flat_map(|o| emb[o].clone()).collect();
            line += &format!(
                "  {:.3}/{:.3}/{:.3}",
                mean_cos(&emb[k], &emb[k], true),
                mean_cos(&emb[k], &judge.embed(&plain), false),
                mean_cos(&emb[k], &others, false)
            );
            let refs = judge.embed(&inst(c, 5));
            let fresh: Vec<_> = inst(c, 25).into_iter().skip(5).collect();
            let plain_any: Vec<_> = c
                .instance_placements(25)
                .iter()
                .enumerate()
                .map(|(i, p)| render(&p.scene(c.shape, Colour::ALL[i % 8]), 32))
                .collect();
            drift += &format!(
                "  {:.2}/{:.2}",
                language_drift(&judge.embed(&plain_any), &refs),
                language_drift(&judge.embed(&fresh), &refs)
            );
        }
        eprintln!("{line}\n    drift plain/fresh:{drift}");
    }
}
