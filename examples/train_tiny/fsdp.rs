//! `train_tiny --zero 3`: the training loop of a rank whose model lives sharded (FSDP,
//! HSDP with `--dp-replicate`).

use super::*;
use burn_dp::Fsdp;

/// One rank's loop with `--zero 3`: the model one burn-dp [`Fsdp`] unit over the `dp`
/// ranks (`--ep 1`, so `world` is the `dp` group), HSDP over `[dp_replicate, dp_shard]`
/// with `--dp-replicate`. Each step gathers the model, runs the forward, and the backward
/// reduce-scatters the gradients onto the shards; AdamW steps the shard (its moments are
/// `1/D` of the model's). The MoE counts are summed over `dp` so every rank updates the
/// whole balancing bias it keeps alike. Rank 0 prints, evaluates, writes the model
/// (gathered) and samples; every rank writes its optimizer shard.
pub(super) fn run<B>(args: &Args, model: &DeepSeekV3<B>, mut state: TrainState, world: &Comm, device: &B::Device) -> Result<(), RunError>
where
    B: AutodiffBackend + MoeBackend + FsdpBackend,
    B::InnerBackend: MoeBackend,
{
    let rank = world.rank();
    let mesh = dp_ep_mesh(args, world)?;
    let shard = mesh.comm("dp_shard").map_err(failed)?.clone();
    let replicas = mesh.comm("dp_replicate").map_err(failed)?.clone();
    // A replica of its own (fresh autodiff leaves): threads must not share a graph.
    let model = model.clone().fork(device);
    let mut fsdp = match args.dp_replicate {
        1 => Fsdp::new(model, shard.clone()),
        _ => Fsdp::hybrid(model, shard.clone(), replicas.clone()),
    }
    .map_err(failed)?;
    let mut optim = adamw(args).init::<B, Fsdp<B, DeepSeekV3<B>>>();
    let optim_name = format!("optim-dp{}-zero3{}-rank{rank}", args.dp, replicate_tag(args));
    if args.resume {
        let path = args.out.join(&optim_name);
        let record = recorder().load(path.clone(), device).unwrap_or_else(|e| panic!("--resume: {}.mpk (the optimizer shard of this layout): {e}", path.display()));
        optim = optim.load_record(record);
    }
    let mut batches = batches(args, state.step, rank);
    let (start, mut speed) = (Instant::now(), Throughput::default());
    let mut held = None;
    while state.step < args.steps {
        let step_start = Instant::now();
        let lr = learning_rate(args, state.step);
        let batch = tokens::<B>(batches.next(args.batch, args.seq + 2), args.batch, device);
        let out = fsdp.gather().map_err(failed)?.try_loss(batch).map_err(failed)?;
        let losses = (rank == 0).then(|| step_losses(&out));
        // The backward ends with each shard holding the mean gradient over the dp ranks.
        let grads = GradientsParams::from_grads(out.loss.backward(), &fsdp);
        let layout = held.is_none().then(|| Layout::of::<B, _>(&fsdp));
        let grad_bytes = layout.as_ref().map_or(0, |l| burn_dp::memory::grad_bytes::<B>(&grads, l));
        let counts = counts_over(out.counts, world).map_err(failed)?;
        fsdp = optim.step(lr, fsdp, grads).map_module(|m| m.update_bias(&counts));
        if let Some(layout) = &layout {
            held = Some((burn_dp::memory::param_bytes(&fsdp), grad_bytes, burn_dp::memory::adamw_state_bytes(&optim, layout)));
        }
        state.step += 1;
        speed.add(state.step, world.world_size() * args.batch * args.seq, step_start);
        if let Some(losses) = losses {
            progress(&mut state, args, losses, speed.per_second(), load_ratio(&counts), "");
        }
        if state.step % args.save_every == 0 || state.step == args.steps {
            // Every rank takes part in gathering the whole model.
            let whole = fsdp.clone().unshard().map_err(failed)?;
            recorder().record(optim.to_record(), args.out.join(&optim_name)).expect("write the optimizer record");
            if rank == 0 {
                checkpoint(args, &mut state, &whole, device, start);
            }
        }
    }
    if let Some(held) = held {
        // Tensor bytes this rank sent: the gathers and reduce-scatters (dp_shard), the
        // gradient all-reduces across groups (dp_replicate), the MoE counts (world).
        let sent = [world, &shard, &replicas].iter().map(|c| c.sent_bytes() as usize).sum::<usize>();
        report_held(args, Some(world), held, sent, state.step)?;
    }
    let valid = fsdp.unshard().map_err(failed)?.valid();
    if rank == 0 {
        sample(args, &state, &valid, &optim_name, device);
    }
    Ok(())
}
