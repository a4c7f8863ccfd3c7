//! A Hugging Face checkpoint folder as DeepSeek publishes it (and `save_pretrained`
//! writes it): `config.json`, the weights in one or more `*.safetensors` files, and
//! `tokenizer.json`.

use super::tokenizer::{HfTokenizer, TokenizerError};
use super::weights::{load_safetensors, LoadReport, WeightsError};
use super::{HfDeepSeekConfig, HfError};
use crate::model::{DeepSeekV3, DeepSeekV3Config};
use burn::tensor::backend::Backend;
use std::path::{Path, PathBuf};

/// Why a checkpoint folder cannot be opened.
#[derive(Clone, Debug, PartialEq)]
pub enum FolderError {
    /// A file could not be read or parsed (`config.json`, the folder listing).
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The folder has no `*.safetensors` file.
    NoWeights {
        /// The folder.
        folder: PathBuf,
    },
    /// `config.json` describes what is not implemented.
    Config(HfError),
    /// The weights do not fit the config.
    Weights(WeightsError),
    /// `tokenizer.json` is missing or does not fit the model.
    Tokenizer(TokenizerError),
}

impl core::fmt::Display for FolderError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::File { path, reason } => write!(f, "{}: {reason}", path.display()),
            Self::NoWeights { folder } => write!(f, "{}: no .safetensors file", folder.display()),
            Self::Config(e) => write!(f, "{e}"),
            Self::Weights(e) => write!(f, "weights: {e}"),
            Self::Tokenizer(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for FolderError {}

/// A model loaded from a checkpoint folder, with its tokenizer.
///
/// ```no_run
/// use burn::backend::Flex;
/// use burn_deepseek::hf::HfModel;
/// use burn_deepseek::model::{Sampling, Session};
///
/// let hf = HfModel::<Flex>::open("DeepSeek-V2-Lite", &Default::default()).unwrap();
/// let prompt = hf.tokenizer.encode("The capital of France is").unwrap();
/// let mut session = Session::new(&hf.model, &hf.config.mla, 256, Sampling::greedy(), &Default::default());
/// let ids = session.generate_until(&prompt, 32, &hf.eos, |_| {}).unwrap();
/// println!("{}", hf.tokenizer.decode(&ids).unwrap());
/// ```
pub struct HfModel<B: Backend> {
    /// The model's config, from `config.json`.
    pub config: DeepSeekV3Config,
    /// The model with the folder's weights.
    pub model: DeepSeekV3<B>,
    /// The tokenizer, checked against the vocabulary.
    pub tokenizer: HfTokenizer,
    /// The end-of-sequence ids (`eos_token_id` of `config.json`, a number or a list).
    pub eos: Vec<u32>,
    /// What the weights' load did.
    pub report: LoadReport,
}

impl<B: Backend> HfModel<B> {
    /// Opens `folder` on `device`: the config first, then the tokenizer (both cheap, so a
    /// wrong folder fails before the weights are read), then the weights of every
    /// `*.safetensors` file.
    ///
    /// # Errors
    /// A [`FolderError`] naming the file and the value.
    pub fn open(folder: impl AsRef<Path>, device: &B::Device) -> Result<Self, FolderError> {
        let folder = folder.as_ref();
        let config_path = folder.join("config.json");
        let file_err = |path: &Path, reason: String| FolderError::File { path: path.to_path_buf(), reason };
        let json = std::fs::read_to_string(&config_path).map_err(|e| file_err(&config_path, e.to_string()))?;
        let hf = HfDeepSeekConfig::from_json(&json).map_err(|e| file_err(&config_path, e.to_string()))?;
        let config = hf.model().map_err(FolderError::Config)?;
        let eos = eos_ids(&json).map_err(|reason| file_err(&config_path, reason))?;
        let tokenizer = HfTokenizer::open(folder.join("tokenizer.json"), config.vocab_size).map_err(FolderError::Tokenizer)?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
            .map_err(|e| file_err(folder, e.to_string()))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        if files.is_empty() {
            return Err(FolderError::NoWeights { folder: folder.to_path_buf() });
        }
        files.sort();
        let (model, report) = load_safetensors(config.init::<B>(device), &config, &files).map_err(FolderError::Weights)?;
        Ok(Self { config, model, tokenizer, eos, report })
    }
}

/// `eos_token_id` of a `config.json`: absent, a number or a list of numbers.
fn eos_ids(json: &str) -> Result<Vec<u32>, String> {
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let id = |v: &serde_json::Value| v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| format!("eos_token_id {v} is not a token id"));
    match value.get("eos_token_id") {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(ids)) => ids.iter().map(id).collect(),
        Some(v) => Ok(vec![id(v)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::eos_ids;

    #[test]
    fn eos_token_id_forms() {
        assert_eq!(eos_ids(r#"{"eos_token_id": 1}"#), Ok(vec![1]));
        assert_eq!(eos_ids(r#"{"eos_token_id": [1, 7]}"#), Ok(vec![1, 7]));
        assert_eq!(eos_ids(r#"{"eos_token_id": null}"#), Ok(vec![]));
        assert_eq!(eos_ids(r#"{}"#), Ok(vec![]));
        assert!(eos_ids(r#"{"eos_token_id": -1}"#).unwrap_err().contains("-1"));
    }
}
