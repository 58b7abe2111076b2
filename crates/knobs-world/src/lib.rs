//! The built-in synthetic world: flat-coloured shapes on flat backgrounds, small enough to
//! train and judge a diffusion model on a CPU, with every attribute known exactly.
//!
//! `scene` says what is in an image, `render` draws it, `caption` says it in words (and reads
//! words back), `concept` adds the patterned objects held out for personalization, `dataset`
//! writes it all to disk with per-index determinism.
pub mod caption;
pub mod concept;
pub mod dataset;
pub mod images;
pub mod judge;
pub mod render;
pub mod scene;

pub use caption::{PromptAttributes, caption, full_caption, parse_prompt};
pub use concept::{ConceptSpec, Pattern, Placement};
pub use dataset::{sample, write_concepts, write_world};
pub use render::{render, render_with};
pub use scene::{Attributes, Background, Colour, Position, Rgb, Scene, Shape, Size};
