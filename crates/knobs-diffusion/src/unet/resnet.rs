//! diffusers `ResnetBlock2D` with the "default" time-embedding path (added, not scale-shift).
use knobs_nn::{Conv2d, Device, GroupNorm, Init, Linear, Tensor, impl_module};

#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Linear,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    /// A 1x1 conv when the channel count changes, so the residual can be added.
    pub conv_shortcut: Option<Conv2d>,
    pub output_scale_factor: f64,
}
impl_module!(ResnetBlock2D {
    "norm1" => norm1, "conv1" => conv1, "time_emb_proj" => time_emb_proj,
    "norm2" => norm2, "conv2" => conv2, "conv_shortcut" => conv_shortcut,
});

impl ResnetBlock2D {
    #[allow(clippy::too_many_arguments)]
    pub fn new(c_in: usize, c_out: usize, temb: usize, groups: usize, eps: f64, output_scale_factor: f64, init: &mut Init, device: &Device) -> Self {
        ResnetBlock2D {
            norm1: GroupNorm::new(groups, c_in, eps, device),
            conv1: Conv2d::new(c_in, c_out, 3, 1, 1, true, init, device),
            time_emb_proj: Linear::new(temb, c_out, true, init, device),
            norm2: GroupNorm::new(groups, c_out, eps, device),
            conv2: Conv2d::new(c_out, c_out, 3, 1, 1, true, init, device),
            conv_shortcut: (c_in != c_out).then(|| Conv2d::new(c_in, c_out, 1, 1, 0, true, init, device)),
            output_scale_factor,
        }
    }

    /// `temb_act` is SiLU(time embedding), `[B, temb]`: every resnet applies the same SiLU to
    /// the same embedding, so the UNet computes it once.
    pub fn forward(&self, x: Tensor<4>, temb_act: &Tensor<2>) -> Tensor<4> {
        let h = self.conv1.forward(self.norm1.forward_silu(x.clone()));
        let [b, c] = [h.dims()[0], h.dims()[1]];
        let t: Tensor<4> = self.time_emb_proj.forward(temb_act.clone()).reshape([b, c, 1, 1]);
        let h = self.conv2.forward(self.norm2.forward_silu(h + t));
        let skip = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x,
        };
        let out = skip + h;
        if self.output_scale_factor == 1.0 { out } else { out / self.output_scale_factor }
    }
}
