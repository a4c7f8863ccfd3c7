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
//! (needs `mpirun`; as root it sets OpenMPI's run-as-root variables itself).

use burn::backend::NdArray;
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
    Case {
        name: "tiny (512 tok, top-4, d 64)",
        rows: 512 * 4,
        width: 64,
    },
    // moe_layer's v3-slim: 512 tokens, top-8, d_model 896.
    Case {
        name: "v3-slim (512 tok, top-8, d 896)",
        rows: 512 * 8,
        width: 896,
    },
    Case {
        name: "latency (1 value per pair)",
        rows: 0,
        width: 1,
    },
];

/// Seconds per all-to-all of `case` on this rank (every rank runs the same count).
fn measure(comm: &Comm, case: Case, min_time: Duration) -> Result<f64, CommError> {
    let device = Default::default();
    let world = comm.world_size();
    let per = if case.rows == 0 { 1 } else { case.rows / world };
    let parts = || {
        (0..world)
            .map(|dst| {
                Some(Tensor::<NdArray, 2>::full(
                    [per, case.width],
                    (comm.rank() * 10 + dst) as f32,
                    &device,
                ))
            })
            .collect::<Vec<_>>()
    };
    let once = || -> Result<(), CommError> {
        let got = comm.exchange_tensors("all_to_all", parts(), &device)?;
        assert!(got
            .iter()
            .all(|p| p.as_ref().is_some_and(|t| t.dims() == [per, case.width])));
        Ok(())
    };
    once()?; // warm up
    comm.barrier("calibrate")?;
    let t = Instant::now();
    once()?;
    let first = t.elapsed().as_secs_f64();
    // Rank 0's estimate decides how many runs every rank makes.
    let iters = comm.all_gather_host(
        "iterations",
        ((min_time.as_secs_f64() / first.max(1e-6)).ceil() as usize).clamp(3, 10_000),
    )?[0];
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

fn parse_ranks(args: &[String]) -> Vec<usize> {
    let mut ranks = vec![2, 4];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--ranks" => {
                let v = it
                    .next()
                    .unwrap_or_else(|| fail("--ranks needs a value, e.g. 2,4"));
                ranks = v
                    .split(',')
                    .map(|r| {
                        r.parse()
                            .ok()
                            .filter(|&r: &usize| r >= 2)
                            .unwrap_or_else(|| {
                                fail(&format!("--ranks {v}: rank counts of at least 2"))
                            })
                    })
                    .collect();
            }
            "--child" => {
                it.next();
            }
            "--help" | "-h" => {
                println!("all_to_all [--ranks 2,4]");
                std::process::exit(0);
            }
            other => fail(&format!("unknown argument {other:?} (see --help)")),
        }
    }
    ranks
}

fn fail(msg: &str) -> ! {
    eprintln!("all_to_all: {msg}");
    std::process::exit(2)
}

const MIN_TIME: Duration = Duration::from_millis(400);

#[cfg(feature = "mpi")]
fn mpi_child() -> bool {
    std::env::var_os("OMPI_COMM_WORLD_SIZE").is_some() || std::env::var_os("PMI_SIZE").is_some()
}

#[cfg(feature = "mpi")]
fn run_child() {
    burn_comm::mpi::launch(Duration::from_secs(60), |comm| {
        for (i, case) in CASES.iter().enumerate() {
            let s = measure(&comm, *case, MIN_TIME)?;
            if comm.rank() == 0 {
                println!("RESULT {i} {s}");
            }
        }
        Ok::<_, CommError>(())
    })
    .unwrap();
}

/// Seconds per all-to-all of each case on `world` MPI processes.
#[cfg(feature = "mpi")]
fn over_mpi(world: usize) -> Option<Vec<f64>> {
    if !burn_comm::mpirun::available() {
        return None;
    }
    let out = burn_comm::mpirun::command(world)
        .arg(std::env::current_exe().ok()?)
        .args(["--child", "mpi"])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "mpirun -np {world} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut times = vec![f64::NAN; CASES.len()];
    for line in text.lines().filter_map(|l| l.strip_prefix("RESULT ")) {
        let mut f = line.split(' ');
        let (i, s) = (
            f.next()?.parse::<usize>().ok()?,
            f.next()?.parse::<f64>().ok()?,
        );
        times[i] = s;
    }
    Some(times)
}

#[cfg(not(feature = "mpi"))]
fn over_mpi(_world: usize) -> Option<Vec<f64>> {
    None
}

fn main() {
    #[cfg(feature = "mpi")]
    if mpi_child() {
        return run_child();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ranks = parse_ranks(&args);
    println!(
        "all-to-all per rank, f32 rows, NdArray tensors (host), {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<34} {:>5} {:>12} {:>14} {:>14} {:>10}",
        "case", "ranks", "bytes out", "threads", "MPI procs", "MPI/thr"
    );
    for &world in &ranks {
        let threads = launch(Comm::group(world, Transport::Host), |comm| {
            CASES
                .iter()
                .map(|c| measure(&comm, *c, MIN_TIME))
                .collect::<Result<Vec<_>, _>>()
        })
        .expect("threads")[0]
            .clone();
        let mpi = over_mpi(world);
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
            println!(
                "{:<34} {:>5} {:>12} {:>14} {:>14} {:>10}",
                case.name,
                world,
                b as u64,
                show(threads[i]),
                m,
                ratio
            );
        }
    }
    println!("MPI/thr: the threads' time over MPI's (above 1: MPI processes are faster)");
}
