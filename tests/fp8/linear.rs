//! `Fp8Linear` against an f32 `Linear` and an f64 host product: forward and both
//! gradients, the split backward, conversions, optimizer steps, shapes.
//!
//! Tolerance against the unquantized product: calc_diff < 1e-3 for each GEMM, each output
//! first divided by the norms of the two vectors it is the dot product of (the inputs'
//! rows span four decades, see `gemm.rs`'s `Pooled`). Both operands of every GEMM are
//! E4M3 (RMS relative rounding error ≈ 0.026), so the expected value is ≈ 7e-4 whichever
//! GEMM it is; each GEMM here has ≥ 24k outputs, which keeps the estimate within a few
//! percent. A floor of 1e-5 checks the FP8 path really quantized. The f32 `Linear` is
//! checked against the same f64 product at 1e-9.

use crate::common::*;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::Autodiff;
use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::tensor::{backend::AutodiffBackend, Tensor, TensorData};
use burn_fp8::host::{calc_diff, matmul_nt_f64};
use burn_fp8::linear::{copy_params, ops, Fp8Linear, Fp8Recipe, LinearLayer, ParamCopyError, WeightGradQueue};
use burn_fp8::Fp8Backend;

type AdCube = Autodiff<Cube>;
type AdFused = Autodiff<Fused>;
type AdRef = Autodiff<Ref>;

/// A layer and its inputs: `x [b, t, k]`, `w [k, n]`, `bias [n]`, upstream gradient `g`.
struct Data {
    b: usize,
    t: usize,
    k: usize,
    n: usize,
    x: Vec<f32>,
    w: Vec<f32>,
    bias: Option<Vec<f32>>,
    g: Vec<f32>,
}

impl Data {
    fn new(rng: &mut Rng, [b, t, k, n]: [usize; 4], bias: bool) -> Self {
        let w = rng.matrix_blocks(k, n, 128).iter().map(|v| v * 0.05).collect();
        let bias = bias.then(|| (0..n).map(|_| rng.normal()).collect());
        Data { b, t, k, n, x: rng.matrix(b * t, k), w, bias, g: rng.matrix(b * t, n) }
    }

    fn m(&self) -> usize {
        self.b * self.t
    }

    fn linear<B: AutodiffBackend>(&self, device: &B::Device) -> Linear<B> {
        let weight = Param::from_data(TensorData::new(self.w.clone(), [self.k, self.n]), device);
        let bias = self.bias.as_ref().map(|b| Param::from_data(TensorData::new(b.clone(), [self.n]), device));
        Linear { weight, bias }
    }
}

/// Output and gradients of one layer, as host vectors.
#[derive(Debug)]
struct Outs {
    y: Vec<f32>,
    dx: Vec<f32>,
    dw: Vec<f32>,
    db: Option<Vec<f32>>,
}

fn host<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

/// Forward `(y · g).sum()` and backward through `Linear` (fp8 = false) or `Fp8Linear`.
/// With `queue`, the backward runs deferred and the weight gradient is flushed after.
fn run<B: AutodiffBackend<Gradients = Gradients> + Fp8Backend>(d: &Data, fp8: bool, queue: bool, device: &B::Device) -> Outs {
    let linear = d.linear::<B>(device);
    let x = Tensor::<B, 3>::from_data(TensorData::new(d.x.clone(), [d.b, d.t, d.k]), device).require_grad();
    let g = Tensor::<B, 3>::from_data(TensorData::new(d.g.clone(), [d.b, d.t, d.n]), device);
    let y = match fp8 {
        true => Fp8Linear::from(linear.clone()).forward(x.clone()),
        false => linear.forward(x.clone()),
    };
    let loss = (y.clone() * g).sum();
    let grads = match queue {
        false => loss.backward(),
        true => {
            let mut queue = WeightGradQueue::new();
            let mut grads = queue.defer(|| loss.backward());
            assert!(linear.weight.grad(&grads).is_none(), "weight gradient computed before the flush");
            assert!(x.grad(&grads).is_some(), "input gradient missing after the deferred backward");
            assert_eq!(queue.len(), 1);
            assert_eq!(queue.flush(&mut grads), 1);
            assert!(queue.is_empty());
            grads
        }
    };
    Outs {
        y: host(y),
        dx: host(x.grad(&grads).expect("dx")),
        dw: host(linear.weight.grad(&grads).expect("dW")),
        db: linear.bias.as_ref().map(|b| host(b.grad(&grads).expect("db"))),
    }
}

/// Bit-identical vectors, reporting the first difference rather than both vectors.
fn same(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
        panic!("{what}: first difference at {i}: {} vs {}", a[i], b[i]);
    }
}

fn same_outs(a: &Outs, b: &Outs, what: &str) {
    same(&a.y, &b.y, &format!("{what} y"));
    same(&a.dx, &b.dx, &format!("{what} dx"));
    same(&a.dw, &b.dw, &format!("{what} dW"));
    if let (Some(x), Some(y)) = (&a.db, &b.db) {
        same(x, y, &format!("{what} db"));
    }
}

fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    (0..cols).flat_map(|c| (0..rows).map(move |r| v[r * cols + c] as f64)).collect()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// calc_diff of `ours` against `A [m, k] · Btᵀ` in f64, each output divided by ‖A_i‖·‖Bt_j‖.
fn normalized_diff(ours: &[f32], a: &[f64], bt: &[f64], m: usize, n: usize, k: usize) -> f64 {
    let exact = matmul_nt_f64(a, bt, m, n, k);
    let norm = |v: &[f64], i: usize| v[i * k..(i + 1) * k].iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-300);
    let w: Vec<f64> = (0..m * n).map(|i| norm(a, i / n) * norm(bt, i % n)).collect();
    let ours: Vec<f64> = ours.iter().zip(&w).map(|(&o, w)| o as f64 / w).collect();
    let exact: Vec<f64> = exact.iter().zip(&w).map(|(e, w)| e / w).collect();
    calc_diff(&ours, &exact)
}

/// The three GEMMs of `outs` against f64; `bound` applies to each. Returns the diffs.
fn check_against_f64(what: &str, d: &Data, outs: &Outs, floor: f64, bound: f64) -> [f64; 3] {
    let (m, k, n) = (d.m(), d.k, d.n);
    let mut y = outs.y.clone();
    if let Some(bias) = &d.bias {
        y.iter_mut().enumerate().for_each(|(i, v)| *v -= bias[i % n]);
    }
    let diffs = [
        normalized_diff(&y, &f64s(&d.x), &transpose(&d.w, k, n), m, n, k),
        normalized_diff(&outs.dx, &f64s(&d.g), &f64s(&d.w), m, k, n),
        normalized_diff(&outs.dw, &transpose(&d.x, m, k), &transpose(&d.g, m, n), k, n, m),
    ];
    for (name, diff) in ["forward", "dgrad", "wgrad"].iter().zip(diffs) {
        assert!(diff < bound && diff >= floor, "{what} {name}: calc_diff vs f64 {diff:e}, expected in [{floor:e}, {bound:e})");
    }
    if let (Some(db), Some(_)) = (&outs.db, &d.bias) {
        // The bias gradient is Σ_tokens g in f32 on both paths.
        for (j, &got) in db.iter().enumerate().take(n) {
            let exact: f64 = (0..m).map(|i| d.g[i * n + j] as f64).sum();
            let scale: f64 = (0..m).map(|i| (d.g[i * n + j] as f64).abs()).sum();
            assert!((got as f64 - exact).abs() <= 1e-5 * scale, "{what} db[{j}] = {got}, expected {exact}");
        }
    }
    eprintln!("{what}: calc_diff forward {:.2e} dgrad {:.2e} wgrad {:.2e}", diffs[0], diffs[1], diffs[2]);
    diffs
}

/// [B, T, d] with d_output not a multiple of 128 and 96 tokens (a partial token tile).
const SHAPE: [usize; 4] = [2, 48, 256, 320];

#[test]
fn forward_and_gradients_match_f32_linear_on_wgpu_and_reference() {
    let mut rng = Rng::new("linear_vs_f32");
    for bias in [true, false] {
        let d = Data::new(&mut rng, SHAPE, bias);
        let f32_ref = run::<AdRef>(&d, false, false, &Default::default());
        check_against_f64("f32 Linear (reference backend)", &d, &f32_ref, 0.0, 1e-9);

        let fp8_ref = run::<AdRef>(&d, true, false, &Default::default());
        check_against_f64(&format!("Fp8Linear reference bias={bias}"), &d, &fp8_ref, 1e-5, 1e-3);
        let fp8_wgpu = run::<AdCube>(&d, true, false, &kernel_device());
        check_against_f64(&format!("Fp8Linear wgpu bias={bias}"), &d, &fp8_wgpu, 1e-5, 1e-3);

        // Same FP8 products on both backends; only the f32 summation order differs.
        for (name, a, b) in [("y", &fp8_wgpu.y, &fp8_ref.y), ("dx", &fp8_wgpu.dx, &fp8_ref.dx), ("dw", &fp8_wgpu.dw, &fp8_ref.dw)] {
            let diff = calc_diff(&f64s(a), &f64s(b));
            assert!(diff < 1e-9, "{name}: wgpu vs reference backend calc_diff {diff:e}");
        }
    }
}

#[test]
fn gradients_are_the_fp8_gemms_of_the_recipe() {
    // dx and dW are exactly the public FP8 ops applied to the quantized operands.
    let mut rng = Rng::new("linear_ops");
    let d = Data::new(&mut rng, [1, 130, 200, 72], false);
    let device = kernel_device();
    let outs = run::<AdCube>(&d, true, false, &device);
    let recipe = Fp8Recipe::deepseek_v3();
    let x = tensor::<Cube>(&d.x, [d.m(), d.k], &device);
    let w = tensor::<Cube>(&d.w, [d.k, d.n], &device);
    let g = tensor::<Cube>(&d.g, [d.m(), d.n], &device);
    same(&outs.y, &to_vec(ops::forward(x.clone(), w.clone(), &recipe)), "y");
    same(&outs.dx, &to_vec(ops::backward_input(g.clone(), w, &recipe)), "dx");
    let dw = ops::backward_weight(&ops::save_input(x, &recipe), &ops::save_output_grad(g, &recipe));
    same(&outs.dw, &to_vec(dw), "dW");
}

#[test]
fn split_backward_equals_plain_backward() {
    let mut rng = Rng::new("linear_split");
    let d = Data::new(&mut rng, [3, 50, 384, 136], true);
    let cube = (run::<AdCube>(&d, true, false, &kernel_device()), run::<AdCube>(&d, true, true, &kernel_device()));
    same_outs(&cube.0, &cube.1, "wgpu deferred vs plain");
    let fused = (run::<AdFused>(&d, true, false, &kernel_device()), run::<AdFused>(&d, true, true, &kernel_device()));
    same_outs(&fused.0, &fused.1, "fused wgpu deferred vs plain");
    let reference = (run::<AdRef>(&d, true, false, &Default::default()), run::<AdRef>(&d, true, true, &Default::default()));
    same_outs(&reference.0, &reference.1, "reference deferred vs plain");
    check_against_f64("split backward wgpu", &d, &cube.1, 1e-5, 1e-3);
}

#[test]
fn queue_moves_between_threads() {
    // A pipeline rank runs B on its thread and may hand W to another.
    fn assert_send<T: Send>() {}
    assert_send::<WeightGradQueue>();
}

#[test]
fn deferred_weight_gradients_of_a_stack_accumulate() {
    // Two layers, the second used twice: the queue holds three GEMMs and the flushed
    // gradients equal the plain backward's.
    let mut rng = Rng::new("linear_stack");
    let device = kernel_device();
    let l1: Fp8Linear<AdCube> = Fp8Linear::from(LinearConfig::new(160, 256).init(&device));
    let l2: Fp8Linear<AdCube> = Fp8Linear::from(LinearConfig::new(256, 256).init(&device));
    let x = tensor::<AdCube>(&rng.matrix(64, 160), [64, 160], &device).require_grad();
    let loss = || l2.forward(l2.forward(l1.forward(x.clone())).tanh()).powi_scalar(2).mean();
    let plain = loss().backward();
    let mut queue = WeightGradQueue::new();
    let mut deferred = queue.defer(|| loss().backward());
    assert_eq!(queue.len(), 3);
    queue.flush(&mut deferred);
    for (name, a, b) in [
        ("x", x.grad(&plain), x.grad(&deferred)),
        ("l1.weight", l1.weight.grad(&plain), l1.weight.grad(&deferred)),
        ("l2.weight", l2.weight.grad(&plain), l2.weight.grad(&deferred)),
        ("l2.bias", l2.bias.as_ref().unwrap().grad(&plain).map(|t| t.unsqueeze()), l2.bias.as_ref().unwrap().grad(&deferred).map(|t| t.unsqueeze())),
    ] {
        same(&host(a.expect(name)), &host(b.expect(name)), name);
    }
}

#[test]
fn any_rank_and_non_multiple_of_128_dims() {
    let mut rng = Rng::new("linear_shapes");
    let device = kernel_device();
    let layer: Fp8Linear<Cube> = Fp8Linear::from(LinearConfig::new(200, 72).init(&device));
    let w = host(layer.weight.val());
    let b = host(layer.bias.as_ref().unwrap().val());
    for dims in [vec![1usize], vec![5], vec![2, 3], vec![2, 1, 3], vec![1, 1, 1, 1]] {
        let tokens: usize = dims.iter().product();
        let x = rng.matrix(tokens, 200);
        let y = match dims.len() {
            1 => host(layer.forward(Tensor::<Cube, 2>::from_data(TensorData::new(x.clone(), [dims[0], 200]), &device))),
            2 => host(layer.forward(Tensor::<Cube, 3>::from_data(TensorData::new(x.clone(), [dims[0], dims[1], 200]), &device))),
            3 => host(layer.forward(Tensor::<Cube, 4>::from_data(TensorData::new(x.clone(), [dims[0], dims[1], dims[2], 200]), &device))),
            _ => host(layer.forward(Tensor::<Cube, 5>::from_data(TensorData::new(x.clone(), [1, 1, 1, 1, 200]), &device))),
        };
        assert_eq!(y.len(), tokens * 72, "{dims:?}");
        let y: Vec<f32> = y.iter().enumerate().map(|(i, v)| v - b[i % 72]).collect();
        let diff = normalized_diff(&y, &f64s(&x), &transpose(&w, 200, 72), tokens, 72, 200);
        // Few outputs here (72 per token), so a looser bound than the pooled 1e-3.
        assert!((1e-6..3e-3).contains(&diff), "tokens {dims:?}: calc_diff {diff:e}");
    }
    // No tokens at all.
    let empty = layer.forward(Tensor::<Cube, 3>::zeros([2, 0, 200], &device));
    assert_eq!(empty.dims(), [2, 0, 72]);
    // Rank 1: a single token vector.
    let v = Tensor::<Cube, 1>::from_data(TensorData::new(rng.matrix(1, 200), [200]), &device);
    assert_eq!(layer.forward(v).dims(), [72]);
}

#[test]
#[should_panic(expected = "needs inputs [..., 200], got [4, 7, 199]")]
fn wrong_input_width_panics_with_the_shapes() {
    let device = Default::default();
    let layer: Fp8Linear<Ref> = Fp8Linear::from(LinearConfig::new(200, 72).init(&device));
    layer.forward(Tensor::<Ref, 3>::zeros([4, 7, 199], &device));
}

#[test]
fn sgd_step_matches_f32_linear_step() {
    let mut rng = Rng::new("linear_sgd");
    let d = Data::new(&mut rng, [4, 32, 256, 256], true);
    let device = kernel_device();
    let step = |fp8: bool| -> (Vec<f32>, Vec<f32>) {
        let linear = d.linear::<AdCube>(&device);
        let x = Tensor::<AdCube, 3>::from_data(TensorData::new(d.x.clone(), [d.b, d.t, d.k]), &device);
        let g = Tensor::<AdCube, 3>::from_data(TensorData::new(d.g.clone(), [d.b, d.t, d.n]), &device);
        let (w, b) = if fp8 {
            let layer = Fp8Linear::from(linear);
            let grads = GradientsParams::from_grads((layer.forward(x) * g).sum().backward(), &layer);
            let layer = SgdConfig::new().init().step(0.01, layer, grads);
            (host(layer.weight.val()), host(layer.bias.unwrap().val()))
        } else {
            let grads = GradientsParams::from_grads((linear.forward(x) * g).sum().backward(), &linear);
            let layer = SgdConfig::new().init().step(0.01, linear, grads);
            (host(layer.weight.val()), host(layer.bias.unwrap().val()))
        };
        (w, b)
    };
    let ((w8, b8), (w32, b32)) = (step(true), step(false));
    let delta = |w: &[f32]| -> Vec<f64> { w.iter().zip(&d.w).map(|(a, b)| (a - b) as f64).collect() };
    let diff = calc_diff(&delta(&w8), &delta(&w32));
    assert!((1e-6..2e-3).contains(&diff), "weight update: calc_diff fp8 vs f32 {diff:e}");
    for (a, b) in b8.iter().zip(&b32) {
        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "bias update {a} vs {b}");
    }
    // The master weight stays f32: updated values are not confined to an FP8 grid.
    let distinct: std::collections::HashSet<u32> = w8.iter().map(|v| v.to_bits()).collect();
    assert!(distinct.len() > w8.len() / 2);
}

#[test]
fn conversions_keep_the_parameters() {
    #[derive(Module, Debug)]
    struct Mlp<B: burn::tensor::backend::Backend, L: Module<B>> {
        up: L,
        down: L,
        gate: Option<L>,
        backend: core::marker::PhantomData<B>,
    }
    impl<B: burn::tensor::backend::Backend, L: LinearLayer<B>> Mlp<B, L> {
        fn new(device: &B::Device) -> Self {
            Self {
                up: L::init(&LinearConfig::new(64, 96), device),
                down: L::init(&LinearConfig::new(96, 64).with_bias(false), device),
                gate: Some(L::init(&LinearConfig::new(64, 96), device)),
                backend: core::marker::PhantomData,
            }
        }
        fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
            let gate = self.gate.as_ref().unwrap().forward(x.clone());
            self.down.forward(self.up.forward(x) * burn::tensor::activation::silu(gate))
        }
    }
    let device = kernel_device();
    let f32_model: Mlp<AdCube, Linear<AdCube>> = Mlp::new(&device);
    let fp8_model = copy_params(&f32_model, Mlp::<AdCube, Fp8Linear<AdCube>>::new(&device)).unwrap();
    let back = copy_params(&fp8_model, Mlp::<AdCube, Linear<AdCube>>::new(&device)).unwrap();
    for (a, b) in [(&f32_model.up, &back.up), (&f32_model.down, &back.down)] {
        assert_eq!(a.weight.id, b.weight.id);
        same(&host(a.weight.val()), &host(b.weight.val()), "round trip");
    }
    same(&host(f32_model.up.weight.val()), &host(fp8_model.up.weight.val()), "to fp8");
    assert!(fp8_model.down.bias.is_none());
    // The converted model trains: its parameters are tracked leaves.
    let x = tensor::<AdCube>(&Rng::new("conv").matrix(8, 64), [8, 64], &device);
    let grads = fp8_model.forward(x).sum().backward();
    assert!(fp8_model.gate.as_ref().unwrap().weight.grad(&grads).is_some());

    // A mismatched twin is refused, naming the path.
    #[derive(Module, Debug)]
    struct Wider<B: burn::tensor::backend::Backend> {
        up: Fp8Linear<B>,
    }
    let wider = Wider { up: Fp8Linear::from(LinearConfig::new(64, 97).init::<AdCube>(&device)) };
    match copy_params(&f32_model.up, wider) {
        Err(ParamCopyError::Missing(paths)) => assert_eq!(paths, vec!["up.weight", "up.bias"]),
        other => panic!("expected missing paths, got {other:?}"),
    }
    let twin: Fp8Linear<AdCube> = Fp8Linear::from(LinearConfig::new(64, 97).init(&device));
    match copy_params(&f32_model.up, twin) {
        Err(ParamCopyError::Shape(p)) => assert_eq!(p[0], ("weight".to_string(), vec![64, 96], vec![64, 97])),
        other => panic!("expected a shape error, got {other:?}"),
    }
}

#[test]
fn linear_records_load_into_fp8_linear() {
    use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
    let device = kernel_device();
    let linear: Linear<Cube> = LinearConfig::new(130, 70).init(&device);
    let (weight, bias) = (host(linear.weight.val()), host(linear.bias.as_ref().unwrap().val()));
    let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
    let bytes = recorder.record(linear.into_record(), ()).unwrap();
    let fp8: Fp8Linear<Cube> = Fp8Linear::from(LinearConfig::new(130, 70).init(&device));
    let fp8 = fp8.load_record(recorder.load(bytes, &device).unwrap());
    same(&host(fp8.weight.val()), &weight, "weight loaded into Fp8Linear");
    let back = recorder.record(fp8.into_record(), ()).unwrap();
    let linear2 = LinearConfig::new(130, 70).init::<Cube>(&device).load_record(recorder.load(back, &device).unwrap());
    same(&host(linear2.bias.unwrap().val()), &bias, "bias loaded back into Linear");
}

#[test]
fn saved_input_is_about_a_quarter_of_f32() {
    let device = Default::default();
    // DeepSeek-V3's attention output projection: 4096 tokens × 16384 → 7168, scaled down.
    let layer: Fp8Linear<Ref> = Fp8Linear::from(LinearConfig::new(2048, 896).init(&device));
    // One byte per token and feature, each feature's tokens padded to whole 128-token
    // tiles, plus a 4-byte scale per tile: 4·128 / 132 = 3.88x smaller than f32 for full
    // tiles, less when the last tile is partial.
    for (tokens, min_ratio) in [(4096usize, 3.87), (4000, 3.78), (130, 1.96)] {
        let f32_bytes = 4 * tokens * 2048;
        let fp8_bytes = layer.saved_input_bytes(tokens);
        assert_eq!(fp8_bytes, 2048 * tokens.div_ceil(128) * (128 + 4));
        let ratio = f32_bytes as f64 / fp8_bytes as f64;
        assert!(ratio > min_ratio, "{tokens} tokens: f32 {f32_bytes} B vs fp8 {fp8_bytes} B");
    }
}
