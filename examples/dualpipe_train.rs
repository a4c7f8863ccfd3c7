//! Trains a residual MLP split into pipeline stages with each schedule — 1F1B, ZB1P,
//! DualPipe and DualPipeV — over several Burn devices in one process (one thread per
//! rank), and measures the bubbles: per schedule the measured idle share of the ranks,
//! the share predicted by replaying the measured pass times with instant communication,
//! the simulator's share with the mean pass times, and the ratio to 1F1B's measured idle
//! in the same run. Writes each schedule's measured timeline as SVG.
//!
//! ```text
//! cargo run --release --example dualpipe_train
//! cargo run --release --example dualpipe_train -- --ranks 4 --micro-batches 8 --steps 10
//! cargo run --release --example dualpipe_train -- --backend wgpu
//! cargo run --release --features cuda --example dualpipe_train -- --backend cuda --ranks 8
//! ```
//!
//! The model has `2·ranks·blocks` residual blocks (`x + W₂ gelu(W₁ LayerNorm(x))`), the
//! same for every schedule (DualPipeV cuts it into `2·ranks` stages, the others into
//! `ranks`); it learns a fixed random teacher, `sin(x·A)`, with Adam. On the reference
//! CPU backend every rank is a thread on the same CPU, so ranks contend for its cores:
//! the measured bubbles are those of this machine, and the replay shows what the
//! schedule's dependencies alone cost.

use burn::backend::autodiff::grads::Gradients;
use burn::module::Module;
use burn::nn::{Gelu, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::optim::AdamConfig;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Tensor, TensorData};
use burn_dualpipe::executor::{Pipeline, PipelineStage};
use burn_dualpipe::schedule::{Schedule, ScheduleKind};
use burn_dualpipe::{predict, simulate, Costs, Timeline};
use clap::Parser;
use std::path::PathBuf;
use std::time::Instant;

#[path = "common/flags.rs"]
mod flags;
use flags::at_least_one;

/// Every pipeline schedule trained on the same stage modules over several devices.
#[derive(Parser, Debug)]
struct Args {
    /// Burn backend.
    #[arg(long, default_value = "ndarray", value_parser = ["ndarray", "wgpu", "cuda"])]
    backend: String,
    /// Pipeline ranks.
    #[arg(long, default_value_t = 2, value_parser = at_least_one)]
    ranks: usize,
    /// Micro-batches per step.
    #[arg(long = "micro-batches", default_value_t = 8, value_parser = at_least_one)]
    micro_batches: usize,
    /// Training steps per schedule.
    #[arg(long, default_value_t = 12, value_parser = at_least_one)]
    steps: usize,
    /// Model width.
    #[arg(long, default_value_t = 256, value_parser = at_least_one)]
    width: usize,
    /// Rows per micro-batch.
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    rows: usize,
    /// Blocks per DualPipeV stage.
    #[arg(long, default_value_t = 2, value_parser = at_least_one)]
    blocks: usize,
    /// Output directory (timelines).
    #[arg(long, default_value = "target/dualpipe")]
    out: PathBuf,
}

/// A pre-norm residual MLP block.
#[derive(Module, Debug)]
struct Block<B: Backend> {
    norm: LayerNorm<B>,
    up: Linear<B>,
    down: Linear<B>,
    act: Gelu,
}

impl<B: Backend> Block<B> {
    fn new(width: usize, device: &B::Device) -> Self {
        Self {
            norm: LayerNormConfig::new(width).init(device),
            up: LinearConfig::new(width, 4 * width).init(device),
            down: LinearConfig::new(4 * width, width).init(device),
            act: Gelu::new(),
        }
    }

    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let h = self.down.forward(self.act.forward(self.up.forward(self.norm.forward(x.clone()))));
        x + h
    }
}

/// A pipeline stage: consecutive blocks.
#[derive(Module, Debug)]
struct Stage<B: Backend> {
    blocks: Vec<Block<B>>,
}

impl<B: AutodiffBackend> PipelineStage<B, 2> for Stage<B> {
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.blocks.iter().fold(x, |h, b| b.forward(h))
    }
}

/// The model's `2·P·K` blocks cut into `stages` stages; blocks come from one seeded
/// stream, so every schedule trains the same model.
fn stages<B: AutodiffBackend>(a: &Args, stages: usize, device: &B::Device) -> Vec<Stage<B>> {
    B::seed(device, 42);
    let total = 2 * a.ranks * a.blocks;
    let mut blocks: Vec<Block<B>> = (0..total).map(|_| Block::new(a.width, device)).collect();
    (0..stages).map(|_| Stage { blocks: blocks.drain(..total / stages).collect() }).collect()
}

/// What one schedule's run gives.
struct Run {
    kind: ScheduleKind,
    first_loss: f64,
    last_loss: f64,
    step_s: f64,
    /// The fastest step's measured timeline (the least disturbed by the rest of the machine).
    timeline: Timeline,
    schedule: Schedule,
}

fn run<B: AutodiffBackend<Gradients = Gradients>>(a: &Args, kind: ScheduleKind, devices: &[B::Device]) -> Run {
    let schedule = Schedule::new(kind, a.ranks, a.micro_batches).unwrap_or_else(|e| panic!("{kind}: {e}"));
    let device = &devices[0];
    let mut pipeline = Pipeline::new(stages::<B>(a, schedule.stages(), device), devices.to_vec(), schedule.clone()).expect("stages and devices fit");
    let mut optim = AdamConfig::new().init();
    B::seed(device, 7);
    let teacher = Tensor::<B::InnerBackend, 2>::random([a.width, a.width], Distribution::Normal(0.0, 1.0 / (a.width as f64).sqrt()), device);
    let (mut first_loss, mut last_loss, mut total, mut best) = (f64::NAN, f64::NAN, 0.0, None::<(f64, Timeline)>);
    for step in 0..a.steps {
        let xs: Vec<Tensor<B, 2>> = (0..a.micro_batches).map(|_| Tensor::random([a.rows, a.width], Distribution::Normal(0.0, 1.0), device)).collect();
        let targets: Vec<TensorData> = xs.iter().map(|x| x.clone().inner().matmul(teacher.clone()).sin().into_data()).collect();
        let begin = Instant::now();
        let out = pipeline
            .step(xs, |y, m| {
                let t = Tensor::<B, 2>::from_data(targets[m].clone(), &y.device());
                (y - t).powi_scalar(2).mean()
            })
            .unwrap_or_else(|e| panic!("{kind} step {step}: {e}"));
        let makespan = out.timeline.makespan();
        pipeline.optimize(&mut optim, 1e-3, out.grads);
        let elapsed = begin.elapsed().as_secs_f64();
        if step == 0 {
            first_loss = out.loss;
        } else {
            // The first step warms the backend up; it is not timed.
            total += elapsed;
            if best.as_ref().is_none_or(|(m, _)| makespan < *m) {
                best = Some((makespan, out.timeline));
            }
        }
        last_loss = out.loss;
    }
    let timeline = best.map(|(_, t)| t).expect("at least two steps");
    Run { kind, first_loss, last_loss, step_s: total / (a.steps - 1) as f64, timeline, schedule }
}

fn measure<B: AutodiffBackend<Gradients = Gradients>>(a: &Args, devices: Vec<B::Device>) {
    assert!(a.steps >= 2, "--steps must be at least 2 (the first warms up)");
    std::fs::create_dir_all(&a.out).expect("output directory");
    println!(
        "dualpipe_train: backend {}, {} ranks, {} micro-batches of {}x{}, {} blocks of width {} ({} steps, Adam)",
        a.backend,
        a.ranks,
        a.micro_batches,
        a.rows,
        a.width,
        2 * a.ranks * a.blocks,
        a.width,
        a.steps
    );
    let runs: Vec<Run> = ScheduleKind::ALL
        .into_iter()
        .filter(|k| a.micro_batches >= k.min_micro_batches(a.ranks) && (*k != ScheduleKind::DualPipe || a.ranks.is_multiple_of(2)))
        .map(|k| run::<B>(a, k, &devices))
        .collect();
    let base = runs.iter().find(|r| r.kind == ScheduleKind::OneFOneB).map(|r| r.timeline.bubble_fraction());
    println!(
        "{:>10} | {:>8} | {:>9} | {:>13} | {:>13} | {:>15} | {:>8} | {:>14} | loss first -> last",
        "schedule", "step ms", "rows/s", "measured idle", "replay idle", "simulated idle", "vs 1F1B", "pass ms F/B/W"
    );
    for r in &runs {
        let measured = r.timeline.bubble_fraction();
        let replay = predict(&r.schedule, &r.timeline).expect("valid schedule").bubble_fraction();
        let costs = Costs::measured(&r.timeline);
        let simulated = simulate(&r.schedule, &costs).expect("valid schedule").bubble_fraction();
        let ratio = base.map_or("-".to_string(), |b| format!("{:.2}x", measured / b));
        println!(
            "{:>10} | {:>8.1} | {:>9.0} | {:>12.1}% | {:>12.1}% | {:>14.1}% | {:>8} | {:>4.1}/{:.1}/{:.1} | {:.4} -> {:.4}",
            r.kind.to_string(),
            1e3 * r.step_s,
            (a.micro_batches * a.rows) as f64 / r.step_s,
            100.0 * measured,
            100.0 * replay,
            100.0 * simulated,
            ratio,
            1e3 * costs.forward,
            1e3 * costs.backward,
            1e3 * costs.weight,
            r.first_loss,
            r.last_loss
        );
        let path = a.out.join(format!("measured-{}-{}x{}.svg", r.kind.to_string().to_lowercase(), a.ranks, a.micro_batches));
        let title = format!("{}: {} ranks, {} micro-batches, measured on {} (fastest step, {:.1} ms)", r.kind, a.ranks, a.micro_batches, a.backend, 1e3 * r.timeline.makespan());
        std::fs::write(&path, r.timeline.to_svg(&title)).expect("write the SVG");
    }
    println!("idle = Σ rank bubbles / (ranks · makespan) of the fastest step; replay: measured pass times, instant communication;");
    println!("simulated: mean pass times (B includes the recomputed forward); timelines written to {}", a.out.display());
}

fn main() {
    let a = Args::parse();
    match a.backend.as_str() {
        "ndarray" => measure::<burn::backend::Autodiff<burn::backend::NdArray>>(&a, vec![Default::default(); a.ranks]),
        "wgpu" => measure::<burn::backend::Autodiff<burn::backend::Wgpu>>(&a, vec![Default::default(); a.ranks]),
        #[cfg(feature = "cuda")]
        "cuda" => {
            let count = <burn::backend::Cuda as Backend>::device_count(0).max(1);
            measure::<burn::backend::Autodiff<burn::backend::Cuda>>(&a, (0..a.ranks).map(|r| burn::backend::cuda::CudaDevice::new(r % count)).collect())
        }
        other => panic!("backend {other} is not compiled in (features: ndarray, wgpu, cuda)"),
    }
}
