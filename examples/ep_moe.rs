//! Expert parallelism in one process: the DeepSeekMoE layer's experts spread over N ranks
//! (threads, one Burn device each), against the single-device layer on the same machine in
//! the same run, with f32 and FP8 dispatch.
//!
//! ```text
//! cargo run --release --example ep_moe                           # reference CPU backend, 2 and 4 ranks
//! cargo run --release --example ep_moe -- --backend wgpu         # two wgpu devices (lavapipe on a CPU)
//! cargo run --release --features cuda --example ep_moe -- --backend cuda --ranks 2 --transport device
//! ```
//!
//! For each rank count it prints, per training step (forward, backward, gradient sync):
//! - the step time of the expert-parallel layer (every rank running `tokens` tokens) and
//!   of the single-device layer running all `N · tokens` tokens, and their ratio;
//! - the bytes the ranks sent to each other (dispatch, combine, their backwards and the
//!   gradient all-reduce), with f32 and with FP8 dispatch, and the dispatch bytes alone.
//!
//! On one CPU the ranks share its cores, so the step time shows the cost of the exchange,
//! not a speed-up; on a multi-GPU host each rank has its own device.

use burn::backend::Autodiff;
use burn::optim::GradientsParams;
use burn::tensor::{backend::AutodiffBackend, Distribution, Tensor};
use burn_fp8::QuantConfig;
use burn_moe::comm::{launch, Comm, CommBackend, Transport};
use burn_moe::ep::{EpError, ExpertParallelMoe};
use burn_moe::eplb::Placement;
use burn_moe::router::RouterConfig;
use burn_moe::{Moe, MoeBackend, MoeConfig};
use std::time::{Duration, Instant};

#[path = "common/timing.rs"]
mod timing;
use timing::time;
#[path = "common/flags.rs"]
mod flags;
use clap::Parser;
use flags::at_least_one;

/// Expert parallelism in one process against one device on the whole batch.
#[derive(Parser, Debug)]
struct Args {
    /// Burn backend.
    #[arg(long, default_value = "ndarray", value_parser = ["ndarray", "wgpu", "cuda"])]
    backend: String,
    /// Rank counts to measure, comma-separated, each 2 or more and dividing the layer's
    /// experts (default 2 and 4, as the backend's devices allow).
    #[arg(long, value_delimiter = ',', value_parser = expert_ranks)]
    ranks: Vec<usize>,
    /// Tokens per rank.
    #[arg(long, default_value_t = 256, value_parser = at_least_one)]
    tokens: usize,
    /// Steps timed per measurement.
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    steps: usize,
    /// How rows move between ranks: through host memory or device to device.
    #[arg(long, default_value = "host", value_parser = transport)]
    transport: Transport,
}

fn expert_ranks(s: &str) -> Result<usize, String> {
    let (n, experts) = (at_least_one(s)?, config().router.n_experts);
    if n >= 2 && experts.is_multiple_of(n) {
        Ok(n)
    } else {
        Err(format!("{n} ranks: expert parallelism needs 2 or more ranks that divide the layer's {experts} experts"))
    }
}

fn transport(s: &str) -> Result<Transport, String> {
    match s {
        "host" => Ok(Transport::Host),
        "device" => Ok(Transport::Device),
        _ => Err("host or device".into()),
    }
}

/// DeepSeek-V3's routing rules at a CPU-friendly size: d_model 512, 16 experts of width
/// 256, top-4 over 2 of 4 groups, one shared expert.
fn config() -> MoeConfig {
    MoeConfig { init_std: 0.02, ..MoeConfig::new(512, 256, 1, RouterConfig::tiny()) }
}

/// One training step's figures on every rank: wall time on rank 0, bytes sent by all.
struct EpStep {
    time: Duration,
    bytes: u64,
    dispatch_bytes: u64,
}

fn ep_steps<B>(moe: &Moe<B>, devices: &[B::Device], args: &Args, fp8: Option<QuantConfig>) -> EpStep
where
    B: AutodiffBackend + MoeBackend + CommBackend,
    B::InnerBackend: MoeBackend + CommBackend,
{
    let ranks = devices.len();
    let placement = Placement::identity(moe.experts.n_experts(), ranks).expect("the flags' rank counts divide the experts");
    let d = moe.d_model();
    let per_rank = launch(Comm::group(ranks, args.transport), |comm| {
        let device = &devices[comm.rank()];
        let shard = ExpertParallelMoe::shard(moe, placement.clone(), comm.rank(), device)?.with_dispatch_fp8(fp8);
        let step = || -> Result<(u64, u64), EpError> {
            let x = Tensor::<B, 3>::random([1, args.tokens, d], Distribution::Normal(0.0, 1.0), device).require_grad();
            let before = comm.sent_bytes();
            let out = shard.forward(x, &comm)?;
            let dispatch = comm.sent_bytes() - before;
            let grads = out.moe.output.powi_scalar(2).mean().backward();
            let grads = shard.sync_grads(GradientsParams::from_grads(grads, &shard), &comm)?;
            drop(grads);
            B::sync(device).expect("device sync");
            Ok((comm.sent_bytes() - before, dispatch))
        };
        step()?; // warm-up
        comm.all_gather_host("start", ())?;
        let start = Instant::now();
        let mut bytes = (0, 0);
        for _ in 0..args.steps {
            bytes = step()?;
        }
        comm.all_gather_host("end", ())?;
        Ok::<_, EpError>((start.elapsed() / args.steps as u32, bytes))
    })
    .unwrap_or_else(|e| panic!("expert-parallel step failed: {e}"));
    EpStep {
        time: per_rank[0].0,
        bytes: per_rank.iter().map(|(_, (b, _))| b).sum(),
        // The forward's dispatch and combine; the combine returns f32 either way.
        dispatch_bytes: per_rank.iter().map(|(_, (_, d))| d).sum(),
    }
}

fn single_step<B: AutodiffBackend + MoeBackend>(moe: &Moe<B>, device: &B::Device, tokens: usize, args: &Args) -> Duration {
    let d = moe.d_model();
    time::<B, _>(device, Duration::from_millis(1000), args.steps, || {
        let x = Tensor::<B, 3>::random([1, tokens, d], Distribution::Normal(0.0, 1.0), device).require_grad();
        let grads = moe.forward(x).output.powi_scalar(2).mean().backward();
        moe.gate.weight.grad(&grads)
    })
}

fn kb(bytes: u64) -> String {
    format!("{:.1} KiB", bytes as f64 / 1024.0)
}

fn bench<B>(name: &str, devices: Vec<B::Device>, args: &Args)
where
    B: AutodiffBackend + MoeBackend + CommBackend,
    B::InnerBackend: MoeBackend + CommBackend,
{
    let config = config();
    println!(
        "backend {name}, transport {:?}; layer d_model {}, {} experts of width {} (top-{}), 1 shared; {} tokens per rank\n",
        args.transport, config.d_model, config.router.n_experts, config.d_expert, config.router.top_k, args.tokens
    );
    let moe: Moe<B> = config.init(&devices[0]);
    let ranks = if args.ranks.is_empty() { vec![2, 4.min(devices.len())] } else { args.ranks.clone() };
    println!("| ranks | single device, N·T tokens | expert-parallel f32 | ratio | expert-parallel FP8 dispatch | bytes/step f32 | bytes/step FP8 | dispatch+combine f32 → FP8 |");
    println!("|---|---|---|---|---|---|---|---|");
    for n in ranks.into_iter().filter(|&n| n >= 2) {
        assert!(n <= devices.len(), "{n} ranks need {n} devices; this backend has {}", devices.len());
        let devs = &devices[..n];
        let single = single_step(&moe, &devices[0], n * args.tokens, args);
        let f32_run = ep_steps(&moe, devs, args, None);
        let fp8_run = ep_steps(&moe, devs, args, Some(QuantConfig::activation()));
        println!(
            "| {n} | {:.1} ms | {:.1} ms | {:.2}x | {:.1} ms | {} | {} | {} → {} ({:.2}x) |",
            single.as_secs_f64() * 1e3,
            f32_run.time.as_secs_f64() * 1e3,
            single.as_secs_f64() / f32_run.time.as_secs_f64(),
            fp8_run.time.as_secs_f64() * 1e3,
            kb(f32_run.bytes),
            kb(fp8_run.bytes),
            kb(f32_run.dispatch_bytes),
            kb(fp8_run.dispatch_bytes),
            fp8_run.dispatch_bytes as f64 / f32_run.dispatch_bytes as f64,
        );
    }
    println!("\nratio: single-device step time / expert-parallel step time (above 1: expert parallelism is faster).");
}

fn main() {
    let args = Args::parse();
    match args.backend.as_str() {
        #[cfg(feature = "ndarray")]
        "ndarray" => bench::<Autodiff<burn::backend::NdArray>>("ndarray (reference ops, ranks share the CPU)", vec![Default::default(); 4], &args),
        #[cfg(feature = "wgpu")]
        "wgpu" => {
            use burn::backend::wgpu::WgpuDevice;
            bench::<Autodiff<burn::backend::Wgpu>>("wgpu (DefaultDevice + Cpu)", vec![WgpuDevice::DefaultDevice, WgpuDevice::Cpu], &args)
        }
        #[cfg(feature = "cuda")]
        "cuda" => {
            use burn::backend::cuda::CudaDevice;
            let count = std::env::var("EP_GPUS").ok().and_then(|n| n.parse().ok()).unwrap_or(2);
            bench::<Autodiff<burn::backend::Cuda>>("cuda", (0..count).map(CudaDevice::new).collect(), &args)
        }
        other => panic!("backend {other:?} is not compiled in; build with --features {other}"),
    }
}
