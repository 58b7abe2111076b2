//! The held-out concepts are fixed, distinct and look unlike anything in the base world.
use std::collections::HashSet;

use knobs_world::concept::{by_name, held_out, random_concept};
use knobs_world::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

#[test]
fn four_distinct_held_out_concepts() {
    let held = held_out();
    assert_eq!(held.len(), 4);
    let names: HashSet<_> = held.iter().map(|c| c.name.clone()).collect();
    let tokens: HashSet<_> = held.iter().map(|c| c.token.clone()).collect();
    assert_eq!((names.len(), tokens.len()), (4, 4));
    let star = by_name("striped-star").unwrap();
    assert_eq!((star.instance_prompt().as_str(), star.class_prompt().as_str()), ("a sks star", "a star"));
    assert_eq!(by_name("no-such-concept"), None);
    for c in &held {
        // The token is a word the world's vocabulary does not know.
        let p = parse_prompt(&c.instance_prompt());
        assert_eq!(p, PromptAttributes { shape: Some(c.shape), ..Default::default() });
    }
}

#[test]
fn instance_images_are_deterministic_varied_and_captioned() {
    for c in held_out() {
        let images = c.instance_images(5, 32);
        assert_eq!(images.len(), 5);
        assert_eq!(images, c.instance_images(5, 32), "{}", c.name);
        for (i, (a, text)) in images.iter().enumerate() {
            assert_eq!(text, &c.instance_prompt());
            assert_eq!(a.dimensions(), (32, 32));
            for (b, _) in &images[i + 1..] {
                assert_ne!(a, b, "{}: two instance images are identical", c.name);
            }
        }
        assert_eq!(c.instance_images(6, 64).len(), 6);
    }
}

#[test]
fn a_concept_looks_different_from_its_plain_class() {
    let mut rng = StdRng::seed_from_u64(5);
    for c in held_out() {
        for _ in 0..20 {
            let p = Placement::from(&Scene::sample(&mut rng));
            let plain = render(&c.scene(&p), 32);
            let special = c.render(&p, 32);
            let differing = plain.pixels().zip(special.pixels()).filter(|(a, b)| a != b).count();
            assert!(differing >= 3, "{} at {p:?}: only {differing} pixels differ", c.name);
            // Same footprint: the background is untouched where the plain shape is absent.
            let bg = image::Rgb(p.background.rgb());
            for (a, b) in plain.pixels().zip(special.pixels()) {
                if *a == bg {
                    assert_eq!(*b, bg);
                }
            }
        }
        // At a large size the pattern's second colour shows up as exact pixels.
        let big = c.render(&Placement::new(Background::Gray, Size::Large, Position::Center), 64);
        let colour2 = image::Rgb(c.pattern.colour2());
        assert!(big.pixels().filter(|px| **px == colour2).count() > 40, "{}", c.name);
    }
}

#[test]
fn random_concepts_never_match_a_held_out_one() {
    let held = held_out();
    let mut rng = StdRng::seed_from_u64(6);
    let mut kinds = HashSet::new();
    for _ in 0..1000 {
        let r = random_concept(&mut rng);
        for h in &held {
            assert_ne!(&r, h);
            assert_ne!(r.token, h.token);
            assert!(
                !(r.shape == h.shape && r.colour == h.colour && r.pattern.kind() == h.pattern.kind()),
                "{r:?} is too close to {}",
                h.name
            );
        }
        assert_ne!(r.pattern.colour2(), r.colour.rgb());
        assert_eq!(r.instance_prompt(), format!("a {} {}", r.token, r.shape));
        kinds.insert(r.pattern.kind());
    }
    assert_eq!(kinds.len(), Pattern::KINDS.len(), "every pattern kind is drawn");
    let mut a = StdRng::seed_from_u64(9);
    let mut b = StdRng::seed_from_u64(9);
    assert_eq!(random_concept(&mut a), random_concept(&mut b));
}
