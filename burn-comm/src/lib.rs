//! Communicators for distributed Burn: collectives and point-to-point messages between
//! ranks, a named device mesh over them, and the launchers that start the ranks.
//!
//! One API, three engines chosen at construction:
//!
//! - **threads** ([`Comm::group`], [`launch`]): ranks are threads of one process, each on
//!   its own Burn device; payloads are moved through a shared mailbox, tensors through
//!   host memory or Burn's `to_device` ([`Transport`]). For tests and one-host runs.
//! - **MPI** (feature `mpi`, [`mpi::launch`]): one rank per process, on one machine or
//!   many, through rsmpi: host buffers, the all-to-all by `MPI_Alltoallv`, every wait
//!   bounded by the group's timeout. Works with every Burn backend.
//! - **NCCL** (feature `nccl`, `Comm::with_nccl`): beside an MPI communicator, the
//!   tensor all-to-all of Burn's CUDA backends between GPUs as one group of
//!   `ncclSend`/`ncclRecv` on the device buffers; everything else stays on MPI. Compiled
//!   in CI; not yet run (no machine here has had two GPUs).
//!
//! Every operation is matched across ranks — collectives by their order, point-to-point
//! messages by source and tag — and fails with a [`CommError`] naming the rank at fault
//! (a rank that left, stalled past the timeout, or called another collective) instead of
//! hanging. Ranks in errors are world ranks, also in a sub-communicator.
//!
//! A [`DeviceMesh`] lays the world over named dimensions (`pp`, `dp`, `ep`, ...) and
//! gives a communicator along each; [`Comm::split`] makes any other sub-group.
//!
//! The differentiable collectives on tensors (all-to-all with uneven splits, all-gather,
//! all-reduce) are burn-moe's `comm` module, built on [`Comm::exchange_tensors`].
//!
//! # Example
//! ```
//! use burn::backend::NdArray;
//! use burn::tensor::Tensor;
//! use burn_comm::{launch, Comm, CommError, Transport};
//!
//! let device = Default::default();
//! let got = launch(Comm::group(2, Transport::Host), |comm| {
//!     // Rank 0 sends a tensor to rank 1 under tag 7; both meet at a barrier.
//!     if comm.rank() == 0 {
//!         let x = Tensor::<NdArray, 1>::from_floats([1.0, 2.0], &device);
//!         comm.send_tensor("activation", 7, 1, x)?;
//!     }
//!     let got = if comm.rank() == 1 { Some(comm.recv_tensor::<NdArray, 1, burn::tensor::Float>("activation", 7, 0, &device)?.into_data()) } else { None };
//!     comm.barrier("done")?;
//!     Ok::<_, CommError>(got)
//! })
//! .unwrap();
//! assert_eq!(got[1].as_ref().unwrap().to_vec::<f32>().unwrap(), [1.0, 2.0]);
//! ```

mod comm;
mod error;
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
mod frame;
mod launch;
mod mesh;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod mpirun;
#[cfg(feature = "nccl")]
mod nccl;
mod threads;

pub use comm::{Comm, Transport, Wire};
pub use error::{CommError, RankError};
pub use launch::{launch, panic_message};
pub use mesh::{DeviceMesh, MeshError};

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::{Int, Tensor};
    use std::time::Duration;

    #[test]
    fn tensors_keep_values_and_dtypes_on_both_transports() {
        for transport in [Transport::Host, Transport::Device] {
            let device = Default::default();
            let out = launch(Comm::group(3, transport), |comm| {
                let me = comm.rank();
                // Rank `me` sends `me * 10 + dst + 1` rows of value `me * 100 + dst`, none to rank 2.
                let parts = (0..3).map(|dst| (dst != 2).then(|| Tensor::<NdArray, 2>::full([me * 10 + dst + 1, 2], (me * 100 + dst) as f32, &device))).collect();
                let got = comm.exchange_tensors("rows", parts, &device)?;
                let ints = (0..3).map(|dst| Some(Tensor::<NdArray, 1, Int>::from_data([(me * 3 + dst) as u32], (&device, burn::tensor::DType::U32)))).collect();
                let ints = comm.exchange_tensors("ints", ints, &device)?;
                let rows: Vec<Option<(usize, f32)>> = got.into_iter().map(|t| t.map(|t| (t.dims()[0], t.into_data().to_vec::<f32>().unwrap()[0]))).collect();
                let ints: Vec<(burn::tensor::DType, u32)> = ints
                    .into_iter()
                    .map(|t| {
                        let d = t.unwrap().into_data();
                        (d.dtype, d.to_vec::<u32>().unwrap()[0])
                    })
                    .collect();
                Ok::<_, CommError>((rows, ints, comm.sent_bytes()))
            })
            .unwrap();
            let (rows, ints, sent) = &out[1];
            assert_eq!(rows, &[Some((2, 1.0)), Some((12, 101.0)), Some((22, 201.0))]);
            assert!(out[2].0.iter().all(Option::is_none));
            assert_eq!(ints.iter().map(|(_, v)| *v).collect::<Vec<_>>(), [1, 4, 7]);
            assert!(ints.iter().all(|(d, _)| *d == burn::tensor::DType::U32));
            // Rank 1 sent 11 rows of 2 f32 to rank 0 and two u32.
            assert_eq!(*sent, 11 * 2 * 4 + 2 * 4);
        }
    }

    #[test]
    fn point_to_point_matches_tags_and_names_stalled_and_failed_ranks() {
        let out = launch(Comm::group(2, Transport::Host), |comm| {
            if comm.rank() == 0 {
                // Out of order: the receiver matches by tag.
                comm.send("msg", 2, 1, vec![2usize])?;
                comm.send("msg", 1, 1, vec![1usize])?;
                Ok::<_, CommError>(vec![])
            } else {
                let a: Vec<usize> = comm.recv("msg", 1, 0)?;
                let b: Vec<usize> = comm.recv("msg", 2, 0)?;
                Ok([a, b].concat())
            }
        })
        .unwrap();
        assert_eq!(out[1], [1, 2]);

        let err = launch(Comm::group_with_timeout(2, Transport::Host, Duration::from_millis(200)), |comm| {
            if comm.rank() == 1 {
                std::thread::sleep(Duration::from_millis(600));
                return Ok(());
            }
            comm.recv::<u32>("msg", 0, 1).map(|_| ())
        })
        .unwrap_err();
        assert!(matches!(&err, CommError::Timeout { rank: 0, missing, .. } if missing == &[1]), "{err}");

        let err = launch(Comm::group(3, Transport::Host), |comm| {
            if comm.rank() == 2 {
                panic!("rank 2 broke");
            }
            comm.barrier("b")
        })
        .unwrap_err();
        assert!(matches!(&err, CommError::RankFailed { rank: 2, reason, .. } if reason.contains("rank 2 broke")), "{err}");
    }

    #[test]
    fn split_groups_run_their_own_collectives_and_report_world_ranks() {
        let out = launch(Comm::group_with_timeout(4, Transport::Host, Duration::from_millis(300)), |comm| {
            let sub = comm.split(comm.rank() % 2, 3 - comm.rank())?;
            let all = sub.all_gather_host("ranks", comm.rank())?;
            // In the odd group, rank 3 (sub rank 0) stalls: rank 1 names world rank 3.
            let err = if comm.rank() == 3 {
                std::thread::sleep(Duration::from_millis(700));
                None
            } else {
                sub.barrier("late").err()
            };
            Ok::<_, CommError>((sub.rank(), all, err))
        })
        .unwrap();
        assert_eq!(out[0].1, [2, 0]);
        assert_eq!(out[3].0, 0);
        assert_eq!(out[1].1, [3, 1]);
        assert!(matches!(&out[1].2, Some(CommError::Timeout { rank: 1, missing, .. }) if missing == &[3]), "{:?}", out[1].2);
        // The even group's barrier had both ranks.
        assert!(out[0].2.is_none() && out[2].2.is_none());
    }

    #[test]
    fn mismatched_collectives_and_part_counts() {
        let err = launch(Comm::group(2, Transport::Host), |comm| if comm.rank() == 0 { comm.barrier("a") } else { comm.barrier("b") }).unwrap_err();
        assert!(matches!(err, CommError::Mismatch { .. }), "{err}");
        let err = launch(Comm::group(2, Transport::Host), |comm| comm.exchange("parts", vec![1u8]).map(|_| ())).unwrap_err();
        assert_eq!(err.to_string(), "rank 0, parts: 1 parts for 2 ranks");
    }
}
