//! Routing against the naive per-token host router (`burn_moe::router::route_host`):
//! selected experts must be identical (ties included: both break them toward the lower
//! index), weights equal to 1e-6 relative (only the order of the f32 sum of the selected
//! scores may differ), counts identical.

use burn::tensor::{backend::Backend, Distribution, Int, Tensor, TensorData};
use burn_moe::router::{expert_counts, route, route_host, scores, update_bias, GroupScore, RouterConfig, RouterError, ScoreFn};

use crate::common::{host, host_int, Cube, Ref, Rng};

/// Routes on backend `B` and compares with the host router fed the same device scores.
fn check<B: Backend>(what: &str, config: &RouterConfig, logits: &[f32], bias: Option<&[f32]>, t: usize, device: &B::Device) {
    let e = config.n_experts;
    let tensor = Tensor::<B, 2>::from_data(TensorData::new(logits.to_vec(), [t, e]), device);
    let bias_t = bias.map(|b| Tensor::<B, 1>::from_data(TensorData::new(b.to_vec(), [e]), device));
    let routing = route(tensor.clone(), bias_t, config).unwrap();
    let device_scores = host(scores(tensor, config.score_fn));
    let expected = route_host(&device_scores, bias, t, config);
    let (indices, weights, counts) = (host_int(routing.indices), host(routing.weights), host_int(routing.counts));
    let k = config.top_k;
    let mut expected_counts = vec![0i64; e];
    for (row, (experts, w)) in expected.iter().enumerate() {
        let got: Vec<usize> = indices[row * k..(row + 1) * k].iter().map(|&i| i as usize).collect();
        assert_eq!(&got, experts, "{what}: token {row} experts (scores {:?})", &device_scores[row * e..(row + 1) * e]);
        for (j, (&a, &b)) in weights[row * k..(row + 1) * k].iter().zip(w).enumerate() {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-6), "{what}: token {row} weight {j}: {a} vs {b}");
        }
        experts.iter().for_each(|&x| expected_counts[x] += 1);
    }
    assert_eq!(counts, expected_counts, "{what}: counts");
}

/// Configs covering every rule: V3 at full width, the tiny preset, V2 (softmax, max group
/// score), V2-Lite (softmax, no groups, unnormalized), k = 1, k = every expert.
fn configs() -> Vec<(&'static str, RouterConfig)> {
    let v2 = RouterConfig { n_experts: 32, top_k: 6, n_groups: 4, topk_groups: 3, score_fn: ScoreFn::Softmax, group_score: GroupScore::Max, normalize: false, route_scale: 16.0 };
    vec![
        ("deepseek-v3", RouterConfig::deepseek_v3()),
        ("tiny", RouterConfig::tiny()),
        ("v2 groups", v2),
        ("v2-lite", RouterConfig { n_experts: 64, n_groups: 1, topk_groups: 1, route_scale: 1.0, ..v2 }),
        ("k=1", RouterConfig { top_k: 1, ..RouterConfig::tiny() }),
        ("k=E", RouterConfig { top_k: 16, n_groups: 1, topk_groups: 1, ..RouterConfig::tiny() }),
        ("group size 1", RouterConfig { n_experts: 8, top_k: 3, n_groups: 8, topk_groups: 4, ..RouterConfig::tiny() }),
    ]
}

fn run_all<B: Backend>(backend: &str, device: &B::Device) {
    let mut rng = Rng::new(backend);
    for (name, config) in configs() {
        let e = config.n_experts;
        for t in [1usize, 37] {
            let logits: Vec<f32> = (0..t * e).map(|_| rng.uniform()).collect();
            let bias: Vec<f32> = (0..e).map(|_| rng.uniform() * 0.05).collect();
            check::<B>(&format!("{backend} {name} T={t}"), &config, &logits, None, t, device);
            check::<B>(&format!("{backend} {name} T={t} bias"), &config, &logits, Some(&bias), t, device);
            let ties: Vec<f32> = (0..t * e).map(|_| rng.coarse()).collect();
            check::<B>(&format!("{backend} {name} T={t} ties"), &config, &ties, None, t, device);
        }
    }
}

#[test]
fn routing_matches_naive_reference_on_the_kernels() {
    run_all::<Cube>("kernels", &crate::common::kernel_device());
}

#[test]
fn routing_matches_naive_reference_on_reference_backend() {
    run_all::<Ref>("reference", &Default::default());
}

#[test]
fn group_limit_uses_biased_top_two_sums() {
    // Group 0 holds the single best expert, group 1 two good ones: with the top-2 sum,
    // group 1 wins and expert 0 is masked out even though its score is the largest.
    let config = RouterConfig { n_experts: 4, top_k: 1, n_groups: 2, topk_groups: 1, ..RouterConfig::tiny() };
    let device = Default::default();
    let logits = Tensor::<Ref, 2>::from_floats([[3.0, -3.0, 1.5, 1.5]], &device);
    assert_eq!(host_int(route(logits.clone(), None, &config).unwrap().indices), vec![2]);
    // A bias on expert 1 lifts group 0's top-2 sum above group 1's.
    let bias = Tensor::<Ref, 1>::from_floats([0.0, 0.9, 0.0, 0.0], &device);
    assert_eq!(host_int(route(logits, Some(bias), &config).unwrap().indices), vec![0]);
}

#[test]
fn weights_are_unbiased_normalized_and_scaled() {
    let config = RouterConfig { n_experts: 4, top_k: 2, n_groups: 1, topk_groups: 1, ..RouterConfig::tiny() };
    let device = Default::default();
    let logits = Tensor::<Ref, 2>::from_floats([[0.0, 1.0, 2.0, -1.0]], &device);
    let bias = Tensor::<Ref, 1>::from_floats([5.0, 0.0, 0.0, 0.0], &device);
    let r = route(logits, Some(bias), &config).unwrap();
    assert_eq!(host_int(r.indices), vec![0, 2]);
    let s = |x: f32| 1.0 / (1.0 + (-x).exp());
    let (a, b) = (s(0.0), s(2.0));
    let w = host(r.weights);
    assert!((w[0] - 2.5 * a / (a + b)).abs() < 1e-6 && (w[1] - 2.5 * b / (a + b)).abs() < 1e-6, "{w:?}");
}

#[test]
fn bias_update_balances_a_skewed_load() {
    let config = RouterConfig::tiny();
    let device = Default::default();
    let (t, e) = (512, config.n_experts);
    // Expert j's logits are shifted by 0.15·j: the last experts attract most tokens.
    let skew = Tensor::<Ref, 1, Int>::arange(0..e as i64, &device).float().reshape([1, e]) * 0.15;
    let mut bias = Tensor::<Ref, 1>::zeros([e], &device);
    let imbalance = |counts: Tensor<Ref, 1, Int>| {
        let c = host_int(counts);
        *c.iter().max().unwrap() as f64 / (c.iter().sum::<i64>() as f64 / e as f64)
    };
    let mut first = None;
    let mut last = 0.0;
    for _ in 0..150 {
        let logits = Tensor::<Ref, 2>::random([t, e], Distribution::Normal(0.0, 1.0), &device) + skew.clone();
        let routing = route(logits, Some(bias.clone()), &config).unwrap();
        last = imbalance(routing.counts.clone());
        first.get_or_insert(last);
        bias = update_bias(bias, routing.counts, 0.01);
    }
    let first = first.unwrap();
    assert!(first > 2.0, "the skew should overload some experts: max/mean {first}");
    assert!(last < 1.5 && last < first / 1.6, "max/mean load {first:.2} → {last:.2}");
}

#[test]
fn empty_and_counts() {
    let device = Default::default();
    let config = RouterConfig::tiny();
    let r = route(Tensor::<Ref, 2>::zeros([0, 16], &device), None, &config).unwrap();
    assert_eq!(r.indices.dims(), [0, 4]);
    assert_eq!(host_int(r.counts), vec![0; 16]);
    let idx = Tensor::<Ref, 2, Int>::from_ints([[3, 1], [3, 0]], &device);
    assert_eq!(host_int(expert_counts(idx, 5)), vec![1, 1, 0, 2, 0]);
}

#[test]
fn bad_input_is_named() {
    let device = Default::default();
    let logits = Tensor::<Ref, 2>::zeros([2, 16], &device);
    let err = |config: RouterConfig| route(logits.clone(), None, &config).unwrap_err();
    let tiny = RouterConfig::tiny();
    assert_eq!(err(RouterConfig { top_k: 17, ..tiny }), RouterError::TopK { top_k: 17, n_experts: 16 });
    assert_eq!(err(RouterConfig { n_groups: 3, ..tiny }), RouterError::Groups { n_groups: 3, n_experts: 16 });
    assert_eq!(err(RouterConfig { topk_groups: 5, ..tiny }), RouterError::TopKGroups { topk_groups: 5, n_groups: 4 });
    let e = err(RouterConfig { top_k: 9, ..tiny });
    assert_eq!(e.to_string(), "top_k 9 exceeds the 8 experts of 2 groups of 4");
    let bias = Tensor::<Ref, 1>::zeros([15], &device);
    assert!(matches!(route(logits.clone(), Some(bias), &tiny), Err(RouterError::Shape { what: "bias", .. })));
    assert!(matches!(route(Tensor::<Ref, 2>::zeros([2, 8], &device), None, &tiny), Err(RouterError::Shape { what: "logits", .. })));
    let nan = Tensor::<Ref, 2>::from_data(TensorData::new((0..32).map(|i| if i == 21 { f32::NAN } else { 0.0 }).collect::<Vec<f32>>(), [2, 16]), &device);
    let e = route(nan, None, &tiny).unwrap_err();
    assert_eq!(e, RouterError::NonFinite { positions: vec![[1, 5]], count: 1 });
    assert!(e.to_string().contains("[token, expert] [[1, 5]]"), "{e}");
}
