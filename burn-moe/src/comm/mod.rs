//! Collectives between ranks, for expert parallelism: the communicator of
//! [`burn_comm`] (threads of one process, or MPI processes with its `mpi` feature),
//! re-exported here, and the differentiable collectives on tensors in [`ops`]:
//! [`all_to_all`] with uneven splits (its backward is the reverse all-to-all, and its
//! rows may travel in FP8), [`all_gather`] and [`all_reduce`], both built on it with
//! Burn ops, so their backwards follow.
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

mod backend;
pub mod ops;

pub use backend::{CommBackend, Splits};
pub use burn_comm::{launch, Comm, CommError, DeviceMesh, MeshError, RankError, Transport};
pub use ops::{all_gather, all_reduce, all_to_all};
