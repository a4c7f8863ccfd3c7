//! All-to-all bandwidth and latency of the two engines on this machine, in one run: the
//! in-process ranks (threads) and MPI processes (this program again, under `mpirun`),
//! for the dispatch sizes of burn-moe's tiny and v3-slim layers.
//!
//! One all-to-all is what an expert-parallel MoE layer does per dispatch: each rank
//! holds `tokens × top-k` rows of `d_model` f32 values and sends `1/W` of them to each
//! of the `W` ranks ([`Comm::exchange_tensors`], the transport under burn-moe's
//! `all_to_all`). Bandwidth counts the bytes a rank sends to the other ranks; latency is
//! the time of an all-to-all of one value per pair.
//!
//! ```sh
//! cargo run --release -p burn-comm --features mpi --example all_to_all -- --ranks 2,4
//! ```
//! (needs `mpirun`; as root it sets OpenMPI's run-as-root variables itself). On a machine
//! with one NVIDIA GPU per rank, `--features nccl` and `--nccl` add a column: MPI processes
//! with NCCL between `Cuda` tensors.

use burn::backend::NdArray;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use burn_comm::{launch, Comm, CommError, Transport};
use std::time::{Duration, Instant};

/// A dispatch to measure: name, rows per rank, row width.
#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    rows: usize,
    width: usize,
}

const CASES: [Case; 3] = [
    // train_tiny: 8 × 64 tokens, top-4, d_model 64.
    Case { name: "tiny (512 tok, top-4, d 64)", rows: 512 * 4, width: 64 },
    // moe_layer's v3-slim: 512 tokens, top-8, d_model 896.
    Case { name: "v3-slim (512 tok, top-8, d 896)", rows: 512 * 8, width: 896 },
    Case { name: "latency (1 value per pair)", rows: 0, width: 1 },
];

/// Seconds per all-to-all of `case` on this rank (every rank runs the same count).
fn measure<B: Backend>(comm: &Comm, case: Case, device: &B::Device, min_time: Duration) -> Result<f64, CommError> {
    let world = comm.world_size();
    let per = if case.rows == 0 { 1 } else { case.rows / world };
    let parts = || (0..world).map(|dst| Some(Tensor::<B, 2>::full([per, case.width], (comm.rank() * 10 + dst) as f32, device))).collect::<Vec<_>>();
    let once = || -> Result<(), CommError> {
        let got = comm.exchange_tensors("all_to_all", parts(), device)?;
        assert!(got.iter().all(|p| p.as_ref().is_some_and(|t| t.dims() == [per, case.width])));
        Ok(())
    };
    once()?; // warm up
    comm.barrier("calibrate")?;
    let t = Instant::now();
    once()?;
    let first = t.elapsed().as_secs_f64();
    // Rank 0's estimate decides how many runs every rank makes.
    let iters = comm.all_gather_host("iterations", ((min_time.as_secs_f64() / first.max(1e-6)).ceil() as usize).clamp(3, 10_000))?[0];
    comm.barrier("start")?;
    let t = Instant::now();
    for _ in 0..iters {
        once()?;
    }
    comm.barrier("end")?;
    Ok(t.elapsed().as_secs_f64() / iters as f64)
}

/// Bytes a rank sends to the other ranks in one all-to-all of `case`.
fn bytes(case: Case, world: usize) -> f64 {
    let per = if case.rows == 0 { 1 } else { case.rows / world };
    (per * case.width * 4 * (world - 1)) as f64
}

/// The flags, every value checked before anything runs.
#[derive(clap::Parser)]
#[command(about = "All-to-all bandwidth and latency: in-process ranks (threads) against MPI processes")]
struct Args {
    /// Rank counts to measure, comma-separated, each at least 2.
    #[arg(long, value_delimiter = ',', default_value = "2,4", value_parser = at_least_two)]
    ranks: Vec<usize>,
    /// Add a column: MPI processes with NCCL between CUDA tensors (one GPU per rank).
    #[arg(long)]
    nccl: bool,
    /// Set by this program when it starts itself under mpirun: the rank's engine.
    #[arg(long, hide = true, value_parser = ["mpi", "nccl"])]
    child: Option<String>,
}

fn at_least_two(v: &str) -> Result<usize, String> {
    match v.parse::<usize>() {
        Ok(r) if r >= 2 => Ok(r),
        _ => Err(format!("{v}: a rank count of at least 2")),
    }
}

const MIN_TIME: Duration = Duration::from_millis(400);

#[cfg(feature = "mpi")]
fn mpi_child() -> bool {
    std::env::var_os("OMPI_COMM_WORLD_SIZE").is_some() || std::env::var_os("PMI_SIZE").is_some()
}

/// One rank of the MPI job: host tensors over MPI, or (`nccl`) CUDA tensors over NCCL.
#[cfg(feature = "mpi")]
fn run_child(nccl: bool) {
    burn_comm::mpi::launch(Duration::from_secs(60), |comm| {
        let report = |i: usize, s: f64, comm: &Comm| {
            if comm.rank() == 0 {
                println!("RESULT {i} {s}");
            }
        };
        if nccl {
            #[cfg(feature = "nccl")]
            {
                use burn::backend::cuda::CudaDevice;
                let gpu = CudaDevice::new(burn_comm::mpi::local_rank().unwrap_or(comm.rank()));
                let comm = comm.with_nccl(&gpu)?;
                for (i, case) in CASES.iter().enumerate() {
                    report(i, measure::<burn::backend::Cuda>(&comm, *case, &gpu, MIN_TIME)?, &comm);
                }
            }
            return Ok(());
        }
        for (i, case) in CASES.iter().enumerate() {
            let s = measure::<NdArray>(&comm, *case, &Default::default(), MIN_TIME)?;
            report(i, s, &comm);
        }
        Ok::<_, CommError>(())
    })
    .unwrap();
}

/// Seconds per all-to-all of each case on `world` MPI processes (`nccl`: CUDA tensors).
#[cfg(feature = "mpi")]
fn over_mpi(world: usize, nccl: bool) -> Option<Vec<f64>> {
    if !burn_comm::mpirun::available() {
        return None;
    }
    let out = burn_comm::mpirun::command(world).arg(std::env::current_exe().ok()?).args(["--child", if nccl { "nccl" } else { "mpi" }]).output().ok()?;
    if !out.status.success() {
        eprintln!("mpirun -np {world} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut times = vec![f64::NAN; CASES.len()];
    for line in text.lines().filter_map(|l| l.strip_prefix("RESULT ")) {
        let mut f = line.split(' ');
        let (i, s) = (f.next()?.parse::<usize>().ok()?, f.next()?.parse::<f64>().ok()?);
        times[i] = s;
    }
    Some(times)
}

#[cfg(not(feature = "mpi"))]
fn over_mpi(_world: usize, _nccl: bool) -> Option<Vec<f64>> {
    None
}

fn main() {
    let Args { ranks, nccl, child } = clap::Parser::parse();
    #[cfg(feature = "mpi")]
    if mpi_child() {
        return run_child(child.as_deref() == Some("nccl"));
    }
    if child.is_some() {
        eprintln!("all_to_all: --child is set by this program under mpirun, not by hand");
        std::process::exit(2);
    }
    if nccl && !cfg!(feature = "nccl") {
        eprintln!("all_to_all: --nccl: build with --features nccl");
        std::process::exit(2);
    }
    println!("all-to-all per rank, f32 rows, NdArray tensors (host), {} cores", std::thread::available_parallelism().map_or(1, |n| n.get()));
    println!("{:<34} {:>5} {:>12} {:>14} {:>14} {:>10}{}", "case", "ranks", "bytes out", "threads", "MPI procs", "MPI/thr", if nccl { "  NCCL (CUDA)" } else { "" });
    for &world in &ranks {
        let threads =
            launch(Comm::group(world, Transport::Host), |comm| CASES.iter().map(|c| measure::<NdArray>(&comm, *c, &Default::default(), MIN_TIME)).collect::<Result<Vec<_>, _>>())
                .expect("threads")[0]
                .clone();
        let mpi = over_mpi(world, false);
        let gpus = if nccl { over_mpi(world, true) } else { None };
        for (i, case) in CASES.iter().enumerate() {
            let b = bytes(*case, world);
            let show = |s: f64| {
                if case.rows == 0 {
                    format!("{:.1} µs", s * 1e6)
                } else {
                    format!("{:.2} GB/s", b / s / 1e9)
                }
            };
            let (m, ratio) = match &mpi {
                Some(m) => (show(m[i]), format!("{:.2}x", threads[i] / m[i])),
                None => ("(no mpi)".to_string(), "-".to_string()),
            };
            let g = match (&gpus, nccl) {
                (Some(g), _) => format!("  {:>11}", show(g[i])),
                (None, true) => "  (failed)".to_string(),
                (None, false) => String::new(),
            };
            println!("{:<34} {:>5} {:>12} {:>14} {:>14} {:>10}{g}", case.name, world, b as u64, show(threads[i]), m, ratio);
        }
    }
    println!("MPI/thr: the threads' time over MPI's (above 1: MPI processes are faster)");
}
