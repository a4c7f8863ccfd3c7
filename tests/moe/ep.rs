//! Expert parallelism: the collectives (stamped payloads, uneven and empty splits, FP8 on
//! the wire, backwards, two wgpu devices), the expert-parallel layer against the
//! single-device layer on 2 and 4 ranks (with and without EPLB replicas, FP8 dispatch),
//! node-limited routing, bytes on the wire, and failing, stalling or mismatched ranks.
//!
//! Tolerance: the expert-parallel layer computes the same f32 math as the single-device
//! layer, only the experts' rows in another order inside the grouped GEMM (by source rank)
//! and gradients of replicated weights summed over ranks; each tensor is held to
//! `max|a − b| ≤ 1e-5 · max|b|` as in layer.rs.

use std::time::Duration;

use burn::backend::Autodiff;
use burn::optim::GradientsParams;
use burn::tensor::{backend::AutodiffBackend, Tensor, TensorData};
use burn_fp8::linear::Fp8Recipe;
use burn_fp8::QuantConfig;
use burn_moe::comm::{all_gather, all_reduce, all_to_all, launch, Comm, CommBackend, CommError, Splits, Transport};
use burn_moe::ep::{EpError, ExpertParallelMoe};
use burn_moe::eplb::{rebalance, EplbConfig, Placement};
use burn_moe::router::RouterConfig;
use burn_moe::{Moe, MoeBackend, MoeConfig};

use crate::common::{host, host_int, Ref, Rng};

pub(crate) type Ad = Autodiff<Ref>;

fn assert_rel(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite values");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "{what}: the reference is all zero");
    let err = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(err <= tol * scale, "{what}: max error {err:.3e} exceeds {tol:e} · {scale:.3e}");
}

/// Row `i` of the part rank `src` sends to rank `dst`: every value `src·1000 + dst·10 + i`
/// plus the column / 8, negative in odd columns (so packed FP8 words use every bit).
fn stamp(src: usize, dst: usize, i: usize, d: usize) -> Vec<f32> {
    (0..d).map(|c| ((src * 1000 + dst * 10 + i) as f32 + c as f32 / 8.0) * if c % 2 == 1 { -1.0 } else { 1.0 }).collect()
}

/// Random uneven splits, zeros included: `sends[src][dst]`.
pub(crate) fn random_splits(rng: &mut Rng, world: usize) -> Vec<Vec<usize>> {
    (0..world).map(|_| (0..world).map(|_| if rng.below(4) == 0 { 0 } else { rng.below(6) }).collect()).collect()
}

/// Sends stamped rows by `sends`, checks each arriving row's stamp (exactly in f32, to
/// FP8 precision with `fp8`) and that the backward returns `x`'s gradient by the reverse
/// route. Runs on `devices[rank]`.
fn stamped_all_to_all<B: CommBackend + burn::tensor::backend::AutodiffBackend>(devices: &[B::Device], sends: &[Vec<usize>], fp8: Option<QuantConfig>) {
    launch(Comm::group(devices.len(), Transport::Host), |comm| stamped_rank::<B>(&comm, &devices[comm.rank()], sends, fp8)).unwrap();
}

/// One rank's part of [`stamped_all_to_all`] (also run by MPI processes, see mpi.rs).
pub(crate) fn stamped_rank<B: CommBackend + burn::tensor::backend::AutodiffBackend>(
    comm: &Comm,
    device: &B::Device,
    sends: &[Vec<usize>],
    fp8: Option<QuantConfig>,
) -> Result<(), CommError> {
    let (world, d) = (comm.world_size(), 12);
    let me = comm.rank();
    let splits = Splits { send: sends[me].clone(), recv: (0..world).map(|s| sends[s][me]).collect() };
    let rows: Vec<f32> = (0..world).flat_map(|dst| (0..sends[me][dst]).flat_map(move |i| stamp(me, dst, i, d))).collect();
    let n = splits.send.iter().sum::<usize>();
    let x = Tensor::<B, 2>::from_data(TensorData::new(rows, [n, d]), device).require_grad();
    let y = all_to_all(x.clone(), &splits, comm, fp8)?;
    let want: Vec<f32> = (0..world).flat_map(|src| (0..sends[src][me]).flat_map(move |i| stamp(src, me, i, d))).collect();
    let got = host(y.clone());
    let tol = if fp8.is_some() { 1.0 / 16.0 } else { 0.0 }; // E4M3 keeps 3 mantissa bits
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= tol * w.abs(), "rank {me}: element {i} is {g}, stamped {w}");
    }
    assert_eq!(got.len(), want.len(), "rank {me}: received rows");
    // d/dx Σ y ⊙ w with w = 2·y_stamped: each sent row gets back twice its own stamp.
    let w = Tensor::<B, 2>::from_data(TensorData::new(want.iter().map(|v| 2.0 * v).collect::<Vec<_>>(), [want.len() / d, d]), device);
    let grads = (y * w).sum().backward();
    let dx = host(x.grad(&grads).expect("x is tracked"));
    let sent = host(x.inner());
    for (i, (g, s)) in dx.iter().zip(&sent).enumerate() {
        assert!((g - 2.0 * s).abs() <= 1e-6 * s.abs(), "rank {me}: gradient {i} is {g}, expected {}", 2.0 * s);
    }
    Ok(())
}

#[test]
fn stamped_rows_arrive_at_the_right_rank_and_row() {
    let mut rng = Rng::new("stamped_rows_arrive_at_the_right_rank_and_row");
    for world in [1, 2, 3, 4] {
        let devices = vec![Default::default(); world];
        stamped_all_to_all::<Ad>(&devices, &random_splits(&mut rng, world), None);
        stamped_all_to_all::<Ad>(&devices, &random_splits(&mut rng, world), Some(QuantConfig::activation()));
    }
    // Nothing to send at all.
    stamped_all_to_all::<Ad>(&[Default::default(), Default::default()], &[vec![0, 0], vec![0, 0]], None);
    // Two wgpu devices (distinct clients: `to_device` would panic between them); not in the
    // suite built for CUDA (`test-cuda`), whose machine need not have a Vulkan driver.
    #[cfg(not(feature = "test-cuda"))]
    {
        use burn::backend::wgpu::WgpuDevice;
        let devices = [WgpuDevice::DefaultDevice, WgpuDevice::Cpu];
        // Every rank sends and receives rows (CubeCL tensors without rows are not readable).
        let splits = |rng: &mut Rng| vec![vec![0, 1 + rng.below(5)], vec![1 + rng.below(5), rng.below(3)]];
        stamped_all_to_all::<Autodiff<burn::backend::Wgpu>>(&devices, &splits(&mut rng), None);
        stamped_all_to_all::<Autodiff<burn::backend::Wgpu>>(&devices, &splits(&mut rng), Some(QuantConfig::activation()));
    }
}

#[test]
fn all_gather_and_all_reduce_with_gradients() {
    launch(Comm::group(3, Transport::Host), |comm| gather_reduce_rank(&comm)).unwrap();
}

/// Rank `r` of `W` holds `r + 1` rows of 2 values `r + 1`; checks the all-gather, the
/// all-reduce of `(r + 1) · Σ x` and the gradient of both on this rank.
pub(crate) fn gather_reduce_rank(comm: &Comm) -> Result<(), CommError> {
    let (r, world) = (comm.rank(), comm.world_size());
    let rows = world * (world + 1) / 2;
    let device = Default::default();
    let x = Tensor::<Ad, 2>::from_data(TensorData::new(vec![r as f32 + 1.0; 2 * (r + 1)], [r + 1, 2]), &device).require_grad();
    let g = all_gather(x.clone(), comm)?;
    let s = all_reduce(x.clone().sum().reshape([1]) * (r as f32 + 1.0), comm)?;
    // Loss Σ_rows gathered · (row index + 1) on each rank: x's rows on rank r sit at rows
    // offset_r..; every rank adds the same weights, so dx = W · (index + 1) from the
    // gather and W · (r + 1) from the reduce.
    let weights = Tensor::<Ad, 1>::from_data(TensorData::new((1..=rows).map(|i| i as f32).collect::<Vec<_>>(), [rows]), &device);
    let grads = ((g.clone().sum_dim(1).reshape([rows]) * weights).sum() + s.clone().sum()).backward();
    let (g, s, dx) = (host(g), host(s), host(x.grad(&grads).unwrap()));
    let gathered: Vec<f32> = (0..world).flat_map(|q| vec![q as f32 + 1.0; 2 * (q + 1)]).collect();
    assert_eq!(g, gathered, "rank {r} gathered");
    // Σ_q (q + 1) · 2(q + 1)(q + 1).
    let sum: f32 = (0..world).map(|q| 2.0 * ((q + 1) as f32).powi(3)).sum();
    assert_eq!(s, [sum], "rank {r} reduced");
    let offset = r * (r + 1) / 2;
    let want: Vec<f32> = (0..r + 1).flat_map(|i| [(world * (offset + i + 1)) as f32 + (world * (r + 1)) as f32; 2]).collect();
    assert_eq!(dx, want, "rank {r} gradient");
    Ok(())
}

/// What a run of the layer produces on one rank (or on the single device, per rank's
/// rows): output, input gradient, counts, balance loss, and the gradients of gate,
/// shared experts and of each slot's expert weights.
#[derive(Debug, Clone)]
pub(crate) struct Run {
    pub(crate) output: Vec<f32>,
    pub(crate) dx: Vec<f32>,
    pub(crate) counts: Vec<i64>,
    pub(crate) balance: f32,
    pub(crate) gate: Vec<f32>,
    pub(crate) shared: Vec<f32>,
    pub(crate) experts: Vec<Vec<f32>>,
}

pub(crate) fn config() -> MoeConfig {
    MoeConfig { init_std: 0.1, balance_loss_weight: 0.01, ..MoeConfig::tiny() }
}

pub(crate) fn inputs(rng: &mut Rng, batches: &[usize], s: usize, d: usize) -> Vec<(Vec<f32>, Vec<f32>)> {
    batches.iter().map(|&b| (rng.values(b * s * d), rng.values(b * s * d))).collect()
}

/// The single-device layer on all ranks' rows at once (batches concatenated).
pub(crate) fn single_device(moe: &Moe<Ad>, data: &[(Vec<f32>, Vec<f32>)], s: usize) -> Run {
    let d = moe.d_model();
    let b: usize = data.iter().map(|(x, _)| x.len() / (s * d)).sum();
    let device = Default::default();
    let x = Tensor::<Ad, 3>::from_data(TensorData::new(data.iter().flat_map(|(x, _)| x.clone()).collect::<Vec<_>>(), [b, s, d]), &device).require_grad();
    let dy = Tensor::<Ad, 3>::from_data(TensorData::new(data.iter().flat_map(|(_, g)| g.clone()).collect::<Vec<_>>(), [b, s, d]), &device);
    let out = moe.forward(x.clone());
    let balance = out.balance_loss.unwrap();
    let grads = ((out.output.clone() * dy).sum() + balance.clone() * 100.0).backward();
    let shared = moe.shared.as_ref().unwrap();
    Run {
        output: host(out.output),
        dx: host(x.grad(&grads).unwrap()),
        counts: host_int(out.counts),
        balance: host(balance)[0],
        gate: host(moe.gate.weight.grad(&grads).unwrap()),
        shared: host(shared.down.weight.grad(&grads).unwrap()),
        experts: [&moe.experts.w_gate, &moe.experts.w_up, &moe.experts.w_down].iter().map(|w| host(w.grad(&grads).unwrap())).collect(),
    }
}

/// The expert-parallel layer: rank `r` runs `data[r]` on `devices[r]`; gradients
/// synchronized.
fn expert_parallel<B>(moe: &Moe<B>, placement: &Placement, data: &[(Vec<f32>, Vec<f32>)], s: usize, fp8: Option<QuantConfig>, devices: &[B::Device]) -> Vec<Run>
where
    B: AutodiffBackend + MoeBackend + CommBackend,
    B::InnerBackend: MoeBackend + CommBackend,
{
    launch(Comm::group(data.len(), Transport::Host), |comm| ep_rank(moe, placement, &data[comm.rank()], s, fp8, &comm, &devices[comm.rank()])).unwrap()
}

/// One rank's part of [`expert_parallel`] (also run by MPI processes, see mpi.rs).
pub(crate) fn ep_rank<B>(
    moe: &Moe<B>,
    placement: &Placement,
    (x, dy): &(Vec<f32>, Vec<f32>),
    s: usize,
    fp8: Option<QuantConfig>,
    comm: &Comm,
    device: &B::Device,
) -> Result<Run, EpError>
where
    B: AutodiffBackend + MoeBackend + CommBackend,
    B::InnerBackend: MoeBackend + CommBackend,
{
    let d = moe.d_model();
    let shard = ExpertParallelMoe::shard(moe, placement.clone(), comm.rank(), device)?.with_dispatch_fp8(fp8);
    let b = x.len() / (s * d);
    let x = Tensor::<B, 3>::from_data(TensorData::new(x.clone(), [b, s, d]), device).require_grad();
    let dy = Tensor::<B, 3>::from_data(TensorData::new(dy.clone(), [b, s, d]), device);
    let out = shard.forward(x.clone(), comm)?.moe;
    let balance = out.balance_loss.unwrap();
    let grads = ((out.output.clone() * dy).sum() + balance.clone() * 100.0).backward();
    let dx = x.grad(&grads).map(host).unwrap_or_default(); // none without tokens
    let grads = shard.sync_grads(GradientsParams::from_grads(grads, &shard), comm)?;
    let g = |id| host(grads.get::<B::InnerBackend, 2>(id).unwrap());
    let e = |w: &burn::module::Param<Tensor<B, 3>>| host(grads.get::<B::InnerBackend, 3>(w.id).unwrap());
    let m = &shard.moe;
    Ok(Run {
        output: host(out.output),
        dx,
        counts: host_int(out.counts),
        balance: host(balance)[0],
        gate: g(m.gate.weight.id),
        shared: g(m.shared.as_ref().unwrap().down.weight.id),
        experts: [&m.experts.w_gate, &m.experts.w_up, &m.experts.w_down].iter().map(|w| e(w)).collect(),
    })
}

/// Compares the ranks' runs with the single-device run: rows of output and input
/// gradient by rank, the synchronized gradients on every rank, each slot's expert
/// gradient with its logical expert's.
pub(crate) fn compare(what: &str, single: &Run, ranks: &[Run], placement: &Placement, tol: f32, expert_tol: [f32; 3]) {
    let output: Vec<f32> = ranks.iter().flat_map(|r| r.output.clone()).collect();
    let dx: Vec<f32> = ranks.iter().flat_map(|r| r.dx.clone()).collect();
    assert_rel(&format!("{what}: output"), &output, &single.output, tol);
    assert_rel(&format!("{what}: input gradient"), &dx, &single.dx, tol);
    let balance: f32 = ranks.iter().map(|r| r.balance).sum();
    assert!((balance - single.balance).abs() <= 1e-5 * single.balance.abs(), "{what}: balance loss {balance} vs {}", single.balance);
    let per = placement.physical_experts() / placement.gpus();
    for (rank, run) in ranks.iter().enumerate() {
        assert_eq!(run.counts, single.counts, "{what}: rank {rank} global counts");
        assert_rel(&format!("{what}: rank {rank} gate gradient"), &run.gate, &single.gate, tol);
        assert_rel(&format!("{what}: rank {rank} shared gradient"), &run.shared, &single.shared, tol);
        for (w, (got, want)) in run.experts.iter().zip(&single.experts).enumerate() {
            let size = want.len() / placement.replicas().len();
            for slot in 0..per {
                let e = placement.phys_to_log()[rank * per + slot];
                let name = format!("{what}: rank {rank} slot {slot} (expert {e}) weight {w} gradient");
                let (got, want) = (&got[slot * size..(slot + 1) * size], &want[e * size..(e + 1) * size]);
                if want.iter().all(|&v| v == 0.0) {
                    // An expert no token chose (empty experts are part of the test).
                    assert!(got.iter().all(|&v| v == 0.0), "{name}: expected zeros");
                } else {
                    assert_rel(&name, got, want, expert_tol[w]);
                }
            }
        }
    }
}

#[test]
fn expert_parallel_layer_equals_single_device() {
    let mut rng = Rng::new("expert_parallel_layer_equals_single_device");
    let device = Default::default();
    let moe: Moe<Ad> = config().init(&device);
    let s = 4;
    // 2 ranks, contiguous experts; 4 ranks with a rank without tokens.
    for batches in [vec![2, 1], vec![1, 2, 0, 1]] {
        let data = inputs(&mut rng, &batches, s, 64);
        let single = single_device(&moe, &data, s);
        let placement = Placement::identity(16, batches.len()).unwrap();
        compare(
            &format!("{} ranks", batches.len()),
            &single,
            &expert_parallel(&moe, &placement, &data, s, None, &vec![Default::default(); placement.gpus()]),
            &placement,
            1e-5,
            [1e-5; 3],
        );
    }
    // 4 ranks with EPLB replicas: 16 experts in 20 slots, the heaviest replicated.
    let data = inputs(&mut rng, &[1, 1, 2, 1], s, 64);
    let single = single_device(&moe, &data, s);
    let load: Vec<f64> = single.counts.iter().map(|&c| c as f64 + 0.5).collect();
    let placement = rebalance(&load, &EplbConfig { physical_experts: 20, groups: 4, nodes: 2, gpus: 4 }).unwrap();
    assert!(placement.replicas().iter().any(|&r| r > 1));
    compare("4 ranks, EPLB replicas", &single, &expert_parallel(&moe, &placement, &data, s, None, &vec![Default::default(); placement.gpus()]), &placement, 1e-5, [1e-5; 3]);
}

#[test]
#[cfg(not(feature = "test-cuda"))] // wgpu's devices; the CUDA machine need not have Vulkan
fn expert_parallel_over_two_wgpu_devices() {
    // The kernels on two wgpu devices (distinct clients), against the reference backend's
    // single-device layer with the same weights.
    use burn::backend::wgpu::WgpuDevice;
    let mut rng = Rng::new("expert_parallel_over_two_wgpu_devices");
    let moe: Moe<Ad> = config().init(&Default::default());
    let data = inputs(&mut rng, &[2, 1], 4, 64);
    let single = single_device(&moe, &data, 4);
    let devices = [WgpuDevice::DefaultDevice, WgpuDevice::Cpu];
    let on_wgpu = crate::layer::copy(&moe, config().init::<Autodiff<burn::backend::Wgpu>>(&devices[0]), &devices[0]);
    let placement = Placement::identity(16, 2).unwrap();
    compare("2 wgpu devices", &single, &expert_parallel(&on_wgpu, &placement, &data, 4, None, &devices), &placement, 1e-5, [1e-5; 3]);
}

#[test]
fn fp8_dispatch_matches_the_single_device_fp8_layer() {
    // With FP8 experts the grouped GEMM quantizes its input rows in 1×128 tiles anyway;
    // rows that arrive already quantized in those tiles quantize to the same codes, so
    // outputs and every gradient that flows back through the rows are those of one device
    // (the backward sends f32 gradients). The gate and up projections' weight gradients
    // are `rowsᵀ · dy` in f32 over the rows as they arrived, FP8-rounded (E4M3 keeps 3
    // mantissa bits: 2^-4 relative per value), as DeepSeek-V3's are over its cached FP8
    // activations: they are held to 1e-1 of their scale; the down projection's to 1e-5.
    let mut rng = Rng::new("fp8_dispatch_matches_the_single_device_fp8_layer");
    let device = Default::default();
    let moe: Moe<Ad> = MoeConfig { fp8: Some(Fp8Recipe::deepseek_v3()), ..config() }.init(&device);
    let data = inputs(&mut rng, &[2, 1], 4, 64);
    let single = single_device(&moe, &data, 4);
    let placement = Placement::identity(16, 2).unwrap();
    compare(
        "FP8 dispatch",
        &single,
        &expert_parallel(&moe, &placement, &data, 4, Some(QuantConfig::activation()), &[Default::default(), Default::default()]),
        &placement,
        1e-5,
        [1e-1, 1e-1, 1e-5],
    );
}

/// Bytes rank 0 sends in one forward with and without FP8 dispatch, and the rows.
fn dispatch_bytes(moe: &Moe<Ref>, d: usize, fp8: Option<QuantConfig>) -> (u64, Splits) {
    let out = launch(Comm::group(2, Transport::Host), |comm| {
        let device = Default::default();
        let shard = ExpertParallelMoe::shard(moe, Placement::identity(16, 2).unwrap(), comm.rank(), &device)?.with_dispatch_fp8(fp8);
        // The same tokens on both ranks: each sends to the other what it receives back.
        // 32 tokens, so that some route across ranks whatever the random gate (with 6,
        // one CI run's gate sent every token to rank 1's experts).
        let x: Vec<f32> = (0..32 * d).map(|i| (i as f32 * 0.37).sin()).collect();
        let x = Tensor::<Ref, 3>::from_data(TensorData::new(x, [1, 32, d]), &device);
        let splits = shard.forward(x, &comm)?.splits;
        Ok::<_, EpError>((comm.sent_bytes(), splits))
    })
    .unwrap();
    out.into_iter().next().unwrap()
}

#[test]
fn node_limited_routing_and_bytes_on_the_wire() {
    let device = Default::default();
    // 4 groups of 4 experts on 4 ranks: a rank is a group, tokens use at most 2 of them.
    for topk_groups in [1, 2] {
        let router = RouterConfig { topk_groups, ..RouterConfig::tiny() };
        let moe: Moe<Ref> = MoeConfig { router, ..config() }.init(&device);
        let most = launch(Comm::group(4, Transport::Host), |comm| {
            let shard = ExpertParallelMoe::shard(&moe, Placement::identity(16, 4).unwrap(), comm.rank(), &device)?;
            let x = Tensor::<Ref, 3>::random([2, 16, 64], burn::tensor::Distribution::Normal(0.0, 1.0), &device);
            Ok::<_, EpError>(shard.forward(x, &comm)?.max_ranks_per_token)
        })
        .unwrap();
        assert!(most.iter().all(|&m| m >= 1 && m <= topk_groups), "topk_groups {topk_groups}: ranks per token {most:?}");
    }
    // Rank 0 sends its rows for rank 1 (dispatch) and returns rank 1's rows (combine, f32).
    for d in [64, 256] {
        let moe: Moe<Ref> = MoeConfig { d_model: d, ..config() }.init(&device);
        let (f32_bytes, splits) = dispatch_bytes(&moe, d, None);
        let (sent, returned) = (splits.send[1], splits.recv[1]);
        assert!(sent > 0 && returned > 0, "d {d}: splits {splits:?}");
        assert_eq!(f32_bytes, ((sent + returned) * d * 4) as u64, "d {d}: f32 bytes");
        let (fp8_bytes, fp8_splits) = dispatch_bytes(&moe, d, Some(QuantConfig::activation()));
        assert_eq!(fp8_splits, splits, "FP8 dispatch does not change the routing");
        // Per dispatched row: one byte per value, padded to 128-value tiles, and one f32
        // scale per tile; the results come back in f32.
        let tiles = d.div_ceil(128);
        assert_eq!(fp8_bytes, (sent * (tiles * 128 + tiles * 4) + returned * d * 4) as u64, "d {d}: FP8 dispatch bytes");
    }
}

#[test]
fn failing_stalling_and_mismatched_ranks_are_named() {
    let device: burn::backend::ndarray::NdArrayDevice = Default::default();
    let x = || Tensor::<Ad, 2>::ones([2, 3], &device);
    // A rank that panics before its collective.
    let err = launch(Comm::group_with_timeout(3, Transport::Host, Duration::from_secs(20)), |comm| {
        if comm.rank() == 2 {
            panic!("rank 2 lost its device");
        }
        all_reduce(x(), &comm).map(|_| ())
    })
    .unwrap_err();
    assert!(matches!(&err, CommError::RankFailed { rank: 2, reason, .. } if reason.contains("lost its device")), "{err}");
    // A rank that stalls past the timeout: the others name it, the step ends.
    let err = launch(Comm::group_with_timeout(3, Transport::Host, Duration::from_millis(300)), |comm| {
        if comm.rank() == 1 {
            std::thread::sleep(Duration::from_millis(900));
        }
        all_reduce(x(), &comm).map(|_| ())
    })
    .unwrap_err();
    assert!(matches!(&err, CommError::Timeout { missing, .. } if missing == &[1]), "{err}");
    assert!(err.to_string().contains("[1]"), "{err}");
    // A rank that fails in the backward (after the forward's collectives succeeded).
    let err = launch(Comm::group_with_timeout(2, Transport::Host, Duration::from_secs(20)), |comm| {
        let x = x().require_grad();
        let y = all_reduce(x.clone(), &comm)?;
        if comm.rank() == 0 {
            panic!("rank 0 failed before its backward");
        }
        y.sum().backward();
        Ok(())
    })
    .unwrap_err();
    assert!(matches!(&err, CommError::RankFailed { rank: 0, .. }), "{err}");
    // Different collectives at the same point; wrong splits.
    let err = launch(Comm::group(2, Transport::Host), |comm| match comm.rank() {
        0 => all_reduce(x(), &comm).map(|_| ()),
        _ => comm.exchange("barrier", vec![(), ()]).map(|_| ()),
    })
    .unwrap_err();
    assert!(matches!(err, CommError::Mismatch { .. }), "{err}");
    let err = launch(Comm::group(2, Transport::Host), |comm| all_to_all(x(), &Splits { send: vec![1, 2], recv: vec![2, 2] }, &comm, None).map(|_| ())).unwrap_err();
    assert!(matches!(&err, CommError::Shape { detail, .. } if detail.contains("[1, 2]")), "{err}");
    // A shard used by the wrong group, a placement for other experts.
    let moe: Moe<Ref> = config().init(&device);
    let err = launch(Comm::group(3, Transport::Host), |comm| {
        let shard = ExpertParallelMoe::shard(&moe, Placement::identity(16, 2).unwrap(), comm.rank().min(1), &device)?;
        shard.forward(Tensor::ones([1, 2, 64], &device), &comm).map(|_| ())
    })
    .unwrap_err();
    assert!(matches!(&err, EpError::Placement { detail } if detail.contains("of 2") && detail.contains("of 3")), "{err}");
    let err = ExpertParallelMoe::shard(&moe, Placement::identity(8, 2).unwrap(), 0, &device).unwrap_err();
    assert!(err.to_string().contains("8 experts"), "{err}");
}
