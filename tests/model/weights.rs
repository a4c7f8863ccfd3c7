//! Hugging Face weights: a checkpoint written here loads back bit for bit; a checkpoint
//! written by hand in the released formats (sharded, BF16, FP8 E4M3 with block scales,
//! interleaved rotary columns) loads to the values it holds; errors name the key.

use crate::common::{host, Ref, Rng};
use burn::tensor::{Int, Tensor, TensorData};
use burn_deepseek::hf::weights::{load_safetensors, save_safetensors, WeightsError};
use burn_deepseek::model::DeepSeekV3Config;
use burn_moe::mla::LatentCache;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::BTreeMap;
use std::path::PathBuf;

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("burn-deepseek-{name}-{}.safetensors", std::process::id()))
}

/// Every tensor of a safetensors file as (dtype, shape, f32 values).
fn read_all(path: &PathBuf) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            assert_eq!(v.dtype(), Dtype::F32);
            (k, (v.shape().to_vec(), v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()))
        })
        .collect()
}

#[test]
fn a_written_checkpoint_loads_back_exactly() {
    let mut rng = Rng::new("a_written_checkpoint_loads_back_exactly");
    let device = Default::default();
    let config = DeepSeekV3Config::tiny();
    let model = config.init::<Ref>(&device);
    let path = temp("roundtrip");
    let written = save_safetensors(&model, &config, &path).unwrap();
    let tensors = read_all(&path);
    // Hugging Face names and PyTorch layouts.
    assert_eq!(tensors["model.embed_tokens.weight"].0, vec![256, 64]);
    assert_eq!(tensors["lm_head.weight"].0, vec![256, 64]);
    assert_eq!(tensors["model.layers.0.mlp.gate_proj.weight"].0, vec![128, 64]);
    assert_eq!(tensors["model.layers.1.mlp.experts.15.down_proj.weight"].0, vec![64, 32]);
    assert_eq!(tensors["model.layers.1.mlp.gate.e_score_correction_bias"].0, vec![16]);
    assert_eq!(tensors["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"].0, vec![40, 64]);
    assert_eq!(tensors["model.layers.3.eh_proj.weight"].0, vec![64, 128]); // the MTP module after 3 layers
    assert!(tensors.contains_key("model.layers.3.shared_head.norm.weight"));
    assert_eq!(written, tensors.len());

    let (loaded, report) = load_safetensors(config.init::<Ref>(&device), &config, &[&path]).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(report.keys_read, written);
    assert!(report.unused.is_empty(), "{:?}", report.unused);
    let t: Vec<i64> = (0..24).map(|_| rng.below(256) as i64).collect();
    let t = Tensor::<Ref, 2, Int>::from_data(TensorData::new(t, [2, 12]), &device);
    assert_eq!(host(model.loss(t.clone()).loss), host(loaded.loss(t).loss));
}

fn write(path: &std::path::Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView)> = tensors.iter().map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// The released formats: two shards, norms in BF16, one projection in FP8 E4M3 with a
/// 128×128 block scale, an unused extra key and the MTP's embedding copy.
#[test]
fn released_formats_load_to_their_values() {
    let device = Default::default();
    let config = DeepSeekV3Config::tiny();
    let path = temp("released-src");
    save_safetensors(&config.init::<Ref>(&device), &config, &path).unwrap();
    let mut tensors = read_all(&path);
    std::fs::remove_file(&path).unwrap();

    let bf16_key = "model.layers.0.input_layernorm.weight".to_string();
    let fp8_key = "model.layers.0.mlp.down_proj.weight".to_string(); // [64, 128]: one row of blocks, two columns
    let mut shard_a = Vec::new();
    let mut shard_b = Vec::new();
    // BF16: values that bf16 holds exactly.
    let norm: Vec<f32> = (0..64).map(|i| 0.5 + i as f32 / 64.0).collect();
    tensors.insert(bf16_key.clone(), (vec![64], norm.clone()));
    // FP8: codes of k/16 for small k, scales 0.5 and 2 for the two 128-column... blocks.
    let codes: Vec<u8> = (0..64 * 128).map(|i| burn_fp8::Fp8Format::E4M3.encode(((i % 7) as f32 - 3.0) / 4.0)).collect();
    let scales = [0.5f32, 2.0];
    let (down_shape, _) = tensors.remove(&fp8_key).unwrap();
    assert_eq!(down_shape, vec![64, 128]);
    for (i, (k, (shape, values))) in tensors.iter().enumerate() {
        let entry = if *k == bf16_key {
            (k.clone(), Dtype::BF16, shape.clone(), values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect())
        } else {
            (k.clone(), Dtype::F32, shape.clone(), values.iter().flat_map(|v| v.to_le_bytes()).collect())
        };
        if i % 2 == 0 {
            shard_a.push(entry)
        } else {
            shard_b.push(entry)
        }
    }
    shard_b.push((fp8_key.clone(), Dtype::F8_E4M3, vec![64, 128], codes.clone()));
    // 128 columns in one block column here, so one scale per 128×128 block: [1, 1].
    shard_b.push((format!("{fp8_key}_scale_inv"), Dtype::F32, vec![1, 1], scales[0].to_le_bytes().to_vec()));
    shard_a.push(("model.layers.3.embed_tokens.weight".into(), Dtype::F32, vec![1], 1f32.to_le_bytes().to_vec()));
    shard_a.push(("model.extra.weight".into(), Dtype::F32, vec![1], 1f32.to_le_bytes().to_vec()));
    let (a, b) = (temp("shard-a"), temp("shard-b"));
    write(&a, &shard_a);
    write(&b, &shard_b);
    let (model, report) = load_safetensors(config.init::<Ref>(&device), &config, &[&b, &a]).unwrap();
    assert_eq!(report.unused, vec!["model.extra.weight".to_string()]);
    assert_eq!(host(model.layers[0].attn_norm.gamma.val()), norm);
    let burn_deepseek::model::Ffn::Dense(mlp) = &model.layers[0].ffn else { panic!("layer 0 is dense") };
    let down = host(mlp.down.weight()); // [128, 64], Burn layout
    for r in 0..128 {
        for c in 0..64 {
            let expected = ((((c * 128 + r) % 7) as f32 - 3.0) / 4.0) * scales[0];
            assert_eq!(down[r * 64 + c], expected, "down[{r}, {c}]");
        }
    }

    // A wrong scale shape, a missing tensor and a wrong shape are named.
    shard_b.retain(|(k, ..)| !k.ends_with("_scale_inv"));
    shard_b.push((format!("{fp8_key}_scale_inv"), Dtype::F32, vec![1, 2], [scales[0].to_le_bytes(), scales[1].to_le_bytes()].concat()));
    write(&b, &shard_b);
    let err = load_safetensors(config.init::<Ref>(&device), &config, &[&a, &b]).unwrap_err();
    assert_eq!(err, WeightsError::Shape { key: format!("{fp8_key}_scale_inv"), expected: vec![1, 1], got: vec![1, 2] });
    let err = load_safetensors(config.init::<Ref>(&device), &config, &[&a]).unwrap_err();
    assert!(matches!(&err, WeightsError::Missing { .. }), "{err}");
    assert!(err.to_string().contains("is in none of the files"), "{err}");
    let mut wide = DeepSeekV3Config::tiny();
    wide.d_ffn = 96;
    let err = load_safetensors(wide.init::<Ref>(&device), &wide, &[&a, &b]).unwrap_err();
    assert!(matches!(&err, WeightsError::Shape { key, .. } if key.starts_with("model.layers.0.mlp.")), "{err}");
    std::fs::remove_file(&a).unwrap();
    std::fs::remove_file(&b).unwrap();
}

/// DeepSeek's reference rotation, written as its inference code does it: the rotary
/// columns as complex pairs `(x₂ⱼ, x₂ⱼ₊₁)` times `e^{i·p·θⱼ}`. Keys produced by the
/// checkpoint's `kv_a_proj_with_mqa` that way, then read in halves order, equal the
/// rotated keys the loaded model writes to its latent cache.
#[test]
fn rotary_columns_follow_deepseeks_interleaved_convention() {
    let mut rng = Rng::new("rotary_columns_follow_deepseeks_interleaved_convention");
    let device = Default::default();
    let config = DeepSeekV3Config::tiny();
    let m = &config.mla;
    let path = temp("rope");
    save_safetensors(&config.init::<Ref>(&device), &config, &path).unwrap();
    let (model, _) = load_safetensors(config.init::<Ref>(&device), &config, &[&path]).unwrap();
    let (w_shape, w) = read_all(&path).remove("model.layers.0.self_attn.kv_a_proj_with_mqa.weight").unwrap();
    std::fs::remove_file(&path).unwrap();
    let (r, rope, d) = (m.kv_lora_rank, m.qk_rope_head_dim, m.d_model);
    assert_eq!(w_shape, vec![r + rope, d]);

    let n = 5;
    let x = rng.values(n * d);
    let mut cache = LatentCache::new(m, 1, &device);
    cache.add_sequence(1).unwrap();
    model.layers[0].attn.prefill(Tensor::<Ref, 2>::from_data(TensorData::new(x.clone(), [n, d]), &device), 1, &mut cache).unwrap();
    let rows = host(cache.contiguous(1).unwrap()); // [n, r + rope]: c_kv ‖ k_rope (halves order)
    for p in 0..n {
        let k: Vec<f64> = (0..rope).map(|o| (0..d).map(|i| w[(r + o) * d + i] as f64 * x[p * d + i] as f64).sum()).collect();
        for j in 0..rope / 2 {
            let theta = p as f64 / m.rope_theta.powf(2.0 * j as f64 / rope as f64);
            let (re, im) = (k[2 * j], k[2 * j + 1]);
            let (cos, sin) = (theta.cos(), theta.sin());
            let rotated = (re * cos - im * sin, re * sin + im * cos);
            let got = (rows[p * (r + rope) + r + j] as f64, rows[p * (r + rope) + r + rope / 2 + j] as f64);
            let scale = 1e-4 * (1.0 + re.abs() + im.abs());
            assert!((got.0 - rotated.0).abs() <= scale && (got.1 - rotated.1).abs() <= scale, "position {p}, pair {j}: {got:?} vs {rotated:?}");
        }
    }
}
