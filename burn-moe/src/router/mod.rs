//! DeepSeekMoE routing: one function for the sigmoid (V3) and softmax (V2) variants, with
//! group-limited top-k and the auxiliary-loss-free balancing bias.
//!
//! For each token (row of `logits [T, E]`):
//! 1. `scores = sigmoid(logits)` or `softmax(logits)` over the experts;
//! 2. `biased = scores + bias` (the balancing bias steers selection only);
//! 3. with `n_groups > 1`: each group's score is the sum of its top-2 biased scores
//!    ([`GroupScore::TopTwoSum`], V3) or its maximum ([`GroupScore::Max`], V2); the
//!    `topk_groups` best groups are kept and every expert of the other groups is masked to
//!    −∞ (masked, not zeroed: a zero could beat a negative biased score);
//! 4. the `top_k` largest masked biased scores select the experts;
//! 5. the weights are the *unbiased* scores of the selected experts, divided by their sum
//!    when `normalize` is set, times `route_scale`.
//!
//! Ties go to the lower index, at every step, on every backend (top-k here is `k` rounds
//! of max plus lowest-index-at-max, not a sort whose tie order depends on the backend).
//!
//! # Example
//! ```
//! use burn::backend::NdArray;
//! use burn::tensor::{Distribution, Tensor};
//! use burn_moe::router::{route, RouterConfig, RouterError};
//!
//! let device = Default::default();
//! let config = RouterConfig::tiny(); // 16 experts in 4 groups, 2 groups and 4 experts per token
//! let logits = Tensor::<NdArray, 2>::random([5, 16], Distribution::Normal(0.0, 1.0), &device);
//! let routing = route(logits, None, &config).unwrap();
//! assert_eq!(routing.indices.dims(), [5, 4]);
//! assert_eq!(routing.counts.clone().sum().into_scalar(), 20); // 5 tokens × 4 experts
//! let experts: Vec<i64> = routing.indices.into_data().convert::<i64>().to_vec().unwrap();
//! for token in experts.chunks(4) {
//!     let mut groups: Vec<i64> = token.iter().map(|e| e / 4).collect();
//!     groups.sort();
//!     groups.dedup();
//!     assert!(groups.len() <= 2, "{token:?}");
//! }
//! // Inconsistent rules are named.
//! let bad = RouterConfig { top_k: 17, ..config };
//! let err = route(Tensor::<NdArray, 2>::zeros([1, 16], &device), None, &bad).unwrap_err();
//! assert!(matches!(err, RouterError::TopK { .. }), "{err}");
//! ```

mod balance;
mod reference;
pub use balance::sequence_balance_loss;
pub use reference::route_host;

use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::{backend::Backend, ElementConversion, IndexingUpdateOp, Int, Tensor};
use serde::{Deserialize, Serialize};

/// How scores are computed from router logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScoreFn {
    /// `sigmoid(logit)` per expert (DeepSeek-V3).
    Sigmoid,
    /// Softmax over the experts (DeepSeek-V2).
    Softmax,
}

/// How a group of experts is scored for group-limited routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupScore {
    /// Sum of the group's two largest biased scores (DeepSeek-V3).
    TopTwoSum,
    /// The group's largest score (DeepSeek-V2).
    Max,
}

/// Routing rules. Presets: [`RouterConfig::deepseek_v3`], [`RouterConfig::tiny`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouterConfig {
    /// Routed experts `E`.
    pub n_experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Expert groups (1: no group limit). Must divide `n_experts`.
    pub n_groups: usize,
    /// Groups a token may use.
    pub topk_groups: usize,
    /// Sigmoid or softmax scores.
    pub score_fn: ScoreFn,
    /// Group scoring rule.
    pub group_score: GroupScore,
    /// Divide the selected weights by their sum.
    pub normalize: bool,
    /// Multiplier of the weights.
    pub route_scale: f64,
}

impl RouterConfig {
    /// DeepSeek-V3: 256 experts, 8 per token, 8 groups of which 4 may be used, sigmoid
    /// scores, top-2-sum group score, normalized weights scaled by 2.5.
    pub const fn deepseek_v3() -> Self {
        Self { n_experts: 256, top_k: 8, n_groups: 8, topk_groups: 4, score_fn: ScoreFn::Sigmoid, group_score: GroupScore::TopTwoSum, normalize: true, route_scale: 2.5 }
    }

    /// DeepSeek-V3's rules at toy size: 16 experts, 4 per token, 4 groups of which 2.
    pub const fn tiny() -> Self {
        Self { n_experts: 16, top_k: 4, n_groups: 4, topk_groups: 2, ..Self::deepseek_v3() }
    }

    /// Checks the rules against each other.
    pub fn validate(&self) -> Result<(), RouterError> {
        let Self { n_experts, top_k, n_groups, topk_groups, .. } = *self;
        if n_experts == 0 || top_k == 0 || top_k > n_experts {
            return Err(RouterError::TopK { top_k, n_experts });
        }
        if n_groups == 0 || n_experts % n_groups != 0 {
            return Err(RouterError::Groups { n_groups, n_experts });
        }
        if topk_groups == 0 || topk_groups > n_groups {
            return Err(RouterError::TopKGroups { topk_groups, n_groups });
        }
        let reachable = topk_groups * (n_experts / n_groups);
        if top_k > reachable {
            return Err(RouterError::Unreachable { top_k, reachable, topk_groups, group_size: n_experts / n_groups });
        }
        Ok(())
    }
}

/// Why routing refused.
#[derive(Clone, Debug, PartialEq)]
pub enum RouterError {
    /// `top_k` is 0 or exceeds the experts.
    TopK {
        /// Requested experts per token.
        top_k: usize,
        /// Experts available.
        n_experts: usize,
    },
    /// The groups do not divide the experts.
    Groups {
        /// Groups.
        n_groups: usize,
        /// Experts.
        n_experts: usize,
    },
    /// `topk_groups` is 0 or exceeds the groups.
    TopKGroups {
        /// Groups a token may use.
        topk_groups: usize,
        /// Groups.
        n_groups: usize,
    },
    /// The allowed groups hold fewer than `top_k` experts.
    Unreachable {
        /// Requested experts per token.
        top_k: usize,
        /// `topk_groups · group_size`.
        reachable: usize,
        /// Groups a token may use.
        topk_groups: usize,
        /// Experts per group.
        group_size: usize,
    },
    /// Logits or bias of the wrong shape.
    Shape {
        /// What was given.
        what: &'static str,
        /// Its shape.
        got: Vec<usize>,
        /// What the config requires.
        expected: Vec<usize>,
    },
    /// Router logits held NaN or ±inf.
    NonFinite {
        /// `[token, expert]` of the first offending logits (at most 8).
        positions: Vec<[usize; 2]>,
        /// Number of offending logits.
        count: usize,
    },
}

impl core::fmt::Display for RouterError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::TopK { top_k, n_experts } => write!(f, "top_k {top_k} must be in 1..={n_experts} (the routed experts)"),
            Self::Groups { n_groups, n_experts } => write!(f, "n_groups {n_groups} must divide n_experts {n_experts}"),
            Self::TopKGroups { topk_groups, n_groups } => write!(f, "topk_groups {topk_groups} must be in 1..={n_groups} (n_groups)"),
            Self::Unreachable { top_k, reachable, topk_groups, group_size } => write!(f, "top_k {top_k} exceeds the {reachable} experts of {topk_groups} groups of {group_size}"),
            Self::Shape { what, got, expected } => write!(f, "router {what} has shape {got:?}, expected {expected:?}"),
            Self::NonFinite { positions, count } => {
                write!(f, "{count} router logit(s) are NaN or infinite; first at [token, expert] {positions:?}")
            }
        }
    }
}

impl std::error::Error for RouterError {}

/// The routing of a batch of tokens.
///
/// # Shapes
/// - indices, weights: `[T, top_k]`, experts in selection order (best first)
/// - counts: `[E]`, tokens routed to each expert
#[derive(Clone, Debug)]
pub struct Routing<B: Backend> {
    /// Selected experts.
    pub indices: Tensor<B, 2, Int>,
    /// Their weights (differentiable w.r.t. the logits).
    pub weights: Tensor<B, 2>,
    /// Tokens per expert, for logging and the balancing-bias update.
    pub counts: Tensor<B, 1, Int>,
}

/// Scores of `logits [T, E]` by `score_fn`, over the experts.
pub fn scores<B: Backend>(logits: Tensor<B, 2>, score_fn: ScoreFn) -> Tensor<B, 2> {
    match score_fn {
        ScoreFn::Sigmoid => sigmoid(logits),
        ScoreFn::Softmax => softmax(logits, 1),
    }
}

/// Routes `logits [T, E]` with the balancing `bias [E]` (if any); see the module docs.
///
/// Checks the config, the shapes and that every logit is finite (one boolean read back
/// from the device).
///
/// # Example
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::{Distribution, Tensor};
/// use burn_moe::router::{route, RouterConfig};
///
/// let device = Default::default();
/// let config = RouterConfig::tiny();
/// let logits = Tensor::<NdArray, 2>::random([10, 16], Distribution::Normal(0.0, 1.0), &device);
/// let routing = route(logits, None, &config).unwrap();
/// assert_eq!(routing.indices.dims(), [10, 4]);
/// assert_eq!(routing.counts.sum().into_scalar(), 40);
/// ```
pub fn route<B: Backend>(logits: Tensor<B, 2>, bias: Option<Tensor<B, 1>>, config: &RouterConfig) -> Result<Routing<B>, RouterError> {
    config.validate()?;
    let [t, e] = logits.dims();
    if e != config.n_experts {
        return Err(RouterError::Shape { what: "logits", got: vec![t, e], expected: vec![t, config.n_experts] });
    }
    if let Some(bias) = &bias {
        if bias.dims() != [e] {
            return Err(RouterError::Shape { what: "bias", got: bias.dims().to_vec(), expected: vec![e] });
        }
    }
    if t > 0 && logits.clone().is_finite().bool_not().int().sum().into_scalar().elem::<i64>() > 0 {
        return Err(non_finite(&logits));
    }
    Ok(route_unchecked(logits, bias, config))
}

fn non_finite<B: Backend>(logits: &Tensor<B, 2>) -> RouterError {
    let e = logits.dims()[1];
    let data = logits.to_data().convert::<f32>();
    let bad: Vec<usize> = data.as_slice::<f32>().expect("f32").iter().enumerate().filter(|(_, v)| !v.is_finite()).map(|(i, _)| i).collect();
    RouterError::NonFinite { count: bad.len(), positions: bad.iter().take(8).map(|&i| [i / e, i % e]).collect() }
}

/// [`route`] without the checks (no read-back): for callers that validated the config
/// once and guarantee finite logits.
pub fn route_unchecked<B: Backend>(logits: Tensor<B, 2>, bias: Option<Tensor<B, 1>>, config: &RouterConfig) -> Routing<B> {
    let [t, e] = logits.dims();
    if t == 0 {
        let device = logits.device();
        let k = config.top_k;
        return Routing { indices: Tensor::zeros([0, k], &device), weights: Tensor::zeros([0, k], &device), counts: Tensor::zeros([e], &device) };
    }
    let scores = scores(logits, config.score_fn);
    let biased = match bias {
        Some(bias) => scores.clone().detach() + bias.unsqueeze_dim(0),
        None => scores.clone().detach(),
    };
    let choice = if config.n_groups > 1 { mask_groups(biased, config) } else { biased };
    let (_, indices) = top_k(choice, config.top_k);
    let mut weights = scores.gather(1, indices.clone());
    if config.normalize {
        weights = weights.clone() / weights.sum_dim(1);
    }
    if config.route_scale != 1.0 {
        weights = weights * config.route_scale;
    }
    let counts = expert_counts(indices.clone(), e);
    Routing { indices, weights, counts }
}

/// Masks to −∞ the experts of every group outside each token's `topk_groups` best.
fn mask_groups<B: Backend>(biased: Tensor<B, 2>, config: &RouterConfig) -> Tensor<B, 2> {
    let [t, e] = biased.dims();
    let (g, size) = (config.n_groups, e / config.n_groups);
    let grouped = biased.clone().reshape([t * g, size]);
    let group_scores = match config.group_score {
        GroupScore::TopTwoSum => top_k(grouped, size.min(2)).0.sum_dim(1),
        GroupScore::Max => grouped.max_dim(1),
    }
    .reshape([t, g]);
    let (_, groups) = top_k(group_scores, config.topk_groups);
    let keep = one_hot_any(groups, g); // [t, g]
    let keep = keep.reshape([t, g, 1]).expand([t, g, size]).reshape([t, e]);
    biased.mask_fill(keep.bool_not(), f32::NEG_INFINITY)
}

/// `[rows, n]` → the `k` largest per row, largest first, ties to the lower index.
pub fn top_k<B: Backend>(x: Tensor<B, 2>, k: usize) -> (Tensor<B, 2>, Tensor<B, 2, Int>) {
    let [rows, n] = x.dims();
    let index = Tensor::<B, 1, Int>::arange(0..n as i64, &x.device()).reshape([1, n]).expand([rows, n]);
    let (mut x, mut values, mut indices) = (x, Vec::with_capacity(k), Vec::with_capacity(k));
    for _ in 0..k {
        let max = x.clone().max_dim(1);
        let at_max = x.clone().equal(max.clone().expand([rows, n]));
        let first = index.clone().mask_fill(at_max.bool_not(), n as i64).min_dim(1);
        let chosen = index.clone().equal(first.clone().expand([rows, n]));
        x = x.mask_fill(chosen, f32::NEG_INFINITY);
        values.push(max);
        indices.push(first);
    }
    (Tensor::cat(values, 1), Tensor::cat(indices, 1))
}

/// `[rows, k]` indices below `n` → `[rows, n]`: how often each row holds each index.
///
/// A scatter-add of ones along each row (O(rows·k) work; Burn's scatter walks the indexed
/// dimension in order, so repeated indices add up), not an `[rows, k, n]` one-hot.
pub(crate) fn index_counts<B: Backend>(indices: Tensor<B, 2, Int>, n: usize) -> Tensor<B, 2, Int> {
    let [rows, _] = indices.dims();
    let ones = indices.ones_like();
    Tensor::zeros([rows, n], &indices.device()).scatter(1, indices, ones, IndexingUpdateOp::Add)
}

/// `[rows, k]` indices below `n` → `[rows, n]`, true where a row holds the index.
fn one_hot_any<B: Backend>(indices: Tensor<B, 2, Int>, n: usize) -> Tensor<B, 2, burn::tensor::Bool> {
    index_counts(indices, n).greater_elem(0)
}

/// Tokens per expert from `indices [T, k]`: `[E]`.
pub fn expert_counts<B: Backend>(indices: Tensor<B, 2, Int>, n_experts: usize) -> Tensor<B, 1, Int> {
    let [t, k] = indices.dims();
    if t * k == 0 {
        return Tensor::zeros([n_experts], &indices.device());
    }
    index_counts(indices, n_experts).sum_dim(0).reshape([n_experts])
}

/// The auxiliary-loss-free balancing update (DeepSeek-V3 §2.1.2), run after the optimizer
/// step: `bias += γ · sign(mean load − load)`, raising under-loaded experts and lowering
/// over-loaded ones. `counts` may be summed over several steps.
pub fn update_bias<B: Backend>(bias: Tensor<B, 1>, counts: Tensor<B, 1, Int>, gamma: f64) -> Tensor<B, 1> {
    let load = counts.float();
    let mean = load.clone().mean().expand(load.dims());
    bias + (mean - load).sign() * gamma
}
