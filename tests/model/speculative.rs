//! Speculative decoding with the MTP module (`model::Speculative`): its tokens are greedy
//! decoding's, token for token, whether the drafts are rejected (random checkpoints that
//! transformers wrote: almost every draft is wrong, so the caches drop a position at
//! almost every step) or accepted (a tiny model trained here on a periodic text, whose
//! MTP module learns the token after next); on the reference backend and on wgpu (the
//! MLA decode kernel over a truncated cache). Bad input is refused before anything is fed.

use crate::common::{kernel_device, Flex, Fused, Ref};
use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::{Tensor, TensorData};
use burn_deepseek::hf::weights::{load_safetensors, save_safetensors};
use burn_deepseek::hf::HfModel;
use burn_deepseek::model::ModelBackend;
use burn_deepseek::model::{DeepSeekV3, DeepSeekV3Config, Sampling, Session, Speculative, SpeculativeError, SpeculativeStats};
use burn_moe::mla::{CacheError, MlaConfig};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf").join(name)
}

/// Greedy tokens of a plain session.
fn greedy<B: ModelBackend>(model: &DeepSeekV3<B>, mla: &MlaConfig, prompt: &[u32], n: usize, stop: &[u32], device: &B::Device) -> Vec<u32> {
    Session::new(model, mla, prompt.len() + n, Sampling::greedy(), device).generate_until(prompt, n, stop, |_| {}).unwrap()
}

/// Speculative decoding of `n` tokens equals greedy decoding; the streamed tokens are the
/// returned ones; every token is the prompt's, a step's, or an accepted draft's. Returns
/// the stats.
fn check<B: ModelBackend>(model: &DeepSeekV3<B>, mla: &MlaConfig, prompt: &[u32], n: usize, stop: &[u32], device: &B::Device) -> SpeculativeStats {
    let want = greedy(model, mla, prompt, n, stop, device);
    let mut fast = Speculative::new(model, mla, prompt.len() + n, device).unwrap();
    let mut streamed = Vec::new();
    let got = fast.generate_until(prompt, n, stop, |t| streamed.push(t)).unwrap();
    assert_eq!(got, want, "speculative against greedy decoding: prompt of {} tokens, n {n}, stop {stop:?}", prompt.len());
    assert_eq!(streamed, got, "the stream hands over every token once, in order");
    let s = fast.stats();
    assert!(s.accepted <= s.drafted && s.drafted <= s.steps, "{s:?}");
    // The prompt's pass gives one token, each step one, each accepted draft one more (the
    // last accepted draft may end the generation alone).
    assert!(got.len() <= 1 + s.steps + s.accepted && got.len() + 1 >= 1 + s.steps + s.accepted, "{} tokens from {s:?}", got.len());
    s
}

fn random_checkpoints<B: ModelBackend>(device: &B::Device) {
    for name in ["v3_yarn", "v3_plain"] {
        let hf = HfModel::<B>::open(fixture(name), device).unwrap();
        assert_eq!(hf.model.mtp.len(), 1, "{name} has an MTP layer");
        let mla = &hf.config.mla;
        let text = |s: &str| s.bytes().map(|b| (b % 120) as u32 + 3).collect::<Vec<_>>();
        let mut drafted = 0;
        for (prompt, n) in [("Passepartout", 24), ("A", 2), ("Phileas Fogg", 1), ("Mr. Fix", 3)] {
            drafted += check(&hf.model, mla, &text(prompt), n, &[], device).drafted;
        }
        // A stop token that greedy decoding draws: both stop right after it.
        let prompt = text("Aouda");
        let plain = greedy(&hf.model, mla, &prompt, 12, &[], device);
        let got = check(&hf.model, mla, &prompt, 12, &[plain[5]], device);
        assert!(drafted > 0 && got.steps > 0, "{name}: drafts were verified");
    }
}

#[test]
fn speculative_decoding_gives_the_greedy_tokens_of_random_checkpoints() {
    random_checkpoints::<Ref>(&Default::default());
}

#[test]
fn speculative_decoding_on_the_wgpu_runtime() {
    random_checkpoints::<Fused>(&kernel_device());
}

/// A text of period 27 whose bytes differ: what follows a byte is determined, so the
/// main model and its MTP module both learn it in a few dozen steps.
const PERIODIC: &[u8] = b"abcdefghijklmnopqrstuvwxyz ";

fn periodic(from: usize, len: usize) -> Vec<u32> {
    (from..from + len).map(|i| PERIODIC[i % PERIODIC.len()] as u32).collect()
}

#[test]
fn drafts_of_a_trained_mtp_module_are_accepted() {
    type T = Autodiff<Flex>;
    let device = Default::default();
    let config = DeepSeekV3Config::tiny();
    let mut model: DeepSeekV3<T> = crate::seeded(&config, 17, &device);
    let mut optim = AdamConfig::new().init::<T, DeepSeekV3<T>>();
    let (rows, len) = (8, 33);
    for step in 0..60 {
        let ids: Vec<i64> = (0..rows).flat_map(|r| periodic(7 * r + 3 * step, len)).map(i64::from).collect();
        let out = model.loss(Tensor::from_data(TensorData::new(ids, [rows, len]), &device));
        let grads = GradientsParams::from_grads(out.loss.backward(), &model);
        model = optim.step(1e-2, model, grads).update_bias(&out.counts);
    }
    let model = model.valid();
    let stats = check::<Flex>(&model, &config.mla, &periodic(5, 9), 60, &[], &device);
    let plain = greedy::<Flex>(&model, &config.mla, &periodic(5, 9), 60, &[], &device);
    assert_eq!(plain, periodic(14, 60), "the trained model continues the text");
    assert!(stats.acceptance() > 0.9, "drafts of the trained MTP module: {stats:?}");
    // Two tokens per step: about half the main model's steps of greedy decoding (59).
    assert!(stats.steps < 35, "{stats:?}");
    // On the wgpu runtime too (its kernels), from the same weights.
    let path = std::env::temp_dir().join(format!("burn-deepseek-speculative-{}.safetensors", std::process::id()));
    save_safetensors(&model, &config, &path).unwrap();
    let wgpu = kernel_device();
    let (moved, _) = load_safetensors(config.init::<Fused>(&wgpu), &config, &[&path]).unwrap();
    std::fs::remove_file(&path).unwrap();
    let stats = check::<Fused>(&moved, &config.mla, &periodic(5, 9), 60, &[], &wgpu);
    assert!(stats.acceptance() > 0.9, "on wgpu: {stats:?}");
}

#[test]
fn speculative_decoding_refuses_what_it_cannot_do_before_feeding_anything() {
    let device = Default::default();
    let no_mtp = DeepSeekV3Config::tiny().with_mtp_depth(0);
    let model = no_mtp.init::<Ref>(&device);
    assert_eq!(Speculative::new(&model, &no_mtp.mla, 16, &device).err(), Some(SpeculativeError::NoMtp));

    let config = DeepSeekV3Config::tiny();
    let model = config.init::<Ref>(&device);
    // One page of 64 tokens: 5 + 61 − 1 tokens do not fit.
    let mut fast = Speculative::new(&model, &config.mla, 20, &device).unwrap();
    assert_eq!(fast.generate(&[1, 2, 3, 4, 5], 61).unwrap_err(), SpeculativeError::Cache(CacheError::Full { needed: 2, free: 1 }));
    assert_eq!(fast.stats(), SpeculativeStats::default(), "no step was taken");
    let max = config.mla.max_seq_len;
    let mut long = Speculative::new(&model, &config.mla, max + 8, &device).unwrap();
    assert_eq!(long.generate(&[1; 8], max).unwrap_err(), SpeculativeError::Cache(CacheError::TooLong { id: 0, len: max + 7, max }));
    // Nothing was fed: the same session still generates.
    assert_eq!(fast.generate(&[1, 2, 3, 4, 5], 12).unwrap().len(), 12);
}
