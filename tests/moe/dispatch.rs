//! Dispatch plan, dispatch, grouped matmul and combine — and their autodiff gradients —
//! against f64 host loops over the slots, on the kernels (wgpu, with and without fusion)
//! on the reference backend and on Flex (burn-moe's host loops).
//!
//! Tolerances: the plan and dispatch are exact (integers and copies). Every other output
//! is a sum of products; its f32 error is at most about (terms) · 2⁻²⁴ · Σ|products|, so
//! each element is held to `1e-5 · Σ|products|` (the same formula on absolute values),
//! which is above that for the ≤ 100-term sums here and tight enough that a missing or
//! misplaced term fails. Outputs are poisoned with NaN before each kernel (the allocator
//! hands the freed NaN buffer to the kernel's output) so unwritten rows fail too.

use burn::tensor::{backend::AutodiffBackend, backend::Backend, Int, Tensor, TensorData};
use burn_moe::backend::PlanPrimitive;
use burn_moe::dispatch::{combine, dispatch, grouped_matmul, DispatchPlan};
use burn_moe::MoeBackend;

use crate::common::{assert_close, host, host_int, kernel_device, Cube, Flex, Fused, Ref, Rng};

const TOL: f64 = 1e-5;

pub struct Case {
    pub name: &'static str,
    pub t: usize,
    pub k: usize,
    pub e: usize,
    /// Row width `K` of the grouped matmul input.
    pub d: usize,
    /// Output width `N`.
    pub n: usize,
    /// Experts that receive no token.
    pub empty: &'static [usize],
}

const CASES: &[Case] = &[
    Case { name: "one token, k=1", t: 1, k: 1, e: 4, d: 8, n: 8, empty: &[] },
    Case { name: "k=E", t: 5, k: 4, e: 4, d: 16, n: 12, empty: &[] },
    Case { name: "empty experts, tails", t: 37, k: 3, e: 8, d: 40, n: 33, empty: &[2, 5] },
    Case { name: "one expert takes all", t: 70, k: 1, e: 4, d: 33, n: 70, empty: &[0, 1, 3] },
    Case { name: "V3 routing (256 experts, top-8), narrow", t: 24, k: 8, e: 256, d: 64, n: 48, empty: &[] },
    Case { name: "512 rows", t: 128, k: 4, e: 16, d: 96, n: 64, empty: &[7] },
    Case { name: "large experts (8-row unit tiles), N tail", t: 200, k: 2, e: 4, d: 72, n: 130, empty: &[] },
];

/// Random routing (k distinct experts per token, none of `empty`) and operands.
pub struct Inputs {
    pub indices: Vec<i64>,
    pub counts: Vec<i64>,
    pub x: Vec<f32>,
    pub w: Vec<f32>,
    pub gates: Vec<f32>,
    /// The upstream gradient of the combined output.
    pub dy: Vec<f32>,
}

impl Inputs {
    pub fn new(c: &Case, rng: &mut Rng) -> Self {
        let allowed: Vec<i64> = (0..c.e as i64).filter(|e| !c.empty.contains(&(*e as usize))).collect();
        let mut indices = Vec::with_capacity(c.t * c.k);
        for _ in 0..c.t {
            let mut pool = allowed.clone();
            for _ in 0..c.k {
                indices.push(pool.swap_remove(rng.below(pool.len())));
            }
        }
        let mut counts = vec![0i64; c.e];
        indices.iter().for_each(|&i| counts[i as usize] += 1);
        Self { indices, counts, x: rng.values(c.t * c.d), w: rng.values(c.e * c.d * c.n), gates: rng.values(c.t * c.k), dy: rng.values(c.t * c.n) }
    }
}

/// The f64 host results, or with `abs` their error scales (the formulas on |inputs|).
struct Expected {
    positions: Vec<i64>,
    offsets: Vec<i64>,
    rows: Vec<f64>,
    hidden: Vec<f64>,
    y: Vec<f64>,
    dx: Vec<f64>,
    dw: Vec<f64>,
    dgates: Vec<f64>,
}

fn expected(c: &Case, inp: &Inputs, abs: bool) -> Expected {
    let f = |v: &[f32]| -> Vec<f64> { v.iter().map(|&a| if abs { (a as f64).abs() } else { a as f64 }).collect() };
    let (x, w, gates, dy) = (f(&inp.x), f(&inp.w), f(&inp.gates), f(&inp.dy));
    let (s_total, d, n) = (c.t * c.k, c.d, c.n);
    let mut offsets = vec![0i64; c.e + 1];
    (0..c.e).for_each(|e| offsets[e + 1] = offsets[e] + inp.counts[e]);
    let mut seen = vec![0i64; c.e];
    let positions: Vec<i64> = inp
        .indices
        .iter()
        .map(|&e| {
            seen[e as usize] += 1;
            offsets[e as usize] + seen[e as usize] - 1
        })
        .collect();
    let (mut rows, mut hidden) = (vec![0.0; s_total * d], vec![0.0; s_total * n]);
    let (mut y, mut dx, mut dw, mut dgates) = (vec![0.0; c.t * n], vec![0.0; c.t * d], vec![0.0; c.e * d * n], vec![0.0; s_total]);
    for s in 0..s_total {
        let (t, e, p) = (s / c.k, inp.indices[s] as usize, positions[s] as usize);
        let we = &w[e * d * n..(e + 1) * d * n];
        rows[p * d..(p + 1) * d].copy_from_slice(&x[t * d..(t + 1) * d]);
        for j in 0..n {
            let h: f64 = (0..d).map(|i| x[t * d + i] * we[i * n + j]).sum();
            hidden[p * n + j] = h;
            y[t * n + j] += gates[s] * h;
            dgates[s] += dy[t * n + j] * h;
        }
        for i in 0..d {
            dx[t * d + i] += gates[s] * (0..n).map(|j| dy[t * n + j] * we[i * n + j]).sum::<f64>();
            for j in 0..n {
                dw[e * d * n + i * n + j] += x[t * d + i] * gates[s] * dy[t * n + j];
            }
        }
    }
    Expected { positions, offsets, rows, hidden, y, dx, dw, dgates }
}

pub fn float<B: Backend, const D: usize>(v: &[f32], shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(v.to_vec(), shape), device)
}

pub fn plan<B: MoeBackend>(c: &Case, inp: &Inputs, device: &B::Device) -> DispatchPlan<B> {
    let indices = Tensor::<B, 2, Int>::from_data(TensorData::new(inp.indices.clone(), [c.t, c.k]), device);
    let counts = Tensor::<B, 1, Int>::from_data(TensorData::new(inp.counts.clone(), [c.e]), device);
    DispatchPlan::new(indices, counts)
}

/// Fills a freed buffer of `n` floats with NaN so that the next allocation of that size
/// (the kernel's output) starts poisoned.
fn poison<B: Backend>(n: usize, device: &B::Device) {
    let _ = Tensor::<B, 1>::full([n.max(1)], f32::NAN, device).into_data();
}

fn check_forward<B: MoeBackend>(backend: &str, device: &B::Device) {
    let mut rng = Rng::new(backend);
    for c in CASES {
        let what = format!("{backend} {}", c.name);
        let inp = Inputs::new(c, &mut rng);
        let (ex, bound) = (expected(c, &inp, false), expected(c, &inp, true));
        let s = c.t * c.k;
        let plan = plan::<B>(c, &inp, device);
        assert_eq!(host_int(plan.positions()), ex.positions, "{what}: positions");
        assert_eq!(host_int(plan.offsets()), ex.offsets, "{what}: offsets");
        let row_slots = host_int(plan.row_slots());
        assert!(ex.positions.iter().enumerate().all(|(s, &p)| row_slots[p as usize] == s as i64), "{what}: row_slots is not the inverse of positions");

        poison::<B>(s * c.d, device);
        let rows = dispatch(float::<B, 2>(&inp.x, [c.t, c.d], device), &plan);
        assert_close(&format!("{what}: dispatch"), &host(rows.clone()), &ex.rows, &bound.rows, 0.0);
        poison::<B>(s * c.n, device);
        let hidden = grouped_matmul(rows, float::<B, 3>(&inp.w, [c.e, c.d, c.n], device), &plan);
        assert_close(&format!("{what}: grouped_matmul"), &host(hidden.clone()), &ex.hidden, &bound.hidden, TOL);
        poison::<B>(c.t * c.n, device);
        let y = combine(hidden.clone(), float::<B, 2>(&inp.gates, [c.t, c.k], device), &plan);
        assert_close(&format!("{what}: combine"), &host(y), &ex.y, &bound.y, TOL);

        // The backward building blocks, reached directly: the weighted gather (combine's
        // adjoint) and the gate gradient.
        let prim = PlanPrimitive::<B> { positions: plan.positions().into_primitive(), row_slots: plan.row_slots().into_primitive(), offsets: plan.offsets().into_primitive() };
        let dy = float::<B, 2>(&inp.dy, [c.t, c.n], device);
        poison::<B>(s * c.n, device);
        let gathered = B::moe_gather(dy.clone().into_primitive().tensor(), prim.clone(), c.k, Some(float::<B, 1>(&inp.gates, [s], device).into_primitive().tensor()));
        let gathered: Tensor<B, 2> = Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(gathered));
        let mut want = vec![0.0; s * c.n];
        for slot in 0..s {
            let (t, p) = (slot / c.k, ex.positions[slot] as usize);
            (0..c.n).for_each(|j| want[p * c.n + j] = inp.gates[slot] as f64 * inp.dy[t * c.n + j] as f64);
        }
        let want_bound: Vec<f64> = want.iter().map(|v| v.abs()).collect();
        assert_close(&format!("{what}: weighted gather"), &host(gathered), &want, &want_bound, 1e-7);
        poison::<B>(s, device);
        let dg = B::moe_gate_grad(dy.into_primitive().tensor(), hidden.into_primitive().tensor(), prim, c.k);
        let dg: Tensor<B, 1> = Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(dg));
        // The gate gradient here is taken against the device's hidden rows, whose own
        // error is within the grouped-matmul bound: 2·TOL covers both.
        assert_close(&format!("{what}: gate_grad"), &host(dg), &ex.dgates, &bound.dgates, 2.0 * TOL);
    }
}

fn check_grads<B: AutodiffBackend + MoeBackend>(backend: &str, device: &B::Device) {
    let mut rng = Rng::new(backend);
    for c in CASES {
        let what = format!("{backend} {} backward", c.name);
        let inp = Inputs::new(c, &mut rng);
        let (ex, bound) = (expected(c, &inp, false), expected(c, &inp, true));
        let plan = plan::<B>(c, &inp, device);
        let x = float::<B, 2>(&inp.x, [c.t, c.d], device).require_grad();
        let w = float::<B, 3>(&inp.w, [c.e, c.d, c.n], device).require_grad();
        let gates = float::<B, 2>(&inp.gates, [c.t, c.k], device).require_grad();
        let y = combine(grouped_matmul(dispatch(x.clone(), &plan), w.clone(), &plan), gates.clone(), &plan);
        let grads = (y * float::<B, 2>(&inp.dy, [c.t, c.n], device)).sum().backward();
        let grad = |t: Option<Tensor<B::InnerBackend, 2>>| host(t.expect("gradient"));
        assert_close(&format!("{what}: d x"), &grad(x.grad(&grads)), &ex.dx, &bound.dx, 2.0 * TOL);
        assert_close(&format!("{what}: d gates"), &grad(gates.grad(&grads)), &ex.dgates, &bound.dgates, 2.0 * TOL);
        assert_close(&format!("{what}: d w"), &host(w.grad(&grads).expect("gradient")), &ex.dw, &bound.dw, 2.0 * TOL);
    }
}

#[test]
fn dispatch_ops_match_host_on_wgpu_kernels() {
    check_forward::<Cube>("wgpu kernels", &kernel_device());
}

#[test]
fn dispatch_ops_match_host_on_fused_wgpu() {
    check_forward::<Fused>("fused wgpu", &kernel_device());
}

#[test]
fn dispatch_ops_match_host_on_reference_backend() {
    check_forward::<Ref>("reference", &Default::default());
}

#[test]
fn dispatch_ops_match_host_on_flex() {
    check_forward::<Flex>("flex", &Default::default());
}

#[test]
fn dispatch_gradients_match_host_on_wgpu() {
    check_grads::<burn::backend::Autodiff<Cube>>("wgpu kernels", &kernel_device());
    check_grads::<burn::backend::Autodiff<Fused>>("fused wgpu", &kernel_device());
}

#[test]
fn dispatch_gradients_match_host_on_reference_backend() {
    check_grads::<burn::backend::Autodiff<Ref>>("reference", &Default::default());
}

#[test]
fn dispatch_gradients_match_host_on_flex() {
    check_grads::<burn::backend::Autodiff<Flex>>("flex", &Default::default());
}

#[test]
fn no_tokens_and_bad_shapes() {
    let device = Default::default();
    let indices = Tensor::<Ref, 2, Int>::zeros([0, 2], &device);
    let plan = DispatchPlan::new(indices, Tensor::zeros([4], &device));
    assert_eq!(host_int(plan.offsets()), vec![0; 5]);
    let rows = dispatch(Tensor::<Ref, 2>::zeros([0, 3], &device), &plan);
    assert_eq!(rows.dims(), [0, 3]);
    let hidden = grouped_matmul(rows, Tensor::ones([4, 3, 5], &device), &plan);
    assert_eq!(combine(hidden, Tensor::zeros([0, 2], &device), &plan).dims(), [0, 5]);

    let indices = Tensor::<Ref, 2, Int>::from_ints([[0, 1], [1, 2]], &device);
    let plan = DispatchPlan::new(indices, Tensor::from_ints([1, 2, 1], &device));
    let msg = |f: &dyn Fn()| *std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_err().downcast::<String>().unwrap();
    let m = msg(&|| drop(dispatch(Tensor::<Ref, 2>::zeros([3, 4], &device), &plan)));
    assert!(m.contains("[3, 4]") && m.contains("2 tokens"), "{m}");
    let m = msg(&|| drop(grouped_matmul(Tensor::<Ref, 2>::zeros([4, 4], &device), Tensor::zeros([2, 4, 8], &device), &plan)));
    assert!(m.contains("[2, 4, 8]") && m.contains("E = 3"), "{m}");
    let m = msg(&|| drop(combine(Tensor::<Ref, 2>::zeros([4, 4], &device), Tensor::zeros([2, 3], &device), &plan)));
    assert!(m.contains("[2, 3]") && m.contains("[2, 2]"), "{m}");
}
