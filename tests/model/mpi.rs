//! The model's pipeline across MPI processes (feature `mpi`): the per-rank programs of
//! parallel.rs — DualPipeV on 2 processes, `[pp 2, ep 2]` and `[dp 2, ep 2]` (DDP, then FSDP) on 4 — each checked against one
//! device on the whole batch. Each `mpi_worker_*` test is one rank's program, started by
//! the test beside it under `mpirun`; every process draws the same weights and tokens
//! from the seed the driver passes in `TEST_SEED`.

use crate::common::{mpi_workers, Rng};
use crate::parallel::{dp_ep_rank, dualpipe_v_rank, fsdp_rank, pp_ep_rank, reference, DP_EP_ROWS, DUALPIPE_ROWS, PP_EP_ROWS};
use burn_comm::{mpi, Comm};
use std::time::Duration;

fn mpirun(ranks: usize, worker: &str) {
    let job = mpi_workers(ranks, worker, Duration::from_secs(400)).unwrap_or_else(|job| panic!("{worker} on {ranks} processes hung:\n{}", job.output));
    assert!(job.success, "{worker} on {ranks} processes failed:\n{}", job.output);
    for r in 0..ranks {
        assert!(job.output.contains(&format!("rank {r} of {ranks}: ok")), "{worker}: rank {r} did not finish:\n{}", job.output);
    }
}

#[test]
fn dualpipe_v_on_two_processes_takes_the_single_device_step() {
    mpirun(2, "mpi_worker_dualpipe_v");
}

#[test]
fn pipeline_and_expert_parallelism_on_four_processes_take_the_single_device_step() {
    mpirun(4, "mpi_worker_pp_ep");
}

#[test]
fn data_and_expert_parallelism_on_four_processes_take_the_single_device_step() {
    mpirun(4, "mpi_worker_dp_ep");
}

#[test]
#[ignore = "an MPI rank: run by data_and_expert_parallelism_on_four_processes_take_the_single_device_step under mpirun"]
fn mpi_worker_dp_ep() {
    mpi::launch(Duration::from_secs(120), |world| {
        let reference = reference(Rng::new("mpi_worker_dp_ep").next_u64(), DP_EP_ROWS);
        dp_ep_rank(&world, &reference)?;
        // And FSDP over the same [dp 2, ep 2] mesh, one shard group per unit, on the same
        // batch.
        fsdp_rank(&world, &reference, 2, true)?;
        done(&world);
        Ok::<_, String>(())
    })
    .unwrap();
}

#[test]
fn a_checkpoint_saved_by_four_processes_is_one_devices_and_loads_into_two_ranks() {
    mpirun(4, "mpi_worker_checkpoint");
}

#[test]
#[ignore = "an MPI rank: run by a_checkpoint_saved_by_four_processes_is_one_devices_and_loads_into_two_ranks under mpirun"]
fn mpi_worker_checkpoint() {
    use crate::checkpoint::{assert_same, base, rank, run, tmp, Layout};
    use burn_dcp::step_dir;
    mpi::launch(Duration::from_secs(120), |world| {
        // Every process draws the same model (one seed); each run its own directories.
        let (config, model) = base();
        let names = burn_deepseek::checkpoint::StateNames::of(&model, &config).map_err(|e| e.to_string())?;
        // One directory for the job (the processes' ids differ): named by the id the driver
        // passes in `MOE_TEST_JOB`.
        let job = std::env::var("MOE_TEST_JOB").unwrap_or_default();
        let saved = std::env::temp_dir().join(format!("burn-deepseek-ckpt-mpi-job-{job}"));
        // FSDP × EP over [dp 2, ep 2] processes: two steps, saved asynchronously (the save's
        // collectives in a background thread, on the MPI engine), then a third.
        rank(&world, Layout::Fsdp { replicate: 1, ep: 2 }, &model, &names, None, 2, &saved)?;
        world.barrier("saved").map_err(|e| e.to_string())?;
        if world.rank() == 0 {
            // One device's checkpoints of the same steps; the MPI job's loaded by 2 threads.
            let reference = tmp(&format!("mpi-{job}-reference"));
            run(Layout::Single, 1, &model, &names, None, 2, &reference);
            for s in [2, 3] {
                assert_same(&step_dir(&reference, s), &step_dir(&saved, s), &format!("FSDP × EP on 4 processes, step {s}"));
            }
            let loaded = tmp(&format!("mpi-{job}-loaded"));
            run(Layout::Zero1, 2, &model, &names, Some(&saved), 0, &loaded);
            assert_same(&step_dir(&saved, 3), &step_dir(&loaded, 3), "loaded by ZeRO-1 on 2 threads");
            for dir in [reference, loaded] {
                std::fs::remove_dir_all(dir).map_err(|e| e.to_string())?;
            }
        }
        world.barrier("checked").map_err(|e| e.to_string())?;
        if world.rank() == 0 {
            std::fs::remove_dir_all(&saved).map_err(|e| e.to_string())?;
        }
        done(&world);
        Ok::<_, String>(())
    })
    .unwrap();
}

fn done(comm: &Comm) {
    println!("rank {} of {}: ok", comm.rank(), comm.world_size());
}

#[test]
#[ignore = "an MPI rank: run by dualpipe_v_on_two_processes_takes_the_single_device_step under mpirun"]
fn mpi_worker_dualpipe_v() {
    mpi::launch(Duration::from_secs(120), |comm| {
        dualpipe_v_rank(&comm, &reference(Rng::new("mpi_worker_dualpipe_v").next_u64(), DUALPIPE_ROWS))?;
        done(&comm);
        Ok::<_, String>(())
    })
    .unwrap();
}

#[test]
#[ignore = "an MPI rank: run by pipeline_and_expert_parallelism_on_four_processes_take_the_single_device_step under mpirun"]
fn mpi_worker_pp_ep() {
    mpi::launch(Duration::from_secs(120), |world| {
        pp_ep_rank(&world, &reference(Rng::new("mpi_worker_pp_ep").next_u64(), PP_EP_ROWS))?;
        done(&world);
        Ok::<_, String>(())
    })
    .unwrap();
}
