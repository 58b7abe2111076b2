//! ResnetBlock2D as the VAE uses it: no time embedding, GroupNorm eps 1e-6, output scale 1.
use knobs_nn::{Conv2d, Device, GroupNorm, Init, Tensor, impl_module};

#[derive(Debug)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    /// A 1x1 projection of the skip path, present when the channel count changes.
    pub conv_shortcut: Option<Conv2d>,
}
impl_module!(ResnetBlock2D {
    "norm1" => norm1, "conv1" => conv1, "norm2" => norm2, "conv2" => conv2, "conv_shortcut" => conv_shortcut,
});

impl ResnetBlock2D {
    pub fn new(c_in: usize, c_out: usize, groups: usize, eps: f64, init: &mut Init, device: &Device) -> Self {
        ResnetBlock2D {
            norm1: GroupNorm::new(groups, c_in, eps, device),
            conv1: Conv2d::new(c_in, c_out, 3, 1, 1, true, init, device),
            norm2: GroupNorm::new(groups, c_out, eps, device),
            conv2: Conv2d::new(c_out, c_out, 3, 1, 1, true, init, device),
            conv_shortcut: (c_in != c_out).then(|| Conv2d::new(c_in, c_out, 1, 1, 0, true, init, device)),
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let h = self.conv1.forward(self.norm1.forward_silu(x.clone()));
        let h = self.conv2.forward(self.norm2.forward_silu(h));
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x),
            None => x,
        };
        skip + h
    }
}
