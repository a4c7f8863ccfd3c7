//! Burn CUDA tensors as NCCL buffers: the CubeCL tensor behind a `Tensor` of
//! `CubeBackend<CudaRuntime, ..>` or of `Fusion` over it (Burn's `Cuda`), its device
//! address, and new tensors over received buffers.
//!
//! The communicator's tensor API is generic over Burn backends; which backend a call is
//! on is known only at run time here, by the types of the primitives ([`is_cuda`]).

use super::{Nccl, Transfer};
use crate::{Comm, CommError};
use burn::tensor::{backend::Backend, BasicOps, Bool, DType, Float, Int, Shape, Tensor, TensorKind, TensorPrimitive};
use burn_cubecl::{fusion::FusionCubeRuntime, kernel::into_contiguous, tensor::CubeTensor, CubeBackend};
use burn_fusion::{client::GlobalFusionClient, stream::OperationStreams, FusionTensor, NoOp};
use burn_ir::{InitOperationIr, OperationIr, OperationOutput};
use cubecl::cuda::{CudaDevice, CudaRuntime};
use cubecl::Runtime;
use serde::{Deserialize, Serialize};
use std::any::{Any, TypeId};

/// The CubeCL backend the tensors are resolved on (any float and int element types share
/// the same CubeCL tensors).
type Cube = CubeBackend<CudaRuntime, f32, i32, u8>;
type FusionCuda = FusionTensor<FusionCubeRuntime<CudaRuntime>>;

/// Whether tensors of kind `K` on backend `B` are CUDA tensors NCCL can move: `B` is a
/// CubeCL CUDA backend with or without `Fusion` (not `Autodiff`, whose collectives run on
/// its inner backend), `K` is float, int or bool.
pub(crate) fn is_cuda<B: Backend, K: 'static>() -> bool {
    let kind = [TypeId::of::<Float>(), TypeId::of::<Int>(), TypeId::of::<Bool>()].contains(&TypeId::of::<K>());
    let float = TypeId::of::<B::FloatTensorPrimitive>();
    kind && TypeId::of::<B::Device>() == TypeId::of::<CudaDevice>() && (float == TypeId::of::<CubeTensor<CudaRuntime>>() || float == TypeId::of::<FusionCuda>())
}

/// The contiguous CubeCL tensor of `x` (fusion flushed; quantized tensors refused).
fn into_cube<B: Backend, const D: usize, K>(x: Tensor<B, D, K>) -> Result<CubeTensor<CudaRuntime>, String>
where
    K: TensorKind<B> + BasicOps<B> + 'static,
    K::Primitive: 'static,
{
    let prim: Box<dyn Any> = Box::new(x.into_primitive());
    let inner: Box<dyn Any> = match prim.downcast::<TensorPrimitive<B>>() {
        Ok(p) => match *p {
            TensorPrimitive::Float(t) => Box::new(t),
            TensorPrimitive::QFloat(_) => return Err("quantized tensors do not travel by NCCL".into()),
        },
        Err(other) => other,
    };
    let cube = match inner.downcast::<CubeTensor<CudaRuntime>>() {
        Ok(t) => *t,
        Err(inner) => {
            let t = *inner.downcast::<FusionCuda>().map_err(|_| "not a CubeCL CUDA tensor".to_string())?;
            let client = t.client.clone();
            match t.dtype {
                DType::Bool(_) => client.resolve_tensor_bool::<Cube>(t),
                d if d.is_float() => client.resolve_tensor_float::<Cube>(t),
                _ => client.resolve_tensor_int::<Cube>(t),
            }
        }
    };
    Ok(into_contiguous(cube))
}

/// `t` as a tensor of kind `K` on backend `B` (registered with the fusion client when `B`
/// fuses).
fn from_cube<B: Backend, const D: usize, K>(t: CubeTensor<CudaRuntime>) -> Tensor<B, D, K>
where
    K: TensorKind<B> + BasicOps<B> + 'static,
    K::Primitive: 'static,
{
    let inner: Box<dyn Any> = if TypeId::of::<B::FloatTensorPrimitive>() == TypeId::of::<FusionCuda>() {
        let client = GlobalFusionClient::<FusionCubeRuntime<CudaRuntime>>::load(&t.device);
        let shape = t.meta.shape().clone();
        let dtype = t.dtype;
        let handle = t.into();
        let desc = InitOperationIr::create(shape, dtype, || client.register_tensor_handle(handle));
        Box::new(client.register(OperationStreams::default(), OperationIr::Init(desc), NoOp::<Cube>::new()).output())
    } else {
        Box::new(t)
    };
    let prim: Box<dyn Any> = if TypeId::of::<K>() == TypeId::of::<Float>() {
        let t = *inner.downcast::<B::FloatTensorPrimitive>().expect("checked by is_cuda");
        Box::new(TensorPrimitive::<B>::Float(t))
    } else {
        inner
    };
    Tensor::from_primitive(*prim.downcast::<K::Primitive>().expect("checked by is_cuda"))
}

/// What a rank tells each peer about the part it sends (over MPI, before the NCCL group).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Header {
    shape: Vec<usize>,
    dtype: DType,
}

impl Header {
    fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// [`Comm::exchange_tensors`] of CUDA tensors by NCCL: headers (shape, dtype) over MPI,
/// then one group of `ncclSend`/`ncclRecv` between device buffers. The part to this rank
/// stays where it is.
pub(crate) fn exchange_tensors<B: Backend, const D: usize, K>(
    comm: &Comm,
    nccl: &Nccl,
    op: &'static str,
    parts: Vec<Option<Tensor<B, D, K>>>,
    device: &B::Device,
) -> Result<Vec<Option<Tensor<B, D, K>>>, CommError>
where
    K: TensorKind<B> + BasicOps<B> + 'static,
    K::Primitive: 'static,
{
    let me = comm.rank();
    let cuda = (device as &dyn Any).downcast_ref::<CudaDevice>().expect("checked by is_cuda").clone();
    if cuda != nccl.device() {
        let detail = format!("tensors for {cuda:?}, the NCCL communicator is on {:?}", nccl.device());
        return Err(comm.shape_error(op, detail));
    }
    let mut sent = Vec::with_capacity(parts.len());
    for part in parts {
        sent.push(match part {
            None => None,
            Some(x) => Some(into_cube(x).map_err(|e| comm.shape_error(op, e))?),
        });
    }
    let headers = sent.iter().map(|t| t.as_ref().map(|t| Header { shape: t.meta.shape().to_vec(), dtype: t.dtype })).collect();
    // Over MPI: a stalled, dead or mismatched rank is named here, before any GPU traffic.
    let incoming: Vec<Option<Header>> = comm.exchange(op, headers)?;
    if let Some((src, h)) = incoming.iter().enumerate().find_map(|(src, h)| h.as_ref().filter(|h| h.shape.len() != D).map(|h| (src, h))) {
        let detail = format!("rank {src} sent a tensor of shape {:?}, expected {D} dimensions", h.shape);
        return Err(comm.shape_error(op, detail));
    }
    let client = CudaRuntime::client(&cuda);
    let received: Vec<Option<CubeTensor<CudaRuntime>>> = incoming
        .iter()
        .enumerate()
        .map(|(src, h)| {
            h.as_ref().filter(|_| src != me).map(|h| {
                // One byte at least: CubeCL does not allocate empty buffers.
                let handle = client.empty(h.bytes().max(1));
                CubeTensor::new_contiguous(client.clone(), cuda.clone(), Shape::from(h.shape.clone()), handle, h.dtype)
            })
        })
        .collect();
    // The sent buffers must hold their values before NCCL's stream reads them.
    cubecl::future::block_on(client.sync()).map_err(|e| comm.shape_error(op, format!("CubeCL stream failed before the exchange: {e:?}")))?;
    let resource = |t: &CubeTensor<CudaRuntime>| client.get_resource(t.handle.clone()).map_err(|e| comm.shape_error(op, format!("no device buffer for a part: {e:?}")));
    // The managed resources keep the buffers allocated until the group completed.
    let mut keep = Vec::new();
    let mut sends = Vec::new();
    for (peer, t) in sent.iter().enumerate().filter(|(peer, _)| *peer != me) {
        if let Some(t) = t {
            let r = resource(t)?;
            sends.push(Transfer { peer, ptr: r.resource().ptr, bytes: t.meta.shape().num_elements() * t.dtype.size() });
            keep.push(r);
        }
    }
    let mut recvs = Vec::new();
    for (peer, t) in received.iter().enumerate() {
        if let Some(t) = t {
            let r = resource(t)?;
            recvs.push(Transfer { peer, ptr: r.resource().ptr, bytes: incoming[peer].as_ref().map_or(0, Header::bytes) });
            keep.push(r);
        }
    }
    nccl.group(op, &sends, &recvs, |r| comm.global_rank(r))?;
    drop(keep);
    let mut mine = sent.into_iter().nth(me).flatten();
    Ok(received.into_iter().enumerate().map(|(src, t)| if src == me { mine.take() } else { t }.map(from_cube)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Cuda, NdArray};

    #[test]
    fn nccl_moves_the_tensors_of_burns_cuda_backends_only() {
        assert!(is_cuda::<Cuda, Float>());
        assert!(is_cuda::<Cuda, Int>());
        assert!(is_cuda::<Cuda, Bool>());
        assert!(is_cuda::<Cube, Float>());
        assert!(is_cuda::<CubeBackend<CudaRuntime, f64, i64, u32>, Int>());
        // Autodiff's collectives run on its inner backend; other backends go over MPI.
        assert!(!is_cuda::<Autodiff<Cuda>, Float>());
        assert!(!is_cuda::<NdArray, Float>());
        // Not a tensor kind.
        assert!(!is_cuda::<Cuda, u8>());
    }
}
