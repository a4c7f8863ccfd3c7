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

use burn::tensor::{backend::Backend, Distribution, Tensor};
use burn_fp8::{fp8_gemm, Fp8Backend, Fp8Tensor, QuantConfig};
use std::time::{Duration, Instant};

struct Args {
    backend: String,
    shapes: Vec<[usize; 3]>,
    min_time: Duration,
}

fn parse_args() -> Args {
    let mut args = Args { backend: "wgpu".into(), shapes: Vec::new(), min_time: Duration::from_millis(1500) };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--backend" => args.backend = value(),
            "--shapes" => {
                args.shapes = value()
                    .split(',')
                    .map(|s| {
                        let dims: Vec<usize> = s.split('x').map(|d| d.parse().expect("shape MxNxK")).collect();
                        assert_eq!(dims.len(), 3, "shape {s:?} is not MxNxK");
                        [dims[0], dims[1], dims[2]]
                    })
                    .collect()
            }
            "--min-time-ms" => args.min_time = Duration::from_millis(value().parse().expect("milliseconds")),
            "--help" | "-h" => {
                println!("fp8_gemm [--backend wgpu|cuda|ndarray] [--shapes MxNxK,...] [--min-time-ms N]");
                std::process::exit(0);
            }
            other => panic!("unknown flag {other}; see --help"),
        }
    }
    args
}

/// Mean time of `f` over at least 3 runs and `min_time`, after one warm-up run.
fn time<B: Backend>(device: &B::Device, min_time: Duration, mut f: impl FnMut()) -> Duration {
    f();
    B::sync(device).expect("device sync");
    let start = Instant::now();
    let mut runs = 0u32;
    while runs < 3 || start.elapsed() < min_time {
        f();
        B::sync(device).expect("device sync");
        runs += 1;
    }
    start.elapsed() / runs
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
        let ours = fp8_gemm(&xq, &wq);
        let exact = x.clone().matmul(wt.clone());
        let xy = (ours.clone() * exact.clone()).sum().into_scalar().elem::<f64>();
        let sq = (ours.clone() * ours + exact.clone() * exact).sum().into_scalar().elem::<f64>();
        let diff = if sq == 0.0 { 0.0 } else { 1.0 - 2.0 * xy / sq };

        let t_gemm = time::<B>(&device, args.min_time, || {
            let _ = fp8_gemm(&xq, &wq);
        });
        let t_quant_gemm = time::<B>(&device, args.min_time, || {
            let _ = fp8_gemm(&Fp8Tensor::quantize(x.clone(), QuantConfig::activation()), &wq);
        });
        let t_f32 = time::<B>(&device, args.min_time, || {
            let _ = x.clone().matmul(wt.clone());
        });
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
}

use burn::tensor::ElementConversion;

fn main() {
    let args = parse_args();
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
