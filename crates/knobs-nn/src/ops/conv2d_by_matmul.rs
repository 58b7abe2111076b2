//! 2-D convolution as one matrix product over the input's shifted windows (im2col), for half
//! precision on backends other than the CPU one. burn's GPU convolutions may run a direct
//! kernel that sums in the tensor's own dtype: in f16 that kernel's error grows with the
//! number of terms, 1.9e-2 relative at 320 input channels and 3.5e-2 at 1280 (measured on
//! lavapipe), where PyTorch's fp16 convolutions sum in f32 (5e-4, the operands' rounding).
//! burn's matrix product sums half-precision operands in f32 on every backend, so this form
//! has PyTorch's accuracy, and its backward pass is made of products and copies too. The
//! cost is the windows' buffer: `kh * kw` copies of the input, in its half-precision dtype.
use std::sync::OnceLock;

use burn::tensor::ops::{ConvOptions, PadMode};
use burn::tensor::{DType, Device, Slice, Tensor};

use crate::{Error, Result};

/// The environment variable that chooses the form off the CPU (`auto`, `matmul`, `burn`).
pub const MODE_VAR: &str = "KNOBS_GPU_CONV";

/// Which convolutions off the CPU take this form. A variable rather than a flag: the choice
/// is for measuring on a GPU (burn's alternatives to its direct kernel run on matrix units,
/// which a GPU may lack for f32) and changes no result beyond rounding.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// Half precision only: the accuracy fix. The default.
    Auto,
    /// Every dtype.
    Matmul,
    /// None: burn's own kernels throughout.
    Burn,
}

impl Mode {
    fn parse(value: Option<&str>) -> Result<Mode> {
        match value {
            None | Some("auto") => Ok(Mode::Auto),
            Some("matmul") => Ok(Mode::Matmul),
            Some("burn") => Ok(Mode::Burn),
            Some(other) => Err(Error::Invalid(format!("{MODE_VAR}={other:?}: expected auto, matmul or burn"))),
        }
    }

    /// The mode `KNOBS_GPU_CONV` names; read once, an error when it names none.
    pub fn from_env() -> Result<Mode> {
        static MODE: OnceLock<std::result::Result<Mode, String>> = OnceLock::new();
        let read = || Mode::parse(std::env::var(MODE_VAR).ok().as_deref()).map_err(|e| e.to_string());
        MODE.get_or_init(read).clone().map_err(Error::Invalid)
    }
}

/// Whether a convolution should take this form: ungrouped, on a backend other than the CPU
/// one (whose half-precision convolution already sums in f32), in half precision or as
/// `KNOBS_GPU_CONV` says. `device::select` has checked the variable before any tensor work.
pub fn wanted(x: &Tensor<4>, options: &ConvOptions<2>) -> bool {
    if options.groups != 1 || x.device().inner() == Device::flex() {
        return false;
    }
    match Mode::from_env().unwrap_or(Mode::Auto) {
        Mode::Auto => matches!(x.dtype(), DType::F16 | DType::BF16),
        Mode::Matmul => true,
        Mode::Burn => false,
    }
}

/// `x` `[B, ci, h, w]` convolved with `weight` `[co, ci, kh, kw]`, plus `bias` `[co]`, as
/// [`burn::tensor::module::conv2d`] with `options.groups == 1`.
pub fn conv2d(x: Tensor<4>, weight: Tensor<4>, bias: Option<Tensor<1>>, options: &ConvOptions<2>) -> Tensor<4> {
    assert_eq!(options.groups, 1, "conv2d_by_matmul takes ungrouped convolutions");
    let [batch, c_in, h, w] = x.dims();
    let [c_out, _, kh, kw] = weight.dims();
    let [(top, bottom), (left, right)] = options.padding;
    let ([sh, sw], [dh, dw]) = (options.stride, options.dilation);
    let (h, w) = (h + top + bottom, w + left + right);
    if h < dh * (kh - 1) + 1 || w < dw * (kw - 1) + 1 {
        // No output position: burn's op reports that as it does on every backend.
        return burn::tensor::module::conv2d(x, weight, bias, options.clone());
    }
    let x = if top + bottom + left + right > 0 { x.pad([(top, bottom), (left, right)], PadMode::Constant(0.0)) } else { x };
    let out_h = (h - dh * (kh - 1) - 1) / sh + 1;
    let out_w = (w - dw * (kw - 1) - 1) / sw + 1;
    let positions = out_h * out_w;
    // Rows ordered (window row, window column, input channel), as the weight's columns below.
    let columns = if kh * kw == 1 && sh == 1 && sw == 1 {
        x.reshape([batch, c_in, positions])
    } else {
        let window = |i: usize, j: usize| {
            let (r, c) = ((i * dh) as isize, (j * dw) as isize);
            let rows = Slice::with_step(r, Some(r + ((out_h - 1) * sh + 1) as isize), sh as isize);
            let cols = Slice::with_step(c, Some(c + ((out_w - 1) * sw + 1) as isize), sw as isize);
            x.clone().slice([Slice::from(..), Slice::from(..), rows, cols]).reshape([batch, c_in, positions])
        };
        Tensor::cat((0..kh).flat_map(|i| (0..kw).map(move |j| (i, j))).map(|(i, j)| window(i, j)).collect(), 1)
    };
    let weight = weight.permute([0, 2, 3, 1]).reshape([1, c_out, kh * kw * c_in]);
    let out = weight.matmul(columns);
    let out = match bias {
        Some(b) => out + b.reshape([1, c_out, 1]),
        None => out,
    };
    out.reshape([batch, c_out, out_h, out_w])
}

#[cfg(test)]
mod tests {
    use super::*;
    use super::super::testing::{max_rel, values};
    use burn::tensor::{Distribution, module};

    fn random<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
    }

    /// (input `[B, ci, h, w]`, weight `[co, ci, kh, kw]`, stride, padding pairs, dilation).
    type Case = ([usize; 4], [usize; 4], [usize; 2], [(usize, usize); 2], [usize; 2]);
    const CASES: [Case; 6] = [
        ([2, 3, 9, 7], [5, 3, 3, 3], [1, 1], [(1, 1), (1, 1)], [1, 1]),
        ([1, 4, 8, 8], [6, 4, 3, 3], [2, 2], [(1, 1), (1, 1)], [1, 1]),
        ([2, 4, 6, 5], [3, 4, 1, 1], [1, 1], [(0, 0), (0, 0)], [1, 1]),
        ([1, 2, 9, 9], [4, 2, 3, 2], [2, 1], [(0, 1), (2, 0)], [1, 1]),
        ([1, 3, 10, 10], [2, 3, 3, 3], [1, 1], [(2, 2), (2, 2)], [2, 2]),
        ([1, 2, 7, 7], [3, 2, 1, 1], [2, 2], [(0, 0), (0, 0)], [1, 1]),
    ];

    fn options((_, _, stride, padding, dilation): &Case) -> ConvOptions<2> {
        ConvOptions { stride: *stride, padding: *padding, dilation: *dilation, groups: 1 }
    }

    #[test]
    fn matches_burns_convolution() {
        let device = crate::cpu();
        for case in CASES {
            let (x, w, b) = (random(case.0, &device), random(case.1, &device), random([case.1[0]], &device));
            let want = module::conv2d(x.clone(), w.clone(), Some(b.clone()), options(&case));
            let got = conv2d(x, w, Some(b), &options(&case));
            assert_eq!(got.dims(), want.dims(), "{case:?}");
            let err = max_rel(values(got), values(want));
            assert!(err < 1e-5, "{case:?}: {err:e}");
        }
    }

    #[test]
    fn gradients_match_burns_convolution() {
        let device = crate::cpu_autodiff();
        for case in CASES {
            let (x, w, b) = (random(case.0, &device), random(case.1, &device), random([case.1[0]], &device));
            let run = |by_matmul: bool| {
                let (x, w, b) = (x.clone().require_grad(), w.clone().require_grad(), b.clone().require_grad());
                let y = if by_matmul { conv2d(x.clone(), w.clone(), Some(b.clone()), &options(&case)) } else { module::conv2d(x.clone(), w.clone(), Some(b.clone()), options(&case)) };
                // A weighting that differs per output, so that every gradient is checked.
                let g = (y.clone() * y.clone().sin()).sum().backward();
                [values(x.grad(&g).unwrap()), values(w.grad(&g).unwrap()), values(b.grad(&g).unwrap())]
            };
            let (got, want) = (run(true), run(false));
            for (name, (g, w)) in ["input", "weight", "bias"].iter().zip(got.iter().zip(&want)) {
                assert!(w.iter().any(|v| *v != 0.0), "{case:?}: {name} gradient all zero");
                let err = max_rel(g, w);
                assert!(err < 1e-5, "{case:?}: {name} gradient {err:e}");
            }
        }
    }

    #[test]
    fn the_mode_variable_is_read_or_refused_by_name() {
        assert_eq!(Mode::parse(None).unwrap(), Mode::Auto);
        assert_eq!(Mode::parse(Some("matmul")).unwrap(), Mode::Matmul);
        assert_eq!(Mode::parse(Some("burn")).unwrap(), Mode::Burn);
        let err = Mode::parse(Some("fast")).unwrap_err().to_string();
        assert!(err.contains("KNOBS_GPU_CONV") && err.contains("\"fast\""), "{err}");
    }

    #[test]
    fn wanted_only_for_half_precision_off_the_cpu() {
        let x = random::<4>([1, 2, 4, 4], &crate::cpu());
        let plain = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
        assert!(!wanted(&x, &plain));
        // The CPU backend's half-precision convolution sums in f32: it keeps burn's op.
        assert!(!wanted(&x.clone().cast(DType::F16), &plain));
        assert!(!wanted(&x.cast(DType::F16), &ConvOptions::new([1, 1], [1, 1], [1, 1], 2)));
    }
}
