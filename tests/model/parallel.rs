//! Pipeline and expert parallelism together, against one device on the whole batch —
//! the objective, every gradient by parameter id (expert tensors: the rank's share), the
//! global expert counts: DualPipeV over 2 ranks driven one rank at a time
//! (`Pipeline::step_rank`), a `[pp 2, ep 2]` mesh whose pipeline ranks shard their
//! stages' experts over their `ep` group, `[dp 2, ep 2]` data and expert parallelism,
//! FSDP of the whole model over 2 ranks, and FSDP over `[dp 2, ep 2]` (dense parameters
//! over all 4 ranks, each `ep` rank's experts over `dp`). The per-rank programs run here as threads and
//! in mpi.rs as MPI processes; every rank draws the same weights and tokens from one seed.
//!
//! Tolerances: the same f32 math in another order (micro-batches, the
//! experts' rows by source rank), objective 1e-5 relative, gradients 3e-4 of their
//! largest entry.

use crate::common::{host, Ref, Rng};
use crate::ep::{host_grads, rel_diff};
use burn::backend::Autodiff;
use burn::module::{Module, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Int, Tensor, TensorData};
use burn_comm::{launch, Comm, CommError, DeviceMesh, Transport};
use burn_deepseek::model::{DeepSeekV3, DeepSeekV3Config, ModelStage, UnitError};
use burn_dp::ShardGroup;
use burn_dualpipe::executor::Pipeline;
use burn_dualpipe::schedule::{Schedule, ScheduleKind};
use std::collections::HashMap;

type B = Autodiff<Ref>;

/// A rank's failure as a communicator error, for the in-process launcher.
fn as_comm(rank: usize, e: String) -> CommError {
    CommError::Engine { rank, op: "parallel test", detail: e }
}

// The reference is built once for all threads: the backend's random stream is one per
// process, and threads drawing from it at once would draw different weights.

#[test]
fn dualpipe_v_one_rank_at_a_time_takes_the_single_device_step() {
    let reference = reference(Rng::new("dualpipe_v_one_rank_at_a_time").next_u64(), DUALPIPE_ROWS);
    launch(Comm::group(2, Transport::Host), |comm| dualpipe_v_rank(&comm, &reference).map_err(|e| as_comm(comm.rank(), e))).unwrap();
}

#[test]
fn pipeline_and_expert_parallelism_on_four_threads_take_the_single_device_step() {
    let reference = reference(Rng::new("pipeline_and_expert_parallelism_on_four_threads").next_u64(), PP_EP_ROWS);
    launch(Comm::group(4, Transport::Host), |world| pp_ep_rank(&world, &reference).map_err(|e| as_comm(world.rank(), e))).unwrap();
}

#[test]
fn data_and_expert_parallelism_on_four_threads_take_the_single_device_step() {
    let reference = reference(Rng::new("data_and_expert_parallelism_on_four_threads").next_u64(), DP_EP_ROWS);
    launch(Comm::group(4, Transport::Host), |world| dp_ep_rank(&world, &reference).map_err(|e| as_comm(world.rank(), e))).unwrap();
}

#[test]
fn fsdp_on_two_threads_takes_the_single_device_step() {
    let reference = reference(Rng::new("fsdp_on_two_threads").next_u64(), FSDP_ROWS);
    launch(Comm::group(2, Transport::Host), |world| {
        for per_block in [false, true] {
            fsdp_rank(&world, &reference, 1, per_block).map_err(|e| as_comm(world.rank(), e))?;
        }
        Ok::<_, CommError>(())
    })
    .unwrap();
}

#[test]
fn fsdp_with_expert_parallelism_on_four_threads_takes_the_single_device_step() {
    let reference = reference(Rng::new("fsdp_with_ep_on_four_threads").next_u64(), DP_EP_ROWS);
    launch(Comm::group(4, Transport::Host), |world| {
        for per_block in [false, true] {
            fsdp_rank(&world, &reference, 2, per_block).map_err(|e| as_comm(world.rank(), e))?;
        }
        Ok::<_, CommError>(())
    })
    .unwrap();
}

/// Rows of the FSDP step on 2 ranks: 2 per rank.
pub(crate) const FSDP_ROWS: usize = 4;

/// Rank `world.rank()` of FSDP over a `[dp, ep]` mesh of the ranks of `world`, 2 rows
/// each. With `ep` > 1 the experts are sharded over `ep` first; the dense parameters are
/// sharded over every rank and this `ep` rank's experts over `dp`, both gradients
/// divided by `dp` (each `ep` rank's loss is its share of its group's objective, so the
/// sums over `ep` are whole; torchtitan's divide factor for the experts). `per_block`:
/// one burn-dp shard group per unit of `DeepSeekV3::fsdp_units`, each gathered when the
/// forward reaches it (`try_loss_units`); else one group for the dense parameters (and
/// one for the experts), gathered at once. After the
/// backward each shard holds its slice of the one-device gradient (flattened in module
/// order; expert tensors: this `ep` rank's experts), and the MoE counts summed over `dp`
/// are the whole batch's.
pub(crate) fn fsdp_rank(world: &Comm, reference: &Reference, ep: usize, per_block: bool) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let (r, w, n, device) = (world.rank(), world.world_size(), reference.n, Default::default());
    let dp = w / ep;
    let mesh = DeviceMesh::new(world, &[("dp", dp), ("ep", ep)]).map_err(|e| err(&e))?;
    let (dp_comm, ep_comm) = (mesh.comm("dp").map_err(|e| err(&e))?.clone(), mesh.comm("ep").map_err(|e| err(&e))?.clone());
    let model = match ep {
        1 => reference.model.clone().fork(&device),
        _ => reference.model.shard_experts(&ep_comm, &device).map_err(|e| err(&e))?,
    };
    let group = |experts: bool| {
        let comm = if experts { &dp_comm } else { world };
        ShardGroup::new(comm.clone()).with_gradient_divide_factor(dp)
    };
    let groups = match (per_block, ep) {
        (true, _) => model.fsdp_units().into_iter().map(|u| group(u.experts).with_params(u.params)).collect(),
        (false, 1) => vec![group(false)],
        (false, _) => vec![group(false), group(true).with_params(model.routed_expert_ids())],
    };
    let fsdp = burn_dp::Fsdp::grouped(model, groups).map_err(|e| err(&e))?;
    let rows = reference.ids.len() / n / w;
    let ids = reference.ids[r * rows * n..(r + 1) * rows * n].to_vec();
    let tokens = Tensor::from_data(TensorData::new(ids, [rows, n]), &device);
    let out = match per_block {
        true => fsdp.hollow().try_loss_units(tokens, &fsdp),
        false => fsdp.gather().map_err(UnitError::from).and_then(|m| Ok(m.try_loss(tokens)?)),
    }
    .map_err(|e| err(&e))?;
    // Each ep group's objective is the sum of its ranks' losses; dp averages the groups.
    let loss: f64 = world.all_gather_host("loss", host(out.loss.clone())[0] as f64).map_err(|e| err(&e))?.iter().sum::<f64>() / dp as f64;
    assert!((loss - reference.loss).abs() <= 1e-5 * reference.loss, "rank {r}: loss {loss} vs one device {}", reference.loss);
    let grads = GradientsParams::from_grads(out.loss.backward(), &fsdp);
    for g in 0..fsdp.num_groups() {
        let shard = grads.get::<Ref, 1>(fsdp.shard(g).id).ok_or(format!("no gradient on the shard of group {g}"))?;
        let layout = fsdp.layout(g);
        let full: Vec<f32> = layout
            .ids
            .iter()
            .zip(&layout.shapes)
            .flat_map(|(id, shape)| {
                let (full_dims, full) = &reference.grads[id];
                let len: usize = shape.iter().product();
                if shape == full_dims {
                    full.clone()
                } else {
                    // An expert tensor: this ep rank's share of the experts.
                    full[ep_comm.rank() * len..(ep_comm.rank() + 1) * len].to_vec()
                }
            })
            .collect();
        let bounds = &fsdp.shards(g).bounds;
        let me = fsdp.shards(g).comm.rank();
        let d = rel_diff(&host(shard), &full[bounds[me]..bounds[me + 1]]);
        assert!(d <= 3e-4, "rank {r}: the gradient of group {g}'s shard off by {d:e} of its largest entry");
    }
    // Counts: global within the ep group, then summed over dp.
    let counts = burn_dp::collective::all_reduce(Tensor::cat(out.counts.iter().map(|c| c.clone().float()).collect(), 0), &dp_comm).map_err(|e| err(&e))?;
    let want: Vec<i64> = reference.counts.concat();
    assert_eq!(counts_of(&counts.int()), want, "rank {r}: the whole batch's counts");
    Ok(())
}

/// Rows of the `[dp 2, ep 2]` step: 2 per rank.
pub(crate) const DP_EP_ROWS: usize = 8;

/// Rank `world.rank()` of a `[dp 2, ep 2]` mesh over the 4 ranks of `world`: the
/// experts sharded over `ep` (the model's sync sums the replicated gradients over it),
/// then DDP averages every gradient — dense and expert — over `dp`, so the expert
/// gradients are divided by the whole data-parallel size (torchtitan's rule); the MoE
/// counts summed over `dp` are the whole batch's. Each rank has 2 rows.
pub(crate) fn dp_ep_rank(world: &Comm, reference: &Reference) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let mesh = DeviceMesh::new(world, &[("dp", 2), ("ep", 2)]).map_err(|e| err(&e))?;
    let (dp, ep) = (mesh.comm("dp").map_err(|e| err(&e))?.clone(), mesh.comm("ep").map_err(|e| err(&e))?.clone());
    let (r, n, device) = (world.rank(), reference.n, Default::default());
    let rows = DP_EP_ROWS / 4;
    let model = reference.model.shard_experts(&ep, &device).map_err(|e| err(&e))?;
    let ids = reference.ids[r * rows * n..(r + 1) * rows * n].to_vec();
    let out = model.try_loss(Tensor::from_data(TensorData::new(ids, [rows, n]), &device)).map_err(|e| err(&e))?;
    // The ep group's objective is its 4 rows' mean; dp averages the two groups.
    let loss: f64 = world.all_gather_host("loss", host(out.loss.clone())[0] as f64).map_err(|e| err(&e))?.iter().sum::<f64>() / 2.0;
    assert!((loss - reference.loss).abs() <= 1e-5 * reference.loss, "rank {r}: loss {loss} vs one device {}", reference.loss);
    let grads = model.sync_grads(GradientsParams::from_grads(out.loss.backward(), &model)).map_err(|e| err(&e))?;
    let grads = burn_dp::Ddp::new(dp.clone()).sync(&model, grads).map_err(|e| err(&e))?;
    let mut seen = 0;
    for (id, (dims, g)) in host_grads(&model, &grads) {
        let (full_dims, full) = &reference.grads[&id];
        let expected = if &dims == full_dims {
            &full[..]
        } else {
            // An expert tensor: this ep rank's half of the experts.
            &full[ep.rank() * g.len()..(ep.rank() + 1) * g.len()]
        };
        let d = rel_diff(&g, expected);
        assert!(d <= 3e-4, "rank {r}: gradient of {dims:?} off by {d:e} of its largest entry");
        seen += 1;
    }
    assert_eq!(seen, reference.grads.len(), "rank {r}: every parameter");
    // Counts: global within the ep group, then summed over dp.
    let sizes: Vec<usize> = out.counts.iter().map(|c| c.dims()[0]).collect();
    let flat = Tensor::cat(out.counts.iter().map(|c| c.clone().float()).collect(), 0);
    let summed = burn_dp::collective::all_reduce(flat, &dp).map_err(|e| err(&e))?;
    let counts: Vec<Vec<i64>> = summed.split_with_sizes(sizes, 0).into_iter().map(|c| counts_of(&c.int())).collect();
    assert_eq!(counts, reference.counts, "rank {r}: the whole batch's counts");
    Ok(())
}

/// Rows of the DualPipeV step: 4 micro-batches of one.
pub(crate) const DUALPIPE_ROWS: usize = 4;
/// Rows of the `[pp 2, ep 2]` step: 4 micro-batches of one per `ep` rank.
pub(crate) const PP_EP_ROWS: usize = 8;

/// The same model on every process (seeded, materialized), the batch's tokens and the
/// single-device step on all of them: loss, counts, gradients by id.
pub(crate) struct Reference {
    model: DeepSeekV3<B>,
    ids: Vec<i64>,
    n: usize,
    loss: f64,
    counts: Vec<Vec<i64>>,
    grads: HashMap<ParamId, (Vec<usize>, Vec<f32>)>,
}

pub(crate) fn reference(seed: u64, rows: usize) -> Reference {
    let mut rng = Rng::from_seed(seed);
    let device = Default::default();
    let mut config = DeepSeekV3Config::tiny();
    config.moe.balance_loss_weight = 0.05;
    let model = crate::seeded::<B>(&config, rng.next_u64(), &device);
    let n = 13;
    let ids: Vec<i64> = (0..rows * n).map(|_| rng.below(256) as i64).collect();
    let out = model.loss(Tensor::from_data(TensorData::new(ids.clone(), [rows, n]), &device));
    let loss = host(out.loss.clone())[0] as f64;
    let counts = out.counts.iter().map(counts_of).collect();
    let grads = host_grads(&model, &GradientsParams::from_grads(out.loss.backward(), &model));
    Reference { model, ids, n, loss, counts, grads }
}

fn counts_of(t: &Tensor<B, 1, Int>) -> Vec<i64> {
    t.clone().into_data().convert::<i64>().to_vec().unwrap()
}

/// Checks the gradients of the stages this rank holds against the reference, by id:
/// whole tensors, or this rank's `part` of `parts` along the first dimension (expert
/// tensors). Returns how many it checked.
fn check_grads(what: &str, stage: &ModelStage<B>, grads: &GradientsParams, reference: &Reference, (part, parts): (usize, usize)) -> usize {
    let mut seen = 0;
    for (id, (dims, g)) in host_grads(stage, grads) {
        let (full_dims, full) = &reference.grads[&id];
        let expected = if &dims == full_dims {
            &full[..]
        } else {
            assert_eq!(dims[0] * parts, full_dims[0], "{what}: an expert tensor holds its share of the experts");
            &full[part * g.len()..(part + 1) * g.len()]
        };
        // 3e-4: the embedding's gradient sums the main path's and the MTP embeddings'
        // (carried through every stage) in another order than one device; 1.1e-4 seen.
        let d = rel_diff(&g, expected);
        assert!(d <= 3e-4, "{what}: gradient of {dims:?} off by {d:e} of its largest entry");
        seen += 1;
    }
    seen
}

/// Each stage's MoE layers' slice of the reference counts.
fn stage_counts<'a>(reference: &'a Reference, stages: &[ModelStage<B>], s: usize, micro_batches: usize) -> &'a [Vec<i64>] {
    let layers = |stage: &ModelStage<B>| stage.take_counts(micro_batches).len();
    let start: usize = stages[..s].iter().map(layers).sum();
    &reference.counts[start..start + layers(&stages[s])]
}

/// Rank `comm.rank()` of DualPipeV over the ranks of `comm` (2), 4 micro-batches.
pub(crate) fn dualpipe_v_rank(comm: &Comm, reference: &Reference) -> Result<(), String> {
    let (rows, device) = (DUALPIPE_ROWS, Default::default());
    let n = reference.n;
    let schedule = Schedule::new(ScheduleKind::DualPipeV, 2, rows).unwrap();
    let staged = reference.model.clone().into_stages(schedule.stages()).unwrap();
    let objective = staged.objective;
    let pipeline = Pipeline::new(staged.stages, vec![device; 2], schedule.clone()).unwrap();
    let row = |m: usize| TensorData::new(reference.ids[m * n..(m + 1) * n].to_vec(), [1, n]);
    let inputs = (0..rows).map(|m| objective.input(Tensor::<B, 2, Int>::from_data(row(m), &device))).collect();
    let out = pipeline.step_rank(comm, inputs, |y, m| objective.loss(y.clone(), Tensor::from_data(row(m), &y.device())).loss).map_err(|e| e.to_string())?;
    assert!((out.loss - reference.loss).abs() <= 1e-5 * reference.loss, "loss {} vs one device {}", out.loss, reference.loss);
    assert_eq!(out.timeline.ranks.len(), 2, "every rank's spans");
    let held: Vec<usize> = (0..2).map(|c| schedule.stage_of_chunk(comm.rank(), c)).collect();
    let grads = pipeline.stage_grads(out.grads);
    let mut seen = 0;
    for &s in &held {
        seen += check_grads(&format!("rank {} stage {s}", comm.rank()), &pipeline.stages()[s], &grads[s], reference, (0, 1));
    }
    let total: usize = comm.all_gather_host("seen", seen).map_err(|e| e.to_string())?.iter().sum();
    assert_eq!(total, reference.grads.len(), "a gradient for every parameter, over the ranks");
    // The counts of the stages' layers (held stages recorded them; the others none).
    for &s in &held {
        let counts: Vec<Vec<i64>> = pipeline.stages()[s].take_counts(rows).iter().map(counts_of).collect();
        // take_counts cleared the record: compare with the reference's slice by length.
        assert_eq!(counts, stage_counts(reference, pipeline.stages(), s, rows), "stage {s} counts");
    }
    Ok(())
}

/// Rank `world.rank()` of a `[pp 2, ep 2]` mesh over the 4 ranks of `world`: DualPipeV
/// over `pp`, each pipeline rank's stages sharded over its `ep` group (one communicator
/// per stage), each `ep` rank with its own 4 micro-batches of one row.
pub(crate) fn pp_ep_rank(world: &Comm, reference: &Reference) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let mesh = DeviceMesh::new(world, &[("pp", 2), ("ep", 2)]).map_err(|e| err(&e))?;
    let (pp, ep) = (mesh.comm("pp").map_err(|e| err(&e))?.clone(), mesh.comm("ep").map_err(|e| err(&e))?.clone());
    let e = ep.rank();
    let (micro_batches, device) = (4, Default::default());
    // Each expert-parallel rank trains on its own 4 rows: 8 rows in all.
    assert_eq!(PP_EP_ROWS, 2 * micro_batches);
    let n = reference.n;
    let schedule = Schedule::new(ScheduleKind::DualPipeV, 2, micro_batches).unwrap();
    let staged = reference.model.clone().into_stages(schedule.stages()).unwrap();
    let objective = staged.objective.with_expert_ranks(2);
    let held: Vec<usize> = (0..2).map(|c| schedule.stage_of_chunk(pp.rank(), c)).collect();
    let mut stages = staged.stages;
    for &s in &held {
        // One communicator per stage: the rank runs its two stages' passes at once.
        let stage_comm = ep.split(0, e).map_err(|e| err(&e))?;
        stages[s] = stages[s].shard_experts(&stage_comm, &device).map_err(|e| err(&e))?;
    }
    let pipeline = Pipeline::new(stages, vec![device; 2], schedule.clone()).unwrap();
    let row = |m: usize| TensorData::new(reference.ids[(e * micro_batches + m) * n..(e * micro_batches + m + 1) * n].to_vec(), [1, n]);
    let inputs = (0..micro_batches).map(|m| objective.input(Tensor::<B, 2, Int>::from_data(row(m), &device))).collect();
    let out = pipeline.step_rank(&pp, inputs, |y, m| objective.loss(y.clone(), Tensor::from_data(row(m), &y.device())).loss).map_err(|e| err(&e))?;
    let loss: f64 = ep.all_gather_host("loss", out.loss).map_err(|e| err(&e))?.iter().sum();
    assert!((loss - reference.loss).abs() <= 1e-5 * reference.loss, "rank {}: loss {loss} vs one device {}", world.rank(), reference.loss);
    let mut grads = pipeline.stage_grads(out.grads);
    let mut seen = 0;
    for &s in &held {
        let stage = &pipeline.stages()[s];
        let synced = stage.sync_grads(std::mem::replace(&mut grads[s], GradientsParams::new())).map_err(|e| err(&e))?;
        seen += check_grads(&format!("rank {} (pp {}, ep {e}) stage {s}", world.rank(), pp.rank()), stage, &synced, reference, (e, 2));
        let counts: Vec<Vec<i64>> = stage.take_counts(micro_batches).iter().map(counts_of).collect();
        assert_eq!(counts, stage_counts(reference, pipeline.stages(), s, micro_batches), "stage {s}: global counts");
    }
    let total: usize = pp.all_gather_host("seen", seen).map_err(|e| err(&e))?.iter().sum();
    assert_eq!(total, reference.grads.len(), "a gradient for every parameter, over the pipeline ranks");
    Ok(())
}
