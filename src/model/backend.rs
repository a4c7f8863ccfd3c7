//! [`ModelBackend`]: the backend ops the model runs, in one bound.

use burn_moe::{CommBackend, MlaBackend, MoeBackend};

/// Everything [`super::DeepSeekV3`] needs of a backend: the MoE layer's ops
/// ([`MoeBackend`], with FP8 through [`burn_fp8::Fp8Backend`]), MLA's decode
/// ([`MlaBackend`]) and the collectives of expert parallelism ([`CommBackend`]).
/// Implemented for every backend that has the three: Burn's `Wgpu`, `Cuda`, `NdArray`,
/// `Flex` and `Autodiff` over any of them.
///
/// ```
/// use burn::backend::{Autodiff, Flex};
/// use burn_deepseek::model::ModelBackend;
///
/// fn trains<B: ModelBackend>() {}
/// trains::<Autodiff<Flex>>();
/// ```
pub trait ModelBackend: MoeBackend + MlaBackend + CommBackend {}

impl<B: MoeBackend + MlaBackend + CommBackend> ModelBackend for B {}
