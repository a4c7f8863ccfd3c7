//! Training through Burn's Learner (feature `learner`): a Learner step is the manual step
//! (loss, backward, AdamW, balancing-bias update), the metrics read what the step
//! produced, and a whole `SupervisedTraining` run trains and checkpoints.

use super::common::{Flex, Ref, Rng};
use super::seeded;
use burn::backend::Autodiff;
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoaderBuilder, Progress};
use burn::data::dataset::InMemDataset;
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::lr_scheduler::constant::ConstantLr;
use burn::optim::{AdamWConfig, GradientsParams, MultiGradientsParams, Optimizer};
use burn::record::CompactRecorder;
use burn::tensor::backend::{Backend, DeviceOps};
use burn::tensor::{Int, Tensor, TensorData};
use burn_deepseek::model::learner::{LmFigure, LmMetric, LmStats, ObjectiveMetric, TokenBatch, TokenBatcher};
use burn_deepseek::model::{expert_load, DeepSeekV3, DeepSeekV3Config};
use burn_deepseek::train::metric::{Metric, MetricMetadata, Numeric};
use burn_deepseek::train::{ItemLazy, Learner, SupervisedTraining, TrainStep};

/// Every float parameter's values, in module order.
fn params<B: Backend, M: Module<B>>(module: &M) -> Vec<Vec<f32>> {
    struct Visit(Vec<Vec<f32>>);
    impl<B: Backend> ModuleVisitor<B> for Visit {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.push(param.val().into_data().convert::<f32>().to_vec().expect("f32 values"));
        }
    }
    let mut v = Visit(Vec::new());
    module.visit(&mut v);
    v.0
}

fn token_rows(rng: &mut Rng, rows: usize, n: usize) -> Vec<Vec<u32>> {
    (0..rows).map(|_| (0..n).map(|_| rng.below(256) as u32).collect()).collect()
}

fn tokens<B: Backend>(rows: &[Vec<u32>], device: &B::Device) -> Tensor<B, 2, Int> {
    let ids: Vec<i64> = rows.iter().flatten().map(|&t| i64::from(t)).collect();
    Tensor::from_data(TensorData::new(ids, [rows.len(), rows[0].len()]), device)
}

#[test]
fn a_learner_step_is_the_manual_step() {
    type A = Autodiff<Ref>;
    let mut rng = Rng::new("a_learner_step_is_the_manual_step");
    let device = Default::default();
    let model: DeepSeekV3<A> = seeded(&DeepSeekV3Config::tiny(), 7, &device);
    let lr = 2e-3;
    let mut learner = Learner::new(model.clone(), AdamWConfig::new().with_weight_decay(0.1).init(), ConstantLr::new(lr));
    let mut manual = model;
    let mut optim = AdamWConfig::new().with_weight_decay(0.1).init();
    let bias_before = params(&manual.moe_layers().next().unwrap().bias);
    for step in 0..3 {
        let rows = token_rows(&mut rng, 4, 18);
        learner.lr_step(); // as Burn's epoch loop does before each step
        let out = learner.train_step(TokenBatcher.batch(rows.clone(), &device));
        let stats = out.item.sync();
        learner.optimizer_step(out.grads);

        let loss = manual.loss(tokens::<A>(&rows, &device));
        let expected = loss.loss.clone().into_scalar() as f64;
        let grads = GradientsParams::from_grads(loss.loss.backward(), &manual);
        manual = optim.step(lr, manual, grads).update_bias(&loss.counts);
        assert!((stats.loss - expected).abs() <= 1e-6 * expected.abs(), "step {step}: Learner loss {} vs {expected}", stats.loss);
        assert_eq!(stats.rows, 4);
    }
    // AdamW divides each gradient by its running RMS, so a gradient near zero whose last
    // bits differ (the backend's summation order) moves its value by a fraction of the
    // step, and a wrong step (a missed update, the counts fed to AdamW, no weight decay)
    // by about `lr`: 1% of `lr` over the three steps separates the two.
    let (got, want) = (params(&learner.model()), params(&manual));
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let err = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 0.01 * lr as f32, "parameter {i}: Learner and manual steps differ by {err} (lr {lr})");
    }
    // The balancing bias moves by ±γ per step from integer counts: exactly the same.
    let bias_after = params(&learner.model().moe_layers().next().unwrap().bias);
    assert_eq!(bias_after, params(&manual.moe_layers().next().unwrap().bias));
    assert_ne!(bias_before, bias_after, "the balancing bias moved (γ · sign(mean − count) per step)");
}

#[test]
fn the_multi_device_optimizer_step_takes_the_counts_out_too() {
    type A = Autodiff<Ref>;
    let mut rng = Rng::new("the_multi_device_optimizer_step_takes_the_counts_out_too");
    let device = burn::backend::ndarray::NdArrayDevice::Cpu;
    let model: DeepSeekV3<A> = seeded(&DeepSeekV3Config::tiny(), 5, &device);
    let rows = token_rows(&mut rng, 4, 18);
    let step = || TrainStep::step(&model, TokenBatcher.batch(rows.clone(), &device)).grads;
    let lr = 1e-3;
    let single = model.clone().optimize(&mut AdamWConfig::new().init(), lr, step());
    let grads = MultiGradientsParams { grads: vec![(step(), device.id())] };
    let multi = model.clone().optimize_multi(&mut AdamWConfig::new().init(), lr, grads);
    for (i, (a, b)) in params(&single).iter().zip(&params(&multi)).enumerate() {
        let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(err <= 0.01 * lr as f32, "parameter {i}: optimize and optimize_multi differ by {err}");
    }
    // The bias moved by ±γ = 1e-3 from zero (or stayed), not by an AdamW step on the counts.
    let bias = params(&multi.moe_layers().next().unwrap().bias);
    assert!(bias.iter().flatten().all(|&v| v == 0.0 || v.abs() == 1e-3), "{bias:?}");
    assert_eq!(bias, params(&single.moe_layers().next().unwrap().bias));
}

#[test]
fn metrics_read_the_step() {
    assert_eq!(expert_load(&[vec![2, 2, 2, 2]]), 1.0);
    assert_eq!(expert_load(&[vec![4, 0, 0, 0], vec![2, 2, 2, 2]]), 2.5); // (4 + 1) / 2
    assert_eq!(expert_load(&[]), 1.0);
    let meta = || MetricMetadata {
        progress: Progress { items_processed: 1, items_total: 2 },
        global_progress: Progress { items_processed: 1, items_total: 2 },
        iteration: Some(1),
        lr: None,
    };
    let stats = |rows, lm| LmStats { loss: lm + 1.0, lm_loss: lm, balance_loss: 1e-4, expert_load: 1.5, rows };
    let mut metric = LmMetric::new(LmFigure::NextTokenLoss);
    metric.update(&stats(2, 1.0), &meta());
    metric.update(&stats(6, 3.0), &meta());
    assert_eq!(metric.value().current(), 3.0);
    assert_eq!(metric.running_value().current(), 2.5, "averaged by rows: (2·1 + 6·3) / 8");
    let mut load = LmMetric::new(LmFigure::ExpertLoad);
    load.update(&stats(1, 0.0), &meta());
    assert_eq!(load.value().current(), 1.5);
    assert_eq!(load.name().as_str(), "Expert load");

    let err = std::panic::catch_unwind(|| <TokenBatcher as Batcher<Ref, Vec<u32>, TokenBatch<Ref>>>::batch(&TokenBatcher, vec![vec![1, 2, 3], vec![4, 5]], &Default::default()))
        .unwrap_err();
    let message = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("[3, 2]"), "{message}");
}

#[test]
fn supervised_training_trains_and_checkpoints() {
    type A = Autodiff<Flex>;
    let mut rng = Rng::new("supervised_training_trains_and_checkpoints");
    let device = Default::default();
    let config = DeepSeekV3Config::tiny();
    let model: DeepSeekV3<A> = seeded(&config, 11, &device);
    // A learnable stream: each row counts up from a random start.
    let rows = |n: usize, rng: &mut Rng| -> Vec<Vec<u32>> { (0..n).map(|_| (0..18).map(|t| ((rng.below(200) + t) % 256) as u32).collect()).collect() };
    let (train, valid) = (rows(48, &mut rng), rows(8, &mut rng));
    let held: TokenBatch<Flex> = TokenBatcher.batch(valid.clone(), &device);
    let before = model.valid().loss(held.tokens.clone()).lm_loss.into_scalar();
    let dir = std::env::temp_dir().join(format!("burn-deepseek-learner-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let train = DataLoaderBuilder::new(TokenBatcher).batch_size(8).shuffle(3).build(InMemDataset::new(train));
    let valid = DataLoaderBuilder::new(TokenBatcher).batch_size(8).build(InMemDataset::new(valid));
    let result = SupervisedTraining::new(&dir, train, valid)
        .metric_train_numeric(ObjectiveMetric::new())
        .metric_valid_numeric(LmMetric::new(LmFigure::NextTokenLoss))
        .metric_train_numeric(LmMetric::new(LmFigure::ExpertLoad))
        .with_file_checkpointer(CompactRecorder::new())
        .with_application_logger(None) // no process-wide panic hook in a test binary
        .num_epochs(3)
        .launch(Learner::new(model, AdamWConfig::new().init(), ConstantLr::new(3e-3)));
    let after = result.model.loss(held.tokens).lm_loss.into_scalar();
    assert!(after < before - 0.1, "18 steps of Burn's loop lower the held-out loss: {before} → {after}");
    for file in ["model-3.mpk", "optim-3.mpk", "scheduler-3.mpk"] {
        assert!(dir.join("checkpoint").join(file).exists(), "the last epoch's checkpoint {file} in {}", dir.display());
    }
    std::fs::remove_dir_all(&dir).ok();
}
