//! Captions for scenes, and the reverse: which attributes a prompt asks for.
//!
//! Captions leave attributes out at random so the model learns each word on its own and what
//! an unspecified attribute looks like (the world's marginal), as with real alt-text.
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::scene::{Attributes, Background, Colour, Position, Scene, Shape, Size};

/// How often each optional attribute appears in a sampled caption.
pub const P_COLOUR: f64 = 0.85;
pub const P_SIZE: f64 = 0.4;
pub const P_POSITION: f64 = 0.4;
pub const P_BACKGROUND: f64 = 0.6;

/// "a [size] [colour] <shape> [in the <pos>] [on a <bg> background]", with "an" before a vowel.
fn compose(
    shape: Shape,
    colour: Option<Colour>,
    size: Option<Size>,
    position: Option<Position>,
    background: Option<Background>,
) -> String {
    let mut noun = Vec::with_capacity(3);
    noun.extend(size.map(Size::name));
    noun.extend(colour.map(Colour::name));
    noun.push(shape.name());
    let noun = noun.join(" ");
    let article = if noun.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
    let mut text = format!("{article} {noun}");
    if let Some(p) = position {
        text += &format!(" in the {}", p.name());
    }
    if let Some(b) = background {
        text += &format!(" on a {} background", b.name());
    }
    text
}

/// A caption with random omissions (the shape is always named).
pub fn caption(scene: &Scene, rng: &mut impl Rng) -> String {
    // Draw every coin in a fixed order so the rng stream does not depend on the outcomes.
    let colour = rng.random_bool(P_COLOUR).then_some(scene.colour);
    let size = rng.random_bool(P_SIZE).then_some(scene.size);
    let position = rng.random_bool(P_POSITION).then_some(scene.position);
    let background = rng.random_bool(P_BACKGROUND).then_some(scene.background);
    compose(scene.shape, colour, size, position, background)
}

/// A caption naming every attribute.
pub fn full_caption(scene: &Scene) -> String {
    compose(scene.shape, Some(scene.colour), Some(scene.size), Some(scene.position), Some(scene.background))
}

/// The attributes a prompt asks for; `None` where it leaves one open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PromptAttributes {
    pub shape: Option<Shape>,
    pub colour: Option<Colour>,
    pub background: Option<Background>,
    pub size: Option<Size>,
    pub position: Option<Position>,
}

impl From<Attributes> for PromptAttributes {
    fn from(a: Attributes) -> Self {
        PromptAttributes {
            shape: Some(a.shape),
            colour: Some(a.colour),
            background: Some(a.background),
            size: Some(a.size),
            position: Some(a.position),
        }
    }
}

impl PromptAttributes {
    /// How many attributes the prompt names.
    pub fn count(&self) -> usize {
        [self.shape.is_some(), self.colour.is_some(), self.background.is_some(), self.size.is_some(), self.position.is_some()]
            .iter()
            .filter(|b| **b)
            .count()
    }

    /// Whether `a` has every attribute the prompt names (unnamed ones match anything).
    pub fn matches(&self, a: &Attributes) -> bool {
        fn ok<T: PartialEq>(want: Option<T>, got: T) -> bool {
            want.is_none_or(|w| w == got)
        }
        ok(self.shape, a.shape)
            && ok(self.colour, a.colour)
            && ok(self.background, a.background)
            && ok(self.size, a.size)
            && ok(self.position, a.position)
    }

    /// All five attributes, if the prompt names them all.
    pub fn complete(&self) -> Option<Attributes> {
        Some(Attributes {
            shape: self.shape?,
            colour: self.colour?,
            background: self.background?,
            size: self.size?,
            position: self.position?,
        })
    }
}

/// Word matching, tolerant of anything else in the prompt ("a sks star", "photo of ...").
/// The first mention of each attribute wins. A background colour is any background word,
/// or any word right before "background"; an object colour word there is not the object's.
pub fn parse_prompt(text: &str) -> PromptAttributes {
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).collect();
    let mut p = PromptAttributes::default();
    let mut i = 0;
    while i < words.len() {
        let w = words[i];
        let next = words.get(i + 1).copied();
        if let Some(pos) = next.and_then(|n| Position::parse(&format!("{w} {n}"))) {
            p.position = p.position.or(Some(pos));
            i += 2;
            continue;
        }
        let before_background = matches!(next, Some("background" | "backdrop" | "backgrounds"));
        if let Some(b) = Background::parse(w) {
            p.background = p.background.or(Some(b));
        } else if before_background {
            // e.g. "on a red background": not the object's colour, and not a world background.
        } else if let Some(c) = Colour::parse(w) {
            p.colour = p.colour.or(Some(c));
        } else if let Some(s) = Shape::parse(w)
            .or_else(|| w.strip_suffix('s').and_then(Shape::parse))
            .or_else(|| w.strip_suffix("es").and_then(Shape::parse))
        {
            p.shape = p.shape.or(Some(s));
        } else if let Some(s) = Size::parse(w) {
            p.size = p.size.or(Some(s));
        } else if let Some(pos) = Position::parse(w) {
            p.position = p.position.or(Some(pos));
        }
        i += 1;
    }
    p
}
