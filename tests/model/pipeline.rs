//! The model cut into pipeline stages: DualPipeV over 2 ranks (4 stages) and 1F1B over 3
//! ranks (3 stages, the tail alone in the last) take the step one device takes on the
//! whole batch — objective, its parts, expert counts, every gradient (the balance losses
//! of every stage included), the balancing update — and the stages put back together are
//! the model; bad cuts are named.

use crate::common::{host, Ref, Rng};
use crate::ep::{host_grads, rel_diff};
use burn::backend::Autodiff;
use burn::optim::GradientsParams;
use burn::tensor::{Int, Tensor, TensorData};
use burn_deepseek::model::{DeepSeekV3, DeepSeekV3Config, SplitError};
use burn_dualpipe::executor::Pipeline;
use burn_dualpipe::schedule::{Schedule, ScheduleKind};
use burn_moe::comm::{launch, Comm, Transport};
use burn_moe::ep::EpError;
use std::sync::Mutex;

type B = Autodiff<Ref>;

fn to_vec(t: &Tensor<B, 1, Int>) -> Vec<i64> {
    t.clone().into_data().convert::<i64>().to_vec().unwrap()
}

#[test]
fn pipelines_take_the_single_device_step() {
    let mut rng = Rng::new("pipelines_take_the_single_device_step");
    let device = Default::default();
    let mut config = DeepSeekV3Config::tiny();
    // A balance loss large enough to show in the gate's gradients.
    config.moe.balance_loss_weight = 0.05;
    let model = crate::seeded::<B>(&config, rng.next_u64(), &device);
    let (rows, n) = (4, 13);
    let ids: Vec<i64> = (0..rows * n).map(|_| rng.below(256) as i64).collect();
    let row = |m: usize| TensorData::new(ids[m * n..(m + 1) * n].to_vec(), [1, n]);

    let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.clone(), [rows, n]), &device);
    let single = model.loss(tokens);
    let single_loss = host(single.loss.clone())[0] as f64;
    let single_lm = host(single.lm_loss.clone())[0] as f64;
    let single_counts: Vec<Vec<i64>> = single.counts.iter().map(to_vec).collect();
    let single_grads = host_grads(&model, &GradientsParams::from_grads(single.loss.backward(), &model));
    let bias = |m: &DeepSeekV3<B>| m.moe_layers().map(|l| host(l.bias.val())).collect::<Vec<_>>();
    let updated = bias(&model.clone().update_bias(&single.counts));

    for (kind, ranks) in [(ScheduleKind::DualPipeV, 2), (ScheduleKind::OneFOneB, 3)] {
        let schedule = Schedule::new(kind, ranks, rows).unwrap();
        let staged = model.clone().into_stages(schedule.stages()).unwrap();
        let objective = staged.objective;
        let blocks: Vec<usize> = staged.stages.iter().map(|s| s.layers.len()).collect();
        let mut pipeline = Pipeline::new(staged.stages, vec![device; ranks], schedule).unwrap();
        let inputs = (0..rows).map(|m| objective.input(Tensor::<B, 2, Int>::from_data(row(m), &device))).collect();
        let lm = Mutex::new(0.0);
        let out = pipeline
            .step(inputs, |y, m| {
                let parts = objective.loss(y.clone(), Tensor::from_data(row(m), &y.device()));
                *lm.lock().unwrap() += host(parts.lm_loss)[0] as f64 / rows as f64;
                parts.loss
            })
            .unwrap_or_else(|e| panic!("{kind}: {e}"));

        // Equal micro-batches: the mean of their objectives is the batch's.
        assert!((out.loss - single_loss).abs() <= 1e-5 * single_loss, "{kind} {blocks:?}: loss {} vs one device {single_loss}", out.loss);
        let lm = lm.into_inner().unwrap();
        assert!((lm - single_lm).abs() <= 1e-5 * single_lm, "{kind}: next-token loss {lm} vs {single_lm}");
        let counts: Vec<_> = pipeline.stages().iter().map(|s| s.take_counts(rows)).collect();
        assert_eq!(counts.iter().flatten().map(to_vec).collect::<Vec<_>>(), single_counts, "{kind} {blocks:?}: counts");

        // Every parameter's gradient, by id, stage by stage.
        let grads = pipeline.stage_grads(out.grads);
        let mut seen = 0;
        for (s, (stage, g)) in pipeline.stages().iter().zip(&grads).enumerate() {
            for (id, (dims, g)) in host_grads(stage, g) {
                let (full_dims, full) = &single_grads[&id];
                assert_eq!(&dims, full_dims);
                let d = rel_diff(&g, full);
                assert!(d <= 1e-4, "{kind}: stage {s}: gradient of {dims:?} off by {d:e} of its largest entry");
                seen += 1;
            }
        }
        assert_eq!(seen, single_grads.len(), "{kind}: a gradient for every parameter");

        // The balancing update stage by stage equals the whole model's; reassembled, the
        // stages are the model.
        pipeline.map_stages(|s, stage| stage.update_bias(&counts[s]));
        let rebuilt = DeepSeekV3::from_stages(pipeline.into_stages());
        assert_eq!(bias(&rebuilt), updated, "{kind}: balancing bias after the update");
        let probe = || Tensor::<B, 2, Int>::from_data(TensorData::new(ids[..n - 1].to_vec(), [1, n - 1]), &device);
        let d = rel_diff(&host(rebuilt.forward(probe()).logits), &host(model.clone().update_bias(&single.counts).forward(probe()).logits));
        assert!(d <= 1e-6, "{kind}: the rebuilt model's logits differ by {d:e}");
    }
}

#[test]
fn bad_cuts_are_named() {
    let device = Default::default();
    let model = DeepSeekV3Config::tiny().init::<B>(&device);
    for n in [0, 5] {
        let err = model.clone().into_stages(n).unwrap_err();
        assert_eq!(err, SplitError::Stages { stages: n, layers: 3 });
        assert!(err.to_string().contains(&format!("into {n} stages")) && err.to_string().contains("1 to 4 stages"), "{err}");
    }
    // Every count of stages from 1 to blocks + 1 cuts, and puts back.
    for n in 1..=4 {
        let staged = model.clone().into_stages(n).unwrap();
        assert_eq!(staged.stages.iter().map(|s| s.layers.len()).sum::<usize>(), 3);
        assert_eq!(DeepSeekV3::from_stages(staged.stages).layers.len(), 3);
    }
    let errs = launch(Comm::group(2, Transport::Host), |comm| {
        let shard = model.shard_experts(&comm, &device)?;
        Ok::<_, EpError>(shard.into_stages(2).unwrap_err())
    })
    .unwrap();
    assert!(errs.iter().all(|e| *e == SplitError::ShardedExperts && e.to_string().contains("unshard_experts")), "{errs:?}");
}
