//! Data parallelism for Burn modules over [`burn_comm`] communicators (threads of one
//! process, MPI processes, NCCL between GPUs):
//!
//! - [`Ddp`]: every rank holds the module and its optimizer; gradients are averaged over
//!   the data-parallel ranks after each backward, in buckets of whole parameters.
//! - [`Zero1`]: ZeRO stage 1 around any Burn optimizer — each rank keeps the optimizer
//!   state of its shard of the parameters only, gradients are reduce-scattered and the
//!   updated parameters all-gathered.
//! - [`Fsdp`]: FSDP (ZeRO-3) — a module's parameters held as one flat shard per rank
//!   (so gradients and optimizer state too), gathered for each forward by a
//!   differentiable all-gather whose backward reduce-scatters the gradients; HSDP with
//!   [`Fsdp::hybrid`].
//! - [`AdamWConfig`]: AdamW with its moments stored in BF16 (DeepSeek-V3's recipe: master
//!   weights and gradients f32), or f32.
//!
//! The collectives ([`collective`]) are flat-vector reduce-scatter, all-gather and
//! all-reduce written as all-to-alls, and [`layout`] maps a module's trainable parameters
//! to one flat vector and back. Over a [`burn_comm::DeviceMesh`], pass the `dp`
//! dimension's communicator.
//!
//! Every rank of a data-parallel group builds the same module (same structure; the same
//! initial values, e.g. from one seed or one checkpoint) and trains on its own batch; the
//! steps equal those of one device on the concatenated batch (`tests/dp.rs` checks it on
//! threads and MPI processes). In-process ranks each fork their own replica
//! (`module.fork(&device)`): Burn 0.21 merges the autodiff graphs of tensors that share
//! leaves, and threads working on one merged graph can deadlock.

mod adamw;
pub mod collective;
mod ddp;
mod error;
mod fsdp;
pub mod layout;
pub mod memory;
mod zero;

pub use adamw::{AdamW, AdamWConfig, AdamWState, MomentDType};
pub use ddp::{Ddp, DEFAULT_BUCKET_BYTES};
pub use error::DpError;
pub use fsdp::{Fsdp, FsdpBackend, FsdpRecord, ShardGroup, Shards};
pub use layout::Layout;
pub use zero::Zero1;
