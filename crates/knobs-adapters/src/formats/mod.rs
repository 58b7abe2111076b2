//! Adapter files in the formats the ecosystem uses.
pub mod peft;
