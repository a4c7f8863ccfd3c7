//! The tile-scaled GEMM against an f64 product of the dequantized operands, the f32 product
//! of the unquantized inputs, and the reference backend.
//!
//! Tolerances (DeepGEMM's whole-output `calc_diff = 1 − 2Σxy/Σ(x²+y²)`):
//! - vs f64 of the dequantized inputs: < 1e-6. Both compute the same sum of exact FP8
//!   products; only f32 accumulation rounding (relative ~K·2^-24 per dot product, far less
//!   on average) separates them.
//! - vs the unquantized f32 product, pooled over a test's outputs: < 1e-3 (E4M3). E4M3
//!   keeps 4 significant bits; its RMS relative rounding error is ≈ 0.026, so calc_diff
//!   (about the mean squared relative error of the output) is ≈ 6.8e-4 for random data.
//!   Measured here: 3.5e-4 to 9e-4 per shape. See `Pooled` for why the bound is pooled.
//! - kernel vs reference backend: < 1e-7 and elementwise relative 1e-5 (same products,
//!   different summation order).

use crate::common::*;
use burn::tensor::Tensor;
use burn_fp8::host::{calc_diff, matmul_nt_f64, HostFp8};
use burn_fp8::kernel::gemm::launch_gemm;
use burn_fp8::{fp8_gemm, Fp8Format, Fp8Tensor, QuantConfig};

/// (M, N, K): edges (M = 1, M = 129, N and K tails) and DeepSeek-V3 projections scaled by
/// 1/8 with 128 tokens: q_a_proj 7168→1536, expert up 7168→2048, expert down 2048→7168.
const SHAPES: [(usize, usize, usize); 9] =
    [(1, 64, 128), (1, 300, 896), (16, 17, 130), (129, 200, 300), (65, 65, 1), (128, 192, 896), (128, 256, 896), (128, 896, 256), (257, 129, 384)];

struct Case {
    a: Vec<f32>,
    b: Vec<f32>,
    m: usize,
    n: usize,
    k: usize,
}

impl Case {
    /// A: activations, magnitude per row; B: weights, magnitude per 128-row block.
    fn new(rng: &mut Rng, (m, n, k): (usize, usize, usize)) -> Self {
        Case { a: rng.matrix(m, k), b: rng.matrix_blocks(n, k, 128), m, n, k }
    }

    fn exact_f64(&self) -> Vec<f64> {
        let a: Vec<f64> = self.a.iter().map(|&v| v as f64).collect();
        let b: Vec<f64> = self.b.iter().map(|&v| v as f64).collect();
        matmul_nt_f64(&a, &b, self.m, self.n, self.k)
    }
}

fn run<B: burn_fp8::Fp8Backend>(case: &Case, ca: QuantConfig, cb: QuantConfig, device: &B::Device) -> (Vec<f32>, HostFp8, HostFp8) {
    let a = quantize::<B>(&case.a, [case.m, case.k], ca, device);
    let b = quantize::<B>(&case.b, [case.n, case.k], cb, device);
    let d = to_vec(fp8_gemm(&a, &b));
    (d, HostFp8::from_tensor(&a), HostFp8::from_tensor(&b))
}

/// Checks one case against the f64 product of the dequantized operands and against the
/// reference backend; returns (output, unquantized f64 product) for the pooled check.
fn check(case: &Case, ca: QuantConfig, cb: QuantConfig, rng_label: &str) -> (Vec<f64>, Vec<f64>) {
    let (d, qa, qb) = run::<Cube>(case, ca, cb, &kernel_device());
    let what = format!("{rng_label} M={} N={} K={} A {:?} B {:?}", case.m, case.n, case.k, ca.tile, cb.tile);
    let d64: Vec<f64> = d.iter().map(|&v| v as f64).collect();
    assert!(d.iter().all(|v| v.is_finite()), "{what}: non-finite output");

    let dequant = matmul_nt_f64(&qa.dequantize_f64(), &qb.dequantize_f64(), case.m, case.n, case.k);
    let diff = calc_diff(&d64, &dequant);
    assert!(diff < 1e-6, "{what}: diff vs f64 of dequantized inputs {diff:e}");

    let exact = case.exact_f64();

    let (r, _, _) = run::<Ref>(case, ca, cb, &Default::default());
    let r64: Vec<f64> = r.iter().map(|&v| v as f64).collect();
    let diff = calc_diff(&d64, &r64);
    assert!(diff < 1e-7, "{what}: diff vs reference backend {diff:e}");
    let scale = r.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in d.iter().zip(&r).enumerate() {
        assert!((x - y).abs() <= 1e-5 * (y.abs() + 1e-3 * scale), "{what} [{}, {}]: kernel {x}, reference {y}", i / case.n, i % case.n);
    }
    // Normalise each output by ‖a_i‖·‖b_j‖ so that every output weighs the same in the pooled
    // calc_diff (see `Pooled`).
    let norms =
        |v: &[f32], rows: usize| -> Vec<f64> { (0..rows).map(|r| v[r * case.k..(r + 1) * case.k].iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt().max(1e-300)).collect() };
    let (na, nb) = (norms(&case.a, case.m), norms(&case.b, case.n));
    let weight = |i: usize| na[i / case.n] * nb[i % case.n];
    let d64 = d64.iter().enumerate().map(|(i, v)| v / weight(i)).collect();
    let exact = exact.iter().enumerate().map(|(i, v)| v / weight(i)).collect();
    (d64, exact)
}

/// The quantization error against the unquantized product, pooled over all outputs of a
/// test: calc_diff estimates the mean squared relative error (≈ 6.8e-4 for two E4M3
/// operands: E4M3's RMS relative rounding error is ≈ 0.026, squared and averaged over the
/// two operands). A 64-element output (M = 1) alone scatters ±20% around it, so the 1e-3
/// bound is applied to all outputs of the test. Each output is first divided by
/// ‖a_i‖·‖b_j‖: the test rows span four decades of magnitude, and unweighted, calc_diff
/// would be decided by the few largest rows.
struct Pooled {
    ours: Vec<f64>,
    exact: Vec<f64>,
}

impl Pooled {
    fn new() -> Self {
        Pooled { ours: Vec::new(), exact: Vec::new() }
    }

    fn add(&mut self, (ours, exact): (Vec<f64>, Vec<f64>)) {
        self.ours.extend(ours);
        self.exact.extend(exact);
    }

    fn assert_below(&self, bound: f64, what: &str) {
        let diff = calc_diff(&self.ours, &self.exact);
        assert!(diff < bound, "{what}: diff vs the unquantized product over {} outputs: {diff:e}", self.ours.len());
    }
}

#[test]
fn forward_tiling_act_1x128_weight_128x128() {
    let mut rng = Rng::new("forward_tiling");
    let mut pooled = Pooled::new();
    for shape in SHAPES {
        pooled.add(check(&Case::new(&mut rng, shape), QuantConfig::activation(), QuantConfig::weight(), "fprop"));
    }
    pooled.assert_below(1e-3, "fprop");
}

#[test]
fn weight_gradient_tiling_both_1x128() {
    // Wgrad: dW = dYᵀ·X with both operands quantized along the token dimension.
    let mut rng = Rng::new("wgrad_tiling");
    let mut pooled = Pooled::new();
    for shape in [(64, 96, 256), (129, 130, 200)] {
        pooled.add(check(&Case::new(&mut rng, shape), QuantConfig::activation(), QuantConfig::activation(), "wgrad"));
    }
    pooled.assert_below(1e-3, "wgrad");
}

#[test]
fn e5m2_operands_and_power_of_two_scales() {
    let mut rng = Rng::new("e5m2_pow2");
    let case = Case::new(&mut rng, (96, 160, 300));
    let e5 = QuantConfig::activation().with_format(Fp8Format::E5M2);
    let pow2 = QuantConfig::weight().with_scale_mode(burn_fp8::ScaleMode::PowerOfTwo);
    // E5M2 keeps 3 significant bits: its squared relative error is 4× E4M3's (≈ 2.7e-3),
    // averaged with the E4M3 operand's ≈ 1.7e-3 expected; bound 4e-3.
    let mut pooled = Pooled::new();
    pooled.add(check(&case, e5, pow2, "e5m2×pow2"));
    pooled.assert_below(4e-3, "e5m2×pow2");
}

#[test]
fn transposed_operands_compute_wgrad() {
    // dW[N, K] = dYᵀ[N, M] · X[M, K], with dY [M, N] and X [M, K] quantized transposed.
    let mut rng = Rng::new("transposed_wgrad");
    let (m, n, k) = (200, 48, 136);
    let dy = rng.matrix(m, n);
    let x = rng.matrix(m, k);
    let device = kernel_device();
    let dyt = Fp8Tensor::quantize_transposed(tensor::<Cube>(&dy, [m, n], &device), QuantConfig::activation());
    let xt = Fp8Tensor::quantize_transposed(tensor::<Cube>(&x, [m, k], &device), QuantConfig::activation());
    let dw: Vec<f64> = to_vec(fp8_gemm(&dyt, &xt)).iter().map(|&v| v as f64).collect();
    let dyt64: Vec<f64> = (0..n).flat_map(|j| (0..m).map(move |i| (i, j))).map(|(i, j)| dy[i * n + j] as f64).collect();
    let xt64: Vec<f64> = (0..k).flat_map(|j| (0..m).map(move |i| (i, j))).map(|(i, j)| x[i * k + j] as f64).collect();
    let exact = matmul_nt_f64(&dyt64, &xt64, n, k, m);
    let diff = calc_diff(&dw, &exact);
    assert!(diff < 1e-3, "wgrad through transposed quantization: diff {diff:e}");
    let dequant = matmul_nt_f64(&HostFp8::from_tensor(&dyt).dequantize_f64(), &HostFp8::from_tensor(&xt).dequantize_f64(), n, k, m);
    assert!(calc_diff(&dw, &dequant) < 1e-6);
}

#[test]
fn every_output_is_written_and_empty_k_gives_zeros() {
    let mut rng = Rng::new("gemm_poison");
    let device = kernel_device();
    for (m, n, k) in [(129, 200, 300), (5, 130, 256), (7, 9, 0)] {
        let case = Case::new(&mut rng, (m, n, k));
        let a = quantize::<Cube>(&case.a, [m, k], QuantConfig::activation(), &device);
        let b = quantize::<Cube>(&case.b, [n, k], QuantConfig::weight(), &device);
        let out = poisoned::<Cube>([m, n], &device);
        let prim = |t: &Tensor<Cube, 2, burn::tensor::Int>| t.clone().into_primitive();
        let fprim = |t: &Tensor<Cube, 2>| t.clone().into_primitive().tensor();
        launch_gemm(prim(a.data()), fprim(a.scales()), a.config(), prim(b.data()), fprim(b.scales()), b.config(), None, fprim(&out), k);
        let got = to_vec(out);
        assert!(got.iter().all(|v| v.is_finite()), "M={m} N={n} K={k}: unwritten output left");
        if k == 0 {
            assert!(got.iter().all(|&v| v == 0.0));
        } else {
            assert_eq!(got, to_vec(fp8_gemm(&a, &b)));
        }
    }
}

#[test]
fn empty_m_or_n() {
    let device = kernel_device();
    let a = quantize::<Cube>(&[], [0, 256], QuantConfig::activation(), &device);
    let b = quantize::<Cube>(&vec![1.0; 3 * 256], [3, 256], QuantConfig::weight(), &device);
    assert_eq!(fp8_gemm(&a, &b).dims(), [0, 3]);
    assert_eq!(fp8_gemm(&b, &a).dims(), [3, 0]);
}

#[test]
#[should_panic(expected = "got A [4, 256] and B [8, 128]")]
fn mismatched_k_names_the_shapes() {
    let device = kernel_device();
    let a = quantize::<Cube>(&vec![1.0; 4 * 256], [4, 256], QuantConfig::activation(), &device);
    let b = quantize::<Cube>(&vec![1.0; 8 * 128], [8, 128], QuantConfig::weight(), &device);
    let _ = fp8_gemm(&a, &b);
}
