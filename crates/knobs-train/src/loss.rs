//! The diffusion training loss shared by pretraining and fine-tuning.
use knobs_diffusion::schedulers::PredictionType;
use knobs_nn::Tensor;

/// Mean squared error of each sample: `[B]`.
pub fn per_sample_mse(pred: Tensor<4>, target: Tensor<4>) -> Tensor<1> {
    let b = pred.dims()[0];
    (pred - target).powi_scalar(2).reshape([b as i64, -1]).mean_dim(1).reshape([b])
}

/// Min-SNR-gamma weights (Hang et al. 2023, as diffusers' scripts compute them):
/// `min(snr, gamma) / snr` for epsilon targets, `/ (snr + 1)` for v-prediction.
pub fn min_snr_weights(snr: &[f32], gamma: f64, prediction: PredictionType) -> Vec<f32> {
    snr.iter()
        .map(|&s| {
            let s = s as f64;
            let w = s.min(gamma) / if prediction == PredictionType::VPrediction { s + 1.0 } else { s };
            w as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_snr_caps_high_snr_steps_only() {
        let w = min_snr_weights(&[0.5, 5.0, 50.0], 5.0, PredictionType::Epsilon);
        assert_eq!(w, vec![1.0, 1.0, 0.1]);
        let v = min_snr_weights(&[1.0, 50.0], 5.0, PredictionType::VPrediction);
        assert_eq!(v, vec![0.5, 5.0 / 51.0]);
    }
}
