//! AdamW with its moments stored in a chosen precision: DeepSeek-V3 keeps master weights
//! and gradients in f32 and AdamW's two moments in BF16.

use burn::config::Config;
use burn::module::AutodiffModule;
use burn::optim::{adaptor::OptimizerAdaptor, LearningRate, SimpleOptimizer};
use burn::record::Record;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, FloatDType, Tensor};

/// The precision AdamW's moments are stored in between steps.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum MomentDType {
    /// f32, as Burn's `AdamW`.
    F32,
    /// BF16: half the optimizer's memory (DeepSeek-V3's recipe); the update itself is
    /// computed in f32.
    Bf16,
}

/// [`AdamW`] configuration. Defaults are DeepSeek-V3's (β₁ 0.9, β₂ 0.95, weight decay
/// 0.1) with BF16 moments.
#[derive(Config, Debug)]
pub struct AdamWConfig {
    /// First-moment decay.
    #[config(default = 0.9)]
    pub beta_1: f32,
    /// Second-moment decay.
    #[config(default = 0.95)]
    pub beta_2: f32,
    /// Added to the root of the second moment.
    #[config(default = 1e-8)]
    pub epsilon: f32,
    /// Decoupled weight decay, times the learning rate per step.
    #[config(default = 0.1)]
    pub weight_decay: f32,
    /// How the moments are stored.
    #[config(default = "MomentDType::Bf16")]
    pub moments: MomentDType,
}

impl AdamWConfig {
    /// The optimizer over a module's parameters (Burn's optimizer adaptor: records,
    /// devices and missing gradients handled as for Burn's optimizers).
    ///
    /// # Panics
    /// At the first step, if the backend cannot store [`MomentDType::Bf16`] moments (see
    /// [`AdamWConfig::check`]).
    pub fn init<B: AutodiffBackend, M: AutodiffModule<B>>(&self) -> OptimizerAdaptor<AdamW, M, B> {
        OptimizerAdaptor::from(AdamW::from_config(self))
    }

    /// Whether `B` stores the moments' dtype on `device`.
    ///
    /// # Errors
    /// The dtype and the backend, e.g. NdArray has no BF16 (Flex, wgpu and CUDA do).
    pub fn check<B: Backend>(&self, device: &B::Device) -> Result<(), crate::DpError> {
        let dtype = dtype(self.moments);
        if B::supports_dtype(device, dtype) {
            Ok(())
        } else {
            Err(crate::DpError::Config { detail: format!("AdamW moments in {:?}: backend {} does not store {dtype:?} on {device:?}", self.moments, B::name(device)) })
        }
    }
}

fn dtype(m: MomentDType) -> DType {
    match m {
        MomentDType::F32 => DType::F32,
        MomentDType::Bf16 => DType::BF16,
    }
}

fn float_dtype(m: MomentDType) -> FloatDType {
    match m {
        MomentDType::F32 => FloatDType::F32,
        MomentDType::Bf16 => FloatDType::BF16,
    }
}

/// AdamW (decoupled weight decay) whose moments are kept in [`AdamWConfig::moments`];
/// the same update as Burn's `AdamW` with `epsilon` outside the root, computed in f32.
#[derive(Clone, Debug)]
pub struct AdamW {
    config: AdamWConfig,
}

impl AdamW {
    /// The per-tensor optimizer of `config` (for use without Burn's adaptor, e.g. on a
    /// flat shard).
    pub fn from_config(config: &AdamWConfig) -> Self {
        AdamW { config: config.clone() }
    }
}

/// One parameter's state: the two moments in the stored precision and the step count.
#[derive(Record, Clone)]
pub struct AdamWState<B: Backend, const D: usize> {
    /// First moment (mean of the gradients).
    pub moment_1: Tensor<B, D>,
    /// Second moment (mean of their squares).
    pub moment_2: Tensor<B, D>,
    /// Steps taken.
    pub time: usize,
}

impl<B: Backend> SimpleOptimizer<B> for AdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(&self, lr: LearningRate, tensor: Tensor<B, D>, grad: Tensor<B, D>, state: Option<Self::State<D>>) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let c = &self.config;
        let stored = dtype(c.moments);
        if stored != DType::F32 {
            let device = tensor.device();
            assert!(
                B::supports_dtype(&device, stored),
                "burn-dp AdamW: backend {} does not store {stored:?} moments on {device:?}; use MomentDType::F32 or a backend with BF16 (Flex, wgpu, CUDA)",
                B::name(&device)
            );
        }
        let (m, v, time) = match state {
            Some(s) => (
                s.moment_1.cast(FloatDType::F32).mul_scalar(c.beta_1) + grad.clone().mul_scalar(1.0 - c.beta_1),
                s.moment_2.cast(FloatDType::F32).mul_scalar(c.beta_2) + grad.square().mul_scalar(1.0 - c.beta_2),
                s.time + 1,
            ),
            None => (grad.clone().mul_scalar(1.0 - c.beta_1), grad.square().mul_scalar(1.0 - c.beta_2), 1),
        };
        let t = time as i32;
        let m_hat = m.clone().div_scalar(1.0 - c.beta_1.powi(t));
        let v_hat = v.clone().div_scalar(1.0 - c.beta_2.powi(t));
        let delta = m_hat / (v_hat.sqrt() + c.epsilon);
        let decayed = tensor.mul_scalar(1.0 - lr * c.weight_decay as f64);
        let updated = decayed - delta.mul_scalar(lr);
        let to = float_dtype(c.moments);
        let state = AdamWState { moment_1: m.cast(to), moment_2: v.cast(to), time };
        (updated, Some(state))
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        state.moment_1 = state.moment_1.to_device(device);
        state.moment_2 = state.moment_2.to_device(device);
        state
    }
}
