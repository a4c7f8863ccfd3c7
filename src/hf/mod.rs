//! Hugging Face interop: DeepSeek-V3 / V2 `config.json` files, by their real field names,
//! turned into this workspace's configs.
//!
//! [`HfDeepSeekConfig`] deserializes the files DeepSeek publishes with its checkpoints
//! (`deepseek-ai/DeepSeek-V3`, `DeepSeek-V2-Lite`, ...); fields the workspace does not use
//! (`quantization_config`, `torch_dtype`, ...) are ignored. [`HfDeepSeekConfig::mla`] and
//! [`HfDeepSeekConfig::moe`] give the attention and MoE configs of its layers,
//! [`HfDeepSeekConfig::model`] the whole model's; [`weights`] loads (and writes) the
//! weights from safetensors files under their Hugging Face key names, [`tokenizer`] reads
//! the `tokenizer.json` beside them, [`HfModel`] all three from a checkpoint folder.
//!
//! # Example
//! ```
//! use burn_deepseek::hf::HfDeepSeekConfig;
//! use burn_moe::{MlaConfig, MoeConfig};
//!
//! let json = r#"{
//!   "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
//!   "num_hidden_layers": 61, "num_attention_heads": 128, "vocab_size": 129280,
//!   "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
//!   "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
//!   "norm_topk_prob": true, "routed_scaling_factor": 2.5, "first_k_dense_replace": 3,
//!   "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
//!   "qk_rope_head_dim": 64, "v_head_dim": 128, "rope_theta": 10000,
//!   "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
//!     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
//!   "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
//!   "num_nextn_predict_layers": 1, "model_type": "deepseek_v3"
//! }"#;
//! let hf = HfDeepSeekConfig::from_json(json).unwrap();
//! let mla = hf.mla().unwrap();
//! assert_eq!((mla.n_heads, mla.kv_lora_rank, mla.qk_head_dim()), (128, 512, 192));
//! let moe = hf.moe().unwrap();
//! assert_eq!(moe.router, MoeConfig::deepseek_v3().router);
//! assert_eq!(hf.dense_layers(), 0..3);
//! ```

mod folder;
pub mod tokenizer;
pub mod weights;

pub use folder::{FolderError, HfModel};

use crate::model::DeepSeekV3Config;
use burn::config::{Config, ConfigError};
use burn_moe::mla::YarnConfig;
use burn_moe::router::{GroupScore, RouterConfig, RouterError, ScoreFn};
use burn_moe::{MlaConfig, MoeConfig};

/// The rotary settings of a DeepSeek `config.json`: `rope_scaling` as DeepSeek's files
/// write it (`"type": "yarn"`), or `rope_parameters` as transformers ≥ 5 writes it
/// (`"rope_type": "yarn"` or `"default"`, with `rope_theta` inside).
#[derive(Clone, Debug, PartialEq, burn::serde::Serialize, burn::serde::Deserialize)]
#[serde(crate = "burn::serde")]
pub struct HfRopeScaling {
    /// `"yarn"` (DeepSeek's `rope_scaling`, field `type`).
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// `"yarn"` or `"default"` (transformers' `rope_parameters`).
    pub rope_type: Option<String>,
    /// Rotary base (transformers' `rope_parameters`).
    pub rope_theta: Option<f64>,
    /// Context extension factor (YaRN).
    pub factor: Option<f64>,
    /// Context the rotary frequencies were trained on (YaRN).
    pub original_max_position_embeddings: Option<usize>,
    /// YaRN's fast boundary (rotations).
    pub beta_fast: Option<f64>,
    /// YaRN's slow boundary (rotations).
    pub beta_slow: Option<f64>,
    /// Amplitude temperature coefficient.
    pub mscale: Option<f64>,
    /// Softmax-scale temperature coefficient.
    pub mscale_all_dim: Option<f64>,
}

/// The fields of a DeepSeek-V2/V3 `config.json` that define the architecture, under
/// their Hugging Face names. Fields the files may omit are `Option`s; the accessors
/// below apply Hugging Face's defaults (`n_group` 1, `topk_method` "greedy",
/// `scoring_func` "softmax", `norm_topk_prob` false, `routed_scaling_factor` 1,
/// `first_k_dense_replace` 0, `rope_theta` 10,000, `rms_norm_eps` 1e-6, no
/// multi-token prediction, untied embeddings), except that `deepseek_v3` files
/// (`model_type`) default to V3's routing (`"sigmoid"`, `"noaux_tc"`), as transformers'
/// `DeepseekV3Config` writes them without `scoring_func`.
#[derive(Config, Debug, PartialEq)]
pub struct HfDeepSeekConfig {
    /// `"deepseek_v3"` or `"deepseek_v2"`.
    pub model_type: Option<String>,
    /// Model width.
    pub hidden_size: usize,
    /// Hidden width of the dense layers' MLP.
    pub intermediate_size: usize,
    /// Hidden width of each routed (and shared) expert.
    pub moe_intermediate_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Routed experts per MoE layer.
    pub n_routed_experts: usize,
    /// Shared experts per MoE layer.
    pub n_shared_experts: usize,
    /// Routed experts per token.
    pub num_experts_per_tok: usize,
    /// Expert groups.
    pub n_group: Option<usize>,
    /// Groups a token may use.
    pub topk_group: Option<usize>,
    /// `"noaux_tc"` (V3: top-2-sum group score, balancing bias), `"group_limited_greedy"`
    /// (V2: group max), `"greedy"` (no groups).
    pub topk_method: Option<String>,
    /// `"sigmoid"` (V3) or `"softmax"` (V2).
    pub scoring_func: Option<String>,
    /// Normalize the selected weights to sum 1.
    pub norm_topk_prob: Option<bool>,
    /// Multiplier of the routing weights.
    pub routed_scaling_factor: Option<f64>,
    /// Leading layers with a dense MLP instead of MoE.
    pub first_k_dense_replace: Option<usize>,
    /// Query compression rank (`null`: full-rank queries).
    pub q_lora_rank: Option<usize>,
    /// Key-value latent rank.
    pub kv_lora_rank: usize,
    /// Per-head query/key dimensions without rotary embedding.
    pub qk_nope_head_dim: usize,
    /// Per-head rotary dimensions.
    pub qk_rope_head_dim: usize,
    /// Per-head value dimensions.
    pub v_head_dim: usize,
    /// Rotary base.
    pub rope_theta: Option<f64>,
    /// YaRN scaling, if any (DeepSeek's files).
    pub rope_scaling: Option<HfRopeScaling>,
    /// The rotary settings as transformers ≥ 5 writes them (read before `rope_scaling`).
    pub rope_parameters: Option<HfRopeScaling>,
    /// Whether the rotary columns of the query and key projections are stored interleaved
    /// in pairs (DeepSeek's layout, transformers' default `true`); `false` is not read.
    pub rope_interleave: Option<bool>,
    /// Longest context.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: Option<f64>,
    /// Multi-token-prediction modules (V3: 1).
    pub num_nextn_predict_layers: Option<usize>,
    /// Whether the output head shares the embedding's weights.
    pub tie_word_embeddings: Option<bool>,
}

impl HfDeepSeekConfig {
    /// Parses the contents of a `config.json` (unused fields ignored).
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        Self::load_binary(json.as_bytes())
    }

    fn is_v3(&self) -> bool {
        self.model_type.as_deref() == Some("deepseek_v3")
    }

    /// The rotary base and the YaRN scaling (`None`: plain rotary embedding).
    fn rope(&self) -> Result<(f64, Option<YarnConfig>), HfError> {
        let (field, rope) = match (&self.rope_parameters, &self.rope_scaling) {
            (Some(p), _) => ("rope_parameters", p),
            (None, Some(s)) => ("rope_scaling", s),
            (None, None) => return Ok((self.rope_theta.unwrap_or(10000.0), None)),
        };
        let theta = rope.rope_theta.or(self.rope_theta).unwrap_or(10000.0);
        let kind = rope.rope_type.as_deref().or(rope.kind.as_deref()).unwrap_or("yarn");
        match kind {
            "default" => return Ok((theta, None)),
            "yarn" => {}
            other => return Err(HfError::Unsupported { field, value: format!("rope type {other}") }),
        }
        let missing = |name: &str| HfError::Unsupported { field, value: format!("yarn without {name}") };
        let yarn = YarnConfig {
            factor: rope.factor.ok_or_else(|| missing("factor"))?,
            original_max_position: rope.original_max_position_embeddings.ok_or_else(|| missing("original_max_position_embeddings"))?,
            beta_fast: rope.beta_fast.unwrap_or(32.0),
            beta_slow: rope.beta_slow.unwrap_or(1.0),
            mscale: rope.mscale.unwrap_or(1.0),
            mscale_all_dim: rope.mscale_all_dim.unwrap_or(0.0),
        };
        Ok((theta, Some(yarn)))
    }

    /// The attention config of every layer, the rotary table covering
    /// `max_position_embeddings`.
    ///
    /// # Errors
    /// A rotary type other than YaRN or the plain one, YaRN without its factor or original
    /// context, or `rope_interleave: false` ([`HfError::Unsupported`]).
    pub fn mla(&self) -> Result<MlaConfig, HfError> {
        if self.rope_interleave == Some(false) {
            return Err(HfError::Unsupported { field: "rope_interleave", value: "false".into() });
        }
        let (theta, yarn) = self.rope()?;
        Ok(MlaConfig::new()
            .with_d_model(self.hidden_size)
            .with_n_heads(self.num_attention_heads)
            .with_q_lora_rank(self.q_lora_rank)
            .with_kv_lora_rank(self.kv_lora_rank)
            .with_qk_nope_head_dim(self.qk_nope_head_dim)
            .with_qk_rope_head_dim(self.qk_rope_head_dim)
            .with_v_head_dim(self.v_head_dim)
            .with_rope_theta(theta)
            .with_rope_scaling(yarn)
            .with_max_seq_len(self.max_position_embeddings)
            .with_norm_eps(self.rms_norm_eps.unwrap_or(1e-6)))
    }

    /// The routing rules, checked.
    ///
    /// # Errors
    /// An unknown `scoring_func` or `topk_method` ([`HfError::Unsupported`]), or rules
    /// that contradict each other ([`HfError::Router`]).
    pub fn router(&self) -> Result<RouterConfig, HfError> {
        let (default_score, default_method) = if self.is_v3() { ("sigmoid", "noaux_tc") } else { ("softmax", "greedy") };
        let score_fn = match self.scoring_func.as_deref().unwrap_or(default_score) {
            "sigmoid" => ScoreFn::Sigmoid,
            "softmax" => ScoreFn::Softmax,
            other => return Err(HfError::Unsupported { field: "scoring_func", value: other.to_string() }),
        };
        let method = self.topk_method.as_deref().unwrap_or(default_method);
        let group_score = match method {
            "noaux_tc" => GroupScore::TopTwoSum,
            "group_limited_greedy" | "greedy" => GroupScore::Max,
            other => return Err(HfError::Unsupported { field: "topk_method", value: other.to_string() }),
        };
        // "greedy" ignores the groups.
        let (n_groups, topk_groups) = if method == "greedy" { (1, 1) } else { (self.n_group.unwrap_or(1), self.topk_group.unwrap_or(1)) };
        let router = RouterConfig {
            n_experts: self.n_routed_experts,
            top_k: self.num_experts_per_tok,
            n_groups,
            topk_groups,
            score_fn,
            group_score,
            normalize: self.norm_topk_prob.unwrap_or(false),
            route_scale: self.routed_scaling_factor.unwrap_or(1.0),
        };
        router.validate().map_err(HfError::Router)?;
        Ok(router)
    }

    /// The config of the MoE layers (after the first `first_k_dense_replace`).
    ///
    /// DeepSeek-V3's routers (`topk_method` `"noaux_tc"`) carry the auxiliary-loss-free
    /// balancing bias (`e_score_correction_bias`); DeepSeek-V2's do not, so for every other
    /// method the bias update speed is 0 and the bias stays zero (the loader then accepts
    /// checkpoints without it).
    pub fn moe(&self) -> Result<MoeConfig, HfError> {
        let moe = MoeConfig::new(self.hidden_size, self.moe_intermediate_size, self.n_shared_experts, self.router()?);
        let method = self.topk_method.as_deref().unwrap_or(if self.is_v3() { "noaux_tc" } else { "greedy" });
        Ok(if method == "noaux_tc" { moe } else { moe.with_bias_update_speed(0.0) })
    }

    /// The layers with a dense MLP (`intermediate_size` wide).
    pub fn dense_layers(&self) -> core::ops::Range<usize> {
        0..self.first_k_dense_replace.unwrap_or(0).min(self.num_hidden_layers)
    }

    /// Multi-token-prediction modules (`num_nextn_predict_layers`; V3: 1).
    pub fn mtp_depth(&self) -> usize {
        self.num_nextn_predict_layers.unwrap_or(0)
    }

    /// The whole model's config, at the file's true shapes (DeepSeek-V3's 671B: build it
    /// on a device with the memory, or count its parameters with
    /// [`DeepSeekV3Config::param_count`]).
    ///
    /// # Errors
    /// As [`HfDeepSeekConfig::mla`] and [`HfDeepSeekConfig::router`]; tied embeddings
    /// ([`HfError::Unsupported`]).
    pub fn model(&self) -> Result<DeepSeekV3Config, HfError> {
        if self.tie_word_embeddings == Some(true) {
            return Err(HfError::Unsupported { field: "tie_word_embeddings", value: "true".into() });
        }
        Ok(DeepSeekV3Config::new(self.vocab_size, self.num_hidden_layers, self.dense_layers().end, self.intermediate_size, self.mla()?, self.moe()?)
            .with_mtp_depth(self.mtp_depth())
            .with_norm_eps(self.rms_norm_eps.unwrap_or(1e-6)))
    }
}

/// Why a `config.json` cannot be used.
#[derive(Clone, Debug, PartialEq)]
pub enum HfError {
    /// A field value this workspace does not implement.
    Unsupported {
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
    },
    /// Routing rules that contradict each other.
    Router(RouterError),
}

impl core::fmt::Display for HfError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            HfError::Unsupported { field, value } => write!(f, "config.json: {field} = {value:?} is not supported"),
            HfError::Router(e) => write!(f, "config.json routing: {e}"),
        }
    }
}

impl std::error::Error for HfError {}

#[cfg(test)]
mod tests {
    use super::*;

    /// DeepSeek-V3's `config.json` (deepseek-ai/DeepSeek-V3), whole: the fields this
    /// workspace does not use must be ignored.
    const V3: &str = r#"{
      "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config", "AutoModel": "modeling_deepseek.DeepseekV3Model"},
      "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
      "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
      "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
      "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
      "n_shared_experts": 1, "norm_topk_prob": true, "num_attention_heads": 128, "num_experts_per_tok": 8,
      "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
      "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
      "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]},
      "rms_norm_eps": 1e-06,
      "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
      "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": true,
      "tie_word_embeddings": false, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
      "transformers_version": "4.46.3", "use_cache": true, "v_head_dim": 128, "vocab_size": 129280
    }"#;

    /// DeepSeek-V2-Lite's `config.json` (deepseek-ai/DeepSeek-V2-Lite): softmax routing
    /// without groups, full-rank queries, no multi-token prediction.
    const V2_LITE: &str = r#"{
      "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
      "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
      "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
      "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
      "n_shared_experts": 2, "norm_topk_prob": false, "num_attention_heads": 16, "num_experts_per_tok": 6,
      "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": null,
      "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
      "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"},
      "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": true,
      "tie_word_embeddings": false, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
      "transformers_version": "4.33.1", "use_cache": true, "v_head_dim": 128, "vocab_size": 102400
    }"#;

    #[test]
    fn v3_config_json_gives_the_v3_presets() {
        let hf = HfDeepSeekConfig::from_json(V3).unwrap();
        let (mla, preset) = (hf.mla().unwrap(), MlaConfig::deepseek_v3());
        assert_eq!(
            (mla.d_model, mla.n_heads, mla.q_lora_rank, mla.kv_lora_rank, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim),
            (preset.d_model, preset.n_heads, preset.q_lora_rank, preset.kv_lora_rank, preset.qk_nope_head_dim, preset.qk_rope_head_dim, preset.v_head_dim)
        );
        assert_eq!(mla.rope_scaling, preset.rope_scaling);
        assert_eq!((mla.rope_theta, mla.norm_eps, mla.max_seq_len), (10000.0, 1e-6, 163840));
        let (moe, preset) = (hf.moe().unwrap(), MoeConfig::deepseek_v3());
        assert_eq!((moe.d_model, moe.d_expert, moe.n_shared_experts, moe.router), (preset.d_model, preset.d_expert, preset.n_shared_experts, preset.router));
        assert_eq!((hf.dense_layers(), hf.intermediate_size, hf.num_hidden_layers), (0..3, 18432, 61));
        assert_eq!((hf.vocab_size, hf.mtp_depth(), hf.tie_word_embeddings), (129280, 1, Some(false)));
    }

    #[test]
    fn v2_lite_config_json() {
        let hf = HfDeepSeekConfig::from_json(V2_LITE).unwrap();
        let mla = hf.mla().unwrap();
        let preset = MlaConfig::deepseek_v2_lite();
        assert_eq!((mla.d_model, mla.n_heads, mla.q_lora_rank, mla.kv_lora_rank), (preset.d_model, preset.n_heads, None, 512));
        assert_eq!(mla.rope_scaling.as_ref().map(|y| (y.mscale, y.mscale_all_dim)), Some((0.707, 0.707)));
        let router = hf.router().unwrap();
        let want =
            RouterConfig { n_experts: 64, top_k: 6, n_groups: 1, topk_groups: 1, score_fn: ScoreFn::Softmax, group_score: GroupScore::Max, normalize: false, route_scale: 1.0 };
        assert_eq!(router, want);
        assert_eq!((hf.moe().unwrap().d_expert, hf.moe().unwrap().n_shared_experts), (1408, 2));
        // V2 has no balancing bias; V3's is updated at DeepSeek-V3's speed.
        assert_eq!(hf.moe().unwrap().bias_update_speed, 0.0);
        assert_eq!(HfDeepSeekConfig::from_json(V3).unwrap().moe().unwrap().bias_update_speed, MoeConfig::deepseek_v3().bias_update_speed);
        assert_eq!((hf.dense_layers(), hf.mtp_depth()), (0..1, 0));
    }

    #[test]
    fn unsupported_and_inconsistent_configs_are_named() {
        let hf = HfDeepSeekConfig::from_json(&V3.replace("\"sigmoid\"", "\"tanh\"")).unwrap();
        assert_eq!(hf.router(), Err(HfError::Unsupported { field: "scoring_func", value: "tanh".into() }));
        let hf = HfDeepSeekConfig::from_json(&V3.replace("\"topk_group\": 4", "\"topk_group\": 9")).unwrap();
        let err = hf.moe().unwrap_err();
        assert!(matches!(err, HfError::Router(RouterError::TopKGroups { topk_groups: 9, n_groups: 8 })), "{err}");
        // A file without a required field fails to parse, naming it.
        let err = HfDeepSeekConfig::from_json(&V3.replace("\"kv_lora_rank\": 512,", "")).unwrap_err();
        assert!(format!("{err:?}").contains("kv_lora_rank"), "{err:?}");
        // Rotary settings that are not read.
        let linear = V3.replace("\"type\": \"yarn\"", "\"type\": \"linear\"");
        assert_eq!(HfDeepSeekConfig::from_json(&linear).unwrap().mla().unwrap_err(), HfError::Unsupported { field: "rope_scaling", value: "rope type linear".into() });
        let halves = V3.replace("\"use_cache\": true", "\"use_cache\": true, \"rope_interleave\": false");
        assert_eq!(HfDeepSeekConfig::from_json(&halves).unwrap().model().unwrap_err(), HfError::Unsupported { field: "rope_interleave", value: "false".into() });
    }

    /// What transformers ≥ 5 writes: `rope_parameters` (with `rope_theta` inside) instead
    /// of `rope_scaling`, and no `scoring_func` for V3.
    #[test]
    fn transformers_5_config_json() {
        let v5 = V3
            .replace("\"rope_scaling\": {\"beta_fast\": 32, \"beta_slow\": 1, \"factor\": 40, \"mscale\": 1.0, \"mscale_all_dim\": 1.0, \"original_max_position_embeddings\": 4096, \"type\": \"yarn\"},", "\"rope_parameters\": {\"beta_fast\": 32, \"beta_slow\": 1, \"factor\": 40, \"mscale\": 1.0, \"mscale_all_dim\": 1.0, \"original_max_position_embeddings\": 4096, \"rope_type\": \"yarn\", \"rope_theta\": 50000},")
            .replace("\"scoring_func\": \"sigmoid\", ", "")
            .replace("\"rope_theta\": 10000, ", "");
        assert!(!v5.contains("scoring_func") && !v5.contains("rope_scaling"), "the replacements matched");
        let hf = HfDeepSeekConfig::from_json(&v5).unwrap();
        let mla = hf.mla().unwrap();
        assert_eq!((mla.rope_theta, mla.rope_scaling), (50000.0, MlaConfig::deepseek_v3().rope_scaling));
        assert_eq!(hf.router().unwrap(), MoeConfig::deepseek_v3().router);
        let plain = v5.replace("\"rope_type\": \"yarn\"", "\"rope_type\": \"default\"");
        assert_eq!(HfDeepSeekConfig::from_json(&plain).unwrap().mla().unwrap().rope_scaling, None);
        // A V2 file keeps V2's defaults.
        let v2 = HfDeepSeekConfig::from_json(&V2_LITE.replace("\"scoring_func\": \"softmax\", ", "").replace("\"topk_method\": \"greedy\", ", "")).unwrap();
        assert_eq!(v2.router().unwrap().score_fn, ScoreFn::Softmax);
    }
}
