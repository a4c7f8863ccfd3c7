//! The assembled model (burn-deepseek `model`) and its Hugging Face weights (`hf::weights`)
//! against host references, on the reference backend and on the wgpu runtime (lavapipe on
//! a CPU-only machine). Random tokens come from a seed printed by each test (the test's
//! name by default, `TEST_SEED=<n>` to draw others); the weights from Burn's
//! initializers, seeded through [`seeded`] where a test compares against tight bounds.

mod checkpoint;
#[allow(dead_code)]
#[path = "../moe/common.rs"]
mod common;
mod continuity;
mod ep;
#[cfg(feature = "learner")]
mod learner;
mod model;
#[cfg(feature = "mpi")]
mod mpi;
mod parallel;
mod parity;
mod pipeline;
mod serve;
mod speculative;
mod weights;

use burn::tensor::backend::Backend;
use burn_deepseek::model::{DeepSeekV3, DeepSeekV3Config};

/// `config`'s model with every weight drawn now from Burn's generator seeded with `seed`.
/// The generator is one per backend for the whole process and tests run in parallel, so
/// seeding and drawing happen under one lock: another seeded draw cannot interleave.
pub fn seeded<B: Backend>(config: &DeepSeekV3Config, seed: u64, device: &B::Device) -> DeepSeekV3<B> {
    static DRAW: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _draw = DRAW.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    B::seed(device, seed);
    let model = config.init::<B>(device);
    burn_dualpipe::executor::materialize(&model);
    model
}
