//! `train_tiny`'s flags (clap): every value checked before any work starts, each bad one
//! refused with a message naming it.

use super::flags::{at_least_one, positive};
use burn_deepseek::dualpipe::schedule::{Schedule, ScheduleKind};
use burn_deepseek::model::DeepSeekV3Config;
use burn_dp::MomentDType;
use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};
use std::path::PathBuf;

/// Trains a tiny DeepSeek-V3 on *Around the World in Eighty Days*, byte by byte.
#[derive(Parser, Clone, Debug)]
#[command(name = "train_tiny")]
pub struct Args {
    /// Burn backend: flex (Burn's CPU backend), ndarray (the reference), wgpu, cuda.
    #[arg(long, default_value = "flex", value_parser = ["flex", "ndarray", "wgpu", "cuda"])]
    pub backend: String,
    /// Optimizer steps.
    #[arg(long, default_value_t = 1000, value_parser = at_least_one)]
    pub steps: usize,
    /// Rows per rank and step.
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    pub batch: usize,
    /// Positions the main model predicts per row.
    #[arg(long, default_value_t = 64, value_parser = at_least_one)]
    pub seq: usize,
    /// Model width.
    #[arg(long = "d-model", default_value_t = 64, value_parser = at_least_one)]
    pub d_model: usize,
    /// Transformer blocks (the first dense, the rest MoE).
    #[arg(long, default_value_t = 3, value_parser = two_or_more)]
    pub layers: usize,
    /// Multi-token-prediction depth (0: next-token prediction only).
    #[arg(long, default_value_t = 1)]
    pub mtp: usize,
    /// Peak learning rate (after the warm-up).
    #[arg(long, default_value_t = 3e-3, value_parser = positive, allow_hyphen_values = true)]
    pub lr: f64,
    /// FP8 GEMMs in the dense MLPs and the routed experts.
    #[arg(long)]
    pub fp8: bool,
    /// Continue from the latest complete checkpoint under --out (any layout, any number of ranks).
    #[arg(long)]
    pub resume: bool,
    /// Expert-parallel ranks (the experts of every MoE layer split over them).
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub ep: usize,
    /// Pipeline ranks (DualPipeV over 2·N stages); 0 for none.
    #[arg(long, visible_alias = "dualpipe", default_value_t = 0)]
    pub pp: usize,
    /// Data-parallel ranks.
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub dp: usize,
    /// 0: DDP; 1: the optimizer state sharded (ZeRO-1); 3: parameters, gradients and state sharded (FSDP).
    #[arg(long, default_value_t = 0, value_parser = zero_stage)]
    pub zero: usize,
    /// HSDP: groups of ranks holding the same shards (divides --dp).
    #[arg(long = "dp-replicate", default_value_t = 1, value_parser = at_least_one)]
    pub dp_replicate: usize,
    /// With --zero 3: `block` gathers each block just before its forward, `model` the whole model at once.
    #[arg(long = "fsdp-unit", value_name = "block|model", default_value = "block", value_parser = fsdp_unit, action = clap::ArgAction::Set)]
    pub fsdp_per_block: bool,
    /// AdamW's moments stored in f32 or bf16.
    #[arg(long, value_name = "f32|bf16", default_value = "f32", value_parser = moments)]
    pub moments: MomentDType,
    /// With --pp: micro-batches per step (default 2·N); they split --batch.
    #[arg(long = "micro-batches", value_parser = at_least_one)]
    pub micro_batches: Option<usize>,
    /// Output directory (model, state, loss plot, checkpoints).
    #[arg(long, default_value = "target/train_tiny")]
    pub out: PathBuf,
    /// Steps between checkpoints (and held-out evaluations).
    #[arg(long = "save-every", default_value_t = 250, value_parser = at_least_one)]
    pub save_every: usize,
    /// `async`: checkpoints written by a background thread; `sync`: within the step.
    #[arg(long = "save-mode", value_name = "async|sync", default_value = "async", value_parser = save_mode, action = clap::ArgAction::Set)]
    pub save_mode_async: bool,
    /// Bytes sampled after the prompt at the end (and decoded greedily with and without MTP drafts).
    #[arg(long, default_value_t = 200)]
    pub sample: usize,
    /// Seed of the weights and the data order.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

fn two_or_more(s: &str) -> Result<usize, String> {
    match at_least_one(s)? {
        1 => Err("the tiny model has a dense block and at least one MoE block: 2 or more".into()),
        n => Ok(n),
    }
}

fn zero_stage(s: &str) -> Result<usize, String> {
    match s {
        "0" | "1" | "3" => Ok(s.parse().expect("a digit")),
        _ => Err("0 replicates the optimizer state (DDP), 1 shards it (ZeRO-1), 3 shards the parameters, gradients and state (FSDP)".into()),
    }
}

fn fsdp_unit(s: &str) -> Result<bool, String> {
    match s {
        "block" => Ok(true),
        "model" => Ok(false),
        _ => Err("block (each block gathered just before its forward) or model (the whole model gathered at once)".into()),
    }
}

fn moments(s: &str) -> Result<MomentDType, String> {
    match s {
        "f32" => Ok(MomentDType::F32),
        "bf16" => Ok(MomentDType::Bf16),
        _ => Err("f32 or bf16".into()),
    }
}

fn save_mode(s: &str) -> Result<bool, String> {
    match s {
        "async" => Ok(true),
        "sync" => Ok(false),
        _ => Err("async (files written by a background thread) or sync".into()),
    }
}

impl Args {
    /// The flags, each value and their combination checked against the tiny model (a
    /// resumed run's model has the same experts and context): a bad one exits with clap's
    /// usage error naming it, before anything is built.
    pub fn parse_checked(prompt_len: usize) -> Self {
        let a = Self::parse();
        if let Err(message) = a.check(prompt_len) {
            Self::command().error(ErrorKind::ArgumentConflict, message).exit();
        }
        a
    }

    fn check(&self, prompt_len: usize) -> Result<(), String> {
        let tiny = DeepSeekV3Config::tiny();
        let (experts, max) = (tiny.moe.router.n_experts, tiny.mla.max_seq_len);
        let fail = |ok: bool, message: String| if ok { Ok(()) } else { Err(message) };
        fail(self.zero != 3 || self.pp == 0, format!("--zero 3 with --pp {}: FSDP inside the pipeline is not built yet (--pp takes --dp with --zero 0 or 1)", self.pp))?;
        fail(self.dp_replicate == 1 || self.pp == 0, format!("--dp-replicate {} with --pp {}: hybrid sharding inside the pipeline is not built yet", self.dp_replicate, self.pp))?;
        fail(self.dp.is_multiple_of(self.dp_replicate), format!("--dp-replicate {} does not divide --dp {}", self.dp_replicate, self.dp))?;
        fail(self.dp_replicate == 1 || self.zero > 0, format!("--dp-replicate {} with --zero 0: replicas are for sharded state (--zero 1 or 3)", self.dp_replicate))?;
        fail(self.micro_batches.is_none() || self.pp > 0, "--micro-batches goes with --pp".into())?;
        fail(self.fsdp_per_block || self.zero == 3, "--fsdp-unit model goes with --zero 3".into())?;
        fail(experts.is_multiple_of(self.ep), format!("--ep {}: does not divide the {experts} experts of each MoE layer", self.ep))?;
        fail(self.seq + self.mtp <= max, format!("--seq {} with --mtp {}: the model would read {} positions of its {max}", self.seq, self.mtp, self.seq + self.mtp))?;
        fail(prompt_len + self.sample <= max, format!("--sample {}: the prompt ({prompt_len} bytes) and the sample must fit the model's {max} positions", self.sample))?;
        if self.pp > 0 {
            let m = self.micro_batches.unwrap_or(2 * self.pp);
            fail(self.batch.is_multiple_of(m), format!("--batch {} does not split into {m} equal micro-batches", self.batch))?;
            Schedule::new(ScheduleKind::DualPipeV, self.pp, m).map_err(|e| format!("--pp {} --micro-batches {m}: {e}", self.pp))?;
            // The stages against the model's blocks: `check_layout`, once the model (a
            // resumed run's saved one) is known.
        }
        Ok(())
    }
}
