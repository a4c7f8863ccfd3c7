//! The collectives' backend op: the all-to-all of rows between ranks, on which
//! [`super::ops`] builds every differentiable collective.
//!
//! [`CommBackend::comm_all_to_all`]'s default exchanges the rows through the communicator
//! with Burn ops (slices, FP8 quantization, concatenation), which serves every backend;
//! `Autodiff` overrides it to record the reverse all-to-all as its backward.

use super::{Comm, CommError};
use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    Autodiff,
};
use burn::tensor::{
    backend::Backend,
    ops::{FloatTensor, FloatTensorOps},
    DType, FloatDType, Int, IntDType, Shape, Tensor, TensorPrimitive,
};
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fp8::{Fp8Backend, Fp8Tensor, QuantConfig};
use burn_fusion::{Fusion, FusionBackend};

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

/// The all-to-all of rows as a backend op (FP8 on the wire needs [`Fp8Backend`]).
pub trait CommBackend: Fp8Backend {
    /// All-to-all of rows between the ranks of `comm` (see [`super::all_to_all`]): `x
    /// [Σ send, d]` → `[Σ recv, d]`, FP8 on the wire with `fp8`. `Autodiff` records the
    /// reverse all-to-all (f32) as its backward; a collective failing there panics with
    /// the [`CommError`], which [`super::launch`] reports as that rank's failure.
    fn comm_all_to_all(x: FloatTensor<Self>, splits: &Splits, comm: &Comm, fp8: Option<QuantConfig>) -> Result<FloatTensor<Self>, CommError> {
        let x = Tensor::<Self, 2>::from_primitive(TensorPrimitive::Float(x));
        Ok(all_to_all_rows(x, splits, comm, fp8)?.into_primitive().tensor())
    }
}

#[cfg(feature = "ndarray")]
impl CommBackend for burn::backend::NdArray {}

#[cfg(feature = "flex")]
impl CommBackend for burn::backend::Flex {}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> CommBackend for CubeBackend<R, F, I, BT> {}

impl<B: FusionBackend + CommBackend> CommBackend for Fusion<B> {}

/// Backward of the all-to-all: the reverse all-to-all of the gradient, in f32.
#[derive(Debug)]
struct AllToAllBackward;

#[derive(Clone, Debug)]
struct AllToAllState {
    splits: Splits,
    comm: Comm,
}

impl<B: CommBackend> Backward<B, 2> for AllToAllBackward {
    type State = AllToAllState;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [x_node, _anchor] = ops.parents.map(|p| p.map(|p| p.id));
        let dy = grads.consume::<B>(&ops.node);
        let s = ops.state;
        // The exchange runs even when this rank's input needs no gradient: the other
        // ranks' gradients pass through it.
        let dx = B::comm_all_to_all(dy, &s.splits.reversed(), &s.comm, None).unwrap_or_else(|e| {
            // Burn's backward cannot return errors: unwind with the error itself, which
            // `comm::launch` reports as this rank's result.
            eprintln!("all_to_all backward on rank {}: {e}", s.comm.rank());
            std::panic::panic_any(e)
        });
        if let Some(id) = x_node {
            grads.register::<B>(id, dx);
        }
    }
}

impl<B: CommBackend, C: CheckpointStrategy> CommBackend for Autodiff<B, C> {
    fn comm_all_to_all(x: FloatTensor<Self>, splits: &Splits, comm: &Comm, fp8: Option<QuantConfig>) -> Result<FloatTensor<Self>, CommError> {
        // The op is always tracked: its backward is a collective, which must run on every
        // rank whenever it runs on one, also on a rank whose own input needs no gradient
        // (raw data, or no rows). A tracked empty leaf as second parent makes it so.
        let device = B::float_device(&x.primitive);
        let anchor = Self::float_set_require_grad(Self::float_zeros(Shape::new([0]), &device, FloatDType::F32), true);
        Ok(match AllToAllBackward.prepare::<C>([x.node.clone(), anchor.node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::comm_all_to_all(x.primitive, splits, comm, fp8)?;
                prep.finish(AllToAllState { splits: splits.clone(), comm: comm.clone() }, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::comm_all_to_all(x.primitive, splits, comm, fp8)?),
        })
    }
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

/// The all-to-all on a plain backend (the default of [`CommBackend::comm_all_to_all`]):
/// slice, exchange through the communicator (one exchange for f32 rows; FP8 codes, then
/// their scales), move onto this rank's device, concatenate.
fn all_to_all_rows<B: Fp8Backend>(x: Tensor<B, 2>, splits: &Splits, comm: &Comm, fp8: Option<QuantConfig>) -> Result<Tensor<B, 2>, CommError> {
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
