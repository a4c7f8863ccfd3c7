//! Reduce-scatter, all-gather and all-reduce of flat vectors over a [`Comm`], each one
//! all-to-all ([`Comm::exchange_tensors`]), so they run on every engine: threads, MPI
//! processes, and NCCL between CUDA tensors.
//!
//! A vector is cut into the ranks' ranges `bounds[r]..bounds[r + 1]`. The reduce-scatter
//! sends each range to its rank, which sums what it receives; the all-gather sends each
//! rank's range to every rank. An all-reduce is both: each rank sends and receives
//! `2 (W − 1) / W` of the vector, as a ring all-reduce does.
//!
//! These are for gradients and parameter values outside the autodiff graph; burn-moe's
//! `comm::{all_gather, all_reduce}` are the differentiable ones.

use burn::tensor::{backend::Backend, Tensor};
use burn_comm::{Comm, CommError};

fn check_bounds(comm: &Comm, op: &'static str, bounds: &[usize], n: Option<usize>) -> Result<(), CommError> {
    let ok = bounds.len() == comm.world_size() + 1 && bounds.windows(2).all(|w| w[0] <= w[1]) && n.is_none_or(|n| bounds[0] == 0 && bounds[bounds.len() - 1] == n);
    if ok {
        Ok(())
    } else {
        let detail = format!("bounds {bounds:?} do not cut a vector of {n:?} elements into {} ranges", comm.world_size());
        Err(comm.shape_error(op, detail))
    }
}

/// The sum over ranks of `flat[bounds[me]..bounds[me + 1]]`, on this rank.
///
/// # Shapes
/// - flat: `[bounds[W]]` on every rank → `[bounds[me + 1] - bounds[me]]`
///
/// # Errors
/// Bounds that do not cut `flat` into one range per rank; a failed or stalled rank.
pub fn reduce_scatter<B: Backend>(flat: Tensor<B, 1>, bounds: &[usize], comm: &Comm) -> Result<Tensor<B, 1>, CommError> {
    let op = "dp reduce_scatter";
    check_bounds(comm, op, bounds, Some(flat.dims()[0]))?;
    let device = flat.device();
    let me = comm.rank();
    let parts = (0..comm.world_size()).map(|r| (bounds[r + 1] > bounds[r]).then(|| flat.clone().slice([bounds[r]..bounds[r + 1]]))).collect();
    let got = comm.exchange_tensors(op, parts, &device)?;
    let n = bounds[me + 1] - bounds[me];
    let parts = received(comm, op, got, |_| n)?;
    Ok(parts.into_iter().reduce(|sum, p| sum + p).unwrap_or_else(|| Tensor::zeros([0], &device)))
}

/// Every rank's `shard` concatenated in rank order: rank `r`'s holds the elements
/// `bounds[r]..bounds[r + 1]`.
///
/// # Shapes
/// - shard: `[bounds[me + 1] - bounds[me]]` → `[bounds[W]]`
///
/// # Errors
/// A shard of another length than its range; a failed or stalled rank.
pub fn all_gather<B: Backend>(shard: Tensor<B, 1>, bounds: &[usize], comm: &Comm) -> Result<Tensor<B, 1>, CommError> {
    let op = "dp all_gather";
    check_bounds(comm, op, bounds, None)?;
    let me = comm.rank();
    let n = bounds[me + 1] - bounds[me];
    if shard.dims()[0] != n {
        let detail = format!("a shard of {} elements for this rank's range of {n}", shard.dims()[0]);
        return Err(comm.shape_error(op, detail));
    }
    let device = shard.device();
    let parts = (0..comm.world_size()).map(|_| (n > 0).then(|| shard.clone())).collect();
    let got = comm.exchange_tensors(op, parts, &device)?;
    let pieces = received(comm, op, got, |src| bounds[src + 1] - bounds[src])?;
    Ok(crate::layout::flat(pieces, &device))
}

/// The non-empty parts of an exchange, each checked to hold `want(src)` elements (a rank
/// sending nothing where elements are due, or the wrong count, is a shape error).
fn received<B: Backend>(comm: &Comm, op: &'static str, got: Vec<Option<Tensor<B, 1>>>, want: impl Fn(usize) -> usize) -> Result<Vec<Tensor<B, 1>>, CommError> {
    let mut parts = Vec::with_capacity(got.len());
    for (src, part) in got.into_iter().enumerate() {
        let want = want(src);
        match part {
            Some(p) if p.dims()[0] == want => parts.push(p),
            None if want == 0 => {}
            other => {
                let detail = format!("rank {} sent {:?} elements where {want} are due", comm.global_rank(src), other.map(|p| p.dims()[0]));
                return Err(comm.shape_error(op, detail));
            }
        }
    }
    Ok(parts)
}

/// The element-wise sum over ranks of `flat`, on every rank (a reduce-scatter over even
/// ranges, then an all-gather).
///
/// # Errors
/// A failed or stalled rank; vectors of different lengths.
pub fn all_reduce<B: Backend>(flat: Tensor<B, 1>, comm: &Comm) -> Result<Tensor<B, 1>, CommError> {
    let n = flat.dims()[0];
    let world = comm.world_size();
    if world == 1 {
        return Ok(flat);
    }
    let bounds = even_bounds(n, world);
    let shard = reduce_scatter(flat, &bounds, comm)?;
    all_gather(shard, &bounds, comm)
}

/// `0, n/W, 2n/W, …, n`: `W` ranges differing by at most one element.
pub fn even_bounds(n: usize, world: usize) -> Vec<usize> {
    (0..=world).map(|r| n * r / world).collect()
}
