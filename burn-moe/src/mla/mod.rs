//! Multi-head Latent Attention (DeepSeek-V2/V3) with a compressed, paged KV cache and an
//! absorbed decode kernel.
//!
//! - Training: [`Mla::forward`] decompresses keys and values from the latent (`W_UKV`)
//!   and runs causal attention with Burn's ops, differentiable end to end.
//! - The absorbed form ([`Mla::forward_absorbed`]) folds `W_UK` into the query and
//!   `W_UV` into the output, so attention runs over the latent itself: scores `q_nope ·
//!   W_UK · c_kvᵀ + q_rope · k_ropeᵀ`, output `softmax · c_kv · W_UV`. Same values, other
//!   association.
//! - Serving: a [`LatentCache`] holds only `c_kv ‖ k_rope` per token (576 values at V3
//!   dims, against `2 · 128 · 128` for keys and values of standard attention), in pages of
//!   [`PAGE_SIZE`] tokens; [`Mla::prefill`] and [`Mla::decode`] append to it and attend
//!   with [`decode_attention`] ([`MlaBackend::mla_decode`]) — on wgpu and CUDA a CubeCL kernel that reads
//!   each cached row once for a group of heads, with an online softmax split over pages
//!   and a final combine.
//!
//! # Shapes
//! `x [B, S, d_model]` for training; `[n, d_model]` (one row per token) for the cache
//! paths. `H` heads; latent `kv_lora_rank`; per-head `qk_nope_head_dim`,
//! `qk_rope_head_dim`, `v_head_dim`.
//!
//! ```
//! use burn::backend::NdArray;
//! use burn::tensor::{Distribution, Tensor};
//! use burn_moe::mla::{LatentCache, MlaConfig};
//!
//! let device = Default::default();
//! let config = MlaConfig::tiny();
//! let mla = config.init::<NdArray>(&device);
//! let prompt = Tensor::<NdArray, 2>::random([5, config.d_model], Distribution::Normal(0.0, 1.0), &device);
//!
//! let mut cache = LatentCache::new(&config, 4, &device); // 4 pages of 64 tokens
//! cache.add_sequence(7).unwrap();
//! let y = mla.prefill(prompt.clone(), 7, &mut cache).unwrap(); // [5, d_model]
//! let next = Tensor::<NdArray, 2>::random([1, config.d_model], Distribution::Normal(0.0, 1.0), &device);
//! let z = mla.decode(next, &[7], &mut cache).unwrap(); // [1, d_model]
//! assert_eq!(cache.len(7).unwrap(), 6);
//! assert_eq!(cache.width(), 32 + 8); // kv_lora_rank + qk_rope_head_dim values per token
//!
//! // The training path gives the same rows.
//! let full = mla.forward(prompt.unsqueeze_dim(0)).squeeze_dim::<2>(0);
//! assert!(full.all_close(y, Some(1e-4), Some(1e-5)));
//! # let _ = z;
//! ```

mod backend;
mod cache;
mod config;
pub mod reference;
mod rope;

pub use backend::{decode_attention, MlaBackend};

pub use cache::{CacheError, LatentCache, SeqId, PAGE_SIZE};
pub use config::MlaConfig;
pub use rope::{RotaryTable, YarnConfig};

use burn::module::Module;
use burn::nn::{Linear, RmsNorm};
use burn::tensor::{activation::softmax, backend::Backend, Bool, Tensor};

/// Multi-head Latent Attention; built by [`MlaConfig::init`].
#[derive(Module, Debug)]
pub struct Mla<B: Backend> {
    /// Query down-projection `[d_model, q_lora_rank]` (none without query compression).
    pub wq_a: Option<Linear<B>>,
    /// RMSNorm of the query latent.
    pub q_norm: Option<RmsNorm<B>>,
    /// Query up-projection `[q_lora_rank or d_model, H · (nope + rope)]`.
    pub wq_b: Linear<B>,
    /// Key-value down-projection `[d_model, kv_lora_rank + rope]`: the latent and the
    /// shared rotary key.
    pub wkv_a: Linear<B>,
    /// RMSNorm of the key-value latent.
    pub kv_norm: RmsNorm<B>,
    /// Key-value up-projection `[kv_lora_rank, H · (nope + v)]` (`W_UK` and `W_UV` per head).
    pub wkv_b: Linear<B>,
    /// Output projection `[H · v, d_model]`.
    pub wo: Linear<B>,
    #[module(skip)]
    rope: RotaryTable,
    #[module(skip)]
    n_heads: usize,
    #[module(skip)]
    kv_lora_rank: usize,
    #[module(skip)]
    qk_nope_head_dim: usize,
    #[module(skip)]
    qk_rope_head_dim: usize,
    #[module(skip)]
    v_head_dim: usize,
    #[module(skip)]
    scale: f64,
}

/// Per-head queries, the rotary part rotated: `nope [.., S, H, nope]`, `rope [.., S, H, rope]`.
struct Queries<B: Backend> {
    nope: Tensor<B, 4>,
    rope: Tensor<B, 4>,
}

/// The cached quantities: `c_kv [B, S, kv_lora]` (normalised), `k_rope [B, S, rope]`
/// (rotated).
struct Latents<B: Backend> {
    c_kv: Tensor<B, 3>,
    k_rope: Tensor<B, 3>,
}

impl<B: Backend> Mla<B> {
    /// Heads.
    pub fn n_heads(&self) -> usize {
        self.n_heads
    }

    /// The softmax scale (with YaRN's `mscale²` when configured).
    pub fn softmax_scale(&self) -> f64 {
        self.scale
    }

    fn d_model(&self) -> usize {
        self.wkv_a.weight.dims()[0]
    }

    /// `(cos, sin)` of `positions`, shaped `[1, P, 1, rope / 2]` to broadcast over batch
    /// and heads.
    fn rotation(&self, positions: &[usize], device: &B::Device) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let (cos, sin) = self.rope.angles::<B>(positions, device);
        let half = self.qk_rope_head_dim / 2;
        (cos.reshape([1, positions.len(), 1, half]), sin.reshape([1, positions.len(), 1, half]))
    }

    fn queries(&self, x: Tensor<B, 3>, rotation: &(Tensor<B, 4>, Tensor<B, 4>)) -> Queries<B> {
        let [b, s, _] = x.dims();
        let (h, nope, rope) = (self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim);
        let q = match (&self.wq_a, &self.q_norm) {
            (Some(a), Some(norm)) => self.wq_b.forward(norm.forward(a.forward(x))),
            _ => self.wq_b.forward(x),
        }
        .reshape([b, s, h, nope + rope]);
        let q_nope = q.clone().slice([0..b, 0..s, 0..h, 0..nope]);
        let q_rope = q.slice([0..b, 0..s, 0..h, nope..nope + rope]);
        let (cos, sin) = rotation.clone();
        Queries { nope: q_nope, rope: RotaryTable::apply(q_rope, cos.expand([b, s, 1, rope / 2]), sin.expand([b, s, 1, rope / 2])) }
    }

    fn latents(&self, x: Tensor<B, 3>, rotation: &(Tensor<B, 4>, Tensor<B, 4>)) -> Latents<B> {
        let [b, s, _] = x.dims();
        let (r, rope) = (self.kv_lora_rank, self.qk_rope_head_dim);
        let kv = self.wkv_a.forward(x);
        let c_kv = self.kv_norm.forward(kv.clone().slice([0..b, 0..s, 0..r]));
        let k_rope = kv.slice([0..b, 0..s, r..r + rope]).reshape([b, s, 1, rope]);
        let (cos, sin) = rotation.clone();
        let k_rope = RotaryTable::apply(k_rope, cos.expand([b, s, 1, rope / 2]), sin.expand([b, s, 1, rope / 2])).reshape([b, s, rope]);
        Latents { c_kv, k_rope }
    }

    /// `W_UK [H, nope, kv_lora]` and `W_UV [H, kv_lora, v]`, views of `wkv_b`.
    fn absorbed_weights(&self) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let (h, r, nope, v) = (self.n_heads, self.kv_lora_rank, self.qk_nope_head_dim, self.v_head_dim);
        let w = self.wkv_b.weight.val().reshape([r, h, nope + v]);
        let w_uk = w.clone().slice([0..r, 0..h, 0..nope]).permute([1, 2, 0]);
        let w_uv = w.slice([0..r, 0..h, nope..nope + v]).swap_dims(0, 1);
        (w_uk, w_uv)
    }

    /// Queries and latents of `x [B, S, d]` at positions `0..S` (the training paths'
    /// shared start).
    ///
    /// # Panics
    /// When the width is not `d_model`.
    fn project(&self, x: Tensor<B, 3>) -> (Queries<B>, Latents<B>) {
        let [_, s, d] = x.dims();
        assert!(d == self.d_model(), "MLA: input width {d} does not match d_model {}", self.d_model());
        let rotation = self.rotation(&(0..s).collect::<Vec<_>>(), &x.device());
        (self.queries(x.clone(), &rotation), self.latents(x, &rotation))
    }

    /// Training forward, causal, positions `0..S`: keys and values decompressed from the
    /// latent, standard attention.
    ///
    /// # Shapes
    /// `x [B, S, d_model]` → `[B, S, d_model]`.
    ///
    /// # Panics
    /// When the width is not `d_model` or `S` exceeds `max_seq_len`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let device = x.device();
        let (h, nope, rope, v) = (self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim);
        let (q, lat) = self.project(x);
        let kv = self.wkv_b.forward(lat.c_kv).reshape([b, s, h, nope + v]);
        let k_nope = kv.clone().slice([0..b, 0..s, 0..h, 0..nope]);
        let values = kv.slice([0..b, 0..s, 0..h, nope..nope + v]).swap_dims(1, 2); // [B, H, S, v]
        let k_rope = lat.k_rope.reshape([b, s, 1, rope]).expand([b, s, h, rope]);
        let keys = Tensor::cat(vec![k_nope, k_rope], 3).swap_dims(1, 2); // [B, H, S, qk]
        let queries = Tensor::cat(vec![q.nope, q.rope], 3).swap_dims(1, 2);
        let scores = queries.matmul(keys.swap_dims(2, 3)) * self.scale;
        let out = softmax(scores.mask_fill(causal::<B>(b, h, s, &device), -1.0e30), 3).matmul(values);
        self.wo.forward(out.swap_dims(1, 2).reshape([b, s, h * v]))
    }

    /// [`Mla::forward`] in the absorbed form: attention over the latent, `W_UK` folded
    /// into the queries and `W_UV` into the output. Equal up to rounding.
    ///
    /// # Shapes
    /// `x [B, S, d_model]` → `[B, S, d_model]`.
    pub fn forward_absorbed(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let device = x.device();
        let (h, r, rope, v) = (self.n_heads, self.kv_lora_rank, self.qk_rope_head_dim, self.v_head_dim);
        let (q, lat) = self.project(x);
        let (w_uk, w_uv) = self.absorbed_weights();
        let q_lat = q.nope.swap_dims(1, 2).matmul(w_uk.unsqueeze_dim::<4>(0).expand([b, h, self.qk_nope_head_dim, r])); // [B, H, S, r]
        let c_kv = lat.c_kv.unsqueeze_dim::<4>(1).expand([b, h, s, r]);
        let k_rope = lat.k_rope.unsqueeze_dim::<4>(1).expand([b, h, s, rope]);
        let scores = (q_lat.matmul(c_kv.clone().swap_dims(2, 3)) + q.rope.swap_dims(1, 2).matmul(k_rope.swap_dims(2, 3))) * self.scale;
        let o_lat = softmax(scores.mask_fill(causal::<B>(b, h, s, &device), -1.0e30), 3).matmul(c_kv); // [B, H, S, r]
        let out = o_lat.matmul(w_uv.unsqueeze_dim::<4>(0).expand([b, h, r, v])); // [B, H, S, v]
        self.wo.forward(out.swap_dims(1, 2).reshape([b, s, h * v]))
    }
}

impl<B: MlaBackend> Mla<B> {
    /// Appends a prompt of sequence `id` to the cache (after what it holds) and returns
    /// its attention output; each token attends to the cached tokens and to the prompt
    /// up to itself.
    ///
    /// # Shapes
    /// `x [S, d_model]` → `[S, d_model]`.
    ///
    /// # Errors
    /// [`CacheError`]: unknown sequence, cache full, beyond `max_seq_len`, wrong width;
    /// the cache is unchanged then.
    pub fn prefill(&self, x: Tensor<B, 2>, id: SeqId, cache: &mut LatentCache<B>) -> Result<Tensor<B, 2>, CacheError> {
        let ids = vec![id; x.dims()[0]];
        self.cached(x, &ids, cache)
    }

    /// One decode step of a batch: token `i` (row `i` of `x`) is the next token of
    /// sequence `ids[i]`; sequences of any lengths mix in one batch.
    ///
    /// # Shapes
    /// `x [n, d_model]` → `[n, d_model]`.
    ///
    /// # Errors
    /// As [`Mla::prefill`], and [`CacheError::Dims`] when `ids` is not one per row.
    pub fn decode(&self, x: Tensor<B, 2>, ids: &[SeqId], cache: &mut LatentCache<B>) -> Result<Tensor<B, 2>, CacheError> {
        self.cached(x, ids, cache)
    }

    fn cached(&self, x: Tensor<B, 2>, ids: &[SeqId], cache: &mut LatentCache<B>) -> Result<Tensor<B, 2>, CacheError> {
        let [n, d] = x.dims();
        if d != self.d_model() {
            return Err(CacheError::Dims { what: "input width (d_model)", expected: self.d_model(), got: d });
        }
        if ids.len() != n {
            return Err(CacheError::Dims { what: "sequence ids (one per input row)", expected: n, got: ids.len() });
        }
        if cache.width() != self.kv_lora_rank + self.qk_rope_head_dim {
            return Err(CacheError::Dims { what: "cache width (kv_lora_rank + qk_rope_head_dim)", expected: self.kv_lora_rank + self.qk_rope_head_dim, got: cache.width() });
        }
        if n == 0 {
            return Ok(x);
        }
        let placement = cache.place(ids)?;
        let device = x.device();
        let (h, r, v) = (self.n_heads, self.kv_lora_rank, self.v_head_dim);
        // Each row is its own "sequence" of one position: [n, 1, d].
        let rotation = self.rotation(&placement.positions, &device);
        let rotation = (rotation.0.swap_dims(0, 1), rotation.1.swap_dims(0, 1)); // [n, 1, 1, half]
        let x = x.reshape([n, 1, d]);
        let lat = self.latents(x.clone(), &rotation);
        cache.write(&placement, Tensor::cat(vec![lat.c_kv.reshape([n, r]), lat.k_rope.reshape([n, self.qk_rope_head_dim])], 1));
        let q = self.queries(x, &rotation);
        let (w_uk, w_uv) = self.absorbed_weights();
        let q_lat = q.nope.reshape([n, h, self.qk_nope_head_dim]).swap_dims(0, 1).matmul(w_uk).swap_dims(0, 1); // [n, H, r]
        let q = Tensor::cat(vec![q_lat, q.rope.reshape([n, h, self.qk_rope_head_dim])], 2) * self.scale;
        let (pages, lens) = cache.tables(&placement.sequences, &placement.positions);
        let o_lat = decode_attention(q, cache.rows(), pages, lens, r);
        let out = o_lat.swap_dims(0, 1).matmul(w_uv).swap_dims(0, 1).reshape([n, h * v]);
        Ok(self.wo.forward(out))
    }
}

/// `[B, H, S, S]`, true above the diagonal (future keys).
fn causal<B: Backend>(b: usize, h: usize, s: usize, device: &B::Device) -> Tensor<B, 4, Bool> {
    Tensor::<B, 2, Bool>::tril_mask([s, s], 0, device).reshape([1, 1, s, s]).expand([b, h, s, s])
}
