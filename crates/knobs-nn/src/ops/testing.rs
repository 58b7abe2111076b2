//! What the ops' tests share: a tensor's values, and the largest difference relative to the
//! reference's largest magnitude.
use burn::tensor::Tensor;

pub(super) fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

pub(super) fn max_rel(a: impl AsRef<[f32]>, b: impl AsRef<[f32]>) -> f32 {
    let (a, b) = (a.as_ref(), b.as_ref());
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}
