//! # burn-dualpipe (in progress)
//!
//! This crate will hold pipeline parallelism over Burn's autodiff: DualPipe, DualPipeV,
//! 1F1B and ZB1P schedules generated as data, a validator and a cost simulator for them, and
//! one executor that runs any schedule over several Burn devices, with the backward split
//! into input-gradient and deferred weight-gradient steps (as `burn-fp8`'s FP8 layers
//! provide).
//!
//! Nothing is exported yet: the workspace's open issues track it.
