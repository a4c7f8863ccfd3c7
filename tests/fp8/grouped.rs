//! The grouped FP8 GEMM (one launch for every group, the expert GEMM of a MoE layer)
//! against an f64 product of each group's dequantized operands, the plain FP8 GEMM, and
//! the reference backend; on the kernels, unfused and fused.
//!
//! Tolerances, as for the plain GEMM (gemm.rs): calc_diff < 1e-6 against f64 of the
//! dequantized operands (only f32 accumulation rounding separates them), kernel vs
//! reference backend elementwise relative 1e-5 (same products, another summation order),
//! and < 2e-3 against the unquantized f64 product (E4M3 rounding: ≈ 6.8e-4 expected for
//! random data, a single case scatters around it).

use crate::common::*;
use burn::tensor::{Int, Tensor, TensorData};
use burn_fp8::host::{calc_diff, matmul_nt_f64, HostFp8};
use burn_fp8::kernel::gemm::launch_gemm;
use burn_fp8::{fp8_gemm, fp8_grouped_gemm, Fp8Backend, Fp8Tensor, QuantConfig};

struct Case {
    /// Rows per group (0: an empty group).
    sizes: Vec<usize>,
    n: usize,
    k: usize,
    a: Vec<f32>,
    b: Vec<f32>,
}

impl Case {
    fn new(rng: &mut Rng, sizes: Vec<usize>, n: usize, k: usize) -> Self {
        let rows: usize = sizes.iter().sum();
        let (a, b) = (rng.matrix(rows, k), rng.matrix_blocks(sizes.len() * n, k, 128));
        Case { sizes, n, k, a, b }
    }

    fn rows(&self) -> usize {
        self.sizes.iter().sum()
    }

    fn offsets(&self) -> Vec<i64> {
        let mut o = vec![0i64];
        for s in &self.sizes {
            o.push(o.last().unwrap() + *s as i64);
        }
        o
    }

    fn operands<B: Fp8Backend>(&self, ca: QuantConfig, cb: QuantConfig, device: &B::Device) -> (Fp8Tensor<B>, Fp8Tensor<B>, Tensor<B, 1, Int>) {
        let g = self.sizes.len();
        let offsets = Tensor::from_data(TensorData::new(self.offsets(), [g + 1]), device);
        (quantize::<B>(&self.a, [self.rows(), self.k], ca, device), quantize::<B>(&self.b, [g * self.n, self.k], cb, device), offsets)
    }

    /// Per group, the f64 product of its rows of `a` with its `[N, K]` slice of `b`
    /// (row-major operands), concatenated.
    fn per_group(&self, a: &[f64], b: &[f64]) -> Vec<f64> {
        let (n, k) = (self.n, self.k);
        let o = self.offsets();
        (0..self.sizes.len())
            .flat_map(|g| {
                let (s, e) = (o[g] as usize, o[g + 1] as usize);
                matmul_nt_f64(&a[s * k..e * k], &b[g * n * k..(g + 1) * n * k], e - s, n, k)
            })
            .collect()
    }
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Launches the kernel straight into a NaN-poisoned output, so that an unwritten row fails.
fn launch_poisoned(a: &Fp8Tensor<Cube>, b: &Fp8Tensor<Cube>, offsets: &Tensor<Cube, 1, Int>, n: usize) -> Vec<f32> {
    let [rows, k] = a.shape();
    let out = poisoned::<Cube>([rows, n], &kernel_device());
    let int = |t: &Tensor<Cube, 2, Int>| t.clone().into_primitive();
    let float = |t: &Tensor<Cube, 2>| t.clone().into_primitive().tensor();
    let offsets = burn_cubecl::kernel::cast(offsets.clone().into_primitive(), burn::tensor::DType::U32);
    launch_gemm(int(a.data()), float(a.scales()), a.config(), int(b.data()), float(b.scales()), b.config(), Some(offsets), float(&out), k);
    to_vec(out)
}

fn check(case: &Case, ca: QuantConfig, cb: QuantConfig, label: &str) {
    let what = format!("{label}: groups {:?} N={} K={} A {:?} B {:?}", case.sizes, case.n, case.k, ca.tile, cb.tile);
    let device = kernel_device();
    let (a, b, offsets) = case.operands::<Cube>(ca, cb, &device);
    let d = launch_poisoned(&a, &b, &offsets, case.n);
    assert!(d.iter().all(|v| v.is_finite()), "{what}: unwritten or non-finite output");
    assert_eq!(d, to_vec(fp8_grouped_gemm(&a, &b, offsets)), "{what}: launcher and API differ");

    let d64 = f64s(&d);
    let dequant = case.per_group(&HostFp8::from_tensor(&a).dequantize_f64(), &HostFp8::from_tensor(&b).dequantize_f64());
    let diff = calc_diff(&d64, &dequant);
    assert!(diff < 1e-6, "{what}: diff vs f64 of the dequantized operands {diff:e}");
    let diff = calc_diff(&d64, &case.per_group(&f64s(&case.a), &f64s(&case.b)));
    assert!(diff < 2e-3, "{what}: diff vs the unquantized product {diff:e}");

    let (a, b, offsets) = case.operands::<Ref>(ca, cb, &Default::default());
    let r = to_vec(fp8_grouped_gemm(&a, &b, offsets));
    let scale = r.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in d.iter().zip(&r).enumerate() {
        assert!((x - y).abs() <= 1e-5 * (y.abs() + 1e-3 * scale), "{what} [{}, {}]: kernel {x}, reference {y}", i / case.n, i % case.n);
    }

    let (a, b, offsets) = case.operands::<Fused>(ca, cb, &device);
    assert_eq!(to_vec(fp8_grouped_gemm(&a, &b, offsets)), d, "{what}: fused wgpu differs from the kernel");
}

#[test]
fn grouped_gemm_matches_per_group_products() {
    let mut rng = Rng::new("grouped_gemm");
    let (act, weight) = (QuantConfig::activation(), QuantConfig::weight());
    // Empty groups first, between and last; a group over two row tiles; tails in N and K.
    check(&Case::new(&mut rng, vec![0, 3, 0, 5, 1, 130, 0], 128, 256), act, weight, "edges");
    check(&Case::new(&mut rng, vec![1, 7, 0, 20], 72, 200), act, weight, "N and K tails, blocks across groups");
    check(&Case::new(&mut rng, vec![4, 0, 9], 40, 130), act, act, "1x128 B tiles");
    // DeepSeek-V3's expert GEMMs at 1/8 width (up 7168→2048, down 2048→7168), 16 experts
    // with uneven loads.
    let sizes: Vec<usize> = (0..16).map(|e| if e % 5 == 3 { 0 } else { (rng.next_u64() % 48) as usize + 1 }).collect();
    check(&Case::new(&mut rng, sizes.clone(), 256, 896), act, weight, "V3 up");
    check(&Case::new(&mut rng, sizes, 896, 256), act, weight, "V3 down");
}

#[test]
fn one_group_is_the_plain_gemm() {
    let mut rng = Rng::new("grouped_one_group");
    for m in [1, 37, 200] {
        let case = Case::new(&mut rng, vec![m], 96, 384);
        let (a, b, offsets) = case.operands::<Cube>(QuantConfig::activation(), QuantConfig::weight(), &kernel_device());
        assert_eq!(to_vec(fp8_grouped_gemm(&a, &b, offsets)), to_vec(fp8_gemm(&a, &b)), "M={m}");
    }
}

#[test]
fn empty_rows_and_named_shape_errors() {
    let device = kernel_device();
    let case = Case { sizes: vec![0, 0], n: 8, k: 256, a: vec![], b: vec![1.0; 16 * 256] };
    let (a, b, offsets) = case.operands::<Cube>(QuantConfig::activation(), QuantConfig::weight(), &device);
    assert_eq!(fp8_grouped_gemm(&a, &b, offsets).dims(), [0, 8]);

    let a = quantize::<Cube>(&[1.0; 4 * 256], [4, 256], QuantConfig::activation(), &device);
    let b = quantize::<Cube>(&[1.0; 9 * 128], [9, 128], QuantConfig::weight(), &device);
    let offsets = Tensor::<Cube, 1, Int>::from_ints([0, 2, 4], &device);
    let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fp8_grouped_gemm(&a, &b, offsets))).unwrap_err();
    let msg = err.downcast::<String>().unwrap();
    assert!(msg.contains("A [4, 256], B [9, 128], offsets [3]"), "{msg}");
}
