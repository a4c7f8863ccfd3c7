//! What every burn-moe test file uses: the backends, a seeded generator and host reads.

use burn::tensor::{backend::Backend, Int, Tensor};

/// The kernels without fusion, on the wgpu runtime.
pub type Cube = burn_cubecl::CubeBackend<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>;
/// Burn's `Wgpu` (fusion over the same kernels).
pub type Wgpu = burn::backend::Wgpu;
/// The reference backend.
pub type Ref = burn::backend::NdArray<f32>;
/// Burn's Flex CPU backend (burn-moe's host loops).
#[allow(dead_code)] // used by tests/moe, not by every file that shares this one
pub type Flex = burn::backend::Flex;

pub fn wgpu_device() -> burn::backend::wgpu::WgpuDevice {
    burn::backend::wgpu::WgpuDevice::DefaultDevice
}

/// `MOE_TEST_SEED`, or else the FNV-1a hash of `test`'s name.
pub fn seed(test: &str) -> u64 {
    std::env::var("MOE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| test.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)))
}

/// Seeded xorshift. The seed comes from `MOE_TEST_SEED` or, by default, from the test's
/// name (FNV-1a): every run draws the same inputs, and a failure printed with its seed
/// reproduces with `MOE_TEST_SEED=<seed>`. Other seeds are for exploring the inputs.
pub struct Rng(u64);

impl Rng {
    pub fn new(test: &str) -> Self {
        let seed = seed(test);
        eprintln!("{test}: MOE_TEST_SEED={seed}");
        Rng(seed | 1)
    }
    /// A generator from a known seed (a seed drawn by [`Rng::new`] and shared).
    #[allow(dead_code)] // used by tests/model, which shares this file
    pub fn from_seed(seed: u64) -> Self {
        Rng(seed | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-2, 2).
    pub fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
    }
    /// Values from {-1, -0.5, 0, 0.5, 1}: most rows hold ties.
    pub fn coarse(&mut self) -> f32 {
        (self.next() % 5) as f32 * 0.5 - 1.0
    }
    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// `n` values uniform in [-2, 2), none zero.
    pub fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| loop {
                let v = self.uniform();
                if v != 0.0 {
                    break v;
                }
            })
            .collect()
    }
}

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
/// processes on this machine, every process with the same `MOE_TEST_SEED` (this
/// process's, or the worker's default, printed) and the job's id in `MOE_TEST_JOB`. `Err` when the job was still running after
/// `limit` (a hang); fails when `mpirun` is missing (tests/run.sh installs it).
#[allow(dead_code)] // each test binary uses what its mpi.rs needs
pub fn mpi_workers(ranks: usize, worker: &str, limit: std::time::Duration) -> Result<burn_comm::mpirun::Job, burn_comm::mpirun::Job> {
    assert!(burn_comm::mpirun::available(), "mpirun not found: tests/run.sh installs OpenMPI (openmpi-bin)");
    // The ranks' inputs: the seed of `MOE_TEST_SEED` or, as in `Rng::new`, of the worker's
    // name. The job's own id (for its scratch directories) is the driver's pid and clock.
    let seed = seed(worker);
    let job = format!("{}-{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    eprintln!("{worker} on {ranks} processes: MOE_TEST_SEED={seed}");
    let test = format!("mpi::{worker}");
    let args = ["--ignored", "--exact", test.as_str(), "--nocapture", "--test-threads=1"];
    burn_comm::mpirun::run(ranks, &std::env::current_exe().unwrap(), &args, &[("MOE_TEST_SEED", &seed.to_string()), ("MOE_TEST_JOB", &job)], limit)
}
