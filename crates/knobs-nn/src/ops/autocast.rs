//! bf16 products over f32 activations for the span of a call, the way `torch.autocast` scopes
//! its products: what a model computing in bf16 on the CPU takes when nothing will be
//! differentiated (generation). There, bf16 activations save no memory worth having (no
//! backward pass keeps them), while every layer widened its bf16 input to f32 for the kernels
//! and rounded its output back: those casts were 11% of an SD-1.5 denoising step (512 px,
//! CFG batch 2, 2 threads of an Intel Xeon with AMX). The products round their operands to
//! bf16 either way; only the activations between layers stay f32, so the results sit between
//! the f32 model's and the bf16 one's.
use std::cell::Cell;

use burn::tensor::{DType, Tensor};

use super::matrix::Products;

thread_local! {
    /// The arithmetic of f32 layers' and attention's products on this thread.
    static F32_PRODUCTS: Cell<Products> = const { Cell::new(Products::F32) };
}

/// The products that f32 layers and attention take on this thread ([`with_products`]).
pub fn products_for_f32() -> Products {
    F32_PRODUCTS.with(Cell::get)
}

/// `f` run with f32 layers' and attention's products on this thread in `products`' arithmetic
/// (set back afterwards, also when `f` panics).
pub fn with_products<R>(products: Products, f: impl FnOnce() -> R) -> R {
    struct Restore(Products);
    impl Drop for Restore {
        fn drop(&mut self) {
            F32_PRODUCTS.with(|p| p.set(self.0));
        }
    }
    let _restore = Restore(F32_PRODUCTS.with(|p| p.replace(products)));
    f()
}

/// What a model asked to compute in `dtype` on input `x` computes in: its activations' dtype
/// and the products to run it under ([`with_products`]). bf16 on the CPU backend without
/// autodiff, where the CPU has bf16 products, keeps f32 activations with bf16 products;
/// everything else computes as asked, its products following its activations.
pub fn plan<const D: usize>(dtype: DType, x: &Tensor<D>) -> (DType, Products) {
    if dtype == DType::BF16 && !x.is_autodiff() && super::on_cpu(x) && Products::for_dtype(DType::BF16) == Products::Bf16 {
        return (DType::F32, Products::Bf16);
    }
    (dtype, products_for_f32())
}

/// Whether a model computed in bf16 without autodiff ([`plan`]) gives the same results with
/// its frozen weight matrices and kernels stored in bf16 as in f32: on a CPU whose AMX tiles
/// run its products, where every use of them rounds them to bf16 as it packs them (the
/// Winograd kernel, taken without AMX, transforms a 3x3 kernel in f32 before rounding it).
pub fn bf16_weights_change_nothing() -> bool {
    Products::for_dtype(DType::BF16) == Products::Bf16 && super::bf16_product::amx_runs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scope_ends_with_the_call_even_when_it_panics() {
        assert_eq!(products_for_f32(), Products::F32);
        let inside = with_products(Products::Bf16, products_for_f32);
        assert_eq!(inside, Products::Bf16);
        assert_eq!(products_for_f32(), Products::F32);
        let caught = std::panic::catch_unwind(|| with_products(Products::Bf16, || panic!("inside")));
        assert!(caught.is_err());
        assert_eq!(products_for_f32(), Products::F32);
    }
}
