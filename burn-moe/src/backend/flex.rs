//! [`MoeBackend`] on Burn's Flex CPU backend: the MoE ops as host loops over the tensors'
//! own memory, rayon across rows or experts, the `gemm` crate (the one Flex's matmul runs)
//! for the per-expert matrices.
//!
//! Each op does in one pass what the plain-Burn reference ([`crate::reference`]) composes
//! from several whole-tensor ops (one-hot masks, broadcast products, per-expert slices and
//! a concatenation): on a CPU those intermediate tensors and strided walks are the cost.
//! The sums run in the reference's order (a dot product left to right, an expert's rows
//! through `gemm`), so results agree with it to f32 rounding; tests/moe/dispatch.rs checks
//! both against an f64 host reference.
//!
//! Reading expert offsets and indices here is not a device-to-host transfer: Flex tensors
//! live in host memory. Tensors of another float dtype than f32 take the reference path.

use super::{float, int, prim, MoeBackend, PlanPrimitive};
use crate::reference;
use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, TensorData};
use rayon::prelude::*;

/// Rows per rayon task.
const ROWS_PER_TASK: usize = 64;
/// Ops of less work than this many multiply-adds (or copied elements) run on the calling
/// thread: waking rayon's workers costs more (measured with `moe_layer --backend flex`).
const PARALLEL_MIN: usize = 1 << 17;

/// Calls `f(first_row, rows)` over `out` cut into rows of `width` elements, in rayon tasks
/// of [`ROWS_PER_TASK`] rows when the op's `work` reaches [`PARALLEL_MIN`].
fn for_rows(out: &mut [f32], width: usize, work: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let chunk = width * ROWS_PER_TASK;
    if work < PARALLEL_MIN {
        out.chunks_mut(chunk).enumerate().for_each(|(i, rows)| f(i * ROWS_PER_TASK, rows));
    } else {
        out.par_chunks_mut(chunk).enumerate().for_each(|(i, rows)| f(i * ROWS_PER_TASK, rows));
    }
}

/// The f32 elements of `t` in row-major order (a copy only when `t` is a strided view).
fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

fn is_f32(t: &FlexTensor) -> bool {
    t.dtype() == DType::F32
}

fn dims(t: &FlexTensor) -> Vec<usize> {
    t.layout().shape().iter().copied().collect()
}

/// An integer tensor's values as indices (Flex stores them as the backend's int dtype).
fn indices(t: IntTensor<Flex>) -> Vec<usize> {
    // Values are below the tensor sizes they index (non-negative): `as` keeps them.
    let direct = match t.dtype() {
        DType::I64 => t.as_slice::<i64>().map(|v| v.iter().map(|&x| x as usize).collect()),
        DType::I32 => t.as_slice::<i32>().map(|v| v.iter().map(|&x| x as usize).collect()),
        DType::U32 => t.as_slice::<u32>().map(|v| v.iter().map(|&x| x as usize).collect()),
        _ => None,
    };
    direct.unwrap_or_else(|| t.into_data().convert::<i64>().as_slice::<i64>().expect("i64").iter().map(|&v| v as usize).collect())
}

/// Indices in `like`'s integer dtype.
fn int_tensor(values: Vec<usize>, like: DType) -> IntTensor<Flex> {
    let n = values.len();
    let data = match like {
        DType::I32 => TensorData::new(values.into_iter().map(|v| v as i32).collect::<Vec<_>>(), [n]),
        DType::U32 => TensorData::new(values.into_iter().map(|v| v as u32).collect::<Vec<_>>(), [n]),
        _ => TensorData::new(values.into_iter().map(|v| v as i64).collect::<Vec<_>>(), [n]),
    };
    FlexTensor::from_data(data)
}

fn f32_tensor(values: Vec<f32>, shape: &[usize]) -> FloatTensor<Flex> {
    FlexTensor::from_data(TensorData::new(values, shape.to_vec()))
}

fn weights_of(weights: Option<FloatTensor<Flex>>) -> Option<FlexTensor> {
    weights.map(contiguous)
}

/// `c [m, n] (+)= a · b` with `a`'s and `b`'s row and column strides, sequential (the
/// caller parallelizes across experts).
///
/// # Safety
/// The pointers and strides must address `m × k`, `k × n` and `m × n` elements inside
/// their buffers, and `c` must not overlap `a` or `b`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into(m: usize, n: usize, k: usize, c: *mut f32, a: *const f32, a_rs: isize, a_cs: isize, b: *const f32, b_rs: isize, b_cs: isize) {
    gemm::gemm(m, n, k, c, 1, n as isize, false, a, a_cs, a_rs, b, b_cs, b_rs, 0.0, 1.0, false, false, false, gemm::Parallelism::None);
}

/// Raw pointer that may cross threads: each task writes its own disjoint range.
#[derive(Clone, Copy)]
struct Out(*mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// Calls `f((e, start, end))` for every non-empty expert `e` (rows `offsets[e]..offsets[e +
/// 1]`), one rayon task per expert when the op's `work` reaches [`PARALLEL_MIN`].
fn for_experts(offsets: &[usize], work: usize, f: impl Fn((usize, usize, usize)) + Sync + Send) {
    let experts = offsets.windows(2).enumerate().filter(|(_, w)| w[1] > w[0]).map(|(e, w)| (e, w[0], w[1]));
    if work < PARALLEL_MIN {
        experts.for_each(f);
    } else {
        experts.collect::<Vec<_>>().into_par_iter().for_each(f);
    }
}

impl MoeBackend for Flex {
    fn moe_plan(indices_t: IntTensor<Self>, counts: IntTensor<Self>) -> PlanPrimitive<Self> {
        let dtype = indices_t.dtype();
        let (experts, counts) = (indices(indices_t), indices(counts));
        // A counting sort: each slot's row is its expert's start plus its rank among that
        // expert's slots in token order.
        let mut offsets = Vec::with_capacity(counts.len() + 1);
        offsets.push(0);
        for &c in &counts {
            offsets.push(offsets.last().copied().unwrap_or(0) + c);
        }
        let mut next = offsets[..counts.len()].to_vec();
        let mut positions = vec![0; experts.len()];
        let mut row_slots = vec![0; experts.len()];
        for (slot, &e) in experts.iter().enumerate() {
            positions[slot] = next[e];
            row_slots[next[e]] = slot;
            next[e] += 1;
        }
        PlanPrimitive { positions: int_tensor(positions, dtype), row_slots: int_tensor(row_slots, dtype), offsets: int_tensor(offsets, dtype) }
    }

    fn moe_gather(x: FloatTensor<Self>, plan: PlanPrimitive<Self>, top_k: usize, weights: Option<FloatTensor<Self>>) -> FloatTensor<Self> {
        if !is_f32(&x) {
            return prim(reference::gather::<Self>(float(x), int(plan.row_slots), top_k, weights.map(float)));
        }
        let (x, weights) = (contiguous(x), weights_of(weights));
        let d = dims(&x)[1];
        let slots = indices(plan.row_slots);
        if d == 0 {
            return f32_tensor(Vec::new(), &[slots.len(), 0]);
        }
        let (xs, ws) = (x.as_slice::<f32>().expect("f32"), weights.as_ref().map(|w| w.as_slice::<f32>().expect("f32")));
        let mut out = vec![0f32; slots.len() * d];
        for_rows(&mut out, d, slots.len() * d, |first, rows| {
            for (i, row) in rows.chunks_mut(d).enumerate() {
                let s = slots[first + i];
                let src = &xs[(s / top_k) * d..(s / top_k + 1) * d];
                match ws {
                    Some(w) => row.iter_mut().zip(src).for_each(|(o, &v)| *o = w[s] * v),
                    None => row.copy_from_slice(src),
                }
            }
        });
        f32_tensor(out, &[slots.len(), d])
    }

    fn moe_combine(rows: FloatTensor<Self>, plan: PlanPrimitive<Self>, top_k: usize, weights: Option<FloatTensor<Self>>) -> FloatTensor<Self> {
        if !is_f32(&rows) {
            return prim(reference::combine::<Self>(float(rows), int(plan.positions), top_k, weights.map(float)));
        }
        let (rows, weights) = (contiguous(rows), weights_of(weights));
        let d = dims(&rows)[1];
        let positions = indices(plan.positions);
        let t = positions.len() / top_k.max(1);
        if d == 0 {
            return f32_tensor(Vec::new(), &[t, 0]);
        }
        let (rs, ws) = (rows.as_slice::<f32>().expect("f32"), weights.as_ref().map(|w| w.as_slice::<f32>().expect("f32")));
        let mut out = vec![0f32; t * d];
        for_rows(&mut out, d, positions.len() * d, |first, tokens| {
            for (i, token) in tokens.chunks_mut(d).enumerate() {
                let tok = first + i;
                for j in 0..top_k {
                    let s = tok * top_k + j;
                    let src = &rs[positions[s] * d..(positions[s] + 1) * d];
                    let w = ws.map_or(1.0, |w| w[s]);
                    token.iter_mut().zip(src).for_each(|(o, &v)| *o += w * v);
                }
            }
        });
        f32_tensor(out, &[t, d])
    }

    fn moe_gate_grad(a: FloatTensor<Self>, rows: FloatTensor<Self>, plan: PlanPrimitive<Self>, top_k: usize) -> FloatTensor<Self> {
        if !is_f32(&a) || !is_f32(&rows) {
            return prim(reference::gate_grad::<Self>(float(a), float(rows), int(plan.positions), top_k));
        }
        let (a, rows) = (contiguous(a), contiguous(rows));
        let d = dims(&a)[1];
        let positions = indices(plan.positions);
        let (xa, xr) = (a.as_slice::<f32>().expect("f32"), rows.as_slice::<f32>().expect("f32"));
        let mut out = vec![0f32; positions.len()];
        for_rows(&mut out, 1, positions.len() * d, |first, slots| {
            for (i, o) in slots.iter_mut().enumerate() {
                let s = first + i;
                let (t, r) = (s / top_k, positions[s]);
                *o = xa[t * d..(t + 1) * d].iter().zip(&xr[r * d..(r + 1) * d]).map(|(&p, &q)| p * q).sum();
            }
        });
        f32_tensor(out, &[positions.len()])
    }

    fn moe_grouped_matmul(a: FloatTensor<Self>, b: FloatTensor<Self>, offsets: IntTensor<Self>, transpose_b: bool) -> FloatTensor<Self> {
        if !is_f32(&a) || !is_f32(&b) {
            return prim(reference::grouped_matmul::<Self>(float(a), float(b), int(offsets), transpose_b));
        }
        let (a, b) = (contiguous(a), contiguous(b));
        let ([s, k], [_, p, q]) = (<[usize; 2]>::try_from(dims(&a)).expect("[S, K]"), <[usize; 3]>::try_from(dims(&b)).expect("[E, K, N]"));
        let n = if transpose_b { p } else { q };
        let offsets = indices(offsets);
        let mut out = vec![0f32; s * n];
        let (xa, xb, c) = (a.as_slice::<f32>().expect("f32"), b.as_slice::<f32>().expect("f32"), Out(out.as_mut_ptr()));
        // b[e] as a [K, N] operand: row stride N, column stride 1 as it lies; used
        // transposed (`[N, K]` in memory), row stride 1 and column stride K.
        let (b_rs, b_cs) = if transpose_b { (1, k as isize) } else { (n as isize, 1) };
        for_experts(&offsets, s * k * n, |(e, start, end)| {
            // Captures the whole `Send` wrapper, not its raw-pointer field.
            #[allow(clippy::redundant_locals)]
            let c = c;
            // SAFETY: expert `e` writes only rows start..end of `out`, which no other
            // expert touches; `a`, `b` and `out` are distinct buffers of the sizes used.
            unsafe { gemm_into(end - start, n, k, c.0.add(start * n), xa.as_ptr().add(start * k), k as isize, 1, xb.as_ptr().add(e * p * q), b_rs, b_cs) }
        });
        f32_tensor(out, &[s, n])
    }

    fn moe_grouped_wgrad(a: FloatTensor<Self>, d: FloatTensor<Self>, offsets: IntTensor<Self>) -> FloatTensor<Self> {
        if !is_f32(&a) || !is_f32(&d) {
            return prim(reference::grouped_wgrad::<Self>(float(a), float(d), int(offsets)));
        }
        let (a, d) = (contiguous(a), contiguous(d));
        let (k, n) = (dims(&a)[1], dims(&d)[1]);
        let offsets = indices(offsets);
        let e = offsets.len().saturating_sub(1);
        let mut out = vec![0f32; e * k * n];
        let (xa, xd, c) = (a.as_slice::<f32>().expect("f32"), d.as_slice::<f32>().expect("f32"), Out(out.as_mut_ptr()));
        for_experts(&offsets, a.layout().num_elements() * n, |(e, start, end)| {
            // Captures the whole `Send` wrapper, not its raw-pointer field.
            #[allow(clippy::redundant_locals)]
            let c = c;
            // a_eᵀ [K, rows]: row stride 1, column stride K. SAFETY: expert `e` writes only
            // its own `[K, N]` block of `out`; the reads stay inside rows start..end.
            unsafe { gemm_into(k, n, end - start, c.0.add(e * k * n), xa.as_ptr().add(start * k), 1, k as isize, xd.as_ptr().add(start * n), n as isize, 1) }
        });
        f32_tensor(out, &[e, k, n])
    }
}
