//! Data parallelism against one device: K optimizer steps of DDP, ZeRO-1, hybrid
//! ZeRO-1, FSDP and HSDP (hybrid: `[dp_replicate 2, dp_shard W/2]`) on W ranks
//! (threads here, MPI processes in `mpi_*`) equal K steps of one device on the
//! concatenated batch; ZeRO-1 holds about 1/W of the optimizer state, FSDP about 1/W of
//! the parameters, gradients and state; the BF16-moment
//! AdamW stores BF16 and stays close to f32.

use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::{Autodiff, Flex, NdArray};
use burn::module::{AutodiffModule, Module};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::optim::{AdamWConfig as BurnAdamW, GradientsParams, Optimizer};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{activation::gelu, DType, ElementConversion, Tensor, TensorData};
use burn_comm::{launch, Comm, Transport};
use burn_dp::{layout, memory, AdamWConfig, Ddp, DpError, Fsdp, FsdpBackend, Layout, MomentDType, ShardGroup, Zero1};

type B = Autodiff<NdArray>;
const STEPS: usize = 3;
const ROWS: usize = 3; // per rank and step
const LR: f64 = 1e-2;

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    up: Linear<B>,
    norm: LayerNorm<B>,
    down: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    pub fn new(d_in: usize, hidden: usize, device: &B::Device) -> Self {
        Mlp { up: LinearConfig::new(d_in, hidden).init(device), norm: LayerNormConfig::new(hidden).init(device), down: LinearConfig::new(hidden, 2).init(device) }
    }

    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.down.forward(gelu(self.norm.forward(self.up.forward(x))))
    }
}

/// Deterministic, non-zero, different per rank, step and element.
fn batch<B: Backend>(step: usize, first_row: usize, rows: usize, d: usize, device: &B::Device) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let v = |r: usize, j: usize, k: f32| ((r * 31 + j * 7 + step * 13) as f32 * 0.173 + k).sin() + 0.05;
    let x: Vec<f32> = (first_row..first_row + rows).flat_map(|r| (0..d).map(move |j| v(r, j, 0.3))).collect();
    let y: Vec<f32> = (first_row..first_row + rows).flat_map(|r| (0..2).map(move |j| v(r, j, 1.1))).collect();
    (Tensor::from_data(TensorData::new(x, [rows, d]), device), Tensor::from_data(TensorData::new(y, [rows, 2]), device))
}

fn loss<B: Backend>(m: &Mlp<B>, x: Tensor<B, 2>, y: Tensor<B, 2>) -> Tensor<B, 1> {
    (m.forward(x) - y).square().mean()
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Ddp,
    Zero1,
    /// `[dp_replicate 2, dp_shard W/2]`: ZeRO-1 within each half, averaged across.
    Hybrid,
    /// Each of the MLP's three layers an FSDP unit.
    Fsdp,
    /// `[dp_replicate 2, dp_shard W/2]`: FSDP within each half, averaged across.
    Hsdp,
}

/// The MLP with each layer an FSDP unit (gathered just before its forward).
#[derive(Module, Debug)]
pub struct ShardedMlp<B: Backend> {
    up: Fsdp<B, Linear<B>>,
    norm: Fsdp<B, LayerNorm<B>>,
    down: Fsdp<B, Linear<B>>,
}

impl<B: FsdpBackend> ShardedMlp<B> {
    fn new(m: Mlp<B>, shard: &Comm, replicas: Option<&Comm>) -> Result<Self, DpError> {
        fn unit<B: Backend, M: Module<B>>(m: M, shard: &Comm, replicas: Option<&Comm>) -> Result<Fsdp<B, M>, DpError> {
            match replicas {
                None => Fsdp::new(m, shard.clone()),
                Some(r) => Fsdp::hybrid(m, shard.clone(), r.clone()),
            }
        }
        Ok(ShardedMlp { up: unit(m.up, shard, replicas)?, norm: unit(m.norm, shard, replicas)?, down: unit(m.down, shard, replicas)? })
    }

    fn loss(&self, x: Tensor<B, 2>, y: Tensor<B, 2>) -> Result<Tensor<B, 1>, DpError> {
        let h = self.up.gather()?.forward(x);
        let h = gelu(self.norm.gather()?.forward(h));
        let out = self.down.gather()?.forward(h);
        Ok((out - y).square().mean())
    }

    fn unshard(self) -> Result<Mlp<B>, DpError> {
        Ok(Mlp { up: self.up.unshard()?, norm: self.norm.unshard()?, down: self.down.unshard()? })
    }
}

/// What a run leaves: the loss of each step (this rank's batch) and every parameter.
pub struct Trained {
    pub losses: Vec<f32>,
    pub params: Vec<f32>,
    pub optim_bytes: usize,
    /// Bytes of the trainable parameters this rank holds at rest.
    pub param_bytes: usize,
}

fn flat_params<A: AutodiffBackend, M: AutodiffModule<A>>(m: &M) -> Vec<f32> {
    let l = Layout::of::<A, M>(m);
    layout::take_values::<A, M>(m, &l, 0..l.len()).into_data().to_vec().unwrap()
}

fn record_bytes<A: Backend, R: burn::record::Record<A>>(r: R) -> usize {
    BinBytesRecorder::<FullPrecisionSettings>::default().record(r, ()).unwrap().len()
}

/// One rank of a data-parallel run (also the reference: one rank holding every row).
pub fn run_rank(mode: Mode, comm: &Comm, model: Mlp<B>, d: usize) -> Result<Trained, DpError> {
    let device = Default::default();
    let (w, r) = (comm.world_size(), comm.rank());
    let adamw = BurnAdamW::new().with_weight_decay(0.1);
    let mut model = model;
    let mut losses = Vec::new();
    let optim_bytes;
    match mode {
        Mode::Ddp => {
            let ddp = Ddp::new(comm.clone()).with_bucket_bytes(64 * 4); // several buckets
            let mut optim = adamw.init::<B, Mlp<B>>();
            for step in 0..STEPS {
                let (x, y) = batch::<B>(step, r * ROWS, ROWS, d, &device);
                let l = loss(&model, x, y);
                losses.push(l.clone().into_scalar());
                let grads = ddp.sync(&model, GradientsParams::from_grads(l.backward(), &model))?;
                model = optim.step(LR, model, grads);
            }
            optim_bytes = record_bytes(optim.to_record());
        }
        Mode::Zero1 | Mode::Hybrid => {
            let mut zero = if mode == Mode::Hybrid {
                let mesh = burn_comm::DeviceMesh::new(comm, &[("dp_replicate", 2), ("dp_shard", w / 2)])?;
                Zero1::new(adamw.init::<B, Mlp<B>>(), mesh.comm("dp_shard")?.clone()).with_replicas(mesh.comm("dp_replicate")?.clone())
            } else {
                Zero1::new(adamw.init::<B, Mlp<B>>(), comm.clone())
            };
            for step in 0..STEPS {
                let (x, y) = batch::<B>(step, r * ROWS, ROWS, d, &device);
                let l = loss(&model, x, y);
                losses.push(l.clone().into_scalar());
                let grads = GradientsParams::from_grads(l.backward(), &model);
                model = zero.step(LR, model, grads)?;
            }
            optim_bytes = record_bytes(zero.optimizer().to_record());
        }
        Mode::Fsdp | Mode::Hsdp => return run_fsdp(mode, comm, model, d),
    }
    Ok(Trained { losses, param_bytes: memory::param_bytes(&model), params: flat_params(&model), optim_bytes })
}

/// One rank of FSDP or HSDP, on any autodiff backend (checkpointing strategies included).
pub fn run_fsdp<A: AutodiffBackend + FsdpBackend>(mode: Mode, comm: &Comm, model: Mlp<A>, d: usize) -> Result<Trained, DpError> {
    let device = Default::default();
    let (w, r) = (comm.world_size(), comm.rank());
    let mut sharded = if mode == Mode::Hsdp {
        let mesh = burn_comm::DeviceMesh::new(comm, &[("dp_replicate", 2), ("dp_shard", w / 2)])?;
        let replicas = mesh.comm("dp_replicate")?;
        ShardedMlp::new(model, mesh.comm("dp_shard")?, Some(replicas))?
    } else {
        ShardedMlp::new(model, comm, None)?
    };
    let param_bytes = memory::param_bytes(&sharded);
    let mut optim = BurnAdamW::new().with_weight_decay(0.1).init::<A, ShardedMlp<A>>();
    let mut losses = Vec::new();
    for step in 0..STEPS {
        let (x, y) = batch::<A>(step, r * ROWS, ROWS, d, &device);
        let l = sharded.loss(x, y)?;
        losses.push(l.clone().into_scalar().elem());
        let grads = GradientsParams::from_grads(l.backward(), &sharded);
        sharded = optim.step(LR, sharded, grads);
    }
    let optim_bytes = record_bytes(optim.to_record());
    let model = sharded.unshard()?;
    Ok(Trained { losses, params: flat_params(&model), optim_bytes, param_bytes })
}

/// One device on the concatenated batch of `world` ranks.
pub fn reference(model: Mlp<B>, world: usize, d: usize) -> Trained {
    let device = Default::default();
    let mut optim = BurnAdamW::new().with_weight_decay(0.1).init::<B, Mlp<B>>();
    let mut model = model;
    let mut losses = Vec::new();
    for step in 0..STEPS {
        let (x, y) = batch::<B>(step, 0, world * ROWS, d, &device);
        let l = loss(&model, x, y);
        losses.push(l.clone().into_scalar());
        model = optim.step(LR, model.clone(), GradientsParams::from_grads(l.backward(), &model));
    }
    Trained { losses, param_bytes: memory::param_bytes(&model), params: flat_params(&model), optim_bytes: record_bytes(optim.to_record()) }
}

/// Checks the ranks' runs against the reference: the mean of the ranks' losses each step
/// (relative 1e-5) and every parameter on every rank (1e-5 of the largest value).
pub fn compare(what: &str, reference: &Trained, ranks: &[Trained]) {
    for step in 0..STEPS {
        let mean = ranks.iter().map(|t| t.losses[step]).sum::<f32>() / ranks.len() as f32;
        let want = reference.losses[step];
        assert!((mean - want).abs() <= 1e-5 * want.abs(), "{what}: step {step} loss {mean}, one device {want}");
    }
    let scale = reference.params.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (r, t) in ranks.iter().enumerate() {
        assert_eq!(t.params.len(), reference.params.len(), "{what}: rank {r} parameters");
        for (i, (a, b)) in t.params.iter().zip(&reference.params).enumerate() {
            assert!((a - b).abs() <= 1e-5 * scale, "{what}: rank {r} parameter element {i} is {a}, one device {b} (scale {scale})");
        }
    }
}

pub fn model<A: AutodiffBackend>(d: usize) -> Mlp<A> {
    seeded_mlp(2024, d, 24)
}

/// The MLP drawn from `seed`. A backend draws from one random stream per process and the
/// tests run in parallel, so seeding and drawing hold one lock: no other test's draw
/// falls between them (one did: a reference drawn from other weights than its ranks').
/// Burn draws weights lazily, at first use: fork draws them now, so that the ranks'
/// replicas (forks of this one) hold the same values.
fn seeded_mlp<A: Backend>(seed: u64, d_in: usize, hidden: usize) -> Mlp<A> {
    static DRAW: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _draw = DRAW.lock().unwrap_or_else(|e| e.into_inner());
    let device = Default::default();
    A::seed(&device, seed);
    Mlp::new(d_in, hidden, &device).fork(&device)
}

#[test]
fn ddp_zero1_fsdp_and_hybrids_on_threads_equal_one_device() {
    let d = 8;
    for world in [2, 4] {
        let m = model(d);
        let reference = reference(m.clone(), world, d);
        for mode in [Mode::Ddp, Mode::Zero1, Mode::Hybrid, Mode::Fsdp, Mode::Hsdp] {
            let ranks = launch(Comm::group(world, Transport::Host), |comm| run_rank(mode, &comm, m.clone().fork(&Default::default()), d)).unwrap();
            compare(&format!("{mode:?} on {world} threads"), &reference, &ranks);
            if mode == Mode::Fsdp {
                check_fsdp_bytes(world, &reference, &ranks);
            }
            if mode == Mode::Zero1 {
                // Each rank holds the state of its shard only: together about one copy.
                let total: usize = ranks.iter().map(|t| t.optim_bytes).sum();
                let most = ranks.iter().map(|t| t.optim_bytes).max().unwrap();
                eprintln!(
                    "ZeRO-1 on {world} ranks: optimizer record bytes per rank {:?}, one device {}",
                    ranks.iter().map(|t| t.optim_bytes).collect::<Vec<_>>(),
                    reference.optim_bytes
                );
                assert!(total <= reference.optim_bytes + 512 * world, "ZeRO-1 state {total} B over {world} ranks, one copy is {}", reference.optim_bytes);
                assert!(most < reference.optim_bytes * 3 / 4, "the largest shard holds {most} of {} B", reference.optim_bytes);
            }
        }
    }
}

/// FSDP ranks hold 1/W of the parameters and of the optimizer state (plus the units'
/// one-element placeholders and their records' framing).
fn check_fsdp_bytes(world: usize, reference: &Trained, ranks: &[Trained]) {
    eprintln!(
        "FSDP on {world} ranks: parameter bytes per rank {:?}, optimizer record bytes {:?}; \
         one device {} and {}",
        ranks.iter().map(|t| t.param_bytes).collect::<Vec<_>>(),
        ranks.iter().map(|t| t.optim_bytes).collect::<Vec<_>>(),
        reference.param_bytes,
        reference.optim_bytes
    );
    for (r, t) in ranks.iter().enumerate() {
        // Three units: at most one element more than an even share each.
        assert!(t.param_bytes <= reference.param_bytes / world + 3 * 4, "rank {r} holds {} B of parameters, 1/{world} of {} B is the share", t.param_bytes, reference.param_bytes);
        assert!(
            t.optim_bytes < reference.optim_bytes / world + 1024,
            "rank {r} holds {} B of optimizer state, 1/{world} of {} B is the share",
            t.optim_bytes,
            reference.optim_bytes
        );
    }
}

/// Bytes each of 2 ranks sends over an FSDP run of the MLP on backend `A`.
fn fsdp_sent<A: AutodiffBackend + FsdpBackend>(d: usize) -> (Vec<Trained>, Vec<u64>) {
    let m = model::<A>(d);
    let ranks = launch(Comm::group(2, Transport::Host), |comm| {
        let sent = comm.sent_bytes();
        let t = run_fsdp(Mode::Fsdp, &comm, m.clone().fork(&Default::default()), d)?;
        Ok::<_, DpError>((t, comm.sent_bytes() - sent))
    })
    .unwrap();
    ranks.into_iter().unzip()
}

#[test]
fn fsdp_under_balanced_checkpointing_regathers_and_equals_one_device() {
    type C = Autodiff<NdArray, BalancedCheckpointing>;
    let d = 8;
    let reference = reference(model(d), 2, d);
    let (ranks, balanced) = fsdp_sent::<C>(d);
    compare("FSDP, balanced checkpointing, 2 threads", &reference, &ranks);
    let (_, kept) = fsdp_sent::<B>(d);
    eprintln!("FSDP on 2 threads: bytes sent per rank {kept:?}, balanced checkpointing {balanced:?}");
    // Burn's default keeps the gathered values for the backward; balanced checkpointing
    // gathers again those the backward needs: the norm's (48 values) and the down
    // layer's (50), whose inputs need gradients; not the up layer's, whose input (the
    // batch) needs none. Each rank sends the other its half: (24 + 25) × 4 B a step.
    for (b, k) in balanced.iter().zip(&kept) {
        assert_eq!(b - k, STEPS as u64 * (24 + 25) * 4, "balanced {b} B, kept {k} B");
    }
}

#[test]
fn fsdp_shard_of_another_world_size_is_refused_naming_the_sizes() {
    let d = 8;
    let m = model::<B>(d);
    let two = launch(Comm::group(2, Transport::Host), |comm| {
        let f = Fsdp::new(m.up.clone().fork(&Default::default()), comm)?;
        let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
        Ok::<_, DpError>(recorder.record(f.into_record(), ()).unwrap())
    })
    .unwrap();
    let errors = launch(Comm::group(4, Transport::Host), |comm| {
        let f = Fsdp::new(m.up.clone().fork(&Default::default()), comm)?;
        let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
        let f = f.load_record(recorder.load(two[0].clone(), &Default::default()).unwrap());
        Ok::<_, DpError>(f.gather().err().map(|e| e.to_string()))
    })
    .unwrap();
    let e = errors[0].as_ref().expect("a shard of 2 ranks refused on 4");
    // The up layer: 8 × 24 + 24 = 216 values, 108 per rank on 2, 54 on 4.
    assert!(e.contains("rank 0 of 4 holds an FSDP shard (group 0) of 108 elements, but 216 elements over 4 ranks give it 54"), "{e}");
}

#[test]
fn fsdp_groups_that_do_not_partition_the_parameters_are_refused_naming_them() {
    let m = model::<B>(8);
    let comm = Comm::group(1, Transport::Host).remove(0);
    let (weight, bias) = (m.up.weight.id, m.up.bias.as_ref().expect("a bias").id);
    let refused = |groups: Vec<ShardGroup>| Fsdp::grouped(m.up.clone(), groups).err().map(|e| e.to_string()).expect("refused");
    let group = || ShardGroup::new(comm.clone());
    let e = refused(vec![group().with_params([weight])]);
    assert!(e.contains(&format!("trainable parameter {bias} (shape [24]) is in no FSDP shard group")), "{e}");
    let e = refused(vec![group().with_params([weight]), group().with_params([weight, bias])]);
    assert!(e.contains(&format!("shard group 1 names parameter {weight}, which an earlier group holds")), "{e}");
    let stranger = m.down.weight.id;
    let e = refused(vec![group().with_params([stranger]), group()]);
    assert!(e.contains(&format!("group 0 names parameter {stranger}, which is not a trainable parameter")), "{e}");
    let e = refused(vec![group().with_params([weight, bias]), group()]);
    assert!(e.contains("shard group 1 has no trainable parameter"), "{e}");
    let e = refused(vec![group(), group()]);
    assert!(e.contains("two FSDP shard groups take the remaining parameters"), "{e}");
    let e = refused(vec![group().with_gradient_divide_factor(0)]);
    assert!(e.contains("a gradient divide factor of 0"), "{e}");
    // Two groups that do partition it gather the same module as one group.
    let two = Fsdp::grouped(m.up.clone(), vec![group().with_params([bias]), group()]).unwrap();
    assert_eq!(two.num_groups(), 2);
    assert_eq!(two.layout(0).ids, vec![bias]);
    let whole = two.unshard().unwrap();
    assert_eq!(whole.weight.val().into_data(), m.up.weight.val().into_data());
    assert_eq!(whole.bias.unwrap().val().into_data(), m.up.bias.as_ref().unwrap().val().into_data());
}

#[test]
fn partition_cuts_at_parameter_boundaries_into_about_equal_parts() {
    let m = model(8);
    let l = Layout::of::<B, _>(&m);
    for parts in 1..=6 {
        let bounds = l.partition(parts);
        assert_eq!(bounds.len(), parts + 1);
        assert_eq!((bounds[0], bounds[parts]), (0, l.numel()));
        assert!(bounds.windows(2).all(|w| w[0] <= w[1]), "{bounds:?}");
        assert!(bounds.iter().all(|b| l.offsets.contains(b)), "{bounds:?} off the parameter offsets {:?}", l.offsets);
        let ranges: Vec<_> = (0..parts).map(|r| l.params_in(bounds[r], bounds[r + 1])).collect();
        assert_eq!(ranges.iter().map(|r| r.len()).sum::<usize>(), l.len(), "every parameter in one part: {ranges:?}");
    }
    // Two parts of the 8→24→2 MLP (314 values): the up weight (192) against the rest.
    assert_eq!(l.partition(2), vec![0, 192, 314]);
}

#[test]
fn ranks_with_different_modules_fail_naming_the_shapes() {
    let errors = launch(Comm::group(2, Transport::Host), |comm| {
        let device = Default::default();
        let m = seeded_mlp::<B>(comm.rank() as u64, 8, if comm.rank() == 0 { 24 } else { 16 });
        let (x, y) = batch::<B>(0, 0, 2, 8, &device);
        let l = loss(&m, x, y);
        let grads = GradientsParams::from_grads(l.backward(), &m);
        match Ddp::new(comm.clone()).sync(&m, grads) {
            Ok(_) => Ok::<_, DpError>(None),
            Err(e) => Ok(Some(e.to_string())),
        }
    })
    .unwrap();
    let e = errors[0].as_ref().expect("rank 0 refuses");
    assert!(e.contains("parameter 0 has shape [8, 24] here, [8, 16] on rank 1"), "{e}");
}

fn adamw_run<Be: AutodiffBackend>(config: Option<AdamWConfig>) -> (Vec<f32>, Mlp<Be>) {
    let device = Default::default();
    let mut model = seeded_mlp::<Be>(7, 8, 24);
    let mut losses = Vec::new();
    let burn = BurnAdamW::new().with_beta_2(0.95).with_epsilon(1e-8).with_weight_decay(0.1);
    let mut ours = config.map(|c| c.init::<Be, Mlp<Be>>());
    let mut theirs = burn.init::<Be, Mlp<Be>>();
    for step in 0..20 {
        let (x, y) = batch::<Be>(step % 4, 0, 8, 8, &device);
        let l = loss(&model, x, y);
        losses.push(l.clone().into_scalar().to_string().parse().unwrap());
        let grads = GradientsParams::from_grads(l.backward(), &model);
        model = match ours.as_mut() {
            Some(o) => o.step(LR, model, grads),
            None => theirs.step(LR, model, grads),
        };
    }
    (losses, model)
}

#[test]
fn adamw_with_f32_moments_equals_burns_adamw() {
    let (burn, _) = adamw_run::<B>(None);
    let (ours, _) = adamw_run::<B>(Some(AdamWConfig::new().with_moments(MomentDType::F32)));
    for (i, (a, b)) in ours.iter().zip(&burn).enumerate() {
        assert!((a - b).abs() <= 1e-6 * b.abs(), "step {i}: {a} vs Burn's {b}");
    }
}

#[test]
fn adamw_bf16_moments_are_stored_in_bf16_and_track_f32() {
    type F = Autodiff<Flex>;
    let (f32_losses, _) = adamw_run::<F>(Some(AdamWConfig::new().with_moments(MomentDType::F32)));
    let (bf16_losses, _) = adamw_run::<F>(Some(AdamWConfig::new()));
    let last = f32_losses.len() - 1;
    let rel = (bf16_losses[last] - f32_losses[last]).abs() / f32_losses[last];
    eprintln!("20 AdamW steps: final loss f32 moments {}, BF16 moments {}, relative difference {rel:.2e}", f32_losses[last], bf16_losses[last]);
    assert!(f32_losses[last] < f32_losses[0] * 0.8, "training did not progress: {f32_losses:?}");
    // BF16 keeps 8 bits of mantissa (relative rounding 2^-9 per step on the moments).
    assert!(rel < 2e-2, "BF16 moments drift from f32 by {rel}");

    // The stored state is BF16.
    let device = Default::default();
    let model = seeded_mlp::<F>(1, 8, 24);
    let (x, y) = batch::<F>(0, 0, 4, 8, &device);
    let l = loss(&model, x, y);
    let grads = GradientsParams::from_grads(l.backward(), &model);
    let param = model.up.weight.clone();
    let grad = grads.get::<Flex, 2>(param.id).unwrap();
    let opt = AdamWConfig::new();
    let (_, state) = burn::optim::SimpleOptimizer::<Flex>::step(&burn_dp::AdamW::from_config(&opt), LR, param.val().inner(), grad, None);
    let state = state.unwrap();
    assert_eq!((state.moment_1.dtype(), state.moment_2.dtype()), (DType::BF16, DType::BF16));
    let f32_state = burn::optim::SimpleOptimizer::<Flex>::step(
        &burn_dp::AdamW::from_config(&AdamWConfig::new().with_moments(MomentDType::F32)),
        LR,
        param.val().inner(),
        grads.get::<Flex, 2>(param.id).unwrap(),
        None,
    )
    .1
    .unwrap();
    assert_eq!(f32_state.moment_1.dtype(), DType::F32);
}

#[test]
fn bf16_moments_on_a_backend_without_bf16_are_refused_up_front() {
    let e = AdamWConfig::new().check::<NdArray>(&Default::default()).unwrap_err().to_string();
    assert!(e.contains("BF16") && e.contains("does not store"), "{e}");
    AdamWConfig::new().check::<Flex>(&Default::default()).unwrap();
}

/// The same runs as MPI processes: each `mpi_worker_*` is one rank's program, started by
/// the test beside it under `mpirun -np 2` and `-np 4` (`#[ignore]`d: alone, outside
/// `mpirun`, it would be a world of one).
#[cfg(feature = "mpi")]
mod mpi {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ddp_zero1_fsdp_and_hybrids_across_mpi_processes_equal_one_device() {
        assert!(burn_comm::mpirun::available(), "mpirun not found: tests/run.sh installs OpenMPI (openmpi-bin)");
        let exe = std::env::current_exe().unwrap();
        for ranks in [2, 4] {
            let args = ["--ignored", "--exact", "mpi::mpi_worker_dp", "--nocapture", "--test-threads=1"];
            let job = burn_comm::mpirun::run(ranks, &exe, &args, &[], Duration::from_secs(300)).unwrap_or_else(|job| panic!("hung past 300 s:\n{}", job.output));
            assert!(job.success, "{ranks} processes failed:\n{}", job.output);
            for r in 0..ranks {
                assert!(job.output.contains(&format!("rank {r} of {ranks}: ok")), "rank {r} did not finish:\n{}", job.output);
            }
        }
    }

    #[test]
    #[ignore = "an MPI rank: run by ddp_zero1_fsdp_and_hybrids_across_mpi_processes_equal_one_device under mpirun"]
    fn mpi_worker_dp() {
        burn_comm::mpi::launch(Duration::from_secs(60), |comm| {
            let (d, world) = (8, comm.world_size());
            // Every process builds the same model from the seed.
            let reference = reference(model(d), world, d);
            for mode in [Mode::Ddp, Mode::Zero1, Mode::Hybrid, Mode::Fsdp, Mode::Hsdp] {
                let mine = run_rank(mode, &comm, model(d), d)?;
                let run = (mine.losses, mine.params, mine.optim_bytes, mine.param_bytes);
                let ranks: Vec<Trained> =
                    comm.all_gather_host("runs", run)?.into_iter().map(|(losses, params, optim_bytes, param_bytes)| Trained { losses, params, optim_bytes, param_bytes }).collect();
                compare(&format!("{mode:?} on {world} MPI processes"), &reference, &ranks);
                if mode == Mode::Fsdp {
                    check_fsdp_bytes(world, &reference, &ranks);
                }
            }
            println!("rank {} of {world}: ok", comm.rank());
            Ok::<_, DpError>(())
        })
        .unwrap();
    }
}
