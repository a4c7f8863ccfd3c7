//! Speculative decoding with the multi-token-prediction module (DeepSeek-V3 §5.4.3):
//! the first MTP depth drafts the token after next, and the main model verifies the
//! draft in its next step, which feeds two positions — the token just drawn and the
//! draft — at the cost of about one. An accepted draft gives two tokens per main-model
//! step; a rejected one is dropped from the caches, and the main model's own choice is
//! the step's token. Greedy only: the tokens are those of greedy decoding
//! ([`Session::generate`] with [`Sampling::greedy`](super::Sampling::greedy)).
//!
//! Per step: one main-model forward of two rows (one at the last step), one MTP forward
//! of the one or two positions the step confirmed, and two host reads the algorithm
//! needs (the main model's two rows of logits, to verify; the MTP's last row, to draft).

use super::generate::{greedy, last_row, Session, SEQ};
use super::DeepSeekV3;
use super::ModelBackend;
use burn::tensor::Tensor;
use burn_moe::mla::{CacheError, LatentCache, MlaConfig};

/// Why speculative decoding could not start or go on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpeculativeError {
    /// The model has no MTP module to draft with (`mtp_depth` 0): decode with a
    /// [`Session`].
    NoMtp,
    /// The caches refused the tokens (checked before anything is fed).
    Cache(CacheError),
}

impl core::fmt::Display for SpeculativeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoMtp => write!(f, "speculative decoding drafts with the first MTP module, and the model has none (mtp_depth 0)"),
            Self::Cache(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for SpeculativeError {}

impl From<CacheError> for SpeculativeError {
    fn from(e: CacheError) -> Self {
        Self::Cache(e)
    }
}

/// Counts of a [`Speculative`] session's drafts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpeculativeStats {
    /// Main-model forwards after the prompt's.
    pub steps: usize,
    /// Drafts verified.
    pub drafted: usize,
    /// Drafts the main model agreed with.
    pub accepted: usize,
}

impl SpeculativeStats {
    /// `accepted / drafted` (0 before the first draft).
    pub fn acceptance(&self) -> f64 {
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
    }
}

/// One sequence decoded greedily with MTP drafts: a [`Session`]'s caches for the main
/// model and one more for the first MTP module's block.
///
/// ```
/// use burn::backend::NdArray;
/// use burn_deepseek::model::{DeepSeekV3Config, Sampling, Session, Speculative};
///
/// let device = Default::default();
/// let config = DeepSeekV3Config::tiny(); // one MTP depth
/// let model = config.init::<NdArray>(&device);
/// let prompt: Vec<u32> = b"Phileas Fogg".iter().map(|&b| b as u32).collect();
///
/// let mut fast = Speculative::new(&model, &config.mla, prompt.len() + 16, &device).unwrap();
/// let tokens = fast.generate(&prompt, 16).unwrap();
/// let plain = Session::new(&model, &config.mla, prompt.len() + 16, Sampling::greedy(), &device).generate(&prompt, 16).unwrap();
/// assert_eq!(tokens, plain);
/// let stats = fast.stats();
/// assert!(stats.accepted <= stats.drafted && stats.steps <= 15);
/// ```
pub struct Speculative<'a, B: ModelBackend> {
    session: Session<'a, B>,
    mtp_cache: LatentCache<B>,
    stats: SpeculativeStats,
}

impl<'a, B: ModelBackend> Speculative<'a, B> {
    /// A session for `capacity` tokens (prompt and generated), as [`Session::new`].
    ///
    /// # Errors
    /// [`SpeculativeError::NoMtp`] when the model has no MTP module.
    ///
    /// # Panics
    /// As [`Session::new`], when the model's experts are sharded.
    pub fn new(model: &'a DeepSeekV3<B>, mla: &MlaConfig, capacity: usize, device: &B::Device) -> Result<Self, SpeculativeError> {
        if model.mtp.is_empty() {
            return Err(SpeculativeError::NoMtp);
        }
        let session = Session::new(model, mla, capacity, super::Sampling::greedy(), device);
        let mut mtp_cache = LatentCache::new(mla, session.pages(), device);
        mtp_cache.add_sequence(SEQ)?;
        Ok(Self { session, mtp_cache, stats: SpeculativeStats::default() })
    }

    /// The drafts so far.
    pub fn stats(&self) -> SpeculativeStats {
        self.stats
    }

    /// Feeds `prompt`, then draws `n` tokens greedily; returns them.
    ///
    /// # Errors
    /// As [`Speculative::generate_until`].
    pub fn generate(&mut self, prompt: &[u32], n: usize) -> Result<Vec<u32>, SpeculativeError> {
        self.generate_until(prompt, n, &[], |_| {})
    }

    /// Feeds `prompt`, then draws up to `n` tokens greedily, handing each to `each` as
    /// soon as it is known, and stops after a token of `stop`; returns the drawn tokens,
    /// the stop token included. They are the tokens of [`Session::generate_until`] with
    /// greedy sampling.
    ///
    /// # Errors
    /// [`CacheError::TooLong`] or [`CacheError::Full`] (as [`SpeculativeError::Cache`])
    /// when the prompt and `n` tokens do not fit, checked before anything is fed: a draft
    /// takes no room beyond that.
    ///
    /// # Panics
    /// When the prompt is empty, or the session already holds a sequence.
    pub fn generate_until(&mut self, prompt: &[u32], n: usize, stop: &[u32], mut each: impl FnMut(u32)) -> Result<Vec<u32>, SpeculativeError> {
        assert!(!prompt.is_empty(), "Speculative::generate: the prompt is empty");
        assert!(self.session.is_empty(), "Speculative::generate: the session already holds {} tokens", self.session.len());
        // The last drawn token is not fed, and a draft is fed only while two tokens are
        // still to come: the caches never hold more than the plain session's.
        self.session.check_room(prompt.len() + n.saturating_sub(1))?;
        let mut out = Vec::with_capacity(n);
        if n == 0 {
            return Ok(out);
        }
        let mut emit = |token: u32, out: &mut Vec<u32>| {
            out.push(token);
            each(token);
            stop.contains(&token) || out.len() == n
        };
        let (model, device) = (self.session.model, self.session.device.clone());
        let fed = model.cached(prompt, &vec![SEQ; prompt.len()], &mut self.session.caches, &device)?;
        // Host read the algorithm needs: the first token decides what the MTP reads.
        let first = greedy(&last_row(&fed.logits, prompt.len() - 1));
        if emit(first, &mut out) {
            return Ok(out);
        }
        // The MTP reads position i's hidden state with the token after it.
        let next: Vec<u32> = prompt[1..].iter().copied().chain([first]).collect();
        let mut draft = self.draft(fed.hidden, &next, n - out.len())?;
        while let Some(d) = draft {
            let last = *out.last().expect("a token was drawn");
            let fed = model.cached(&[last, d], &[SEQ, SEQ], &mut self.session.caches, &device)?;
            self.stats.steps += 1;
            self.stats.drafted += 1;
            // Host read the algorithm needs: the verification of the draft (one read of
            // both rows).
            let rows = fed.logits.into_data().convert::<f32>().into_vec::<f32>().expect("f32 logits");
            let (first_row, second_row) = rows.split_at(rows.len() / 2);
            let verified = greedy(first_row);
            let hidden = fed.hidden;
            // The positions this step confirmed, with the token after each.
            let (hidden, next) = if verified == d {
                self.stats.accepted += 1;
                if emit(d, &mut out) {
                    return Ok(out);
                }
                let after = greedy(second_row);
                if emit(after, &mut out) {
                    return Ok(out);
                }
                (hidden, vec![d, after])
            } else {
                // The draft's position leaves the caches; the main model's choice stands.
                let len = self.session.len() - 1;
                for cache in &mut self.session.caches {
                    cache.truncate(SEQ, len)?;
                }
                if emit(verified, &mut out) {
                    return Ok(out);
                }
                let [_, d_model] = hidden.dims();
                (hidden.slice([0..1, 0..d_model]), vec![verified])
            };
            draft = self.draft(hidden, &next, n - out.len())?;
        }
        // One token left: the main model alone, without a draft.
        let last = *out.last().expect("a token was drawn");
        let logits = model.cached_logits(&[last], &[SEQ], &mut self.session.caches, &device)?;
        self.stats.steps += 1;
        emit(greedy(&last_row(&logits, 0)), &mut out);
        Ok(out)
    }

    /// Feeds the first MTP module the confirmed positions (`hidden [m, d]`, the main
    /// model's final hidden states, with `next`, the token after each) and drafts the
    /// token after the last drawn one — when at least `left ≥ 2` tokens are still to come
    /// (with one, no draft is verified).
    fn draft(&mut self, hidden: Tensor<B, 2>, next: &[u32], left: usize) -> Result<Option<u32>, CacheError> {
        if left < 2 {
            return Ok(None);
        }
        let (model, device) = (self.session.model, &self.session.device);
        let module = &model.mtp[0];
        let m = next.len();
        let h = module.forward_cached(hidden, model.embed_tokens(next, device), &vec![SEQ; m], &mut self.mtp_cache)?;
        // Only the last position drafts: the head runs on its row alone.
        let logits = model.head.forward(module.norm.forward(h.slice([m - 1..m])));
        // Host read the algorithm needs: the draft is fed as a token.
        Ok(Some(greedy(&last_row(&logits, 0))))
    }
}
