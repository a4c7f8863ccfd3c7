//! The sequence-wise balance loss of DeepSeek-V3 (§2.1.2, eq. 17–20): a small
//! complementary auxiliary loss that discourages imbalance inside one sequence.

use super::index_counts;
use burn::tensor::{backend::Backend, Int, Tensor};

/// `α · Σ_i f_i · P_i` per sequence, averaged over the sequences, where for a sequence of
/// `S` tokens routed to `k` of `E` experts
/// - `f_i = E / (k·S) · |{t : i ∈ topk(t)}|` (no gradient: counts),
/// - `P_i = (1/S) · Σ_t s'_{i,t}`, `s'` the scores normalized to sum 1 over the experts.
///
/// A perfectly balanced sequence scores `α` (every `f_i = 1`, `Σ P_i = 1`).
///
/// # Shapes
/// - scores: `[N, S, E]` (sigmoid or softmax scores, unbiased)
/// - indices: `[N, S, k]` selected experts
/// - returns `[1]`
pub fn sequence_balance_loss<B: Backend>(scores: Tensor<B, 3>, indices: Tensor<B, 3, Int>, alpha: f64) -> Tensor<B, 1> {
    let [n, s, e] = scores.dims();
    let [ni, si, k] = indices.dims();
    assert!(ni == n && si == s, "sequence_balance_loss: scores {:?} and indices {:?} disagree on [N, S]", [n, s, e], [ni, si, k]);
    if n * s == 0 {
        return Tensor::zeros([1], &scores.device());
    }
    let normalized = scores.clone() / scores.sum_dim(2);
    let p = normalized.mean_dim(1).reshape([n, e]);
    let f = index_counts(indices.reshape([n, s * k]), e).float() * (e as f64 / (k * s) as f64);
    (f * p).sum_dim(1).mean() * alpha
}
