//! Train a tiny DeepSeek-V3 on a public-domain novel, on your CPU: the README's main
//! command.
//!
//! ```text
//! cargo run --release --example train_tiny                           # Burn's Flex CPU backend, a few minutes
//! cargo run --release --example train_tiny -- --resume --steps 1200  # continue from the latest checkpoint
//! cargo run --release --example train_tiny -- --backend wgpu --fp8   # CubeCL kernels, FP8 MLPs and experts
//! cargo run --release --example train_tiny -- --ep 2                 # experts over 2 ranks (threads, one device each)
//! cargo run --release --example train_tiny -- --pp 2                 # DualPipeV: 4 stages over 2 ranks
//! cargo run --release --example train_tiny -- --pp 2 --ep 2          # and each stage's experts over 2 ranks: 4 threads
//! cargo run --release --example train_tiny -- --dp 2 --zero 1        # data parallel, optimizer state sharded (ZeRO-1)
//! cargo run --release --example train_tiny -- --dp 4 --zero 3 --dp-replicate 2  # parameters sharded too (FSDP), HSDP [2, 2]
//! cargo run --release --example train_tiny -- --moments bf16 --mtp 0  # AdamW moments in BF16, no MTP module
//! cargo build --release --features mpi --example train_tiny && mpirun -np 4 target/release/examples/train_tiny --pp 2 --ep 2
//! cargo run --release --features cuda --example train_tiny -- --backend cuda --d-model 256 --steps 3000
//! ```
//!
//! The model is `burn_deepseek::model::DeepSeekV3` at [`DeepSeekV3Config::tiny`] (width
//! 64 by default, `--d-model` to widen): byte tokens, MLA attention in every block, a
//! dense first block then DeepSeekMoE blocks (16 routed experts, top-4 of 2/4 groups, one
//! shared, the balancing bias updated after every step), and a depth-1 multi-token
//! prediction module (λ = 0.3; `--mtp D` for depth D, `--mtp 0` for none). The corpus is `data/around-the-world-in-80-days.txt`
//! (Project Gutenberg eBook #103, public domain) without Project Gutenberg's header and license;
//! the last 10% of the novel is held out.
//!
//! While it trains it shows a progress line: loss of the next-token head and of the MTP
//! head (averaged over every rank's batch), tokens per second, and the expert load (max / mean tokens per expert, averaged
//! over the MoE layers; 1.0 is perfect balance). At the end (and every `--save-every`
//! steps) it writes to `--out` (default `target/train_tiny`): `model.mpk` (the whole
//! model, a Burn record), `state.json` (step and loss history), `loss.svg` (the loss
//! curves), and a distributed checkpoint `checkpoints/step-{N}/` (burn-dcp: every rank
//! writes the parameters and AdamW moments it holds, under Hugging Face names, in a
//! background thread unless `--save-mode sync`; rank 0 prints the step's stall). At the
//! end it samples text from the trained model with the latent cache, then decodes the
//! same number of bytes greedily, plain and with the MTP module's drafts
//! (`model::Speculative`), and prints the drafts' acceptance and both speeds.
//!
//! `--resume` continues from the latest complete checkpoint in any layout and on any
//! number of ranks (each rank reads the part it now holds): the data stream is a function
//! of the step, so a run with the same global batch (`--batch × --dp × --ep` rows) takes
//! the same batches; another global batch is refused naming the flags that keep it.
//!
//! `--ep N` trains with expert parallelism: N ranks (threads), each with its own device
//! (flex, ndarray: N CPU devices; wgpu: the default adapter and the CPU adapter, N ≤ 2; cuda: GPUs
//! 0..N), its own batch, and `16 / N` of every MoE layer's experts; the MoE layers
//! exchange rows with all-to-alls and the replicated gradients are all-reduced
//! (`DeepSeekV3::shard_experts`, `sync_grads`).
//!
//! `--pp N` (or `--dualpipe N`) trains with pipeline parallelism: the model cut into `2N`
//! stages (`DeepSeekV3::into_stages`; the embedding and the head/MTP tail both on rank 0)
//! run by burn-dualpipe's executor on the DualPipeV schedule over N pipeline ranks, the
//! batch in `--micro-batches M` (default `2N`); the progress line adds the measured
//! pipeline bubble of the step. With `--ep E` as well, the ranks form a `[pp N, ep E]`
//! mesh: each pipeline rank's stages spread their experts over the E ranks of its `ep`
//! group (`ModelStage::shard_experts`), each `ep` rank trains on its own batch, and the
//! stages' replicated gradients are summed over the group (`ModelStage::sync_grads`) —
//! DeepSeek-V3's combination. The ranks are threads of this process, or, started by
//! `mpirun` with the `mpi` feature, one process each (`mpirun -np N·E`; as root with
//! OpenMPI's `OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1`, and
//! `--oversubscribe` past the core count). Rank 0 prints and writes the whole model
//! (gathered from the stages); every rank checkpoints the stages it holds.
//! Under `mpirun` without `--pp`, the processes are the `--dp` × `--ep` ranks.
//!
//! `--dp D` trains data-parallel (burn-dp): `D` replicas, each on its own batch, with
//! `--zero 0` (default) the gradients averaged over them (DDP), with `--zero 1` the
//! optimizer state sharded over them (ZeRO-1). With `--ep E` as well the ranks form a
//! `[dp D, ep E]` mesh: each `ep` group shards the experts, `dp` averages every gradient
//! and sums the MoE counts for the bias. `--moments bf16` stores AdamW's moments in BF16
//! (a backend with BF16: `--backend flex`, wgpu, cuda). At the end rank 0 prints what each
//! rank holds (parameters, gradients, moments) and the bytes it sent. With `--pp N` as well the ranks form a
//! `[pp N, dp D, ep E]` mesh: each replica of a stage averages its gradients over `dp`
//! (DDP), or with `--zero 1` each held stage has its own ZeRO-1 over `dp`; FSDP inside
//! the pipeline is not built.
//!
//! `--zero 3` shards the parameters as well (FSDP, burn-dp's `Fsdp`): each rank holds
//! `1/D` of the model's trainable values, their gradients and AdamW's moments; every step
//! all-gathers each unit just before its forward — the embedding, each block, the norm,
//! the head, the MTP module (`--fsdp-unit model`: the whole model at once) — and the
//! backward reduce-scatters its gradients. With `--ep E` the experts are sharded over
//! `ep` and then over `dp`, the dense parameters over all `D · E` ranks. `--dp-replicate R` makes
//! the `dp` ranks a `[dp_replicate R, dp_shard D/R]` mesh (HSDP with `--zero 3`, hybrid
//! ZeRO-1 with `--zero 1`): the state sharded over each group of `D/R`, the gradients
//! averaged across the `R` groups.

use burn::backend::autodiff::grads::Gradients;
use burn::config::Config;
use burn::module::{AutodiffModule, Module};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{GradientsParams, Optimizer};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use burn_dcp::{Reader, Snapshot};
use burn_deepseek::checkpoint::StateNames;
use burn_deepseek::dualpipe::executor::{materialize, Pipeline};
use burn_deepseek::dualpipe::schedule::{Schedule, ScheduleKind};
use burn_deepseek::model::{expert_load, DeepSeekV3, DeepSeekV3Config, LossOutput, ModelBackend, ModelStage, Sampling, Session, Speculative, SpeculativeStats};
use burn_dp::{AdamW as DpAdamW, AdamWConfig, Ddp, DpError, FsdpBackend, Layout, Zero1};
use burn_moe::comm::{launch, Comm, DeviceMesh, Transport};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[path = "train_tiny/ckpt.rs"]
mod ckpt;
#[path = "train_tiny/cli.rs"]
mod cli;
#[path = "common/corpus.rs"]
mod corpus;
#[path = "common/flags.rs"]
mod flags;
#[path = "train_tiny/fsdp.rs"]
mod fsdp;
use cli::Args;
use corpus::{corpus, global_rows, held_out_rows};

/// The ranks the flags ask for: `--pp N --ep E` → `N · E`; `--dp D --ep E` → `D · E`.
fn world_size(args: &Args) -> usize {
    args.pp.max(1) * args.dp * args.ep
}

/// Checks the parallel layout against the model and the world before any work: the
/// mesh's size, experts that split over `--ep`, stages that the blocks fill, micro-batches
/// that split the batch.
fn check_layout(args: &Args, config: &DeepSeekV3Config, world: usize) {
    let layout = format!("--pp {} --dp {} --ep {}", args.pp.max(1), args.dp, args.ep);
    DeviceMesh::validate(&[("pp", args.pp.max(1)), ("dp", args.dp), ("ep", args.ep)], world)
        .unwrap_or_else(|e| panic!("{layout}: {e} (start {} processes, or as many threads without mpirun)", world_size(args)));
    // The stages against the blocks of the model trained (a resumed run's are the saved
    // config's); every check of the flags alone is in `cli`.
    let stages = 2 * args.pp;
    assert!(
        args.pp == 0 || stages <= config.n_layers + 1,
        "--pp {}: DualPipeV cuts {stages} stages, the model has {} blocks and the tail ({} stages at most; --layers N gives it N blocks)",
        args.pp,
        config.n_layers,
        config.n_layers + 1
    );
}

/// What a run keeps besides the records: the step reached and the loss history.
#[derive(Config, Debug)]
struct TrainState {
    step: usize,
    /// Per step: next-token loss.
    lm: Vec<f32>,
    /// Per step: MTP loss.
    mtp: Vec<f32>,
    /// Per step: the expert load, max over mean tokens per expert (averaged over the MoE layers).
    load: Vec<f32>,
    /// `(step, loss)` of the held-out text.
    held_out: Vec<(usize, f32)>,
    /// The model config the records belong to.
    model: DeepSeekV3Config,
}

fn tokens<B: burn::tensor::backend::Backend>(bytes: Vec<u8>, b: usize, device: &B::Device) -> Tensor<B, 2, Int> {
    let n = bytes.len() / b;
    Tensor::from_data(TensorData::new(bytes.into_iter().map(i64::from).collect(), [b, n]), device)
}

/// Max over mean of each MoE layer's counts, averaged over the layers (read to the host).
fn load_ratio<B: burn::tensor::backend::Backend>(counts: &[Tensor<B, 1, Int>]) -> f64 {
    let counts: Vec<Vec<i64>> = counts.iter().map(|c| c.clone().into_data().convert::<i64>().to_vec().expect("counts")).collect();
    expert_load(&counts)
}

/// Next-token loss on `text` in windows of the training rows' `seq + 1 + mtp` bytes (inference, no gradients).
fn held_out_loss<B: ModelBackend>(model: &DeepSeekV3<B>, text: &[u8], args: &Args, device: &B::Device) -> f32 {
    let (bytes, rows) = held_out_rows(text, args.seq + 1 + args.mtp);
    let out = model.loss(tokens::<B>(bytes, rows, device));
    out.lm_loss.into_scalar().elem::<f32>()
}

use burn::tensor::ElementConversion;

/// The prompt the trained model continues.
const PROMPT: &str = "Phileas Fogg ";

/// Builds (or loads) the model on the first device, then trains it on one device, or with
/// its experts spread over `--ep N` ranks (one thread and one device each).
fn train<B: AutodiffBackend<Gradients = Gradients> + ModelBackend + FsdpBackend>(args: &Args, devices: &[B::Device], name: &str)
where
    B::InnerBackend: ModelBackend,
{
    let device = &devices[0];
    adamw(args).check::<B::InnerBackend>(device).unwrap_or_else(|e| panic!("--moments: {e}"));
    B::seed(device, args.seed);
    std::fs::create_dir_all(&args.out).expect("create the output directory");
    let (model, state, reader) = if args.resume {
        let (reader, state) = ckpt::resume(args).unwrap_or_else(|e| panic!("--resume: {e}"));
        assert_eq!(state.step as u64, reader.step(), "--resume: {}: the run state is of another step", reader.dir().display());
        assert_eq!(state.model.mtp_depth, args.mtp, "--resume with --mtp {}: the saved run has MTP depth {}", args.mtp, state.model.mtp_depth);
        // A fresh model of the saved config; every rank loads the part it holds below.
        let model = state.model.init::<B>(device);
        materialize(&model);
        println!("resuming from {} at step {} (saved by {} ranks)", reader.dir().display(), state.step, reader.metadata().world_size);
        (model, state, Some(reader))
    } else {
        let config = DeepSeekV3Config { n_layers: args.layers, mtp_depth: args.mtp, ..DeepSeekV3Config::tiny() }
            .with_width(args.d_model)
            .with_fp8_everywhere(args.fp8.then(Default::default));
        let state = TrainState { step: 0, lm: Vec::new(), mtp: Vec::new(), load: Vec::new(), held_out: Vec::new(), model: config.clone() };
        let model = config.init::<B>(device);
        // The initial weights drawn now, in module order: the same model for every mode.
        materialize(&model);
        (model, state, None)
    };
    // The checkpoints' names of every parameter, from the whole model (ids survive sharding).
    let names = StateNames::of(&model, &state.model).expect("every parameter of the tiny model has a Hugging Face name");
    let reader = reader.as_ref();
    let config = &state.model;
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
    println!(
        "corpus: {} bytes of the novel ({} held out); batch {} × {} tokens per rank; {} steps",
        train_text.len() + held_text.len(),
        held_text.len(),
        args.batch,
        args.seq,
        args.steps
    );
    #[cfg(feature = "mpi")]
    if under_mpirun() {
        // One rank per process: this process's device, the job's communicator.
        let timeout = std::time::Duration::from_secs(300);
        burn_comm::mpi::launch(timeout, |world| {
            check_layout(args, config, world.world_size());
            let world = device_engine(world, device).map_err(failed)?;
            if world.rank() == 0 {
                println!("{} MPI processes ({}): pp {} × ep {}", world.world_size(), world.engine_name(), args.pp.max(1), args.ep);
            }
            if args.pp > 0 {
                run_mesh::<B>(args, &model, state.clone(), (&names, reader), &world, device)
            } else {
                run::<B>(args, &model, state.clone(), (&names, reader), Some(world.clone()), device).map_err(failed)
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
        return;
    }
    check_layout(args, config, world_size(args));
    if args.pp > 0 {
        let ranks = world_size(args);
        println!("pipeline{}: {ranks} ranks (threads), pp {} × ep {}", if args.ep > 1 { " and expert parallelism" } else { "" }, args.pp, args.ep);
        launch(Comm::group(ranks, Transport::Host), |world| run_mesh::<B>(args, &model, state.clone(), (&names, reader), &world, &devices[world.rank() % devices.len()]))
            .unwrap_or_else(|e: RunError| panic!("pipeline training stopped: {e}"));
        return;
    }
    let ranks = world_size(args);
    if ranks == 1 {
        run::<B>(args, &model, state, (&names, reader), None, device).unwrap_or_else(|e| panic!("training stopped: {e}"));
        return;
    }
    if args.ep > 1 {
        println!("expert parallelism: {} ranks, {} experts each per MoE layer", args.ep, config.moe.router.n_experts / args.ep);
    }
    if args.dp > 1 {
        let mode = match args.zero {
            3 => "FSDP (parameters, gradients and optimizer state sharded)",
            1 => "ZeRO-1 (optimizer state sharded)",
            _ => "DDP (optimizer state replicated)",
        };
        let hybrid = if args.dp_replicate > 1 { format!(", hybrid [dp_replicate {}, dp_shard {}]", args.dp_replicate, args.dp / args.dp_replicate) } else { String::new() };
        println!("data parallelism: {} ranks, {mode}{hybrid}", args.dp);
    }
    launch(Comm::group(ranks, Transport::Host), |comm| run::<B>(args, &model, state.clone(), (&names, reader), Some(comm.clone()), &devices[comm.rank() % devices.len()]))
        .unwrap_or_else(|e| panic!("parallel training stopped: {e}"));
}

/// The job's communicator for this process's device: with NCCL beside MPI for a CUDA
/// device (feature `nccl`), MPI alone otherwise.
#[cfg(feature = "mpi")]
fn device_engine<D: std::any::Any>(world: Comm, device: &D) -> Result<Comm, burn_comm::CommError> {
    #[cfg(feature = "nccl")]
    if let Some(gpu) = (device as &dyn std::any::Any).downcast_ref::<burn::backend::cuda::CudaDevice>() {
        return world.with_nccl(gpu);
    }
    let _ = device;
    Ok(world)
}

/// Whether this process is a rank of an MPI job (started by `mpirun`).
#[cfg(feature = "mpi")]
fn under_mpirun() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"].iter().any(|v| std::env::var_os(v).is_some())
}

/// A rank's failure in the pipeline modes, as text (a communicator, expert-parallel or
/// pipeline error, by the rank that saw it).
#[derive(Debug)]
struct RunError(String);

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<burn_moe::comm::CommError> for RunError {
    fn from(e: burn_moe::comm::CommError) -> Self {
        RunError(e.to_string())
    }
}

impl burn_moe::comm::RankError for RunError {
    fn as_comm(&self) -> Option<&burn_moe::comm::CommError> {
        None
    }
}

fn failed(e: impl std::fmt::Display) -> RunError {
    RunError(e.to_string())
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
/// The next-token and first MTP losses of a step for the progress line (0 for the MTP
/// loss without MTP): host reads (each waits for the step's forward) for the display.
fn step_losses<B: burn::tensor::backend::Backend>(out: &LossOutput<B>) -> (f32, f32) {
    let mtp = out.mtp_losses.first().map_or(0.0, |l| l.clone().into_scalar().elem::<f32>());
    (out.lm_loss.clone().into_scalar().elem::<f32>(), mtp)
}

/// The step's next-token and MTP losses averaged over every rank's batch (equal rows per
/// rank), for rank 0's progress line, so that runs of any world size print the same
/// quantity. Each rank reads its two losses to the host for the exchange: the display
/// needs them, the step does not. Collective over `world`.
fn mean_losses<B: burn::tensor::backend::Backend>(world: Option<&Comm>, out: &LossOutput<B>) -> Result<Option<(f32, f32)>, RunError> {
    let mine = step_losses(out);
    let Some(world) = world.filter(|w| w.world_size() > 1) else { return Ok(Some(mine)) };
    let all = world.all_gather_host("losses", mine)?;
    let n = all.len() as f32;
    let mean = (all.iter().map(|l| l.0).sum::<f32>() / n, all.iter().map(|l| l.1).sum::<f32>() / n);
    Ok((world.rank() == 0).then_some(mean))
}

fn progress(state: &mut TrainState, args: &Args, (lm, mtp): (f32, f32), tok_s: f64, load: f64, extra: &str) {
    state.lm.push(lm);
    let mtp = if args.mtp > 0 {
        state.mtp.push(mtp);
        format!(" mtp {mtp:.3}")
    } else {
        String::new()
    };
    state.load.push(load as f32);
    let line = format!("loss {lm:.3}{mtp} | {tok_s:>6.0} tok/s | load max/mean {load:.2}{extra}");
    let bar = bar(args);
    bar.set_position(state.step as u64);
    if bar.is_hidden() {
        // Not a terminal (a log file, CI): a line every 50 steps.
        if state.step.is_multiple_of(50) || state.step == args.steps {
            println!("{:>5}/{} {line}", state.step, args.steps);
        }
    } else {
        bar.set_message(line);
    }
}

/// The run's progress bar (indicatif; hidden when stdout is not a terminal), made at the
/// first step.
fn bar(args: &Args) -> &'static ProgressBar {
    static BAR: OnceLock<ProgressBar> = OnceLock::new();
    BAR.get_or_init(|| {
        let bar = ProgressBar::with_draw_target(Some(args.steps as u64), ProgressDrawTarget::stdout());
        bar.set_style(ProgressStyle::with_template("[{bar:24}] {pos:>5}/{len} {msg}").expect("a valid template").progress_chars("#>-"));
        bar
    })
}

/// Every `--save-every` steps and at the end: the held-out loss, `model.mpk`,
/// `state.json` and `loss.svg` (the optimizer records are written by the caller).
fn checkpoint<B: AutodiffBackend + ModelBackend>(args: &Args, state: &mut TrainState, model: &DeepSeekV3<B>, device: &B::Device, start: Instant)
where
    B::InnerBackend: ModelBackend,
{
    let (_, held_text) = corpus();
    let held = held_out_loss(&model.valid(), held_text, args, device);
    state.held_out.push((state.step, held));
    let bar = bar(args);
    if state.step >= args.steps {
        bar.finish();
    }
    bar.suspend(|| println!("  step {}: held-out loss {held:.3} ({:.1} s)", state.step, start.elapsed().as_secs_f64()));
    model.clone().save_file(args.out.join("model"), &recorder()).expect("write the model record");
    state.save(args.out.join("state.json")).expect("write state.json");
    std::fs::write(args.out.join("loss.svg"), loss_svg(state)).expect("write loss.svg");
}

/// Continues the prompt with the trained model and the latent cache.
fn sample<B: ModelBackend>(args: &Args, state: &TrainState, model: &DeepSeekV3<B>, device: &B::Device) {
    println!(
        "wrote {}/{{model.mpk, state.json, loss.svg}} and the distributed checkpoint {}",
        args.out.display(),
        burn_dcp::step_dir(&ckpt::root(args), state.step as u64).display()
    );
    let ids: Vec<u32> = PROMPT.bytes().map(u32::from).collect();
    let mut session = Session::new(model, &state.model.mla, ids.len() + args.sample, Sampling { seed: args.seed, ..Default::default() }, device);
    let drawn = session.generate(&ids, args.sample).expect("prompt and sample fit the cache (checked at the start)");
    let bytes: Vec<u8> = drawn.iter().map(|&t| t as u8).collect();
    println!("sample (temperature 0.8, top-40):\n{PROMPT}{}", String::from_utf8_lossy(&bytes));
    if !model.mtp.is_empty() && args.sample >= 2 {
        speculative(args, state, model, &ids, device);
    }
}

/// Greedy decoding of `--sample` tokens, plain and with the MTP module's drafts
/// (speculative decoding): the same tokens, the drafts' acceptance and both speeds.
fn speculative<B: ModelBackend>(args: &Args, state: &TrainState, model: &DeepSeekV3<B>, ids: &[u32], device: &B::Device) {
    let capacity = ids.len() + args.sample;
    // Best of 3 runs each (the first also warms the allocations up).
    let best = |run: &mut dyn FnMut()| {
        (0..3)
            .map(|_| {
                let start = Instant::now();
                run();
                start.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let mut plain = Vec::new();
    let plain_s = best(&mut || plain = Session::new(model, &state.model.mla, capacity, Sampling::greedy(), device).generate(ids, args.sample).expect("checked at the start"));
    let (mut drafted, mut stats) = (Vec::new(), SpeculativeStats::default());
    let fast_s = best(&mut || {
        let mut fast = Speculative::new(model, &state.model.mla, capacity, device).expect("the model has an MTP module");
        drafted = fast.generate(ids, args.sample).expect("checked at the start");
        stats = fast.stats();
    });
    assert_eq!(drafted, plain, "speculative decoding gives the greedy tokens");
    let n = args.sample as f64;
    println!(
        "greedy decoding of {} tokens with MTP drafts: {:.0}% of {} drafts accepted, {} steps instead of {}; {:.0} tok/s against {:.0} tok/s plain ({:.2}x)",
        args.sample,
        100.0 * stats.acceptance(),
        stats.drafted,
        stats.steps,
        args.sample.saturating_sub(1),
        n / fast_s,
        n / plain_s,
        plain_s / fast_s
    );
}

/// Step `step`'s `--batch` rows of data-parallel replica (or expert rank) `replica`: its
/// share of the step's global batch, which depends on the step alone (a resumed run on
/// another number of ranks reads the same rows).
fn batch_rows(args: &Args, step: usize, replica: usize) -> Vec<u8> {
    let (train_text, _) = corpus();
    global_rows(train_text, args.seed, step, replica * args.batch, args.batch, args.seq + 1 + args.mtp)
}

/// The optimizer of every mode: burn-dp's AdamW with Burn's AdamW defaults (β₂ 0.999,
/// ε 1e-5; the same update as Burn's), weight decay 0.1, moments as `--moments` says.
fn adamw(args: &Args) -> AdamWConfig {
    AdamWConfig::new().with_beta_2(0.999).with_epsilon(1e-5).with_weight_decay(0.1).with_moments(args.moments)
}

/// The optimizer step of a rank: Burn's adaptor around burn-dp's AdamW (f32 or BF16
/// moments), the gradients averaged over the `dp` ranks (DDP) or the state sharded over
/// them (ZeRO-1).
enum DpOptim<B: AutodiffBackend + ModelBackend>
where
    B::InnerBackend: ModelBackend,
{
    Replicated(Option<Ddp>, OptimizerAdaptor<DpAdamW, DeepSeekV3<B>, B>),
    Zero(Zero1<OptimizerAdaptor<DpAdamW, DeepSeekV3<B>, B>>),
}

impl<B: AutodiffBackend + ModelBackend> DpOptim<B>
where
    B::InnerBackend: ModelBackend,
{
    /// `groups`: the whole `dp` group, and its `[dp_shard, dp_replicate]` communicators.
    fn new(args: &Args, groups: Option<&DpGroups>) -> Self {
        let adamw = adamw(args).init();
        match (groups, args.zero) {
            (Some(g), 1) => match &g.replicas {
                Some(r) => DpOptim::Zero(Zero1::new(adamw, g.shard.clone()).with_replicas(r.clone())),
                None => DpOptim::Zero(Zero1::new(adamw, g.dp.clone())),
            },
            (g, _) => DpOptim::Replicated(g.map(|g| Ddp::new(g.dp.clone())), adamw),
        }
    }

    fn adamw(&self) -> &OptimizerAdaptor<DpAdamW, DeepSeekV3<B>, B> {
        match self {
            DpOptim::Replicated(_, o) => o,
            DpOptim::Zero(z) => z.optimizer(),
        }
    }

    /// The parameters whose state this rank keeps: its ZeRO-1 shard's; all (`None`) when
    /// replicated.
    fn keep(&self, model: &DeepSeekV3<B>) -> Option<std::collections::HashSet<burn::module::ParamId>> {
        match self {
            DpOptim::Replicated(..) => None,
            DpOptim::Zero(z) => {
                let layout = Layout::of::<B, _>(model);
                Some(layout.ids[z.shard_of(&layout, z.comm().rank())].iter().copied().collect())
            }
        }
    }

    fn load(&mut self, record: <OptimizerAdaptor<DpAdamW, DeepSeekV3<B>, B> as Optimizer<DeepSeekV3<B>, B>>::Record) {
        match self {
            DpOptim::Replicated(_, o) => *o = o.clone().load_record(record),
            DpOptim::Zero(z) => *z.optimizer_mut() = z.optimizer().clone().load_record(record),
        }
    }

    fn step(&mut self, lr: f64, model: DeepSeekV3<B>, grads: GradientsParams) -> Result<DeepSeekV3<B>, DpError> {
        match self {
            DpOptim::Replicated(ddp, o) => {
                let grads = match ddp {
                    Some(ddp) => ddp.sync(&model, grads)?,
                    None => grads,
                };
                Ok(o.step(lr, model, grads))
            }
            DpOptim::Zero(z) => z.step(lr, model, grads),
        }
    }
}

/// The data-parallel communicators of a rank: the whole `dp` group, and the groups of
/// the `[dp_replicate, dp_shard]` mesh it forms (`replicas` when `--dp-replicate` > 1).
struct DpGroups {
    dp: Comm,
    shard: Comm,
    replicas: Option<Comm>,
}

impl DpGroups {
    /// The `dp_replicate` and `dp_shard` dimensions of `mesh` (`None` without `--dp`).
    fn of(args: &Args, mesh: &DeviceMesh) -> Result<Option<DpGroups>, RunError> {
        if args.dp == 1 {
            return Ok(None);
        }
        let dp = mesh.group(&["dp_replicate", "dp_shard"]).map_err(failed)?;
        let shard = mesh.comm("dp_shard").map_err(failed)?.clone();
        let replicas = (args.dp_replicate > 1).then(|| mesh.comm("dp_replicate").cloned()).transpose().map_err(failed)?;
        Ok(Some(DpGroups { dp, shard, replicas }))
    }
}

/// The `[dp_replicate, dp_shard, ep]` mesh of a run without `--pp`.
fn dp_ep_mesh(args: &Args, world: &Comm) -> Result<DeviceMesh, RunError> {
    DeviceMesh::new(world, &[("dp_replicate", args.dp_replicate), ("dp_shard", args.dp / args.dp_replicate), ("ep", args.ep)]).map_err(failed)
}

/// The MoE layers' token counts summed over the `dp` ranks (each `ep` group counted its
/// own tokens), so that every replica updates the balancing bias alike.
fn counts_over<B: burn::tensor::backend::Backend>(counts: Vec<Tensor<B, 1, Int>>, dp: &Comm) -> Result<Vec<Tensor<B, 1, Int>>, DpError> {
    if counts.is_empty() {
        return Ok(counts); // a stage without MoE layers
    }
    let sizes: Vec<usize> = counts.iter().map(|c| c.dims()[0]).collect();
    let flat = Tensor::cat(counts.into_iter().map(|c| c.float()).collect(), 0);
    // Counts below 2^24 are exact in f32.
    let summed = burn_dp::collective::all_reduce(flat, dp)?;
    Ok(summed.split_with_sizes(sizes, 0).into_iter().map(|c| c.int()).collect())
}

/// One rank's training loop without `--pp`: alone, or one of the `[dp, ep]` mesh's ranks
/// — the MoE layers' experts spread over the `ep` group, the gradients averaged (DDP) or
/// the optimizer state sharded (ZeRO-1) over the `dp` group. Rank 0 prints, evaluates,
/// writes the model and samples; every rank checkpoints what it holds.
fn run<B: AutodiffBackend + ModelBackend + FsdpBackend>(
    args: &Args,
    model: &DeepSeekV3<B>,
    mut state: TrainState,
    (names, reader): Resume<'_>,
    world: Option<Comm>,
    device: &B::Device,
) -> Result<(), RunError>
where
    B::InnerBackend: ModelBackend,
{
    let (rank, ranks) = world.as_ref().map_or((0, 1), |c| (c.rank(), c.world_size()));
    let all = world.clone().unwrap_or_else(|| Comm::group(1, Transport::Host).remove(0));
    let mut saver = ckpt::Saver::new(args, &all, names.clone())?;
    if args.zero == 3 {
        return fsdp::run(args, model, state, (&mut saver, reader), &all, device);
    }
    let (ep, groups) = match &world {
        Some(world) => {
            let mesh = dp_ep_mesh(args, world)?;
            let ep = (args.ep > 1).then(|| mesh.comm("ep").cloned()).transpose().map_err(failed)?;
            (ep, DpGroups::of(args, &mesh)?)
        }
        None => (None, None),
    };
    let dp = groups.as_ref().map(|g| g.dp.clone());
    let mut model = match (&ep, &world) {
        (Some(comm), _) => model.shard_experts(comm, device).map_err(failed)?,
        // A replica of its own (fresh autodiff leaves): threads must not share a graph.
        (None, Some(_)) => model.clone().fork(device),
        (None, None) => model.clone(),
    };
    let mut optim = DpOptim::<B>::new(args, groups.as_ref());
    if let Some(reader) = reader {
        // This rank's part: the parameters it holds (its experts), the moments it keeps.
        let load_start = Instant::now();
        let h = saver.holding(ep.as_ref());
        model = ckpt::loaded("the model", h.load_module(&model, reader))?;
        let keep = optim.keep(&model);
        optim.load(ckpt::loaded("the optimizer state", h.load_adamw(&model, reader, keep.as_ref()))?);
        ckpt::report_load(rank, reader, load_start);
    }
    let (start, mut speed) = (Instant::now(), Throughput::default());
    let mut held = None;
    while state.step < args.steps {
        let step_start = Instant::now();
        let lr = learning_rate(args, state.step);
        let batch = tokens::<B>(batch_rows(args, state.step, rank), args.batch, device);
        let out = model.try_loss(batch).map_err(failed)?;
        let losses = mean_losses(world.as_ref(), &out)?;
        let grads = model.sync_grads(GradientsParams::from_grads(out.loss.backward(), &model)).map_err(failed)?;
        // What this rank holds is measured on the first step (the layout does not change).
        let layout = held.is_none().then(|| Layout::of::<B, _>(&model));
        let grad_bytes = layout.as_ref().map_or(0, |l| burn_dp::memory::grad_bytes::<B>(&grads, l));
        let counts = match &dp {
            Some(dp) => counts_over(out.counts, dp).map_err(failed)?,
            None => out.counts,
        };
        model = optim.step(lr, model, grads).map_err(failed)?.update_bias(&counts);
        if let Some(layout) = &layout {
            // What this rank holds, from its tensors: parameters, one step's gradients, the
            // optimizer's moments.
            held = Some((burn_dp::memory::param_bytes(&model), grad_bytes, burn_dp::memory::adamw_state_bytes(optim.adamw(), layout)));
        }
        state.step += 1;
        speed.add(state.step, ranks * args.batch * args.seq, step_start);
        if let Some(losses) = losses {
            progress(&mut state, args, losses, speed.per_second(), load_ratio(&counts), "");
        }
        if state.step.is_multiple_of(args.save_every) || state.step == args.steps {
            let whole = model.unshard_experts().map_err(failed)?;
            if rank == 0 {
                checkpoint(args, &mut state, &whole, device, start);
            }
            let snapshot_start = Instant::now();
            let h = saver.holding(ep.as_ref());
            let mut snapshot = Snapshot::new();
            snapshot.chunks = ckpt::loaded("the model", h.module_chunks(&model))?;
            snapshot.chunks.extend(ckpt::loaded("the optimizer state", h.adamw_chunks(&model, &optim.adamw().to_record()))?);
            saver.save(args, &state, snapshot, snapshot_start.elapsed())?;
        }
    }
    saver.finish()?;
    if let Some(held) = held {
        // Tensor bytes this rank sent to others over the run: expert all-to-alls and
        // gradient sync (ep), data-parallel collectives (dp).
        let sent = ep.iter().chain(dp.iter()).map(|c| c.sent_bytes() as usize).sum::<usize>();
        report_held(args, world.as_ref(), held, sent, state.step)?;
    }
    // Every rank takes part in gathering the experts; rank 0 samples.
    let valid = model.unshard_experts().map_err(failed)?.valid();
    if rank == 0 {
        sample(args, &state, &valid, device);
    }
    Ok(())
}

/// What a rank needs to checkpoint and resume: the parameters' names, and the checkpoint
/// to load (`--resume`).
type Resume<'a> = (&'a StateNames, Option<&'a Reader>);

/// Rank 0 prints what every rank holds — `(parameters, gradients, moments)` bytes — and
/// the tensor bytes it `sent` over `steps`. Collective over `world`.
fn report_held(args: &Args, world: Option<&Comm>, (params, grads, moments): (usize, usize, usize), sent: usize, steps: usize) -> Result<(), RunError> {
    let all = match world {
        Some(w) => w.all_gather_host("held bytes", (params, grads, moments, sent)).map_err(failed)?,
        None => vec![(params, grads, moments, sent)],
    };
    if world.is_none_or(|w| w.rank() == 0) {
        let mb = |b: usize| b as f64 / 1e6;
        for (r, (p, g, m, sent)) in all.iter().enumerate() {
            println!(
                "rank {r} holds: parameters {:.2} MB, gradients {:.2} MB, AdamW moments ({:?}) {:.2} MB; sent {:.1} MB in {steps} steps",
                mb(*p),
                mb(*g),
                args.moments,
                mb(*m),
                mb(*sent)
            );
        }
    }
    Ok(())
}

/// One rank's training loop with `--pp N [--ep E]`: the world laid out as a `[pp, ep]`
/// mesh, the model cut into `2N` stages run by DualPipeV over the `pp` group, the stages
/// this rank holds sharded over its `ep` group, `--micro-batches M` (default `2N`) per
/// step. World rank 0 prints, evaluates, writes the model and samples.
fn run_mesh<B: AutodiffBackend<Gradients = Gradients> + ModelBackend>(
    args: &Args,
    model: &DeepSeekV3<B>,
    mut state: TrainState,
    (names, reader): Resume<'_>,
    world: &Comm,
    device: &B::Device,
) -> Result<(), RunError>
where
    B::InnerBackend: ModelBackend,
{
    let (pp, dp, ep) = (args.pp, args.dp, args.ep);
    let mesh = DeviceMesh::new(world, &[("pp", pp), ("dp", dp), ("ep", ep)]).map_err(failed)?;
    let (pp_comm, ep_comm) = (mesh.comm("pp").map_err(failed)?.clone(), mesh.comm("ep").map_err(failed)?.clone());
    // The data-parallel replicas of this rank's stages (same pipeline and expert coordinates).
    let dp_comm = (dp > 1).then(|| mesh.comm("dp").cloned()).transpose().map_err(failed)?;
    let (p, e, rank) = (pp_comm.rank(), ep_comm.rank(), world.rank());
    let d = dp_comm.as_ref().map_or(0, Comm::rank);
    let m = args.micro_batches.unwrap_or(2 * pp);
    let schedule = Schedule::new(ScheduleKind::DualPipeV, pp, m).map_err(failed)?;
    let staged = model.clone().into_stages(schedule.stages()).map_err(failed)?;
    let objective = staged.objective.with_expert_ranks(ep);
    let held: Vec<usize> = (0..schedule.kind.chunks_per_rank()).map(|c| schedule.stage_of_chunk(p, c)).collect();
    if rank == 0 {
        let cut: Vec<String> = staged
            .stages
            .iter()
            .map(|s| format!("{}{}{}", if s.embed.is_some() { "embed+" } else { "" }, s.layers.len(), if s.tail.is_some() { "+head/MTP" } else { "" }))
            .collect();
        println!(
            "DualPipeV: {pp} pipeline ranks, {} stages (blocks per stage: {}), {m} micro-batches of {} rows; {ep} expert ranks per stage; {dp} data-parallel replicas ({})",
            schedule.stages(),
            cut.join(" | "),
            args.batch / m,
            if args.zero == 1 { "ZeRO-1" } else { "DDP" }
        );
    }
    let mut stages = staged.stages;
    let mut stage_comms = Vec::new();
    if ep > 1 {
        for &s in &held {
            // One communicator per stage: a rank runs its two stages' passes at once.
            let comm = ep_comm.split(0, e)?;
            stages[s] = stages[s].shard_experts(&comm, device).map_err(failed)?;
            stage_comms.push(comm);
        }
    }
    let mut saver = ckpt::Saver::new(args, world, names.clone())?;
    // The stages' experts are sharded over ep with the identity placement: ep rank e holds
    // the e-th slice of each stack.
    let ep_place = (ep > 1).then_some(&ep_comm);
    let load_start = Instant::now();
    if let Some(reader) = reader {
        let h = saver.holding(ep_place);
        for &s in &held {
            stages[s] = ckpt::loaded(&format!("stage {s}"), h.load_module(&stages[s], reader))?;
        }
    }
    let mut pipeline = Pipeline::new(stages, vec![device.clone(); pp], schedule).map_err(failed)?;
    // One DDP per held stage (each stage its own parameter layout), or with --zero 1 one
    // ZeRO-1 per held stage (each keeps the moments of its shard of that stage).
    let ddps: Vec<Option<Ddp>> = held.iter().map(|_| dp_comm.clone().filter(|_| args.zero == 0).map(Ddp::new)).collect();
    let mut zeros: Vec<Zero1<_>> = match (&dp_comm, args.zero) {
        (Some(dp), 1) => held.iter().map(|_| Zero1::new(adamw(args).init::<B, ModelStage<B>>(), dp.clone())).collect(),
        _ => Vec::new(),
    };
    let mut optim = adamw(args).init();
    if let Some(reader) = reader {
        let h = saver.holding(ep_place);
        let stages = pipeline.stages();
        match zeros.is_empty() {
            // One optimizer steps every held stage: one record of all their parameters.
            true => {
                let mut record = burn_deepseek::checkpoint::AdamWRecord::default();
                for &s in &held {
                    record.extend(ckpt::loaded(&format!("the optimizer state of stage {s}"), h.load_adamw(&stages[s], reader, None))?);
                }
                optim = optim.load_record(record);
            }
            false => {
                for (z, &s) in zeros.iter_mut().zip(&held) {
                    let layout = Layout::of::<B, _>(&stages[s]);
                    let keep = layout.ids[z.shard_of(&layout, z.comm().rank())].iter().copied().collect();
                    let record = ckpt::loaded(&format!("the optimizer state of stage {s}"), h.load_adamw(&stages[s], reader, Some(&keep)))?;
                    *z.optimizer_mut() = z.optimizer().clone().load_record(record);
                }
            }
        }
        ckpt::report_load(rank, reader, load_start);
    }
    let (start, mut speed) = (Instant::now(), Throughput::default());
    let rows = args.batch / m;
    while state.step < args.steps {
        let step_start = Instant::now();
        let lr = learning_rate(args, state.step);
        let bytes = batch_rows(args, state.step, d * ep + e);
        let micro: Vec<TensorData> = bytes.chunks(bytes.len() / m).map(|c| TensorData::new(c.iter().map(|&b| i64::from(b)).collect(), [rows, c.len() / rows])).collect();
        let inputs = micro.iter().map(|t| objective.input(Tensor::<B, 2, Int>::from_data(t.clone(), device))).collect();
        // The parts of each micro-batch's loss, kept on the device and read after the step
        // (a read inside the closure would stall the last stage's rank).
        let parts = std::sync::Mutex::new(Vec::with_capacity(m));
        let out = pipeline
            .step_rank(&pp_comm, inputs, |y, i| {
                let loss = objective.loss(y.clone(), Tensor::from_data(micro[i].clone(), &y.device()));
                let mtp = loss.mtp_losses.first().map_or_else(|| loss.lm_loss.zeros_like(), |l| l.clone());
                parts.lock().unwrap().push(Tensor::cat(vec![loss.lm_loss.detach(), mtp.detach()], 0));
                loss.loss
            })
            .map_err(|e| failed(format!("pipeline step {}: {e}", state.step + 1)))?;
        let parts = parts.into_inner().unwrap();
        // The rank with the last stage read its micro-batches' losses; one host exchange
        // for the progress line.
        let mine = (!parts.is_empty()).then(|| Tensor::stack::<2>(parts, 0).mean_dim(0).into_data().convert::<f32>().to_vec::<f32>().expect("f32 losses"));
        let mut grads = pipeline.stage_grads(out.grads);
        let mut counts: Vec<Vec<Tensor<B, 1, Int>>> = vec![Vec::new(); pipeline.stages().len()];
        for (i, &s) in held.iter().enumerate() {
            let stage = &pipeline.stages()[s];
            grads[s] = stage.sync_grads(std::mem::replace(&mut grads[s], GradientsParams::new())).map_err(failed)?;
            counts[s] = stage.take_counts(m);
            if let Some(ddp) = &ddps[i] {
                grads[s] = ddp.sync(stage, std::mem::replace(&mut grads[s], GradientsParams::new())).map_err(failed)?;
            }
            // Every replica updates the bias from the whole batch's counts.
            if let Some(dp) = &dp_comm {
                counts[s] = counts_over(std::mem::take(&mut counts[s]), dp).map_err(failed)?;
            }
        }
        let bubble = out.timeline.bubble_fraction();
        if zeros.is_empty() {
            pipeline.optimize_stages(&mut optim, lr, grads);
        } else {
            // ZeRO-1 per held stage: reduce-scatter its gradients over dp, step the shard,
            // all-gather the parameters (the same order on every dp replica).
            let mut failure = None;
            pipeline.map_stages(|s, stage| match held.iter().position(|&h| h == s) {
                Some(i) if failure.is_none() => zeros[i].step(lr, stage.clone(), std::mem::replace(&mut grads[s], GradientsParams::new())).unwrap_or_else(|e| {
                    failure = Some(e);
                    stage
                }),
                _ => stage,
            });
            if let Some(e) = failure {
                return Err(failed(format!("ZeRO-1 step {}: {e}", state.step + 1)));
            }
        }
        pipeline.map_stages(|s, stage| if held.contains(&s) { stage.update_bias(&counts[s]) } else { stage });
        let losses = world.all_gather_host("losses", mine)?;
        let losses: Vec<&Vec<f32>> = losses.iter().flatten().collect();
        let mean = |i: usize| losses.iter().map(|l| l[i]).sum::<f32>() / losses.len().max(1) as f32;
        state.step += 1;
        speed.add(state.step, dp * ep * args.batch * args.seq, step_start);
        if rank == 0 {
            let load = load_ratio(&held.iter().flat_map(|&s| counts[s].clone()).collect::<Vec<_>>());
            progress(&mut state, args, (mean(0), mean(1)), speed.per_second(), load, &format!(" | bubble {:.0}%", 100.0 * bubble));
        }
        if state.step.is_multiple_of(args.save_every) || state.step == args.steps {
            if let Some(whole) = gather_model(&pipeline, &held, &pp_comm, (d, e), device)? {
                checkpoint(args, &mut state, &whole, device, start);
            }
            // Every rank its held stages and their moments; the dp replicas' copies are
            // written once.
            let snapshot_start = Instant::now();
            let h = saver.holding(ep_place);
            let mut snapshot = Snapshot::new();
            let record = optim.to_record();
            for (i, &s) in held.iter().enumerate() {
                let stage = &pipeline.stages()[s];
                snapshot.chunks.extend(ckpt::loaded(&format!("stage {s}"), h.module_chunks(stage))?);
                let record = match zeros.get(i) {
                    Some(z) => z.optimizer().to_record(),
                    None => record.clone(),
                };
                snapshot.chunks.extend(ckpt::loaded(&format!("the optimizer state of stage {s}"), h.adamw_chunks(stage, &record))?);
            }
            saver.save(args, &state, snapshot, snapshot_start.elapsed())?;
        }
    }
    saver.finish()?;
    // What each rank sent over the run: activations and gradients to its pipeline
    // neighbours, expert rows to its expert group.
    let sent = (pp_comm.sent_bytes(), stage_comms.iter().map(Comm::sent_bytes).sum::<u64>(), dp_comm.as_ref().map_or(0, Comm::sent_bytes));
    let sent = world.all_gather_host("bytes sent", sent)?;
    if let Some(whole) = gather_model(&pipeline, &held, &pp_comm, (d, e), device)? {
        let per_rank: Vec<String> = sent.iter().map(|(p, x, g)| format!("{:.1}+{:.1}+{:.1}", *p as f64 / 1e6, *x as f64 / 1e6, *g as f64 / 1e6)).collect();
        println!("MB sent per rank (pipeline + experts + data-parallel gradients, {} steps on {}): {}", state.step, world.engine_name(), per_rank.join(" | "));
        println!("tokens/s over the run: {:.0}", speed.per_second());
        sample(args, &state, &whole.valid(), device);
    }
    Ok(())
}

/// The whole model on world rank 0 (`None` elsewhere): every rank unshards the experts of
/// the stages it holds (collective over each stage's group), the pipeline ranks of
/// replica 0 and `ep` coordinate 0 (`(d, e)`) send theirs to pipeline rank 0 as Burn
/// records.
fn gather_model<B: AutodiffBackend<Gradients = Gradients> + ModelBackend>(
    pipeline: &Pipeline<B, ModelStage<B>, 3>,
    held: &[usize],
    pp_comm: &Comm,
    (d, e): (usize, usize),
    device: &B::Device,
) -> Result<Option<DeepSeekV3<B>>, RunError>
where
    B::InnerBackend: ModelBackend,
{
    let bytes = BinBytesRecorder::<FullPrecisionSettings>::default();
    let mut stages = pipeline.stages().to_vec();
    for &s in held {
        stages[s] = stages[s].unshard_experts().map_err(failed)?;
    }
    if d != 0 || e != 0 {
        return Ok(None);
    }
    let p = pp_comm.rank();
    if p != 0 {
        for &s in held {
            let record = bytes.record(stages[s].clone().into_record(), ()).map_err(failed)?;
            pp_comm.send("stage record", s as u64, 0, record)?;
        }
        return Ok(None);
    }
    let schedule = pipeline.schedule();
    for q in 1..pp_comm.world_size() {
        for c in 0..schedule.kind.chunks_per_rank() {
            let s = schedule.stage_of_chunk(q, c);
            let record: Vec<u8> = pp_comm.recv("stage record", s as u64, q)?;
            let loaded = bytes.load(record, device).map_err(failed)?;
            stages[s] = stages[s].clone().load_record(loaded);
        }
    }
    Ok(Some(DeepSeekV3::from_stages(stages)))
}

/// The loss curves as an SVG: next-token and MTP loss (mean of every 10 steps) and the
/// held-out points.
fn loss_svg(state: &TrainState) -> String {
    use plotters::prelude::*;
    let smooth = |v: &[f32]| -> Vec<(f64, f64)> { v.chunks(10).enumerate().map(|(i, c)| ((i * 10 + c.len()) as f64, c.iter().sum::<f32>() as f64 / c.len() as f64)).collect() };
    let (lm, mtp) = (smooth(&state.lm), smooth(&state.mtp));
    let top = lm.iter().chain(&mtp).map(|p| p.1).chain(state.held_out.iter().map(|p| p.1 as f64)).fold(1.0, f64::max).ceil();
    let (blue, orange, green) = (RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44));
    let mut svg = String::new();
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::with_string(&mut svg, (720, 360)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root).margin(16).x_label_area_size(36).y_label_area_size(40).build_cartesian_2d(0f64..state.step.max(1) as f64, 0f64..top)?;
        chart.configure_mesh().x_desc(format!("step (of {})", state.step)).y_desc("loss").draw()?;
        let key = |color: RGBColor| move |(x, y): (i32, i32)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2));
        chart.draw_series(LineSeries::new(lm, blue.stroke_width(2)))?.label("next-token loss").legend(key(blue));
        if !mtp.is_empty() {
            chart.draw_series(LineSeries::new(mtp, orange.stroke_width(2)))?.label("MTP loss (2 ahead)").legend(key(orange));
        }
        chart
            .draw_series(state.held_out.iter().map(|&(s, l)| Circle::new((s as f64, l as f64), 4, green.filled())))?
            .label("held out")
            .legend(move |(x, y)| Circle::new((x + 8, y), 4, green.filled()));
        chart.configure_series_labels().background_style(WHITE).border_style(BLACK).draw()?;
        root.present()?;
        Ok(())
    };
    if let Err(e) = draw() {
        eprintln!("loss.svg: {e}");
    }
    svg
}

fn main() {
    let args = Args::parse_checked(PROMPT.len());
    match args.backend.as_str() {
        #[cfg(feature = "ndarray")]
        "ndarray" => train::<burn::backend::Autodiff<burn::backend::NdArray>>(&args, &vec![Default::default(); world_size(&args)], "ndarray (reference CPU backend)"),
        #[cfg(feature = "flex")]
        "flex" => train::<burn::backend::Autodiff<burn::backend::Flex>>(&args, &vec![Default::default(); world_size(&args)], "flex (Burn's CPU backend)"),
        #[cfg(feature = "wgpu")]
        "wgpu" => {
            use burn::backend::wgpu::WgpuDevice;
            train::<burn::backend::Autodiff<burn::backend::Wgpu>>(&args, &[WgpuDevice::DefaultDevice, WgpuDevice::Cpu], "wgpu")
        }
        #[cfg(feature = "cuda")]
        "cuda" => {
            use burn::backend::cuda::CudaDevice;
            // Under mpirun, each process takes the GPU of its local rank.
            #[cfg(feature = "mpi")]
            let gpus: Vec<usize> = match (under_mpirun(), burn_comm::mpi::local_rank()) {
                (true, Some(local)) => vec![local],
                _ => (0..world_size(&args)).collect(),
            };
            #[cfg(not(feature = "mpi"))]
            let gpus: Vec<usize> = (0..world_size(&args)).collect();
            train::<burn::backend::Autodiff<burn::backend::Cuda>>(&args, &gpus.into_iter().map(CudaDevice::new).collect::<Vec<_>>(), "cuda")
        }
        other => panic!("backend {other:?} is not compiled in; build with --features {other}"),
    }
}
