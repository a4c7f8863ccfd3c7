//! Text from a Hugging Face DeepSeek checkpoint folder (`config.json`, `*.safetensors`,
//! `tokenizer.json`): the prompt in one pass, then one token per step through MLA's latent
//! cache, printed as it is generated; prefill and decode speed at the end.
//!
//! ```sh
//! # the tiny fixtures that transformers wrote (tests/fixtures/hf)
//! cargo run --release --example generate -- --model tests/fixtures/hf/v3_yarn --prompt "Phileas Fogg"
//! # DeepSeek-V2-Lite (BF16 weights read as f32, ~64 GB) on an NVIDIA GPU
//! cargo run --release --features cuda --example generate -- --backend cuda \
//!     --model DeepSeek-V2-Lite --prompt "The capital of France is" --tokens 64
//! ```
//!
//! Every value is checked before the weights are read: a folder without `config.json`,
//! weights or `tokenizer.json`, a tokenizer of another vocabulary, a prompt and token count
//! beyond the model's context fail with a message naming them.

use burn_deepseek::hf::HfModel;
use burn_deepseek::model::{ModelBackend, Sampling, Session};
use clap::{Parser, ValueEnum};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Backend {
    /// Burn's CPU backend.
    Flex,
    /// The reference CPU backend.
    Ndarray,
    /// wgpu (Vulkan, Metal, DX12, or lavapipe on a CPU).
    Wgpu,
    /// NVIDIA (build with `--features cuda`).
    Cuda,
}

/// Generates text from a Hugging Face DeepSeek-V2/V3 checkpoint folder.
#[derive(Parser, Debug)]
struct Args {
    /// The checkpoint folder (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Tokens to generate at most (generation stops earlier at an end-of-sequence token).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    tokens: u32,
    /// Softmax temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Candidates of each draw (0: all).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Seed of the draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value_t = Backend::Flex)]
    backend: Backend,
}

fn run<B: ModelBackend>(args: &Args, device: &B::Device) -> Result<(), String> {
    let start = Instant::now();
    let hf = HfModel::<B>::open(&args.model, device).map_err(|e| format!("{}: {e}", args.model.display()))?;
    let prompt = hf.tokenizer.encode(&args.prompt).map_err(|e| e.to_string())?;
    if prompt.is_empty() {
        return Err(format!("the prompt {:?} encodes to no tokens", args.prompt));
    }
    let n = args.tokens as usize;
    let context = hf.config.mla.max_seq_len;
    if prompt.len() + n > context {
        return Err(format!("the prompt's {} tokens and --tokens {n} exceed the model's context of {context}", prompt.len()));
    }
    eprintln!("{}: {} parameters loaded in {:.1} s; prompt {} tokens", args.model.display(), hf.model.materialized_params(), start.elapsed().as_secs_f64(), prompt.len());
    let sampling = if args.temperature <= 0.0 { Sampling::greedy() } else { Sampling { temperature: args.temperature, top_k: args.top_k, seed: args.seed } };
    let mut session = Session::new(&hf.model, &hf.config.mla, prompt.len() + n, sampling, device);
    let mut stream = hf.tokenizer.stream();
    let mut out = std::io::stdout();
    print!("{}", args.prompt);
    let t0 = Instant::now();
    let mut first: Option<f64> = None;
    let mut error = None;
    let ids = session
        .generate_until(&prompt, n, &hf.eos, |id| {
            first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
            match stream.next(id) {
                Ok(Some(text)) => {
                    print!("{text}");
                    out.flush().ok();
                }
                Ok(None) => {}
                Err(e) => error = Some(e.to_string()),
            }
        })
        .map_err(|e| e.to_string())?;
    println!();
    if let Some(e) = error {
        return Err(e);
    }
    let total = t0.elapsed().as_secs_f64();
    let prefill = first.unwrap_or(total);
    let decoded = ids.len().saturating_sub(1);
    eprintln!(
        "prefill: {} tokens in {:.1} ms ({:.0} tokens/s); decode: {decoded} tokens in {:.1} ms ({:.1} tokens/s){}",
        prompt.len(),
        prefill * 1e3,
        prompt.len() as f64 / prefill,
        (total - prefill) * 1e3,
        decoded as f64 / (total - prefill).max(1e-9),
        if hf.eos.contains(ids.last().unwrap_or(&u32::MAX)) { "; stopped at end of sequence" } else { "" }
    );
    Ok(())
}

fn main() {
    let args = Args::parse();
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        eprintln!("error: --temperature {} must be a finite number ≥ 0", args.temperature);
        std::process::exit(2);
    }
    let result = match args.backend {
        #[cfg(feature = "flex")]
        Backend::Flex => run::<burn::backend::Flex>(&args, &Default::default()),
        #[cfg(feature = "ndarray")]
        Backend::Ndarray => run::<burn::backend::NdArray>(&args, &Default::default()),
        #[cfg(feature = "wgpu")]
        Backend::Wgpu => run::<burn::backend::Wgpu>(&args, &Default::default()),
        #[cfg(feature = "cuda")]
        Backend::Cuda => run::<burn::backend::Cuda>(&args, &Default::default()),
        #[allow(unreachable_patterns)]
        other => Err(format!("backend {other:?} is not compiled in (features flex, ndarray, wgpu, cuda)")),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
