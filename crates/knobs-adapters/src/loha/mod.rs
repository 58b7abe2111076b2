//! LoHa (FedPara / LyCORIS): `dW = (w1a w1b) * (w2a w2b) * alpha / r`, a Hadamard product of
//! two low-rank products, so rank r reaches rank r^2; on k x k convolutions optionally with
//! Tucker cores (`use_effective_conv2d`). As PEFT's `LoHaModel`.
mod config;
mod layer;

pub use config::LohaConfig;
pub use layer::Hada;
