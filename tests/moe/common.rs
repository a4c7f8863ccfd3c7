//! What every burn-moe test file uses: the backends, a seeded generator and host reads.

use burn::tensor::{backend::Backend, Int, Tensor};

#[path = "../support/runtime.rs"]
mod runtime;
#[allow(unused_imports)] // each suite sharing this file uses some
pub use runtime::{kernel_device, Cube, Fused, KernelRuntime};

/// The reference backend.
pub type Ref = burn::backend::NdArray<f32>;
/// Burn's Flex CPU backend (burn-moe's host loops).
#[allow(dead_code)] // used by tests/moe, not by every file that shares this one
pub type Flex = burn::backend::Flex;

#[path = "../support/rng.rs"]
mod rng;
pub use rng::{seed, Rng};

pub fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

pub fn host_int<B: Backend, const D: usize>(t: Tensor<B, D, Int>) -> Vec<i64> {
    t.into_data().convert::<i64>().to_vec().unwrap()
}

/// Asserts `|got − exact| ≤ tol · bound` elementwise, where `bound` is the same formula
/// evaluated on the absolute values of the inputs (Σ|a·b| for every sum of products): the
/// scale an f32 rounding error of a sum is proportional to. NaN fails.
pub fn assert_close(what: &str, got: &[f32], exact: &[f64], bound: &[f64], tol: f64) {
    assert_eq!(got.len(), exact.len(), "{what}: length");
    for (i, ((&g, &x), &b)) in got.iter().zip(exact).zip(bound).enumerate() {
        let err = (g as f64 - x).abs();
        assert!(err <= tol * b + 1e-30, "{what}[{i}]: {g} vs {x} (error {err:.3e}, bound {:.3e})", tol * b);
    }
}

/// Runs the `#[ignore]`d worker test `mpi::{worker}` of this test binary as `ranks` MPI
/// processes on this machine, every process with the same `TEST_SEED` (this
/// process's, or the worker's default, printed) and the job's id in `MOE_TEST_JOB`. `Err` when the job was still running after
/// `limit` (a hang); fails when `mpirun` is missing (tests/run.sh installs it).
#[allow(dead_code)] // each test binary uses what its mpi.rs needs
pub fn mpi_workers(ranks: usize, worker: &str, limit: std::time::Duration) -> Result<burn_comm::mpirun::Job, burn_comm::mpirun::Job> {
    assert!(burn_comm::mpirun::available(), "mpirun not found: tests/run.sh installs OpenMPI (openmpi-bin)");
    // The ranks' inputs: the seed of `TEST_SEED` or, as in `Rng::new`, of the worker's
    // name. The job's own id (for its scratch directories) is the driver's pid and clock.
    let seed = seed(worker);
    let job = format!("{}-{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    eprintln!("{worker} on {ranks} processes: TEST_SEED={seed}");
    let test = format!("mpi::{worker}");
    let args = ["--ignored", "--exact", test.as_str(), "--nocapture", "--test-threads=1"];
    burn_comm::mpirun::run(ranks, &std::env::current_exe().unwrap(), &args, &[("TEST_SEED", &seed.to_string()), ("MOE_TEST_JOB", &job)], limit)
}
