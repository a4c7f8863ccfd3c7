//! The differentiable collectives over a [`Comm`]: [`all_to_all`] (a backend op,
//! [`CommBackend::comm_all_to_all`], so that `Autodiff` records its backward, the reverse
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

use super::backend::{CommBackend, Splits};
use super::{Comm, CommError};
use burn::tensor::{Tensor, TensorPrimitive};
use burn_fp8::QuantConfig;

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
pub fn all_to_all<B: CommBackend>(x: Tensor<B, 2>, splits: &Splits, comm: &Comm, fp8: Option<QuantConfig>) -> Result<Tensor<B, 2>, CommError> {
    check_splits(x.dims(), splits, comm)?;
    Ok(Tensor::from_primitive(TensorPrimitive::Float(B::comm_all_to_all(x.into_primitive().tensor(), splits, comm, fp8)?)))
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
pub fn all_gather<B: CommBackend, const D: usize>(x: Tensor<B, D>, comm: &Comm) -> Result<Tensor<B, D>, CommError> {
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
pub fn all_reduce<B: CommBackend, const D: usize>(x: Tensor<B, D>, comm: &Comm) -> Result<Tensor<B, D>, CommError> {
    let dims = x.dims();
    let numel: usize = dims.iter().product();
    let gathered = all_gather(x.reshape([1, numel]), comm)?;
    let [world, _] = gathered.dims();
    if world != comm.world_size() {
        return Err(comm.shape_error("all_reduce", format!("x {dims:?} has a different shape on another rank")));
    }
    Ok(gathered.sum_dim(0).reshape(dims))
}
