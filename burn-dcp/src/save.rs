//! One collective save: plan who writes which chunk, write the shards in parallel,
//! commit the metadata.
//!
//! 1. Every rank sends the others the specs of its chunks (name, global shape, dtype,
//!    elements); rank 0 also checks the step directory (a complete checkpoint there is
//!    never overwritten; the leftovers of an unfinished save are removed).
//! 2. Each distinct chunk is written by the lowest rank holding it: a replicated tensor
//!    once, a sharded one by each of its holders. The chunks of a tensor must cover it
//!    exactly once (no gap, no two different chunks over one element).
//! 3. Each writer writes one safetensors file of its chunks (a temporary name, flushed,
//!    renamed) and reports each chunk's CRC-32.
//! 4. Rank 0 writes `metadata.json` atomically, then removes checkpoints beyond `keep`.
//!
//! A rank that fails at any point reports its error to the others in the next exchange,
//! so every rank returns the error naming it, and nothing is committed.

use crate::chunk::{dtype_of, ChunkSpec};
use crate::error::io;
use crate::metadata::{step_dir, steps, sync_dir, ChunkMeta, Metadata, TensorMeta, FORMAT};
use crate::{DcpError, Fault, FaultPoint, Snapshot};
use burn_comm::Comm;
use safetensors::tensor::TensorView;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What a rank wrote: its shard file's name, the file's size in bytes, and each chunk's
/// tensor name with its entry in the metadata.
type WrittenShard = (String, u64, Vec<(String, ChunkMeta)>);

/// What a save did, on this rank.
#[derive(Clone, Debug, PartialEq)]
pub struct SaveReport {
    /// The step saved.
    pub step: u64,
    /// The checkpoint's directory.
    pub dir: PathBuf,
    /// Bytes this rank wrote (its shard file).
    pub bytes_written: u64,
    /// Bytes of every shard file.
    pub total_bytes: u64,
    /// Time this rank spent writing its shard.
    pub write_time: Duration,
    /// Time of the whole save, plan to commit.
    pub time: Duration,
}

/// A rank's result in an exchange: its value or its error's text.
type Outcome<T> = Result<T, String>;

/// The first failed rank's error, or every rank's value.
fn collect<T>(comm: &Comm, all: Vec<Outcome<T>>) -> Result<Vec<T>, DcpError> {
    let mut out = Vec::with_capacity(all.len());
    for (r, x) in all.into_iter().enumerate() {
        match x {
            Ok(v) => out.push(v),
            Err(detail) => return Err(DcpError::Rank { rank: comm.global_rank(r), detail }),
        }
    }
    Ok(out)
}

pub(crate) struct Save {
    pub comm: Comm,
    pub root: PathBuf,
    pub keep: usize,
    /// The fault to inject on this rank.
    pub fault: Option<Fault>,
}

impl Save {
    fn fault(&self, point: FaultPoint) -> Result<(), String> {
        match self.fault {
            Some(f) if f.point == point => f.trigger(),
            _ => Ok(()),
        }
    }

    /// The whole save (collective over `comm`).
    pub fn run(&self, step: u64, snapshot: Snapshot) -> Result<SaveReport, DcpError> {
        let start = Instant::now();
        let dir = step_dir(&self.root, step);
        let me = self.comm.rank();
        let local = self.prepare(&dir, &snapshot);
        let specs = collect(&self.comm, self.comm.all_gather_host("dcp plan", local)?)?;
        let owners = plan(&specs)?;
        let write_start = Instant::now();
        let written = self.write(&dir, me, &snapshot, &specs[me], &owners).map_err(|e| e.to_string());
        let write_time = write_start.elapsed();
        let written = collect(&self.comm, self.comm.all_gather_host("dcp shards", written)?)?;
        let committed = match me {
            0 => self.commit(&dir, step, &specs, &written, snapshot.extra).map_err(|e| e.to_string()),
            _ => Ok(()),
        };
        let all = self.comm.all_gather_host("dcp commit", committed)?;
        collect(&self.comm, all.into_iter().take(1).collect())?;
        Ok(SaveReport {
            step,
            dir,
            bytes_written: written[me].as_ref().map_or(0, |w| w.1),
            total_bytes: written.iter().flatten().map(|w| w.1).sum(),
            write_time,
            time: start.elapsed(),
        })
    }

    /// This rank's chunk specs; on rank 0 also the step directory made ready.
    fn prepare(&self, dir: &Path, snapshot: &Snapshot) -> Outcome<Vec<ChunkSpec>> {
        let specs = snapshot.chunks.iter().map(|c| c.spec()).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
        if self.comm.rank() == 0 {
            match Metadata::read(dir) {
                Ok(_) => return Err(DcpError::Exists { dir: dir.to_path_buf() }.to_string()),
                // An unfinished save of the same step (a crash): its files go.
                Err(DcpError::Incomplete { .. }) if dir.exists() => std::fs::remove_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?,
                Err(DcpError::Incomplete { .. }) => {}
                Err(e) => return Err(e.to_string()),
            }
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        Ok(specs)
    }

    /// Writes the chunks this rank owns; returns its file name, size and chunk records.
    fn write(&self, dir: &Path, me: usize, snapshot: &Snapshot, specs: &[ChunkSpec], owners: &BTreeMap<(String, usize), usize>) -> Result<Option<WrittenShard>, DcpError> {
        self.fault(FaultPoint::BeforeShard).map_err(|reason| DcpError::Io { path: dir.to_path_buf(), reason })?;
        let mine: Vec<usize> = (0..specs.len()).filter(|&i| owners[&(specs[i].name.clone(), specs[i].start)] == me).collect();
        if mine.is_empty() {
            return Ok(None);
        }
        // The directory is rank 0's to create; another rank may see it a little later on a
        // shared file system.
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let name = format!("rank-{:05}.safetensors", self.comm.global_rank(me));
        let (path, tmp) = (dir.join(&name), dir.join(format!("{name}.tmp")));
        let mut views = Vec::with_capacity(mine.len());
        let mut chunks = Vec::with_capacity(mine.len());
        for &i in &mine {
            let (spec, data) = (&specs[i], &snapshot.chunks[i].data);
            let key = format!("{}@{}", spec.name, spec.start);
            let dtype = dtype_of(&spec.dtype, &spec.name)?.1;
            let bytes = data.as_bytes();
            let view = TensorView::new(dtype, vec![spec.len], bytes).map_err(|e| DcpError::Conflict { tensor: spec.name.clone(), detail: e.to_string() })?;
            views.push((key.clone(), view));
            let crc32 = crc32fast::hash(bytes);
            chunks.push((spec.name.clone(), ChunkMeta { file: name.clone(), key, start: spec.start, len: spec.len, crc32 }));
        }
        safetensors::serialize_to_file(views, None, &tmp).map_err(|e| DcpError::Io { path: tmp.clone(), reason: e.to_string() })?;
        if let Some(f) = self.fault.filter(|f| f.point == FaultPoint::DuringShard) {
            // A crash or a full disk half-way through the shard: half of it on disk.
            let len = std::fs::metadata(&tmp).map_err(io(&tmp))?.len();
            std::fs::OpenOptions::new().write(true).open(&tmp).and_then(|f| f.set_len(len / 2)).map_err(io(&tmp))?;
            f.trigger().map_err(|detail| DcpError::Io { path: tmp.clone(), reason: detail })?;
        }
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        sync_dir(dir)?;
        let size = std::fs::metadata(&path).map_err(io(&path))?.len();
        self.fault(FaultPoint::AfterShard).map_err(|reason| DcpError::Io { path: path.clone(), reason })?;
        Ok(Some((name, size, chunks)))
    }

    /// Rank 0: the metadata from every rank's chunks, written atomically; then old
    /// checkpoints beyond `keep` removed.
    fn commit(&self, dir: &Path, step: u64, specs: &[Vec<ChunkSpec>], written: &[Option<WrittenShard>], extra: BTreeMap<String, String>) -> Result<(), DcpError> {
        let mut tensors: BTreeMap<String, TensorMeta> = BTreeMap::new();
        for spec in specs.iter().flatten() {
            tensors.entry(spec.name.clone()).or_insert_with(|| TensorMeta { shape: spec.shape.clone(), dtype: spec.dtype.clone(), chunks: Vec::new() });
        }
        let mut files = BTreeMap::new();
        for (file, size, chunks) in written.iter().flatten() {
            files.insert(file.clone(), *size);
            for (name, chunk) in chunks {
                tensors.get_mut(name).expect("a planned tensor").chunks.push(chunk.clone());
            }
        }
        for t in tensors.values_mut() {
            t.chunks.sort_by_key(|c| c.start);
        }
        let meta = Metadata { format: FORMAT.into(), step, world_size: self.comm.world_size(), tensors, files, extra };
        meta.write(dir, self.fault.filter(|f| f.point == FaultPoint::DuringMetadata))?;
        self.prune()
    }

    /// Removes every step directory older than the `keep` newest complete ones.
    fn prune(&self) -> Result<(), DcpError> {
        let all = steps(&self.root)?;
        let Some(&(oldest_kept, _, _)) = all.iter().filter(|s| s.2).take(self.keep).last() else {
            return Ok(());
        };
        for (step, dir, _) in all {
            if step < oldest_kept {
                std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
            }
        }
        Ok(())
    }
}

/// The rank that writes each distinct chunk `(name, start)`: the lowest holding it.
///
/// # Errors
/// Ranks that disagree on a tensor's shape or dtype, chunks of different lengths at one
/// start, or chunks that leave elements uncovered or cover them twice.
fn plan(specs: &[Vec<ChunkSpec>]) -> Result<BTreeMap<(String, usize), usize>, DcpError> {
    let mut first: BTreeMap<&str, (usize, &ChunkSpec)> = BTreeMap::new();
    let mut owners: BTreeMap<(String, usize), (usize, usize)> = BTreeMap::new();
    for (rank, specs) in specs.iter().enumerate() {
        for s in specs {
            let (r0, s0) = *first.entry(&s.name).or_insert((rank, s));
            if (&s0.shape, &s0.dtype) != (&s.shape, &s.dtype) {
                let detail = format!("rank {r0} holds it as {} {:?}, rank {rank} as {} {:?}", s0.dtype, s0.shape, s.dtype, s.shape);
                return Err(DcpError::Conflict { tensor: s.name.clone(), detail });
            }
            let (owner, len) = *owners.entry((s.name.clone(), s.start)).or_insert((rank, s.len));
            if len != s.len {
                let detail = format!("rank {owner} holds {len} elements from {}, rank {rank} {}", s.start, s.len);
                return Err(DcpError::Coverage { tensor: s.name.clone(), detail });
            }
        }
    }
    let mut end: Option<(&str, usize)> = None;
    let check_end = |end: Option<(&str, usize)>| -> Result<(), DcpError> {
        if let Some((name, at)) = end {
            let numel: usize = first[name].1.shape.iter().product();
            if at != numel {
                return Err(DcpError::Coverage { tensor: name.into(), detail: format!("elements {at}..{numel} are held by no rank") });
            }
        }
        Ok(())
    };
    for ((name, start), (_, len)) in &owners {
        let at = match end {
            Some((n, at)) if n == name => at,
            _ => {
                check_end(end)?;
                0
            }
        };
        if *start != at {
            let detail = match *start > at {
                true => format!("elements {at}..{start} are held by no rank"),
                false => format!("two chunks overlap at elements {start}..{at}"),
            };
            return Err(DcpError::Coverage { tensor: name.clone(), detail });
        }
        end = Some((name, start + len));
    }
    check_end(end)?;
    Ok(owners.into_iter().map(|(k, (rank, _))| (k, rank)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, shape: &[usize], start: usize, len: usize) -> ChunkSpec {
        ChunkSpec { name: name.into(), shape: shape.to_vec(), dtype: "F32".into(), start, len }
    }

    #[test]
    fn replicated_chunks_are_written_by_the_lowest_rank_and_shards_by_their_holders() {
        let specs = vec![vec![spec("a", &[4], 0, 4), spec("b", &[6], 0, 3)], vec![spec("a", &[4], 0, 4), spec("b", &[6], 3, 3)]];
        let owners = plan(&specs).unwrap();
        assert_eq!(owners[&("a".into(), 0)], 0);
        assert_eq!(owners[&("b".into(), 0)], 0);
        assert_eq!(owners[&("b".into(), 3)], 1);
    }

    #[test]
    fn gaps_overlaps_and_disagreements_are_refused_naming_the_tensor() {
        let gap = plan(&[vec![spec("w", &[2, 3], 0, 2)], vec![spec("w", &[2, 3], 4, 2)]]).unwrap_err();
        assert_eq!(gap, DcpError::Coverage { tensor: "w".into(), detail: "elements 2..4 are held by no rank".into() });
        let tail = plan(&[vec![spec("w", &[6], 0, 5)]]).unwrap_err();
        assert_eq!(tail, DcpError::Coverage { tensor: "w".into(), detail: "elements 5..6 are held by no rank".into() });
        let overlap = plan(&[vec![spec("w", &[6], 0, 4)], vec![spec("w", &[6], 2, 4)]]).unwrap_err();
        assert!(matches!(overlap, DcpError::Coverage { ref detail, .. } if detail.contains("overlap at elements 2..4")), "{overlap}");
        let shape = plan(&[vec![spec("w", &[6], 0, 6)], vec![spec("w", &[2, 3], 0, 6)]]).unwrap_err();
        assert_eq!(shape.to_string(), "tensor \"w\": rank 0 holds it as F32 [6], rank 1 as F32 [2, 3]");
    }
}
