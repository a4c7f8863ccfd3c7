//! Generation with MLA's latent cache: a [`Session`] keeps one
//! [`LatentCache`] per layer, feeds a prompt in one pass and then one token per step, so
//! each step costs one position (attention reads the cached `c_kv ‖ k_rope` rows through
//! the absorbed decode kernel) instead of re-running the whole context. Several sequences
//! at once: [`Batch`](super::Batch).

use super::DeepSeekV3;
use super::ModelBackend;
use burn::tensor::{Int, Tensor, TensorData};
use burn_moe::mla::{CacheError, LatentCache, MlaConfig, SeqId, PAGE_SIZE};

/// How the next token is drawn from the logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// Softmax temperature; `0` picks the most likely token.
    pub temperature: f32,
    /// Only the `top_k` most likely tokens are candidates (`0`: all).
    pub top_k: usize,
    /// Seed of the draws.
    pub seed: u64,
}

impl Default for Sampling {
    /// Temperature 0.8 over the 40 most likely tokens, seed 0.
    fn default() -> Self {
        Self { temperature: 0.8, top_k: 40, seed: 0 }
    }
}

impl Sampling {
    /// The greedy rule (temperature 0).
    pub fn greedy() -> Self {
        Self { temperature: 0.0, top_k: 1, seed: 0 }
    }
}

/// A sequence's sampler: the rule and the state of its draws.
#[derive(Clone, Debug)]
pub(crate) struct Sampler {
    sampling: Sampling,
    rng: u64,
}

impl Sampler {
    pub(crate) fn new(sampling: Sampling) -> Self {
        Self { sampling, rng: sampling.seed ^ 0x9E37_79B9_7F4A_7C15 }
    }

    /// A token drawn from `logits` by the sampling rule.
    pub(crate) fn draw(&mut self, logits: &[f32]) -> u32 {
        if self.sampling.temperature <= 0.0 {
            return greedy(logits);
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let k = if self.sampling.top_k == 0 { order.len() } else { self.sampling.top_k.min(order.len()) };
        let top = logits[order[0]];
        let weights: Vec<f64> = order[..k].iter().map(|&i| (((logits[i] - top) / self.sampling.temperature) as f64).exp()).collect();
        let mut u = self.uniform() * weights.iter().sum::<f64>();
        for (w, &i) in weights.iter().zip(&order) {
            if u < *w {
                return i as u32;
            }
            u -= w;
        }
        order[k - 1] as u32
    }

    /// SplitMix64 to `[0, 1)`.
    fn uniform(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The greedy choice: the index of the largest logit, the first of equal ones (the
/// order of `f32::total_cmp`).
pub(crate) fn greedy(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in logits.iter().enumerate() {
        if v.total_cmp(&logits[best]) == core::cmp::Ordering::Greater {
            best = i;
        }
    }
    best as u32
}

/// What the cached forward gives for its `n` rows.
pub(crate) struct CachedOutput<B: ModelBackend> {
    /// The final hidden state after the final norm, `[n, d_model]` (what the first MTP
    /// depth reads).
    pub hidden: Tensor<B, 2>,
    /// Next-token logits, `[n, vocab]`.
    pub logits: Tensor<B, 2>,
}

impl<B: ModelBackend> DeepSeekV3<B> {
    /// The embeddings of `tokens`, `[n, d_model]`.
    pub(crate) fn embed_tokens(&self, tokens: &[u32], device: &B::Device) -> Tensor<B, 2> {
        let n = tokens.len();
        let t = Tensor::<B, 2, Int>::from_data(TensorData::new(tokens.iter().map(|&t| t as i64).collect::<Vec<_>>(), [1, n]), device);
        self.embed.forward(t).squeeze_dim::<2>(0)
    }

    /// The cached forward: row `i` of `tokens` is the next token of sequence `ids[i]`,
    /// appended to every layer's cache.
    pub(crate) fn cached(&self, tokens: &[u32], ids: &[SeqId], caches: &mut [LatentCache<B>], device: &B::Device) -> Result<CachedOutput<B>, CacheError> {
        let mut x = self.embed_tokens(tokens, device);
        for (layer, cache) in self.layers.iter().zip(caches.iter_mut()) {
            x = layer.forward_cached(x, ids, cache)?;
        }
        let hidden = self.norm.forward(x);
        Ok(CachedOutput { logits: self.head.forward(hidden.clone()), hidden })
    }

    /// [`DeepSeekV3::cached`]'s next-token logits `[n, vocab]`.
    pub(crate) fn cached_logits(&self, tokens: &[u32], ids: &[SeqId], caches: &mut [LatentCache<B>], device: &B::Device) -> Result<Tensor<B, 2>, CacheError> {
        Ok(self.cached(tokens, ids, caches, device)?.logits)
    }

    /// Caches for `pages` pages of tokens, one per layer.
    pub(crate) fn caches(&self, mla: &MlaConfig, pages: usize, device: &B::Device) -> Vec<LatentCache<B>> {
        assert!(self.expert_group().is_none(), "generation: the model's experts are sharded over ranks; generate with the model from DeepSeekV3::unshard_experts");
        (0..self.layers.len()).map(|_| LatentCache::new(mla, pages, device)).collect()
    }
}

/// Row `row` of `logits [rows, vocab]` on the host: the one host read of a decode step,
/// which the algorithm needs (the sampler draws on the host).
pub(crate) fn last_row<B: ModelBackend>(logits: &Tensor<B, 2>, row: usize) -> Vec<f32> {
    host_rows(logits.clone(), &[row])
}

/// Rows `rows` of `logits [n, vocab]` on the host, in that order, in one read: the
/// host read a decode step needs (its samplers draw on the host).
pub(crate) fn host_rows<B: ModelBackend>(logits: Tensor<B, 2>, rows: &[usize]) -> Vec<f32> {
    let device = logits.device();
    let picked = match rows {
        [row] => logits.slice([*row..*row + 1]),
        _ => logits.select(0, Tensor::<B, 1, Int>::from_data(TensorData::new(rows.iter().map(|&r| r as i64).collect::<Vec<_>>(), [rows.len()]), &device)),
    };
    picked.into_data().convert::<f32>().into_vec().expect("f32 logits")
}

/// One sequence being generated by a model: its caches and the sampler's state.
pub struct Session<'a, B: ModelBackend> {
    pub(super) model: &'a DeepSeekV3<B>,
    pub(super) caches: Vec<LatentCache<B>>,
    sampler: Sampler,
    pub(super) device: B::Device,
    /// Tokens the caches' pages hold.
    room: usize,
    /// The attention's `max_seq_len`.
    max_len: usize,
}

/// The one sequence of a [`Session`].
pub(super) const SEQ: SeqId = 0;

impl<'a, B: ModelBackend> Session<'a, B> {
    /// A session that can hold `capacity` tokens (prompt and generated), at most the
    /// attention's `max_seq_len`. `mla` is the config the model was built with (it sizes
    /// the caches).
    ///
    /// # Panics
    /// When the model's experts are sharded ([`DeepSeekV3::shard_experts`]): generate
    /// with [`DeepSeekV3::unshard_experts`]'s model.
    pub fn new(model: &'a DeepSeekV3<B>, mla: &MlaConfig, capacity: usize, sampling: Sampling, device: &B::Device) -> Self {
        let pages = capacity.min(mla.max_seq_len).div_ceil(PAGE_SIZE).max(1);
        let mut caches = model.caches(mla, pages, device);
        for cache in &mut caches {
            cache.add_sequence(SEQ).expect("a fresh cache takes a sequence");
        }
        Self { model, caches, sampler: Sampler::new(sampling), device: device.clone(), room: pages * PAGE_SIZE, max_len: mla.max_seq_len }
    }

    /// Tokens held so far.
    pub fn len(&self) -> usize {
        self.caches.first().map_or(0, |c| c.len(SEQ).unwrap_or(0))
    }

    /// Whether nothing was fed yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `tokens` (a prompt, or the last generated token) and returns their
    /// next-token logits, `[n, vocab]`; row `i` equals the full forward's row at position
    /// `len + i`.
    ///
    /// # Errors
    /// [`CacheError::TooLong`] beyond the capacity or `max_seq_len`, [`CacheError::Full`]
    /// when the pages are used up.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<Tensor<B, 2>, CacheError> {
        self.model.cached_logits(tokens, &vec![SEQ; tokens.len()], &mut self.caches, &self.device)
    }

    /// Feeds `prompt`, then draws `n` tokens one at a time; returns the drawn tokens.
    ///
    /// # Errors
    /// As [`Session::generate_until`].
    pub fn generate(&mut self, prompt: &[u32], n: usize) -> Result<Vec<u32>, CacheError> {
        self.generate_until(prompt, n, &[], |_| {})
    }

    /// Feeds `prompt`, then draws up to `n` tokens, handing each to `each` as soon as it
    /// is drawn (to stream it), and stops after a token of `stop` (an end-of-sequence id);
    /// returns the drawn tokens, the stop token included.
    ///
    /// # Errors
    /// [`CacheError::TooLong`] or [`CacheError::Full`] when the prompt and `n` tokens do
    /// not fit, checked before anything is fed (nothing is generated half-way).
    pub fn generate_until(&mut self, prompt: &[u32], n: usize, stop: &[u32], mut each: impl FnMut(u32)) -> Result<Vec<u32>, CacheError> {
        assert!(!prompt.is_empty(), "Session::generate: the prompt is empty");
        // The last drawn token is not fed.
        self.check_room(prompt.len() + n.saturating_sub(1))?;
        let mut logits = self.feed(prompt)?;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let token = self.sampler.draw(&last_row(&logits, logits.dims()[0] - 1));
            out.push(token);
            each(token);
            if stop.contains(&token) {
                break;
            }
            if i + 1 < n {
                logits = self.feed(&[token])?;
            }
        }
        Ok(out)
    }

    /// Pages of each layer's cache.
    pub(super) fn pages(&self) -> usize {
        self.room / PAGE_SIZE
    }

    /// Whether `extra` more tokens fit the caches and the rotary table.
    pub(super) fn check_room(&self, extra: usize) -> Result<(), CacheError> {
        let len = self.len() + extra;
        if len > self.max_len {
            return Err(CacheError::TooLong { id: SEQ, len, max: self.max_len });
        }
        if len > self.room {
            let used = self.len().div_ceil(PAGE_SIZE);
            return Err(CacheError::Full { needed: len.div_ceil(PAGE_SIZE) - used, free: self.room / PAGE_SIZE - used });
        }
        Ok(())
    }
}
