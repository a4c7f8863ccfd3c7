//! Why a checkpoint could not be saved or loaded.

use burn_comm::{CommError, RankError};
use std::path::PathBuf;

/// Why a checkpoint could not be saved or loaded. Every variant names the file, the
/// tensor or the rank at fault.
#[derive(Clone, Debug, PartialEq)]
pub enum DcpError {
    /// A file or directory could not be created, written, read or mapped (a full disk
    /// included).
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the system said.
        reason: String,
    },
    /// A rank failed during a collective save: nothing of this save is marked complete.
    Rank {
        /// The failed rank (world rank of the checkpointer's group).
        rank: usize,
        /// What failed there.
        detail: String,
    },
    /// The step already has a complete checkpoint (it is never overwritten).
    Exists {
        /// Its directory.
        dir: PathBuf,
    },
    /// Ranks disagree on a tensor (shape or dtype), or a chunk does not fit in it.
    Conflict {
        /// The tensor.
        tensor: String,
        /// Which ranks say what.
        detail: String,
    },
    /// The chunks the ranks hold do not cover a tensor exactly once.
    Coverage {
        /// The tensor.
        tensor: String,
        /// The elements held by no rank, or held twice in different chunks.
        detail: String,
    },
    /// A directory without a valid `metadata.json`: a save that did not finish.
    Incomplete {
        /// The directory.
        dir: PathBuf,
    },
    /// A shard file is shorter or longer than the metadata says.
    Truncated {
        /// The file.
        file: PathBuf,
        /// Bytes the metadata records.
        expected: u64,
        /// Bytes on disk.
        got: u64,
    },
    /// A shard file whose header cannot be parsed or lacks a chunk.
    Corrupt {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A chunk's bytes do not have the checksum the metadata records.
    Checksum {
        /// The file.
        file: PathBuf,
        /// The tensor the chunk belongs to.
        tensor: String,
        /// The chunk's first element.
        start: usize,
    },
    /// A tensor the loader asks for is not in the checkpoint, or not all of the elements
    /// asked for.
    Missing {
        /// The tensor.
        tensor: String,
        /// What is missing.
        detail: String,
    },
    /// A tensor's shape in the checkpoint differs from the one the loader expects (a
    /// model with other hyper-parameters).
    Shape {
        /// The tensor.
        tensor: String,
        /// Its shape in the checkpoint.
        checkpoint: Vec<usize>,
        /// The shape asked for.
        expected: Vec<usize>,
    },
    /// A dtype the format does not store, or another dtype than the one asked for.
    Dtype {
        /// The tensor.
        tensor: String,
        /// What is wrong.
        detail: String,
    },
    /// A collective of the save failed (a rank died or stalled).
    Comm(CommError),
}

impl core::fmt::Display for DcpError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Io { path, reason } => write!(f, "{}: {reason}", path.display()),
            Self::Rank { rank, detail } => write!(f, "rank {rank} failed to save: {detail}"),
            Self::Exists { dir } => {
                write!(f, "{} already holds a complete checkpoint", dir.display())
            }
            Self::Conflict { tensor, detail } => write!(f, "tensor {tensor:?}: {detail}"),
            Self::Coverage { tensor, detail } => write!(f, "tensor {tensor:?}: {detail}"),
            Self::Incomplete { dir } => write!(f, "{} has no metadata.json: an unfinished save", dir.display()),
            Self::Truncated { file, expected, got } => {
                write!(f, "{}: {got} bytes, the metadata records {expected} (truncated or replaced)", file.display())
            }
            Self::Corrupt { file, detail } => write!(f, "{}: {detail}", file.display()),
            Self::Checksum { file, tensor, start } => {
                write!(f, "{}: the chunk of tensor {tensor:?} from element {start} fails its CRC-32 (corrupted bytes)", file.display())
            }
            Self::Missing { tensor, detail } => write!(f, "tensor {tensor:?}: {detail}"),
            Self::Shape { tensor, checkpoint, expected } => {
                write!(f, "tensor {tensor:?} has shape {checkpoint:?} in the checkpoint, {expected:?} here")
            }
            Self::Dtype { tensor, detail } => write!(f, "tensor {tensor:?}: {detail}"),
            Self::Comm(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for DcpError {}

impl From<CommError> for DcpError {
    fn from(e: CommError) -> Self {
        Self::Comm(e)
    }
}

impl RankError for DcpError {
    fn as_comm(&self) -> Option<&CommError> {
        match self {
            Self::Comm(e) => Some(e),
            _ => None,
        }
    }
}

/// An [`DcpError::Io`] for `path`.
pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> DcpError {
    let path = path.into();
    move |e| DcpError::Io { path, reason: e.to_string() }
}
