//! Continuous batching: several sequences generated at once over one paged latent cache
//! per layer. Sequences join between steps (their prompt in one pass), every step feeds
//! the last token of each running sequence as one batch — MLA's decode reads each
//! sequence's own cached rows, the MLPs and the MoE layers run all the rows together —
//! and a sequence leaves when it has its tokens or draws a stop token, freeing its pages
//! for the next.

use super::generate::{Sampler, Sampling};
use super::DeepSeekV3;
use super::ModelBackend;
use burn_moe::mla::{CacheError, LatentCache, MlaConfig, SeqId, PAGE_SIZE};
use std::collections::BTreeMap;

/// What a sequence asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// The prompt's tokens (at least one).
    pub prompt: Vec<u32>,
    /// Tokens to draw at most (at least one).
    pub max_tokens: usize,
    /// Tokens that end the sequence (drawn, then it leaves): end-of-sequence ids.
    pub stop: Vec<u32>,
    /// How its tokens are drawn.
    pub sampling: Sampling,
}

impl Request {
    /// Greedy decoding of `max_tokens` tokens after `prompt`, without stop tokens.
    pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Self { prompt, max_tokens, stop: Vec::new(), sampling: Sampling::greedy() }
    }
}

/// A token drawn for a sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drawn {
    /// The sequence.
    pub seq: SeqId,
    /// The token.
    pub token: u32,
    /// Whether it was the sequence's last (it has left the batch).
    pub finished: bool,
}

struct Running {
    /// The drawn token the next step feeds.
    pending: u32,
    sampler: Sampler,
    /// Tokens still to draw.
    left: usize,
    stop: Vec<u32>,
}

impl Running {
    /// Draws sequence `seq`'s next token from `logits`.
    fn draw(&mut self, seq: SeqId, logits: &[f32]) -> Drawn {
        let token = self.sampler.draw(logits);
        self.left -= 1;
        self.pending = token;
        Drawn { seq, token, finished: self.left == 0 || self.stop.contains(&token) }
    }
}

/// Sequences generated together (continuous batching): they join between steps, each
/// step feeds the last token of every running sequence as one batch, and a sequence
/// leaves when it has its tokens or draws a stop token, freeing its pages.
///
/// ```
/// use burn::backend::NdArray;
/// use burn_deepseek::model::{Batch, DeepSeekV3Config, Request};
///
/// let config = DeepSeekV3Config::tiny();
/// let model = config.init::<NdArray>(&Default::default());
/// let mut batch = Batch::new(&model, &config.mla, 8, &Default::default());
/// batch.join(1, Request::greedy(b"Phileas".iter().map(|&b| b as u32).collect(), 4)).unwrap();
/// batch.step().unwrap();
/// batch.join(2, Request::greedy(b"Fogg".iter().map(|&b| b as u32).collect(), 2)).unwrap();
/// while !batch.is_empty() {
///     for drawn in batch.step().unwrap() {
///         println!("sequence {}: token {}{}", drawn.seq, drawn.token, if drawn.finished { " (done)" } else { "" });
///     }
/// }
/// ```
pub struct Batch<'a, B: ModelBackend> {
    model: &'a DeepSeekV3<B>,
    caches: Vec<LatentCache<B>>,
    running: BTreeMap<SeqId, Running>,
    device: B::Device,
    max_len: usize,
}

impl<'a, B: ModelBackend> Batch<'a, B> {
    /// A batch whose sequences share `pages` pages of `PAGE_SIZE` tokens in every layer's
    /// cache. `mla` is the config the model was built with.
    ///
    /// # Panics
    /// When the model's experts are sharded, as [`Session::new`](super::Session::new).
    pub fn new(model: &'a DeepSeekV3<B>, mla: &MlaConfig, pages: usize, device: &B::Device) -> Self {
        Self { model, caches: model.caches(mla, pages, device), running: BTreeMap::new(), device: device.clone(), max_len: mla.max_seq_len }
    }

    /// Running sequences.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    /// Whether no sequence is running.
    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Pages not held by a running sequence.
    pub fn free_pages(&self) -> usize {
        self.caches.first().map_or(0, |c| c.free_pages())
    }

    /// Adds sequence `id`: feeds its prompt in one pass and draws its first token (the
    /// sequence has left again when that token finishes it). [`Batch::join_all`] for one.
    ///
    /// # Errors
    /// As [`Batch::join_all`].
    ///
    /// # Panics
    /// When the prompt is empty or `max_tokens` is 0.
    pub fn join(&mut self, id: SeqId, request: Request) -> Result<Drawn, CacheError> {
        let drawn = self.join_all(vec![(id, request)])?;
        Ok(drawn[0])
    }

    /// Adds several sequences at once: their prompts are fed together in one pass (a
    /// batched prefill: the MLPs and MoE layers run every prompt's rows together, MLA
    /// attends each row over its own sequence), and each draws its first token; returns
    /// them in the order given (a sequence has left again when that token finishes it).
    ///
    /// # Errors
    /// Checked before anything is fed, the batch unchanged then:
    /// [`CacheError::DuplicateSequence`] for an id running or given twice,
    /// [`CacheError::TooLong`] when a prompt and its `max_tokens` exceed `max_seq_len`,
    /// [`CacheError::Full`] when the prompts need more pages than are free.
    ///
    /// # Panics
    /// When a prompt is empty or a `max_tokens` is 0.
    pub fn join_all(&mut self, requests: Vec<(SeqId, Request)>) -> Result<Vec<Drawn>, CacheError> {
        let mut needed = 0;
        for (i, (id, request)) in requests.iter().enumerate() {
            let id = *id;
            assert!(!request.prompt.is_empty() && request.max_tokens > 0, "Batch::join: sequence {id} has an empty prompt or max_tokens 0");
            if self.running.contains_key(&id) || requests[..i].iter().any(|(other, _)| *other == id) {
                return Err(CacheError::DuplicateSequence { id });
            }
            let len = request.prompt.len() + request.max_tokens - 1;
            if len > self.max_len {
                return Err(CacheError::TooLong { id, len, max: self.max_len });
            }
            needed += request.prompt.len().div_ceil(PAGE_SIZE);
        }
        if needed > self.free_pages() {
            return Err(CacheError::Full { needed, free: self.free_pages() });
        }
        let mut tokens = Vec::new();
        let mut ids = Vec::new();
        let mut last_rows = Vec::with_capacity(requests.len());
        for (id, request) in &requests {
            for cache in &mut self.caches {
                cache.add_sequence(*id)?;
            }
            tokens.extend(&request.prompt);
            ids.extend(std::iter::repeat_n(*id, request.prompt.len()));
            last_rows.push(tokens.len() - 1);
        }
        let logits = match self.model.cached_logits(&tokens, &ids, &mut self.caches, &self.device) {
            Ok(logits) => logits,
            Err(e) => {
                for (id, _) in &requests {
                    self.remove(*id);
                }
                return Err(e);
            }
        };
        // Host read the algorithm needs: the samplers draw on the host (one read of each
        // prompt's last row).
        let rows = super::generate::host_rows(logits, &last_rows);
        let vocab = rows.len() / requests.len();
        let mut out = Vec::with_capacity(requests.len());
        for ((id, request), logits) in requests.into_iter().zip(rows.chunks(vocab)) {
            let mut running = Running { pending: 0, sampler: Sampler::new(request.sampling), left: request.max_tokens, stop: request.stop };
            let drawn = running.draw(id, logits);
            if drawn.finished {
                self.remove(id);
            } else {
                self.running.insert(id, running);
            }
            out.push(drawn);
        }
        Ok(out)
    }

    /// One decode step: the last drawn token of every running sequence, fed as one batch;
    /// returns each sequence's next token, in id order. Finished sequences leave the batch
    /// and free their pages.
    ///
    /// # Errors
    /// [`CacheError::Full`] when the step needs more new pages (one per sequence whose
    /// length fills its last page) than are free, checked before anything is fed: let a
    /// sequence [`Batch::leave`] and step again.
    pub fn step(&mut self) -> Result<Vec<Drawn>, CacheError> {
        if self.running.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<SeqId> = self.running.keys().copied().collect();
        let cache = &self.caches[0];
        let needed = ids.iter().filter(|&&id| cache.len(id).is_ok_and(|l| l % PAGE_SIZE == 0)).count();
        if needed > self.free_pages() {
            return Err(CacheError::Full { needed, free: self.free_pages() });
        }
        let tokens: Vec<u32> = self.running.values().map(|r| r.pending).collect();
        let logits = self.model.cached_logits(&tokens, &ids, &mut self.caches, &self.device)?;
        let vocab = logits.dims()[1];
        // Host read the algorithm needs: the samplers draw on the host (one read per step).
        let rows: Vec<f32> = logits.into_data().convert::<f32>().into_vec().expect("f32 logits");
        let out: Vec<Drawn> = self.running.iter_mut().zip(rows.chunks(vocab)).map(|((&id, running), logits)| running.draw(id, logits)).collect();
        for drawn in out.iter().filter(|d| d.finished) {
            self.running.remove(&drawn.seq);
            self.remove(drawn.seq);
        }
        Ok(out)
    }

    /// Removes sequence `id` (cancelled), freeing its pages.
    ///
    /// # Errors
    /// [`CacheError::UnknownSequence`] when it is not running.
    pub fn leave(&mut self, id: SeqId) -> Result<(), CacheError> {
        if self.running.remove(&id).is_none() {
            return Err(CacheError::UnknownSequence { id });
        }
        self.remove(id);
        Ok(())
    }

    /// Frees `id`'s pages in every layer's cache.
    fn remove(&mut self, id: SeqId) {
        for cache in &mut self.caches {
            cache.remove_sequence(id).ok();
        }
    }
}
