//! Train a tiny DeepSeek-V3 on a public-domain novel, on your CPU: the README's main
//! command.
//!
//! ```text
//! cargo run --release --example train_tiny                           # reference CPU backend, a few minutes
//! cargo run --release --example train_tiny -- --resume --steps 1200  # continue from the checkpoint
//! cargo run --release --example train_tiny -- --backend wgpu --fp8   # CubeCL kernels, FP8 MLPs and experts
//! cargo run --release --example train_tiny -- --ep 2                 # experts over 2 ranks (threads, one device each)
//! cargo run --release --example train_tiny -- --dualpipe 2           # DualPipeV: 4 stages over 2 ranks
//! cargo run --release --features cuda --example train_tiny -- --backend cuda --d-model 256 --steps 3000
//! ```
//!
//! The model is `burn_deepseek::model::DeepSeekV3` at [`DeepSeekV3Config::tiny`] (width
//! 64 by default, `--d-model` to widen): byte tokens, MLA attention in every block, a
//! dense first block then DeepSeekMoE blocks (16 routed experts, top-4 of 2/4 groups, one
//! shared, the balancing bias updated after every step), and a depth-1 multi-token
//! prediction module (λ = 0.3). The corpus is `data/around-the-world-in-80-days.txt`
//! (Project Gutenberg eBook #103, public domain) without Project Gutenberg's header and license;
//! the last 10% of the novel is held out.
//!
//! While it trains it shows a progress line: loss of the next-token head and of the MTP
//! head, tokens per second, and the expert load (max / mean tokens per expert, averaged
//! over the MoE layers; 1.0 is perfect balance). At the end (and every `--save-every`
//! steps) it writes to `--out` (default `target/train_tiny`): `model.mpk` and `optim.mpk`
//! (Burn records, full precision), `state.json` (step and loss history), `loss.svg` (the
//! loss curves), and it samples text from the trained model with the latent cache.
//!
//! `--ep N` trains with expert parallelism: N ranks (threads), each with its own device
//! (ndarray: N CPU devices; wgpu: the default adapter and the CPU adapter, N ≤ 2; cuda: GPUs
//! 0..N), its own batch, and `16 / N` of every MoE layer's experts; the MoE layers
//! exchange rows with all-to-alls and the replicated gradients are all-reduced
//! (`DeepSeekV3::shard_experts`, `sync_grads`). The checkpoint holds the whole model
//! (gathered from the ranks) and one optimizer state per rank (`optim-ep{N}-rank{r}.mpk`),
//! so `--resume` takes the same `--ep`.
//!
//! `--dualpipe N` trains with pipeline parallelism: the model cut into `2N` stages
//! (`DeepSeekV3::into_stages`; the embedding and the head/MTP tail both on rank 0) run by
//! burn-dualpipe's executor on the DualPipeV schedule over N ranks (threads, one device
//! each), the batch in `--micro-batches M` (default `2N`); the progress line adds the
//! measured pipeline bubble of the step. The checkpoint is the whole model and one
//! optimizer state, the same files as a single-device run, so either resumes the other.

use burn::config::Config;
use burn::module::{AutodiffModule, Module};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use burn_deepseek::model::{DeepSeekV3, DeepSeekV3Config, Sampling, Session};
use burn::backend::autodiff::grads::Gradients;
use burn_deepseek::dualpipe::executor::{materialize, Pipeline};
use burn_deepseek::dualpipe::schedule::{Schedule, ScheduleKind};
use burn_moe::comm::{launch, Comm, Transport};
use burn_moe::ep::EpError;
use burn_moe::MoeBackend;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[path = "common/corpus.rs"]
mod corpus;
use corpus::{corpus, Batches};

#[derive(Clone, Debug)]
struct Args {
    backend: String,
    steps: usize,
    batch: usize,
    seq: usize,
    d_model: usize,
    layers: usize,
    lr: f64,
    fp8: bool,
    resume: bool,
    ep: usize,
    dualpipe: usize,
    micro_batches: Option<usize>,
    out: PathBuf,
    save_every: usize,
    sample: usize,
    seed: u64,
}

fn parse_args() -> Args {
    let mut a = Args {
        backend: "ndarray".into(),
        steps: 1000,
        batch: 8,
        seq: 64,
        d_model: 64,
        layers: 3,
        lr: 3e-3,
        fp8: false,
        resume: false,
        ep: 1,
        dualpipe: 0,
        micro_batches: None,
        out: PathBuf::from("target/train_tiny"),
        save_every: 250,
        sample: 200,
        seed: 42,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--backend" => a.backend = value(),
            "--steps" => a.steps = value().parse().expect("--steps N"),
            "--batch" => a.batch = value().parse().expect("--batch N"),
            "--seq" => a.seq = value().parse().expect("--seq N"),
            "--d-model" => a.d_model = value().parse().expect("--d-model N"),
            "--layers" => a.layers = value().parse().expect("--layers N"),
            "--lr" => a.lr = value().parse().expect("--lr X"),
            "--fp8" => a.fp8 = true,
            "--resume" => a.resume = true,
            "--ep" => a.ep = value().parse().expect("--ep N"),
            "--dualpipe" => a.dualpipe = value().parse().expect("--dualpipe N"),
            "--micro-batches" => a.micro_batches = Some(value().parse().expect("--micro-batches M")),
            "--out" => a.out = PathBuf::from(value()),
            "--save-every" => a.save_every = value().parse().expect("--save-every N"),
            "--sample" => a.sample = value().parse().expect("--sample N"),
            "--seed" => a.seed = value().parse().expect("--seed N"),
            "--help" | "-h" => {
                println!("train_tiny [--backend ndarray|wgpu|cuda] [--steps N] [--batch N] [--seq N] [--d-model N] [--layers N] [--lr X] [--fp8] [--resume] [--ep N | --dualpipe N [--micro-batches M]] [--out DIR] [--save-every N] [--sample N] [--seed N]");
                std::process::exit(0);
            }
            other => panic!("unknown flag {other}; see --help"),
        }
    }
    assert!(a.ep >= 1, "--ep {}: at least one rank", a.ep);
    assert!(a.ep == 1 || a.dualpipe == 0, "--ep {} and --dualpipe {}: one kind of parallelism at a time", a.ep, a.dualpipe);
    assert!(a.micro_batches.is_none() || a.dualpipe > 0, "--micro-batches goes with --dualpipe");
    a
}

/// What a run keeps besides the records: the step reached and the loss history.
#[derive(Config, Debug)]
struct TrainState {
    step: usize,
    /// Per step: next-token loss.
    lm: Vec<f32>,
    /// Per step: MTP loss.
    mtp: Vec<f32>,
    /// `(step, loss)` of the held-out text.
    held_out: Vec<(usize, f32)>,
    /// The model config the records belong to.
    model: DeepSeekV3Config,
}

fn tokens<B: burn::tensor::backend::Backend>(bytes: Vec<u8>, b: usize, device: &B::Device) -> Tensor<B, 2, Int> {
    let n = bytes.len() / b;
    Tensor::from_data(TensorData::new(bytes.into_iter().map(i64::from).collect(), [b, n]), device)
}

/// Max over mean of each MoE layer's counts, averaged over the layers.
fn load_ratio<B: burn::tensor::backend::Backend>(counts: &[Tensor<B, 1, Int>]) -> f64 {
    let ratios: Vec<f64> = counts
        .iter()
        .map(|c| {
            let c: Vec<i64> = c.clone().into_data().convert::<i64>().to_vec().expect("counts");
            let mean = c.iter().sum::<i64>() as f64 / c.len() as f64;
            *c.iter().max().unwrap_or(&0) as f64 / mean.max(1e-9)
        })
        .collect();
    ratios.iter().sum::<f64>() / ratios.len().max(1) as f64
}

/// Next-token loss on `text` in windows of `seq + 2` (inference, no gradients).
fn held_out_loss<B: MoeBackend>(model: &DeepSeekV3<B>, text: &[u8], args: &Args, device: &B::Device) -> f32 {
    let n = args.seq + 2;
    let windows: Vec<u8> = text.chunks_exact(n).take(16).flatten().copied().collect();
    let b = windows.len() / n;
    let out = model.loss(tokens::<B>(windows, b, device));
    out.lm_loss.into_scalar().elem::<f32>()
}

use burn::tensor::ElementConversion;

/// The prompt the trained model continues.
const PROMPT: &str = "Phileas Fogg ";

/// Builds (or loads) the model on the first device, then trains it on one device, or with
/// its experts spread over `--ep N` ranks (one thread and one device each).
fn train<B: AutodiffBackend<Gradients = Gradients> + MoeBackend>(args: &Args, devices: &[B::Device], name: &str)
where
    B::InnerBackend: MoeBackend,
{
    let device = &devices[0];
    B::seed(device, args.seed);
    std::fs::create_dir_all(&args.out).expect("create the output directory");
    let state_path = args.out.join("state.json");
    let (model, state) = if args.resume {
        let state = TrainState::load(&state_path).unwrap_or_else(|e| panic!("--resume: cannot read {}: {e}", state_path.display()));
        let model = state.model.init::<B>(device).load_file(args.out.join("model"), &recorder(), device).expect("--resume: model record");
        println!("resumed from {} at step {}", args.out.display(), state.step);
        (model, state)
    } else {
        assert!(args.layers >= 2, "--layers {}: the tiny model has a dense block and at least one MoE block", args.layers);
        let config = DeepSeekV3Config { n_layers: args.layers, ..DeepSeekV3Config::tiny() }.with_width(args.d_model).with_fp8_everywhere(args.fp8.then(Default::default));
        let state = TrainState { step: 0, lm: Vec::new(), mtp: Vec::new(), held_out: Vec::new(), model: config.clone() };
        let model = config.init::<B>(device);
        // The initial weights drawn now, in module order: the same model for every mode.
        materialize(&model);
        (model, state)
    };
    let config = &state.model;
    let max = config.mla.max_seq_len;
    assert!(args.seq + 1 <= max, "--seq {}: the model covers {max} positions", args.seq);
    assert!(PROMPT.len() + args.sample <= max, "--sample {}: the prompt ({} bytes) and the sample must fit the model's {max} positions", args.sample, PROMPT.len());
    println!(
        "tiny DeepSeek-V3 on {name}: {} parameters, width {}, {} layers ({} dense), {} experts top-{}, MTP depth {}, FP8 {}",
        config.param_count(),
        config.d_model(),
        config.n_layers,
        config.n_dense_layers,
        config.moe.router.n_experts,
        config.moe.router.top_k,
        config.mtp_depth,
        if config.fp8.is_some() { "on" } else { "off" }
    );
    let (train_text, held_text) = corpus();
    println!("corpus: {} bytes of the novel ({} held out); batch {} × {} tokens per rank; {} steps", train_text.len() + held_text.len(), held_text.len(), args.batch, args.seq, args.steps);
    if args.dualpipe > 0 {
        return run_pipeline::<B>(args, model, state, devices);
    }
    if args.ep == 1 {
        run::<B>(args, &model, state, None, device).expect("a single device has no collectives to fail");
        return;
    }
    assert!(args.ep <= devices.len(), "--ep {}: this backend offers {} devices here", args.ep, devices.len());
    println!("expert parallelism: {} ranks, {} experts each per MoE layer", args.ep, config.moe.router.n_experts / args.ep);
    launch(Comm::group(args.ep, Transport::Host), |comm| run::<B>(args, &model, state.clone(), Some(comm.clone()), &devices[comm.rank()]))
        .unwrap_or_else(|e| panic!("expert-parallel training stopped: {e}"));
}

fn recorder() -> NamedMpkFileRecorder<FullPrecisionSettings> {
    NamedMpkFileRecorder::new()
}

/// The learning rate of the step after `step`: linear warm-up over 30 steps.
fn learning_rate(args: &Args, step: usize) -> f64 {
    args.lr * ((step + 1) as f64 / 30.0).min(1.0)
}

/// Tokens per second over the steps after the first three (compilation, autotune).
#[derive(Default)]
struct Throughput {
    tokens: usize,
    time: std::time::Duration,
}

impl Throughput {
    fn add(&mut self, step: usize, tokens: usize, since: Instant) {
        if step > 3 {
            self.time += since.elapsed();
            self.tokens += tokens;
        }
    }

    fn per_second(&self) -> f64 {
        self.tokens as f64 / self.time.as_secs_f64().max(1e-9)
    }
}

/// Records the step's losses and redraws the progress line (`extra` after the load).
fn progress(state: &mut TrainState, args: &Args, (lm, mtp): (f32, f32), tok_s: f64, load: f64, extra: &str) {
    state.lm.push(lm);
    state.mtp.push(mtp);
    let filled = 24 * state.step / args.steps;
    print!("\r[{}{}] {:>5}/{} loss {lm:.3} mtp {mtp:.3} | {tok_s:>6.0} tok/s | load max/mean {load:.2}{extra}  ", "#".repeat(filled), "-".repeat(24 - filled), state.step, args.steps);
    std::io::stdout().flush().ok();
}

/// Every `--save-every` steps and at the end: the held-out loss, `model.mpk`,
/// `state.json` and `loss.svg` (the optimizer records are written by the caller).
fn checkpoint<B: AutodiffBackend + MoeBackend>(args: &Args, state: &mut TrainState, model: &DeepSeekV3<B>, device: &B::Device, start: Instant)
where
    B::InnerBackend: MoeBackend,
{
    let (_, held_text) = corpus();
    let held = held_out_loss(&model.valid(), held_text, args, device);
    state.held_out.push((state.step, held));
    println!("\n  step {}: held-out loss {held:.3} ({:.1} s)", state.step, start.elapsed().as_secs_f64());
    model.clone().save_file(args.out.join("model"), &recorder()).expect("write the model record");
    state.save(args.out.join("state.json")).expect("write state.json");
    std::fs::write(args.out.join("loss.svg"), loss_svg(state)).expect("write loss.svg");
}

/// Continues the prompt with the trained model and the latent cache.
fn sample<B: MoeBackend>(args: &Args, state: &TrainState, model: &DeepSeekV3<B>, optim_name: &str, device: &B::Device) {
    println!("wrote {}/{{model.mpk, {optim_name}.mpk, state.json, loss.svg}}", args.out.display());
    let ids: Vec<u32> = PROMPT.bytes().map(u32::from).collect();
    let mut session = Session::new(model, &state.model.mla, ids.len() + args.sample, Sampling { seed: args.seed, ..Default::default() }, device);
    let drawn = session.generate(&ids, args.sample).expect("prompt and sample fit the cache (checked at the start)");
    let bytes: Vec<u8> = drawn.iter().map(|&t| t as u8).collect();
    println!("sample (temperature 0.8, top-40):\n{PROMPT}{}", String::from_utf8_lossy(&bytes));
}

/// The batch stream of `rank`, continuing where a resumed run stopped.
fn batches(args: &Args, step: usize, rank: usize) -> Batches<'static> {
    let (train_text, _) = corpus();
    Batches { text: train_text, state: (args.seed ^ step as u64 ^ ((rank as u64) << 32)).wrapping_mul(0x2545_F491_4F6C_DD1D) | 1 }
}

/// One rank's training loop (the only one without `--ep`): rank 0 prints, evaluates,
/// writes the model and samples; every rank writes its optimizer state.
fn run<B: AutodiffBackend + MoeBackend>(args: &Args, model: &DeepSeekV3<B>, mut state: TrainState, comm: Option<Comm>, device: &B::Device) -> Result<(), EpError>
where
    B::InnerBackend: MoeBackend,
{
    let (rank, world) = comm.as_ref().map_or((0, 1), |c| (c.rank(), c.world_size()));
    let optim_name = if world == 1 { "optim".to_string() } else { format!("optim-ep{world}-rank{rank}") };
    let mut model = match &comm {
        Some(comm) => model.shard_experts(comm, device)?,
        None => model.clone(),
    };
    let mut optim = AdamWConfig::new().with_weight_decay(0.1).init();
    if args.resume {
        let path = args.out.join(&optim_name);
        optim = optim.load_record(recorder().load(path.clone(), device).unwrap_or_else(|e| panic!("--resume: {}.mpk (the optimizer state of this rank count): {e}", path.display())));
    }
    let mut batches = batches(args, state.step, rank);
    let (start, mut speed) = (Instant::now(), Throughput::default());
    while state.step < args.steps {
        let step_start = Instant::now();
        let lr = learning_rate(args, state.step);
        let batch = tokens::<B>(batches.next(args.batch, args.seq + 2), args.batch, device);
        let out = model.try_loss(batch)?;
        let losses = (out.lm_loss.clone().into_scalar().elem::<f32>(), out.mtp_losses[0].clone().into_scalar().elem::<f32>());
        let grads = model.sync_grads(GradientsParams::from_grads(out.loss.backward(), &model))?;
        model = optim.step(lr, model, grads).update_bias(&out.counts);
        state.step += 1;
        speed.add(state.step, world * args.batch * args.seq, step_start);
        if rank == 0 {
            progress(&mut state, args, losses, speed.per_second(), load_ratio(&out.counts), "");
        }
        if state.step % args.save_every == 0 || state.step == args.steps {
            let whole = model.unshard_experts()?;
            recorder().record(optim.to_record(), args.out.join(&optim_name)).expect("write the optimizer record");
            if rank == 0 {
                checkpoint(args, &mut state, &whole, device, start);
            }
        }
    }
    // Every rank takes part in gathering the experts; rank 0 samples.
    let valid = model.unshard_experts()?.valid();
    if rank == 0 {
        sample(args, &state, &valid, &optim_name, device);
    }
    Ok(())
}

/// The training loop with `--dualpipe N`: the model cut into `2N` stages, DualPipeV over
/// `N` ranks (one thread and one device each; rank 0 holds the embedding and the
/// head/MTP tail), `--micro-batches M` (default `2N`) micro-batches per step.
fn run_pipeline<B: AutodiffBackend<Gradients = Gradients> + MoeBackend>(args: &Args, model: DeepSeekV3<B>, mut state: TrainState, devices: &[B::Device])
where
    B::InnerBackend: MoeBackend,
{
    let ranks = args.dualpipe;
    let m = args.micro_batches.unwrap_or(2 * ranks);
    assert!(ranks <= devices.len(), "--dualpipe {ranks}: this backend offers {} devices here", devices.len());
    assert!(m > 0 && args.batch % m == 0, "--batch {} does not split into {m} equal micro-batches", args.batch);
    let schedule = Schedule::new(ScheduleKind::DualPipeV, ranks, m).unwrap_or_else(|e| panic!("--dualpipe {ranks}: {e}"));
    let staged = model.into_stages(schedule.stages()).unwrap_or_else(|e| panic!("--dualpipe {ranks}: {e} (--layers N gives the model N blocks)"));
    let cut: Vec<String> = staged.stages.iter().map(|s| format!("{}{}{}", if s.embed.is_some() { "embed+" } else { "" }, s.layers.len(), if s.tail.is_some() { "+head/MTP" } else { "" })).collect();
    println!("DualPipeV: {ranks} ranks, {} stages (blocks per stage: {}), {m} micro-batches of {} rows", schedule.stages(), cut.join(" | "), args.batch / m);
    let objective = staged.objective;
    let device = &devices[0];
    let mut pipeline = Pipeline::new(staged.stages, devices[..ranks].to_vec(), schedule).expect("stages and devices fit the schedule");
    // The optimizer record is keyed by parameter id, as the whole model's: `optim.mpk`.
    let mut optim = AdamWConfig::new().with_weight_decay(0.1).init();
    if args.resume {
        let path = args.out.join("optim");
        optim = optim.load_record(recorder().load(path.clone(), device).unwrap_or_else(|e| panic!("--resume: {}.mpk: {e}", path.display())));
    }
    let mut batches = batches(args, state.step, 0);
    let (start, mut speed) = (Instant::now(), Throughput::default());
    let rows = args.batch / m;
    while state.step < args.steps {
        let step_start = Instant::now();
        let lr = learning_rate(args, state.step);
        let bytes = batches.next(args.batch, args.seq + 2);
        let micro: Vec<TensorData> = bytes.chunks(bytes.len() / m).map(|c| TensorData::new(c.iter().map(|&b| i64::from(b)).collect(), [rows, c.len() / rows])).collect();
        let inputs = micro.iter().map(|t| objective.input(Tensor::<B, 2, Int>::from_data(t.clone(), device))).collect();
        // The parts of each micro-batch's loss, kept on the device and read after the step
        // (a read inside the closure would stall the last stage's rank; under DualPipeV the
        // last stage is on rank 0, so they share a device).
        let parts = std::sync::Mutex::new(Vec::with_capacity(m));
        let out = pipeline
            .step(inputs, |y, i| {
                let loss = objective.loss(y.clone(), Tensor::from_data(micro[i].clone(), &y.device()));
                parts.lock().unwrap().push(Tensor::cat(vec![loss.lm_loss.detach(), loss.mtp_losses[0].clone().detach()], 0));
                loss.loss
            })
            .unwrap_or_else(|e| panic!("pipeline step {}: {e}", state.step + 1));
        let mean: Vec<f32> = Tensor::stack::<2>(parts.into_inner().unwrap(), 0).mean_dim(0).into_data().convert::<f32>().to_vec().expect("f32 losses");
        let counts: Vec<_> = pipeline.stages().iter().map(|s| s.take_counts(m)).collect();
        let bubble = out.timeline.bubble_fraction();
        pipeline.optimize(&mut optim, lr, out.grads);
        pipeline.map_stages(|s, stage| stage.update_bias(&counts[s]));
        state.step += 1;
        speed.add(state.step, args.batch * args.seq, step_start);
        let load = load_ratio(&counts.concat());
        progress(&mut state, args, (mean[0], mean[1]), speed.per_second(), load, &format!(" | bubble {:.0}%", 100.0 * bubble));
        if state.step % args.save_every == 0 || state.step == args.steps {
            recorder().record(optim.to_record(), args.out.join("optim")).expect("write the optimizer record");
            checkpoint(args, &mut state, &DeepSeekV3::from_stages(pipeline.stages().to_vec()), device, start);
        }
    }
    let model = DeepSeekV3::from_stages(pipeline.into_stages()).valid();
    sample(args, &state, &model, "optim", device);
}

/// The loss curves as an SVG: next-token and MTP loss (mean of every 10 steps) and the
/// held-out points.
fn loss_svg(state: &TrainState) -> String {
    let (w, h, pad) = (720.0, 360.0, 48.0);
    let smooth = |v: &[f32]| -> Vec<(f64, f64)> { v.chunks(10).enumerate().map(|(i, c)| ((i * 10 + c.len()) as f64, c.iter().sum::<f32>() as f64 / c.len() as f64)).collect() };
    let (lm, mtp) = (smooth(&state.lm), smooth(&state.mtp));
    let steps = state.step.max(1) as f64;
    let top = lm.iter().chain(&mtp).map(|p| p.1).fold(1.0, f64::max).ceil();
    let x = |s: f64| pad + s / steps * (w - 2.0 * pad);
    let y = |l: f64| h - pad - l / top * (h - 2.0 * pad);
    let line = |pts: &[(f64, f64)], color: &str| {
        let d: Vec<String> = pts.iter().map(|&(s, l)| format!("{:.1},{:.1}", x(s), y(l))).collect();
        format!("<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n", d.join(" "))
    };
    let mut svg = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
    svg += &format!("<line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{}\" stroke=\"black\"/>\n", h - pad, w - pad, h - pad, h - pad);
    for i in 0..=top as usize {
        svg += &format!("<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{i}</text>\n", pad - 6.0, y(i as f64) + 4.0);
    }
    svg += &format!("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">step (of {})</text>\n", w / 2.0, h - 12.0, state.step);
    svg += &line(&lm, "#1f77b4");
    svg += &line(&mtp, "#ff7f0e");
    for &(s, l) in &state.held_out {
        svg += &format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"#2ca02c\"/>\n", x(s as f64), y(l as f64));
    }
    svg += &format!("<text x=\"{}\" y=\"20\" fill=\"#1f77b4\">next-token loss</text><text x=\"{}\" y=\"20\" fill=\"#ff7f0e\">MTP loss (2 ahead)</text><text x=\"{}\" y=\"20\" fill=\"#2ca02c\">held out</text>\n", pad, pad + 140.0, pad + 290.0);
    svg + "</svg>\n"
}

fn main() {
    let args = parse_args();
    match args.backend.as_str() {
        #[cfg(feature = "ndarray")]
        "ndarray" => train::<burn::backend::Autodiff<burn::backend::NdArray>>(&args, &vec![Default::default(); args.ep.max(args.dualpipe)], "ndarray (reference CPU backend)"),
        #[cfg(feature = "wgpu")]
        "wgpu" => {
            use burn::backend::wgpu::WgpuDevice;
            train::<burn::backend::Autodiff<burn::backend::Wgpu>>(&args, &[WgpuDevice::DefaultDevice, WgpuDevice::Cpu], "wgpu")
        }
        #[cfg(feature = "cuda")]
        "cuda" => {
            use burn::backend::cuda::CudaDevice;
            train::<burn::backend::Autodiff<burn::backend::Cuda>>(&args, &(0..args.ep.max(args.dualpipe)).map(CudaDevice::new).collect::<Vec<_>>(), "cuda")
        }
        other => panic!("backend {other:?} is not compiled in; build with --features {other}"),
    }
}
