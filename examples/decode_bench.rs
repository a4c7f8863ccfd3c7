//! Decode throughput of a Hugging Face DeepSeek checkpoint folder: `B` sequences served
//! together by `model::Batch` (one decode step feeds one token of every sequence), greedy,
//! for each batch size asked; prints prefill and decode tokens/s. `benches/decode.sh`
//! runs it beside transformers' `generate` on the same checkpoint and prompts and prints
//! the ratio.
//!
//! ```sh
//! cargo run --release --example decode_bench -- --model tests/fixtures/hf/v3_yarn --batch 1,8,32 --tokens 64
//! ```
//!
//! The prompts are those of `benches/decode_transformers.py`: token `i` of sequence `b` is
//! `3 + (7·b + 13·i) mod (vocab − 3)`.

use burn_deepseek::hf::HfModel;
use burn_deepseek::model::{Batch, ModelBackend, Request};
use burn_moe::mla::PAGE_SIZE;
use clap::Parser;
use std::path::PathBuf;
use std::time::Instant;

/// Decode tokens/s of a checkpoint folder at several batch sizes.
#[derive(Parser, Debug)]
struct Args {
    /// The checkpoint folder (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32", value_parser = clap::value_parser!(u32).range(1..))]
    batch: Vec<u32>,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    prompt: u32,
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(2..))]
    tokens: u32,
    /// Repetitions of each batch size (the best is reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// `flex` or `ndarray`.
    #[arg(long, default_value = "flex")]
    backend: String,
}

/// The benchmark's prompt of sequence `b`.
fn prompt(b: usize, len: usize, vocab: usize) -> Vec<u32> {
    (0..len).map(|i| (3 + (7 * b + 13 * i) % (vocab - 3)) as u32).collect()
}

fn run<B: ModelBackend>(args: &Args, device: &B::Device) {
    let hf = HfModel::<B>::open(&args.model, device).unwrap_or_else(|e| panic!("{}: {e}", args.model.display()));
    let (len, n) = (args.prompt as usize, args.tokens as usize);
    let max = hf.config.mla.max_seq_len;
    assert!(len + n <= max, "--prompt {len} and --tokens {n} exceed the model's context of {max}");
    println!("decode_bench: {} on {}, prompt {len} tokens, {n} tokens per sequence, greedy", args.model.display(), args.backend);
    println!("{:>6} {:>22} {:>22} {:>16}", "batch", "prefill tok/s (join)", "prefill (join_all)", "decode tok/s");
    let pages = |b: usize| b * (len + n).div_ceil(PAGE_SIZE);
    let requests = |b: usize| (0..b).map(|s| (s as u64, Request::greedy(prompt(s, len, hf.config.vocab_size), n))).collect::<Vec<_>>();
    for &b in &args.batch {
        let b = b as usize;
        let (mut best_join, mut best_prefill, mut best_decode) = (0f64, 0f64, 0f64);
        for _ in 0..args.repeat {
            // One prompt per pass (`join`), as a server admitting requests one by one.
            let mut batch = Batch::new(&hf.model, &hf.config.mla, pages(b), device);
            let start = Instant::now();
            for (s, request) in requests(b) {
                batch.join(s, request).expect("the pages hold every sequence");
            }
            best_join = best_join.max((b * len) as f64 / start.elapsed().as_secs_f64());
            // Every prompt in one pass (`join_all`), then the decode steps.
            let mut batch = Batch::new(&hf.model, &hf.config.mla, pages(b), device);
            let start = Instant::now();
            batch.join_all(requests(b)).expect("the pages hold every sequence");
            let prefill = start.elapsed().as_secs_f64();
            let start = Instant::now();
            let mut drawn = 0;
            while !batch.is_empty() {
                drawn += batch.step().expect("the pages hold every sequence").len();
            }
            let decode = start.elapsed().as_secs_f64();
            assert_eq!(drawn, b * (n - 1), "every sequence drew its tokens");
            best_prefill = best_prefill.max((b * len) as f64 / prefill);
            best_decode = best_decode.max(drawn as f64 / decode);
        }
        println!("{b:>6} {best_join:>22.0} {best_prefill:>22.0} {best_decode:>16.0}");
    }
}

fn main() {
    let args = Args::parse();
    match args.backend.as_str() {
        #[cfg(feature = "flex")]
        "flex" => run::<burn::backend::Flex>(&args, &Default::default()),
        #[cfg(feature = "ndarray")]
        "ndarray" => run::<burn::backend::NdArray>(&args, &Default::default()),
        other => {
            eprintln!("error: --backend {other}: flex or ndarray");
            std::process::exit(2);
        }
    }
}
