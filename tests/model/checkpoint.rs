//! Distributed checkpoints of the model in every parallel layout (`burn_deepseek::checkpoint`
//! on burn-dcp), on in-process ranks:
//!
//! - every layout (one device, DDP, ZeRO-1, FSDP, HSDP, EP, FSDP × EP, PP, PP × EP) on
//!   1, 2 or 4 ranks, after the same two optimizer steps, saves the same checkpoint as
//!   one device, bit for bit (the steps use gradients that are an exact function of each
//!   parameter's value, so every layout's AdamW does the same arithmetic per element);
//! - each checkpoint loads into other layouts on other world sizes: saved again at once it
//!   is the same checkpoint (the loaded parameters and moments are the saved ones, bit
//!   for bit), and one more step gives one device's third step, bit for bit (the step
//!   counts and moments are used);
//! - a model of other hyper-parameters is refused naming the first differing tensor and
//!   both shapes, and leaves the model as it was.
//!
//! Training continuity with real forward and backward passes is in `continuity`; the same
//! rank programs across MPI processes in `mpi`.

use crate::common::Ref;
use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;
use burn_comm::{launch, Comm, CommError, DeviceMesh, Transport};
use burn_dcp::{step_dir, Checkpointer, DcpError, Reader, Snapshot};
use burn_deepseek::checkpoint::{CheckpointError, Holding, StateNames};
use burn_deepseek::model::{DeepSeekV3, DeepSeekV3Config, ModelStage};
use burn_dp::{AdamW, AdamWConfig, Fsdp, MomentDType, ShardGroup, Zero1};
use burn_dualpipe::schedule::{Schedule, ScheduleKind};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

type B = Autodiff<Ref>;
type Optim<M> = OptimizerAdaptor<AdamW, M, B>;

const LR: f64 = 1e-2;

/// How the ranks hold the model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Layout {
    Single,
    Ddp,
    Zero1,
    /// FSDP per unit over `[replicate, shard, ep]`.
    Fsdp {
        replicate: usize,
        ep: usize,
    },
    Ep,
    /// DualPipeV's `2·pp` stages, each held stage's experts over `ep`.
    Pp {
        ep: usize,
    },
}

fn adamw() -> AdamWConfig {
    AdamWConfig::new().with_moments(MomentDType::F32)
}

/// Gradients that are an exact function of each trainable value (`(round(16x) + 0.5) / 64`:
/// few mantissa bits, so sums over 2 or 4 ranks and their means are exact), for the
/// parameters `only` names (all trainable ones when `None`).
fn synthetic_grads<M: AutodiffModule<B>>(module: &M, only: Option<&HashSet<ParamId>>) -> GradientsParams {
    struct Visit<'a>(GradientsParams, Option<&'a HashSet<ParamId>>);
    impl ModuleVisitor<B> for Visit<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if param.is_require_grad() && self.1.is_none_or(|o| o.contains(&param.id)) {
                let x = param.val().inner();
                self.0.register::<<B as AutodiffBackend>::InnerBackend, D>(param.id, (x.mul_scalar(16.0).round().add_scalar(0.5)).div_scalar(64.0));
            }
        }
    }
    let mut v = Visit(GradientsParams::new(), only);
    module.visit(&mut v);
    v.0
}

/// One rank's holdings in a layout, with their optimizers.
enum Held {
    Model { model: DeepSeekV3<B>, optim: Optim<DeepSeekV3<B>>, ep: Option<Comm> },
    Zero { model: DeepSeekV3<B>, zero: Zero1<Optim<DeepSeekV3<B>>>, keep: HashSet<ParamId> },
    Fsdp { fsdp: Fsdp<B, DeepSeekV3<B>>, optim: Optim<Fsdp<B, DeepSeekV3<B>>>, ep: Option<Comm> },
    Stages { stages: Vec<(ModelStage<B>, Optim<ModelStage<B>>)>, ep: Option<Comm> },
}

fn fail(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Held {
    fn new(layout: Layout, world: &Comm, base: &DeepSeekV3<B>) -> Result<Self, String> {
        let device = Default::default();
        let (r, w) = (world.rank(), world.world_size());
        Ok(match layout {
            Layout::Single | Layout::Ddp => Held::Model { model: base.clone().fork(&device), optim: adamw().init(), ep: None },
            Layout::Ep => Held::Model { model: base.shard_experts(world, &device).map_err(fail)?, optim: adamw().init(), ep: Some(world.clone()) },
            Layout::Zero1 => {
                let model = base.clone().fork(&device);
                let zero = Zero1::new(adamw().init(), world.clone());
                let layout = burn_dp::Layout::of::<B, _>(&model);
                let keep = layout.ids[zero.shard_of(&layout, r)].iter().copied().collect();
                Held::Zero { model, zero, keep }
            }
            Layout::Fsdp { replicate, ep } => {
                let mesh = DeviceMesh::new(world, &[("dp_replicate", replicate), ("dp_shard", w / replicate / ep), ("ep", ep)]).map_err(fail)?;
                let dense = mesh.group(&["dp_shard", "ep"]).map_err(fail)?;
                let shard = mesh.comm("dp_shard").map_err(fail)?.clone();
                let replicas = (replicate > 1).then(|| mesh.comm("dp_replicate").cloned()).transpose().map_err(fail)?;
                let ep_comm = (ep > 1).then(|| mesh.comm("ep").cloned()).transpose().map_err(fail)?;
                let model = match &ep_comm {
                    Some(c) => base.shard_experts(c, &device).map_err(fail)?,
                    None => base.clone().fork(&device),
                };
                let groups = model
                    .fsdp_units()
                    .into_iter()
                    .map(|u| {
                        let g = ShardGroup::new(if u.experts { shard.clone() } else { dense.clone() }).with_params(u.params);
                        match &replicas {
                            Some(rep) => g.with_replicas(rep.clone()),
                            None => g,
                        }
                    })
                    .collect();
                Held::Fsdp { fsdp: Fsdp::grouped(model, groups).map_err(fail)?, optim: adamw().init(), ep: ep_comm }
            }
            Layout::Pp { ep } => {
                let pp = w / ep;
                let mesh = DeviceMesh::new(world, &[("pp", pp), ("ep", ep)]).map_err(fail)?;
                let p = mesh.comm("pp").map_err(fail)?.rank();
                let ep_comm = (ep > 1).then(|| mesh.comm("ep").cloned()).transpose().map_err(fail)?;
                let schedule = Schedule::new(ScheduleKind::DualPipeV, pp, 2 * pp).map_err(fail)?;
                let all = base.clone().into_stages(schedule.stages()).map_err(fail)?.stages;
                let held: Vec<usize> = (0..schedule.kind.chunks_per_rank()).map(|c| schedule.stage_of_chunk(p, c)).collect();
                let mut stages = Vec::new();
                for s in held {
                    let stage = match &ep_comm {
                        Some(c) => all[s].shard_experts(&c.split(0, c.rank()).map_err(fail)?, &device).map_err(fail)?,
                        None => all[s].clone().fork(&device),
                    };
                    stages.push((stage, adamw().init()));
                }
                Held::Stages { stages, ep: ep_comm }
            }
        })
    }

    /// One optimizer step with [`synthetic_grads`].
    fn step(self) -> Result<Self, String> {
        Ok(match self {
            Held::Model { model, mut optim, ep } => {
                let grads = synthetic_grads(&model, None);
                Held::Model { model: optim.step(LR, model, grads), optim, ep }
            }
            Held::Zero { model, mut zero, keep } => {
                let grads = synthetic_grads(&model, None);
                Held::Zero { model: zero.step(LR, model, grads).map_err(fail)?, zero, keep }
            }
            Held::Fsdp { fsdp, mut optim, ep } => {
                let shards: HashSet<ParamId> = (0..fsdp.num_groups()).map(|g| fsdp.shard(g).id).collect();
                let grads = synthetic_grads(&fsdp, Some(&shards));
                Held::Fsdp { fsdp: optim.step(LR, fsdp, grads), optim, ep }
            }
            Held::Stages { stages, ep } => {
                let stages = stages
                    .into_iter()
                    .map(|(stage, mut optim)| {
                        let grads = synthetic_grads(&stage, None);
                        (optim.step(LR, stage, grads), optim)
                    })
                    .collect();
                Held::Stages { stages, ep }
            }
        })
    }

    fn holding<'a>(&self, names: &'a StateNames) -> Holding<'a> {
        let ep = match self {
            Held::Model { ep, .. } | Held::Fsdp { ep, .. } | Held::Stages { ep, .. } => ep.as_ref(),
            Held::Zero { .. } => None,
        };
        let h = Holding::new(names);
        match ep {
            Some(c) => h.with_ep(c.rank(), c.world_size()),
            None => h,
        }
    }

    fn snapshot(&self, names: &StateNames) -> Result<Snapshot, CheckpointError> {
        let h = self.holding(names);
        let mut s = Snapshot::new();
        match self {
            Held::Model { model, optim, .. } => {
                s.chunks = h.module_chunks(model)?;
                s.chunks.extend(h.adamw_chunks(model, &optim.to_record())?);
            }
            Held::Zero { model, zero, .. } => {
                s.chunks = h.module_chunks(model)?;
                s.chunks.extend(h.adamw_chunks(model, &zero.optimizer().to_record())?);
            }
            Held::Fsdp { fsdp, optim, .. } => {
                s.chunks = h.fsdp_chunks(fsdp)?;
                s.chunks.extend(h.fsdp_adamw_chunks(fsdp, &optim.to_record())?);
            }
            Held::Stages { stages, .. } => {
                for (stage, optim) in stages {
                    s.chunks.extend(h.module_chunks(stage)?);
                    s.chunks.extend(h.adamw_chunks(stage, &optim.to_record())?);
                }
            }
        }
        Ok(s)
    }

    fn load(self, names: &StateNames, reader: &Reader) -> Result<Self, CheckpointError> {
        let h = self.holding(names);
        Ok(match self {
            Held::Model { model, optim, ep } => {
                let record = h.load_adamw(&model, reader, None)?;
                Held::Model { model: h.load_module(&model, reader)?, optim: optim.load_record(record), ep }
            }
            Held::Zero { model, mut zero, keep } => {
                let record = h.load_adamw(&model, reader, Some(&keep))?;
                *zero.optimizer_mut() = zero.optimizer().clone().load_record(record);
                Held::Zero { model: h.load_module(&model, reader)?, zero, keep }
            }
            Held::Fsdp { fsdp, optim, ep } => {
                let fsdp = h.load_fsdp(&fsdp, reader)?;
                let record = h.load_fsdp_adamw(&fsdp, reader)?;
                Held::Fsdp { fsdp, optim: optim.load_record(record), ep }
            }
            Held::Stages { stages, ep } => {
                let mut loaded = Vec::new();
                for (stage, optim) in stages {
                    let record = h.load_adamw(&stage, reader, None)?;
                    loaded.push((h.load_module(&stage, reader)?, optim.load_record(record)));
                }
                Held::Stages { stages: loaded, ep }
            }
        })
    }
}

/// On `w` ranks in `layout`: [`rank`] on each.
pub(crate) fn run(layout: Layout, w: usize, base: &DeepSeekV3<B>, names: &StateNames, from: Option<&Path>, fresh: usize, to: &Path) {
    assert!(layout != Layout::Single || w == 1, "one device");
    launch(Comm::group(w, Transport::Host), |world| {
        rank(&world, layout, base, names, from, fresh, to).map_err(|e| CommError::Engine { rank: world.rank(), op: "checkpoint test", detail: e })
    })
    .unwrap();
}

/// Rank `world.rank()` in `layout`: load the latest checkpoint of `from` (saved again as
/// its step `s`), or take `fresh` steps (`s = fresh`), and save as step `s` under `to`
/// (asynchronously); then one step more, saved as step `s + 1` (blocking: after the
/// first save finished).
pub(crate) fn rank(world: &Comm, layout: Layout, base: &DeepSeekV3<B>, names: &StateNames, from: Option<&Path>, fresh: usize, to: &Path) -> Result<(), String> {
    let w = world.world_size();
    let ctx = |e: String| format!("{layout:?} on {w}: {e}");
    let mut held = Held::new(layout, world, base).map_err(ctx)?;
    let s = match from {
        Some(dir) => {
            let reader = Reader::latest(dir).map_err(fail).map_err(ctx)?.ok_or_else(|| ctx(format!("no checkpoint in {}", dir.display())))?;
            held = held.load(names, &reader).map_err(fail).map_err(ctx)?;
            reader.step()
        }
        None => {
            for _ in 0..fresh {
                held = held.step().map_err(ctx)?;
            }
            fresh as u64
        }
    };
    let mut saver = Checkpointer::new(to, world).map_err(fail).map_err(ctx)?;
    saver.save_async(s, held.snapshot(names).map_err(fail).map_err(ctx)?).map_err(fail).map_err(ctx)?;
    held = held.step().map_err(ctx)?;
    saver.save(s + 1, held.snapshot(names).map_err(fail).map_err(ctx)?).map_err(fail).map_err(ctx)?;
    Ok(())
}

/// Every tensor of the two checkpoints equal, byte for byte.
pub(crate) fn assert_same(a: &Path, b: &Path, what: &str) {
    let (a, b) = (Reader::open(a).unwrap(), Reader::open(b).unwrap());
    let names = |r: &Reader| r.metadata().tensors.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&a), names(&b), "{what}: the tensors");
    for (name, t) in &a.metadata().tensors {
        let u = b.tensor(name).unwrap();
        assert_eq!((&t.shape, &t.dtype), (&u.shape, &u.dtype), "{what}: {name}");
        let (x, y) = (a.read_whole(name, &t.shape).unwrap(), b.read_whole(name, &t.shape).unwrap());
        assert!(x.as_bytes() == y.as_bytes(), "{what}: tensor {name} differs");
    }
}

pub(crate) fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("burn-deepseek-ckpt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The tiny model (its routed experts divide over 2 and 4 ranks), drawn once: the same
/// weights in every process of an MPI job (each process draws from the same seed).
pub(crate) fn base() -> (DeepSeekV3Config, DeepSeekV3<B>) {
    let config = DeepSeekV3Config::tiny();
    let device = Default::default();
    let model = crate::seeded::<B>(&config, 7, &device);
    (config, model)
}

#[test]
fn every_layout_saves_one_devices_checkpoint_and_loads_into_other_layouts_and_world_sizes() {
    let (config, model) = base();
    let names = StateNames::of(&model, &config).unwrap();
    // One device: steps 2 and 3, and (another run) 3 and 4.
    let (reference, reference_4) = (tmp("reference"), tmp("reference-4"));
    run(Layout::Single, 1, &model, &names, None, 2, &reference);
    run(Layout::Single, 1, &model, &names, None, 3, &reference_4);
    assert_same(&step_dir(&reference, 3), &step_dir(&reference_4, 3), "one device, step 3 of two runs");
    let layouts = [
        (Layout::Single, 1),
        (Layout::Ddp, 2),
        (Layout::Zero1, 4),
        (Layout::Fsdp { replicate: 1, ep: 1 }, 4),
        (Layout::Fsdp { replicate: 2, ep: 1 }, 4),
        (Layout::Ep, 2),
        (Layout::Zero1, 2),
        (Layout::Ep, 4),
        (Layout::Fsdp { replicate: 1, ep: 2 }, 4),
        (Layout::Fsdp { replicate: 1, ep: 1 }, 2),
        (Layout::Pp { ep: 1 }, 2),
        (Layout::Pp { ep: 2 }, 4),
    ];
    for (i, &(layout, w)) in layouts.iter().enumerate() {
        let saved = tmp(&format!("save-{i}"));
        run(layout, w, &model, &names, None, 2, &saved);
        for s in [2, 3] {
            assert_same(&step_dir(&reference, s), &step_dir(&saved, s), &format!("{layout:?} on {w} ranks, step {s}"));
        }
        // Loaded (step 3) by the next two layouts of the list, at their world sizes.
        for k in [1, 2] {
            let (into, w2) = layouts[(i + k) % layouts.len()];
            let loaded = tmp(&format!("load-{i}-{k}"));
            run(into, w2, &model, &names, Some(&saved), 0, &loaded);
            let what = format!("saved by {layout:?} on {w}, loaded by {into:?} on {w2}");
            assert_same(&step_dir(&saved, 3), &step_dir(&loaded, 3), &format!("{what}: saved again"));
            assert_same(&step_dir(&reference_4, 4), &step_dir(&loaded, 4), &format!("{what}: the next step"));
            assert_eq!(Reader::open(step_dir(&loaded, 3)).unwrap().metadata().world_size, w2);
            std::fs::remove_dir_all(&loaded).unwrap();
        }
        std::fs::remove_dir_all(&saved).unwrap();
    }
    std::fs::remove_dir_all(&reference).unwrap();
    std::fs::remove_dir_all(&reference_4).unwrap();
}

#[test]
fn a_model_of_other_hyper_parameters_is_refused_naming_the_first_differing_tensor() {
    let (config, model) = base();
    let names = StateNames::of(&model, &config).unwrap();
    let dir = tmp("other-config");
    run(Layout::Single, 1, &model, &names, None, 1, &dir);
    let reader = Reader::latest(&dir).unwrap().unwrap();
    let wider = config.clone().with_width(48);
    let other = wider.init::<B>(&Default::default());
    let other_names = StateNames::of(&other, &wider).unwrap();
    let before = other.embed.weight.val().into_data();
    let e = Holding::new(&other_names).load_module(&other, &reader).unwrap_err();
    assert_eq!(e, CheckpointError::Dcp(DcpError::Shape { tensor: "model.embed_tokens.weight".into(), checkpoint: vec![256, 64], expected: vec![256, 48] }));
    assert_eq!(e.to_string(), "tensor \"model.embed_tokens.weight\" has shape [256, 64] in the checkpoint, [256, 48] here");
    // Nothing half-loaded: the model passed in is unchanged.
    assert_eq!(other.embed.weight.val().into_data(), before);
    std::fs::remove_dir_all(&dir).unwrap();
}
