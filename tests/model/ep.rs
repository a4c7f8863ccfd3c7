//! The model under expert parallelism: two ranks, each with half of every MoE layer's
//! experts and its own half of the batch, take the step one device takes on the whole
//! batch (objective, counts, every gradient); unsharding gives the model back; a failing
//! rank ends the step with an error naming it.

use crate::common::{host, Ref, Rng};
use burn::backend::Autodiff;
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Int, Tensor, TensorData};
use burn_deepseek::model::DeepSeekV3Config;
use burn_moe::comm::{launch, Comm, CommError, Transport};
use burn_moe::ep::EpError;
use std::collections::HashMap;
use std::time::Duration;

type B = Autodiff<Ref>;

/// Every float parameter's gradient on the host, by parameter id, with its dims.
struct HostGrads<'a> {
    grads: &'a GradientsParams,
    out: HashMap<ParamId, (Vec<usize>, Vec<f32>)>,
}

impl ModuleVisitor<B> for HostGrads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<Ref, D>(param.id) {
            self.out.insert(param.id, (g.dims().to_vec(), host(g)));
        }
    }
}

pub(crate) fn host_grads<M: Module<B>>(model: &M, grads: &GradientsParams) -> HashMap<ParamId, (Vec<usize>, Vec<f32>)> {
    let mut v = HostGrads { grads, out: HashMap::new() };
    model.visit(&mut v);
    v.out
}

/// Largest |a − b| over the largest |b|.
pub(crate) fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, &v| m.max(v.abs() as f64)).max(1e-12);
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).abs()).fold(0.0, f64::max) / scale
}

#[test]
fn two_ranks_take_the_single_device_step() {
    let mut rng = Rng::new("two_ranks_take_the_single_device_step");
    let device = Default::default();
    let model = DeepSeekV3Config::tiny().init::<B>(&device);
    let (rows, n) = (4, 13);
    let ids: Vec<i64> = (0..rows * n).map(|_| rng.below(256) as i64).collect();
    let batch = |r: std::ops::Range<usize>| Tensor::<B, 2, Int>::from_data(TensorData::new(ids[r.start * n..r.end * n].to_vec(), [r.len(), n]), &device);

    let single = model.loss(batch(0..rows));
    let single_loss = host(single.loss.clone())[0] as f64;
    let single_counts: Vec<Vec<i64>> = single.counts.iter().map(|c| c.clone().into_data().convert::<i64>().to_vec().unwrap()).collect();
    let single_grads = host_grads(&model, &GradientsParams::from_grads(single.loss.backward(), &model));
    let mut sharded_ids = 0;

    let ranks = launch(Comm::group(2, Transport::Host), |comm| {
        let r = comm.rank();
        let shard = model.shard_experts(&comm, &device)?;
        let out = shard.try_loss(batch(2 * r..2 * r + 2))?;
        let counts: Vec<Vec<i64>> = out.counts.iter().map(|c| c.clone().into_data().convert::<i64>().to_vec().unwrap()).collect();
        let grads = shard.sync_grads(GradientsParams::from_grads(out.loss.backward(), &shard))?;
        let whole = shard.unshard_experts()?;
        let probe = Tensor::<B, 2, Int>::from_data(TensorData::new(ids[..n - 1].to_vec(), [1, n - 1]), &device);
        let logits = host(whole.forward(probe).logits);
        Ok::<_, EpError>((host(out.loss)[0] as f64, counts, host_grads(&shard, &grads), logits))
    })
    .unwrap();

    // The ranks' objectives add up to the whole batch's; the counts are global.
    let sum: f64 = ranks.iter().map(|r| r.0).sum();
    assert!((sum - single_loss).abs() <= 1e-5 * single_loss, "ranks' losses sum to {sum}, one device {single_loss}");
    for (r, rank) in ranks.iter().enumerate() {
        assert_eq!(rank.1, single_counts, "rank {r}'s counts");
        // Every gradient: replicated parameters whole, experts this rank's half (same ids).
        assert_eq!(rank.2.len(), single_grads.len(), "rank {r} has a gradient for every parameter");
        for (id, (dims, g)) in &rank.2 {
            let (full_dims, full) = &single_grads[id];
            let expected = if dims == full_dims {
                &full[..]
            } else {
                assert_eq!(dims[0] * 2, full_dims[0], "an expert tensor holds half the experts");
                sharded_ids += 1;
                &full[r * g.len()..(r + 1) * g.len()]
            };
            let d = rel_diff(g, expected);
            assert!(d <= 1e-4, "rank {r}: gradient of {dims:?} off by {d:e} of its largest entry");
        }
    }
    // 3 MoE layers × 3 expert tensors on each rank.
    assert_eq!(sharded_ids, 2 * 9);

    // Unsharded, every rank holds the original model again.
    let probe = Tensor::<B, 2, Int>::from_data(TensorData::new(ids[..n - 1].to_vec(), [1, n - 1]), &device);
    let expected = host(model.forward(probe).logits);
    for rank in &ranks {
        assert!(rel_diff(&rank.3, &expected) <= 1e-6, "unsharded logits differ from the original model's");
    }
}

#[test]
fn a_failing_rank_ends_the_step_with_an_error() {
    let device = Default::default();
    let model = DeepSeekV3Config::tiny().init::<B>(&device);
    let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new((0..26).collect::<Vec<i64>>(), [2, 13]), &device);
    let err = launch(Comm::group_with_timeout(2, Transport::Host, Duration::from_secs(20)), |comm| {
        let shard = model.shard_experts(&comm, &device)?;
        if comm.rank() == 1 {
            return Err(EpError::Placement { detail: "rank 1 gives up".into() });
        }
        shard.try_loss(tokens.clone()).map(|_| ())
    })
    .unwrap_err();
    assert!(matches!(&err, EpError::Placement { detail } if detail.contains("rank 1 gives up")), "{err}");

    // Three ranks cannot split 16 experts.
    let err = launch(Comm::group(3, Transport::Host), |comm| model.shard_experts(&comm, &device).map(|_| ())).unwrap_err();
    assert!(err.to_string().contains("physical_experts (16)") && err.to_string().contains("gpus (3)"), "{err}");

    // The plain `loss` of a sharded model panics with the collective's error.
    let panic = launch(Comm::group_with_timeout(2, Transport::Host, Duration::from_secs(20)), |comm| {
        let shard = model.shard_experts(&comm, &device)?;
        if comm.rank() == 0 {
            let _ = shard.loss(tokens.clone());
        }
        Ok::<_, EpError>(())
    })
    .unwrap_err();
    assert!(matches!(&panic, EpError::Comm(CommError::RankFailed { rank: 0, reason, .. }) if reason.contains("DeepSeekV3::loss") && reason.contains("rank 1")), "{panic}");
}
