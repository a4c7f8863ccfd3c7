//! # burn-moe
//!
//! DeepSeekMoE for Burn: the mixture-of-experts layer of DeepSeek-V3.
//!
//! - [`router`]: sigmoid/softmax scores, group-limited top-k, the auxiliary-loss-free
//!   balancing bias and its update, per-expert counts, the sequence-wise balance loss;
//! - [`dispatch`]: the dispatch plan, token dispatch and weighted combine, and the
//!   grouped expert GEMM over the expert-contiguous layout, in f32 or in FP8 through
//!   burn-fp8's grouped tile-scaled GEMM: CubeCL kernels on wgpu and CUDA, plain Burn ops
//!   elsewhere, all with autodiff backwards;
//! - [`Moe`]: shared plus routed SwiGLU experts, dropless, with [`MoeConfig`] presets
//!   for DeepSeek-V3 and a tiny size, and [`moe::forward_naive`], the loop-over-experts
//!   baseline.
//!
//! The backend trait [`MoeBackend`] is implemented for `CubeBackend`, `Fusion` (Burn's
//! `Wgpu` and `Cuda`), `Autodiff`, `NdArray` (the plain-Burn reference) and `Flex` (host
//! loops and one `gemm` call per expert, feature `flex`). MLA and the collectives have
//! their own traits, [`MlaBackend`] and [`CommBackend`], on the same backends.
//!
//! - [`mla`]: Multi-head Latent Attention — training forward, the absorbed form, a paged
//!   latent cache and the absorbed decode kernel ([`mla::decode_attention`]).
//!
//! - [`eplb`]: expert-parallel load balancing — replicas and GPU placement of experts from
//!   their measured loads (hierarchical or global), and routing over the replicas.
//! - [`comm`]: collectives between in-process ranks (one device each) with autodiff:
//!   all-to-all with uneven splits and FP8 rows, all-gather, all-reduce;
//! - [`ep`]: the expert-parallel layer — experts sharded over the ranks per a
//!   [`eplb::Placement`], dispatch and combine by all-to-all, gradient sync.
#![warn(missing_docs)]

pub mod backend;
pub mod comm;
mod custom_op;
pub mod dispatch;
pub mod ep;
pub mod eplb;
pub mod kernel;
pub mod mla;
pub mod moe;
pub mod reference;
pub mod router;

pub use backend::MoeBackend;
pub use comm::CommBackend;
pub use mla::{Mla, MlaBackend, MlaConfig};
pub use moe::{Moe, MoeConfig, MoeOutput};
