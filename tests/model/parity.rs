//! Parity with Hugging Face transformers: checkpoints that transformers wrote (tiny random
//! `DeepseekV3ForCausalLM` / `DeepseekV2ForCausalLM`, made by
//! `tests/fixtures/hf/make_fixtures.py`, versions in `versions.json`) load through
//! `hf::HfDeepSeekConfig` and `hf::weights`, and reproduce what transformers computed:
//! logits within 1e-4 (absolute; logits are O(1) and two float32 implementations of three
//! layers differ by ~1e-6), every token's routed experts in every MoE layer exactly, greedy
//! generation with the cache token for token, and the MTP layer's logits within 1e-4. The
//! fixtures' inputs keep every routing decision and greedy step away from ties (margins in
//! `versions.json`), so exact comparisons are meaningful.
//!
//! Four shapes: V3 with q_lora and YaRN, V3 without rope scaling, V2-Lite-like (softmax,
//! greedy, full-rank queries, 2 shared experts, no balancing bias in the file), V2 with
//! group-limited greedy routing and a routed scale of 16.

use crate::common::{host, host_int, kernel_device, Fused, Ref};
use burn::tensor::{Int, Tensor, TensorData};
use burn_deepseek::hf::tokenizer::{HfTokenizer, TokenizerError};
use burn_deepseek::hf::weights::load_safetensors;
use burn_deepseek::hf::{HfDeepSeekConfig, HfModel};
use burn_deepseek::model::ModelBackend;
use burn_deepseek::model::{DeepSeekV3, DeepSeekV3Config, Ffn, Sampling, Session};
use burn_moe::mla::{CacheError, PAGE_SIZE};
use burn_moe::router::route;
use safetensors::tensor::Dtype;
use std::collections::BTreeMap;
use std::path::PathBuf;

const LOGITS_TOL: f32 = 1e-4;

fn folder(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf").join(name)
}

/// A reference tensor: its shape and values (f32 or i64).
enum Value {
    F32(Vec<usize>, Vec<f32>),
    I64(Vec<usize>, Vec<i64>),
}

struct Fixture {
    name: &'static str,
    config: DeepSeekV3Config,
    reference: BTreeMap<String, Value>,
}

impl Fixture {
    fn open(name: &'static str) -> Self {
        let dir = folder(name);
        let json = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let config = HfDeepSeekConfig::from_json(&json).unwrap().model().unwrap_or_else(|e| panic!("{name}: {e}"));
        let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let reference = st
            .tensors()
            .into_iter()
            .map(|(k, v)| {
                let shape = v.shape().to_vec();
                let value = match v.dtype() {
                    Dtype::F32 => Value::F32(shape, v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()),
                    Dtype::I64 => Value::I64(shape, v.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()),
                    other => panic!("{name}: reference {k} has dtype {other:?}"),
                };
                (k, value)
            })
            .collect();
        Self { name, config, reference }
    }

    fn f32(&self, key: &str) -> (&[usize], &[f32]) {
        match &self.reference[key] {
            Value::F32(s, v) => (s, v),
            Value::I64(..) => panic!("{}: {key} is not f32", self.name),
        }
    }

    fn i64(&self, key: &str) -> (&[usize], &[i64]) {
        match &self.reference[key] {
            Value::I64(s, v) => (s, v),
            Value::F32(..) => panic!("{}: {key} is not i64", self.name),
        }
    }

    /// The model, loaded; every tensor of the file used but the defaulted ones.
    fn model<B: ModelBackend>(&self, device: &B::Device) -> (DeepSeekV3<B>, Vec<String>) {
        let (model, report) =
            load_safetensors(self.config.init::<B>(device), &self.config, &[folder(self.name).join("model.safetensors")]).unwrap_or_else(|e| panic!("{}: {e}", self.name));
        assert!(report.unused.is_empty(), "{}: unused tensors {:?}", self.name, report.unused);
        (model, report.defaulted)
    }

    fn input_ids<B: ModelBackend>(&self, device: &B::Device) -> Tensor<B, 2, Int> {
        let (shape, ids) = self.i64("input_ids");
        Tensor::from_data(TensorData::new(ids.to_vec(), [shape[0], shape[1]]), device)
    }
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let (i, err) = got.iter().zip(want).map(|(g, w)| (g - w).abs()).enumerate().fold((0, 0.0f32), |m, (i, e)| if e > m.1 || e.is_nan() { (i, e) } else { m });
    assert!(err <= tol, "{what}: |got − transformers| = {err:e} > {tol:e} at {i} (got {}, transformers {})", got[i], want[i]);
}

/// Logits, expert choices (walking the blocks with their public parts, the walk checked
/// against the model's own forward), MTP logits.
fn forward_matches<B: ModelBackend>(fixture: &Fixture, device: &B::Device) {
    let name = fixture.name;
    let (model, _) = fixture.model::<B>(device);
    let ids = fixture.input_ids::<B>(device);
    let logits = model.forward(ids.clone()).logits;
    let (shape, want) = fixture.f32("logits");
    assert_eq!(logits.dims().to_vec(), shape, "{name}: logits shape");
    let got = host(logits);
    assert_close(&format!("{name}: logits"), &got, want, LOGITS_TOL);

    let mut x = model.embed.forward(ids.clone());
    let mut moe_layers = 0;
    for (l, block) in model.layers.iter().enumerate() {
        let h = x.clone() + block.attn.forward(block.attn_norm.forward(x));
        let normed = block.ffn_norm.forward(h.clone());
        let out = match &block.ffn {
            Ffn::Dense(mlp) => mlp.forward(normed),
            Ffn::Moe(moe) => {
                let [b, s, d] = normed.dims();
                let routing = route(moe.gate.forward(normed.clone().reshape([b * s, d])), Some(moe.bias.val()), &moe.router).unwrap();
                let k = moe.router.top_k;
                let mut chosen = host_int(routing.indices);
                chosen.chunks_mut(k).for_each(|row| row.sort_unstable());
                let (shape, want) = fixture.i64(&format!("experts.{l}"));
                assert_eq!(shape, [b * s, k], "{name}: experts.{l} shape");
                let first = chosen.chunks(k).zip(want.chunks(k)).position(|(g, w)| g != w);
                assert!(
                    first.is_none(),
                    "{name}: layer {l}, token {:?}: experts {:?}, transformers {:?}",
                    first,
                    first.map(|t| &chosen[t * k..t * k + k]),
                    first.map(|t| &want[t * k..t * k + k])
                );
                moe_layers += 1;
                moe.forward(normed).output
            }
            Ffn::ExpertParallel(_) => unreachable!("a loaded model is not sharded"),
        };
        x = h + out;
    }
    assert_eq!(moe_layers, fixture.reference.keys().filter(|k| k.starts_with("experts.")).count(), "{name}: MoE layers");
    assert_eq!(host(model.head.forward(model.norm.forward(x))), got, "{name}: the walk over the blocks is the model's forward");

    if model.mtp.is_empty() {
        assert!(!fixture.reference.contains_key("mtp_logits"), "{name}: the fixture has MTP logits, the model no MTP layer");
        return;
    }
    let (_, mtp) = model.try_forward_mtp(ids).unwrap();
    let (shape, want) = fixture.f32("mtp_logits");
    assert_eq!(mtp[0].dims().to_vec(), shape, "{name}: MTP logits shape");
    assert_close(&format!("{name}: MTP logits"), &host(mtp[0].clone()), want, LOGITS_TOL);
}

fn generation_matches<B: ModelBackend>(fixture: &Fixture, device: &B::Device) {
    let (model, _) = fixture.model::<B>(device);
    let prompt: Vec<u32> = fixture.i64("prompt").1.iter().map(|&t| t as u32).collect();
    let want: Vec<u32> = fixture.i64("generated").1.iter().map(|&t| t as u32).collect();
    let mut session = Session::new(&model, &fixture.config.mla, prompt.len() + want.len(), Sampling::greedy(), device);
    let got = session.generate(&prompt, want.len()).unwrap();
    assert_eq!(got, want, "{}: greedy generation of {prompt:?}", fixture.name);
}

const ALL: [&str; 4] = ["v3_yarn", "v3_plain", "v2_lite", "v2_group"];

#[test]
fn transformers_checkpoints_give_transformers_logits_experts_and_mtp_logits() {
    for name in ALL {
        forward_matches::<Ref>(&Fixture::open(name), &Default::default());
    }
}

#[test]
fn transformers_checkpoints_generate_transformers_tokens() {
    for name in ALL {
        generation_matches::<Ref>(&Fixture::open(name), &Default::default());
    }
}

/// The same comparisons through the CubeCL kernels (dispatch, grouped GEMM, MLA decode).
#[test]
fn transformers_parity_on_the_wgpu_runtime() {
    for name in ["v3_yarn", "v2_group"] {
        let fixture = Fixture::open(name);
        forward_matches::<Fused>(&fixture, &kernel_device());
        generation_matches::<Fused>(&fixture, &kernel_device());
    }
}

/// DeepSeek-V2 checkpoints have no balancing bias: the loader leaves it at zero and says
/// so; a V3 checkpoint without it is refused, naming the key.
#[test]
fn v2_checkpoints_load_without_a_balancing_bias() {
    let device = Default::default();
    let fixture = Fixture::open("v2_lite");
    let (model, defaulted) = fixture.model::<Ref>(&device);
    assert_eq!(defaulted, ["model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.2.mlp.gate.e_score_correction_bias"]);
    for moe in model.moe_layers() {
        assert_eq!(moe.bias_update_speed, 0.0);
        assert!(host(moe.bias.val()).iter().all(|&b| b == 0.0));
    }
    // A V3 file with one bias removed.
    let v3 = Fixture::open("v3_plain");
    let bytes = std::fs::read(folder("v3_plain").join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let missing = "model.layers.2.mlp.gate.e_score_correction_bias";
    let kept: Vec<_> = st.tensors().into_iter().filter(|(k, _)| k != missing).collect();
    let path = std::env::temp_dir().join(format!("burn-deepseek-v3-no-bias-{}.safetensors", std::process::id()));
    safetensors::serialize_to_file(kept, None, &path).unwrap();
    let err = load_safetensors(v3.config.init::<Ref>(&device), &v3.config, &[&path]).map(|_| ()).unwrap_err();
    std::fs::remove_file(&path).unwrap();
    assert!(err.to_string().contains(missing), "{err}");
}

/// The fixture folders through `HfModel` (config, weights, tokenizer.json): the tokenizer
/// encodes as transformers' did, and greedy generation, stopped at `eos_token_id` as
/// transformers' `generate` stops, decodes to transformers' text.
#[test]
fn checkpoint_folders_generate_transformers_text() {
    let device = Default::default();
    for name in ALL {
        let fixture = Fixture::open(name);
        let hf = HfModel::<Ref>::open(folder(name), &device).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(hf.eos, [1], "{name}: eos_token_id");
        let bytes = std::fs::read(folder(name).join("reference.safetensors")).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = meta.metadata().clone().expect("text metadata");
        let ids = hf.tokenizer.encode(&meta["text_prompt"]).unwrap();
        let want: Vec<u32> = fixture.i64("text_ids").1.iter().map(|&t| t as u32).collect();
        assert_eq!(ids, want, "{name}: encoding of {:?}", meta["text_prompt"]);
        let mut session = Session::new(&hf.model, &hf.config.mla, 64, Sampling::greedy(), &device);
        let mut stream = hf.tokenizer.stream();
        let mut streamed = String::new();
        let out = session.generate_until(&ids, 10, &hf.eos, |id| streamed.push_str(&stream.next(id).unwrap().unwrap_or_default())).unwrap();
        let text = hf.tokenizer.decode(&out).unwrap();
        assert_eq!(text, meta["text_generated"], "{name}: generated text");
        assert_eq!(streamed, text, "{name}: the stream's pieces join to the decoded text");
    }
}

/// A missing or foreign tokenizer, and a prompt beyond the cache, are refused before any
/// work, naming the values.
#[test]
fn bad_tokenizers_and_overlong_prompts_are_refused() {
    let path = folder("v3_yarn").join("tokenizer.json");
    assert_eq!(HfTokenizer::open(&path, 256).unwrap_err(), TokenizerError::Vocabulary { tokenizer: 128, model: 256 });
    assert_eq!(HfTokenizer::open(&path, 100).unwrap_err(), TokenizerError::Vocabulary { tokenizer: 128, model: 100 });
    let missing = folder("v3_yarn").join("no-tokenizer.json");
    assert_eq!(HfTokenizer::open(&missing, 128).unwrap_err(), TokenizerError::Missing { path: missing.clone() });
    assert_eq!(HfTokenizer::open(&path, 128).unwrap().vocab_size(), 128);

    let device = Default::default();
    let hf = HfModel::<Ref>::open(folder("v3_yarn"), &device).unwrap();
    let max = hf.config.mla.max_seq_len;
    // Within the rotary table but beyond the session's pages (one page for a capacity of
    // 16): refused before the prompt is fed.
    let mut session = Session::new(&hf.model, &hf.config.mla, 16, Sampling::greedy(), &device);
    let err = session.generate(&[5; PAGE_SIZE - 4], 10).unwrap_err();
    assert_eq!(err, CacheError::Full { needed: 2, free: 1 });
    assert!(session.is_empty(), "nothing was fed");
    let mut session = Session::new(&hf.model, &hf.config.mla, max, Sampling::greedy(), &device);
    let err = session.generate(&vec![5; max], 2).unwrap_err();
    assert_eq!(err, CacheError::TooLong { id: 0, len: max + 1, max });
    assert!(session.is_empty(), "nothing was fed");
}
