//! The global metadata file (`metadata.json`): written last, atomically, by rank 0; its
//! presence marks a checkpoint complete.

use crate::error::io;
use crate::{DcpError, Fault};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The format tag of `metadata.json`.
pub const FORMAT: &str = "burn-dcp/1";

/// The file that marks a checkpoint complete.
pub const METADATA: &str = "metadata.json";

/// A checkpoint's table of contents: every tensor with its global shape, dtype and the
/// chunks it was written in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// [`FORMAT`].
    pub format: String,
    /// The training step the checkpoint was taken at.
    pub step: u64,
    /// Ranks that saved it.
    pub world_size: usize,
    /// Every tensor, by name.
    pub tensors: BTreeMap<String, TensorMeta>,
    /// Every shard file (relative to the checkpoint's directory) and its size in bytes.
    pub files: BTreeMap<String, u64>,
    /// Named JSON values (rank 0's [`crate::Snapshot::extra`]).
    pub extra: BTreeMap<String, String>,
}

/// One global tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorMeta {
    /// Global shape.
    pub shape: Vec<usize>,
    /// Element type (safetensors' name: `F32`, `BF16`, `I64`, ...).
    pub dtype: String,
    /// The chunks, by first element; they cover the tensor exactly once.
    pub chunks: Vec<ChunkMeta>,
}

impl TensorMeta {
    /// Elements of the tensor.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Where one chunk lies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChunkMeta {
    /// The shard file (relative to the checkpoint's directory).
    pub file: String,
    /// The chunk's key in that safetensors file.
    pub key: String,
    /// First element (row-major) of the global tensor.
    pub start: usize,
    /// Elements.
    pub len: usize,
    /// CRC-32 of the chunk's bytes.
    pub crc32: u32,
}

/// The directory of step `step`'s checkpoint under `root`.
pub fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step-{step:010}"))
}

fn step_of(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

impl Metadata {
    /// Reads and parses `dir/metadata.json`.
    ///
    /// # Errors
    /// [`DcpError::Incomplete`] when there is none, [`DcpError::Corrupt`] when it does not
    /// parse or is of another format.
    pub fn read(dir: &Path) -> Result<Self, DcpError> {
        let path = dir.join(METADATA);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(DcpError::Incomplete { dir: dir.to_path_buf() }),
            Err(e) => return Err(io(&path)(e)),
        };
        let meta: Metadata = serde_json::from_str(&text).map_err(|e| DcpError::Corrupt { file: path.clone(), detail: e.to_string() })?;
        if meta.format != FORMAT {
            return Err(DcpError::Corrupt { file: path, detail: format!("format {:?}, this reader reads {FORMAT:?}", meta.format) });
        }
        Ok(meta)
    }

    /// Writes `dir/metadata.json` atomically: a temporary file, flushed to disk, renamed
    /// over the final name, the directory flushed. A crash leaves either no metadata (an
    /// incomplete checkpoint) or all of it. `torn`: a fault injected half-way through.
    pub(crate) fn write(&self, dir: &Path, torn: Option<Fault>) -> Result<(), DcpError> {
        let path = dir.join(METADATA);
        let tmp = dir.join(format!("{METADATA}.tmp"));
        let json = serde_json::to_vec_pretty(self).expect("metadata serializes");
        let mut file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        if let Some(fault) = torn {
            // A crash half-way through the write: half the bytes on disk, no rename.
            file.write_all(&json[..json.len() / 2]).and_then(|_| file.sync_all()).map_err(io(&tmp))?;
            let reason = fault.trigger().err().unwrap_or_default();
            return Err(DcpError::Io { path: tmp, reason });
        }
        file.write_all(&json).and_then(|_| file.sync_all()).map_err(io(&tmp))?;
        drop(file);
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        sync_dir(dir)
    }
}

/// Flushes a directory's entries (a rename inside it) to disk.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), DcpError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// The step directories under `root`, newest first, with whether each is complete.
pub(crate) fn steps(root: &Path) -> Result<Vec<(u64, PathBuf, bool)>, DcpError> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(root)(e)),
    };
    let mut steps = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io(root))?;
        let Some(step) = entry.file_name().to_str().and_then(step_of) else {
            continue;
        };
        let dir = entry.path();
        let complete = Metadata::read(&dir).is_ok_and(|m| m.step == step);
        steps.push((step, dir, complete));
    }
    steps.sort_by_key(|s| std::cmp::Reverse(s.0));
    Ok(steps)
}

/// The newest complete checkpoint under `root`: its step and directory. Directories
/// of saves that did not finish (no valid `metadata.json`) are passed over.
///
/// # Errors
/// `root` exists but cannot be listed.
pub fn latest(root: impl AsRef<Path>) -> Result<Option<(u64, PathBuf)>, DcpError> {
    Ok(steps(root.as_ref())?.into_iter().find(|s| s.2).map(|(step, dir, _)| (step, dir)))
}
