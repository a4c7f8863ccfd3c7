//! MLA's backend op: the absorbed decode attention over the paged latent cache.
//!
//! [`decode_attention`] checks shapes and calls [`MlaBackend::mla_decode`], whose default
//! is the plain-Burn reference ([`super::reference::mla_decode`]), so any backend gains it
//! with an empty impl (NdArray, Flex). CubeCL backends run the kernel of
//! [`crate::kernel::mla`]; `Fusion` registers it as a custom operation; `Autodiff` runs it
//! untracked (inference only).
//!
//! The trait needs nothing but Burn's [`Backend`]: attention code depends on neither the
//! MoE nor the FP8 traits.

use super::reference;
use super::PAGE_SIZE;
use crate::custom_op::{register_float, CustomOp, Handles};
use crate::kernel::{
    empty,
    mla::{launch_mla_decode, MAX_WIDTH},
};
use burn::backend::autodiff::{checkpoint::strategy::CheckpointStrategy, Autodiff};
use burn::tensor::{
    backend::{AutodiffBackend, Backend},
    ops::{FloatTensor, IntTensor},
    DType, Int, Tensor, TensorPrimitive,
};
use burn_cubecl::{
    kernel::{cast, into_contiguous},
    BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement,
};
use burn_fusion::{Fusion, FusionBackend};
use burn_ir::TensorIr;

/// Absorbed MLA decode: `softmax_t(q · cache[row_t]) · cache[row_t, ..kv_lora]` over the
/// first `lens[i]` tokens of sequence `i`, token `t` in row `pages[i, t / PAGE_SIZE] ·
/// PAGE_SIZE + t % PAGE_SIZE` of the cache (the softmax scale folded into `q`).
///
/// # Shapes
/// - q: `[n, H, C]` (`C` = `kv_lora + rope`, the cache width)
/// - cache: `[rows, C]`, `rows` a multiple of [`PAGE_SIZE`]
/// - pages: `[n, P]` page ids (entries past a sequence's length: any valid page)
/// - lens: `[n]`, each in `1..=P · PAGE_SIZE`
/// - output: `[n, H, kv_lora]`
///
/// # Panics
/// When the shapes disagree or `kv_lora` exceeds `C`, naming the shapes.
pub fn decode_attention<B: MlaBackend>(q: Tensor<B, 3>, cache: Tensor<B, 2>, pages: Tensor<B, 2, Int>, lens: Tensor<B, 1, Int>, kv_lora: usize) -> Tensor<B, 3> {
    let ([n, h, c], [rows, width], [pn, p], [ln]) = (q.dims(), cache.dims(), pages.dims(), lens.dims());
    let shapes = || format!("q [{n}, {h}, {c}], cache [{rows}, {width}], pages [{pn}, {p}], lens [{ln}], kv_lora {kv_lora}");
    assert!(width == c && kv_lora <= c, "decode_attention: the cache width and kv_lora must match the queries: {}", shapes());
    assert!(pn == n && ln == n, "decode_attention: one page table and length per query row: {}", shapes());
    assert!(
        rows.is_multiple_of(PAGE_SIZE) && p > 0 && rows > 0,
        "decode_attention: the cache holds whole pages of {PAGE_SIZE} rows and each sequence one page or more: {}",
        shapes()
    );
    if n == 0 || h == 0 || kv_lora == 0 {
        return Tensor::zeros([n, h, kv_lora], &q.device());
    }
    Tensor::from_primitive(TensorPrimitive::Float(B::mla_decode(
        q.into_primitive().tensor(),
        cache.into_primitive().tensor(),
        pages.into_primitive(),
        lens.into_primitive(),
        kv_lora,
    )))
}

/// Multi-head Latent Attention's decode op. Shapes are checked by [`decode_attention`]
/// before it is called.
pub trait MlaBackend: Backend {
    /// Absorbed MLA decode over the paged latent cache (pages of [`PAGE_SIZE`] rows):
    /// `q [n, H, C]`, `cache [rows, C]`, `pages [n, P]`, `lens [n]` → `[n, H, kv_lora]`.
    fn mla_decode(q: FloatTensor<Self>, cache: FloatTensor<Self>, pages: IntTensor<Self>, lens: IntTensor<Self>, kv_lora: usize) -> FloatTensor<Self> {
        by_reference::<Self>(q, cache, pages, lens, kv_lora)
    }
}

/// [`reference::mla_decode`] on primitives.
fn by_reference<B: Backend>(q: FloatTensor<B>, cache: FloatTensor<B>, pages: IntTensor<B>, lens: IntTensor<B>, kv_lora: usize) -> FloatTensor<B> {
    let q = Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(q));
    let cache = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(cache));
    reference::mla_decode(q, cache, Tensor::from_primitive(pages), Tensor::from_primitive(lens), kv_lora, PAGE_SIZE).into_primitive().tensor()
}

#[cfg(feature = "ndarray")]
impl MlaBackend for burn::backend::NdArray {}

#[cfg(feature = "flex")]
impl MlaBackend for burn::backend::Flex {}

impl<R, F, I, BT> MlaBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn mla_decode(q: FloatTensor<Self>, cache: FloatTensor<Self>, pages: IntTensor<Self>, lens: IntTensor<Self>, kv_lora: usize) -> FloatTensor<Self> {
        if q.meta.shape()[2] > MAX_WIDTH {
            // Rows wider than the kernel stages: Burn's ops.
            return by_reference::<Self>(q, cache, pages, lens, kv_lora);
        }
        let f32_in = |x| cast(into_contiguous(x), DType::F32);
        let u32_in = |x| cast(into_contiguous(x), DType::U32);
        let (q, cache, pages, lens) = (f32_in(q), f32_in(cache), u32_in(pages), u32_in(lens));
        let [n, h] = [q.meta.shape()[0], q.meta.shape()[1]];
        let out = empty(&q.client, &q.device, [n, h, kv_lora], DType::F32);
        launch_mla_decode(q, cache, pages, lens, out.clone(), kv_lora);
        cast(out, F::dtype())
    }
}

/// The decode as a custom operation of the fusion stream: inputs `q, cache, pages, lens`.
#[derive(Clone, Copy, Debug)]
struct MlaDecodeOp {
    kv_lora: usize,
}

impl<B: FusionBackend + MlaBackend> CustomOp<B> for MlaDecodeOp {
    fn execute(&self, inp: &[TensorIr], out: &[TensorIr], h: &mut Handles<B>) {
        let (q, cache) = (h.get_float_tensor::<B>(&inp[0]), h.get_float_tensor::<B>(&inp[1]));
        let (pages, lens) = (h.get_int_tensor::<B>(&inp[2]), h.get_int_tensor::<B>(&inp[3]));
        h.register_float_tensor::<B>(&out[0].id, B::mla_decode(q, cache, pages, lens, self.kv_lora));
    }
}

impl<B: FusionBackend + MlaBackend> MlaBackend for Fusion<B> {
    fn mla_decode(q: FloatTensor<Self>, cache: FloatTensor<Self>, pages: IntTensor<Self>, lens: IntTensor<Self>, kv_lora: usize) -> FloatTensor<Self> {
        let shape = vec![q.shape[0], q.shape[1], kv_lora];
        register_float::<B, _>("mla_decode", vec![q, cache, pages, lens], shape, MlaDecodeOp { kv_lora })
    }
}

impl<B: MlaBackend, C: CheckpointStrategy> MlaBackend for Autodiff<B, C> {
    fn mla_decode(q: FloatTensor<Self>, cache: FloatTensor<Self>, pages: IntTensor<Self>, lens: IntTensor<Self>, kv_lora: usize) -> FloatTensor<Self> {
        Self::from_inner(B::mla_decode(Self::inner(q), Self::inner(cache), pages, lens, kv_lora))
    }
}
