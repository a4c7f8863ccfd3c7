//! # burn-moe (in progress)
//!
//! Available now: [`router`], DeepSeekMoE routing (sigmoid or softmax scores,
//! group-limited top-k, the balancing bias and its update, per-expert counts), in plain
//! Burn tensor ops on any backend, with a naive host reference.
//!
//! This crate will hold DeepSeek-V3's mixture-of-experts and attention layers for Burn:
//!
//! - the DeepSeekMoE layer: sigmoid/softmax routing with group-limited top-k and the
//!   auxiliary-loss-free balancing bias, token dispatch and combine kernels, and a grouped
//!   expert GEMM (f32 and FP8 through `burn-fp8`);
//! - Multi-head Latent Attention with a compressed, paged KV cache and an absorbed decode
//!   kernel;
//! - expert parallelism over several devices with FP8 dispatch and expert-parallel load
//!   balancing.
//!
//! The workspace's open issues track each of these.
#![warn(missing_docs)]

pub mod router;
