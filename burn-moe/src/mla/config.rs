//! [`MlaConfig`]: the dimensions of Multi-head Latent Attention, with DeepSeek-V3's
//! values as defaults and a tiny preset.

use super::rope::{yarn_mscale, RotaryTable, YarnConfig};
use super::Mla;
use burn::config::Config;
use burn::nn::{Initializer, LinearConfig, RmsNormConfig};
use burn::tensor::backend::Backend;

/// Multi-head Latent Attention (DeepSeek-V2/V3).
///
/// Queries: `x → W_DQ → RMSNorm → W_UQ` (low rank, `q_lora_rank`) or `x → W_Q` (`None`,
/// as in V2-Lite), split per head into a `qk_nope_head_dim` part and a
/// `qk_rope_head_dim` part that gets the rotary embedding. Keys and values: `x → W_DKV`
/// gives the `kv_lora_rank` latent `c_kv` (RMS-normalised) and one rotary key `k_rope`
/// shared by all heads; `W_UKV` expands `c_kv` into per-head `k_nope` and `v`. Only
/// `c_kv` and `k_rope` are cached.
#[derive(Config, Debug)]
pub struct MlaConfig {
    /// Model width.
    #[config(default = 7168)]
    pub d_model: usize,
    /// Attention heads.
    #[config(default = 128)]
    pub n_heads: usize,
    /// Rank of the query compression; `None`: a full-rank query projection.
    #[config(default = "Some(1536)")]
    pub q_lora_rank: Option<usize>,
    /// Rank of the key-value latent (the cached `c_kv`).
    #[config(default = 512)]
    pub kv_lora_rank: usize,
    /// Per-head query/key dimensions without rotary embedding.
    #[config(default = 128)]
    pub qk_nope_head_dim: usize,
    /// Per-head query dimensions, and the shared key's, with rotary embedding.
    #[config(default = 64)]
    pub qk_rope_head_dim: usize,
    /// Per-head value dimensions.
    #[config(default = 128)]
    pub v_head_dim: usize,
    /// Rotary base.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    /// YaRN scaling; `None`: plain rotary embedding.
    #[config(default = "Some(YarnConfig::new())")]
    pub rope_scaling: Option<YarnConfig>,
    /// Positions the rotary table covers.
    #[config(default = 4096)]
    pub max_seq_len: usize,
    /// RMSNorm epsilon of the latents.
    #[config(default = 1e-6)]
    pub norm_eps: f64,
    /// Standard deviation of the projections' normal initialisation (DeepSeek-V3: 0.006).
    #[config(default = 0.006)]
    pub init_std: f64,
}

impl MlaConfig {
    /// DeepSeek-V3's attention (the defaults).
    pub fn deepseek_v3() -> Self {
        Self::new()
    }

    /// DeepSeek-V2-Lite's: no query compression, 16 heads of width 2,048.
    pub fn deepseek_v2_lite() -> Self {
        Self::new().with_d_model(2048).with_n_heads(16).with_q_lora_rank(None)
    }

    /// A small model with the same structure: width 64, 4 heads, latent 32, head dims
    /// 16/8/16, query rank 48, no rope scaling, 256 positions.
    pub fn tiny() -> Self {
        Self::new()
            .with_d_model(64)
            .with_n_heads(4)
            .with_q_lora_rank(Some(48))
            .with_kv_lora_rank(32)
            .with_qk_nope_head_dim(16)
            .with_qk_rope_head_dim(8)
            .with_v_head_dim(16)
            .with_rope_scaling(None)
            .with_max_seq_len(256)
            .with_init_std(0.05)
    }

    /// Per-head query/key width, `nope + rope`.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Values cached per token per layer: `kv_lora_rank + qk_rope_head_dim` (576 at V3).
    pub fn cache_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    /// The softmax scale: `qk_head_dim^-½`, times `mscale²` under YaRN.
    pub fn softmax_scale(&self) -> f64 {
        let base = (self.qk_head_dim() as f64).powf(-0.5);
        match &self.rope_scaling {
            Some(y) => {
                let m = yarn_mscale(y.factor, y.mscale_all_dim);
                base * m * m
            }
            None => base,
        }
    }

    /// Builds the module on `device`.
    ///
    /// # Panics
    /// When a dimension is zero or the rotary dimension is odd, naming it.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Mla<B> {
        for (name, v) in [
            ("d_model", self.d_model),
            ("n_heads", self.n_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("max_seq_len", self.max_seq_len),
        ] {
            assert!(v > 0, "MlaConfig: {name} must be positive, got 0");
        }
        assert!(self.qk_rope_head_dim.is_multiple_of(2), "MlaConfig: qk_rope_head_dim must be even, got {}", self.qk_rope_head_dim);
        assert!(self.q_lora_rank != Some(0), "MlaConfig: q_lora_rank must be positive or None, got Some(0)");
        let init = Initializer::Normal { mean: 0.0, std: self.init_std };
        let linear = |i: usize, o: usize| LinearConfig::new(i, o).with_bias(false).with_initializer(init.clone()).init(device);
        let h = self.n_heads;
        let (wq_a, q_norm, wq_b) = match self.q_lora_rank {
            Some(r) => (Some(linear(self.d_model, r)), Some(RmsNormConfig::new(r).with_epsilon(self.norm_eps).init(device)), linear(r, h * self.qk_head_dim())),
            None => (None, None, linear(self.d_model, h * self.qk_head_dim())),
        };
        Mla {
            wq_a,
            q_norm,
            wq_b,
            wkv_a: linear(self.d_model, self.cache_width()),
            kv_norm: RmsNormConfig::new(self.kv_lora_rank).with_epsilon(self.norm_eps).init(device),
            wkv_b: linear(self.kv_lora_rank, h * (self.qk_nope_head_dim + self.v_head_dim)),
            wo: linear(h * self.v_head_dim, self.d_model),
            rope: RotaryTable::new(self.qk_rope_head_dim, self.rope_theta, self.rope_scaling.as_ref(), self.max_seq_len),
            n_heads: h,
            kv_lora_rank: self.kv_lora_rank,
            qk_nope_head_dim: self.qk_nope_head_dim,
            qk_rope_head_dim: self.qk_rope_head_dim,
            v_head_dim: self.v_head_dim,
            scale: self.softmax_scale(),
        }
    }
}
