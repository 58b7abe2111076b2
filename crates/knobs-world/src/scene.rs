//! What an image of the world holds: one shape with a flat colour on a flat background, at one
//! of two sizes and five positions, plus a little jitter so no two renderings are identical.
use rand::Rng;
use serde::{Deserialize, Serialize};

/// An sRGB colour.
pub type Rgb = [u8; 3];

/// Lower-case, with `_` and `-` read as spaces and runs of spaces collapsed, so "Top_Left",
/// "top-left" and "top  left" all parse alike.
fn normalise(s: &str) -> String {
    s.to_lowercase().replace(['_', '-'], " ").split_whitespace().collect::<Vec<_>>().join(" ")
}

/// An attribute enum with its caption word(s) and any extra spellings `parse` accepts.
macro_rules! attribute {
    ($(#[$m:meta])* $name:ident { $($v:ident => $word:literal $(| $alias:literal)*),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($v),+ }

        impl $name {
            pub const ALL: [Self; [$($word),+].len()] = [$(Self::$v),+];

            /// The word(s) a caption uses.
            pub fn name(self) -> &'static str {
                match self { $(Self::$v => $word),+ }
            }

            pub fn index(self) -> usize {
                self as usize
            }

            pub fn from_index(i: usize) -> Option<Self> {
                Self::ALL.get(i).copied()
            }

            /// Case-insensitive; `_`/`-` count as spaces; a few synonyms are accepted.
            pub fn parse(s: &str) -> Option<Self> {
                match normalise(s).as_str() {
                    $($word $(| $alias)* => Some(Self::$v),)+
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).ok_or_else(|| {
                    serde::de::Error::custom(format!(concat!("unknown ", stringify!($name), " `{}`"), s))
                })
            }
        }
    };
}

attribute!(
    /// The eight object classes.
    Shape { Circle => "circle", Square => "square", Triangle => "triangle", Star => "star", Heart => "heart",
            Cross => "cross" | "plus", Diamond => "diamond", Hexagon => "hexagon" }
);
attribute!(
    /// The eight object colours, spread around the hue circle.
    Colour { Red => "red", Orange => "orange", Yellow => "yellow", Green => "green", Cyan => "cyan",
             Blue => "blue", Purple => "purple" | "violet", Pink => "pink" }
);
attribute!(
    /// Backgrounds are achromatic or a dark earth tone, so none is near any object colour.
    Background { White => "white", Black => "black", Gray => "gray" | "grey", Brown => "brown" }
);
attribute!(Size { Small => "small" | "little" | "tiny", Large => "large" | "big" });
attribute!(Position { Center => "center" | "centre" | "middle", TopLeft => "top left" | "upper left",
                      TopRight => "top right" | "upper right", BottomLeft => "bottom left" | "lower left",
                      BottomRight => "bottom right" | "lower right" });

impl Colour {
    pub fn rgb(self) -> Rgb {
        match self {
            Colour::Red => [220, 30, 30],
            Colour::Orange => [255, 140, 0],
            Colour::Yellow => [250, 220, 20],
            Colour::Green => [30, 170, 50],
            Colour::Cyan => [0, 200, 220],
            Colour::Blue => [30, 70, 230],
            Colour::Purple => [140, 40, 200],
            Colour::Pink => [255, 120, 190],
        }
    }
}

impl Background {
    pub fn rgb(self) -> Rgb {
        match self {
            Background::White => [245, 245, 245],
            Background::Black => [15, 15, 15],
            Background::Gray => [128, 128, 128],
            Background::Brown => [110, 70, 35],
        }
    }
}

impl Size {
    /// Radius of the shape's unit circle as a fraction of the canvas side. Far enough apart
    /// that the jittered ranges (x0.9..x1.1) never meet.
    pub fn radius(self) -> f32 {
        match self {
            Size::Small => 0.17,
            Size::Large => 0.32,
        }
    }
}

impl Position {
    /// Centre as a fraction of the canvas (x right, y down). Large shapes sit closer to the
    /// middle so they stay mostly on the canvas; both stay clearly off-centre.
    pub fn centre(self, size: Size) -> (f32, f32) {
        let (lo, hi) = match size {
            Size::Small => (0.27, 0.73),
            Size::Large => (0.35, 0.65),
        };
        match self {
            Position::Center => (0.5, 0.5),
            Position::TopLeft => (lo, lo),
            Position::TopRight => (hi, lo),
            Position::BottomLeft => (lo, hi),
            Position::BottomRight => (hi, hi),
        }
    }
}

/// The attributes a judge predicts: everything about a scene except the jitter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attributes {
    pub shape: Shape,
    pub colour: Colour,
    pub background: Background,
    pub size: Size,
    pub position: Position,
}

/// One image's content. Jitter: `dx`, `dy` offset the centre (fractions of the canvas),
/// `scale` multiplies the size's radius, `rotation` turns the shape (radians, clockwise on
/// screen).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub shape: Shape,
    pub colour: Colour,
    pub background: Background,
    pub size: Size,
    pub position: Position,
    pub dx: f32,
    pub dy: f32,
    pub scale: f32,
    pub rotation: f32,
}

/// Jitter bounds: small enough that size and position stay unambiguous at 32x32.
pub const MAX_OFFSET: f32 = 0.04;
pub const SCALE_RANGE: (f32, f32) = (0.9, 1.1);
pub const MAX_ROTATION: f32 = 0.3;

impl Scene {
    /// A scene with no jitter.
    pub fn new(attributes: Attributes) -> Scene {
        let Attributes { shape, colour, background, size, position } = attributes;
        Scene { shape, colour, background, size, position, dx: 0.0, dy: 0.0, scale: 1.0, rotation: 0.0 }
    }

    /// Uniform over the attributes, uniform jitter within the bounds above.
    pub fn sample(rng: &mut impl Rng) -> Scene {
        let attributes = Attributes {
            shape: Shape::ALL[rng.random_range(0..Shape::ALL.len())],
            colour: Colour::ALL[rng.random_range(0..Colour::ALL.len())],
            background: Background::ALL[rng.random_range(0..Background::ALL.len())],
            size: Size::ALL[rng.random_range(0..Size::ALL.len())],
            position: Position::ALL[rng.random_range(0..Position::ALL.len())],
        };
        Scene::new(attributes).with_jitter(rng)
    }

    /// The same attributes with fresh jitter.
    pub fn with_jitter(self, rng: &mut impl Rng) -> Scene {
        Scene {
            dx: rng.random_range(-MAX_OFFSET..=MAX_OFFSET),
            dy: rng.random_range(-MAX_OFFSET..=MAX_OFFSET),
            scale: rng.random_range(SCALE_RANGE.0..=SCALE_RANGE.1),
            rotation: rng.random_range(-MAX_ROTATION..=MAX_ROTATION),
            ..self
        }
    }

    pub fn attributes(&self) -> Attributes {
        Attributes {
            shape: self.shape,
            colour: self.colour,
            background: self.background,
            size: self.size,
            position: self.position,
        }
    }

    /// Centre in canvas fractions, jitter included.
    pub fn centre(&self) -> (f32, f32) {
        let (x, y) = self.position.centre(self.size);
        (x + self.dx, y + self.dy)
    }

    /// Radius of the shape's unit circle in canvas fractions, jitter included.
    pub fn radius(&self) -> f32 {
        self.size.radius() * self.scale
    }
}
