//! The DeepSeekMoE layer: a correctness check and a benchmark against the naive way on
//! the same device, in the same run.
//!
//! ```text
//! cargo run --release --example moe_layer                          # wgpu (GPU or lavapipe)
//! cargo run --release --example moe_layer -- --config tiny --tokens 256,2048
//! cargo run --release --example moe_layer -- --backend flex --config tiny --tokens 512   # Burn's CPU backend
//! cargo run --release --features cuda --example moe_layer -- --backend cuda --config v3
//! ```
//!
//! Three tables:
//! - the layer, `Moe::forward` (route → dispatch kernel → three grouped GEMMs → combine
//!   kernel) against `moe::forward_naive` (read the routing back, then per expert `select`,
//!   three matmuls, `select_assign`), in tokens/s for the forward and for forward +
//!   backward, and the forward with FP8 experts;
//! - the expert GEMM (the up projection over the routed rows): the f32 grouped kernel,
//!   the FP8 grouped GEMM (with the quantization of rows and weights it includes, and on
//!   operands quantized beforehand), against one Burn matmul per expert, in GFLOP/s;
//! - the dispatch and combine kernels against the same movement in Burn's ops (`select`
//!   of token rows; `select` of expert rows, weight and `sum_dim`), in GB/s of rows moved.

use burn::backend::Autodiff;
use burn::tensor::{Distribution, ElementConversion, Int, Tensor};
use burn_fp8::host::calc_diff;
use burn_fp8::linear::Fp8Recipe;
use burn_fp8::{fp8_grouped_gemm, Fp8Tensor};
use burn_moe::dispatch::{combine, dispatch, grouped_matmul, grouped_matmul_fp8, DispatchPlan};
use burn_moe::moe::forward_naive;
use burn_moe::reference;
use burn_moe::router::{route, RouterConfig};
use burn_moe::{Moe, MoeBackend, MoeConfig};
use clap::Parser;
use std::time::Duration;

#[path = "common/timing.rs"]
mod timing;
use timing::time;

/// The DeepSeekMoE layer against the naive loop over experts, its expert GEMM and its
/// dispatch/combine kernels against Burn's ops.
#[derive(Parser, Debug)]
struct Args {
    /// Burn backend.
    #[arg(long, default_value = "wgpu", value_parser = ["wgpu", "cuda", "ndarray", "flex"])]
    backend: String,
    /// Layer sizes (default v3-slim).
    #[arg(long, value_parser = ["tiny", "v3-slim", "v3"])]
    config: Option<String>,
    /// Token counts, comma-separated (default per backend).
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..))]
    tokens: Vec<u32>,
    /// Minimum measuring time per figure, in milliseconds.
    #[arg(long = "min-time-ms", default_value_t = 1500, value_parser = clap::value_parser!(u64).range(1..))]
    min_time_ms: u64,
    /// Tables to print, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "layer,gemm,movement", value_parser = ["layer", "gemm", "movement"])]
    tables: Vec<String>,
}

/// The layer sizes: `tiny`; `v3-slim`, DeepSeek-V3's routing rules (top-8 of 8 groups,
/// 4 groups per token) over 64 experts at 1/8 of its widths; `v3`, the full layer.
fn config(name: &str) -> MoeConfig {
    match name {
        "tiny" => MoeConfig::tiny(),
        "v3-slim" => MoeConfig::new(896, 256, 1, RouterConfig { n_experts: 64, ..RouterConfig::deepseek_v3() }),
        "v3" => MoeConfig::deepseek_v3(),
        other => unreachable!("clap accepts tiny, v3-slim and v3, not {other:?}"),
    }
}

fn layer<B: MoeBackend>(device: &B::Device, config: &MoeConfig, tokens: &[usize], min_time: Duration) {
    let d = config.d_model;
    let moe: Moe<B> = config.init(device);
    let moe_fp8: Moe<B> = MoeConfig { fp8: Some(Fp8Recipe::deepseek_v3()), ..config.clone() }.init(device);
    let train: Moe<Autodiff<B>> = config.init(device);
    println!(
        "\nMoe layer vs the naive loop over experts: d_model {d}, {} experts of width {}, top-{}, {} shared",
        config.router.n_experts, config.d_expert, config.router.top_k, config.n_shared_experts
    );
    println!(
        "{:>7} | {:>12} {:>12} {:>8} | {:>12} {:>12} {:>8} | {:>9} | {:>12} {:>8}",
        "tokens", "fwd tok/s", "naive tok/s", "speedup", "f+b tok/s", "naive tok/s", "speedup", "max diff", "fp8 fwd", "speedup"
    );
    for &t in tokens {
        let x = Tensor::<B, 3>::random([1, t, d], Distribution::Normal(0.0, 1.0), device);
        let fast = moe.forward(x.clone()).output;
        let naive = forward_naive(&moe, x.clone()).output;
        let scale = naive.clone().abs().max().into_scalar().elem::<f64>();
        let diff = (fast - naive).abs().max().into_scalar().elem::<f64>() / scale;

        let t_fwd = time::<B, _>(device, min_time, usize::MAX, || moe.forward(x.clone()).output);
        let t_naive = time::<B, _>(device, min_time, usize::MAX, || forward_naive(&moe, x.clone()).output);
        let xa = Tensor::<Autodiff<B>, 3>::from_inner(x.clone()).require_grad();
        let step = |naive: bool| {
            let out = if naive { forward_naive(&train, xa.clone()) } else { train.forward(xa.clone()) };
            (out.output.powi_scalar(2).mean() + out.balance_loss.unwrap()).backward()
        };
        let t_train = time::<B, _>(device, min_time, usize::MAX, || step(false));
        let t_train_naive = time::<B, _>(device, min_time, usize::MAX, || step(true));
        let t_fp8 = time::<B, _>(device, min_time, usize::MAX, || moe_fp8.forward(x.clone()).output);
        let rate = |time: Duration| t as f64 / time.as_secs_f64();
        println!(
            "{t:>7} | {:>12.0} {:>12.0} {:>7.2}x | {:>12.0} {:>12.0} {:>7.2}x | {diff:>9.1e} | {:>12.0} {:>7.2}x",
            rate(t_fwd),
            rate(t_naive),
            t_naive.as_secs_f64() / t_fwd.as_secs_f64(),
            rate(t_train),
            rate(t_train_naive),
            t_train_naive.as_secs_f64() / t_train.as_secs_f64(),
            rate(t_fp8),
            t_naive.as_secs_f64() / t_fp8.as_secs_f64()
        );
    }
    println!("speedup = naive time / Moe time; max diff = max|Moe − naive| / max|naive| of the forward;");
    println!("fp8 fwd = the layer with FP8 experts (Fp8Recipe::deepseek_v3), against the same naive time.");
}

fn expert_gemm<B: MoeBackend>(device: &B::Device, config: &MoeConfig, tokens: &[usize], min_time: Duration) {
    let (d, f, k, e) = (config.d_model, config.d_expert, config.router.top_k, config.router.n_experts);
    let recipe = Fp8Recipe::deepseek_v3();
    println!("\nExpert GEMM (up projection, [T·k, {d}] · [{d}, {f}] per expert, {e} experts) vs one Burn matmul per expert");
    println!(
        "{:>7} | {:>10} {:>8} | {:>10} {:>8} | {:>10} {:>8} | {:>10} | {:>9}",
        "tokens", "f32 GF/s", "speedup", "fp8 GF/s", "speedup", "fp8q GF/s", "speedup", "naive GF/s", "fp8 diff"
    );
    for &t in tokens {
        let logits = Tensor::<B, 2>::random([t, e], Distribution::Normal(0.0, 1.0), device);
        let plan = DispatchPlan::from_routing(&route(logits, None, &config.router).expect("routing"));
        let rows = dispatch(Tensor::<B, 2>::random([t, d], Distribution::Normal(0.0, 1.0), device), &plan);
        let w = Tensor::<B, 3>::random([e, d, f], Distribution::Normal(0.0, 0.02), device);
        let rows_q = Fp8Tensor::quantize(rows.clone(), recipe.input);
        let w_q = Fp8Tensor::quantize(w.clone().swap_dims(1, 2).reshape([e * f, d]), recipe.weight);
        let host = |t: Tensor<B, 2>| t.into_data().convert::<f64>().to_vec::<f64>().expect("f64 values");
        let diff = calc_diff(&host(grouped_matmul_fp8(rows.clone(), w.clone(), &plan, recipe)), &host(grouped_matmul(rows.clone(), w.clone(), &plan)));

        let t_f32 = time::<B, _>(device, min_time, usize::MAX, || grouped_matmul(rows.clone(), w.clone(), &plan));
        let t_fp8 = time::<B, _>(device, min_time, usize::MAX, || grouped_matmul_fp8(rows.clone(), w.clone(), &plan, recipe));
        let t_fp8q = time::<B, _>(device, min_time, usize::MAX, || fp8_grouped_gemm(&rows_q, &w_q, plan.offsets()));
        let t_naive = time::<B, _>(device, min_time, usize::MAX, || reference::grouped_matmul(rows.clone(), w.clone(), plan.offsets(), false));
        let flops = 2.0 * (t * k * d * f) as f64;
        let gf = |time: Duration| flops / time.as_secs_f64() / 1e9;
        let x = |time: Duration| t_naive.as_secs_f64() / time.as_secs_f64();
        println!(
            "{t:>7} | {:>10.2} {:>7.2}x | {:>10.2} {:>7.2}x | {:>10.2} {:>7.2}x | {:>10.2} | {diff:>9.1e}",
            gf(t_f32),
            x(t_f32),
            gf(t_fp8),
            x(t_fp8),
            gf(t_fp8q),
            x(t_fp8q),
            gf(t_naive)
        );
    }
    println!("speedup = naive time / kernel time; fp8 includes quantizing rows and weights, fp8q runs on operands");
    println!("quantized beforehand; naive = reference::grouped_matmul (read the offsets, one matmul per expert);");
    println!("fp8 diff = calc_diff of the FP8 output against the f32 kernel's.");
}

fn movement<B: MoeBackend>(device: &B::Device, config: &MoeConfig, tokens: &[usize], min_time: Duration) {
    let (d, k, e) = (config.d_model, config.router.top_k, config.router.n_experts);
    println!("\nDispatch and combine kernels vs Burn's select path: d {d}, top-{k} of {e}");
    println!("{:>7} | {:>10} {:>10} {:>8} | {:>10} {:>10} {:>8}", "tokens", "dispatch", "select", "speedup", "combine", "select+sum", "speedup");
    for &t in tokens {
        let logits = Tensor::<B, 2>::random([t, e], Distribution::Normal(0.0, 1.0), device);
        let routing = route(logits, None, &config.router).expect("routing");
        let plan = DispatchPlan::from_routing(&routing);
        let x = Tensor::<B, 2>::random([t, d], Distribution::Normal(0.0, 1.0), device);
        // Burn's way with the same plan — the crate's plain-Burn reference ops: `select` of
        // token rows into expert order; `select` of each slot's row back, weight, sum over k.
        let tokens_of_rows: Tensor<B, 1, Int> = plan.row_slots().div_scalar(k as i64);
        let rows = dispatch(x.clone(), &plan);
        assert_eq!(rows.to_data(), x.clone().select(0, tokens_of_rows.clone()).to_data(), "dispatch and select disagree");
        let flat_weights = routing.weights.clone().reshape([t * k]);
        let burn_combine = |rows: Tensor<B, 2>| reference::combine(rows, plan.positions(), k, Some(flat_weights.clone()));

        let t_dispatch = time::<B, _>(device, min_time, usize::MAX, || dispatch(x.clone(), &plan));
        let t_select = time::<B, _>(device, min_time, usize::MAX, || x.clone().select(0, tokens_of_rows.clone()));
        let t_combine = time::<B, _>(device, min_time, usize::MAX, || combine(rows.clone(), routing.weights.clone(), &plan));
        let t_burn = time::<B, _>(device, min_time, usize::MAX, || burn_combine(rows.clone()));
        // Bytes moved: T·k rows of d f32 read or written once each way, plus T rows.
        let bytes = ((t * k + t) * d * 4) as f64;
        let gbs = |time: Duration| bytes / time.as_secs_f64() / 1e9;
        println!(
            "{t:>7} | {:>6.2} GB/s {:>6.2} GB/s {:>7.2}x | {:>6.2} GB/s {:>6.2} GB/s {:>7.2}x",
            gbs(t_dispatch),
            gbs(t_select),
            t_select.as_secs_f64() / t_dispatch.as_secs_f64(),
            gbs(t_combine),
            gbs(t_burn),
            t_burn.as_secs_f64() / t_combine.as_secs_f64()
        );
    }
    println!("speedup = Burn ops time / kernel time.");
}

fn bench<B: MoeBackend>(device: B::Device, name: &str, args: &Args, default_config: &str, default_tokens: &[usize]) {
    let name_config = args.config.as_deref().unwrap_or(default_config);
    let given: Vec<usize> = args.tokens.iter().map(|&t| t as usize).collect();
    let tokens = if given.is_empty() { default_tokens } else { &given };
    let config = config(name_config);
    let min_time = Duration::from_millis(args.min_time_ms);
    println!("burn-moe on {name} ({device:?}), config {name_config}");
    for table in &args.tables {
        match table.as_str() {
            "layer" => layer::<B>(&device, &config, tokens, min_time),
            "gemm" => expert_gemm::<B>(&device, &config, tokens, min_time),
            "movement" => movement::<B>(&device, &config, tokens, min_time),
            other => unreachable!("clap accepts layer, gemm and movement, not {other:?}"),
        }
    }
}

fn main() {
    let args = Args::parse();
    match args.backend.as_str() {
        #[cfg(feature = "wgpu")]
        "wgpu" => bench::<burn::backend::Wgpu>(burn::backend::wgpu::WgpuDevice::DefaultDevice, "wgpu", &args, "v3-slim", &[64, 512]),
        #[cfg(feature = "cuda")]
        "cuda" => bench::<burn::backend::Cuda>(Default::default(), "cuda", &args, "v3-slim", &[512, 4096, 16384]),
        #[cfg(feature = "ndarray")]
        "ndarray" => bench::<burn::backend::NdArray>(Default::default(), "ndarray (reference ops)", &args, "v3-slim", &[64, 512]),
        #[cfg(feature = "flex")]
        "flex" => bench::<burn::backend::Flex>(Default::default(), "flex (burn-moe's host loops)", &args, "v3-slim", &[64, 512]),
        other => panic!("backend {other:?} is not compiled in; build with --features {other}"),
    }
}
