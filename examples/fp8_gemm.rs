//! FP8 tile-scaled GEMM: a correctness check and a benchmark against Burn's f32 matmul on
//! the same device, in the same run.
//!
//! ```text
//! cargo run --release --example fp8_gemm                        # wgpu (GPU or lavapipe)
//! cargo run --release --example fp8_gemm -- --shapes 128x7168x2048,4096x7168x16384
//! cargo run --release --features cuda --example fp8_gemm -- --backend cuda
//! ```
//!
//! For each shape it prints the time of `fp8_gemm` on pre-quantized operands, of
//! quantizing the activation plus the GEMM (what a forward pass pays), and of Burn's f32
//! `matmul` on the unquantized tensors, with effective throughput (2·M·N·K / time) and the
//! ratio of Burn's time to ours. It first checks the result against the f32 product.

use burn::tensor::{Distribution, Tensor};
use burn_fp8::host::calc_diff;
use burn_fp8::{fp8_gemm, Fp8Backend, Fp8Tensor, QuantConfig};
use clap::Parser;
use std::time::Duration;

#[path = "common/timing.rs"]
mod timing;
use timing::time;

/// FP8 tile-scaled GEMM against Burn's f32 matmul on the same device.
#[derive(Parser, Debug)]
struct Args {
    /// Burn backend.
    #[arg(long, default_value = "wgpu", value_parser = ["wgpu", "cuda", "ndarray"])]
    backend: String,
    /// GEMM shapes MxNxK, comma-separated (default per backend).
    #[arg(long, value_delimiter = ',', value_parser = shape)]
    shapes: Vec<[usize; 3]>,
    /// Minimum measuring time per figure, in milliseconds.
    #[arg(long = "min-time-ms", default_value_t = 1500, value_parser = clap::value_parser!(u64).range(1..))]
    min_time_ms: u64,
}

/// `MxNxK`, each at least 1.
fn shape(s: &str) -> Result<[usize; 3], String> {
    let dims: Vec<usize> = s.split('x').map(|d| d.parse::<usize>().map_err(|e| format!("{s:?}: {e}"))).collect::<Result<_, _>>()?;
    match dims[..] {
        [m, n, k] if m > 0 && n > 0 && k > 0 => Ok([m, n, k]),
        _ => Err(format!("{s:?} is not MxNxK with every dimension at least 1")),
    }
}

/// Throughput unit: TFLOP/s on GPUs, GFLOP/s where a CPU runs the kernels.
struct Unit(&'static str, f64);

fn bench<B: Fp8Backend>(device: B::Device, name: &str, unit: Unit, args: &Args, default_shapes: &[[usize; 3]]) {
    let shapes = if args.shapes.is_empty() { default_shapes.to_vec() } else { args.shapes.clone() };
    println!("FP8 tile-scaled GEMM vs Burn f32 matmul on {name} ({device:?})");
    println!(
        "{:>22} | {:>10} {:>9} | {:>12} {:>9} | {:>10} {:>9} | {:>8} | {:>9}",
        "M x N x K", "fp8 gemm", unit.0, "quant+gemm", unit.0, "f32 matmul", unit.0, "speedup", "calc_diff"
    );
    for [m, n, k] in shapes {
        let x = Tensor::<B, 2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<B, 2>::random([n, k], Distribution::Normal(0.0, 0.05), &device);
        let wt = w.clone().transpose();
        let wq = Fp8Tensor::quantize(w.clone(), QuantConfig::weight());
        let xq = Fp8Tensor::quantize(x.clone(), QuantConfig::activation());

        // Correctness on this very data: DeepGEMM's whole-output difference vs f32.
        let host = |t: Tensor<B, 2>| t.into_data().convert::<f64>().to_vec::<f64>().expect("f64 values");
        let diff = calc_diff(&host(fp8_gemm(&xq, &wq)), &host(x.clone().matmul(wt.clone())));

        // Each product is kept until the device sync (a fused backend may skip work whose
        // result is dropped unread).
        let min_time = Duration::from_millis(args.min_time_ms);
        let t_gemm = time::<B, _>(&device, min_time, usize::MAX, || fp8_gemm(&xq, &wq));
        let t_quant_gemm = time::<B, _>(&device, min_time, usize::MAX, || fp8_gemm(&Fp8Tensor::quantize(x.clone(), QuantConfig::activation()), &wq));
        let t_f32 = time::<B, _>(&device, min_time, usize::MAX, || x.clone().matmul(wt.clone()));
        let flops = 2.0 * (m * n * k) as f64;
        let tflops = |t: Duration| flops / t.as_secs_f64() / unit.1;
        let ms = |t: Duration| format!("{:.3} ms", t.as_secs_f64() * 1e3);
        println!(
            "{:>22} | {:>10} {:>9.3} | {:>12} {:>9.3} | {:>10} {:>9.3} | {:>7.2}x | {:>9.2e}",
            format!("{m} x {n} x {k}"),
            ms(t_gemm),
            tflops(t_gemm),
            ms(t_quant_gemm),
            tflops(t_quant_gemm),
            ms(t_f32),
            tflops(t_f32),
            t_f32.as_secs_f64() / t_gemm.as_secs_f64(),
            diff
        );
    }
    println!("speedup = f32 matmul time / fp8 gemm time (pre-quantized operands); calc_diff vs the f32 product.");
    println!("Without FP8 matrix units (a CPU, lavapipe) FP8 decodes in software: its payoff there is memory (1 byte per operand element instead of 4), not time.");
}

fn main() {
    let args = Args::parse();
    match args.backend.as_str() {
        #[cfg(feature = "wgpu")]
        "wgpu" => bench::<burn::backend::Wgpu>(
            burn::backend::wgpu::WgpuDevice::DefaultDevice,
            "wgpu",
            Unit("GFLOP/s", 1e9),
            &args,
            // Shapes a CPU (lavapipe) finishes in seconds; DeepSeek-V3 widths scaled by 1/8.
            &[[1, 896, 896], [16, 896, 896], [64, 896, 896], [128, 896, 896], [128, 256, 896], [256, 1024, 1024], [512, 512, 512]],
        ),
        #[cfg(feature = "cuda")]
        "cuda" => {
            bench::<burn::backend::Cuda>(Default::default(), "cuda", Unit("TFLOP/s", 1e12), &args, &[[4096, 7168, 16384], [128, 7168, 16384], [64, 2112, 7168], [4096, 2048, 7168]])
        }
        #[cfg(feature = "ndarray")]
        "ndarray" => bench::<burn::backend::NdArray>(Default::default(), "ndarray (reference ops)", Unit("GFLOP/s", 1e9), &args, &[[128, 256, 256], [128, 896, 896]]),
        other => panic!("backend {other:?} is not compiled in; build with --features {other}"),
    }
}
