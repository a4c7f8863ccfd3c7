//! burn-fp8 against its ground truths: the host codec and quantizer (bit for bit) and an
//! f64 GEMM of the dequantized operands, on the wgpu runtime (lavapipe on a CPU-only
//! machine: the tests fail, not skip, when no adapter exists) and on the reference backend.
//!
//! Inputs are random values drawn from a seed (the test's name by default, printed);
//! `TEST_SEED=<n>` draws others (tests/support/rng.rs).

mod backends;
mod codec;
mod common;
mod gemm;
mod grouped;
mod linear;
mod quantize;
