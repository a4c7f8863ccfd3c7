//! The absorbed MLA decode in plain Burn tensor ops: the default implementation of
//! [`super::MlaBackend::mla_decode`] and the baseline its kernel is tested against.

use burn::tensor::{backend::Backend, Int, Tensor};

/// Absorbed MLA decode over a paged latent cache (see [`crate::mla`]; every row of the
/// cache attended in one masked softmax): `q [n, H, C]`
/// (softmax scale folded in), `cache [rows, C]` (`rows` a multiple of `page`), `pages [n,
/// P]` (page ids; unused entries any valid page), `lens [n]` (each in `1..=P·page`) →
/// `[n, H, kv_lora]`, `softmax_t(q · cache[row_t]) · cache[row_t, ..kv_lora]` over the
/// sequence's tokens `t < len`, `row_t = pages[t / page] · page + t % page`.
pub fn mla_decode<B: Backend>(q: Tensor<B, 3>, cache: Tensor<B, 2>, pages: Tensor<B, 2, Int>, lens: Tensor<B, 1, Int>, kv_lora: usize, page: usize) -> Tensor<B, 3> {
    let [n, h, c] = q.dims();
    let p = pages.dims()[1];
    let device = q.device();
    let length = p * page;
    let offsets = Tensor::<B, 1, Int>::arange(0..page as i64, &device).reshape([1, 1, page]);
    let rows = (pages.reshape([n, p, 1]) * page as i64 + offsets).reshape([n * length]);
    let keys = cache.select(0, rows).reshape([n, length, c]);
    let scores = q.matmul(keys.clone().swap_dims(1, 2)); // [n, H, L]
    let t = Tensor::<B, 1, Int>::arange(0..length as i64, &device).reshape([1, length]).expand([n, length]);
    let masked = t.greater_equal(lens.reshape([n, 1]).expand([n, length])).reshape([n, 1, length]).expand([n, h, length]);
    let weights = burn::tensor::activation::softmax(scores.mask_fill(masked, -1.0e30), 2);
    weights.matmul(keys.slice([0..n, 0..length, 0..kv_lora]))
}
