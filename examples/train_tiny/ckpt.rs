//! `train_tiny`'s distributed checkpoints (burn-dcp through `burn_deepseek::checkpoint`):
//! every rank saves what it holds to `--out/checkpoints/step-{N}/` (parameters and AdamW
//! moments under Hugging Face names, the run's state in the metadata), in the background
//! unless `--save-mode sync`; `--resume` loads the latest complete one into whatever
//! layout and world size this run has.

use super::*;
use burn_dcp::{Checkpointer, Reader, Snapshot};
use burn_deepseek::checkpoint::{Holding, StateNames};

/// The data stream a checkpoint's run read: the position is the step; the rows per
/// step, their length and the seed must be this run's for the stream to go on.
#[derive(Config, Debug, PartialEq)]
pub(super) struct DataStream {
    pub seed: u64,
    /// Rows of every step's global batch (all ranks together).
    pub rows: usize,
    /// Bytes per row (`--seq` + 2).
    pub row_bytes: usize,
}

impl DataStream {
    pub fn of(args: &Args) -> Self {
        DataStream { seed: args.seed, rows: global_rows_per_step(args), row_bytes: args.seq + 1 + args.mtp }
    }
}

/// Rows of a step's global batch: `--batch` per data-parallel replica and expert rank
/// (each pipeline's ranks share theirs).
pub(super) fn global_rows_per_step(args: &Args) -> usize {
    args.batch * args.dp * args.ep
}

/// The checkpoints' directory.
pub(super) fn root(args: &Args) -> PathBuf {
    args.out.join("checkpoints")
}

/// The latest complete checkpoint and the run state in it, for `--resume`: the model
/// config, the step and the loss history; checked to continue this run's data stream.
pub(super) fn resume(args: &Args) -> Result<(Reader, TrainState), String> {
    let root = root(args);
    let reader = Reader::latest(&root)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no complete checkpoint under {} (a run without --resume writes them every --save-every steps)", root.display()))?;
    let json = |key: &str| reader.extra(key).ok_or_else(|| format!("{}: no {key:?} in the metadata (not a train_tiny checkpoint)", reader.dir().display()));
    let state = TrainState::load_binary(json("train_state")?.as_bytes()).map_err(|e| format!("{}: train_state: {e}", reader.dir().display()))?;
    // The learning-rate schedule is a function of the step and --lr: a resume may change
    // --lr on purpose, so a change is reported, not refused.
    let saved_lr = reader.extra("lr").and_then(|v| v.parse::<f64>().ok());
    if let Some(lr) = saved_lr.filter(|&lr| lr != args.lr) {
        println!("note: the checkpoint's run used --lr {lr}, this run --lr {} (the schedule goes on from step {} with the new peak)", args.lr, state.step);
    }
    let saved = DataStream::load_binary(json("data_stream")?.as_bytes()).map_err(|e| format!("{}: data_stream: {e}", reader.dir().display()))?;
    let here = DataStream::of(args);
    if saved != here {
        return Err(format!(
            "the checkpoint's data stream (seed {}, {} rows of {} bytes per step) is not this run's (--seed {}, {} rows = --batch {} × --dp {} × --ep {}, --seq {} + 2): pass --batch {} --seq {} --seed {} to continue it on {} data-parallel × expert ranks",
            saved.seed, saved.rows, saved.row_bytes, here.seed, here.rows, args.batch, args.dp, args.ep, args.seq,
            saved.rows / (args.dp * args.ep).max(1), saved.row_bytes - 2, saved.seed, args.dp * args.ep
        ));
    }
    if saved.rows % (args.dp * args.ep) != 0 {
        return Err(format!("{} rows per step do not split over --dp {} × --ep {}", saved.rows, args.dp, args.ep));
    }
    Ok((reader, state))
}

/// A rank's checkpoint writer: the checkpointer over all ranks, the model's names, and
/// the stall of each save.
pub(super) struct Saver {
    saver: Checkpointer,
    pub names: StateNames,
    async_save: bool,
    rank: usize,
}

impl Saver {
    /// Collective over `world`. A run without `--resume` first removes the checkpoints
    /// of an earlier run in the same `--out`.
    pub fn new(args: &Args, world: &Comm, names: StateNames) -> Result<Self, RunError> {
        let root = root(args);
        if !args.resume && world.rank() == 0 && root.exists() {
            std::fs::remove_dir_all(&root).map_err(|e| failed(format!("{}: {e}", root.display())))?;
            println!("removed the checkpoints of an earlier run in {} (no --resume)", root.display());
        }
        world.barrier("checkpoint root")?;
        let fault = burn_dcp::Fault::from_env().map_err(failed)?;
        let saver = Checkpointer::new(&root, world).map_err(failed)?.with_fault(fault);
        Ok(Saver { saver, names, async_save: args.save_mode_async, rank: world.rank() })
    }

    /// The names with this rank's place in the expert-parallel group.
    pub fn holding(&self, ep: Option<&Comm>) -> Holding<'_> {
        let h = Holding::new(&self.names);
        match ep {
            Some(c) => h.with_ep(c.rank(), c.world_size()),
            None => h,
        }
    }

    /// Saves step `state.step` from `snapshot` (made by the caller: the step's
    /// device-to-host copy), with the run state; rank 0 prints the stall.
    pub fn save(&mut self, args: &Args, state: &TrainState, mut snapshot: Snapshot, snapshot_time: Duration) -> Result<(), RunError> {
        snapshot.set_extra("train_state", state.to_string());
        snapshot.set_extra("data_stream", DataStream::of(args).to_string());
        snapshot.set_extra("lr", args.lr.to_string());
        let step = state.step as u64;
        let mb = snapshot.bytes() as f64 / 1e6;
        match self.async_save {
            true => {
                let s = self.saver.save_async(step, snapshot).map_err(failed)?;
                if let (0, Some(p)) = (self.rank, &s.previous) {
                    println!("checkpoint step {} complete: {:.2} MB in {:.0} ms", p.step, p.total_bytes as f64 / 1e6, p.time.as_secs_f64() * 1e3);
                }
                if self.rank == 0 {
                    println!(
                        "checkpoint step {step} (async): the step stalled {:.1} ms (snapshot of {mb:.2} MB {:.1} ms, waiting for the previous save {:.1} ms)",
                        (snapshot_time + s.waited).as_secs_f64() * 1e3,
                        snapshot_time.as_secs_f64() * 1e3,
                        s.waited.as_secs_f64() * 1e3
                    );
                }
            }
            false => {
                let r = self.saver.save(step, snapshot).map_err(failed)?;
                if self.rank == 0 {
                    println!(
                        "checkpoint step {step} (sync): the step stalled {:.1} ms (snapshot of {mb:.2} MB {:.1} ms, save {:.1} ms; {:.2} MB written by all ranks)",
                        (snapshot_time + r.time).as_secs_f64() * 1e3,
                        snapshot_time.as_secs_f64() * 1e3,
                        r.time.as_secs_f64() * 1e3,
                        r.total_bytes as f64 / 1e6
                    );
                }
            }
        }
        Ok(())
    }

    /// Waits for the last asynchronous save.
    pub fn finish(&mut self) -> Result<(), RunError> {
        if let Some(p) = self.saver.wait().map_err(failed)? {
            if self.rank == 0 {
                println!("checkpoint step {} complete: {:.2} MB in {:.0} ms", p.step, p.total_bytes as f64 / 1e6, p.time.as_secs_f64() * 1e3);
            }
        }
        Ok(())
    }
}

/// Rank 0 prints how long its load took and how much of the checkpoint it read.
pub(super) fn report_load(rank: usize, reader: &Reader, start: Instant) {
    if rank == 0 {
        println!(
            "rank 0 loaded its part of {} in {:.0} ms ({:.2} MB read by this process)",
            reader.dir().display(),
            start.elapsed().as_secs_f64() * 1e3,
            reader.bytes_read() as f64 / 1e6
        );
    }
}

/// Loaded from `reader`, or the error naming what could not be.
pub(super) fn loaded<T>(what: &str, r: Result<T, burn_deepseek::checkpoint::CheckpointError>) -> Result<T, RunError> {
    r.map_err(|e| failed(format!("--resume: {what}: {e}")))
}
