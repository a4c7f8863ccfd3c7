//! `train_tiny --zero 3`: the training loop of a rank whose model lives sharded (FSDP,
//! HSDP with `--dp-replicate`).

use super::*;
use burn_dp::{Fsdp, ShardGroup};

/// One rank's loop with `--zero 3`: the model a burn-dp [`Fsdp`] over the `dp` ranks
/// with one shard group per unit (`DeepSeekV3::fsdp_units`; `--fsdp-unit model`: one for
/// the whole model), HSDP over `[dp_replicate, dp_shard]` with `--dp-replicate`. With `--ep E` the experts
/// are first sharded over `ep`, then the model goes into two shard groups: the dense
/// parameters over the `dp_shard × ep` ranks, each `ep` rank's experts over `dp_shard`
/// (both across the replicas under HSDP), the gradients of both divided by `--dp` (each
/// `ep` rank's loss is its share of its group's objective; torchtitan's divide factor for
/// the experts). Each step gathers the model, runs the forward, and the backward
/// reduce-scatters the gradients onto the shards; AdamW steps the shards (their moments
/// are `1/(D·E)` of the model's). The MoE counts are summed over `dp` so every rank
/// updates the whole balancing bias it keeps alike. Rank 0 prints, evaluates, writes the
/// model (gathered) and samples; every rank checkpoints its shards and their moments.
pub(super) fn run<B>(
    args: &Args,
    model: &DeepSeekV3<B>,
    mut state: TrainState,
    (saver, reader): (&mut ckpt::Saver, Option<&Reader>),
    world: &Comm,
    device: &B::Device,
) -> Result<(), RunError>
where
    B: AutodiffBackend + ModelBackend + FsdpBackend,
    B::InnerBackend: ModelBackend,
{
    let rank = world.rank();
    let mesh = dp_ep_mesh(args, world)?;
    let dense = mesh.group(&["dp_shard", "ep"]).map_err(failed)?;
    let shard = mesh.comm("dp_shard").map_err(failed)?.clone();
    let replicas = (args.dp_replicate > 1).then(|| mesh.comm("dp_replicate").cloned()).transpose().map_err(failed)?;
    let dp = mesh.group(&["dp_replicate", "dp_shard"]).map_err(failed)?;
    let group = |comm: Comm| {
        let g = ShardGroup::new(comm).with_gradient_divide_factor(args.dp);
        match &replicas {
            Some(r) => g.with_replicas(r.clone()),
            None => g,
        }
    };
    let model = match args.ep {
        // A replica of its own (fresh autodiff leaves): threads must not share a graph.
        1 => model.clone().fork(device),
        _ => model.shard_experts(mesh.comm("ep").map_err(failed)?, device).map_err(failed)?,
    };
    // Experts over dp_shard (ep split them already), the dense parameters over dp_shard × ep.
    // Each group's unit, for the largest unit gathered at once (a block's dense part and
    // experts are two groups of one unit).
    let (groups, unit_of): (Vec<_>, Vec<String>) = match args.fsdp_per_block {
        true => model
            .fsdp_units()
            .into_iter()
            .map(|u| (group(if u.experts { shard.clone() } else { dense.clone() }).with_params(u.params), u.name.trim_end_matches(".experts").to_string()))
            .unzip(),
        false if args.ep == 1 => (vec![group(dense.clone())], vec!["model".into()]),
        false => (vec![group(dense.clone()), group(shard.clone()).with_params(model.routed_expert_ids())], vec!["model".into(); 2]),
    };
    let mut fsdp = Fsdp::grouped(model, groups).map_err(failed)?;
    if rank == 0 {
        let mut units = std::collections::BTreeMap::<&str, usize>::new();
        for (g, unit) in unit_of.iter().enumerate() {
            *units.entry(unit).or_default() += 4 * fsdp.layout(g).numel();
        }
        let (unit, bytes) = units.iter().max_by_key(|(_, b)| **b).expect("a group");
        println!("FSDP: {} shard groups; the largest unit gathered at once: {unit}, {:.2} MB", fsdp.num_groups(), *bytes as f64 / 1e6);
    }
    let mut optim = adamw(args).init::<B, Fsdp<B, DeepSeekV3<B>>>();
    let ep_comm = (args.ep > 1).then(|| mesh.comm("ep").cloned()).transpose().map_err(failed)?;
    if let Some(reader) = reader {
        // This rank's runs of each shard group, whatever sharding saved them.
        let load_start = Instant::now();
        let h = saver.holding(ep_comm.as_ref());
        fsdp = ckpt::loaded("the model", h.load_fsdp(&fsdp, reader))?;
        optim = optim.load_record(ckpt::loaded("the optimizer state", h.load_fsdp_adamw(&fsdp, reader))?);
        ckpt::report_load(rank, reader, load_start);
    }
    let (start, mut speed) = (Instant::now(), Throughput::default());
    let mut held = None;
    while state.step < args.steps {
        let step_start = Instant::now();
        let lr = learning_rate(args, state.step);
        let batch = tokens::<B>(batch_rows(args, state.step, rank), args.batch, device);
        let out = match args.fsdp_per_block {
            // Each unit gathered when the forward reaches it, a block dropped after its forward.
            true => fsdp.hollow().try_loss_units(batch, &fsdp).map_err(failed)?,
            false => fsdp.gather().map_err(failed)?.try_loss(batch).map_err(failed)?,
        };
        let losses = mean_losses(Some(world), &out)?;
        // The backward ends with each shard holding the mean gradient over the dp ranks.
        let grads = GradientsParams::from_grads(out.loss.backward(), &fsdp);
        let layout = held.is_none().then(|| Layout::of::<B, _>(&fsdp));
        let grad_bytes = layout.as_ref().map_or(0, |l| burn_dp::memory::grad_bytes::<B>(&grads, l));
        let counts = counts_over(out.counts, &dp).map_err(failed)?;
        fsdp = optim.step(lr, fsdp, grads).map_module(|m| m.update_bias(&counts));
        if let Some(layout) = &layout {
            held = Some((burn_dp::memory::param_bytes(&fsdp), grad_bytes, burn_dp::memory::adamw_state_bytes(&optim, layout)));
        }
        state.step += 1;
        speed.add(state.step, world.world_size() * args.batch * args.seq, step_start);
        if let Some(losses) = losses {
            progress(&mut state, args, losses, speed.per_second(), load_ratio(&counts), "");
        }
        if state.step.is_multiple_of(args.save_every) || state.step == args.steps {
            // Every rank takes part in gathering the whole model.
            let whole = fsdp.clone().unshard().map_err(failed)?.unshard_experts().map_err(failed)?;
            if rank == 0 {
                checkpoint(args, &mut state, &whole, device, start);
            }
            let snapshot_start = Instant::now();
            let h = saver.holding(ep_comm.as_ref());
            let mut snapshot = Snapshot::new();
            snapshot.chunks = ckpt::loaded("the model", h.fsdp_chunks(&fsdp))?;
            snapshot.chunks.extend(ckpt::loaded("the optimizer state", h.fsdp_adamw_chunks(&fsdp, &optim.to_record()))?);
            saver.save(args, &state, snapshot, snapshot_start.elapsed())?;
        }
    }
    saver.finish()?;
    if let Some(held) = held {
        // Tensor bytes this rank sent: the gathers and reduce-scatters (dp_shard × ep, and
        // dp_shard for the experts), the gradient all-reduces across groups
        // (dp_replicate), the MoE counts (dp), the experts' all-to-alls (ep).
        let mut comms = vec![&dense, &shard, &dp];
        comms.extend(replicas.as_ref());
        comms.extend(ep_comm.as_ref());
        let sent = comms.iter().map(|c| c.sent_bytes() as usize).sum::<usize>();
        report_held(args, Some(world), held, sent, state.step)?;
    }
    let valid = fsdp.unshard().map_err(failed)?.unshard_experts().map_err(failed)?.valid();
    if rank == 0 {
        sample(args, &state, &valid, device);
    }
    Ok(())
}
