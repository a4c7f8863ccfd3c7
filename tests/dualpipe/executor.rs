//! One pipelined step equals one step on one device: a small residual MLP split into
//! stages, run by every schedule over 2, 4 and 8 ranks (reference-backend devices, one
//! thread per rank), gives the same loss (relative 1e-6) and every parameter the same
//! gradient (within 1e-5 of the tensor's largest value) as the unsplit model; a rank that
//! panics or stalls ends the step with an error naming it. The overlap hook (concurrent by
//! default, sequential, or the user's) changes nothing in the results; `optimize` equals an
//! optimizer step on the unsplit model; a measured timeline replayed with instant
//! communication is never slower than the run itself.

use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::tensor::{activation::tanh, backend::AutodiffBackend, Distribution, Tensor, TensorData};
use burn_dualpipe::executor::{Overlap, OverlapPair, Pipeline, PipelineError, PipelineStage, Sequential, Transfer};
use burn_dualpipe::schedule::{Instr, Schedule, ScheduleError, ScheduleKind};
use burn_dualpipe::{predict, Costs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

type B = Autodiff<NdArray>;
const WIDTH: usize = 16;

// Burn's derive needs the backend parameter to be named `B` (with another name it
// derives a parameter-free module).
#[derive(Module, Debug)]
struct Block<B: burn::tensor::backend::Backend> {
    linear: Linear<B>,
    /// Panics on inputs with this many rows, for the failure test.
    #[module(skip)]
    fail: Option<usize>,
    /// Sleeps this long in every forward, for the stall test.
    #[module(skip)]
    sleep_ms: u64,
}

impl<B: AutodiffBackend> PipelineStage<B, 2> for Block<B> {
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        if let Some(rows) = self.fail {
            assert!(x.dims()[0] != rows, "stage failure injected");
        }
        std::thread::sleep(Duration::from_millis(self.sleep_ms));
        tanh(self.linear.forward(x.clone())) + x
    }
}

fn blocks(n: usize) -> Vec<Block<B>> {
    let device = Default::default();
    (0..n).map(|_| Block { linear: LinearConfig::new(WIDTH, WIDTH).init(&device), fail: None, sleep_ms: 0 }).collect()
}

fn batch(m: usize) -> (Vec<Tensor<B, 2>>, Vec<TensorData>) {
    let device = Default::default();
    let xs = (0..m).map(|i| Tensor::random([3 + i % 2, WIDTH], Distribution::Normal(0.0, 1.0), &device)).collect::<Vec<_>>();
    let targets = xs.iter().map(|x: &Tensor<B, 2>| Tensor::<B, 2>::random(x.dims(), Distribution::Normal(0.0, 1.0), &device).into_data()).collect();
    (xs, targets)
}

fn mse(y: Tensor<B, 2>, target: &TensorData) -> Tensor<B, 1> {
    let t = Tensor::<B, 2>::from_data(target.clone(), &y.device());
    (y - t).powi_scalar(2).mean()
}

fn host(t: Tensor<NdArray, 2>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

fn check(kind: ScheduleKind, ranks: usize, m: usize) {
    check_with(kind, ranks, m, None::<Sequential>, Transfer::Host);
}

fn check_with(kind: ScheduleKind, ranks: usize, m: usize, overlap: Option<impl Overlap + 'static>, transfer: Transfer) {
    let what = format!("{kind} P={ranks} M={m}");
    let schedule = Schedule::new(kind, ranks, m).unwrap();
    let stages = blocks(schedule.stages());
    let (xs, targets) = batch(m);

    // The unsplit model on one device.
    let mut total = Tensor::<B, 1>::zeros([1], &Default::default());
    for (i, x) in xs.iter().enumerate() {
        let y = stages.iter().fold(x.clone(), |h, s| s.forward(h));
        total = total + mse(y, &targets[i]) / m as f64;
    }
    let want_loss = total.clone().into_scalar() as f64;
    let grads = total.backward();

    let mut pipeline = Pipeline::new(stages.clone(), vec![Default::default(); ranks], schedule).unwrap().with_transfer(transfer);
    if let Some(overlap) = overlap {
        pipeline = pipeline.with_overlap(overlap);
    }
    let out = pipeline.step(xs.clone(), |y, i| mse(y, &targets[i])).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!((out.loss - want_loss).abs() <= 1e-6 * want_loss.abs(), "{what}: loss {} vs {want_loss}", out.loss);
    assert_eq!(out.timeline.ranks.len(), ranks);

    for (s, stage) in stages.iter().enumerate() {
        let copies = out.grads.iter().filter(|c| c.stage == s).collect::<Vec<_>>();
        assert_eq!(copies.len(), if kind == ScheduleKind::DualPipe { 2 } else { 1 }, "{what}: copies of stage {s}");
        let weight = &stage.linear.weight;
        let bias = stage.linear.bias.as_ref().unwrap();
        let sum = |parts: Vec<Vec<f32>>| parts.into_iter().reduce(|a, b| a.iter().zip(b).map(|(x, y)| x + y).collect()).unwrap();
        let got_w = sum(copies.iter().map(|c| host(c.grads.get::<NdArray, 2>(weight.id).expect("weight gradient"))).collect());
        let got_b = sum(copies.iter().map(|c| host(c.grads.get::<NdArray, 1>(bias.id).expect("bias gradient").unsqueeze_dim(0))).collect());
        compare(&format!("{what}: stage {s} weight"), &got_w, &host(weight.grad(&grads).expect("gradient")));
        compare(&format!("{what}: stage {s} bias"), &got_b, &host(bias.grad(&grads).expect("gradient").unsqueeze_dim(0)));
    }
}

fn compare(what: &str, got: &[f32], want: &[f32]) {
    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
    let err = got.iter().zip(want).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    assert!(scale > 0.0 && err <= 1e-5 * scale, "{what}: gradient error {err:e} (scale {scale:e})");
}

#[test]
fn pipelined_step_equals_single_device_step() {
    for kind in ScheduleKind::ALL {
        for ranks in [2, 4, 8] {
            let m = kind.min_micro_batches(ranks).max(2 * ranks);
            check(kind, ranks, m);
        }
    }
}

#[test]
fn a_failing_or_stalled_rank_is_named() {
    let schedule = Schedule::new(ScheduleKind::OneFOneB, 4, 4).unwrap();
    let (xs, targets) = batch(4);
    let mut stages = blocks(4);
    stages[2].fail = Some(4); // micro-batch 1 has 4 rows
    let pipeline = Pipeline::new(stages, vec![Default::default(); 4], schedule.clone()).unwrap();
    match pipeline.step(xs.clone(), |y, i| mse(y, &targets[i])) {
        Err(PipelineError::RankPanicked { rank: 2, message }) => assert!(message.contains("stage failure injected"), "{message}"),
        other => panic!("expected rank 2 to fail, got {other:?}"),
    }

    let mut stages = blocks(4);
    stages[3].sleep_ms = 1500;
    let pipeline = Pipeline::new(stages, vec![Default::default(); 4], schedule.clone()).unwrap().with_timeout(Duration::from_millis(500));
    match pipeline.step(xs.clone(), |y, i| mse(y, &targets[i])) {
        Err(PipelineError::Timeout { from: 3, .. }) => {}
        other => panic!("expected a timeout naming rank 3 as stalled, got {other:?}"),
    }

    assert!(matches!(Pipeline::new(blocks(3), vec![Default::default(); 4], schedule.clone()), Err(PipelineError::Mismatch { expected: 4, got: 3, .. })));
    assert!(matches!(Pipeline::new(blocks(4), vec![Default::default(); 2], schedule), Err(PipelineError::Mismatch { expected: 4, got: 2, .. })));
}

/// Counts the pairs it runs, backward first.
struct Counting(Arc<AtomicUsize>);

impl Overlap for Counting {
    fn run(&self, pair: OverlapPair<'_>) {
        self.0.fetch_add(1, Ordering::SeqCst);
        (pair.run_backward)();
        (pair.run_forward)();
    }
}

/// Forgets the backward.
struct Forgetful;

impl Overlap for Forgetful {
    fn run(&self, pair: OverlapPair<'_>) {
        (pair.run_forward)();
    }
}

#[test]
fn overlap_hooks_change_nothing() {
    for kind in [ScheduleKind::DualPipe, ScheduleKind::DualPipeV] {
        check_with(kind, 4, 8, Some(Sequential), Transfer::Host);
        let pairs = Arc::new(AtomicUsize::new(0));
        check_with(kind, 4, 8, Some(Counting(pairs.clone())), Transfer::Device);
        let want = Schedule::new(kind, 4, 8).unwrap().programs.iter().flatten().filter(|i| matches!(i, Instr::ForwardBackward { .. })).count();
        assert!(want > 0, "{kind} overlaps some pairs");
        assert_eq!(pairs.load(Ordering::SeqCst), want, "{kind}: the hook ran every F&B pair");
    }
    let schedule = Schedule::new(ScheduleKind::DualPipe, 2, 4).unwrap();
    let (xs, targets) = batch(4);
    let pipeline = Pipeline::new(blocks(2), vec![Default::default(); 2], schedule).unwrap().with_overlap(Forgetful);
    match pipeline.step(xs, |y, i| mse(y, &targets[i])) {
        Err(PipelineError::RankPanicked { message, .. }) => assert!(message.contains("did not run the backward"), "{message}"),
        other => panic!("expected the forgotten backward to be named, got {other:?}"),
    }
}

#[test]
fn an_invalid_schedule_is_refused() {
    let mut schedule = Schedule::new(ScheduleKind::OneFOneB, 2, 2).unwrap();
    let dropped = schedule.programs[1].iter().position(|i| matches!(i, Instr::Recv { .. })).unwrap();
    schedule.programs[1].remove(dropped);
    match Pipeline::new(blocks(2), vec![Default::default(); 2], schedule) {
        Err(PipelineError::Schedule(ScheduleError::Invalid { rank: 1, .. })) => {}
        Err(other) => panic!("expected rank 1's program to be refused, got {other}"),
        Ok(_) => panic!("expected rank 1's program to be refused"),
    }
}

#[test]
fn optimize_equals_a_step_on_the_unsplit_model() {
    let (m, lr) = (8, 0.1);
    let schedule = Schedule::new(ScheduleKind::DualPipe, 4, m).unwrap();
    let (xs, targets) = batch(m);
    // Lazy parameters, untouched before the pipeline takes them: both ranks' copies of a
    // stage must start from the weights the stage module has.
    let mut pipeline = Pipeline::new(blocks(4), vec![Default::default(); 4], schedule).unwrap();
    let stages = pipeline.stages().to_vec();

    let mut total = Tensor::<B, 1>::zeros([1], &Default::default());
    for (i, x) in xs.iter().enumerate() {
        let y = stages.iter().fold(x.clone(), |h, s| s.forward(h));
        total = total + mse(y, &targets[i]) / m as f64;
    }
    let want_loss = total.clone().into_scalar() as f64;
    let mut grads = total.backward();
    let mut sgd = SgdConfig::new().init::<B, Block<B>>();
    let want: Vec<Block<B>> = stages.iter().map(|s| sgd.step(lr, s.clone(), GradientsParams::from_module(&mut grads, s))).collect();

    let out = pipeline.step(xs, |y, i| mse(y, &targets[i])).unwrap();
    assert!((out.loss - want_loss).abs() <= 1e-6 * want_loss, "loss {} vs {want_loss}", out.loss);
    let mut sgd = SgdConfig::new().init::<B, Block<B>>();
    pipeline.optimize(&mut sgd, lr, out.grads);
    for (s, (got, want)) in pipeline.stages().iter().zip(&want).enumerate() {
        let got_w = host(got.linear.weight.val().inner());
        let want_w = host(want.linear.weight.val().inner());
        let err = got_w.iter().zip(&want_w).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(err <= 1e-6, "stage {s}: weights after the step differ by {err:e}");
    }
}

#[test]
fn a_measured_step_is_never_faster_than_its_replay() {
    for kind in ScheduleKind::ALL {
        let schedule = Schedule::new(kind, 4, 8).unwrap();
        let (xs, targets) = batch(8);
        let pipeline = Pipeline::new(blocks(schedule.stages()), vec![Default::default(); 4], schedule.clone()).unwrap();
        let measured = pipeline.step(xs, |y, i| mse(y, &targets[i])).unwrap().timeline;
        let computes = schedule.programs.iter().map(|p| p.iter().filter(|i| i.is_compute()).count()).collect::<Vec<_>>();
        assert_eq!(measured.ranks.iter().map(Vec::len).collect::<Vec<_>>(), computes, "{kind}: one span per compute instruction");
        let replay = predict(&schedule, &measured).unwrap();
        for r in 0..4 {
            assert!((replay.busy(r) - measured.busy(r)).abs() <= 1e-9, "{kind}: rank {r} busy time kept");
        }
        assert!(replay.makespan() <= measured.makespan() + 1e-9, "{kind}: replay {} > measured {}", replay.makespan(), measured.makespan());
        let costs = Costs::measured(&measured);
        assert!(costs.forward > 0.0 && costs.backward > 0.0, "{kind}: {costs:?}");
    }
}

/// Two wgpu devices (distinct clients; lavapipe on a CPU machine), activations and
/// gradients moved through the host: the same loss and gradients as the unsplit model on
/// one of them, the gradients gathered on the stages' device by `stage_grads`.
#[test]
fn two_wgpu_devices_give_the_unsplit_step() {
    use burn::backend::wgpu::{Wgpu, WgpuDevice};
    type W = Autodiff<Wgpu>;
    let device = WgpuDevice::DefaultDevice;
    let (m, ranks) = (4, 2);
    let schedule = Schedule::new(ScheduleKind::DualPipe, ranks, m).unwrap();
    let stages: Vec<Block<W>> = (0..ranks).map(|_| Block { linear: LinearConfig::new(WIDTH, WIDTH).init(&device), fail: None, sleep_ms: 0 }).collect();
    let xs: Vec<Tensor<W, 2>> = (0..m).map(|_| Tensor::random([5, WIDTH], Distribution::Normal(0.0, 1.0), &device)).collect();
    let targets: Vec<TensorData> = (0..m).map(|_| Tensor::<W, 2>::random([5, WIDTH], Distribution::Normal(0.0, 1.0), &device).into_data()).collect();
    let loss = |y: Tensor<W, 2>, i: usize| (y.clone() - Tensor::<W, 2>::from_data(targets[i].clone(), &y.device())).powi_scalar(2).mean();

    let pipeline = Pipeline::new(stages, vec![WgpuDevice::DefaultDevice, WgpuDevice::Cpu], schedule).unwrap();
    let out = pipeline.step(xs.clone(), loss).unwrap();
    let grads = pipeline.stage_grads(out.grads);

    let mut total = Tensor::<W, 1>::zeros([1], &device);
    for (i, x) in xs.iter().enumerate() {
        let y = pipeline.stages().iter().fold(x.clone(), |h, s| s.forward(h));
        total = total + loss(y, i) / m as f64;
    }
    let want_loss = total.clone().into_scalar() as f64;
    assert!((out.loss - want_loss).abs() <= 1e-5 * want_loss, "loss {} vs {want_loss}", out.loss);
    let want = total.backward();
    for (s, stage) in pipeline.stages().iter().enumerate() {
        let w = &stage.linear.weight;
        let got: Vec<f32> = grads[s].get::<Wgpu, 2>(w.id).expect("weight gradient").into_data().to_vec().unwrap();
        let want: Vec<f32> = w.grad(&want).unwrap().into_data().to_vec().unwrap();
        compare(&format!("wgpu stage {s} weight"), &got, &want);
    }
}
