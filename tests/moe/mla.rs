//! Multi-head Latent Attention: the decode op (kernel on wgpu, reference on NdArray, fused
//! Fused) against an f64 host attention over the paged rows; the absorbed forward against
//! the decompressing one; cached prefill and decode against the full forward; training
//! gradients against an f64 run of the same weights; named errors.

use super::common::{host, kernel_device, Cube, Fused, Ref, Rng};
use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::{backend::Backend, DType, Int, Tensor, TensorData, TensorPrimitive};
use burn_moe::mla::{decode_attention, CacheError, LatentCache, Mla, MlaBackend, MlaConfig, YarnConfig, PAGE_SIZE};

/// A decode problem: queries, the paged storage, each sequence's pages and length.
struct Paged {
    n: usize,
    heads: usize,
    width: usize,
    kv_lora: usize,
    q: Vec<f32>,
    rows: Vec<f32>,
    pages: Vec<Vec<usize>>,
    lens: Vec<usize>,
}

impl Paged {
    fn new(rng: &mut Rng, heads: usize, width: usize, kv_lora: usize, lens: &[usize]) -> Self {
        let n = lens.len();
        let needed: Vec<usize> = lens.iter().map(|l| l.div_ceil(PAGE_SIZE)).collect();
        let total: usize = needed.iter().sum::<usize>() + 2;
        // Pages handed out in a shuffled order: sequences are fragmented.
        let mut order: Vec<usize> = (0..total).collect();
        for i in (1..total).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let mut next = order.into_iter();
        let pages = needed.iter().map(|&k| (0..k).map(|_| next.next().unwrap()).collect()).collect();
        let scale = 1.0 / (width as f32).sqrt();
        let q = rng.values(n * heads * width).into_iter().map(|v| v * scale).collect();
        Self { n, heads, width, kv_lora, q, rows: rng.values(total * PAGE_SIZE * width), pages, lens: lens.to_vec() }
    }

    fn row(&self, s: usize, t: usize) -> usize {
        self.pages[s][t / PAGE_SIZE] * PAGE_SIZE + t % PAGE_SIZE
    }

    /// f64 attention and the bound `Σ p·|v|` of each output.
    fn exact(&self) -> (Vec<f64>, Vec<f64>) {
        let (mut out, mut bound) = (Vec::new(), Vec::new());
        for s in 0..self.n {
            for h in 0..self.heads {
                let q = &self.q[(s * self.heads + h) * self.width..][..self.width];
                let scores: Vec<f64> = (0..self.lens[s])
                    .map(|t| {
                        let r = &self.rows[self.row(s, t) * self.width..][..self.width];
                        q.iter().zip(r).map(|(&a, &b)| a as f64 * b as f64).sum()
                    })
                    .collect();
                let top = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let p: Vec<f64> = scores.iter().map(|s| (s - top).exp()).collect();
                let z: f64 = p.iter().sum();
                for c in 0..self.kv_lora {
                    let (mut v, mut b) = (0.0, 0.0);
                    for (t, pt) in p.iter().enumerate() {
                        let x = self.rows[self.row(s, t) * self.width + c] as f64;
                        v += pt / z * x;
                        b += pt / z * x.abs();
                    }
                    out.push(v);
                    bound.push(b);
                }
            }
        }
        (out, bound)
    }

    fn tensors<B: Backend>(&self, device: &B::Device) -> DecodeInputs<B> {
        let width = self.pages.iter().map(Vec::len).max().unwrap().max(1);
        let mut pages = vec![0i64; self.n * width];
        for (s, p) in self.pages.iter().enumerate() {
            for (j, &x) in p.iter().enumerate() {
                pages[s * width + j] = x as i64;
            }
        }
        DecodeInputs {
            q: Tensor::from_data(TensorData::new(self.q.clone(), [self.n, self.heads, self.width]), device),
            rows: Tensor::from_data(TensorData::new(self.rows.clone(), [self.rows.len() / self.width, self.width]), device),
            pages: Tensor::from_data(TensorData::new(pages, [self.n, width]), device),
            lens: Tensor::from_data(TensorData::new(self.lens.iter().map(|&l| l as i64).collect::<Vec<_>>(), [self.n]), device),
        }
    }

    fn run<B: MlaBackend>(&self, device: &B::Device) -> Vec<f32> {
        let DecodeInputs { q, rows, pages, lens } = self.tensors::<B>(device);
        let out = B::mla_decode(q.into_primitive().tensor(), rows.into_primitive().tensor(), pages.into_primitive(), lens.into_primitive(), self.kv_lora);
        host(Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(out)))
    }
}

/// The decode op's operands: queries `[n, H, C]`, cache rows `[rows, C]`, page tables
/// `[n, P]` and lengths `[n]`.
struct DecodeInputs<B: Backend> {
    q: Tensor<B, 3>,
    rows: Tensor<B, 2>,
    pages: Tensor<B, 2, Int>,
    lens: Tensor<B, 1, Int>,
}

/// The kernel launched into a NaN-filled output: every element must be written.
fn run_poisoned(p: &Paged) -> Vec<f32> {
    use burn_cubecl::kernel::cast;
    let device = kernel_device();
    let DecodeInputs { q, rows, pages, lens } = p.tensors::<Cube>(&device);
    let out = Tensor::<Cube, 3>::full([p.n, p.heads, p.kv_lora], f32::NAN, &device);
    let prim = |t: Tensor<Cube, 3>| t.into_primitive().tensor();
    burn_moe::kernel::mla::launch_mla_decode(
        prim(q),
        rows.into_primitive().tensor(),
        cast(pages.into_primitive(), DType::U32),
        cast(lens.into_primitive(), DType::U32),
        prim(out.clone()),
        p.kv_lora,
    );
    host(out)
}

fn check(what: &str, got: &[f32], exact: &(Vec<f64>, Vec<f64>), tol: f64) {
    assert_eq!(got.len(), exact.0.len(), "{what}: length");
    for (i, ((&g, &x), &b)) in got.iter().zip(&exact.0).zip(&exact.1).enumerate() {
        let err = (g as f64 - x).abs();
        assert!(err <= tol * b + 1e-7, "{what}[{i}]: {g} vs {x} (error {err:.2e}, bound {:.2e})", tol * b);
    }
}

/// f32 rounding of the scores (|s| up to ~20 here: exp's relative error ~|s|·2⁻²⁴) and
/// of the weighted sums over up to 200 tokens.
const DECODE_TOL: f64 = 2e-5;

#[test]
fn decode_op_matches_f64_attention_over_pages() {
    let mut rng = Rng::new("decode_op_matches_f64_attention_over_pages");
    // (heads, width, kv_lora, lens): tiny dims; a group of heads with a tail (12 = 8 + 4);
    // DeepSeek-V3's 576/512 with 16 heads; lengths 1, page edges 63/64/65, several pages.
    let cases: [(usize, usize, usize, &[usize]); 4] = [(4, 40, 32, &[1, 5, 64]), (12, 40, 32, &[63, 65, 130, 1]), (16, 576, 512, &[200, 1, 64]), (1, 72, 64, &[300])];
    for (heads, width, kv_lora, lens) in cases {
        let p = Paged::new(&mut rng, heads, width, kv_lora, lens);
        let exact = p.exact();
        let what = format!("H={heads} C={width} r={kv_lora} lens={lens:?}");
        check(&format!("{what} kernel (NaN-poisoned output)"), &run_poisoned(&p), &exact, DECODE_TOL);
        check(&format!("{what} fused Fused"), &p.run::<Fused>(&kernel_device()), &exact, DECODE_TOL);
        check(&format!("{what} reference backend"), &p.run::<Ref>(&Default::default()), &exact, DECODE_TOL);
    }
}

fn tiny(q_lora: Option<usize>, yarn: bool) -> MlaConfig {
    let config = MlaConfig::tiny().with_q_lora_rank(q_lora);
    if yarn {
        // Scaled to the tiny table: 4x over 32 original positions.
        config.with_rope_scaling(Some(YarnConfig::new().with_factor(4.0).with_original_max_position(32).with_mscale(0.7)))
    } else {
        config
    }
}

fn random<B: Backend, const D: usize>(rng: &mut Rng, shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
    let n = shape.iter().product();
    Tensor::from_data(TensorData::new(rng.values(n), shape), device)
}

fn max_rel(got: &[f32], want: &[f32]) -> f64 {
    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
    let err = got.iter().zip(want).fold(0f64, |a, (x, y)| a.max((x - y).abs() as f64));
    assert!(scale > 0.0, "a zero reference");
    err / scale
}

#[test]
fn absorbed_forward_equals_decompressed_forward() {
    let mut rng = Rng::new("absorbed_forward_equals_decompressed_forward");
    let device = Default::default();
    for (q_lora, yarn) in [(Some(48), false), (None, false), (Some(48), true)] {
        let mla = tiny(q_lora, yarn).init::<Ref>(&device);
        let x = random::<Ref, 3>(&mut rng, [2, 37, 64], &device);
        let err = max_rel(&host(mla.forward_absorbed(x.clone())), &host(mla.forward(x)));
        assert!(err <= 1e-4, "q_lora {q_lora:?} yarn {yarn}: absorbed vs decompressed {err:e}");
    }
}

/// Prefill of the first `split` tokens, then token-by-token decode: each output row equals
/// the same row of the full forward.
fn cached_equals_full<B: MlaBackend>(config: &MlaConfig, device: &B::Device, rng: &mut Rng, what: &str) {
    let mla = config.init::<B>(device);
    let (len, split) = (70, 50);
    let x = random::<B, 2>(rng, [len, config.d_model], device);
    let full = host(mla.forward(x.clone().unsqueeze_dim(0)));
    let mut cache = LatentCache::new(config, 3, device);
    cache.add_sequence(1).unwrap();
    let mut rows = host(mla.prefill(x.clone().slice([0..split, 0..config.d_model]), 1, &mut cache).unwrap());
    for t in split..len {
        rows.extend(host(mla.decode(x.clone().slice([t..t + 1, 0..config.d_model]), &[1], &mut cache).unwrap()));
    }
    let err = max_rel(&rows, &full);
    assert!(err <= 1e-4, "{what}: cached vs full forward {err:e}");

    // Paged equals contiguous: the cache holds what the latent projection gives.
    assert_eq!(cache.contiguous(1).unwrap().dims(), [len, config.cache_width()]);

    // Mixed lengths in one batch: prompts of 1, 64 and 100 tokens, then 3 batched steps.
    let mut cache = LatentCache::new(config, 6, device);
    let prompts = [1usize, 64, 100];
    let xs: Vec<Tensor<B, 2>> = prompts.iter().map(|&p| random::<B, 2>(rng, [p + 3, config.d_model], device)).collect();
    for (id, (&p, x)) in prompts.iter().zip(&xs).enumerate() {
        cache.add_sequence(id as u64).unwrap();
        mla.prefill(x.clone().slice([0..p, 0..config.d_model]), id as u64, &mut cache).unwrap();
    }
    let mut got = vec![Vec::new(); 3];
    for step in 0..3 {
        let batch = Tensor::cat(xs.iter().zip(prompts).map(|(x, p)| x.clone().slice([p + step..p + step + 1, 0..config.d_model])).collect(), 0);
        let out = host(mla.decode(batch, &[0, 1, 2], &mut cache).unwrap());
        for (s, row) in out.chunks(config.d_model).enumerate() {
            got[s].extend_from_slice(row);
        }
    }
    for (s, (x, p)) in xs.iter().zip(prompts).enumerate() {
        let full = host(mla.forward(x.clone().unsqueeze_dim(0)));
        let err = max_rel(&got[s], &full[p * config.d_model..]);
        assert!(err <= 1e-4, "{what}: batched decode of sequence {s} (prompt {p}) vs full forward {err:e}");
    }
}

#[test]
fn cached_prefill_and_decode_equal_the_full_forward() {
    let mut rng = Rng::new("cached_prefill_and_decode_equal_the_full_forward");
    for (q_lora, yarn) in [(Some(48), true), (None, false)] {
        let config = tiny(q_lora, yarn);
        cached_equals_full::<Ref>(&config, &Default::default(), &mut rng, &format!("reference q_lora {q_lora:?}"));
        cached_equals_full::<Fused>(&config, &kernel_device(), &mut rng, &format!("wgpu kernel q_lora {q_lora:?}"));
    }
}

#[test]
fn training_gradients_match_an_f64_run() {
    type A32 = Autodiff<Ref>;
    type A64 = Autodiff<burn::backend::NdArray<f64>>;
    let mut rng = Rng::new("training_gradients_match_an_f64_run");
    let device = Default::default();
    let config = tiny(Some(48), true);
    // Through a record: parameters are lazy, and a clone of a lazy module draws its own.
    let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
    let bytes = recorder.record(config.init::<A32>(&device).into_record(), ()).unwrap();
    let mla: Mla<A32> = config.init::<A32>(&device).load_record(recorder.load(bytes.clone(), &device).unwrap());
    let mla64: Mla<A64> = config.init::<A64>(&device).load_record(recorder.load(bytes, &device).unwrap());
    let x: Vec<f32> = rng.values(2 * 20 * 64);
    let target: Vec<f32> = rng.values(2 * 20 * 64);

    let x32 = Tensor::<A32, 3>::from_data(TensorData::new(x.clone(), [2, 20, 64]), &device).require_grad();
    let x64 = Tensor::<A64, 3>::from_data(TensorData::new(x, [2, 20, 64]), &device).require_grad();
    let t32 = Tensor::<A32, 3>::from_data(TensorData::new(target.clone(), [2, 20, 64]), &device);
    let t64 = Tensor::<A64, 3>::from_data(TensorData::new(target, [2, 20, 64]), &device);
    let g64 = (mla64.forward(x64.clone()) * t64).sum().backward();
    let want = |p: &Tensor<A64, 2>| host(p.grad(&g64).unwrap());
    let want_x = host(x64.grad(&g64).unwrap());
    let w64 = [mla64.wq_a.as_ref().unwrap().weight.val(), mla64.wq_b.weight.val(), mla64.wkv_a.weight.val(), mla64.wkv_b.weight.val(), mla64.wo.weight.val()];
    let want_w: Vec<Vec<f32>> = w64.iter().map(want).collect();

    for absorbed in [false, true] {
        let y = if absorbed { mla.forward_absorbed(x32.clone()) } else { mla.forward(x32.clone()) };
        let g = (y * t32.clone()).sum().backward();
        let what = if absorbed { "absorbed" } else { "decompressed" };
        let err = max_rel(&host(x32.grad(&g).unwrap()), &want_x);
        assert!(err <= 1e-4, "{what}: d x vs f64 {err:e}");
        let w32 = [mla.wq_a.as_ref().unwrap().weight.val(), mla.wq_b.weight.val(), mla.wkv_a.weight.val(), mla.wkv_b.weight.val(), mla.wo.weight.val()];
        for (i, (w, want)) in w32.iter().zip(&want_w).enumerate() {
            let err = max_rel(&host(w.grad(&g).unwrap()), want);
            assert!(err <= 1e-4, "{what}: weight {i} gradient vs f64 {err:e}");
        }
    }
    // The inner module serves.
    let _ = mla.valid();
}

/// Junk tokens appended past a page boundary and truncated away leave the cache as if
/// they had never been there (bit for bit: the rows are zero again and the page free), so
/// the decode after it equals the full forward.
fn truncated_equals_never_appended<B: MlaBackend>(config: &MlaConfig, device: &B::Device, rng: &mut Rng, what: &str) {
    let mla = config.init::<B>(device);
    let (len, split, junk) = (70, 50, 20);
    let x = random::<B, 2>(rng, [len, config.d_model], device);
    let full = host(mla.forward(x.clone().unsqueeze_dim(0)));
    let prefix = x.clone().slice([0..split, 0..config.d_model]);
    let mut clean = LatentCache::new(config, 3, device);
    clean.add_sequence(1).unwrap();
    mla.prefill(prefix.clone(), 1, &mut clean).unwrap();
    let mut cache = LatentCache::new(config, 3, device);
    cache.add_sequence(1).unwrap();
    mla.prefill(prefix, 1, &mut cache).unwrap();
    mla.prefill(random::<B, 2>(rng, [junk, config.d_model], device), 1, &mut cache).unwrap();
    assert_eq!((cache.len(1).unwrap(), cache.free_pages()), (split + junk, 1), "{what}: the junk took a second page");
    cache.truncate(1, split + junk + 5).unwrap();
    assert_eq!(cache.len(1).unwrap(), split + junk, "{what}: a longer length changes nothing");
    cache.truncate(1, split).unwrap();
    assert_eq!((cache.len(1).unwrap(), cache.free_pages()), (split, 2), "{what}: the emptied page is free");
    assert_eq!(host(cache.rows()), host(clean.rows()), "{what}: the truncated rows are zero again");
    let mut rows = Vec::new();
    for t in split..len {
        rows.extend(host(mla.decode(x.clone().slice([t..t + 1, 0..config.d_model]), &[1], &mut cache).unwrap()));
    }
    let err = max_rel(&rows, &full[split * config.d_model..]);
    assert!(err <= 1e-4, "{what}: decode after truncation vs full forward {err:e}");
    assert_eq!(cache.truncate(9, 0).unwrap_err(), CacheError::UnknownSequence { id: 9 });
}

#[test]
fn a_truncated_cache_is_one_that_never_held_the_tokens() {
    let mut rng = Rng::new("a_truncated_cache_is_one_that_never_held_the_tokens");
    let config = tiny(Some(48), true);
    truncated_equals_never_appended::<Ref>(&config, &Default::default(), &mut rng, "reference");
    truncated_equals_never_appended::<Fused>(&config, &kernel_device(), &mut rng, "wgpu kernel");
}

#[test]
fn bad_cache_use_is_named() {
    let device = Default::default();
    let config = MlaConfig::tiny();
    let mla = config.init::<Ref>(&device);
    let mut cache = LatentCache::new(&config, 1, &device);
    let row = |n: usize| Tensor::<Ref, 2>::zeros([n, config.d_model], &device) + 0.5;
    assert_eq!(mla.decode(row(1), &[3], &mut cache).unwrap_err(), CacheError::UnknownSequence { id: 3 });
    cache.add_sequence(3).unwrap();
    assert_eq!(cache.add_sequence(3).unwrap_err(), CacheError::DuplicateSequence { id: 3 });
    assert_eq!(mla.prefill(row(65), 3, &mut cache).unwrap_err(), CacheError::Full { needed: 2, free: 1 });
    assert_eq!(cache.len(3).unwrap(), 0, "a refused append leaves the cache unchanged");
    mla.prefill(row(64), 3, &mut cache).unwrap();
    assert_eq!(mla.decode(row(1), &[3], &mut cache).unwrap_err(), CacheError::Full { needed: 1, free: 0 });
    assert!(matches!(mla.decode(row(2), &[3], &mut cache), Err(CacheError::Dims { expected: 2, got: 1, .. })));
    let narrow = Tensor::<Ref, 2>::zeros([1, 8], &device);
    assert!(matches!(mla.decode(narrow, &[3], &mut cache), Err(CacheError::Dims { expected: 64, got: 8, .. })));
    let other = LatentCache::<Ref>::new(&MlaConfig::tiny().with_kv_lora_rank(16), 1, &device);
    let mut other = other;
    other.add_sequence(0).unwrap();
    assert!(matches!(mla.decode(row(1), &[0], &mut other), Err(CacheError::Dims { expected: 40, got: 24, .. })));
    // Freed pages serve the next sequence.
    cache.remove_sequence(3).unwrap();
    cache.add_sequence(4).unwrap();
    mla.prefill(row(2), 4, &mut cache).unwrap();
    // Beyond the rotary table.
    let mut long = LatentCache::new(&config, 8, &device);
    long.add_sequence(0).unwrap();
    assert_eq!(mla.prefill(Tensor::zeros([257, 64], &device), 0, &mut long).unwrap_err(), CacheError::TooLong { id: 0, len: 257, max: 256 });
    let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| mla.forward(Tensor::zeros([1, 3, 32], &device)))).unwrap_err();
    let message = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("input width 32") && message.contains("d_model 64"), "{message}");
}

#[test]
fn decode_attention_names_bad_shapes() {
    let device = Default::default();
    let q = || Tensor::<Ref, 3>::zeros([2, 4, 40], &device);
    let cache = |rows: usize, width: usize| Tensor::<Ref, 2>::zeros([rows, width], &device);
    let pages = |n: usize| Tensor::<Ref, 2, Int>::zeros([n, 1], &device);
    let lens = |n: usize| Tensor::<Ref, 1, Int>::ones([n], &device);
    let message = |f: &dyn Fn() -> Tensor<Ref, 3>| {
        let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_err();
        err.downcast_ref::<String>().cloned().unwrap_or_default()
    };
    let m = message(&|| decode_attention(q(), cache(PAGE_SIZE, 24), pages(2), lens(2), 32));
    assert!(m.contains("q [2, 4, 40]") && m.contains("cache [64, 24]"), "{m}");
    let m = message(&|| decode_attention(q(), cache(PAGE_SIZE, 40), pages(2), lens(2), 48));
    assert!(m.contains("kv_lora 48"), "{m}");
    let m = message(&|| decode_attention(q(), cache(PAGE_SIZE, 40), pages(3), lens(2), 32));
    assert!(m.contains("pages [3, 1]"), "{m}");
    let m = message(&|| decode_attention(q(), cache(PAGE_SIZE + 1, 40), pages(2), lens(2), 32));
    assert!(m.contains("whole pages") && m.contains("cache [65, 40]"), "{m}");
    // Well-formed: one sequence of one token attends to that token alone (weight 1).
    let q = Tensor::<Ref, 3>::ones([1, 2, 40], &device);
    let rows = Tensor::<Ref, 2>::ones([PAGE_SIZE, 40], &device) * 3.0;
    let out = decode_attention(q, rows, pages(1), lens(1), 32);
    assert_eq!(out.dims(), [1, 2, 32]);
    assert_eq!(host(out), vec![3.0; 64]);
}

#[test]
fn cache_is_576_values_per_token_at_v3_dims() {
    let config = MlaConfig::deepseek_v3();
    assert_eq!(config.cache_width(), 576);
    // Standard attention caches keys and values of every head: 2 · 128 · 128 (MHA with
    // V3's 128-wide heads), 56.9x the latent cache.
    assert_eq!(2 * config.n_heads * config.qk_nope_head_dim, 32768);
    let yarn = config.rope_scaling.clone().unwrap();
    let m = 0.1 * yarn.mscale_all_dim * yarn.factor.ln() + 1.0;
    assert!((config.softmax_scale() - m * m / 192f64.sqrt()).abs() < 1e-12);
    assert!(MlaConfig::deepseek_v2_lite().q_lora_rank.is_none());
}
