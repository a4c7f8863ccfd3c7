//! # burn-moe (in progress)
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
//! Nothing is exported yet: the workspace's open issues track each of these.
