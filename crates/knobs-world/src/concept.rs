//! Personalization concepts: specific objects of a known class with a look the base world never
//! shows (base scenes are flat single-colour fills; concepts add a pattern and maybe a centre
//! mark). Four fixed concepts are held out for evaluation; `random_concept` draws a procedural
//! family for hypernetwork pretraining that never collides with them.
use std::f32::consts::{FRAC_PI_4, PI};

use image::RgbImage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::render::render_with;
use crate::scene::{Background, Colour, Position, Rgb, Scene, Shape, Size};

pub const WHITE: Rgb = [245, 245, 245];
pub const BLACK: Rgb = [20, 20, 20];
/// Radius of the centre mark in the shape's local frame.
pub const MARK_RADIUS: f32 = 0.26;
/// Instance images per concept when nobody asks for a number (DreamBooth uses 3-5).
pub const DEFAULT_INSTANCES: usize = 5;

/// A second colour laid over the object's colour, in the object's local frame (so it turns
/// and scales with the object). Periods are in local units: the shape's radius is 1.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Pattern {
    Stripes { colour2: Rgb, angle: f32, period: f32 },
    Checker { colour2: Rgb, period: f32 },
    Dots { colour2: Rgb, period: f32, radius: f32 },
    Rings { colour2: Rgb, period: f32 },
    Halves { colour2: Rgb, angle: f32 },
}

impl Pattern {
    pub const KINDS: [&'static str; 5] = ["stripes", "checker", "dots", "rings", "halves"];

    pub fn kind(&self) -> &'static str {
        match self {
            Pattern::Stripes { .. } => "stripes",
            Pattern::Checker { .. } => "checker",
            Pattern::Dots { .. } => "dots",
            Pattern::Rings { .. } => "rings",
            Pattern::Halves { .. } => "halves",
        }
    }

    pub fn colour2(&self) -> Rgb {
        match *self {
            Pattern::Stripes { colour2, .. }
            | Pattern::Checker { colour2, .. }
            | Pattern::Dots { colour2, .. }
            | Pattern::Rings { colour2, .. }
            | Pattern::Halves { colour2, .. } => colour2,
        }
    }

    /// Whether the second colour shows at local point (u, v).
    pub fn second(&self, u: f32, v: f32) -> bool {
        let frac = |t: f32| t - t.floor();
        match *self {
            Pattern::Stripes { angle, period, .. } => frac((u * angle.cos() + v * angle.sin()) / period) >= 0.5,
            Pattern::Checker { period, .. } => ((u / period).floor() + (v / period).floor()).rem_euclid(2.0) >= 1.0,
            Pattern::Dots { period, radius, .. } => {
                let (du, dv) = (u - (u / period).round() * period, v - (v / period).round() * period);
                du * du + dv * dv <= radius * radius
            }
            Pattern::Rings { period, .. } => frac((u * u + v * v).sqrt() / period) >= 0.5,
            Pattern::Halves { angle, .. } => u * angle.cos() + v * angle.sin() > 0.0,
        }
    }
}

/// Where and how a concept appears: a scene without the object's own attributes.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub background: Background,
    pub size: Size,
    pub position: Position,
    pub dx: f32,
    pub dy: f32,
    pub scale: f32,
    pub rotation: f32,
}

impl Placement {
    /// No jitter.
    pub fn new(background: Background, size: Size, position: Position) -> Placement {
        Placement { background, size, position, dx: 0.0, dy: 0.0, scale: 1.0, rotation: 0.0 }
    }

    /// The same jitter distribution as the base world.
    pub fn with_jitter(self, rng: &mut impl Rng) -> Placement {
        Placement::from(&self.scene(Shape::Circle, Colour::Red).with_jitter(rng))
    }

    /// A base-world scene of `shape` in `colour` at this placement.
    pub fn scene(&self, shape: Shape, colour: Colour) -> Scene {
        let Placement { background, size, position, dx, dy, scale, rotation } = *self;
        Scene { shape, colour, background, size, position, dx, dy, scale, rotation }
    }
}

impl From<&Scene> for Placement {
    fn from(s: &Scene) -> Placement {
        Placement {
            background: s.background,
            size: s.size,
            position: s.position,
            dx: s.dx,
            dy: s.dy,
            scale: s.scale,
            rotation: s.rotation,
        }
    }
}

/// One concept: an object of class `shape` in `colour` with `pattern` and an optional centre
/// dot, called `token` in prompts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConceptSpec {
    pub name: String,
    pub shape: Shape,
    pub colour: Colour,
    pub pattern: Pattern,
    pub mark: Option<Rgb>,
    pub token: String,
}

/// FNV-1a: a hash that is stable across Rust versions, for seeds derived from names.
pub(crate) fn stable_hash(s: &str) -> u64 {
    knobs_nn::hash::fnv1a(s.as_bytes())
}

impl ConceptSpec {
    /// "a {token} {shape}": the DreamBooth instance prompt.
    pub fn instance_prompt(&self) -> String {
        format!("a {} {}", self.token, self.shape.name())
    }

    /// "a {shape}": the class (prior-preservation) prompt.
    pub fn class_prompt(&self) -> String {
        format!("a {}", self.shape.name())
    }

    /// The object's colour at local point (u, v).
    pub fn fill(&self, u: f32, v: f32) -> Rgb {
        match self.mark {
            Some(m) if u * u + v * v <= MARK_RADIUS * MARK_RADIUS => m,
            _ if self.pattern.second(u, v) => self.pattern.colour2(),
            _ => self.colour.rgb(),
        }
    }

    /// The plain base-world scene of the same class, colour and placement.
    pub fn scene(&self, placement: &Placement) -> Scene {
        placement.scene(self.shape, self.colour)
    }

    /// The concept at `placement`, e.g. for references of "a sks star on a black background".
    pub fn render(&self, placement: &Placement, size: u32) -> RgbImage {
        render_with(&self.scene(placement), size, &|u, v| self.fill(u, v))
    }

    /// Deterministic, varied placements (seeded by the name). Positions and backgrounds cycle,
    /// so any two of the first twenty differ; two of three are large so the pattern shows at
    /// 32x32.
    pub fn instance_placements(&self, n: usize) -> Vec<Placement> {
        let h = stable_hash(&self.name);
        let mut rng = StdRng::seed_from_u64(h);
        (0..n)
            .map(|i| {
                let position = Position::ALL[(h as usize + i) % Position::ALL.len()];
                let background = Background::ALL[((h >> 8) as usize + i) % Background::ALL.len()];
                let size = if i % 3 == 2 { Size::Small } else { Size::Large };
                Placement::new(background, size, position).with_jitter(&mut rng)
            })
            .collect()
    }

    /// `n` instance images, each captioned with the instance prompt exactly (DreamBooth style).
    pub fn instance_images(&self, n: usize, size: u32) -> Vec<(RgbImage, String)> {
        self.instance_placements(n).iter().map(|p| (self.render(p, size), self.instance_prompt())).collect()
    }
}

fn concept(name: &str, shape: Shape, colour: Colour, pattern: Pattern, mark: Option<Rgb>, token: &str) -> ConceptSpec {
    ConceptSpec { name: name.into(), shape, colour, pattern, mark, token: token.into() }
}

/// The four concepts held out for evaluation. Tokens are rare words, as DreamBooth recommends.
pub fn held_out() -> Vec<ConceptSpec> {
    vec![
        concept(
            "striped-star",
            Shape::Star,
            Colour::Red,
            Pattern::Stripes { colour2: Colour::Yellow.rgb(), angle: FRAC_PI_4, period: 0.6 },
            Some(BLACK),
            "sks",
        ),
        concept("ringed-circle", Shape::Circle, Colour::Blue, Pattern::Rings { colour2: WHITE, period: 0.4 }, None, "zwx"),
        concept(
            "checkered-square",
            Shape::Square,
            Colour::Green,
            Pattern::Checker { colour2: Colour::Purple.rgb(), period: 0.4 },
            None,
            "qrv",
        ),
        concept(
            "spotted-heart",
            Shape::Heart,
            Colour::Pink,
            Pattern::Dots { colour2: Colour::Cyan.rgb(), period: 0.5, radius: 0.17 },
            Some([60, 20, 70]),
            "vpt",
        ),
    ]
}

/// A held-out concept by name.
pub fn by_name(name: &str) -> Option<ConceptSpec> {
    held_out().into_iter().find(|c| c.name == name)
}

/// A procedural concept for hypernetwork pretraining: random class, colours, pattern and mark,
/// token "c" + three digits. Never shares class + colour + pattern kind with a held-out concept,
/// so pretraining cannot have seen one.
pub fn random_concept(rng: &mut impl Rng) -> ConceptSpec {
    fn pick(rng: &mut impl Rng, not: &[Rgb]) -> Rgb {
        let palette: Vec<Rgb> = Colour::ALL.iter().map(|c| c.rgb()).chain([WHITE, BLACK]).collect();
        loop {
            let c = palette[rng.random_range(0..palette.len())];
            if !not.contains(&c) {
                return c;
            }
        }
    }
    let held = held_out();
    loop {
        let shape = Shape::ALL[rng.random_range(0..Shape::ALL.len())];
        let colour = Colour::ALL[rng.random_range(0..Colour::ALL.len())];
        let colour2 = pick(rng, &[colour.rgb()]);
        let pattern = match rng.random_range(0..Pattern::KINDS.len()) {
            0 => Pattern::Stripes { colour2, angle: rng.random_range(0.0..PI), period: rng.random_range(0.45..0.8) },
            1 => Pattern::Checker { colour2, period: rng.random_range(0.35..0.6) },
            2 => {
                let period = rng.random_range(0.45..0.7);
                Pattern::Dots { colour2, period, radius: rng.random_range(0.12..0.3 * period) }
            }
            3 => Pattern::Rings { colour2, period: rng.random_range(0.4..0.7) },
            _ => Pattern::Halves { colour2, angle: rng.random_range(0.0..2.0 * PI) },
        };
        let mark = rng.random_bool(0.5).then(|| pick(rng, &[colour.rgb(), colour2]));
        let token = format!("c{:03}", rng.random_range(0..1000));
        let clashes = held.iter().any(|h| {
            (h.shape == shape && h.colour == colour && h.pattern.kind() == pattern.kind()) || h.token == token
        });
        if !clashes {
            let name = format!("{}-{}-{}-{token}", colour.name(), pattern.kind(), shape.name());
            return ConceptSpec { name, shape, colour, pattern, mark, token };
        }
    }
}

#[cfg(test)]
mod hash_tests {
    /// Concept seeds come from this hash: a changed value changes every rendered data set.
    #[test]
    fn stable_hash_keeps_its_values() {
        assert_eq!(super::stable_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(super::stable_hash("red"), 0x89e9_be19_60f4_c21c);
    }
}
