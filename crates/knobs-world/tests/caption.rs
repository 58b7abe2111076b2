//! Captions say what is in the image, and `parse_prompt` reads them back.
use knobs_world::caption::{P_BACKGROUND, P_COLOUR, P_POSITION, P_SIZE};
use knobs_world::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

#[test]
fn full_captions_parse_back_to_the_scene() {
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..2000 {
        let s = Scene::sample(&mut rng);
        let text = full_caption(&s);
        let parsed = parse_prompt(&text);
        assert_eq!(parsed, PromptAttributes::from(s.attributes()), "{text}");
        assert_eq!(parsed.complete(), Some(s.attributes()));
    }
}

#[test]
fn captions_follow_the_template_and_the_omission_rates() {
    let mut rng = StdRng::seed_from_u64(4);
    let n = 4000;
    let mut seen = [0usize; 4];
    for _ in 0..n {
        let s = Scene::sample(&mut rng);
        let text = caption(&s, &mut rng);
        let p = parse_prompt(&text);
        // Whatever a caption names is true of the scene, and the shape is always named.
        assert!(p.matches(&s.attributes()), "{text} vs {s:?}");
        assert_eq!(p.shape, Some(s.shape), "{text}");
        assert!(text.starts_with("a ") || text.starts_with("an "), "{text}");
        for (k, named) in [p.colour.is_some(), p.size.is_some(), p.position.is_some(), p.background.is_some()]
            .into_iter()
            .enumerate()
        {
            seen[k] += named as usize;
        }
    }
    for (k, want) in [P_COLOUR, P_SIZE, P_POSITION, P_BACKGROUND].into_iter().enumerate() {
        let got = seen[k] as f64 / n as f64;
        assert!((got - want).abs() < 0.04, "attribute {k}: named in {got:.3} of captions, want {want}");
    }
}

#[test]
fn the_template_reads_naturally() {
    let s = Scene::new(Attributes {
        shape: Shape::Star,
        colour: Colour::Orange,
        background: Background::White,
        size: Size::Small,
        position: Position::TopLeft,
    });
    assert_eq!(full_caption(&s), "a small orange star in the top left on a white background");
    let s = Scene { size: Size::Large, position: Position::Center, ..s };
    assert_eq!(full_caption(&s), "a large orange star in the center on a white background");
}

#[test]
fn prompts_with_extra_words_and_other_spellings() {
    let p = parse_prompt("A photo of a sks Star, top-left, on a GREY backdrop");
    assert_eq!(p.shape, Some(Shape::Star));
    assert_eq!(p.position, Some(Position::TopLeft));
    assert_eq!(p.background, Some(Background::Gray));
    assert_eq!((p.colour, p.size), (None, None));
    assert_eq!(p.count(), 3);

    // A colour word right before "background" is not the object's colour.
    let p = parse_prompt("a big circle on a red background");
    assert_eq!((p.shape, p.colour, p.size), (Some(Shape::Circle), None, Some(Size::Large)));

    let p = parse_prompt("two crosses in the middle");
    assert_eq!((p.shape, p.position), (Some(Shape::Cross), Some(Position::Center)));
    assert_eq!(parse_prompt("nothing here"), PromptAttributes::default());
    assert!(parse_prompt("").matches(&Scene::sample(&mut StdRng::seed_from_u64(0)).attributes()));
}

#[test]
fn attribute_names_round_trip() {
    for s in Shape::ALL {
        assert_eq!(Shape::parse(s.name()), Some(s));
        assert_eq!(Shape::from_index(s.index()), Some(s));
    }
    for c in Colour::ALL {
        assert_eq!(Colour::parse(&c.name().to_uppercase()), Some(c));
        assert_eq!(Colour::from_index(c.index()), Some(c));
    }
    for b in Background::ALL {
        assert_eq!(Background::parse(b.name()), Some(b));
    }
    for s in Size::ALL {
        assert_eq!(Size::parse(s.name()), Some(s));
    }
    for p in Position::ALL {
        assert_eq!(Position::parse(p.name()), Some(p));
        assert_eq!(Position::parse(&p.name().replace(' ', "_")), Some(p));
        assert_eq!(Position::from_index(p.index()), Some(p));
    }
    assert_eq!(Position::from_index(5), None);
    let json = serde_json::to_string(&Position::BottomRight).unwrap();
    assert_eq!(json, "\"bottom right\"");
    assert_eq!(serde_json::from_str::<Position>(&json).unwrap(), Position::BottomRight);
}

#[test]
fn backgrounds_are_far_from_every_object_colour() {
    for b in Background::ALL {
        for c in Colour::ALL {
            let d: f32 = (0..3).map(|k| (b.rgb()[k] as f32 - c.rgb()[k] as f32).powi(2)).sum::<f32>().sqrt();
            assert!(d > 100.0, "{b} background vs {c}: distance {d}");
        }
    }
}
