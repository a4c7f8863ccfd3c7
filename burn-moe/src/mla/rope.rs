//! The rotary embedding of MLA's decoupled key/query parts, with YaRN frequency
//! interpolation.
//!
//! Layout: the rotated vector is split in halves `[x₁, x₂]` and rotated as
//! `[x₁·cos − x₂·sin, x₂·cos + x₁·sin]` (the "rotate half" convention). DeepSeek's
//! released weights store the rotary dimensions interleaved; a loader permutes the
//! `qk_rope_head_dim` columns of `W_UQ` and `W_DKV` from `(0, 1, 2, 3, …)` pairs to halves.

use burn::config::Config;
use burn::tensor::{backend::Backend, Tensor, TensorData};

/// YaRN context extension of the rotary embedding (DeepSeek-V3: factor 40 over an
/// original 4,096 positions, `beta_fast` 32, `beta_slow` 1, `mscale` = `mscale_all_dim`
/// = 1).
#[derive(Config, Debug, PartialEq)]
pub struct YarnConfig {
    /// How many times the original context the model serves.
    #[config(default = 40.0)]
    pub factor: f64,
    /// The context the rotary frequencies were trained on.
    #[config(default = 4096)]
    pub original_max_position: usize,
    /// Rotations over the original context above which a frequency is kept as is.
    #[config(default = 32.0)]
    pub beta_fast: f64,
    /// Rotations below which a frequency is interpolated (divided by `factor`).
    #[config(default = 1.0)]
    pub beta_slow: f64,
    /// Attention-temperature coefficient of the rotary amplitudes.
    #[config(default = 1.0)]
    pub mscale: f64,
    /// Attention-temperature coefficient of the softmax scale.
    #[config(default = 1.0)]
    pub mscale_all_dim: f64,
}

/// `0.1 · m · ln(factor) + 1` for `factor > 1`, else 1 (YaRN's attention temperature).
pub(crate) fn yarn_mscale(factor: f64, m: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * m * factor.ln() + 1.0
    }
}

/// Inverse frequencies and amplitude of the rotation.
#[derive(Clone, Debug)]
pub struct RotaryTable {
    /// `[rope / 2]` inverse frequencies.
    inv_freq: Vec<f32>,
    /// Amplitude of cos and sin (YaRN's `mscale / mscale_all_dim` ratio; 1 otherwise).
    amplitude: f32,
    /// Positions covered.
    max_seq_len: usize,
}

impl RotaryTable {
    /// The table of a `dim`-wide rotary part (even) with base `theta`, YaRN-extended by
    /// `scaling`, for positions below `max_seq_len`.
    pub(crate) fn new(dim: usize, theta: f64, scaling: Option<&YarnConfig>, max_seq_len: usize) -> Self {
        let base = theta;
        let extra: Vec<f64> = (0..dim / 2).map(|i| 1.0 / base.powf((2 * i) as f64 / dim as f64)).collect();
        let (inv_freq, amplitude) = match scaling {
            None => (extra, 1.0),
            Some(y) => {
                let correction = |rotations: f64| (dim as f64 * (y.original_max_position as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()) / (2.0 * base.ln());
                let low = correction(y.beta_fast).floor().max(0.0);
                let mut high = correction(y.beta_slow).ceil().min(dim as f64 - 1.0);
                if high == low {
                    high += 0.001;
                }
                let freqs = extra
                    .iter()
                    .enumerate()
                    .map(|(i, &e)| {
                        // 1 where the frequency is kept (high frequencies), 0 where interpolated.
                        let keep = 1.0 - ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        e / y.factor * (1.0 - keep) + e * keep
                    })
                    .collect();
                (freqs, yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim))
            }
        };
        Self { inv_freq: inv_freq.into_iter().map(|f| f as f32).collect(), amplitude: amplitude as f32, max_seq_len }
    }

    /// Positions covered.
    pub fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }

    /// `(cos, sin)` of `positions [P]`, each `[P, rope / 2]`, times the amplitude.
    ///
    /// # Panics
    /// When a position is not below `max_seq_len`, naming it.
    pub fn angles<B: Backend>(&self, positions: &[usize], device: &B::Device) -> (Tensor<B, 2>, Tensor<B, 2>) {
        if let Some(&p) = positions.iter().find(|&&p| p >= self.max_seq_len) {
            panic!("MLA: position {p} is beyond the rotary table's max_seq_len {}", self.max_seq_len);
        }
        let half = self.inv_freq.len();
        let angles: Vec<f32> = positions.iter().flat_map(|&p| self.inv_freq.iter().map(move |f| p as f32 * f)).collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos() * self.amplitude).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin() * self.amplitude).collect();
        let shape = [positions.len(), half];
        (Tensor::from_data(TensorData::new(cos, shape), device), Tensor::from_data(TensorData::new(sin, shape), device))
    }

    /// Rotates `x [.., P, H, rope]` (`P` positions along dim 1 of a 4-d tensor `[B, P, H,
    /// rope]`) by `cos`/`sin` of shape `[B or 1, P, 1, rope / 2]`.
    pub fn apply<B: Backend>(x: Tensor<B, 4>, cos: Tensor<B, 4>, sin: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, p, h, d] = x.dims();
        let x1 = x.clone().slice([0..b, 0..p, 0..h, 0..d / 2]);
        let x2 = x.slice([0..b, 0..p, 0..h, d / 2..d]);
        Tensor::cat(vec![x1.clone() * cos.clone() - x2.clone() * sin.clone(), x2 * cos + x1 * sin], 3)
    }
}
