//! A Hugging Face `tokenizer.json` (through the `tokenizers` crate) checked against the
//! model it feeds.
//!
//! [`HfTokenizer::open`] refuses a missing file and a tokenizer whose ids do not fit the
//! model's vocabulary; [`HfTokenizer::encode`] and [`HfTokenizer::decode`] go between text
//! and the `u32` token ids of [`Session`](crate::model::Session), and
//! [`HfTokenizer::stream`] turns generated ids into text as they come (a token that ends
//! inside a multi-byte character waits for the next).
//!
//! ```no_run
//! use burn_deepseek::hf::tokenizer::HfTokenizer;
//!
//! let tokenizer = HfTokenizer::open("DeepSeek-V2-Lite/tokenizer.json", 102_400).unwrap();
//! let ids = tokenizer.encode("The capital of France is").unwrap();
//! let mut stream = tokenizer.stream();
//! for &id in &ids {
//!     if let Some(text) = stream.next(id).unwrap() {
//!         print!("{text}");
//!     }
//! }
//! ```

use std::path::{Path, PathBuf};

/// Why a tokenizer cannot be used.
#[derive(Clone, Debug, PartialEq)]
pub enum TokenizerError {
    /// No file at the path.
    Missing {
        /// The path looked at.
        path: PathBuf,
    },
    /// The file is not a tokenizer the `tokenizers` crate reads.
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The tokenizer's ids do not fit the model: more tokens than the embedding has rows,
    /// or so few that it belongs to another model (checkpoints pad their vocabulary by a
    /// few percent at most: DeepSeek-V3's 128,815 tokens in 129,280 rows, V2's 100,015 in
    /// 102,400).
    Vocabulary {
        /// Tokens of the tokenizer, added tokens included.
        tokenizer: usize,
        /// Rows of the model's embedding.
        model: usize,
    },
    /// Encoding or decoding failed.
    Codec(String),
}

impl core::fmt::Display for TokenizerError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Missing { path } => write!(f, "no tokenizer at {}", path.display()),
            Self::File { path, reason } => write!(f, "{}: {reason}", path.display()),
            Self::Vocabulary { tokenizer, model } => write!(f, "the tokenizer has {tokenizer} tokens, the model's vocabulary {model}: the tokenizer belongs to another model"),
            Self::Codec(reason) => write!(f, "tokenizer: {reason}"),
        }
    }
}

impl std::error::Error for TokenizerError {}

/// A tokenizer whose ids index the model's vocabulary. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
}

/// The smallest share of the model's vocabulary a tokenizer must cover.
const MIN_COVERAGE: f64 = 0.9;

impl HfTokenizer {
    /// Reads `path` (a `tokenizer.json`) for a model of `vocab_size` tokens.
    ///
    /// # Errors
    /// [`TokenizerError::Missing`], [`TokenizerError::File`], or
    /// [`TokenizerError::Vocabulary`] when the tokenizer has more tokens than `vocab_size`
    /// or fewer than 90% of it.
    pub fn open(path: impl AsRef<Path>, vocab_size: usize) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(TokenizerError::Missing { path: path.to_path_buf() });
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizerError::File { path: path.to_path_buf(), reason: e.to_string() })?;
        let tokens = inner.get_vocab_size(true);
        if tokens > vocab_size || (tokens as f64) < MIN_COVERAGE * vocab_size as f64 {
            return Err(TokenizerError::Vocabulary { tokenizer: tokens, model: vocab_size });
        }
        Ok(Self { inner })
    }

    /// Tokens of the tokenizer, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token given by its text (e.g. `"<｜end▁of▁sentence｜>"`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The ids of `text`, with the special tokens the tokenizer adds (DeepSeek's BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.inner.encode(text, true).map(|e| e.get_ids().to_vec()).map_err(|e| TokenizerError::Codec(e.to_string()))
    }

    /// The text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, true).map_err(|e| TokenizerError::Codec(e.to_string()))
    }

    /// Incremental decoding of generated ids (special tokens skipped).
    pub fn stream(&self) -> TextStream<'_> {
        TextStream { inner: self.inner.decode_stream(true) }
    }
}

/// Text of ids as they are generated: [`TextStream::next`] returns what the new id adds
/// (the `tokenizers` crate's `DecodeStream`, which re-decodes only a window of recent
/// ids, so decoders that join tokens give the text [`HfTokenizer::decode`] gives).
pub struct TextStream<'a> {
    inner: tokenizers::DecodeStream<
        'a,
        tokenizers::ModelWrapper,
        tokenizers::NormalizerWrapper,
        tokenizers::PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    >,
}

impl TextStream<'_> {
    /// Appends `id`; returns the text it completes (`None` while it ends inside a
    /// character that the next ids finish).
    pub fn next(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        self.inner.step(id).map_err(|e| TokenizerError::Codec(e.to_string()))
    }
}
