//! [`DeepSeekV3Config`]: the whole model's shape, with DeepSeek-V3's values as a preset, a
//! tiny preset for a CPU, and the checks that name a wrong combination.

use super::block::{Block, Ffn};
use super::mtp::MtpModule;
use super::DeepSeekV3;
use burn::config::Config;
use burn::nn::{EmbeddingConfig, Initializer, LinearConfig, RmsNormConfig};
use burn::tensor::backend::Backend;
use burn_fp8::linear::Fp8Recipe;
use burn_moe::router::{RouterConfig, RouterError};
use burn_moe::{MlaConfig, MoeConfig};

/// A DeepSeek-V3-shaped decoder: token embedding, `n_layers` blocks of RMSNorm → MLA →
/// RMSNorm → MLP (a dense SwiGLU for the first `n_dense_layers`, the DeepSeekMoE layer
/// after), a final RMSNorm and an output head, plus `mtp_depth` multi-token-prediction
/// modules sharing the embedding and the head.
///
/// Presets: [`DeepSeekV3Config::deepseek_v3`] (the 671B model, for shapes and parameter
/// counts), [`DeepSeekV3Config::tiny`] (a byte-level model that trains on a CPU).
/// [`crate::hf::HfDeepSeekConfig::model`] builds one from a Hugging Face `config.json`.
#[derive(Config, Debug)]
pub struct DeepSeekV3Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Transformer blocks of the main model.
    pub n_layers: usize,
    /// Leading blocks with a dense MLP instead of MoE (`first_k_dense_replace`).
    pub n_dense_layers: usize,
    /// Hidden width of the dense MLP (`intermediate_size`).
    pub d_ffn: usize,
    /// The attention of every block; its `d_model` is the model width.
    pub mla: MlaConfig,
    /// The MoE layer of every block after the dense ones (and of the MTP modules).
    pub moe: MoeConfig,
    /// Multi-token-prediction depth `D` (DeepSeek-V3: 1; 0: none).
    #[config(default = 1)]
    pub mtp_depth: usize,
    /// Weight `λ` of the MTP loss, `λ / D · Σ_k L_k` (DeepSeek-V3: 0.3, then 0.1 for the
    /// last 4.8T tokens).
    #[config(default = 0.3)]
    pub mtp_loss_weight: f64,
    /// RMSNorm epsilon of the blocks and the final norm.
    #[config(default = 1e-6)]
    pub norm_eps: f64,
    /// Standard deviation of the normal initialization of the embedding, head and dense
    /// MLPs (DeepSeek-V3: 0.006).
    #[config(default = 0.006)]
    pub init_std: f64,
    /// FP8 recipe of the dense MLPs' `Fp8Linear`s and the routed experts' grouped GEMMs
    /// (`Some(Fp8Recipe::deepseek_v3())`); `None` keeps every GEMM in f32. Embedding,
    /// attention, router, shared experts, norms and head stay in f32.
    #[config(default = "None")]
    pub fp8: Option<Fp8Recipe>,
}

impl DeepSeekV3Config {
    /// DeepSeek-V3 (671B total, 37B active): 61 layers of width 7,168, the first 3 dense
    /// (MLP 18,432), then 256 routed experts + 1 shared, MTP depth 1 with λ = 0.3,
    /// vocabulary 129,280.
    pub fn deepseek_v3() -> Self {
        Self::new(129_280, 61, 3, 18_432, MlaConfig::deepseek_v3(), MoeConfig::deepseek_v3())
    }

    /// A byte-level model with DeepSeek-V3's structure that trains on a CPU: vocabulary
    /// 256 (bytes), width 64, 3 layers (the first dense, MLP 128), [`MlaConfig::tiny`],
    /// [`MoeConfig::tiny`] (16 experts, top-4 of 2/4 groups, 1 shared), MTP depth 1,
    /// init std 0.05.
    pub fn tiny() -> Self {
        let mla = MlaConfig::tiny();
        let moe = MoeConfig::tiny().with_init_std(0.05);
        Self::new(256, 3, 1, 128, mla, moe).with_init_std(0.05)
    }

    /// The model width (`mla.d_model`).
    pub fn d_model(&self) -> usize {
        self.mla.d_model
    }

    /// The same model with every routing and FP8 setting of `self`, scaled to `d_model`:
    /// attention heads of the same sizes, `d_ffn` and the experts' width kept.
    pub fn with_width(mut self, d_model: usize) -> Self {
        self.mla.d_model = d_model;
        self.moe.d_model = d_model;
        self
    }

    /// The same model with `fp8` in the dense MLPs and the routed experts.
    pub fn with_fp8_everywhere(mut self, fp8: Option<Fp8Recipe>) -> Self {
        self.fp8 = fp8;
        self.moe.fp8 = fp8;
        self
    }

    /// Parameters of the model, counted from the shapes (the MTP modules included; the
    /// head counted once).
    pub fn param_count(&self) -> usize {
        let d = self.d_model();
        let m = &self.mla;
        let h = m.n_heads;
        let q = match m.q_lora_rank {
            Some(r) => d * r + r + r * h * m.qk_head_dim(),
            None => d * h * m.qk_head_dim(),
        };
        let attn = q + d * m.cache_width() + m.kv_lora_rank + m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim) + h * m.v_head_dim * d;
        let e = self.moe.router.n_experts;
        let moe = d * e + e + 3 * d * self.moe.d_expert * (e + self.moe.n_shared_experts);
        let dense = 3 * d * self.d_ffn;
        let block = |is_moe: bool| 2 * d + attn + if is_moe { moe } else { dense };
        let blocks: usize = (0..self.n_layers).map(|i| block(i >= self.n_dense_layers)).sum();
        let mtp = self.mtp_depth * (3 * d + 2 * d * d + block(self.n_dense_layers < self.n_layers));
        2 * self.vocab_size * d + d + blocks + mtp
    }

    /// Checks that the parts fit together.
    ///
    /// # Errors
    /// [`ConfigError`], naming the values: a zero size, MLA and MoE widths that differ,
    /// more dense layers than layers, or routing rules that contradict each other.
    ///
    /// ```
    /// use burn_deepseek::model::{ConfigError, DeepSeekV3Config};
    ///
    /// let mut config = DeepSeekV3Config::tiny();
    /// assert_eq!(config.validate(), Ok(()));
    /// config.n_dense_layers = config.n_layers + 1;
    /// assert_eq!(config.validate(), Err(ConfigError::DenseLayers { n_dense_layers: config.n_layers + 1, n_layers: config.n_layers }));
    /// ```
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, v) in [("vocab_size", self.vocab_size), ("n_layers", self.n_layers), ("d_ffn", self.d_ffn)] {
            if v == 0 {
                return Err(ConfigError::Zero { field });
            }
        }
        if self.moe.d_model != self.mla.d_model {
            return Err(ConfigError::Width { moe: self.moe.d_model, mla: self.mla.d_model });
        }
        if self.n_dense_layers > self.n_layers {
            return Err(ConfigError::DenseLayers { n_dense_layers: self.n_dense_layers, n_layers: self.n_layers });
        }
        RouterConfig::validate(&self.moe.router).map_err(ConfigError::Router)
    }

    /// Builds the model on `device`.
    ///
    /// # Panics
    /// When [`DeepSeekV3Config::validate`] fails, with its message.
    pub fn init<B: Backend>(&self, device: &B::Device) -> DeepSeekV3<B> {
        self.validate().unwrap_or_else(|e| panic!("{e}"));
        let d = self.d_model();
        let init = Initializer::Normal { mean: 0.0, std: self.init_std };
        let norm = || RmsNormConfig::new(d).with_epsilon(self.norm_eps).init(device);
        let last_is_moe = self.n_dense_layers < self.n_layers;
        DeepSeekV3 {
            embed: EmbeddingConfig::new(self.vocab_size, d).with_initializer(init.clone()).init(device),
            layers: (0..self.n_layers).map(|i| self.block(i >= self.n_dense_layers, device)).collect(),
            norm: norm(),
            head: LinearConfig::new(d, self.vocab_size).with_bias(false).with_initializer(init.clone()).init(device),
            mtp: (0..self.mtp_depth)
                .map(|_| MtpModule {
                    hnorm: norm(),
                    enorm: norm(),
                    eh_proj: LinearConfig::new(2 * d, d).with_bias(false).with_initializer(init.clone()).init(device),
                    block: self.block(last_is_moe, device),
                    norm: norm(),
                })
                .collect(),
            mtp_loss_weight: self.mtp_loss_weight,
        }
    }

    fn block<B: Backend>(&self, moe: bool, device: &B::Device) -> Block<B> {
        let d = self.d_model();
        let norm = || RmsNormConfig::new(d).with_epsilon(self.norm_eps).init(device);
        let ffn = if moe { Ffn::Moe(self.moe.init(device)) } else { Ffn::Dense(super::block::dense_mlp(d, self.d_ffn, self.init_std, self.fp8, device)) };
        Block { attn_norm: norm(), attn: self.mla.init(device), ffn_norm: norm(), ffn }
    }
}

/// Why a [`DeepSeekV3Config`] does not describe a model.
#[derive(Clone, Debug, PartialEq)]
pub enum ConfigError {
    /// A size that must be positive is 0.
    Zero {
        /// The field.
        field: &'static str,
    },
    /// The MoE layer and MLA disagree on the model width.
    Width {
        /// `moe.d_model`.
        moe: usize,
        /// `mla.d_model`.
        mla: usize,
    },
    /// More dense layers than layers.
    DenseLayers {
        /// `n_dense_layers`.
        n_dense_layers: usize,
        /// `n_layers`.
        n_layers: usize,
    },
    /// Routing rules that contradict each other.
    Router(RouterError),
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Zero { field } => write!(f, "DeepSeekV3Config: {field} must be positive, got 0"),
            Self::Width { moe, mla } => write!(f, "DeepSeekV3Config: moe.d_model {moe} differs from mla.d_model {mla}"),
            Self::DenseLayers { n_dense_layers, n_layers } => write!(f, "DeepSeekV3Config: n_dense_layers {n_dense_layers} exceeds n_layers {n_layers}"),
            Self::Router(e) => write!(f, "DeepSeekV3Config: {e}"),
        }
    }
}

impl std::error::Error for ConfigError {}
