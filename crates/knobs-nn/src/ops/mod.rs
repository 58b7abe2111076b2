//! Fused operations with their own kernels (forward and backward) on the CPU backend.
pub mod activation;
pub mod attention;
pub mod autocast;
// Reached only on the GPU backends (the CPU one has its fused kernel); tested on the CPU one.
#[cfg(any(test, feature = "cuda", feature = "wgpu", feature = "vulkan"))]
mod activation_portable;
#[cfg(any(test, feature = "cuda", feature = "wgpu", feature = "vulkan"))]
mod attention_blocked;
#[cfg(any(test, feature = "cuda", feature = "wgpu", feature = "vulkan"))]
mod group_norm_portable;
pub(crate) mod portable;
mod attention_kernel;
pub(crate) mod bf16_product;
mod attention_products;
mod attention_small;
pub mod conv2d;
pub mod conv2d_by_matmul;
mod conv_kernel;
pub(crate) mod fresh;
pub mod linear;
pub mod geglu;
mod half_pieces;
pub mod kernel_layout;
pub mod group_norm;
pub mod layer_norm;
mod lanes;
pub mod low_rank;
mod matrix;
pub(crate) mod record;
mod simd;
#[cfg(test)]
mod testing;
mod transposed;
pub mod upsample;
mod winograd;
mod words;
pub(crate) mod precision;
mod weight_transforms;

pub use attention::attention;
pub use weight_transforms::release_unused as release_unused_weight_transforms;
pub use geglu::geglu;
pub use linear::{linear, linear_added_as, linear_as};
pub use conv2d::{conv2d, conv2d_as, conv2d_frozen, conv2d_frozen_copy};
pub use group_norm::{group_norm, group_norm_silu};
pub use layer_norm::layer_norm;
pub use low_rank::low_rank;
pub use matrix::Products;
pub use activation::{gelu, silu};
pub use upsample::nearest2x;

/// Whether `t` lives on the CPU backend (flex), with or without autodiff.
pub(crate) fn on_cpu<const D: usize>(t: &burn::tensor::Tensor<D>) -> bool {
    cpu_storage(t).is_some()
}

/// `t`'s values as the CPU backend stores them, outside autodiff; `None` on another backend.
pub(crate) fn cpu_storage<const D: usize>(t: &burn::tensor::Tensor<D>) -> Option<burn::backend::flex::FlexTensor> {
    let t = if t.is_autodiff() { t.clone().inner() } else { t.clone() };
    t.try_into_primitive::<burn::backend::Flex>().ok()
}
