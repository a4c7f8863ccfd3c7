//! The differentiable collectives over a [`Comm`]: [`all_to_all`] (a backend op,
//! [`MoeBackend::moe_all_to_all`], so that `Autodiff` records its backward, the reverse
//! all-to-all), and [`all_gather`] and [`all_reduce`], written with it and Burn ops.
//!
//! # Example
//! ```
//! use burn::backend::NdArray;
//! use burn::tensor::Tensor;
//! use burn_moe::comm::{all_gather, all_reduce, launch, Comm, CommError, Transport};
//!
//! let device = Default::default();
//! let results = launch(Comm::group(3, Transport::Host), |comm| {
//!     let x = Tensor::<NdArray, 1>::from_floats([comm.rank() as f32 + 1.0], &device);
//!     let gathered = all_gather(x.clone(), &comm)?; // [1, 2, 3] on every rank
//!     let total = all_reduce(x, &comm)?; // [6]
//!     Ok::<_, CommError>((gathered.into_data().to_vec::<f32>().unwrap(), total.into_scalar()))
//! })
//! .unwrap();
//! assert!(results.iter().all(|(g, t)| g == &[1.0, 2.0, 3.0] && *t == 6.0));
//! ```

use super::{Comm, CommError};
use crate::backend::MoeBackend;
use burn::tensor::{backend::Backend, DType, Int, IntDType, Tensor, TensorPrimitive};
use burn_fp8::{Fp8Backend, Fp8Tensor, QuantConfig};

/// Rows this rank sends to and receives from each rank, by rank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Splits {
    /// `send[r]`: rows going to rank `r` (consecutive, rank 0's first).
    pub send: Vec<usize>,
    /// `recv[r]`: rows arriving from rank `r` (placed in rank order).
    pub recv: Vec<usize>,
}

impl Splits {
    /// The splits of the way back: what was received is sent.
    pub fn reversed(&self) -> Self {
        Self { send: self.recv.clone(), recv: self.send.clone() }
    }
}

/// All-to-all with uneven splits: rows `send[0]` of `x` go to rank 0, the next `send[1]`
/// to rank 1, ...; the result holds the rows from rank 0, then rank 1, ... (`recv[r]`
/// from rank `r`). With `fp8`, each part travels quantized in FP8 with per-tile scales
/// (1×128 tiles: about a quarter of the f32 bytes) and is dequantized on arrival; the
/// backward (the reverse all-to-all of the gradient) runs in f32.
///
/// # Shapes
/// - x: `[Σ send, d]` → `[Σ recv, d]`
///
/// # Errors
/// Split lengths other than the group size, `Σ send` other than the rows of `x`, a rank
/// sending a number of rows other than `recv` says, and failed or stalled ranks.
pub fn all_to_all<B: MoeBackend>(x: Tensor<B, 2>, splits: &Splits, comm: &Comm, fp8: Option<QuantConfig>) -> Result<Tensor<B, 2>, CommError> {
    check_splits(x.dims(), splits, comm)?;
    Ok(Tensor::from_primitive(TensorPrimitive::Float(B::moe_all_to_all(x.into_primitive().tensor(), splits, comm, fp8)?)))
}

fn check_splits([n, d]: [usize; 2], splits: &Splits, comm: &Comm) -> Result<(), CommError> {
    let world = comm.world_size();
    if splits.send.len() != world || splits.recv.len() != world {
        let detail = format!("splits {splits:?} need one entry per rank ({world})");
        return Err(comm.shape_error("all_to_all", detail));
    }
    if splits.send.iter().sum::<usize>() != n {
        let detail = format!("send splits {:?} sum to {}, x {:?} has {n} rows", splits.send, splits.send.iter().sum::<usize>(), [n, d]);
        return Err(comm.shape_error("all_to_all", detail));
    }
    Ok(())
}

/// Every rank's `x`, concatenated along the first dimension in rank order; the ranks may
/// hold different numbers of rows. Backward: each rank receives the sum over ranks of
/// the gradient of its rows (a reduce-scatter).
///
/// # Shapes
/// - x: `[n_r, ...]` on rank `r` → `[Σ n_r, ...]`
pub fn all_gather<B: MoeBackend, const D: usize>(x: Tensor<B, D>, comm: &Comm) -> Result<Tensor<B, D>, CommError> {
    let dims = x.dims();
    let rows = dims[0];
    let width: usize = dims[1..].iter().product();
    let sizes = comm.all_gather_host("all_gather sizes", (rows, dims.to_vec()))?;
    if let Some((r, (_, other))) = sizes.iter().enumerate().find(|(_, (_, other))| other[1..] != dims[1..]) {
        let detail = format!("x {dims:?} and rank {r}'s {other:?} differ beyond the first dimension");
        return Err(comm.shape_error("all_gather", detail));
    }
    let world = comm.world_size();
    let flat = x.reshape([rows, width]);
    let repeated = if world == 1 { flat } else { Tensor::cat(vec![flat; world], 0) };
    let splits = Splits { send: vec![rows; world], recv: sizes.iter().map(|(n, _)| *n).collect() };
    let gathered = all_to_all(repeated, &splits, comm, None)?;
    let mut out = dims;
    out[0] = splits.recv.iter().sum();
    Ok(gathered.reshape(out))
}

/// The element-wise sum of every rank's `x` (same shape on every rank), on every rank.
/// Backward: the all-reduce of the gradients.
pub fn all_reduce<B: MoeBackend, const D: usize>(x: Tensor<B, D>, comm: &Comm) -> Result<Tensor<B, D>, CommError> {
    let dims = x.dims();
    let numel: usize = dims.iter().product();
    let gathered = all_gather(x.reshape([1, numel]), comm)?;
    let [world, _] = gathered.dims();
    if world != comm.world_size() {
        return Err(comm.shape_error("all_reduce", format!("x {dims:?} has a different shape on another rank")));
    }
    Ok(gathered.sum_dim(0).reshape(dims))
}

/// What travels for one non-empty part of an all-to-all (empty parts travel as `None`:
/// CubeCL tensors without rows are not safe to read or copy).
enum RowPart<B: Backend> {
    F32(Tensor<B, 2>),
    /// Packed codes and scales.
    Fp8 {
        data: Tensor<B, 2, Int>,
        scales: Tensor<B, 2>,
    },
}

impl<B: Fp8Backend> RowPart<B> {
    fn new(x: Tensor<B, 2>, fp8: Option<QuantConfig>) -> Self {
        match fp8 {
            None => RowPart::F32(x),
            Some(config) => {
                let q = Fp8Tensor::quantize(x, config);
                RowPart::Fp8 { data: q.data().clone(), scales: q.scales().clone() }
            }
        }
    }
}

/// The all-to-all on a plain backend (the default of [`MoeBackend::moe_all_to_all`]):
/// slice, exchange through the communicator (one exchange for f32 rows; FP8 codes, then
/// their scales), move onto this rank's device, concatenate.
pub(crate) fn all_to_all_rows<B: Fp8Backend>(x: Tensor<B, 2>, splits: &Splits, comm: &Comm, fp8: Option<QuantConfig>) -> Result<Tensor<B, 2>, CommError> {
    let [_, d] = x.dims();
    let device = x.device();
    let mut start = 0;
    let mut parts = Vec::with_capacity(splits.send.len());
    for &n in &splits.send {
        start += n;
        parts.push((n > 0 && d > 0).then(|| RowPart::new(x.clone().slice([start - n..start, 0..d]), fp8)));
    }
    let rows: Vec<Option<Tensor<B, 2>>> = match fp8 {
        None => {
            let f32_parts = parts
                .into_iter()
                .map(|p| {
                    p.map(|p| match p {
                        RowPart::F32(x) => x,
                        RowPart::Fp8 { .. } => unreachable!("f32 rows"),
                    })
                })
                .collect();
            comm.exchange_tensors("all_to_all", f32_parts, &device)?
        }
        Some(config) => {
            let (data, scales): (Vec<_>, Vec<_>) = parts
                .into_iter()
                .map(|p| match p {
                    Some(RowPart::Fp8 { data, scales }) => (Some(data), Some(scales)),
                    Some(RowPart::F32(_)) => unreachable!("FP8 rows"),
                    None => (None, None),
                })
                .unzip();
            // Codes travel as u32 words, four per word, whatever int type the backend
            // holds them in (the reference backend's is i64), and come back in it.
            let local = data.iter().flatten().next().map(|t| t.dtype());
            let words = data.into_iter().map(|t| t.map(|t| if t.dtype() == DType::U32 { t } else { t.cast(IntDType::U32) })).collect();
            let data: Vec<Option<Tensor<B, 2, Int>>> = comm.exchange_tensors("all_to_all fp8 codes", words, &device)?;
            let data: Vec<_> = data
                .into_iter()
                .map(|t| {
                    t.map(|t| match local {
                        Some(DType::I64) => t.cast(IntDType::I64),
                        Some(DType::I32) => t.cast(IntDType::I32),
                        _ => t,
                    })
                })
                .collect();
            let scales = comm.exchange_tensors("all_to_all fp8 scales", scales, &device)?;
            let mut rows = Vec::with_capacity(data.len());
            for (src, (data, scales)) in data.into_iter().zip(scales).enumerate() {
                rows.push(match (data, scales) {
                    (Some(data), Some(scales)) => {
                        let n = splits.recv[src];
                        let q = Fp8Tensor::from_parts(data, scales, [n, d], config)
                            .map_err(|e| comm.shape_error("all_to_all", format!("rank {src}'s FP8 part does not hold {n} rows of {d}: {e}")))?;
                        Some(q.dequantize())
                    }
                    (None, None) => None,
                    _ => return Err(comm.shape_error("all_to_all", format!("rank {src} sent FP8 codes without scales or scales without codes"))),
                });
            }
            rows
        }
    };
    let mut out = Vec::new();
    for (src, (part, &expected)) in rows.into_iter().zip(&splits.recv).enumerate() {
        let n = part.as_ref().map_or(0, |p| p.dims()[0]);
        // A zero-width tensor travels as no part: its rows are known from the splits.
        if n != expected && d > 0 {
            let detail = format!("rank {src} sent {n} rows, recv splits {:?} expect {expected}", splits.recv);
            return Err(comm.shape_error("all_to_all", detail));
        }
        out.extend(part);
    }
    Ok(match out.len() {
        0 => Tensor::zeros([splits.recv.iter().sum(), d], &device),
        1 => out.pop().expect("one part"),
        _ => Tensor::cat(out, 0),
    })
}
