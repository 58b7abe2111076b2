//! One file per layer. Each is a plain struct with a `forward`, named like its PyTorch twin.

/// `merge_adapter` / `unmerge_adapter` of a layer with a `weight` of rank `$d`, an optional
/// `bias` and a slot of adapters whose merge maps `(w, b, weight)` to new `(w, b)`.
macro_rules! weight_and_bias_merging {
    ($layer:ty, $d:literal) => {
        impl $layer {
            /// Folds adapter `name` into the base weights; false when there is nothing to do,
            /// an error (and the layer unchanged) when the adapter cannot be merged.
            pub fn merge_adapter(&mut self, name: &str) -> $crate::Result<bool> {
                let (w, b) = ($crate::param::f32_value(&self.weight).inner(), self.bias.clone().map(|b| b.inner()));
                let mut unmerged = (w.clone(), b.clone());
                for (a, weight) in self.adapters.merged_rev() {
                    unmerged = a.unmerge(unmerged.0, unmerged.1, weight);
                }
                let Some((w, b)) = self.adapters.merge(name, |a, weight| a.merge(w, b, &unmerged.0, weight))? else { return Ok(false) };
                self.set_weights(w, b);
                Ok(true)
            }

            /// Takes merged adapter `name` back out of the base weights; false when it is not
            /// merged.
            pub fn unmerge_adapter(&mut self, name: &str) -> bool {
                let (w, b) = ($crate::param::f32_value(&self.weight).inner(), self.bias.clone().map(|b| b.inner()));
                let Some((w, b)) = self.adapters.unmerge(name, |a, weight| a.unmerge(w, b, weight)) else { return false };
                self.set_weights(w, b);
                true
            }

            fn set_weights(&mut self, w: burn::tensor::Tensor<$d>, b: Option<burn::tensor::Tensor<1>>) {
                self.weight = $crate::param::like_stored(&self.weight, w);
                if let (Some(old), Some(new)) = (&self.bias, b) {
                    self.bias = Some($crate::param::like(old, new));
                }
            }
        }
    };
}

mod conv2d;
mod embedding;
mod linear;
mod norm;

pub use conv2d::Conv2d;
pub use embedding::Embedding;
pub use linear::Linear;
pub use norm::{GroupNorm, LayerNorm};
