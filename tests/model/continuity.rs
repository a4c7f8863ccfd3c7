//! Training continuity through a distributed checkpoint: a run of 2K steps against K
//! steps, a save, a resume (same world size, or another with the same global batch) and K
//! more steps, losses compared step by step. FSDP over 1, 2 or 4 in-process ranks on
//! Burn's Flex backend (bitwise reproducible run to run); the MoE balancing bias follows
//! the whole batch's counts on every rank and is saved with the parameters.
//!
//! Exact (bit for bit) where the arithmetic is identical: a resume on the same world size.
//! Across world sizes the gradient sums run in another order; the bound is the one the
//! parallel-equivalence tests hold a single step to (relative 1e-5), here for every step.

use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::{Tensor, TensorData};
use burn_comm::{launch, Comm, CommError, Transport};
use burn_dcp::{Checkpointer, Reader, Snapshot};
use burn_deepseek::checkpoint::{Holding, StateNames};
use burn_deepseek::model::{DeepSeekV3, DeepSeekV3Config};
use burn_dp::{AdamWConfig, Fsdp, MomentDType};
use std::path::{Path, PathBuf};

type B = Autodiff<Flex>;

/// Rows of every step's global batch, tokens per row.
const ROWS: usize = 4;
const N: usize = 12;

/// Step `step`'s global batch (the data position is the step: any world size takes the
/// same rows).
fn batch(step: u64) -> Vec<i64> {
    let mut s = (step + 1).wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
    (0..ROWS * N)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 256) as i64
        })
        .collect()
}

/// On `w` ranks: FSDP of `base` (or the latest checkpoint of `from`), steps `first..last`
/// on the rows of each step this rank takes; a save at `last` under `to`. The global loss
/// of each step.
fn train(w: usize, base: &DeepSeekV3<B>, names: &StateNames, from: Option<&Path>, (first, last): (u64, u64), to: Option<&Path>) -> Vec<f32> {
    let losses = launch(Comm::group(w, Transport::Host), |world| {
        let r = world.rank();
        let fail = |e: &dyn std::fmt::Display| CommError::Engine { rank: r, op: "continuity", detail: e.to_string() };
        let device = Default::default();
        let mut fsdp = Fsdp::new(base.clone().fork(&device), world.clone()).map_err(|e| fail(&e))?;
        let mut optim = AdamWConfig::new().with_moments(MomentDType::Bf16).init::<B, Fsdp<B, DeepSeekV3<B>>>();
        let holding = Holding::new(names);
        if let Some(dir) = from {
            let reader = Reader::latest(dir).map_err(|e| fail(&e))?.expect("a checkpoint");
            assert_eq!(reader.step(), first, "the resumed step");
            fsdp = holding.load_fsdp(&fsdp, &reader).map_err(|e| fail(&e))?;
            optim = optim.load_record(holding.load_fsdp_adamw(&fsdp, &reader).map_err(|e| fail(&e))?);
        }
        let rows = ROWS / w;
        let mut losses = Vec::new();
        for step in first..last {
            let ids = batch(step)[r * rows * N..(r + 1) * rows * N].to_vec();
            let out = fsdp.gather().map_err(|e| fail(&e))?.loss(Tensor::from_data(TensorData::new(ids, [rows, N]), &device));
            let loss = out.loss.clone().into_scalar();
            losses.push(world.all_gather_host("loss", loss).map_err(|e| fail(&e))?.iter().sum::<f32>() / w as f32);
            let grads = GradientsParams::from_grads(out.loss.backward(), &fsdp);
            let sizes: Vec<usize> = out.counts.iter().map(|c| c.dims()[0]).collect();
            let counts = burn_dp::collective::all_reduce(Tensor::cat(out.counts.into_iter().map(|c| c.float()).collect(), 0), &world).map_err(|e| fail(&e))?;
            let counts: Vec<_> = counts.split_with_sizes(sizes, 0).into_iter().map(|c| c.int()).collect();
            fsdp = optim.step(1e-2, fsdp, grads).map_module(|m| m.update_bias(&counts));
        }
        if let Some(dir) = to {
            let mut s = Snapshot::new();
            s.chunks = holding.fsdp_chunks(&fsdp).map_err(|e| fail(&e))?;
            s.chunks.extend(holding.fsdp_adamw_chunks(&fsdp, &optim.to_record()).map_err(|e| fail(&e))?);
            Checkpointer::new(dir, &world).map_err(|e| fail(&e))?.save(last, s).map_err(|e| fail(&e))?;
        }
        Ok::<_, CommError>(losses)
    })
    .unwrap();
    losses.into_iter().next().unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("burn-deepseek-continuity-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn resuming_from_a_checkpoint_continues_the_training_trajectory_on_any_world_size() {
    let config = DeepSeekV3Config::tiny();
    let device = Default::default();
    let base = crate::seeded::<B>(&config, 7, &device);
    let names = StateNames::of(&base, &config).unwrap();
    let k = 2;
    // One device, 2K steps, and two ranks, 2K steps.
    let one = train(1, &base, &names, None, (0, 2 * k), None);
    let two = train(2, &base, &names, None, (0, 2 * k), None);
    // Same world size: K steps, save, resume, K steps — the same bits.
    for w in [1, 2] {
        let dir = tmp(&format!("same-{w}"));
        let mut resumed = train(w, &base, &names, None, (0, k), Some(&dir));
        resumed.extend(train(w, &base, &names, Some(&dir), (k, 2 * k), None));
        let whole = if w == 1 { &one } else { &two };
        assert_eq!(&resumed, whole, "{w} ranks: resumed against uninterrupted");
        std::fs::remove_dir_all(&dir).unwrap();
    }
    // Another world size: 4 ranks save, 2 resume; 1 saves, 4 resume.
    for (w_save, w_load) in [(4, 2), (1, 4)] {
        let dir = tmp(&format!("{w_save}-{w_load}"));
        let mut resumed = train(w_save, &base, &names, None, (0, k), Some(&dir));
        resumed.extend(train(w_load, &base, &names, Some(&dir), (k, 2 * k), None));
        for (s, (a, b)) in resumed.iter().zip(&one).enumerate() {
            assert!((a - b).abs() <= 1e-5 * b.abs(), "{w_save} ranks then {w_load}: step {s} loss {a} against one device's {b}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
