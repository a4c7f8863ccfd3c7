//! Collectives between ranks, for expert parallelism: one [`Comm`] handle per rank, ranks
//! as threads of one process, each rank on its own Burn device.
//!
//! The ranks of a group meet in a shared mailbox: a collective deposits one part per
//! destination and takes one part per source, the parts matched by the collective's
//! sequence number on each rank (every rank calls the same collectives in the same order,
//! forward and backward). Tensor parts are moved onto the receiving rank's device by the
//! group's [`Transport`]:
//!
//! - [`Transport::Host`] (default): through host memory (`into_data` → `from_data`), on
//!   every backend, two wgpu devices included (Burn 0.21's `to_device` panics between
//!   those);
//! - [`Transport::Device`]: Burn's `to_device`, which on CUDA is CubeCL's server-to-server
//!   copy, NCCL send/recv.
//!
//! The differentiable collectives are in [`ops`]: [`all_to_all`] with uneven splits (its
//! backward is the reverse all-to-all, and its rows may travel in FP8), [`all_gather`] and
//! [`all_reduce`], both built on it with Burn ops, so their backwards follow.
//!
//! A rank that panics or drops its handle mid-collective, or stalls past the group's
//! timeout, makes the others' collectives return a [`CommError`] naming it; [`launch`]
//! runs one closure per rank on its own thread and returns the error of the rank that
//! caused the failure.
//!
//! # Example
//! ```
//! use burn::backend::NdArray;
//! use burn::tensor::Tensor;
//! use burn_moe::comm::{all_reduce, launch, Comm, CommError, Transport};
//!
//! let sums = launch(Comm::group(3, Transport::Host), |comm| {
//!     let x = Tensor::<NdArray, 1>::from_floats([comm.rank() as f32 + 1.0], &Default::default());
//!     Ok::<_, CommError>(all_reduce(x, &comm)?.into_scalar())
//! })
//! .unwrap();
//! assert_eq!(sums, [6.0, 6.0, 6.0]);
//! ```

pub mod ops;
pub use ops::{all_gather, all_reduce, all_to_all, Splits};

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How tensor parts reach the receiving rank's device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// Through host memory: any two devices of any backend.
    #[default]
    Host,
    /// Burn's `to_device` (on CUDA: NCCL send/recv through CubeCL).
    Device,
}

/// Why a collective failed.
#[derive(Clone, Debug, PartialEq)]
pub enum CommError {
    /// A rank left the group (panicked, or dropped its handle) before sending what a
    /// collective needed from it.
    RankFailed {
        /// The rank that failed.
        rank: usize,
        /// The collective that was waiting for it.
        op: &'static str,
        /// What is known about the failure.
        reason: String,
    },
    /// Ranks did not send within the group's timeout.
    Timeout {
        /// The rank that waited.
        rank: usize,
        /// Its collective.
        op: &'static str,
        /// The ranks it was still waiting for.
        missing: Vec<usize>,
        /// The timeout.
        after: Duration,
    },
    /// Two ranks called different collectives at the same point of their sequences.
    Mismatch {
        /// The receiving rank and its collective.
        rank: usize,
        /// Its collective.
        op: &'static str,
        /// The sending rank.
        other: usize,
        /// The sender's collective.
        other_op: &'static str,
    },
    /// Arguments that do not fit the group (part counts, split sizes).
    Shape {
        /// The rank that detected it.
        rank: usize,
        /// The collective.
        op: &'static str,
        /// What is wrong, with the values.
        detail: String,
    },
}

impl core::fmt::Display for CommError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CommError::RankFailed { rank, op, reason } => write!(f, "rank {rank} failed during {op}: {reason}"),
            CommError::Timeout { rank, op, missing, after } => {
                write!(f, "rank {rank} waited {after:?} in {op} for ranks {missing:?}, which did not send (stalled)")
            }
            CommError::Mismatch { rank, op, other, other_op } => {
                write!(f, "rank {rank} called {op} while rank {other} called {other_op} at the same point")
            }
            CommError::Shape { rank, op, detail } => write!(f, "rank {rank}, {op}: {detail}"),
        }
    }
}

impl std::error::Error for CommError {}

/// A deposited part: the collective's name and the payload.
struct Part {
    op: &'static str,
    payload: Box<dyn Any + Send>,
}

/// The mailbox shared by the ranks of a group.
struct Group {
    world: usize,
    transport: Transport,
    timeout: Duration,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    /// `(sequence, source, destination)` → part.
    parts: HashMap<(u64, usize, usize), Part>,
    /// Ranks that left, with the reason.
    left: HashMap<usize, String>,
}

/// One rank's state; dropping it (the last clone of its [`Comm`]) leaves the group.
struct Member {
    group: Arc<Group>,
    rank: usize,
    sequence: AtomicU64,
    sent_bytes: AtomicU64,
}

impl Drop for Member {
    fn drop(&mut self) {
        let reason = if std::thread::panicking() { "panicked" } else { "dropped its communicator" };
        let mut state = self.group.state.lock().unwrap_or_else(|e| e.into_inner());
        state.left.insert(self.rank, reason.to_string());
        self.group.changed.notify_all();
    }
}

/// One rank's handle on a group of in-process ranks. Cheap to clone (the autodiff graph
/// keeps clones for the backward collectives); the rank leaves the group when the last
/// clone is dropped.
#[derive(Clone)]
pub struct Comm {
    member: Arc<Member>,
}

impl core::fmt::Debug for Comm {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Comm(rank {} of {}, {:?})", self.rank(), self.world_size(), self.transport())
    }
}

impl Comm {
    /// The handles of a new group of `world` ranks (60 s timeout).
    ///
    /// # Panics
    /// If `world` is 0.
    pub fn group(world: usize, transport: Transport) -> Vec<Comm> {
        Self::group_with_timeout(world, transport, Duration::from_secs(60))
    }

    /// [`Comm::group`] with the time a rank waits for the others in a collective before
    /// returning [`CommError::Timeout`].
    pub fn group_with_timeout(world: usize, transport: Transport, timeout: Duration) -> Vec<Comm> {
        assert!(world > 0, "Comm::group: a group needs at least one rank");
        let group = Arc::new(Group { world, transport, timeout, state: Mutex::default(), changed: Condvar::new() });
        (0..world)
            .map(|rank| Comm {
                member: Arc::new(Member { group: group.clone(), rank, sequence: AtomicU64::new(0), sent_bytes: AtomicU64::new(0) }),
            })
            .collect()
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.member.rank
    }

    /// Ranks in the group.
    pub fn world_size(&self) -> usize {
        self.member.group.world
    }

    /// How tensors move between devices.
    pub fn transport(&self) -> Transport {
        self.member.group.transport
    }

    /// Bytes of tensor payload this rank has sent to other ranks (parts to itself not
    /// counted), for measuring what a layer exchanges.
    pub fn sent_bytes(&self) -> u64 {
        self.member.sent_bytes.load(Ordering::Relaxed)
    }

    /// Adds to [`Comm::sent_bytes`] (called by the collectives that move tensors).
    pub(crate) fn count_sent(&self, bytes: usize) {
        self.member.sent_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// A shape error of collective `op` on this rank.
    pub(crate) fn shape_error(&self, op: &'static str, detail: String) -> CommError {
        CommError::Shape { rank: self.rank(), op, detail }
    }

    /// The core collective: `parts[r]` goes to rank `r`; returns the part each rank sent
    /// here, by source rank. Every rank of the group must call it (with the same `op`) at
    /// the same point of its sequence of collectives.
    pub fn exchange<T: Send + 'static>(&self, op: &'static str, parts: Vec<T>) -> Result<Vec<T>, CommError> {
        let (group, me) = (&self.member.group, self.rank());
        if parts.len() != group.world {
            return Err(self.shape_error(op, format!("{} parts for {} ranks", parts.len(), group.world)));
        }
        let seq = self.member.sequence.fetch_add(1, Ordering::Relaxed);
        let mut state = group.state.lock().unwrap_or_else(|e| e.into_inner());
        for (dst, payload) in parts.into_iter().enumerate() {
            state.parts.insert((seq, me, dst), Part { op, payload: Box::new(payload) });
        }
        group.changed.notify_all();
        let deadline = Instant::now() + group.timeout;
        loop {
            let missing: Vec<usize> = (0..group.world).filter(|&src| !state.parts.contains_key(&(seq, src, me))).collect();
            if missing.is_empty() {
                break;
            }
            if let Some((&rank, reason)) = missing.iter().find_map(|r| state.left.get_key_value(r)) {
                return Err(CommError::RankFailed { rank, op, reason: reason.clone() });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CommError::Timeout { rank: me, op, missing, after: group.timeout });
            }
            state = group.changed.wait_timeout(state, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        let mut out = Vec::with_capacity(group.world);
        for src in 0..group.world {
            let part = state.parts.remove(&(seq, src, me)).expect("checked above");
            if part.op != op {
                return Err(CommError::Mismatch { rank: me, op, other: src, other_op: part.op });
            }
            out.push(*part.payload.downcast::<T>().map_err(|_| CommError::Mismatch { rank: me, op, other: src, other_op: part.op })?);
        }
        Ok(out)
    }

    /// Every rank's `value`, by rank (host values: counts, sizes).
    pub fn all_gather_host<T: Clone + Send + 'static>(&self, op: &'static str, value: T) -> Result<Vec<T>, CommError> {
        self.exchange(op, vec![value; self.world_size()])
    }
}

/// Errors a rank closure of [`launch`] may return: any error that can hold a
/// [`CommError`] (to report a panicking rank) and tell whether it is one (to pick the root
/// cause among the ranks' errors).
pub trait RankError: From<CommError> {
    /// The collective error inside, if this is one.
    fn as_comm(&self) -> Option<&CommError>;
}

impl RankError for CommError {
    fn as_comm(&self) -> Option<&CommError> {
        Some(self)
    }
}

/// Runs `f` once per handle, each on its own thread, and returns the results by rank.
///
/// When ranks fail, the error returned is the one that explains the others: a rank's
/// panic (as [`CommError::RankFailed`] naming it, with the panic message), else an error
/// that is not a consequence of another rank's failure (a timeout naming the stalled
/// ranks, or the rank's own error), else the first by rank. A stalled rank is still
/// waited for: `launch` returns when every thread has.
pub fn launch<T, E, F>(comms: Vec<Comm>, f: F) -> Result<Vec<T>, E>
where
    T: Send,
    E: RankError + Send,
    F: Fn(Comm) -> Result<T, E> + Sync,
{
    let results: Vec<(usize, std::thread::Result<Result<T, E>>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let rank = comm.rank();
                let f = &f;
                (rank, scope.spawn(move || f(comm)))
            })
            .collect();
        handles.into_iter().map(|(rank, h)| (rank, h.join())).collect()
    });
    let mut errors: Vec<(u8, E)> = Vec::new();
    let mut values = Vec::new();
    for (rank, result) in results {
        match result {
            Err(panic) => match panic.downcast::<CommError>() {
                // A collective that failed inside a backward unwinds with its error.
                Ok(e) => {
                    let consequence = matches!(*e, CommError::RankFailed { .. });
                    errors.push((if consequence { 2 } else { 1 }, E::from(*e)));
                }
                Err(panic) => errors.push((0, CommError::RankFailed { rank, op: "launch", reason: format!("panicked: {}", panic_message(&*panic)) }.into())),
            },
            Ok(Err(e)) => {
                let consequence = matches!(e.as_comm(), Some(CommError::RankFailed { .. }));
                errors.push((if consequence { 2 } else { 1 }, e));
            }
            Ok(Ok(v)) => values.push(v),
        }
    }
    match errors.into_iter().min_by_key(|(priority, _)| *priority) {
        Some((_, e)) => Err(e),
        None => Ok(values),
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    match (panic.downcast_ref::<String>(), panic.downcast_ref::<&str>()) {
        (Some(s), _) => s.clone(),
        (None, Some(s)) => s.to_string(),
        _ => "(no message)".to_string(),
    }
}
