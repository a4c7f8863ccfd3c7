//! # burn-deepseek
//!
//! DeepSeek-V3's training and inference infrastructure for [Burn](https://burn.dev), as
//! one umbrella over the workspace's crates:
//!
//! - [`fp8`] ([`burn_fp8`]): FP8 formats, tile-wise quantization and the tile-scaled FP8
//!   GEMM, as CubeCL kernels with a plain-Burn reference; `Fp8Linear`, a `Linear` that
//!   trains with all three GEMMs in FP8 and a splittable backward.
//! - [`moe`] ([`burn_moe`]): the DeepSeekMoE layer — group-limited routing with the
//!   balancing bias, dispatch and combine kernels, one grouped GEMM launch for all
//!   experts in f32 or FP8, autodiff throughout; expert parallelism over the devices of
//!   a host (differentiable all-to-all with FP8 rows, EPLB placement); Multi-head Latent
//!   Attention with a paged latent cache and an absorbed decode kernel.
//! - [`comm`] ([`burn_comm`]): the communicator — collectives and point-to-point
//!   messages between ranks that are threads of one process or MPI processes (feature
//!   `mpi`), every wait bounded by a timeout that names the failed rank — and the named
//!   `DeviceMesh` over them.
//! - [`dualpipe`] ([`burn_dualpipe`]): DualPipe, DualPipeV, 1F1B and ZB1P schedules as
//!   data, their validator and cost simulator with SVG timelines, and the executor that
//!   trains a model split into stages over several Burn devices.
//!
//! - [`model`]: a DeepSeek-V3-shaped language model assembled from those pieces — MLA in
//!   every block, MoE after the dense layers, optional FP8, multi-token prediction — with
//!   its training loss, the balancing update, cached generation and expert parallelism
//!   over the ranks of a `burn_moe::comm::Comm` group.
//! - [`checkpoint`] ([`burn_dcp`]): distributed checkpoints of the model in any of its
//!   parallel layouts — every rank saves what it holds in parallel, any world size loads
//!   it back (resharding), asynchronously, surviving a crash mid-save.
//! - [`hf`]: Hugging Face interop — DeepSeek-V3 / V2 `config.json` files by their real
//!   field names, turned into the model config, and safetensors weights by their Hugging
//!   Face key names.
//!
//! The cargo examples in `examples/` and the chapters in `docs/` (also here, as the
//! `guide_*` modules, whose code runs as doc tests) show each piece in use; the README's
//! main command, `cargo run --release --example train_tiny`, trains the tiny model.

pub mod checkpoint;
pub mod hf;
pub mod model;

pub use burn_comm as comm;
pub use burn_dcp as dcp;
pub use burn_dp as dp;
pub use burn_dualpipe as dualpipe;
pub use burn_fp8 as fp8;
pub use burn_moe as moe;
/// burn-train (feature `learner`): Burn's `Learner`, which [`model::learner`] plugs into.
#[cfg(feature = "learner")]
pub use burn_train as train;

#[doc = include_str!("../docs/fp8.md")]
pub mod guide_fp8 {}

#[doc = include_str!("../docs/fp8-training.md")]
pub mod guide_fp8_training {}

#[doc = include_str!("../docs/moe.md")]
pub mod guide_moe {}

#[doc = include_str!("../docs/expert-parallel.md")]
pub mod guide_expert_parallel {}

#[doc = include_str!("../docs/distributed.md")]
pub mod guide_distributed {}

#[doc = include_str!("../docs/data-parallel.md")]
pub mod guide_data_parallel {}

#[doc = include_str!("../docs/checkpoints.md")]
pub mod guide_checkpoints {}

#[doc = include_str!("../docs/mla.md")]
pub mod guide_mla {}

#[doc = include_str!("../docs/dualpipe.md")]
pub mod guide_dualpipe {}

#[doc = include_str!("../docs/model.md")]
pub mod guide_model {}

/// The README's code compiles.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
