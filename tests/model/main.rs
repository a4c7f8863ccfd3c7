//! The assembled model (burn-deepseek `model`) and its Hugging Face weights (`hf::weights`)
//! against host references, on the reference backend and on the wgpu runtime (lavapipe on
//! a CPU-only machine). Random tokens come from a printed seed (`MOE_TEST_SEED=<n>`
//! replays them); the weights from Burn's initializers.

#[allow(dead_code)]
#[path = "../moe/common.rs"]
mod common;
mod checkpoint;
mod continuity;
mod ep;
mod model;
#[cfg(feature = "mpi")]
mod mpi;
mod parallel;
mod parity;
mod pipeline;
mod serve;
mod weights;
