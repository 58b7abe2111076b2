//! LoKr (LyCORIS): `dW = kron(w1, w2) * alpha / r`, each side optionally a low-rank product,
//! so a small adapter spans the whole weight; as PEFT's `LoKrModel` (`decompose_both`,
//! `decompose_factor`, Tucker core for k x k convolutions).
mod config;
mod layer;

pub use config::LokrConfig;
pub use layer::{Kron, KronInit, KronPlan, factorization};
