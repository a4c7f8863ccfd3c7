//! burn-fp8 against its ground truths: the host codec and quantizer (bit for bit) and an
//! f64 GEMM of the dequantized operands, on the wgpu runtime (lavapipe on a CPU-only
//! machine: the tests fail, not skip, when no adapter exists) and on the reference backend.
//!
//! Inputs are fresh random values each run; the seed is printed and `FP8_TEST_SEED=<n>`
//! replays a run.

mod backends;
mod codec;
mod common;
mod gemm;
mod grouped;
mod linear;
mod quantize;
