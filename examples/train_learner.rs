//! Train the tiny DeepSeek-V3 of `train_tiny` with Burn's own training loop: burn-train's
//! `SupervisedTraining` and `Learner`, Burn's metrics, checkpoints and dashboard.
//!
//! ```text
//! cargo run --release --features learner --example train_learner
//! cargo run --release --features learner --example train_learner -- --epochs 3 --resume-epoch 2
//! cargo run --release --features learner,cuda --example train_learner -- --backend cuda --d-model 256
//! ```
//!
//! The model, optimizer and schedule are `train_tiny`'s: `DeepSeekV3Config::tiny()`
//! (width `--d-model`, `--layers` blocks, MTP depth `--mtp`), Burn's AdamW (β₂ 0.999,
//! ε 1e-5, weight decay 0.1) and a linear warm-up over 30 steps to `--lr`
//! (`LinearLrScheduler`). What differs is the loop: `DeepSeekV3` implements burn-train's
//! `TrainStep` and `InferenceStep` (`burn_deepseek::model::learner`), so the Learner
//! runs the forward, the backward, the optimizer step and the balancing-bias update of
//! every MoE layer after it, the validation on the held-out text each epoch, the
//! checkpoints (`--out/checkpoint`, Burn's `CompactRecorder`; `--resume-epoch N` continues
//! from epoch N's) and the metrics: the objective (Burn's `LossMetric`), the next-token
//! loss, the balance loss, the expert load (max / mean tokens per expert, 1 is balance),
//! the learning rate and the iteration speed. In a terminal Burn's dashboard draws them;
//! otherwise they are printed.
//!
//! The data: *Around the World in Eighty Days* (the last 10% held out), cut into windows
//! of `--seq + 1 + --mtp` bytes at a stride that gives `--steps-per-epoch` batches of
//! `--batch` rows, shuffled each epoch by Burn's data loader. At the end it prints the
//! held-out next-token loss on the rows `train_tiny` scores, to compare the two loops.

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataset::Dataset;
use burn::optim::lr_scheduler::linear::LinearLrSchedulerConfig;
use burn::optim::AdamWConfig;
use burn::record::CompactRecorder;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ElementConversion;
use burn_deepseek::dualpipe::executor::materialize;
use burn_deepseek::model::learner::{LmFigure, LmMetric, ObjectiveMetric, TokenBatch, TokenBatcher};
use burn_deepseek::model::{DeepSeekV3, DeepSeekV3Config, ModelBackend};
use burn_deepseek::train::metric::{IterationSpeedMetric, LearningRateMetric};
use burn_deepseek::train::{Learner, SupervisedTraining};
use clap::Parser;
use std::path::PathBuf;
use std::time::Instant;

#[path = "common/corpus.rs"]
mod corpus;
use corpus::{corpus, held_out_rows};
#[path = "common/flags.rs"]
mod flags;
use flags::{at_least_one, positive};

/// Trains the tiny DeepSeek-V3 with Burn's Learner.
#[derive(Parser, Clone, Debug)]
#[command(name = "train_learner")]
struct Args {
    /// Burn backend: flex (Burn's CPU backend), ndarray, wgpu, cuda.
    #[arg(long, default_value = "flex", value_parser = ["flex", "ndarray", "wgpu", "cuda"])]
    backend: String,
    /// Passes over the training windows.
    #[arg(long, default_value_t = 2, value_parser = at_least_one)]
    epochs: usize,
    /// Optimizer steps per epoch (the windows' stride follows).
    #[arg(long = "steps-per-epoch", default_value_t = 500, value_parser = at_least_one)]
    steps_per_epoch: usize,
    /// Rows per step.
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    batch: usize,
    /// Positions the main model predicts per row.
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    seq: usize,
    /// Model width.
    #[arg(long = "d-model", default_value_t = 64, value_parser = at_least_one)]
    d_model: usize,
    /// Transformer blocks (the first dense, the rest MoE).
    #[arg(long, default_value_t = 3, value_parser = at_least_one)]
    layers: usize,
    /// Multi-token-prediction depth (0: next-token prediction only).
    #[arg(long, default_value_t = 1)]
    mtp: usize,
    /// Peak learning rate (after the warm-up); at most 1 (Burn's schedulers' bound).
    #[arg(long, default_value_t = 3e-3, value_parser = positive, allow_hyphen_values = true)]
    lr: f64,
    /// Held-out rows validated after each epoch.
    #[arg(long = "valid-rows", default_value_t = 128, value_parser = at_least_one)]
    valid_rows: usize,
    /// Continue from the checkpoint of this epoch under --out.
    #[arg(long = "resume-epoch", value_parser = at_least_one)]
    resume_epoch: Option<usize>,
    /// Seed of the initial weights and of the data order.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output directory (checkpoints, metric logs).
    #[arg(long, default_value = "target/train_learner")]
    out: PathBuf,
}

impl Args {
    /// The values clap cannot check alone, checked before any work starts.
    fn check(&self) -> Result<(), String> {
        let window = self.window();
        let (train, held) = corpus();
        if self.lr > 1.0 {
            return Err(format!("--lr {} must be at most 1", self.lr));
        }
        if self.resume_epoch.is_some_and(|e| e >= self.epochs) {
            return Err(format!("--resume-epoch {} must be below --epochs {}", self.resume_epoch.unwrap_or(0), self.epochs));
        }
        if train.len() < window + self.steps_per_epoch * self.batch {
            return Err(format!(
                "--steps-per-epoch {} × --batch {} windows of {window} bytes do not fit the {} training bytes at a stride of one",
                self.steps_per_epoch,
                self.batch,
                train.len()
            ));
        }
        if held.len() / window < self.batch {
            return Err(format!("the held-out text ({} bytes) holds fewer than --batch {} windows of {window} bytes", held.len(), self.batch));
        }
        DeepSeekV3Config { n_layers: self.layers, mtp_depth: self.mtp, ..DeepSeekV3Config::tiny() }.with_width(self.d_model).validate().map_err(|e| format!("model flags: {e}"))
    }

    /// Bytes per row: the inputs, the next token and one more per MTP depth.
    fn window(&self) -> usize {
        self.seq + 1 + self.mtp
    }
}

/// Windows of `width` bytes of a text at offsets `0, stride, 2·stride, …`, as token ids.
struct ByteWindows {
    text: &'static [u8],
    width: usize,
    stride: usize,
    count: usize,
}

impl ByteWindows {
    /// `count` windows spread evenly over `text`.
    fn spread(text: &'static [u8], width: usize, count: usize) -> Self {
        let stride = ((text.len() - width) / count.max(1)).max(1);
        Self { text, width, stride, count }
    }
}

impl Dataset<Vec<u32>> for ByteWindows {
    fn get(&self, index: usize) -> Option<Vec<u32>> {
        let start = index.checked_mul(self.stride).filter(|_| index < self.count)?;
        Some(self.text[start..start + self.width].iter().map(|&b| u32::from(b)).collect())
    }

    fn len(&self) -> usize {
        self.count
    }
}

fn run<B>(args: &Args, device: B::Device, name: &str)
where
    B: AutodiffBackend + ModelBackend,
    B::InnerBackend: ModelBackend,
{
    let (train_text, held_text) = corpus();
    let window = args.window();
    B::seed(&device, args.seed);
    let config = DeepSeekV3Config { n_layers: args.layers, mtp_depth: args.mtp, ..DeepSeekV3Config::tiny() }.with_width(args.d_model);
    let model = config.init::<B>(&device);
    materialize(&model); // the initial weights drawn now, in module order: train_tiny's model
    let optim = AdamWConfig::new().with_beta_2(0.999).with_epsilon(1e-5).with_weight_decay(0.1).init();
    let lr = LinearLrSchedulerConfig::new(args.lr / 30.0, args.lr, 29).init().unwrap_or_else(|e| panic!("--lr: {e}"));

    let train = DataLoaderBuilder::new(TokenBatcher).batch_size(args.batch).shuffle(args.seed).set_device(device.clone()).build(ByteWindows::spread(
        train_text,
        window,
        args.steps_per_epoch * args.batch,
    ));
    let valid_rows = args.valid_rows.min(held_text.len() / window);
    let valid = DataLoaderBuilder::new(TokenBatcher).batch_size(args.batch).set_device(device.clone()).build(ByteWindows {
        text: held_text,
        width: window,
        stride: window,
        count: valid_rows,
    });

    let mut training = SupervisedTraining::new(&args.out, train, valid)
        .metric_train_numeric(ObjectiveMetric::new())
        .metric_valid_numeric(ObjectiveMetric::new())
        .metric_train_numeric(LmMetric::new(LmFigure::NextTokenLoss))
        .metric_valid_numeric(LmMetric::new(LmFigure::NextTokenLoss))
        .metric_train_numeric(LmMetric::new(LmFigure::BalanceLoss))
        .metric_train_numeric(LmMetric::new(LmFigure::ExpertLoad))
        .metric_valid_numeric(LmMetric::new(LmFigure::ExpertLoad))
        .metric_train_numeric(LearningRateMetric::new())
        .metric_train(IterationSpeedMetric::new())
        .with_file_checkpointer(CompactRecorder::new())
        .num_epochs(args.epochs)
        .summary();
    if let Some(epoch) = args.resume_epoch {
        training = training.checkpoint(epoch);
    }
    println!(
        "train_learner: backend {name}, {} params, {} epochs × {} steps of {} rows × {window} bytes; Burn's Learner writes to {}",
        config.param_count(),
        args.epochs,
        args.steps_per_epoch,
        args.batch,
        args.out.display()
    );
    let start = Instant::now();
    let result = training.launch(Learner::new(model, optim, lr));
    let seconds = start.elapsed().as_secs_f64();
    let epochs_run = args.epochs - args.resume_epoch.unwrap_or(0);
    let tokens = epochs_run * args.steps_per_epoch * args.batch * args.seq;
    let held = held_out_loss(&result.model, held_text, window, &device);
    println!("trained {epochs_run} epochs in {seconds:.1} s ({:.0} tokens/s); held-out next-token loss {held:.3} (train_tiny's held-out rows)", tokens as f64 / seconds);
}

/// The next-token loss on the held-out rows `train_tiny` scores.
fn held_out_loss<B: ModelBackend>(model: &DeepSeekV3<B>, text: &[u8], window: usize, device: &B::Device) -> f32 {
    let (bytes, _) = held_out_rows(text, window);
    let rows: Vec<Vec<u32>> = bytes.chunks(window).map(|row| row.iter().map(|&b| u32::from(b)).collect()).collect();
    let batch: TokenBatch<B> = TokenBatcher.batch(rows, device);
    model.loss(batch.tokens).lm_loss.into_scalar().elem::<f32>()
}

fn main() {
    let args = Args::parse();
    if let Err(e) = args.check() {
        eprintln!("train_learner: {e}");
        std::process::exit(2);
    }
    match args.backend.as_str() {
        #[cfg(feature = "flex")]
        "flex" => run::<burn::backend::Autodiff<burn::backend::Flex>>(&args, Default::default(), "flex (Burn's CPU backend)"),
        #[cfg(feature = "ndarray")]
        "ndarray" => run::<burn::backend::Autodiff<burn::backend::NdArray>>(&args, Default::default(), "ndarray"),
        #[cfg(feature = "wgpu")]
        "wgpu" => run::<burn::backend::Autodiff<burn::backend::Wgpu>>(&args, Default::default(), "wgpu"),
        #[cfg(feature = "cuda")]
        "cuda" => run::<burn::backend::Autodiff<burn::backend::Cuda>>(&args, Default::default(), "cuda"),
        other => {
            eprintln!("train_learner: backend {other:?} is not compiled in; build with --features {other}");
            std::process::exit(2);
        }
    }
}
