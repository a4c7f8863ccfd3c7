//! The MPI engine: one rank per process, through rsmpi (feature `mpi`).
//!
//! Host buffers only, so it works with every Burn backend (a tensor travels as its host
//! bytes). The exchange of a collective has two phases:
//!
//! 1. a header from every rank to every other — the collective's name, its sequence
//!    number and the bytes that follow — by non-blocking point-to-point messages that are
//!    polled against the group's timeout: a rank that stalls or died is named
//!    ([`CommError::Timeout`]), two ranks in different collectives are caught
//!    ([`CommError::Mismatch`]), and every rank learns what it receives;
//! 2. the payload by `MPI_Ialltoallv`, polled against the timeout.
//!
//! Point-to-point messages (the pipeline's activations and gradients) go on a duplicate
//! communicator, so their tags never meet a collective's header.
//!
//! Every MPI call takes one process-wide lock, so the engine is correct whichever thread
//! level the MPI library provides; polls release the lock between tries.
//!
//! Start a job with [`launch`] (or [`World::init`] and [`World::comm`]):
//!
//! ```sh
//! mpirun -np 4 target/release/examples/train_tiny --pp 2 --ep 2
//! ```
//! (as root, OpenMPI also wants `OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1`;
//! with more ranks than cores, `--oversubscribe`).

use crate::{Comm, CommError};
use mpi::request::{Request, StaticScope};
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;
use mpi::Threading;
use std::mem::ManuallyDrop;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Serialises every MPI call of the process.
static MPI: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    MPI.lock().unwrap_or_else(|e| e.into_inner())
}

/// The tag of collective headers (one per collective and pair of ranks, received in
/// order: MPI does not overtake messages of one source and tag).
const HEADER_TAG: i32 = 1;

/// The MPI environment of this process: initialised by [`World::init`], finalised when
/// dropped.
pub struct World {
    universe: Option<mpi::environment::Universe>,
    threading: Threading,
}

impl World {
    /// Initialises MPI (asking for `MPI_THREAD_MULTIPLE`; every call is serialised by
    /// the engine anyway).
    ///
    /// # Errors
    /// MPI was initialised already in this process.
    pub fn init() -> Result<Self, CommError> {
        let _g = lock();
        match mpi::initialize_with_threading(Threading::Multiple) {
            Some((universe, threading)) => Ok(World { universe: Some(universe), threading }),
            None => Err(CommError::Engine { rank: 0, op: "mpi init", detail: "MPI is already initialised in this process".into() }),
        }
    }

    /// The thread level the MPI library provides.
    pub fn threading(&self) -> Threading {
        self.threading
    }

    /// A communicator over every process of the job (`MPI_COMM_WORLD`), with the time a
    /// rank waits for the others in an operation before [`CommError::Timeout`].
    pub fn comm(&self, timeout: Duration) -> Comm {
        let _g = lock();
        let world = self.universe.as_ref().expect("initialised").world();
        let engine = Engine::new(&world, timeout, self.threading == Threading::Multiple);
        drop(_g);
        let ranks = (0..engine.size).collect();
        Comm::from_mpi(engine, ranks)
    }

    /// This process's rank among the processes of its node (to pick its GPU).
    pub fn local_rank(&self) -> usize {
        let _g = lock();
        let world = self.universe.as_ref().expect("initialised").world();
        let node = world.split_shared(world.rank());
        node.rank() as usize
    }

    /// Ends the job at once with `code`: every process of it (`MPI_Abort`). For a rank
    /// that failed, so that the others do not wait for it.
    pub fn abort(&self, code: i32) -> ! {
        let world = self.universe.as_ref().expect("initialised").world();
        world.abort(code)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _g = lock();
        self.universe.take();
    }
}

/// This process's rank among the processes of its node, as the launcher tells it
/// (OpenMPI's `OMPI_COMM_WORLD_LOCAL_RANK`, MPICH's `MPI_LOCALRANKID`, Slurm's
/// `SLURM_LOCALID`), to pick this rank's GPU before MPI starts; `None` outside a launcher.
pub fn local_rank() -> Option<usize> {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"].iter().find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// Runs `f` on this process's rank of the job, with a communicator over all of them:
/// initialises MPI, runs `f`, finalises MPI and returns what `f` returned.
///
/// A rank whose `f` returns an error or panics prints `rank R failed: ...` to stderr
/// and aborts the job (`MPI_Abort`, exit code 1), so no other rank waits for it; `mpirun`
/// then exits non-zero. The error of a rank that is a consequence of another's failure is
/// printed as such.
///
/// # Errors
/// MPI was already initialised in this process.
pub fn launch<T, E, F>(timeout: Duration, f: F) -> Result<T, CommError>
where
    E: core::fmt::Display,
    F: FnOnce(Comm) -> Result<T, E>,
{
    let world = World::init()?;
    let comm = world.comm(timeout);
    let rank = comm.rank();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(comm)));
    match result {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => {
            eprintln!("rank {rank} failed: {e}");
            world.abort(1)
        }
        Err(panic) => {
            eprintln!("rank {rank} failed: panicked: {}", crate::launch::panic_message(&*panic));
            world.abort(1)
        }
    }
}

/// A communicator handle the engine may move between threads: every call on it holds
/// the process-wide lock.
struct Handle(ManuallyDrop<SimpleCommunicator>);

// SAFETY: MPI communicator handles are plain identifiers; every MPI call on them holds
// the process-wide `MPI` lock, so no two threads call MPI at once.
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // A communicator outliving MPI (a handle dropped after the `World`) is not freed.
        let _g = lock();
        if !mpi::environment::is_finalized() {
            // SAFETY: dropped once, here.
            unsafe { ManuallyDrop::drop(&mut self.0) };
        }
    }
}

/// A started non-blocking operation and the buffers it reads or writes, leaked for the
/// `'static` scope and reclaimed when it completes. If it never does (the job ends with
/// a timeout), the buffers stay leaked: the process is about to stop.
struct Pending<T: 'static + ?Sized> {
    request: Option<Request<'static, T, StaticScope>>,
    /// Frees the leaked buffers.
    reclaim: Option<Box<dyn FnOnce() + Send>>,
}

// SAFETY: the request is only tested while holding the process-wide lock.
unsafe impl<T: ?Sized> Send for Pending<T> {}

impl<T: ?Sized> Pending<T> {
    /// Whether the operation completed (then its buffers are freed).
    fn test(&mut self) -> bool {
        let Some(request) = self.request.take() else {
            return true;
        };
        let _g = lock();
        match request.test() {
            Ok(_) => {
                drop(_g);
                if let Some(reclaim) = self.reclaim.take() {
                    reclaim();
                }
                true
            }
            Err(request) => {
                self.request = Some(request);
                false
            }
        }
    }
}

impl<T: ?Sized> Drop for Pending<T> {
    fn drop(&mut self) {
        // An operation abandoned after a timeout: MPI may still touch its buffers, so
        // both stay leaked (rsmpi panics on dropping an incomplete request).
        if let Some(request) = self.request.take() {
            std::mem::forget(request);
        }
    }
}

/// A leaked byte buffer and how to free it.
fn leak(bytes: Vec<u8>) -> (&'static [u8], Box<dyn FnOnce() + Send>) {
    let raw: *mut [u8] = Box::into_raw(bytes.into_boxed_slice());
    let addr = raw as *mut u8 as usize;
    let len = raw.len();
    // SAFETY: the buffer lives until `reclaim` runs, which the caller does only after the
    // operation reading it completed.
    let slice: &'static [u8] = unsafe { &*raw };
    let reclaim = Box::new(move || unsafe { drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(addr as *mut u8, len))) });
    (slice, reclaim)
}

/// Sleeps a little between polls once the first tries failed (ranks may share cores).
struct Backoff {
    tries: u32,
    /// Never sleep: for transfers already under way, which MPI moves on only inside
    /// its calls (a sleep between tests would stall them).
    spin: bool,
}

impl Backoff {
    /// Waiting for another rank to arrive: yields, then sleeps a little.
    fn arrival() -> Self {
        Backoff { tries: 0, spin: false }
    }

    /// Waiting for a transfer every rank has started: yields only.
    fn transfer() -> Self {
        Backoff { tries: 0, spin: true }
    }

    fn wait(&mut self) {
        self.tries += 1;
        if self.spin || self.tries < 64 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(if self.tries < 1024 { 20 } else { 200 }));
        }
    }
}

/// What every rank sent here in one exchange: the parts in rank order, back to back.
pub(crate) struct Received {
    bytes: Vec<u8>,
    lengths: Vec<usize>,
}

impl Received {
    /// The parts, by source rank.
    pub(crate) fn parts(&self) -> impl Iterator<Item = &[u8]> {
        let mut at = 0;
        self.lengths.iter().map(move |&len| {
            at += len;
            &self.bytes[at - len..at]
        })
    }
}

/// One process's handle on an MPI group.
pub(crate) struct Engine {
    collectives: Handle,
    messages: Handle,
    pub(crate) rank: usize,
    pub(crate) size: usize,
    timeout: Duration,
    /// Whether the library takes MPI calls from several threads at once
    /// (`MPI_THREAD_MULTIPLE`).
    multiple: bool,
    /// Point-to-point sends not yet known to be complete.
    sends: Mutex<Vec<Pending<[u8]>>>,
}

impl Engine {
    fn new(comm: &SimpleCommunicator, timeout: Duration, multiple: bool) -> Self {
        let collectives = comm.duplicate();
        let messages = comm.duplicate();
        Engine {
            rank: comm.rank() as usize,
            size: comm.size() as usize,
            collectives: Handle(ManuallyDrop::new(collectives)),
            messages: Handle(ManuallyDrop::new(messages)),
            timeout,
            multiple,
            sends: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The engine of the sub-group of the ranks that pass the same `color`, ordered by
    /// `key` (collective: every rank of this group calls it).
    pub(crate) fn split(&self, color: usize, key: usize) -> Engine {
        let _g = lock();
        let sub = self.collectives.0.split_by_color_with_key(Color::with_value(color as i32), key as i32).expect("a defined color gives a communicator");
        let engine = Engine::new(&sub, self.timeout, self.multiple);
        drop(sub);
        engine
    }

    fn timed_out(&self, op: &'static str, missing: Vec<usize>) -> CommError {
        CommError::Timeout { rank: self.rank, op, missing, after: self.timeout }
    }

    fn engine_error(&self, op: &'static str, detail: String) -> CommError {
        CommError::Engine { rank: self.rank, op, detail }
    }

    /// `parts[r]` to rank `r`; returns what every rank sent here, by source.
    pub(crate) fn exchange(&self, seq: u64, op: &'static str, parts: Vec<Vec<u8>>) -> Result<Received, CommError> {
        let (me, n) = (self.rank, self.size);
        let deadline = Instant::now() + self.timeout;
        let too_big = |len: usize| len > i32::MAX as usize;
        if let Some(len) = parts.iter().map(Vec::len).find(|&l| too_big(l)) {
            return Err(self.engine_error(op, format!("a part of {len} bytes is over MPI's count limit of {} bytes", i32::MAX)));
        }
        // Phase 1: headers.
        let mut sends = Vec::with_capacity(n);
        for (dst, part) in parts.iter().enumerate() {
            if dst == me {
                continue;
            }
            let header = rmp_serde::to_vec(&(op, seq, part.len() as u64)).expect("headers encode");
            let (buf, reclaim) = leak(header);
            let _g = lock();
            let request = self.collectives.0.process_at_rank(dst as i32).immediate_send_with_tag(StaticScope, buf, HEADER_TAG);
            sends.push(Pending { request: Some(request), reclaim: Some(reclaim) });
        }
        let mut recv_len = vec![None::<usize>; n];
        recv_len[me] = Some(parts[me].len());
        let mut backoff = Backoff::arrival();
        loop {
            let mut missing = Vec::new();
            // `src` is a rank (the probe's source) as well as an index.
            #[allow(clippy::needless_range_loop)]
            for src in 0..n {
                if recv_len[src].is_some() {
                    continue;
                }
                let probed = {
                    let _g = lock();
                    self.collectives.0.process_at_rank(src as i32).immediate_matched_probe_with_tag(HEADER_TAG).map(|(message, status)| {
                        let mut buf = vec![0u8; status.count(u8::equivalent_datatype()) as usize];
                        message.matched_receive_into(&mut buf[..]);
                        buf
                    })
                };
                match probed {
                    Some(buf) => {
                        let (other_op, other_seq, len): (String, u64, u64) =
                            rmp_serde::from_slice(&buf).map_err(|e| self.engine_error(op, format!("undecodable header from rank {src}: {e}")))?;
                        if other_op != op || other_seq != seq {
                            return Err(CommError::Mismatch { rank: me, op, other: src, other_op: format!("{other_op} (its collective #{other_seq}, this rank's #{seq})") });
                        }
                        recv_len[src] = Some(len as usize);
                    }
                    None => missing.push(src),
                }
            }
            sends.retain_mut(|s| !s.test());
            if missing.is_empty() && sends.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                if missing.is_empty() {
                    missing = (0..n).filter(|&r| r != me).collect();
                }
                return Err(self.timed_out(op, missing));
            }
            backoff.wait();
        }
        // Phase 2: the payload.
        let recv_counts: Vec<i32> = recv_len.iter().map(|l| l.expect("all headers arrived") as i32).collect();
        let send_counts: Vec<i32> = parts.iter().map(|p| p.len() as i32).collect();
        let displs = |counts: &[i32]| -> Option<Vec<i32>> {
            let mut at = 0i64;
            let mut out = Vec::with_capacity(counts.len());
            for &c in counts {
                out.push(i32::try_from(at).ok()?);
                at += c as i64;
            }
            i32::try_from(at).ok().map(|_| out)
        };
        let (Some(send_displs), Some(recv_displs)) = (displs(&send_counts), displs(&recv_counts)) else {
            return Err(self.engine_error(
                op,
                format!("{} bytes to send, {} to receive: over MPI's count limit", parts.iter().map(Vec::len).sum::<usize>(), recv_counts.iter().map(|&c| c as i64).sum::<i64>()),
            ));
        };
        let total: usize = recv_counts.iter().map(|&c| c as usize).sum();
        let lengths = recv_counts.iter().map(|&c| c as usize).collect();
        if self.multiple {
            // Every rank is in this collective (its header came): the blocking
            // all-to-all, outside the lock (the library takes calls from any thread),
            // which MPI moves faster than the non-blocking one it has to be polled for.
            // Buffers of at least one byte: an empty slice's dangling address is 0x1,
            // which OpenMPI reads as MPI_IN_PLACE.
            let mut send = parts.concat();
            if send.is_empty() {
                send.push(0);
            }
            let mut recv = vec![0u8; total.max(1)];
            let send_part = mpi::datatype::Partition::new(&send[..], send_counts, send_displs);
            let mut recv_part = mpi::datatype::PartitionMut::new(&mut recv[..], recv_counts, recv_displs);
            self.collectives.0.all_to_all_varcount_into(&send_part, &mut recv_part);
            drop(recv_part);
            recv.truncate(total);
            return Ok(Received { bytes: recv, lengths });
        }
        // Buffers of at least one byte: an empty slice's dangling address is 0x1, which
        // OpenMPI reads as MPI_IN_PLACE.
        let mut concat = parts.concat();
        if concat.is_empty() {
            concat.push(0);
        }
        let (send, free_send) = leak(concat);
        let recv: &'static mut [u8] = Box::leak(vec![0u8; total.max(1)].into_boxed_slice());
        let recv_ptr = recv.as_mut_ptr() as usize;
        let send_part = Box::leak(Box::new(mpi::datatype::Partition::new(send, send_counts, send_displs)));
        let recv_part = Box::leak(Box::new(mpi::datatype::PartitionMut::new(recv, recv_counts.clone(), recv_displs)));
        let (send_part_addr, recv_part_addr) = (send_part as *mut _ as usize, recv_part as *mut _ as usize);
        let request = {
            let _g = lock();
            self.collectives.0.immediate_all_to_all_varcount_into(StaticScope, &*send_part, recv_part)
        };
        let mut pending = Pending {
            request: Some(request),
            reclaim: Some(Box::new(move || unsafe {
                type SendPart = mpi::datatype::Partition<'static, [u8], Vec<i32>, Vec<i32>>;
                type RecvPart = mpi::datatype::PartitionMut<'static, [u8], Vec<i32>, Vec<i32>>;
                drop(Box::from_raw(send_part_addr as *mut SendPart));
                drop(Box::from_raw(recv_part_addr as *mut RecvPart));
                free_send();
            })),
        };
        let mut backoff = Backoff::transfer();
        while !pending.test() {
            if Instant::now() >= deadline {
                return Err(self.timed_out(op, (0..n).filter(|&r| r != me).collect()));
            }
            backoff.wait();
        }
        // SAFETY: the all-to-all completed; its receive buffer is ours again.
        let recv: Box<[u8]> = unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(recv_ptr as *mut u8, total.max(1))) };
        let mut bytes = recv.into_vec();
        bytes.truncate(total);
        Ok(Received { bytes, lengths })
    }

    /// Sends `payload` to `dst` under `tag` without waiting for it to arrive.
    pub(crate) fn send(&self, tag: u64, dst: usize, op: &'static str, payload: Vec<u8>) -> Result<(), CommError> {
        let tag = self.tag(tag, op)?;
        let mut framed = rmp_serde::to_vec(&op).expect("names encode");
        framed.extend_from_slice(&payload);
        let (buf, reclaim) = leak(framed);
        let request = {
            let _g = lock();
            self.messages.0.process_at_rank(dst as i32).immediate_send_with_tag(StaticScope, buf, tag)
        };
        let mut sends = self.sends.lock().unwrap_or_else(|e| e.into_inner());
        sends.retain_mut(|s| !s.test());
        sends.push(Pending { request: Some(request), reclaim: Some(reclaim) });
        Ok(())
    }

    /// Receives what `src` sent here under `tag`, waiting at most `wait` (`None` then).
    pub(crate) fn recv(&self, tag: u64, src: usize, op: &'static str, wait: Duration) -> Result<Option<Vec<u8>>, CommError> {
        let mpi_tag = self.tag(tag, op)?;
        let deadline = Instant::now() + wait;
        let mut backoff = Backoff::arrival();
        loop {
            let probed = {
                let _g = lock();
                self.messages.0.process_at_rank(src as i32).immediate_matched_probe_with_tag(mpi_tag).map(|(message, status)| {
                    let mut buf = vec![0u8; status.count(u8::equivalent_datatype()) as usize];
                    message.matched_receive_into(&mut buf[..]);
                    buf
                })
            };
            if let Some(buf) = probed {
                let mut reader = &buf[..];
                let other_op: String = rmp_serde::from_read(&mut reader).map_err(|e| self.engine_error(op, format!("undecodable message from rank {src}: {e}")))?;
                if other_op != op {
                    return Err(CommError::Mismatch { rank: self.rank, op, other: src, other_op });
                }
                return Ok(Some(reader.to_vec()));
            }
            self.sends.lock().unwrap_or_else(|e| e.into_inner()).retain_mut(|s| !s.test());
            if Instant::now() >= deadline {
                return Ok(None);
            }
            backoff.wait();
        }
    }

    fn tag(&self, tag: u64, op: &'static str) -> Result<i32, CommError> {
        i32::try_from(tag).map_err(|_| self.engine_error(op, format!("tag {tag} is over MPI's tag limit")))
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Sends still in flight complete before the communicator goes (bounded by the
        // timeout: a peer that never receives leaves them leaked).
        let deadline = Instant::now() + self.timeout;
        let sends = self.sends.get_mut().unwrap_or_else(|e| e.into_inner());
        while !sends.is_empty() && Instant::now() < deadline && !mpi::environment::is_finalized() {
            sends.retain_mut(|s| !s.test());
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}
