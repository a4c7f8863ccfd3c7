//! The FP8 expert GEMM (`grouped_matmul_fp8`, burn-fp8's grouped tile-scaled GEMM) and the
//! `Moe` layer with FP8 experts.
//!
//! Tolerances:
//! - kernel vs reference backend, same FP8 op on the same inputs: quantization is bit for
//!   bit the same on both, so only the f32 summation order differs: relative 1e-5 of each
//!   tensor's max.
//! - FP8 against f32: DeepGEMM's calc_diff `1 − 2Σxy/Σ(x²+y²)`. One E4M3 GEMM gives
//!   ≈ 7e-4 on random data (see tests/fp8); bound 2e-3 per GEMM, and 5e-3 for the layer,
//!   whose output passes through three FP8 GEMMs (the f32 shared expert adds signal).
//! - the weight gradient is f32 (the FP8 recipe of this op quantizes Fprop and Dgrad):
//!   relative 1e-5 to the f32 op's.

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn_fp8::host::calc_diff;
use burn_fp8::linear::Fp8Recipe;
use burn_moe::dispatch::{dispatch, grouped_matmul, grouped_matmul_fp8};
use burn_moe::{Moe, MoeBackend, MoeConfig, MoeOutput};

use crate::common::{host, host_int, kernel_device, Cube, Fused, Ref, Rng};
use crate::dispatch::{float, plan, Case, Inputs};
use crate::layer::{copy, fit_teacher};

fn rel(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite values");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err <= tol * scale, "{what}: max error {err:.3e} exceeds {tol:e} · {scale:.3e}");
}

fn diff(got: &[f32], want: &[f32]) -> f64 {
    let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    calc_diff(&f(got), &f(want))
}

const CASES: &[Case] = &[
    Case { name: "one token, k=1", t: 1, k: 1, e: 4, d: 128, n: 64, empty: &[] },
    Case { name: "empty experts, tails", t: 37, k: 3, e: 8, d: 200, n: 72, empty: &[2, 5] },
    // 256 experts of [256, 128]: 32 MiB of weights (lavapipe refuses V3's 1/8 widths,
    // 235 MB, as one buffer).
    Case { name: "V3 routing (256 experts, top-8)", t: 16, k: 8, e: 256, d: 256, n: 128, empty: &[] },
    Case { name: "48 tokens over 16 experts", t: 48, k: 4, e: 16, d: 256, n: 128, empty: &[3, 9] },
];

/// `y = grouped(dispatch(x))` in FP8 (or f32) and the gradients of `x` and the weights
/// for the upstream gradient `dy_rows`.
fn run<B: AutodiffBackend + MoeBackend>(c: &Case, inp: &Inputs, dy_rows: &[f32], fp8: bool, device: &B::Device) -> [Vec<f32>; 3] {
    let plan = plan::<B>(c, inp, device);
    let x = float::<B, 2>(&inp.x, [c.t, c.d], device).require_grad();
    let w = float::<B, 3>(&inp.w, [c.e, c.d, c.n], device).require_grad();
    let rows = dispatch(x.clone(), &plan);
    let y = if fp8 { grouped_matmul_fp8(rows, w.clone(), &plan, Fp8Recipe::deepseek_v3()) } else { grouped_matmul(rows, w.clone(), &plan) };
    let grads = (y.clone() * float::<B, 2>(dy_rows, [c.t * c.k, c.n], device)).sum().backward();
    [host(y), host(x.grad(&grads).expect("d x")), host(w.grad(&grads).expect("d w"))]
}

#[test]
fn fp8_grouped_matmul_matches_reference_and_tracks_f32() {
    let mut rng = Rng::new("fp8_grouped_matmul");
    for c in CASES {
        let inp = Inputs::new(c, &mut rng);
        let dy_rows = rng.values(c.t * c.k * c.n);
        let kernel = run::<Autodiff<Cube>>(c, &inp, &dy_rows, true, &kernel_device());
        let fused = run::<Autodiff<Fused>>(c, &inp, &dy_rows, true, &kernel_device());
        let reference = run::<Autodiff<Ref>>(c, &inp, &dy_rows, true, &Default::default());
        let f32_path = run::<Autodiff<Cube>>(c, &inp, &dy_rows, false, &kernel_device());
        for (i, what) in ["y", "d x", "d w"].iter().enumerate() {
            let what = format!("{}: {what}", c.name);
            rel(&format!("{what} kernel vs reference backend"), &kernel[i], &reference[i], 1e-5);
            rel(&format!("{what} fused vs kernel"), &fused[i], &kernel[i], 1e-6);
        }
        for i in 0..2 {
            let d = diff(&kernel[i], &f32_path[i]);
            assert!(d < 2e-3, "{}: {} FP8 vs f32 calc_diff {d:e}", c.name, ["y", "d x"][i]);
        }
        rel(&format!("{}: d w (f32 in both)", c.name), &kernel[2], &f32_path[2], 1e-5);
    }
}

fn layer_run<B: AutodiffBackend + MoeBackend>(moe: &Moe<B>, x: &[f32], shape: [usize; 3], device: &B::Device) -> [Vec<f32>; 4] {
    let x = float::<B, 3>(x, shape, device).require_grad();
    let MoeOutput { output, counts, .. } = moe.forward(x.clone());
    let grads = output.clone().powi_scalar(2).sum().backward();
    let counts = host_int(counts).into_iter().map(|c| c as f32).collect();
    [host(output), counts, host(x.grad(&grads).expect("d x")), host(moe.experts.w_down.grad(&grads).expect("d w_down"))]
}

fn fp8<B: MoeBackend>(moe: Moe<B>) -> Moe<B> {
    Moe { experts: moe.experts.with_fp8(Some(Fp8Recipe::deepseek_v3())), ..moe }
}

#[test]
fn fp8_layer_tracks_f32_layer_on_kernels_and_reference() {
    let mut rng = Rng::new("fp8_layer");
    // Expert width a multiple of 128, so that every weight block belongs to one expert.
    let config = MoeConfig { d_model: 256, d_expert: 128, init_std: 0.05, ..MoeConfig::tiny() };
    let shape = [2, 24, 256];
    let x = rng.values(shape.iter().product());
    let device = kernel_device();
    let f32_layer: Moe<Autodiff<Cube>> = config.init(&device);
    // Copied through the host: a clone of a freshly initialized module would initialize
    // its (lazy) parameters again, with other random values.
    let fp8_layer = fp8(copy(&f32_layer, config.init::<Autodiff<Cube>>(&device), &device));
    let ref_layer: Moe<Autodiff<Ref>> = fp8(copy(&f32_layer, config.init::<Autodiff<Ref>>(&Default::default()), &Default::default()));
    let want = layer_run(&f32_layer, &x, shape, &device);
    let got = layer_run(&fp8_layer, &x, shape, &device);
    let on_ref = layer_run(&ref_layer, &x, shape, &Default::default());
    assert_eq!(got[1], want[1], "routing (f32 in both) picks the same experts");
    for (i, what) in ["output", "counts", "d input", "d w_down"].iter().enumerate() {
        let d = diff(&got[i], &want[i]);
        eprintln!("FP8 layer vs f32 layer, {what}: calc_diff {d:.2e}");
        assert!(d < 5e-3, "{what}: FP8 vs f32 layer calc_diff {d:e}");
        // Kernel and reference quantize the same inputs bit for bit except where f32
        // rounding of an intermediate lands on a code boundary: pooled, far below 1e-5.
        let d = diff(&got[i], &on_ref[i]);
        assert!(d < 1e-5, "{what}: FP8 kernel vs FP8 reference calc_diff {d:e}");
    }
}

#[test]
fn fp8_layer_trains() {
    let config = MoeConfig { init_std: 0.1, fp8: Some(Fp8Recipe::deepseek_v3()), ..MoeConfig::tiny() };
    let (moe, losses) = fit_teacher::<Autodiff<Cube>>(&config, &kernel_device());
    assert_eq!(moe.experts.fp8, Some(Fp8Recipe::deepseek_v3()));
    assert!(losses[29] < 0.5 * losses[0], "FP8 training loss {} → {}", losses[0], losses[29]);
}
