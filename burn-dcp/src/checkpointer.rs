//! [`Checkpointer`]: collective saves, blocking or in a background thread.

use crate::save::{Save, SaveReport};
use crate::{DcpError, Fault, Snapshot};
use burn_comm::Comm;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an asynchronous save held the training step up.
#[derive(Clone, Debug, PartialEq)]
pub struct AsyncSave {
    /// Time spent waiting for the previous save to finish (zero when it had).
    pub waited: Duration,
    /// The previous save's report, when this call waited for it.
    pub previous: Option<SaveReport>,
}

/// Saves the checkpoints of a group of ranks under one root directory (a file system
/// every rank sees). Each save goes to `root/step-{step}/`: every rank writes the chunks
/// it owns to its own safetensors file, rank 0 writes `metadata.json` last; the newest
/// `keep` complete checkpoints are kept.
///
/// Saves run over a communicator of their own (split from the one given), so an
/// asynchronous save's collectives, in its background thread, never meet the training
/// step's.
///
/// # Example
/// ```
/// use burn::tensor::TensorData;
/// use burn_comm::{launch, Comm, Transport};
/// use burn_dcp::{Checkpointer, Chunk, DcpError, Reader, Snapshot};
///
/// let root = std::env::temp_dir().join(format!("burn-dcp-doc-{}", std::process::id()));
/// // Two ranks, each holding half of a [2, 3] tensor and all of a replicated one.
/// launch(Comm::group(2, Transport::Host), |comm| {
///     let r = comm.rank();
///     let mut snapshot = Snapshot::new();
///     let half: Vec<f32> = (0..3).map(|i| (3 * r + i) as f32).collect();
///     snapshot.push(Chunk::new("w", vec![2, 3], 3 * r, TensorData::new(half, [3])));
///     snapshot.push(Chunk::whole("b", TensorData::new(vec![1.0f32, 2.0], [2])));
///     let mut saver = Checkpointer::new(&root, &comm)?;
///     saver.save(7, snapshot)?;
///     Ok::<_, DcpError>(())
/// })
/// .unwrap();
/// // One reader (any world size) takes any run of elements.
/// let reader = Reader::latest(&root).unwrap().expect("a complete checkpoint");
/// assert_eq!(reader.step(), 7);
/// let middle = reader.read("w", 2, 2).unwrap();
/// assert_eq!(middle.to_vec::<f32>().unwrap(), vec![2.0, 3.0]);
/// # std::fs::remove_dir_all(&root).unwrap();
/// ```
pub struct Checkpointer {
    root: PathBuf,
    comm: Comm,
    keep: usize,
    fault: Option<Fault>,
    pending: Option<JoinHandle<Result<SaveReport, DcpError>>>,
}

impl Checkpointer {
    /// A checkpointer of the ranks of `comm` under `root` (created). Collective: every
    /// rank of `comm` builds its own.
    ///
    /// # Errors
    /// `root` cannot be created; a rank fails in the split of the communicator.
    pub fn new(root: impl AsRef<Path>, comm: &Comm) -> Result<Self, DcpError> {
        let root = root.as_ref().to_path_buf();
        let made = std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()));
        let all = comm.all_gather_host("dcp root", made)?;
        if let Some((r, e)) = all.into_iter().enumerate().find_map(|(r, m)| m.err().map(|e| (r, e))) {
            return Err(DcpError::Rank { rank: comm.global_rank(r), detail: e });
        }
        Ok(Checkpointer { root, comm: comm.split(0, comm.rank())?, keep: 2, fault: None, pending: None })
    }

    /// Keep the newest `n` (≥ 1) complete checkpoints (default 2), removing older ones
    /// once a new one is complete.
    ///
    /// # Panics
    /// If `n` is 0: the newest complete checkpoint is never removed.
    pub fn with_keep(mut self, n: usize) -> Self {
        assert!(n >= 1, "Checkpointer::with_keep: keep at least the newest checkpoint");
        self.keep = n;
        self
    }

    /// Injects `fault` into every save (tests of crash safety; see [`Fault::from_env`]).
    pub fn with_fault(mut self, fault: Option<Fault>) -> Self {
        self.fault = fault;
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The save of step `step`: this checkpointer's communicator and root, the fault
    /// to inject on this rank at this step, if any.
    fn save_of(&self, step: u64) -> Save {
        let fault = self.fault.filter(|f| f.rank == self.comm.rank() && f.step.is_none_or(|s| s == step));
        Save { comm: self.comm.clone(), root: self.root.clone(), keep: self.keep, fault }
    }

    /// Saves `snapshot` as step `step`, on this thread: returns once the checkpoint is
    /// complete on every rank (after a pending asynchronous save finished). Collective.
    ///
    /// # Errors
    /// The step has a complete checkpoint already; a rank failed to write (every rank
    /// gets the error naming it; the previous checkpoint stays the latest); a pending
    /// save failed.
    pub fn save(&mut self, step: u64, snapshot: Snapshot) -> Result<SaveReport, DcpError> {
        self.wait()?;
        self.save_of(step).run(step, snapshot)
    }

    /// Starts saving `snapshot` as step `step` in a background thread and returns: the
    /// caller's step is held up only by the copy to the host it made for the snapshot and
    /// by the wait for the previous save, if that has not finished. Collective.
    ///
    /// # Errors
    /// The previous save failed (this one is then not started).
    pub fn save_async(&mut self, step: u64, snapshot: Snapshot) -> Result<AsyncSave, DcpError> {
        let start = Instant::now();
        let previous = self.wait()?;
        let waited = start.elapsed();
        let save = self.save_of(step);
        let thread = std::thread::Builder::new().name(format!("burn-dcp save {step}")).spawn(move || save.run(step, snapshot));
        self.pending = Some(thread.map_err(|e| DcpError::Io { path: self.root.clone(), reason: format!("cannot start the save thread: {e}") })?);
        Ok(AsyncSave { waited, previous })
    }

    /// Waits for the pending asynchronous save; its report, `None` when there was none.
    ///
    /// # Errors
    /// The save's error.
    pub fn wait(&mut self) -> Result<Option<SaveReport>, DcpError> {
        let Some(thread) = self.pending.take() else {
            return Ok(None);
        };
        match thread.join() {
            Ok(r) => r.map(Some),
            Err(panic) => Err(DcpError::Rank { rank: self.comm.global_rank(self.comm.rank()), detail: format!("the save thread panicked: {}", burn_comm::panic_message(&*panic)) }),
        }
    }
}

impl Drop for Checkpointer {
    /// Finishes a pending save (a save is never left half-done by dropping).
    fn drop(&mut self) {
        if let Err(e) = self.wait() {
            eprintln!("burn-dcp: the last asynchronous save failed: {e}");
        }
    }
}
