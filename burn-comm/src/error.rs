//! Why a collective failed, and how rank closures report it.

use std::time::Duration;

/// Why a collective or point-to-point operation failed. Ranks are world ranks (the
/// rank of the process or thread in the whole job), also in a sub-communicator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommError {
    /// A rank left the group (panicked, or dropped its handle) before sending what an
    /// operation needed from it.
    RankFailed {
        /// The rank that failed.
        rank: usize,
        /// The operation that was waiting for it.
        op: &'static str,
        /// What is known about the failure.
        reason: String,
    },
    /// Ranks did not send within the group's timeout.
    Timeout {
        /// The rank that waited.
        rank: usize,
        /// Its operation.
        op: &'static str,
        /// The ranks it was still waiting for (stalled, or dead without the launcher
        /// noticing).
        missing: Vec<usize>,
        /// The timeout.
        after: Duration,
    },
    /// Two ranks called different collectives at the same point of their sequences.
    Mismatch {
        /// The receiving rank.
        rank: usize,
        /// Its collective.
        op: &'static str,
        /// The sending rank.
        other: usize,
        /// The sender's collective.
        other_op: String,
    },
    /// Arguments that do not fit the group (part counts, split sizes, shapes).
    Shape {
        /// The rank that detected it.
        rank: usize,
        /// The operation.
        op: &'static str,
        /// What is wrong, with the values.
        detail: String,
    },
    /// The engine failed: a message that does not decode, a payload over MPI's 2 GiB
    /// count limit, MPI not initialised.
    Engine {
        /// The rank that detected it.
        rank: usize,
        /// The operation.
        op: &'static str,
        /// What went wrong.
        detail: String,
    },
}

impl core::fmt::Display for CommError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CommError::RankFailed { rank, op, reason } => {
                write!(f, "rank {rank} failed during {op}: {reason}")
            }
            CommError::Timeout { rank, op, missing, after } => {
                write!(f, "rank {rank} waited {after:?} in {op} for ranks {missing:?}, which did not send (stalled or dead)")
            }
            CommError::Mismatch { rank, op, other, other_op } => {
                write!(f, "rank {rank} called {op} while rank {other} called {other_op} at the same point")
            }
            CommError::Shape { rank, op, detail } => write!(f, "rank {rank}, {op}: {detail}"),
            CommError::Engine { rank, op, detail } => write!(f, "rank {rank}, {op}: {detail}"),
        }
    }
}

impl std::error::Error for CommError {}

impl CommError {
    /// Whether this error is a consequence of another rank's failure (the root cause is
    /// reported by, or about, that rank).
    pub fn is_consequence(&self) -> bool {
        matches!(self, CommError::RankFailed { .. })
    }
}

/// Errors a rank closure of a launcher may return: any error that can hold a
/// [`CommError`] (to report a panicking rank) and tell whether it is one (to pick the root
/// cause among the ranks' errors).
pub trait RankError: From<CommError> {
    /// The collective error inside, if this is one.
    fn as_comm(&self) -> Option<&CommError>;

    /// Whether the error only follows from another rank's failure (that rank's own error
    /// is then the one to report). By default: a collective error that is one.
    fn is_consequence(&self) -> bool {
        self.as_comm().is_some_and(CommError::is_consequence)
    }
}

impl RankError for CommError {
    fn as_comm(&self) -> Option<&CommError> {
        Some(self)
    }
}
