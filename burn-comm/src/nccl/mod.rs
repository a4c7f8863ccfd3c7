//! The NCCL device engine (feature `nccl`): tensors of Burn's CUDA backends move between
//! GPUs by NCCL, without a host copy; everything else goes through the MPI engine the
//! communicator is built on.
//!
//! A communicator made by [`crate::Comm::with_nccl`] is an MPI communicator with an
//! NCCL communicator beside it, over the same ranks:
//!
//! - host values (`exchange`, `all_gather_host`, `barrier`, `send`/`recv`) and the
//!   headers of every tensor collective travel over MPI, so a rank that stalled, died or
//!   called another collective is named before any GPU traffic starts;
//! - [`crate::Comm::exchange_tensors`] of `Cuda` / `CubeBackend<CudaRuntime>` tensors (the
//!   all-to-all of expert parallelism) is an all-to-all-v written as one NCCL group of
//!   `ncclSend`/`ncclRecv` per peer, reading and writing CubeCL's device buffers;
//! - tensors of other backends (and `Autodiff` wrappers, whose collectives run on the
//!   inner backend anyway) and point-to-point tensors travel over MPI as host bytes.
//!   Point-to-point NCCL needs a matched schedule of sends and receives posted as one
//!   group on both sides, which the pipeline executor's independent sends do not give.
//!
//! NCCL refuses two ranks on one GPU: it needs one GPU per rank (two or more for a real
//! job). CubeCL does not expose its CUDA streams, so the engine synchronises CubeCL's
//! stream before a collective and waits for its own stream after it.
//!
//! The NCCL library is loaded at the first call (cudarc's dynamic loading), so building
//! needs neither nccl.h nor libnccl.

mod cuda;

pub(crate) use cuda::{exchange_tensors, is_cuda};

use crate::{Comm, CommError};
use cubecl::cuda::CudaDevice;
use cudarc::driver::{sys as cu, CudaContext, CudaStream};
use cudarc::nccl::{result, sys};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One rank's NCCL communicator over the ranks of a [`Comm`], on one GPU.
pub(crate) struct Nccl {
    comm: Handle,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    rank: usize,
    size: usize,
    timeout: Duration,
    /// NCCL calls of one communicator must not interleave between threads.
    lock: Mutex<()>,
}

/// The raw communicator, freed (`ncclCommDestroy`) when dropped unless it was aborted.
struct Handle(sys::ncclComm_t, AtomicBool);

impl Handle {
    /// `ncclCommAbort`: ends the communicator's pending operations (after an error or a
    /// timeout); it is unusable afterwards.
    fn abort(&self) {
        if !self.1.swap(true, Ordering::AcqRel) {
            // SAFETY: a live communicator, aborted once.
            unsafe {
                let _ = result::comm_abort(self.0);
            }
        }
    }
}

// SAFETY: an NCCL communicator may be used from any thread; calls on it are serialised by
// `Nccl::lock`.
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        if !self.1.load(Ordering::Acquire) {
            // SAFETY: created by `ncclCommInitRank`, not aborted, destroyed once here.
            unsafe {
                let _ = result::comm_destroy(self.0);
            }
        }
    }
}

/// One transfer of a group: `bytes` at device address `ptr` to or from rank `peer`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Transfer {
    pub(crate) peer: usize,
    pub(crate) ptr: u64,
    pub(crate) bytes: usize,
}

/// This rank's GPU context and NCCL stream, and on rank 0 the NCCL id; a missing CUDA
/// driver or NCCL library is an error, not a panic.
#[allow(clippy::type_complexity)]
fn open(device: &CudaDevice, make_id: bool) -> Result<(Arc<CudaContext>, Arc<CudaStream>, Option<Vec<i8>>), String> {
    // SAFETY: only looks for the driver library.
    if !unsafe { cu::is_culib_present() } {
        return Err("no CUDA driver (libcuda) on this machine".into());
    }
    // cudarc panics where a library cannot be loaded: that becomes this rank's error.
    std::panic::catch_unwind(|| {
        let ctx = CudaContext::new(device.index).map_err(|e| format!("CUDA device {} did not open: {e:?}", device.index))?;
        let stream = ctx.new_stream().map_err(|e| format!("no CUDA stream on device {}: {e:?}", device.index))?;
        let id = if make_id {
            let id = result::get_uniqueid().map_err(|e| format!("ncclGetUniqueId failed: {e:?}"))?;
            // `c_char` is `i8` here and `u8` on other targets: the cast is no-op only here.
            #[allow(clippy::unnecessary_cast)]
            Some(id.internal.iter().map(|&c| c as i8).collect())
        } else {
            None
        };
        Ok((ctx, stream, id))
    })
    .unwrap_or_else(|panic| Err(format!("NCCL or CUDA unavailable: {}", crate::panic_message(&*panic))))
}

impl Nccl {
    /// Builds the NCCL communicator of `host`'s ranks on `device`: rank 0 makes the NCCL
    /// id, `host` (MPI) carries it to the others, every rank joins
    /// (`ncclCommInitRank`). Collective over `host`.
    pub(crate) fn init(host: &Comm, device: &CudaDevice) -> Result<Nccl, CommError> {
        let op = "nccl init";
        // Each rank opens its GPU (and rank 0 makes the id); the outcomes are gathered
        // over MPI so that every rank fails together, naming the rank at fault, instead
        // of the others waiting in `ncclCommInitRank` for it.
        let local = open(device, host.rank() == 0);
        let (setup, report) = match local {
            Ok((ctx, stream, id)) => (Some((ctx, stream)), Ok(id)),
            Err(e) => (None, Err(e)),
        };
        let reports: Vec<Result<Option<Vec<i8>>, String>> = host.all_gather_host(op, report)?;
        if let Some((r, e)) = reports.iter().enumerate().find_map(|(r, rep)| rep.as_ref().err().map(|e| (r, e))) {
            return Err(CommError::Engine { rank: host.global_rank(host.rank()), op, detail: format!("rank {}: {e}", host.global_rank(r)) });
        }
        let (ctx, stream) = setup.expect("no rank failed");
        let bytes = reports[0].clone().ok().flatten().expect("rank 0 sends the id");
        let mut internal = [0 as core::ffi::c_char; 128];
        for (dst, src) in internal.iter_mut().zip(&bytes) {
            *dst = *src as core::ffi::c_char;
        }
        let engine = |detail: String| CommError::Engine { rank: host.global_rank(host.rank()), op, detail };
        ctx.bind_to_thread().map_err(|e| engine(format!("CUDA context of device {}: {e:?}", device.index)))?;
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by NCCL on success; the id is rank 0's.
        let comm = unsafe {
            result::comm_init_rank(comm.as_mut_ptr(), host.world_size() as i32, sys::ncclUniqueId { internal }, host.rank() as i32).map_err(|e| {
                engine(format!("ncclCommInitRank (rank {} of {}, GPU {}) failed: {e:?}; NCCL needs one GPU per rank", host.rank(), host.world_size(), device.index))
            })?;
            comm.assume_init()
        };
        Ok(Nccl { comm: Handle(comm, AtomicBool::new(false)), stream, ctx, rank: host.rank(), size: host.world_size(), timeout: host.timeout(), lock: Mutex::new(()) })
    }

    /// The GPU this communicator runs on.
    pub(crate) fn device(&self) -> CudaDevice {
        CudaDevice::new(self.ctx.ordinal())
    }

    /// Runs `sends` and `recvs` as one NCCL group (`ncclGroupStart` .. `ncclGroupEnd`,
    /// bytes as `ncclUint8`) on the engine's stream, and waits for the stream at most the
    /// timeout (then the communicator is aborted and the peers are named).
    ///
    /// The caller keeps the buffers alive until this returns and has synchronised the
    /// stream that wrote the sent buffers.
    pub(crate) fn group(&self, op: &'static str, sends: &[Transfer], recvs: &[Transfer], global: impl Fn(usize) -> usize) -> Result<(), CommError> {
        let me = global(self.rank);
        let failed = |what: &str, e: String| CommError::Engine { rank: me, op, detail: format!("{what}: {e}") };
        for t in sends.iter().chain(recvs) {
            assert!(t.peer < self.size && t.peer != self.rank, "NCCL transfers go to other ranks");
        }
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.comm.1.load(Ordering::Acquire) {
            return Err(failed("NCCL", "the communicator was aborted by an earlier failure".into()));
        }
        self.ctx.bind_to_thread().map_err(|e| failed("CUDA context", format!("{e:?}")))?;
        let stream = self.stream.cu_stream() as sys::cudaStream_t;
        result::group_start().map_err(|e| failed("ncclGroupStart", format!("{e:?}")))?;
        // One post per transfer with bytes: sends, then receives; the first failure stops.
        let posted = sends.iter().map(|t| (t, true)).chain(recvs.iter().map(|t| (t, false))).filter(|(t, _)| t.bytes > 0).try_for_each(|(t, send)| {
            // SAFETY: `ptr` addresses `bytes` live device bytes of this GPU, writable
            // for a receive (the caller's contract).
            let r = unsafe {
                if send {
                    result::send(t.ptr as *const core::ffi::c_void, t.bytes, sys::ncclDataType_t::ncclUint8, t.peer as i32, self.comm.0, stream)
                } else {
                    result::recv(t.ptr as *mut core::ffi::c_void, t.bytes, sys::ncclDataType_t::ncclUint8, t.peer as i32, self.comm.0, stream)
                }
            };
            r.map(|_| ()).map_err(|e| {
                let what = if send { "ncclSend to" } else { "ncclRecv from" };
                failed(&format!("{what} rank {}", global(t.peer)), format!("{e:?}"))
            })
        });
        // The group is closed also after a failed post, so NCCL's group depth stays right.
        let ended = result::group_end().map_err(|e| failed("ncclGroupEnd", format!("{e:?}")));
        posted?;
        ended?;
        self.wait(op, sends.iter().chain(recvs).map(|t| global(t.peer)).collect(), me)
    }

    /// Polls the engine's stream until it is idle, an NCCL error is reported, or the
    /// timeout passed.
    fn wait(&self, op: &'static str, mut peers: Vec<usize>, me: usize) -> Result<(), CommError> {
        let start = Instant::now();
        loop {
            // SAFETY: the stream is alive (held by `self`).
            match unsafe { cu::cuStreamQuery(self.stream.cu_stream()) } {
                cu::CUresult::CUDA_SUCCESS => return Ok(()),
                cu::CUresult::CUDA_ERROR_NOT_READY => {}
                other => return Err(CommError::Engine { rank: me, op, detail: format!("the NCCL stream failed: {other:?}") }),
            }
            let mut async_error = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator and a valid out pointer.
            unsafe { sys::ncclCommGetAsyncError(self.comm.0, &mut async_error) };
            if async_error != sys::ncclResult_t::ncclSuccess {
                self.comm.abort();
                return Err(CommError::Engine { rank: me, op, detail: format!("NCCL reported {async_error:?}") });
            }
            if start.elapsed() > self.timeout {
                self.comm.abort();
                peers.sort_unstable();
                peers.dedup();
                return Err(CommError::Timeout { rank: me, op, missing: peers, after: self.timeout });
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}
