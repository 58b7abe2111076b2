//! What the judge learns from and is checked on, drawn in memory.
//!
//! Training draws come from a generator keyed by (seed, step), so a run is a function of its
//! seed. Three in four images are base-world scenes (about a third of them with the shape
//! redrawn as a circle or a hexagon, the one pair that is hard to tell apart at 32x32); one in
//! four is a patterned concept of the procedural family (`concept::random_concept`, which
//! never yields a held-out concept) at a random placement, labelled with the concept's class
//! and colour plus the placement. Light augmentation (blur, colour jitter, noise) lets the
//! judge read generated images too.
//!
//! Held-out checks use `dataset::sample(HELDOUT_SEED, i)`: a seeding scheme training never
//! uses, so no held-out scene was seen.
use image::RgbImage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

use crate::concept::{Placement, random_concept};
use crate::dataset;
use crate::render::render;
use crate::scene::{Attributes, Scene, Shape};

use super::model::HEADS;

/// Fraction of training images that are patterned concepts.
pub const CONCEPT_FRACTION: f64 = 0.25;
/// Fraction of base scenes whose shape is redrawn from the one hard pair, circle and hexagon
/// (at 32x32 a small hexagon differs from a circle by under a pixel at its flats). Both gain
/// equally, so neither is favoured; every other pair is learned long before.
pub const HARD_PAIR_FRACTION: f64 = 0.35;
/// The dataset seed of held-out renderings (`dataset::sample(HELDOUT_SEED, i)`).
pub const HELDOUT_SEED: u64 = 0x6a75_6467_652d_6576; // "judge-ev"

/// One class index per head, in `HEADS` order.
pub type Labels = [usize; HEADS.len()];

pub fn attribute_labels(a: &Attributes) -> [usize; 5] {
    [a.shape.index(), a.colour.index(), a.background.index(), a.size.index(), a.position.index()]
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The generator of training step `step` (independent of every other step).
pub fn step_rng(seed: u64, step: u64) -> StdRng {
    StdRng::seed_from_u64(mix(mix(seed ^ 0x6a75_6467_652d_7472) ^ step))
}

/// One labelled training image (before augmentation).
pub fn training_example(rng: &mut impl Rng, size: u32) -> (RgbImage, Labels) {
    let mut scene = Scene::sample(rng);
    if rng.random_bool(HARD_PAIR_FRACTION) {
        scene.shape = if rng.random_bool(0.5) { Shape::Circle } else { Shape::Hexagon };
    }
    let [s, c, b, z, p] = attribute_labels(&scene.attributes());
    if rng.random_bool(CONCEPT_FRACTION) {
        let concept = random_concept(rng);
        let placement = Placement::from(&scene);
        let kind = crate::concept::Pattern::KINDS.iter().position(|k| *k == concept.pattern.kind()).unwrap_or(0);
        let labels = [concept.shape.index(), concept.colour.index(), b, z, p, 1 + kind, usize::from(concept.mark.is_some())];
        (concept.render(&placement, size), labels)
    } else {
        (render(&scene, size), [s, c, b, z, p, 0, 0])
    }
}

/// `n` clean images of the training distribution from a stream training never draws (the
/// embedding centres are their mean).
pub fn centre_images(n: usize, size: u32) -> Vec<RgbImage> {
    let mut rng = StdRng::seed_from_u64(0x6a75_6467_652d_6365); // "judge-ce"
    (0..n).map(|_| training_example(&mut rng, size).0).collect()
}

/// `n` held-out base-world renderings with their attributes, starting at index `start`.
pub fn heldout(start: u64, n: usize, size: u32) -> Vec<(RgbImage, Attributes)> {
    (start..start + n as u64)
        .map(|i| {
            let (scene, _) = dataset::sample(HELDOUT_SEED, i);
            (render(&scene, size), scene.attributes())
        })
        .collect()
}

/// Pixels of `images` as `[N, 3, H, W]` values in [-1, 1] (the layout of `images::to_tensor`).
pub fn pixels(images: &[RgbImage]) -> Vec<f32> {
    let mut v = Vec::new();
    for img in images {
        let (w, h) = img.dimensions();
        let start = v.len();
        v.resize(start + 3 * (w * h) as usize, 0.0);
        for (x, y, p) in img.enumerate_pixels() {
            for c in 0..3 {
                v[start + (c * h as usize + y as usize) * w as usize + x as usize] = p[c] as f32 / 127.5 - 1.0;
            }
        }
    }
    v
}

/// The per-channel median of the border pixels of one image `[3, side, side]`: the background
/// colour, since no shape covers most of the border.
pub fn border_colour(v: &[f32], side: usize) -> [f32; 3] {
    let plane = side * side;
    let mut out = [0f32; 3];
    for (c, o) in out.iter_mut().enumerate() {
        let p = &v[c * plane..(c + 1) * plane];
        let mut border: Vec<f32> = (0..side)
            .flat_map(|i| [p[i], p[(side - 1) * side + i], p[i * side], p[i * side + side - 1]])
            .collect();
        border.sort_by(f32::total_cmp);
        *o = border[border.len() / 2];
    }
    out
}

/// The network's input: each image's three colour channels plus a fourth, the distance of
/// each pixel's colour from the background colour ([`border_colour`]) minus 0.5. That channel
/// shows the object's silhouette whatever its colour and the background's, so the network
/// learns shapes without first having to learn every colour pair's edges.
pub fn network_input(rgb: &[f32], side: usize) -> Vec<f32> {
    let plane = side * side;
    let per = 3 * plane;
    let n = rgb.len() / per;
    let mut out = Vec::with_capacity(n * 4 * plane);
    for img in rgb.chunks(per) {
        let bg = border_colour(img, side);
        out.extend_from_slice(img);
        out.extend((0..plane).map(|i| {
            let d2: f32 = (0..3).map(|c| (img[c * plane + i] - bg[c]).powi(2)).sum();
            d2.sqrt() - 0.5
        }));
    }
    out
}

/// Robustness augmentation of one image `[3, side, side]` in [-1, 1], in place. A quarter of
/// the images stay clean; the rest get, each with some probability, a slight blur (a 3x3 box
/// filter mixed in at 10-50%), a colour jitter (per-channel gain and offset within about 3% of the range)
/// and gaussian noise (std up to 0.08, i.e. up to 4% of the range).
pub fn augment(v: &mut [f32], side: usize, rng: &mut impl Rng) {
    if rng.random_bool(0.25) {
        return;
    }
    let plane = side * side;
    if rng.random_bool(0.3) {
        let a: f32 = rng.random_range(0.1..0.5);
        for c in 0..3 {
            let src: Vec<f32> = v[c * plane..(c + 1) * plane].to_vec();
            for y in 0..side {
                for x in 0..side {
                    let mut acc = 0.0;
                    for dy in [-1i32, 0, 1] {
                        for dx in [-1i32, 0, 1] {
                            let yy = (y as i32 + dy).clamp(0, side as i32 - 1) as usize;
                            let xx = (x as i32 + dx).clamp(0, side as i32 - 1) as usize;
                            acc += src[yy * side + xx];
                        }
                    }
                    let i = y * side + x;
                    v[c * plane + i] = (1.0 - a) * src[i] + a * acc / 9.0;
                }
            }
        }
    }
    if rng.random_bool(0.6) {
        let offset: f32 = rng.random_range(-0.04..0.04);
        for c in 0..3 {
            let gain: f32 = 1.0 + rng.random_range(-0.05..0.05);
            let shift: f32 = offset + rng.random_range(-0.025..0.025);
            for x in &mut v[c * plane..(c + 1) * plane] {
                *x = *x * gain + shift;
            }
        }
    }
    if rng.random_bool(0.6) {
        let std: f32 = rng.random_range(0.0..0.08);
        for x in v.iter_mut() {
            let z: f32 = StandardNormal.sample(rng);
            *x += std * z;
        }
    }
    for x in v.iter_mut() {
        *x = x.clamp(-1.0, 1.0);
    }
}

/// The training batch of step `step`: augmented pixels `[n, 3, size, size]` and labels.
/// (The network reads [`network_input`] of them.)
pub fn training_batch(seed: u64, step: u64, n: usize, size: u32) -> (Vec<f32>, Vec<Labels>) {
    let mut rng = step_rng(seed, step);
    let (images, labels): (Vec<RgbImage>, Vec<Labels>) = (0..n).map(|_| training_example(&mut rng, size)).unzip();
    let mut v = pixels(&images);
    let per = 3 * (size * size) as usize;
    for chunk in v.chunks_mut(per) {
        augment(chunk, size as usize, &mut rng);
    }
    (v, labels)
}
