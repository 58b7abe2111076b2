//! The toy classifier from knobs-nn: a model that is not a UNet.
#![allow(unused_imports)]
pub use knobs_nn::toy::*;
