//! Why a data-parallel step failed.

use burn_comm::{CommError, RankError};

/// Why a data-parallel operation failed; every variant names the rank that saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DpError {
    /// A collective failed (a rank left, stalled or called another collective).
    Comm(CommError),
    /// The ranks' modules differ: another number of trainable parameters, or a parameter
    /// of another shape.
    Layout {
        /// The rank that found it.
        rank: usize,
        /// The parameters that differ, with their shapes on both ranks.
        detail: String,
    },
    /// A configuration that cannot work (a data-parallel size that does not divide the
    /// world or the batch, a dtype the backend lacks).
    Config {
        /// What is wrong, with the values.
        detail: String,
    },
}

impl core::fmt::Display for DpError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DpError::Comm(e) => write!(f, "{e}"),
            DpError::Layout { rank, detail } => {
                write!(f, "rank {rank}: the data-parallel ranks' modules differ: {detail}")
            }
            DpError::Config { detail } => write!(f, "data parallelism: {detail}"),
        }
    }
}

impl std::error::Error for DpError {}

impl From<CommError> for DpError {
    fn from(e: CommError) -> Self {
        DpError::Comm(e)
    }
}

impl RankError for DpError {
    fn as_comm(&self) -> Option<&CommError> {
        match self {
            DpError::Comm(e) => Some(e),
            _ => None,
        }
    }
}

impl From<burn_comm::MeshError> for DpError {
    fn from(e: burn_comm::MeshError) -> Self {
        match e {
            burn_comm::MeshError::Comm(e) => DpError::Comm(e),
            other => DpError::Config { detail: other.to_string() },
        }
    }
}
