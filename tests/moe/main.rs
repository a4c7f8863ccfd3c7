//! burn-moe against naive host references, on the wgpu runtime (lavapipe on a CPU-only
//! machine) and on the reference backend. Inputs are fresh random values each run; the
//! seed is printed and `TEST_SEED=<n>` replays a run.

mod common;
mod dispatch;
mod ep;
mod eplb;
mod fp8;
mod layer;
mod mla;
#[cfg(feature = "mpi")]
mod mpi;
mod router;
