//! The collectives and the expert-parallel layer across MPI processes (feature `mpi`):
//! each `mpi_worker_*` test is one rank's program, started by the test beside it under
//! `mpirun -np 2` and `-np 4` on this machine (the ranks share its cores). The workers
//! run the same per-rank code as the in-process tests of ep.rs and check the same
//! values; every process draws the same inputs from the seed the driver passes in
//! `TEST_SEED`. The workers are `#[ignore]`d: alone, outside `mpirun`, they would be a
//! world of one.

use std::time::Duration;

use burn::tensor::backend::Backend;
use burn_comm::mpi;
use burn_fp8::QuantConfig;
use burn_moe::comm::{Comm, CommError};
use burn_moe::ep::EpError;
use burn_moe::eplb::Placement;
use burn_moe::Moe;

use crate::common::{mpi_workers, Rng};
use crate::ep::{compare, config, ep_rank, gather_reduce_rank, inputs, random_splits, single_device, stamped_rank, Ad, Run};

/// Runs the worker test `worker` as `ranks` MPI processes: whether `mpirun` succeeded,
/// what the ranks printed and how long the job took; a hang fails the test.
fn mpirun(ranks: usize, worker: &str, limit: Duration) -> (bool, String, Duration) {
    match mpi_workers(ranks, worker, limit) {
        Ok(job) => (job.success, job.output, job.elapsed),
        Err(job) => panic!("{worker} on {ranks} processes hung past {limit:?}:\n{}", job.output),
    }
}

fn assert_all_ranks_ok(ranks: usize, worker: &str) {
    let (ok, text, _) = mpirun(ranks, worker, Duration::from_secs(300));
    assert!(ok, "{worker} on {ranks} processes failed:\n{text}");
    for r in 0..ranks {
        assert!(text.contains(&format!("rank {r} of {ranks}: ok")), "{worker}: rank {r} did not finish:\n{text}");
    }
}

#[test]
fn collectives_across_mpi_processes() {
    for ranks in [2, 4] {
        assert_all_ranks_ok(ranks, "mpi_worker_collectives");
    }
}

#[test]
fn expert_parallel_layer_across_mpi_processes_equals_single_device() {
    for ranks in [2, 4] {
        assert_all_ranks_ok(ranks, "mpi_worker_ep_layer");
    }
}

#[test]
fn a_stalled_process_is_named_within_the_timeout() {
    let (ok, text, elapsed) = mpirun(3, "mpi_worker_stall", Duration::from_secs(120));
    assert!(!ok, "the job succeeded with a stalled rank:\n{text}");
    assert!(text.contains("for ranks [1]"), "no rank named the stalled rank 1:\n{text}");
    // The timeout is 2 s; rank 1 sleeps 30 s: the job ended by the timeout, not the sleep.
    assert!(elapsed < Duration::from_secs(25), "took {elapsed:?}:\n{text}");
}

#[test]
fn a_killed_process_ends_the_job_naming_it() {
    let (ok, text, elapsed) = mpirun(3, "mpi_worker_killed", Duration::from_secs(120));
    assert!(!ok, "the job succeeded with a killed rank:\n{text}");
    // mpirun reports the dead process itself ("process rank 1 ... exited on signal"), or
    // a rank's timeout names it.
    assert!(text.contains("rank 1 ") || text.contains("for ranks [1]"), "rank 1 not named:\n{text}");
    assert!(elapsed < Duration::from_secs(25), "took {elapsed:?}:\n{text}");
}

#[cfg(feature = "nccl")]
#[test]
fn nccl_across_mpi_processes_moves_cuda_tensors_or_fails_on_every_rank() {
    // With one GPU per rank, the stamped all-to-all runs on NCCL; on a machine without
    // CUDA, NCCL or enough GPUs, every rank reports the same error (none hangs or aborts).
    let (ok, text, _) = mpirun(2, "mpi_worker_nccl", Duration::from_secs(300));
    assert!(ok, "mpi_worker_nccl failed:\n{text}");
    let moved = (0..2).all(|r| text.contains(&format!("rank {r} of 2: nccl ok")));
    let refused = (0..2).all(|r| text.contains(&format!("rank {r} of 2: nccl unavailable")));
    assert!(moved || refused, "the ranks disagree on NCCL:\n{text}");
    if refused {
        assert!(text.contains("nccl init") && (text.contains("CUDA") || text.contains("NCCL")), "the error does not say what is missing:\n{text}");
        eprintln!("NCCL is not usable here; the ranks reported:\n{text}");
    }
}

#[cfg(feature = "nccl")]
#[test]
#[ignore = "an MPI rank: run by nccl_across_mpi_processes_moves_cuda_tensors_or_fails_on_every_rank under mpirun"]
fn mpi_worker_nccl() {
    type Gpu = burn::backend::Autodiff<burn::backend::Cuda>;
    mpi::launch(Duration::from_secs(60), |comm| {
        let (rank, world) = (comm.rank(), comm.world_size());
        let gpu = burn::backend::cuda::CudaDevice::new(mpi::local_rank().unwrap_or(rank));
        match comm.with_nccl(&gpu) {
            Ok(comm) => {
                assert_eq!(comm.engine_name(), "mpi+nccl");
                let mut rng = Rng::new("mpi_worker_nccl");
                for _ in 0..3 {
                    stamped_rank::<Gpu>(&comm, &gpu, &random_splits(&mut rng, world), None)?;
                    stamped_rank::<Gpu>(&comm, &gpu, &random_splits(&mut rng, world), Some(QuantConfig::activation()))?;
                }
                gather_reduce_rank(&comm)?;
                println!("rank {rank} of {world}: nccl ok");
            }
            Err(e) => println!("rank {rank} of {world}: nccl unavailable: {e}"),
        }
        Ok::<_, CommError>(())
    })
    .unwrap();
}

fn done(comm: &Comm) {
    println!("rank {} of {}: ok", comm.rank(), comm.world_size());
}

#[test]
#[ignore = "an MPI rank: run by collectives_across_mpi_processes under mpirun"]
fn mpi_worker_collectives() {
    mpi::launch(Duration::from_secs(60), |comm| {
        let mut rng = Rng::new("mpi_worker_collectives");
        let device = Default::default();
        for _ in 0..3 {
            // The same draws on every process: the same splits.
            stamped_rank::<Ad>(&comm, &device, &random_splits(&mut rng, comm.world_size()), None)?;
            stamped_rank::<Ad>(&comm, &device, &random_splits(&mut rng, comm.world_size()), Some(QuantConfig::activation()))?;
        }
        let nothing = vec![vec![0; comm.world_size()]; comm.world_size()];
        stamped_rank::<Ad>(&comm, &device, &nothing, None)?;
        gather_reduce_rank(&comm)?;
        done(&comm);
        Ok::<_, CommError>(())
    })
    .unwrap();
}

type RunParts = (Vec<f32>, Vec<f32>, Vec<i64>, f32, Vec<f32>, Vec<f32>, Vec<Vec<f32>>);

fn parts(r: Run) -> RunParts {
    (r.output, r.dx, r.counts, r.balance, r.gate, r.shared, r.experts)
}

fn run((output, dx, counts, balance, gate, shared, experts): RunParts) -> Run {
    Run { output, dx, counts, balance, gate, shared, experts }
}

#[test]
#[ignore = "an MPI rank: run by expert_parallel_layer_across_mpi_processes_equals_single_device under mpirun"]
fn mpi_worker_ep_layer() {
    mpi::launch(Duration::from_secs(120), |comm| {
        let world = comm.world_size();
        let mut rng = Rng::new("mpi_worker_ep_layer");
        let device = Default::default();
        // Every process initialises the same layer.
        Ad::seed(&device, rng.next_u64());
        let moe: Moe<Ad> = config().init(&device);
        // With 4 ranks, one rank has no tokens.
        let batches = if world == 4 { vec![1, 2, 0, 1] } else { vec![1; world] };
        let data = inputs(&mut rng, &batches, 4, 64);
        let placement = Placement::identity(16, world).unwrap();
        let mine = ep_rank(&moe, &placement, &data[comm.rank()], 4, None, &comm, &device)?;
        let ranks: Vec<Run> = comm.all_gather_host("runs", parts(mine))?.into_iter().map(run).collect();
        let single = single_device(&moe, &data, 4);
        compare(&format!("{world} MPI processes"), &single, &ranks, &placement, 1e-5, [1e-5; 3]);
        done(&comm);
        Ok::<_, EpError>(())
    })
    .unwrap();
}

#[test]
#[ignore = "an MPI rank: run by a_stalled_process_is_named_within_the_timeout under mpirun"]
fn mpi_worker_stall() {
    mpi::launch(Duration::from_secs(2), |comm| {
        comm.barrier("start")?;
        if comm.rank() == 1 {
            std::thread::sleep(Duration::from_secs(30));
        }
        comm.barrier("after the stall")?;
        done(&comm);
        Ok::<_, CommError>(())
    })
    .unwrap();
}

#[test]
#[ignore = "an MPI rank: run by a_killed_process_ends_the_job_naming_it under mpirun"]
fn mpi_worker_killed() {
    mpi::launch(Duration::from_secs(10), |comm| {
        comm.barrier("start")?;
        if comm.rank() == 1 {
            std::process::abort();
        }
        let device = Default::default();
        let sends = vec![vec![1; comm.world_size()]; comm.world_size()];
        stamped_rank::<Ad>(&comm, &device, &sends, None)?;
        done(&comm);
        Ok::<_, CommError>(())
    })
    .unwrap();
}
