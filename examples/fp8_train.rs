//! FP8 training experiment: the same small transformer language model trained twice on
//! the same text, batches and initial weights, once with Burn's f32 `Linear` and once with
//! `Fp8Linear` (forward, input-gradient and weight-gradient GEMMs in E4M3).
//!
//! ```text
//! cargo run --release --example fp8_train                      # reference CPU backend
//! cargo run --release --example fp8_train -- --backend wgpu    # CubeCL kernels (lavapipe on a CPU)
//! cargo run --release --features cuda --example fp8_train -- --backend cuda --steps 2000
//! ```
//!
//! The corpus is `data/around-the-world-in-80-days.txt` (Project Gutenberg eBook #103,
//! public domain), read as bytes. The model is a pre-norm decoder: byte embedding plus a
//! learned position embedding, `--layers` blocks of causal multi-head attention and a GELU
//! MLP, RMSNorm, an f32 output head. Every projection inside the blocks (QKV, attention
//! output, MLP up and down) is an `Fp8Linear` in the FP8 run; the embeddings, norms,
//! attention core and head stay in f32, as in DeepSeek-V3. The FP8 model starts from the
//! f32 model's weights (`copy_params`), and both see the same batches in the same order,
//! one step of each in turn.
//!
//! It prints the losses as they go and, at the end, a summary: final training loss (mean
//! of the last 10% of steps), held-out loss, their relative difference, and each run's
//! throughput in tokens per second (training steps, after the first three, which compile
//! kernels and autotune on GPU backends).

use burn::module::{AutodiffModule, Module, ModuleDisplay};
use burn::nn::attention::generate_autoregressive_mask;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use burn_fp8::linear::{copy_params, Fp8Linear, LinearLayer};
use burn_fp8::Fp8Backend;
use std::marker::PhantomData;
use std::time::{Duration, Instant};

#[path = "common/corpus.rs"]
mod corpus;
use corpus::{corpus, Batches};
#[path = "common/flags.rs"]
mod flags;
use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};
use flags::{at_least_one, positive};

/// A small transformer language model trained with f32 `Linear` and with `Fp8Linear`
/// from the same weights on the same batches.
#[derive(Parser, Clone, Debug)]
struct Args {
    /// Burn backend.
    #[arg(long, default_value = "ndarray", value_parser = ["ndarray", "wgpu", "cuda"])]
    backend: String,
    /// Optimizer steps.
    #[arg(long, default_value_t = 300, value_parser = at_least_one)]
    steps: usize,
    /// Rows per step.
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    batch: usize,
    /// Tokens per row.
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    seq: usize,
    /// Model width (a multiple of --heads).
    #[arg(long = "d-model", default_value_t = 256, value_parser = at_least_one)]
    d_model: usize,
    /// Transformer blocks.
    #[arg(long, default_value_t = 2, value_parser = at_least_one)]
    layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4, value_parser = at_least_one)]
    heads: usize,
    /// Learning rate.
    #[arg(long, default_value_t = 2e-3, value_parser = positive, allow_hyphen_values = true)]
    lr: f64,
    /// Seed of the weights and batches.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

fn parse_args() -> Args {
    let a = Args::parse();
    if !a.d_model.is_multiple_of(a.heads) {
        Args::command().error(ErrorKind::ArgumentConflict, format!("--d-model {} is not a multiple of --heads {}", a.d_model, a.heads)).exit();
    }
    a
}

#[derive(Module, Debug)]
struct Attention<B: Backend, L: Module<B>> {
    qkv: L,
    out: L,
    heads: usize,
    backend: PhantomData<B>,
}

#[derive(Module, Debug)]
struct Block<B: Backend, L: Module<B>> {
    norm_attn: RmsNorm<B>,
    attn: Attention<B, L>,
    norm_mlp: RmsNorm<B>,
    up: L,
    down: L,
}

#[derive(Module, Debug)]
struct TinyLm<B: Backend, L: Module<B>> {
    tokens: Embedding<B>,
    positions: Embedding<B>,
    blocks: Vec<Block<B, L>>,
    norm: RmsNorm<B>,
    head: Linear<B>,
}

impl<B: Backend, L: LinearLayer<B>> Attention<B, L> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, d] = x.dims();
        let dh = d / self.heads;
        let split = |x: Tensor<B, 3>| x.reshape([b, t, self.heads, dh]).swap_dims(1, 2);
        let mut qkv = self.qkv.forward(x).chunk(3, 2).into_iter().map(split);
        let (q, k, v) = (qkv.next().unwrap(), qkv.next().unwrap(), qkv.next().unwrap());
        let scores = q.matmul(k.swap_dims(2, 3)) / (dh as f64).sqrt();
        let mask = generate_autoregressive_mask::<B>(b, t, &scores.device()).unsqueeze_dim::<4>(1);
        let attn = softmax(scores.mask_fill(mask, -1e9), 3);
        self.out.forward(attn.matmul(v).swap_dims(1, 2).reshape([b, t, d]))
    }
}

impl<B: Backend, L: LinearLayer<B>> TinyLm<B, L> {
    fn new(args: &Args, device: &B::Device) -> Self {
        let d = args.d_model;
        let block = || Block {
            norm_attn: RmsNormConfig::new(d).init(device),
            attn: Attention { qkv: L::init(&LinearConfig::new(d, 3 * d), device), out: L::init(&LinearConfig::new(d, d), device), heads: args.heads, backend: PhantomData },
            norm_mlp: RmsNormConfig::new(d).init(device),
            up: L::init(&LinearConfig::new(d, 4 * d), device),
            down: L::init(&LinearConfig::new(4 * d, d), device),
        };
        Self {
            tokens: EmbeddingConfig::new(256, d).init(device),
            positions: EmbeddingConfig::new(args.seq, d).init(device),
            blocks: (0..args.layers).map(|_| block()).collect(),
            norm: RmsNormConfig::new(d).init(device),
            head: LinearConfig::new(d, 256).init(device),
        }
    }

    /// Logits `[batch, seq, 256]` for byte ids `[batch, seq]`.
    fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, t] = ids.dims();
        let pos = Tensor::<B, 1, Int>::arange(0..t as i64, &ids.device()).reshape([1, t]).expand([b, t]);
        let mut x = self.tokens.forward(ids) + self.positions.forward(pos);
        for block in &self.blocks {
            x = x.clone() + block.attn.forward(block.norm_attn.forward(x));
            x = x.clone() + block.down.forward(gelu(block.up.forward(block.norm_mlp.forward(x))));
        }
        self.head.forward(self.norm.forward(x))
    }

    /// Mean next-byte cross-entropy of `batch` (`[b, seq + 1]` bytes).
    fn loss(&self, batch: &[u8], b: usize, device: &B::Device) -> Tensor<B, 1> {
        let t = batch.len() / b - 1;
        let ids: Vec<i64> = batch.iter().map(|&c| c as i64).collect();
        let all = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, t + 1]), device);
        let logits = self.forward(all.clone().slice([0..b, 0..t]));
        let targets = all.slice([0..b, 1..t + 1]).reshape([b * t]);
        CrossEntropyLossConfig::new().init(device).forward(logits.reshape([b * t, 256]), targets)
    }
}

struct Run<B: AutodiffBackend, L: Module<B>> {
    name: &'static str,
    model: Option<TinyLm<B, L>>,
    losses: Vec<f64>,
    /// Wall time of each step (forward, backward, optimizer, loss read back).
    times: Vec<Duration>,
}

impl<B, L> Run<B, L>
where
    B: AutodiffBackend,
    L: LinearLayer<B> + AutodiffModule<B> + ModuleDisplay,
    L::InnerModule: ModuleDisplay,
{
    fn step<O: Optimizer<TinyLm<B, L>, B>>(&mut self, optim: &mut O, batch: &[u8], args: &Args, lr: f64, device: &B::Device) {
        let start = Instant::now();
        let model = self.model.take().unwrap();
        let loss = model.loss(batch, args.batch, device);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        self.model = Some(optim.step(lr, model, grads));
        let loss = loss.into_scalar().elem::<f64>();
        self.times.push(start.elapsed());
        assert!(loss.is_finite(), "{} run: loss {loss} is not finite", self.name);
        self.losses.push(loss);
    }

    fn eval(&self, text: &[u8], args: &Args, device: &B::Device) -> f64 {
        let model = self.model.as_ref().unwrap();
        let mut batches = Batches { text, state: 0x9E37_79B9_7F4A_7C15 };
        let n = 8;
        (0..n).map(|_| model.loss(&batches.next(args.batch, args.seq + 1), args.batch, device).into_scalar().elem::<f64>()).sum::<f64>() / n as f64
    }
}

use burn::tensor::ElementConversion;

fn train<B: AutodiffBackend + Fp8Backend>(args: &Args, device: &B::Device) {
    B::seed(device, args.seed);
    let (train_text, heldout) = corpus();
    let f32_model = TinyLm::<B, Linear<B>>::new(args, device);
    let fp8_model = copy_params(&f32_model, TinyLm::<B, Fp8Linear<B>>::new(args, device)).expect("twin models");
    let params = f32_model.num_params();
    println!(
        "fp8_train: backend {}, {} layers, d_model {}, {} heads, {params} parameters, batch {}x{} bytes, {} steps, lr {}; corpus {} train / {} held-out bytes",
        args.backend,
        args.layers,
        args.d_model,
        args.heads,
        args.batch,
        args.seq,
        args.steps,
        args.lr,
        train_text.len(),
        heldout.len()
    );
    let mut f32_run = Run { name: "f32", model: Some(f32_model), losses: Vec::new(), times: Vec::new() };
    let mut fp8_run = Run { name: "fp8", model: Some(fp8_model), losses: Vec::new(), times: Vec::new() };
    let adam = AdamWConfig::new().with_weight_decay(0.01).with_grad_clipping(Some(burn::grad_clipping::GradientClippingConfig::Norm(1.0)));
    let (mut f32_optim, mut fp8_optim) = (adam.init(), adam.init());
    let mut batches = Batches { text: train_text, state: args.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1 };
    let warmup = (args.steps / 10).max(1);
    for step in 0..args.steps {
        let lr = args.lr * ((step + 1) as f64 / warmup as f64).min(1.0);
        let batch = batches.next(args.batch, args.seq + 1);
        f32_run.step(&mut f32_optim, &batch, args, lr, device);
        fp8_run.step(&mut fp8_optim, &batch, args, lr, device);
        if step % 25 == 0 || step + 1 == args.steps {
            let (a, b) = (f32_run.losses[step], fp8_run.losses[step]);
            println!("step {step:5}  loss f32 {a:.4}  fp8 {b:.4}  ({:+.3}%)", 100.0 * (b - a) / a);
        }
    }
    let tail = (args.steps / 10).max(1);
    let final_loss = |losses: &[f64]| losses[losses.len() - tail..].iter().sum::<f64>() / tail as f64;
    let (train32, train8) = (final_loss(&f32_run.losses), final_loss(&fp8_run.losses));
    let (eval32, eval8) = (f32_run.eval(heldout, args, device), fp8_run.eval(heldout, args, device));
    // Throughput after the first steps, which compile kernels and run autotune on wgpu/CUDA.
    let warm = 3.min(args.steps - 1);
    let tokens = ((args.steps - warm) * args.batch * args.seq) as f64;
    let tps = |times: &[Duration]| tokens / times[warm..].iter().sum::<Duration>().as_secs_f64();
    let (tps32, tps8) = (tps(&f32_run.times), tps(&fp8_run.times));
    println!("\n| run | final train loss (mean of last {tail} steps) | held-out loss | tokens/s (steps {warm}..{}) |", args.steps);
    println!("|---|---|---|---|");
    println!("| f32 Linear | {train32:.4} | {eval32:.4} | {tps32:.0} |");
    println!("| Fp8Linear | {train8:.4} | {eval8:.4} | {tps8:.0} |");
    println!("| relative difference | {:+.3}% | {:+.3}% | {:.2}x |", 100.0 * (train8 - train32) / train32, 100.0 * (eval8 - eval32) / eval32, tps8 / tps32);
}

fn main() {
    let args = parse_args();
    match args.backend.as_str() {
        #[cfg(feature = "ndarray")]
        "ndarray" => train::<burn::backend::Autodiff<burn::backend::NdArray>>(&args, &Default::default()),
        #[cfg(feature = "wgpu")]
        "wgpu" => train::<burn::backend::Autodiff<burn::backend::Wgpu>>(&args, &Default::default()),
        #[cfg(feature = "cuda")]
        "cuda" => train::<burn::backend::Autodiff<burn::backend::Cuda>>(&args, &Default::default()),
        other => panic!("backend {other} is not compiled in (features: ndarray, wgpu, cuda)"),
    }
}
