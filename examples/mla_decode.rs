//! Multi-head Latent Attention decode: a batch of sequences, each with `L` cached tokens,
//! takes one decode step. Compared on the same device in the same run:
//!
//! - the layer: `Mla::decode` (latent projection, cache append, absorbed queries, the
//!   decode kernel over the paged latent cache, output projection) against Burn's
//!   `MultiHeadAttention::forward_cache` at the same model width and head count (its
//!   cache holds keys and values of every head);
//! - the attention op: `mla::decode_attention` (`MlaBackend::mla_decode`: the CubeCL kernel
//!   on wgpu/CUDA) against the same op in Burn's tensor ops (`mla::reference::mla_decode`)
//!   on the same paged cache;
//! - cache bytes per token and the bytes a step reads from the cache.
//!
//! ```text
//! cargo run --release --example mla_decode
//! cargo run --release --example mla_decode -- --contexts 256,1024 --batch 1 --config v3-slim
//! cargo run --release --features cuda --example mla_decode -- --backend cuda --config v3
//! ```

use burn::nn::attention::{MhaCache, MhaInput, MultiHeadAttentionConfig};
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use burn_moe::kernel::mla::HEADS;
use burn_moe::mla::{decode_attention, reference, LatentCache, MlaBackend, MlaConfig, PAGE_SIZE};
use std::time::Duration;

#[path = "common/timing.rs"]
mod timing;
use timing::{time, time_step};
#[path = "common/flags.rs"]
mod flags;
use clap::Parser;
use flags::at_least_one;

/// MLA decode over the paged latent cache: the layer, the kernel and the same op in Burn's ops.
#[derive(Parser, Debug)]
struct Args {
    /// Burn backend.
    #[arg(long, default_value = "wgpu", value_parser = ["wgpu", "cuda", "ndarray"])]
    backend: String,
    /// Attention sizes.
    #[arg(long, default_value = "small", value_parser = ["tiny", "small", "v3-slim", "v3"])]
    config: String,
    /// Cached tokens per sequence, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "128,512", value_parser = at_least_one)]
    contexts: Vec<usize>,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 4, value_parser = at_least_one)]
    batch: usize,
    /// Minimum measuring time per figure, in milliseconds.
    #[arg(long = "min-time-ms", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    min_time_ms: u64,
}

fn config(name: &str) -> MlaConfig {
    match name {
        "tiny" => MlaConfig::tiny(),
        // A quarter of V3's width and heads, its latent and head dims.
        "v3-slim" => MlaConfig::deepseek_v3().with_d_model(1792).with_n_heads(32).with_q_lora_rank(Some(384)),
        "v3" => MlaConfig::deepseek_v3(),
        "small" => MlaConfig::new()
            .with_d_model(1024)
            .with_n_heads(16)
            .with_q_lora_rank(Some(384))
            .with_kv_lora_rank(256)
            .with_qk_nope_head_dim(64)
            .with_qk_rope_head_dim(32)
            .with_v_head_dim(64)
            .with_rope_scaling(None),
        other => unreachable!("clap accepts tiny, small, v3-slim and v3, not {other:?}"),
    }
}

/// Most timed steps per measurement (each appends a token per sequence).
const MAX_RUNS: usize = 64;

fn bench<B: MlaBackend>(a: &Args, device: &B::Device) {
    let longest = a.contexts.iter().max().copied().unwrap_or(0) + MAX_RUNS + 1;
    let config = config(&a.config).with_max_seq_len(longest.max(64));
    let (d, h, n) = (config.d_model, config.n_heads, a.batch);
    let mla = config.init::<B>(device);
    let mha = MultiHeadAttentionConfig::new(d, h).init::<B>(device);
    let mla_bytes = config.cache_width() * 4;
    let mha_bytes = 2 * d * 4;
    println!(
        "mla_decode: backend {}, config {} (d_model {d}, {h} heads, latent {} + rope {}), batch {n}; cache bytes/token: MLA {mla_bytes}, MHA {mha_bytes} ({:.1}x smaller)",
        a.backend,
        a.config,
        config.kv_lora_rank,
        config.qk_rope_head_dim,
        mha_bytes as f64 / mla_bytes as f64
    );
    println!(
        "{:>7} | {:>12} | {:>12} | {:>9} | {:>12} | {:>12} | {:>7} | {:>14} | {:>14}",
        "context", "MLA step ms", "MHA step ms", "MLA/MHA", "kernel ms", "Burn ops ms", "ratio", "MLA MB/step", "MHA MB/step"
    );
    for &l in &a.contexts {
        // MLA: n sequences with l cached tokens each.
        let pages = n * (l + MAX_RUNS + 1).div_ceil(PAGE_SIZE);
        let mut cache = LatentCache::<B>::new(&config, pages, device);
        let ids: Vec<u64> = (0..n as u64).collect();
        for &id in &ids {
            cache.add_sequence(id).unwrap();
            mla.prefill(Tensor::random([l, d], Distribution::Normal(0.0, 1.0), device), id, &mut cache).unwrap();
        }
        let x = Tensor::<B, 2>::random([n, d], Distribution::Normal(0.0, 1.0), device);
        let t_mla = time::<B, _>(device, Duration::from_millis(a.min_time_ms), MAX_RUNS - 1, || mla.decode(x.clone(), &ids, &mut cache).unwrap());

        // The attention op alone, on the cache as it is now.
        let q = Tensor::<B, 3>::random([n, h, config.cache_width()], Distribution::Normal(0.0, 0.05), device);
        let len = cache.len(0).unwrap();
        let per_seq = len.div_ceil(PAGE_SIZE);
        let table: Vec<i64> = (0..n).flat_map(|s| (0..per_seq).map(move |p| (s * per_seq + p) as i64)).collect();
        let page_table = Tensor::<B, 2, Int>::from_data(TensorData::new(table, [n, per_seq]), device);
        let lens = Tensor::<B, 1, Int>::from_data(TensorData::new(vec![len as i64; n], [n]), device);
        let rows = cache.rows();
        let r = config.kv_lora_rank;
        let t_kernel = time::<B, _>(device, Duration::from_millis(a.min_time_ms), MAX_RUNS - 1, || decode_attention(q.clone(), rows.clone(), page_table.clone(), lens.clone(), r));
        let t_ops = time::<B, _>(device, Duration::from_millis(a.min_time_ms), MAX_RUNS - 1, || {
            reference::mla_decode(q.clone(), rows.clone(), page_table.clone(), lens.clone(), r, PAGE_SIZE)
        });

        // Burn's MHA with its cache: the whole sequence is passed, the cache computes the
        // new position's projections and attends over all keys. Each run fills a fresh
        // cache with `l` tokens (untimed) and times the step to `l + 1`, so every run has
        // the same shapes (on wgpu a new length is a new kernel compilation).
        let seq = Tensor::<B, 3>::random([n, l + 1, d], Distribution::Normal(0.0, 1.0), device);
        let t_mha = time_step::<B, _, _>(
            device,
            Duration::from_millis(a.min_time_ms),
            || {
                let mut cache = MhaCache::autoregressive();
                let warm = mha.forward_cache(MhaInput::self_attn(seq.clone().slice([0..n, 0..l, 0..d])), &mut cache).context;
                (cache, warm)
            },
            |(mut cache, _)| mha.forward_cache(MhaInput::self_attn(seq.clone()), &mut cache).context,
        );

        // Bytes read from the cache by one step: the kernel reads each sequence's rows
        // once per group of HEADS heads; MHA reads every head's keys and values.
        let mla_mb = (n * l * mla_bytes * h.div_ceil(HEADS)) as f64 / 1e6;
        let mha_mb = (n * l * mha_bytes) as f64 / 1e6;
        let ms = |t: Duration| t.as_secs_f64() * 1e3;
        println!(
            "{:>7} | {:>12.3} | {:>12.3} | {:>8.2}x | {:>12.3} | {:>12.3} | {:>6.2}x | {:>14.2} | {:>14.2}",
            l,
            ms(t_mla),
            ms(t_mha),
            t_mha.as_secs_f64() / t_mla.as_secs_f64(),
            ms(t_kernel),
            ms(t_ops),
            t_ops.as_secs_f64() / t_kernel.as_secs_f64(),
            mla_mb,
            mha_mb
        );
    }
    println!("MLA/MHA and ratio: how many times faster the first is (> 1: MLA / the kernel is faster).");
}

fn main() {
    let a = Args::parse();
    match a.backend.as_str() {
        "wgpu" => bench::<burn::backend::Wgpu>(&a, &Default::default()),
        "ndarray" => bench::<burn::backend::NdArray>(&a, &Default::default()),
        #[cfg(feature = "cuda")]
        "cuda" => bench::<burn::backend::Cuda>(&a, &Default::default()),
        other => panic!("backend {other} is not compiled in (features: ndarray, wgpu, cuda)"),
    }
}
