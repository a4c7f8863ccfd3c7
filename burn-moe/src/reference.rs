//! The dispatch, combine and grouped-GEMM ops in plain Burn tensor ops: the default
//! implementation of [`crate::backend::MoeBackend`] (what the reference backend runs) and
//! the baseline the kernels are tested against.
//!
//! Callers ([`crate::dispatch`]) handle empty inputs before calling these.
//!
//! # Example
//! ```
//! use burn::backend::NdArray;
//! use burn::tensor::{Int, Tensor, TensorData};
//! use burn_moe::reference::grouped_matmul;
//!
//! let device = Default::default();
//! // Rows 0..2 belong to expert 0, expert 1 is empty, row 2 to expert 2.
//! let a = Tensor::<NdArray, 2>::from_data([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], &device);
//! let b = Tensor::<NdArray, 3>::from_data([[[1.0, 2.0], [3.0, 4.0]], [[9.0, 9.0], [9.0, 9.0]], [[1.0, 0.0], [0.0, -1.0]]], &device);
//! let offsets = Tensor::<NdArray, 1, Int>::from_data(TensorData::new(vec![0i64, 2, 2, 3], [4]), &device);
//! let out = grouped_matmul(a, b, offsets, false);
//! assert_eq!(out.into_data().to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0, 1.0, -1.0]);
//! ```

use burn::tensor::{backend::Backend, IndexingUpdateOp, Int, Tensor};

/// Flat expert `indices [S]` and `counts [E]` → `(positions [S], row_slots [S],
/// offsets [E + 1])`: rows of an expert in token order.
pub fn plan<B: Backend>(indices: Tensor<B, 1, Int>, counts: Tensor<B, 1, Int>) -> [Tensor<B, 1, Int>; 3] {
    let [s] = indices.dims();
    let [e] = counts.dims();
    let device = indices.device();
    let ends = counts.clone().cumsum(0);
    let offsets = Tensor::cat(vec![Tensor::zeros([1], &device), ends.clone()], 0);
    let starts = ends - counts;
    let experts = Tensor::<B, 1, Int>::arange(0..e as i64, &device).reshape([1, e]).expand([s, e]);
    let one_hot = indices.clone().reshape([s, 1]).expand([s, e]).equal(experts).int();
    // Rank of each slot among its expert's slots, in token order.
    let rank = (one_hot.clone().cumsum(0) * one_hot).sum_dim(1).reshape([s]) - 1;
    let positions = starts.select(0, indices) + rank;
    let slots = Tensor::<B, 1, Int>::arange(0..s as i64, &device);
    let row_slots = Tensor::zeros([s], &device).scatter(0, positions.clone(), slots, IndexingUpdateOp::Add);
    [positions, row_slots, offsets]
}

/// `out[r] = w[s] · x[s / top_k]`, `s = row_slots[r]`.
pub fn gather<B: Backend>(x: Tensor<B, 2>, row_slots: Tensor<B, 1, Int>, top_k: usize, weights: Option<Tensor<B, 1>>) -> Tensor<B, 2> {
    let rows = x.select(0, row_slots.clone().div_scalar(top_k as i64));
    match weights {
        Some(w) => rows * w.select(0, row_slots).unsqueeze_dim(1),
        None => rows,
    }
}

/// `out[t] = Σ_j w[t·k + j] · rows[positions[t·k + j]]`.
pub fn combine<B: Backend>(rows: Tensor<B, 2>, positions: Tensor<B, 1, Int>, top_k: usize, weights: Option<Tensor<B, 1>>) -> Tensor<B, 2> {
    let [s] = positions.dims();
    let d = rows.dims()[1];
    let mut picked = rows.select(0, positions);
    if let Some(w) = weights {
        picked = picked * w.unsqueeze_dim(1);
    }
    picked.reshape([s / top_k, top_k, d]).sum_dim(1).reshape([s / top_k, d])
}

/// `out[s] = ⟨a[s / k], rows[positions[s]]⟩`, `[T·k]`.
pub fn gate_grad<B: Backend>(a: Tensor<B, 2>, rows: Tensor<B, 2>, positions: Tensor<B, 1, Int>, top_k: usize) -> Tensor<B, 1> {
    let [s] = positions.dims();
    let [t, d] = a.dims();
    let picked = rows.select(0, positions).reshape([t, top_k, d]);
    (picked * a.unsqueeze_dim(1)).sum_dim(2).reshape([s])
}

/// Expert `e`'s `[K, N]` matrix from `b [E, K, N]` (or `[E, N, K]` transposed).
fn expert_matrix<B: Backend>(b: &Tensor<B, 3>, e: usize, transpose_b: bool) -> Tensor<B, 2> {
    let [_, p, q] = b.dims();
    let m = b.clone().slice([e..e + 1]).reshape([p, q]);
    if transpose_b {
        m.transpose()
    } else {
        m
    }
}

/// Row ranges of each expert, read back from `offsets [E + 1]`.
fn ranges<B: Backend>(offsets: Tensor<B, 1, Int>) -> Vec<(usize, usize)> {
    let offsets: Vec<i64> = offsets.into_data().convert::<i64>().to_vec().expect("offsets");
    offsets.windows(2).map(|w| (w[0] as usize, w[1] as usize)).collect()
}

/// Per expert, `a[rows_e] · B_e`, concatenated: one matmul per non-empty expert.
pub fn grouped_matmul<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 3>, offsets: Tensor<B, 1, Int>, transpose_b: bool) -> Tensor<B, 2> {
    let parts: Vec<_> = ranges(offsets)
        .into_iter()
        .enumerate()
        .filter(|(_, (start, end))| end > start)
        .map(|(e, (start, end))| a.clone().slice([start..end]).matmul(expert_matrix(&b, e, transpose_b)))
        .collect();
    Tensor::cat(parts, 0)
}

/// Per expert, `a_eᵀ · d_e` (zeros for an empty expert), stacked to `[E, K, N]`.
pub fn grouped_wgrad<B: Backend>(a: Tensor<B, 2>, d: Tensor<B, 2>, offsets: Tensor<B, 1, Int>) -> Tensor<B, 3> {
    let (k, n) = (a.dims()[1], d.dims()[1]);
    let device = a.device();
    let parts: Vec<_> = ranges(offsets)
        .into_iter()
        .map(
            |(start, end)| {
                if end > start {
                    a.clone().slice([start..end]).transpose().matmul(d.clone().slice([start..end])).reshape([1, k, n])
                } else {
                    Tensor::zeros([1, k, n], &device)
                }
            },
        )
        .collect();
    Tensor::cat(parts, 0)
}
