//! One pipelined step equals one step on one device: a small residual MLP split into
//! stages, run by every schedule over 2, 4 and 8 ranks (reference-backend devices, one
//! thread per rank), gives the same loss (relative 1e-6) and every parameter the same
//! gradient (within 1e-5 of the tensor's largest value) as the unsplit model; a rank that
//! panics or stalls ends the step with an error naming it.

use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{activation::tanh, Distribution, Tensor, TensorData};
use burn_dualpipe::executor::{Pipeline, PipelineError, PipelineStage};
use burn_dualpipe::schedule::{Schedule, ScheduleKind};
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

impl PipelineStage<B, 2> for Block<B> {
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

    let pipeline = Pipeline::new(stages.clone(), vec![Default::default(); ranks], schedule).unwrap();
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

