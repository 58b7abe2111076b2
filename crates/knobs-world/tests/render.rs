//! The rasteriser makes the judge's task well posed: every combination renders, sizes and
//! positions are told apart by pixel counts and centroids, and colours come out exact.
use std::collections::HashMap;

use knobs_world::render::inside;
use knobs_world::scene::{MAX_OFFSET, MAX_ROTATION, SCALE_RANGE};
use knobs_world::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

fn all_attributes() -> impl Iterator<Item = Attributes> {
    Shape::ALL.into_iter().flat_map(|shape| {
        Colour::ALL.into_iter().flat_map(move |colour| {
            Background::ALL.into_iter().flat_map(move |background| {
                Size::ALL.into_iter().flat_map(move |size| {
                    Position::ALL.into_iter().map(move |position| Attributes { shape, colour, background, size, position })
                })
            })
        })
    })
}

/// Pixels that differ from the background, as (x, y, rgb).
fn object_pixels(img: &image::RgbImage, bg: Rgb) -> Vec<(u32, u32, Rgb)> {
    img.enumerate_pixels().filter(|(_, _, p)| p.0 != bg).map(|(x, y, p)| (x, y, p.0)).collect()
}

/// The jitter that pushes a shape furthest toward the canvas centre and makes it largest.
fn worst_case(a: Attributes) -> Scene {
    let (x, y) = a.position.centre(a.size);
    let toward = |c: f32| if c < 0.5 { MAX_OFFSET } else if c > 0.5 { -MAX_OFFSET } else { MAX_OFFSET };
    Scene { dx: toward(x), dy: toward(y), scale: SCALE_RANGE.1, rotation: MAX_ROTATION, ..Scene::new(a) }
}

#[test]
fn rendering_is_a_pure_function_of_the_scene() {
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..50 {
        let s = Scene::sample(&mut rng);
        assert_eq!(render(&s, 32).into_raw(), render(&s, 32).into_raw());
        assert_eq!(render(&s, 64).dimensions(), (64, 64));
    }
}

#[test]
fn every_combination_renders_plausibly_and_in_its_colour() {
    let mut rng = StdRng::seed_from_u64(1);
    let mut worst_fraction = (1.0f32, 0.0f32);
    for a in all_attributes() {
        for size in [32, 64] {
            for scene in [Scene::new(a), Scene::new(a).with_jitter(&mut rng), worst_case(a)] {
                let img = render(&scene, size);
                let px = object_pixels(&img, a.background.rgb());
                let fraction = px.len() as f32 / (size * size) as f32;
                worst_fraction = (worst_fraction.0.min(fraction), worst_fraction.1.max(fraction));
                assert!((0.02..0.6).contains(&fraction), "{scene:?} at {size}: covers {fraction}");
                // The most common non-background colour is exactly the scene's colour.
                let mut counts: HashMap<Rgb, usize> = HashMap::new();
                for (_, _, c) in &px {
                    *counts.entry(*c).or_default() += 1;
                }
                let (dominant, _) = counts.into_iter().max_by_key(|(_, n)| *n).unwrap();
                assert_eq!(dominant, a.colour.rgb(), "{scene:?} at {size}");
            }
        }
    }
    println!("object covers {:.3}..{:.3} of the canvas", worst_fraction.0, worst_fraction.1);
}

#[test]
fn small_is_always_smaller_than_large() {
    for a in all_attributes().filter(|a| a.size == Size::Small) {
        let small = Scene { scale: SCALE_RANGE.1, ..Scene::new(a) };
        let large = Scene { size: Size::Large, scale: SCALE_RANGE.0, ..Scene::new(a) };
        let count = |s: &Scene| object_pixels(&render(s, 32), a.background.rgb()).len();
        let (ns, nl) = (count(&small), count(&large));
        assert!(ns * 2 < nl, "{a:?}: largest small {ns} px vs smallest large {nl} px");
    }
}

#[test]
fn centroid_lands_in_the_positions_quadrant() {
    let mut rng = StdRng::seed_from_u64(2);
    let mut margins = HashMap::new();
    for a in all_attributes().filter(|a| a.colour == Colour::Red && a.background == Background::Black) {
        for scene in [Scene::new(a), worst_case(a), Scene::new(a).with_jitter(&mut rng)] {
            let img = render(&scene, 32);
            let px = object_pixels(&img, a.background.rgb());
            let n = px.len() as f32;
            let cx = px.iter().map(|p| p.0 as f32 + 0.5).sum::<f32>() / n / 32.0;
            let cy = px.iter().map(|p| p.1 as f32 + 0.5).sum::<f32>() / n / 32.0;
            // Signed distance from the canvas centre toward the expected corner (or, for the
            // centre, minus the distance from it).
            let margin = match a.position {
                Position::Center => -(cx - 0.5).abs().max((cy - 0.5).abs()),
                Position::TopLeft => (0.5 - cx).min(0.5 - cy),
                Position::TopRight => (cx - 0.5).min(0.5 - cy),
                Position::BottomLeft => (0.5 - cx).min(cy - 0.5),
                Position::BottomRight => (cx - 0.5).min(cy - 0.5),
            };
            let m = margins.entry((a.position, a.size)).or_insert(f32::MAX);
            *m = m.min(margin);
            if a.position == Position::Center {
                assert!(margin > -0.08, "{scene:?}: centroid ({cx:.3}, {cy:.3})");
            } else {
                assert!(margin > 0.08, "{scene:?}: centroid ({cx:.3}, {cy:.3})");
            }
        }
    }
    let mut m: Vec<_> = margins.into_iter().collect();
    m.sort_by_key(|(k, _)| *k);
    println!("worst centroid margins: {m:?}");
}

#[test]
fn shapes_are_centred_and_fit_the_unit_frame() {
    // Area and centroid of each outline in its local frame, on a fine grid.
    for shape in Shape::ALL {
        let (mut n, mut su, mut sv, mut outside) = (0usize, 0.0f32, 0.0f32, 0usize);
        for i in 0..400 {
            for j in 0..400 {
                let (u, v) = (-1.5 + 3.0 * (i as f32 + 0.5) / 400.0, -1.5 + 3.0 * (j as f32 + 0.5) / 400.0);
                if inside(shape, u, v) {
                    n += 1;
                    su += u;
                    sv += v;
                    outside += (u * u + v * v > 1.2 * 1.2) as usize;
                }
            }
        }
        let area = n as f32 * 9.0 / 160_000.0;
        let (cu, cv) = (su / n as f32, sv / n as f32);
        println!("{shape}: area {area:.2}, centroid ({cu:.3}, {cv:.3})");
        assert!((1.5..3.3).contains(&area), "{shape}: area {area}");
        assert!(cu.abs() < 0.02 && cv.abs() < 0.15, "{shape}: centroid ({cu}, {cv})");
        assert_eq!(outside, 0, "{shape} reaches past the render extent");
    }
}

#[test]
fn any_size_and_a_custom_fill_work() {
    let s = Scene::new(Attributes {
        shape: Shape::Square,
        colour: Colour::Blue,
        background: Background::White,
        size: Size::Large,
        position: Position::Center,
    });
    // The fill sees local coordinates: left half one colour, right half another.
    let img = render_with(&s, 64, &|u, _| if u < 0.0 { [1, 2, 3] } else { [4, 5, 6] });
    assert_eq!(img.get_pixel(26, 32).0, [1, 2, 3]);
    assert_eq!(img.get_pixel(38, 32).0, [4, 5, 6]);
    assert_eq!(img.get_pixel(1, 1).0, Background::White.rgb());
    for size in [1, 7, 16, 100] {
        assert_eq!(render(&s, size).dimensions(), (size, size));
    }
}
