//! A naive per-token router on the host, the ground truth of the tests: written from the
//! rules, one token at a time, with sorting instead of masked rounds of max.

use super::{GroupScore, RouterConfig};

/// Orders `(value, index)` pairs best first: larger value, then lower index.
fn best_first(a: &(f32, usize), b: &(f32, usize)) -> core::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Routes one batch on the host from already computed `scores [T, E]` (row-major) and
/// `bias [E]`. Returns per token the selected experts (best first) and their weights.
pub fn route_host(scores: &[f32], bias: Option<&[f32]>, t: usize, config: &RouterConfig) -> Vec<(Vec<usize>, Vec<f32>)> {
    let e = config.n_experts;
    let size = e / config.n_groups;
    (0..t)
        .map(|row| {
            let s = &scores[row * e..(row + 1) * e];
            let biased: Vec<f32> = (0..e).map(|j| s[j] + bias.map_or(0.0, |b| b[j])).collect();
            // Groups allowed for this token.
            let allowed: Vec<bool> = if config.n_groups > 1 {
                let mut groups: Vec<(f32, usize)> = (0..config.n_groups)
                    .map(|g| {
                        let mut members: Vec<(f32, usize)> = (g * size..(g + 1) * size).map(|j| (biased[j], j)).collect();
                        members.sort_by(best_first);
                        let score = match config.group_score {
                            GroupScore::TopTwoSum => members.iter().take(2).fold(0.0f32, |acc, m| acc + m.0),
                            GroupScore::Max => members[0].0,
                        };
                        (score, g)
                    })
                    .collect();
                groups.sort_by(best_first);
                let mut allowed = vec![false; config.n_groups];
                groups.iter().take(config.topk_groups).for_each(|&(_, g)| allowed[g] = true);
                allowed
            } else {
                vec![true]
            };
            let mut candidates: Vec<(f32, usize)> = (0..e).filter(|j| allowed[j / size]).map(|j| (biased[j], j)).collect();
            candidates.sort_by(best_first);
            let experts: Vec<usize> = candidates.iter().take(config.top_k).map(|&(_, j)| j).collect();
            let mut weights: Vec<f32> = experts.iter().map(|&j| s[j]).collect();
            if config.normalize {
                let sum: f32 = weights.iter().sum();
                weights.iter_mut().for_each(|w| *w /= sum);
            }
            weights.iter_mut().for_each(|w| *w = (*w as f64 * config.route_scale) as f32);
            (experts, weights)
        })
        .collect()
}
