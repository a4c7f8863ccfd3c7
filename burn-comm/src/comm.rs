//! [`Comm`]: one rank's handle on a group, over the in-process or the MPI engine.

use crate::threads::{self, Boxed, Group};
use crate::CommError;
use burn::tensor::{backend::Backend, BasicOps, Tensor, TensorData, TensorKind};
use serde::{de::DeserializeOwned, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How tensor parts reach the receiving rank's device on the in-process engine (the MPI
/// engine always moves host bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// Through host memory: any two devices of any backend (two wgpu devices included,
    /// where Burn 0.21's `to_device` panics).
    #[default]
    Host,
    /// Burn's `to_device` (on CUDA: CubeCL's server-to-server copy, NCCL send/recv).
    Device,
}

/// Host values that can travel between ranks: anything serde can encode (MessagePack on
/// the MPI engine; moved as they are between threads).
pub trait Wire: Serialize + DeserializeOwned + Send + 'static {}

impl<T: Serialize + DeserializeOwned + Send + 'static> Wire for T {}

/// Which engine carries a group's messages.
pub(crate) enum Engine {
    Threads(threads::Member),
    #[cfg(feature = "mpi")]
    Mpi(crate::mpi::Engine),
}

struct Inner {
    engine: Engine,
    rank: usize,
    world: usize,
    /// The world rank of each rank of this group (errors name world ranks).
    ranks: Vec<usize>,
    transport: Transport,
    sequence: AtomicU64,
    sent_bytes: AtomicU64,
    /// The NCCL communicator over the same ranks, for CUDA tensors (MPI engine only).
    #[cfg(feature = "nccl")]
    nccl: Option<Arc<crate::nccl::Nccl>>,
}

/// One rank's handle on a group of ranks: threads of one process ([`Comm::group`]) or
/// MPI processes (`mpi::World::comm`, feature `mpi`). Cheap to clone (the autodiff graph
/// keeps clones for the backward collectives); on the in-process engine the rank leaves
/// the group when the last clone is dropped, and the others' waits for it fail.
///
/// Collectives are matched by their order: every rank of a group calls the same
/// collectives in the same sequence. Point-to-point messages are matched by source and
/// tag.
#[derive(Clone)]
pub struct Comm {
    inner: Arc<Inner>,
}

impl core::fmt::Debug for Comm {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Comm(rank {} of {}, {}, {:?})", self.rank(), self.world_size(), self.engine_name(), self.transport())
    }
}

impl Comm {
    /// The handles of a new group of `world` in-process ranks (60 s timeout).
    ///
    /// # Panics
    /// If `world` is 0.
    pub fn group(world: usize, transport: Transport) -> Vec<Comm> {
        Self::group_with_timeout(world, transport, Duration::from_secs(60))
    }

    /// [`Comm::group`] with the time a rank waits for the others in an operation before
    /// returning [`CommError::Timeout`].
    ///
    /// # Panics
    /// If `world` is 0.
    pub fn group_with_timeout(world: usize, transport: Transport, timeout: Duration) -> Vec<Comm> {
        assert!(world > 0, "Comm::group: a group needs at least one rank");
        let group = Group::new(world, timeout);
        (0..world).map(|rank| Comm::new(Engine::Threads(threads::Member::new(group.clone(), rank)), rank, (0..world).collect(), transport)).collect()
    }

    fn new(engine: Engine, rank: usize, ranks: Vec<usize>, transport: Transport) -> Self {
        let world = ranks.len();
        Comm {
            inner: Arc::new(Inner {
                engine,
                rank,
                world,
                ranks,
                transport,
                sequence: AtomicU64::new(0),
                sent_bytes: AtomicU64::new(0),
                #[cfg(feature = "nccl")]
                nccl: None,
            }),
        }
    }

    #[cfg(feature = "mpi")]
    pub(crate) fn from_mpi(engine: crate::mpi::Engine, ranks: Vec<usize>) -> Self {
        let rank = engine.rank;
        Comm::new(Engine::Mpi(engine), rank, ranks, Transport::Host)
    }

    /// This rank, in this group.
    pub fn rank(&self) -> usize {
        self.inner.rank
    }

    /// Ranks in the group.
    pub fn world_size(&self) -> usize {
        self.inner.world
    }

    /// The world rank (of the whole job) of rank `rank` of this group.
    pub fn global_rank(&self, rank: usize) -> usize {
        self.inner.ranks[rank]
    }

    /// The world ranks of this group's ranks, in group order.
    pub fn global_ranks(&self) -> &[usize] {
        &self.inner.ranks
    }

    /// How tensors move between devices.
    pub fn transport(&self) -> Transport {
        self.inner.transport
    }

    /// `"threads"`, `"mpi"` or `"mpi+nccl"`.
    pub fn engine_name(&self) -> &'static str {
        #[cfg(feature = "nccl")]
        if self.inner.nccl.is_some() {
            return "mpi+nccl";
        }
        match &self.inner.engine {
            Engine::Threads(_) => "threads",
            #[cfg(feature = "mpi")]
            Engine::Mpi(_) => "mpi",
        }
    }

    /// This communicator with an NCCL communicator over the same ranks on `device` beside
    /// its MPI engine (feature `nccl`): from then on [`Comm::exchange_tensors`] of CUDA
    /// tensors runs on NCCL between device buffers, everything else on MPI. Collective:
    /// every rank calls it, each with its own GPU (NCCL takes one GPU per rank; pick it
    /// with `mpi::World::local_rank` or the launcher's local rank). Sub-groups split from
    /// it get their own NCCL communicator.
    ///
    /// # Errors
    /// The handle is not an MPI communicator or was cloned already; no libnccl or no such
    /// GPU; NCCL failed to join the ranks (two ranks on one GPU among the causes).
    #[cfg(feature = "nccl")]
    pub fn with_nccl(mut self, device: &cubecl::cuda::CudaDevice) -> Result<Comm, CommError> {
        let me = self.global_rank(self.rank());
        let refuse = |detail: &str| CommError::Engine { rank: me, op: "nccl init", detail: detail.into() };
        if !matches!(self.inner.engine, Engine::Mpi(_)) {
            return Err(refuse("NCCL is set up over an MPI communicator (mpi::launch or mpi::World::comm)"));
        }
        let nccl = crate::nccl::Nccl::init(&self, device)?;
        Arc::get_mut(&mut self.inner).ok_or_else(|| refuse("with_nccl takes a communicator that was not cloned yet"))?.nccl = Some(Arc::new(nccl));
        Ok(self)
    }

    /// How long a rank waits for the others in one operation.
    pub fn timeout(&self) -> Duration {
        match &self.inner.engine {
            Engine::Threads(m) => m.timeout(),
            #[cfg(feature = "mpi")]
            Engine::Mpi(e) => e.timeout(),
        }
    }

    /// Bytes of tensor payload this rank has sent to other ranks through this handle and
    /// its clones (parts to itself not counted), for measuring what a layer exchanges.
    pub fn sent_bytes(&self) -> u64 {
        self.inner.sent_bytes.load(Ordering::Relaxed)
    }

    /// Adds to [`Comm::sent_bytes`], for collectives built outside this crate that
    /// account for their payload themselves.
    pub fn count_sent(&self, bytes: usize) {
        self.inner.sent_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// A shape error of operation `op` on this rank.
    pub fn shape_error(&self, op: &'static str, detail: String) -> CommError {
        CommError::Shape { rank: self.global_rank(self.rank()), op, detail }
    }

    /// An engine error with group ranks, renamed to world ranks.
    fn globalize(&self, e: CommError) -> CommError {
        let g = |r: usize| self.inner.ranks.get(r).copied().unwrap_or(r);
        match e {
            CommError::RankFailed { rank, op, reason } => CommError::RankFailed { rank: g(rank), op, reason },
            CommError::Timeout { rank, op, missing, after } => CommError::Timeout { rank: g(rank), op, missing: missing.into_iter().map(g).collect(), after },
            CommError::Mismatch { rank, op, other, other_op } => CommError::Mismatch { rank: g(rank), op, other: g(other), other_op },
            CommError::Shape { rank, op, detail } => CommError::Shape { rank: g(rank), op, detail },
            CommError::Engine { rank, op, detail } => CommError::Engine { rank: g(rank), op, detail },
        }
    }

    fn decode_error(&self, op: &'static str, src: usize, e: impl core::fmt::Display) -> CommError {
        CommError::Engine { rank: self.global_rank(self.rank()), op, detail: format!("undecodable part from rank {}: {e}", self.global_rank(src)) }
    }

    /// The core collective: `parts[r]` goes to rank `r`; returns the part each rank sent
    /// here, by source rank. Every rank of the group must call it (with the same `op`) at
    /// the same point of its sequence of collectives.
    pub fn exchange<T: Wire>(&self, op: &'static str, parts: Vec<T>) -> Result<Vec<T>, CommError> {
        self.check_parts(op, parts.len())?;
        let seq = self.inner.sequence.fetch_add(1, Ordering::Relaxed);
        match &self.inner.engine {
            Engine::Threads(m) => {
                let boxed = parts.into_iter().map(|p| Box::new(p) as Boxed).collect();
                let got = m.exchange(seq, op, boxed).map_err(|e| self.globalize(e))?;
                Ok(got.into_iter().map(|b| *b.downcast::<T>().expect("the op names matched, and so do their types")).collect())
            }
            #[cfg(feature = "mpi")]
            Engine::Mpi(e) => {
                let bytes = parts.iter().map(|p| rmp_serde::to_vec(p).expect("host values encode")).collect();
                let got = e.exchange(seq, op, bytes).map_err(|e| self.globalize(e))?;
                got.parts().enumerate().map(|(src, b)| rmp_serde::from_slice(b).map_err(|e| self.decode_error(op, src, e))).collect()
            }
        }
    }

    /// Every rank's `value`, by rank (host values: counts, sizes).
    pub fn all_gather_host<T: Wire + Clone>(&self, op: &'static str, value: T) -> Result<Vec<T>, CommError> {
        self.exchange(op, vec![value; self.world_size()])
    }

    /// Waits until every rank of the group reached a barrier with the same name.
    pub fn barrier(&self, op: &'static str) -> Result<(), CommError> {
        self.all_gather_host(op, ()).map(|_| ())
    }

    /// Sends `value` to rank `to` under `tag`, without waiting for it to be received.
    pub fn send<T: Wire>(&self, op: &'static str, tag: u64, to: usize, value: T) -> Result<(), CommError> {
        self.check_peer(op, to)?;
        match &self.inner.engine {
            Engine::Threads(m) => {
                m.send(tag, to, op, Box::new(value));
                Ok(())
            }
            #[cfg(feature = "mpi")]
            Engine::Mpi(e) => e.send(tag, to, op, rmp_serde::to_vec(&value).expect("host values encode")).map_err(|e| self.globalize(e)),
        }
    }

    /// Receives what rank `from` sent here under `tag` (with the same `op`), waiting at
    /// most the group's timeout.
    pub fn recv<T: Wire>(&self, op: &'static str, tag: u64, from: usize) -> Result<T, CommError> {
        self.try_recv(op, tag, from, self.timeout())?.ok_or_else(|| self.timeout_error(op, from))
    }

    /// [`Comm::recv`] waiting at most `wait`: `None` when nothing arrived by then.
    pub fn try_recv<T: Wire>(&self, op: &'static str, tag: u64, from: usize, wait: Duration) -> Result<Option<T>, CommError> {
        self.check_peer(op, from)?;
        match &self.inner.engine {
            Engine::Threads(m) => match m.recv(tag, from, op, wait).map_err(|e| self.globalize(e))? {
                None => Ok(None),
                Some(b) => b.downcast::<T>().map(|b| Some(*b)).map_err(|_| self.decode_error(op, from, "a value of another type")),
            },
            #[cfg(feature = "mpi")]
            Engine::Mpi(e) => match e.recv(tag, from, op, wait).map_err(|e| self.globalize(e))? {
                None => Ok(None),
                Some(bytes) => rmp_serde::from_slice(&bytes).map(Some).map_err(|e| self.decode_error(op, from, e)),
            },
        }
    }

    fn check_dims<const D: usize>(&self, op: &'static str, from: usize, data: &TensorData) -> Result<(), CommError> {
        if data.shape.num_dims() != D {
            return Err(self.shape_error(op, format!("rank {from} sent a tensor of shape {:?}, expected {D} dimensions", data.shape.to_vec())));
        }
        Ok(())
    }

    fn timeout_error(&self, op: &'static str, from: usize) -> CommError {
        CommError::Timeout { rank: self.global_rank(self.rank()), op, missing: vec![self.global_rank(from)], after: self.timeout() }
    }

    fn check_peer(&self, op: &'static str, peer: usize) -> Result<(), CommError> {
        if peer >= self.world_size() {
            return Err(self.shape_error(op, format!("rank {peer} is not in a group of {}", self.world_size())));
        }
        Ok(())
    }

    /// An all-to-all of tensors: `parts[r]` goes to rank `r` (`None`: nothing), each
    /// received part is moved onto `device` — through host memory, or with `to_device`
    /// under [`Transport::Device`] on the in-process engine. Dtypes are kept.
    ///
    /// Host transports read each sent part to the host (`into_data`): the exchange needs
    /// the bytes.
    pub fn exchange_tensors<B, const D: usize, K>(
        &self,
        op: &'static str,
        parts: Vec<Option<Tensor<B, D, K>>>,
        device: &B::Device,
    ) -> Result<Vec<Option<Tensor<B, D, K>>>, CommError>
    where
        B: Backend,
        K: TensorKind<B> + BasicOps<B> + 'static,
        K::Primitive: 'static,
    {
        self.check_parts(op, parts.len())?;
        let me = self.rank();
        let sent: usize = parts.iter().enumerate().filter(|(dst, _)| *dst != me).filter_map(|(_, p)| p.as_ref()).map(tensor_bytes).sum();
        self.count_sent(sent);
        match (&self.inner.engine, self.transport()) {
            (Engine::Threads(_), Transport::Device) => {
                let got = self.exchange_boxed(op, parts.into_iter().map(|p| Box::new(p) as Boxed).collect())?;
                Ok(got.into_iter().map(|b| b.downcast::<Option<Tensor<B, D, K>>>().expect("tensors of one op").map(|t| to(t, device))).collect())
            }
            (Engine::Threads(_), Transport::Host) => {
                let data = parts
                    .into_iter()
                    // Host read: the Host transport moves the values through host memory.
                    .map(|p| Box::new(p.map(|t| t.into_data())) as Boxed)
                    .collect();
                let got = self.exchange_boxed(op, data)?;
                Ok(got.into_iter().map(|b| b.downcast::<Option<TensorData>>().expect("data of one op").map(|d| from_data(d, device))).collect())
            }
            #[cfg(feature = "mpi")]
            (Engine::Mpi(e), _) => {
                #[cfg(feature = "nccl")]
                if let Some(nccl) = self.inner.nccl.as_ref().filter(|_| crate::nccl::is_cuda::<B, K>()) {
                    return crate::nccl::exchange_tensors(self, nccl, op, parts, device);
                }
                let seq = self.inner.sequence.fetch_add(1, Ordering::Relaxed);
                let bytes = parts
                    .into_iter()
                    .map(|p| {
                        // Host read: MPI moves host bytes (the engine has no device buffers).
                        p.map(|t| crate::frame::encode(t.into_data())).unwrap_or_default()
                    })
                    .collect();
                let got = e.exchange(seq, op, bytes).map_err(|e| self.globalize(e))?;
                got.parts()
                    .enumerate()
                    .map(|(src, b)| if b.is_empty() { Ok(None) } else { crate::frame::decode(b).map(|d| Some(from_data(d, device))).map_err(|e| self.decode_error(op, src, e)) })
                    .collect()
            }
        }
    }

    /// The in-process engine's exchange of boxed payloads.
    /// One part per rank, or a shape error naming both counts.
    fn check_parts(&self, op: &'static str, parts: usize) -> Result<(), CommError> {
        if parts != self.world_size() {
            return Err(self.shape_error(op, format!("{parts} parts for {} ranks", self.world_size())));
        }
        Ok(())
    }

    /// The in-process engine's exchange of boxed payloads (callers pass one per rank).
    #[allow(irrefutable_let_patterns)]
    fn exchange_boxed(&self, op: &'static str, parts: Vec<Boxed>) -> Result<Vec<Boxed>, CommError> {
        let Engine::Threads(m) = &self.inner.engine else { unreachable!("in-process engine only") };
        let seq = self.inner.sequence.fetch_add(1, Ordering::Relaxed);
        m.exchange(seq, op, parts).map_err(|e| self.globalize(e))
    }

    /// Sends a tensor to rank `to` under `tag` (host bytes, or the tensor itself under
    /// [`Transport::Device`] on the in-process engine).
    pub fn send_tensor<B, const D: usize, K>(&self, op: &'static str, tag: u64, to: usize, x: Tensor<B, D, K>) -> Result<(), CommError>
    where
        B: Backend,
        K: TensorKind<B> + BasicOps<B> + 'static,
    {
        self.check_peer(op, to)?;
        if to != self.rank() {
            self.count_sent(tensor_bytes(&x));
        }
        match (&self.inner.engine, self.transport()) {
            (Engine::Threads(m), Transport::Device) => {
                m.send(tag, to, op, Box::new(x));
                Ok(())
            }
            (Engine::Threads(m), Transport::Host) => {
                // Host read: the Host transport moves the values through host memory.
                m.send(tag, to, op, Box::new(x.into_data()));
                Ok(())
            }
            #[cfg(feature = "mpi")]
            (Engine::Mpi(e), _) => e
                // Host read: MPI moves host bytes (the engine has no device buffers).
                .send(tag, to, op, crate::frame::encode(x.into_data()))
                .map_err(|e| self.globalize(e)),
        }
    }

    /// Receives the tensor rank `from` sent here under `tag`, on `device`, waiting at
    /// most the group's timeout.
    pub fn recv_tensor<B, const D: usize, K>(&self, op: &'static str, tag: u64, from: usize, device: &B::Device) -> Result<Tensor<B, D, K>, CommError>
    where
        B: Backend,
        K: TensorKind<B> + BasicOps<B> + 'static,
    {
        self.try_recv_tensor(op, tag, from, device, self.timeout())?.ok_or_else(|| self.timeout_error(op, from))
    }

    /// [`Comm::recv_tensor`] waiting at most `wait`: `None` when nothing arrived by then
    /// (for a receiver that watches other things between tries).
    pub fn try_recv_tensor<B, const D: usize, K>(&self, op: &'static str, tag: u64, from: usize, device: &B::Device, wait: Duration) -> Result<Option<Tensor<B, D, K>>, CommError>
    where
        B: Backend,
        K: TensorKind<B> + BasicOps<B> + 'static,
    {
        self.check_peer(op, from)?;
        let x = match (&self.inner.engine, self.transport()) {
            (Engine::Threads(m), transport) => {
                let Some(b) = m.recv(tag, from, op, wait).map_err(|e| self.globalize(e))? else {
                    return Ok(None);
                };
                match transport {
                    Transport::Device => to(*b.downcast::<Tensor<B, D, K>>().map_err(|_| self.decode_error(op, from, "a tensor of another kind or rank"))?, device),
                    Transport::Host => {
                        let data = *b.downcast::<TensorData>().map_err(|_| self.decode_error(op, from, "not tensor data"))?;
                        self.check_dims::<D>(op, from, &data)?;
                        from_data(data, device)
                    }
                }
            }
            #[cfg(feature = "mpi")]
            (Engine::Mpi(e), _) => {
                let Some(bytes) = e.recv(tag, from, op, wait).map_err(|e| self.globalize(e))? else {
                    return Ok(None);
                };
                let data = crate::frame::decode(&bytes).map_err(|e| self.decode_error(op, from, e))?;
                self.check_dims::<D>(op, from, &data)?;
                from_data(data, device)
            }
        };
        Ok(Some(x))
    }

    /// The sub-group of the ranks that pass the same `color`, ranked by `key` (ties by
    /// rank). Collective: every rank of this group calls it; each gets its own handle.
    pub fn split(&self, color: usize, key: usize) -> Result<Comm, CommError> {
        let all = self.all_gather_host("split", (color, key))?;
        let mut members: Vec<usize> = (0..self.world_size()).filter(|&r| all[r].0 == color).collect();
        members.sort_by_key(|&r| (all[r].1, r));
        let sub_rank = members.iter().position(|&r| r == self.rank()).expect("this rank has its color");
        let ranks: Vec<usize> = members.iter().map(|&r| self.global_rank(r)).collect();
        let engine = match &self.inner.engine {
            Engine::Threads(m) => {
                // The first member of each color makes its group and hands it to the others.
                let leader = |r: usize| (0..self.world_size()).filter(|&q| all[q].0 == all[r].0).min_by_key(|&q| (all[q].1, q));
                let mine = (leader(self.rank()) == Some(self.rank())).then(|| Group::new(ranks_of(&all, color), m.timeout()));
                let parts = (0..self.world_size()).map(|dst| Box::new(mine.clone().filter(|_| all[dst].0 == color)) as Boxed).collect();
                let got = self.exchange_boxed("split groups", parts)?;
                let group = got.into_iter().find_map(|b| *b.downcast::<Option<Arc<Group>>>().expect("groups")).expect("the leader sent one");
                Engine::Threads(threads::Member::new(group, sub_rank))
            }
            #[cfg(feature = "mpi")]
            Engine::Mpi(e) => Engine::Mpi(e.split(color, key)),
        };
        let sub = Comm::new(engine, sub_rank, ranks, self.transport());
        #[cfg(feature = "nccl")]
        if let Some(nccl) = &self.inner.nccl {
            return sub.with_nccl(&nccl.device());
        }
        Ok(sub)
    }
}

/// How many ranks share `color`.
fn ranks_of(all: &[(usize, usize)], color: usize) -> usize {
    all.iter().filter(|(c, _)| *c == color).count()
}

fn tensor_bytes<B: Backend, const D: usize, K: TensorKind<B> + BasicOps<B>>(x: &Tensor<B, D, K>) -> usize {
    x.shape().num_elements() * x.dtype().size()
}

fn to<B: Backend, const D: usize, K: TensorKind<B> + BasicOps<B>>(x: Tensor<B, D, K>, device: &B::Device) -> Tensor<B, D, K> {
    if &x.device() == device {
        x
    } else {
        x.to_device(device)
    }
}

fn from_data<B: Backend, const D: usize, K: TensorKind<B> + BasicOps<B>>(data: TensorData, device: &B::Device) -> Tensor<B, D, K> {
    // Keep the dtype: FP8 codes travel as u32 words in an int tensor whose backend default
    // may be i32.
    let dtype = data.dtype;
    Tensor::from_data(data, (device, dtype))
}
