//! Adapter files in the formats the ecosystem uses.
pub mod diffusers;
pub mod kohya;
pub mod lora_files;
pub mod lycoris;
pub mod peft;
