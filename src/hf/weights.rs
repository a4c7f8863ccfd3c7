//! Weights of a [`DeepSeekV3`] model under Hugging Face's key names, from and to
//! safetensors files.
//!
//! [`load_safetensors`] fills a model built from the same config (e.g.
//! [`HfDeepSeekConfig::model`](super::HfDeepSeekConfig::model)) from one or more
//! `.safetensors` files (a sharded checkpoint's files in any order; they are memory-mapped,
//! so only the tensors read are paged in). Per tensor it applies what differs between the
//! layouts:
//!
//! - Linear weights are stored `[out, in]` (PyTorch) and kept `[in, out]` (Burn): transposed.
//! - The routed experts are one tensor per expert (`mlp.experts.{e}.gate_proj.weight`)
//!   and one stacked `[E, in, out]` tensor here.
//! - The rotary columns of `q_b_proj` (per head) and `kv_a_proj_with_mqa` are stored
//!   interleaved in pairs and used here in halves ([`RotaryTable`](burn_moe::mla::RotaryTable)):
//!   permuted.
//! - F32, BF16 and F16 are read as f32; `F8_E4M3` weights are dequantized with their
//!   `weight_scale_inv` (one f32 per 128×128 block, DeepSeek-V3's released format).
//! - The MTP module's copies of the embedding and head (`model.layers.{L}.embed_tokens`,
//!   `shared_head.head`) are not read: the model shares its own.
//! - The routers' balancing bias (`mlp.gate.e_score_correction_bias`) exists in
//!   DeepSeek-V3 checkpoints only: for a model without one (`bias_update_speed` 0, as
//!   [`HfDeepSeekConfig::moe`](super::HfDeepSeekConfig::moe) sets for DeepSeek-V2) a file
//!   without it sets the bias to zero, which routes as V2 does; the key is then listed in
//!   [`LoadReport::defaulted`].
//!
//! [`save_safetensors`] writes the inverse (f32, the MTP copies omitted), so a checkpoint
//! written here loads back into the model bit for bit.
//!
//! ```
//! use burn::backend::NdArray;
//! use burn_deepseek::hf::weights::{load_safetensors, save_safetensors};
//! use burn_deepseek::model::DeepSeekV3Config;
//!
//! let device = Default::default();
//! let config = DeepSeekV3Config::tiny();
//! let model = config.init::<NdArray>(&device);
//! let path = std::env::temp_dir().join("burn-deepseek-doc-weights.safetensors");
//! let written = save_safetensors(&model, &config, &path).unwrap();
//! let (loaded, report) = load_safetensors(config.init::<NdArray>(&device), &config, &[&path]).unwrap();
//! assert_eq!(report.keys_read, written);
//! assert!(report.unused.is_empty());
//! # std::fs::remove_file(path).unwrap();
//! # let _ = loaded;
//! ```

use crate::model::{DeepSeekV3, DeepSeekV3Config};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{backend::Backend, Tensor, TensorData};
use burn_fp8::host::HostFp8;
use burn_fp8::QuantConfig;
use safetensors::tensor::{Dtype, Metadata, TensorView};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Why weights could not be loaded or saved.
#[derive(Clone, Debug, PartialEq)]
pub enum WeightsError {
    /// A file could not be opened, mapped, parsed or written.
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A tensor the model needs is in none of the files.
    Missing {
        /// The Hugging Face key.
        key: String,
        /// The model parameter it fills.
        param: String,
    },
    /// A tensor has another shape than the model's parameter needs.
    Shape {
        /// The Hugging Face key.
        key: String,
        /// The shape the model needs, in the file's layout.
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
    },
    /// A tensor has a dtype this loader does not read.
    Dtype {
        /// The Hugging Face key.
        key: String,
        /// Its dtype.
        dtype: String,
    },
    /// A model parameter without a Hugging Face name (a model not built by
    /// [`DeepSeekV3Config::init`]).
    Unmapped {
        /// The parameter's path in the module tree.
        param: String,
    },
}

impl core::fmt::Display for WeightsError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::File { path, reason } => write!(f, "{}: {reason}", path.display()),
            Self::Missing { key, param } => write!(f, "tensor {key:?} (for {param}) is in none of the files"),
            Self::Shape { key, expected, got } => write!(f, "tensor {key:?} has shape {got:?}, the model needs {expected:?}"),
            Self::Dtype { key, dtype } => write!(f, "tensor {key:?} has dtype {dtype}, which is not read (F32, BF16, F16, F8_E4M3 with weight_scale_inv)"),
            Self::Unmapped { param } => write!(f, "parameter {param} has no Hugging Face name"),
        }
    }
}

impl std::error::Error for WeightsError {}

/// What [`load_safetensors`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadReport {
    /// Tensors read (an expert stack counts one per expert; scales not counted).
    pub keys_read: usize,
    /// Keys in the files that no parameter used (scales of read FP8 weights and the MTP
    /// modules' embedding/head copies excluded), sorted.
    pub unused: Vec<String>,
    /// Keys the files do not hold that the model may do without, set to their default:
    /// the routers' balancing bias of a model without one (zero), in load order.
    pub defaulted: Vec<String>,
}

/// How a parameter sits in the file.
#[derive(Clone, Debug, PartialEq)]
enum Layout {
    /// As is (embedding, norms, the balancing bias).
    Same,
    /// `[out, in]` in the file.
    Transposed,
    /// One `[out, in]` tensor per expert; `key` holds `{e}`.
    Experts(usize),
}

/// Output columns (after transposing) holding interleaved rotary pairs: `heads` groups
/// of `stride` columns, each with `rope` rotary columns from `start`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Rope {
    heads: usize,
    stride: usize,
    start: usize,
    rope: usize,
}

#[derive(Clone, Debug, PartialEq)]
struct Source {
    key: String,
    layout: Layout,
    rope: Option<Rope>,
    /// A file may lack the key; the parameter is then zero.
    optional: bool,
}

fn same(key: String) -> Option<Source> {
    Some(Source { key, layout: Layout::Same, rope: None, optional: false })
}

fn transposed(key: String) -> Option<Source> {
    Some(Source { key, layout: Layout::Transposed, rope: None, optional: false })
}

/// The file's source of the parameter at `path` (segments of the module tree, enum
/// variants included).
fn source(path: &[String], config: &DeepSeekV3Config) -> Option<Source> {
    let p: Vec<&str> = path.iter().map(String::as_str).collect();
    match p.as_slice() {
        ["embed", "weight"] => same("model.embed_tokens.weight".into()),
        ["norm", "gamma"] => same("model.norm.weight".into()),
        ["head", "weight"] => transposed("lm_head.weight".into()),
        ["layers", i, rest @ ..] => block(&format!("model.layers.{i}"), rest, config),
        ["mtp", k, rest @ ..] => {
            let pre = format!("model.layers.{}", config.n_layers + k.parse::<usize>().ok()?);
            match rest {
                ["hnorm", "gamma"] => same(format!("{pre}.hnorm.weight")),
                ["enorm", "gamma"] => same(format!("{pre}.enorm.weight")),
                ["eh_proj", "weight"] => transposed(format!("{pre}.eh_proj.weight")),
                ["norm", "gamma"] => same(format!("{pre}.shared_head.norm.weight")),
                ["block", rest @ ..] => block(&pre, rest, config),
                _ => None,
            }
        }
        _ => None,
    }
}

fn block(pre: &str, rest: &[&str], config: &DeepSeekV3Config) -> Option<Source> {
    let m = &config.mla;
    let proj = |name: &str| match name {
        "gate" | "up" | "down" => Some(format!("{name}_proj")),
        _ => None,
    };
    match rest {
        ["attn_norm", "gamma"] => same(format!("{pre}.input_layernorm.weight")),
        ["ffn_norm", "gamma"] => same(format!("{pre}.post_attention_layernorm.weight")),
        ["attn", "wq_a", "weight"] => transposed(format!("{pre}.self_attn.q_a_proj.weight")),
        ["attn", "q_norm", "gamma"] => same(format!("{pre}.self_attn.q_a_layernorm.weight")),
        ["attn", "wq_b", "weight"] => {
            let name = if m.q_lora_rank.is_some() { "q_b_proj" } else { "q_proj" };
            let rope = Rope { heads: m.n_heads, stride: m.qk_head_dim(), start: m.qk_nope_head_dim, rope: m.qk_rope_head_dim };
            Some(Source { key: format!("{pre}.self_attn.{name}.weight"), layout: Layout::Transposed, rope: Some(rope), optional: false })
        }
        ["attn", "wkv_a", "weight"] => {
            let rope = Rope { heads: 1, stride: m.cache_width(), start: m.kv_lora_rank, rope: m.qk_rope_head_dim };
            Some(Source { key: format!("{pre}.self_attn.kv_a_proj_with_mqa.weight"), layout: Layout::Transposed, rope: Some(rope), optional: false })
        }
        ["attn", "kv_norm", "gamma"] => same(format!("{pre}.self_attn.kv_a_layernorm.weight")),
        ["attn", "wkv_b", "weight"] => transposed(format!("{pre}.self_attn.kv_b_proj.weight")),
        ["attn", "wo", "weight"] => transposed(format!("{pre}.self_attn.o_proj.weight")),
        ["ffn", "Dense", name, _variant, "weight"] => transposed(format!("{pre}.mlp.{}.weight", proj(name)?)),
        ["ffn", "Moe", "gate", "weight"] => transposed(format!("{pre}.mlp.gate.weight")),
        // DeepSeek-V2 has no balancing bias: optional where the model does not update one.
        ["ffn", "Moe", "bias"] => Some(Source { optional: config.moe.bias_update_speed == 0.0, ..same(format!("{pre}.mlp.gate.e_score_correction_bias"))? }),
        ["ffn", "Moe", "shared", name, "weight"] => transposed(format!("{pre}.mlp.shared_experts.{}.weight", proj(name)?)),
        ["ffn", "Moe", "experts", w] => {
            let name = proj(w.strip_prefix("w_")?)?;
            Some(Source { key: format!("{pre}.mlp.experts.{{e}}.{name}.weight"), layout: Layout::Experts(config.moe.router.n_experts), rope: None, optional: false })
        }
        _ => None,
    }
}

/// The name of the parameter at `path` in a distributed checkpoint: its Hugging Face key,
/// the routed experts' stack named without the expert index
/// (`model.layers.3.mlp.experts.gate_proj.weight`).
pub(crate) fn checkpoint_key(path: &[String], config: &DeepSeekV3Config) -> Option<String> {
    source(path, config).map(|s| s.key.replace(".{e}", ""))
}

/// Column `c` of the halves layout takes column `from(c)` of the interleaved one.
fn interleaved_column(c: usize, rope: &Rope) -> usize {
    let within = c % rope.stride;
    if within < rope.start || within >= rope.start + rope.rope {
        return c;
    }
    let j = within - rope.start;
    let half = rope.rope / 2;
    let pair = if j < half { 2 * j } else { 2 * (j - half) + 1 };
    c - within + rope.start + pair
}

/// `[rows, cols]` row-major: column `c` of the result is column `map(c)` of `x`.
fn gather_columns(x: &[f32], cols: usize, map: impl Fn(usize) -> usize) -> Vec<f32> {
    let index: Vec<usize> = (0..cols).map(map).collect();
    x.chunks(cols).flat_map(|row| index.iter().map(move |&i| row[i])).collect()
}

/// `[rows, cols]` → `[cols, rows]`.
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = x[r * cols + c];
        }
    }
    t
}

/// The memory-mapped files and where each key is.
struct Files {
    maps: Vec<(PathBuf, memmap2::Mmap, usize, Metadata)>,
    index: HashMap<String, usize>,
}

impl Files {
    fn open(paths: &[impl AsRef<Path>]) -> Result<Self, WeightsError> {
        let mut maps = Vec::new();
        let mut index = HashMap::new();
        for path in paths {
            let path = path.as_ref().to_path_buf();
            let err = |reason: String| WeightsError::File { path: path.clone(), reason };
            let file = std::fs::File::open(&path).map_err(|e| err(e.to_string()))?;
            // SAFETY: the map is read only; the file must not be truncated while loading,
            // as for any memory-mapped checkpoint.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| err(e.to_string()))?;
            let (header, metadata) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| err(format!("not a safetensors file: {e}")))?;
            for key in metadata.tensors().keys() {
                index.insert(key.clone(), maps.len());
            }
            maps.push((path, map, 8 + header, metadata));
        }
        Ok(Self { maps, index })
    }

    fn view(&self, key: &str) -> Option<TensorView<'_>> {
        let (_, map, start, metadata) = &self.maps[*self.index.get(key)?];
        let info = metadata.info(key)?;
        TensorView::new(info.dtype, info.shape.clone(), &map[start + info.data_offsets.0..start + info.data_offsets.1]).ok()
    }

    /// The tensor as f32 with its shape; FP8 weights dequantized by their block scales.
    fn read(&self, key: &str, param: &str) -> Result<(Vec<f32>, Vec<usize>), WeightsError> {
        let view = self.view(key).ok_or_else(|| WeightsError::Missing { key: key.into(), param: param.into() })?;
        let shape = view.shape().to_vec();
        let bytes = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::F8_E4M3 if shape.len() == 2 => {
                let scale_key = format!("{key}_scale_inv");
                let (scales, scale_shape) = self.read(&scale_key, param)?;
                let shape2 = [shape[0], shape[1]];
                // DeepSeek-V3's released format (`weight_block_size` [128, 128], `fmt` e4m3).
                let config = QuantConfig::weight();
                let blocks = config.tile.scale_shape(shape2);
                if scale_shape != blocks {
                    return Err(WeightsError::Shape { key: scale_key, expected: blocks.to_vec(), got: scale_shape });
                }
                HostFp8 { shape: shape2, config, codes: bytes.to_vec(), scales }.dequantize()
            }
            other => return Err(WeightsError::Dtype { key: key.into(), dtype: format!("{other:?}") }),
        };
        Ok((values, shape))
    }
}

/// Keys a load never reads.
fn ignored(key: &str, config: &DeepSeekV3Config) -> bool {
    let mtp_copy = (config.n_layers..config.n_layers + config.mtp_depth)
        .any(|l| key == format!("model.layers.{l}.embed_tokens.weight") || key == format!("model.layers.{l}.shared_head.head.weight"));
    mtp_copy || key.ends_with("_scale_inv")
}

struct Loader<'a> {
    files: &'a Files,
    config: &'a DeepSeekV3Config,
    path: Vec<String>,
    used: BTreeSet<String>,
    defaulted: Vec<String>,
    errors: Vec<WeightsError>,
}

impl Loader<'_> {
    /// The parameter's value in Burn's layout, checked against `shape`.
    fn value(&mut self, source: &Source, shape: &[usize], param: &str) -> Result<Vec<f32>, WeightsError> {
        let mut read = |key: &str, expected: Vec<usize>| {
            let (values, got) = self.files.read(key, param)?;
            if got != expected {
                return Err(WeightsError::Shape { key: key.into(), expected, got });
            }
            self.used.insert(key.to_string());
            Ok(values)
        };
        let mut values = match source.layout {
            Layout::Same => read(&source.key, shape.to_vec())?,
            Layout::Transposed => transpose(&read(&source.key, vec![shape[1], shape[0]])?, shape[1], shape[0]),
            Layout::Experts(n) => {
                let (i, o) = (shape[1], shape[2]);
                let mut stacked = Vec::with_capacity(n * i * o);
                for e in 0..n {
                    stacked.extend(transpose(&read(&source.key.replace("{e}", &e.to_string()), vec![o, i])?, o, i));
                }
                stacked
            }
        };
        if let Some(rope) = &source.rope {
            values = gather_columns(&values, shape[shape.len() - 1], |c| interleaved_column(c, rope));
        }
        Ok(values)
    }
}

impl<B: Backend> ModuleMapper<B> for Loader<'_> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let name = self.path.join(".");
        let Some(source) = source(&self.path, self.config) else {
            self.errors.push(WeightsError::Unmapped { param: name });
            return param;
        };
        let shape = param.lazy_shape().dims::<D>().to_vec();
        if source.optional && !self.files.index.contains_key(&source.key) {
            self.defaulted.push(source.key);
            let id = param.id;
            let zeros = Tensor::zeros(shape.as_slice(), &param.lazy_device());
            return param.transform_for_load(zeros, id);
        }
        match self.value(&source, &shape, &name) {
            Ok(values) => {
                let id = param.id;
                let tensor = Tensor::from_data(TensorData::new(values, shape), &param.lazy_device());
                param.transform_for_load(tensor, id)
            }
            Err(e) => {
                self.errors.push(e);
                param
            }
        }
    }
}

/// Loads `model`'s parameters from the safetensors `files` by Hugging Face key names;
/// `config` is the one the model was built with.
///
/// # Errors
/// The first problem met: a file that cannot be read, a missing tensor, a wrong shape
/// or dtype (each naming the key), or a parameter without a Hugging Face name.
pub fn load_safetensors<B: Backend>(model: DeepSeekV3<B>, config: &DeepSeekV3Config, files: &[impl AsRef<Path>]) -> Result<(DeepSeekV3<B>, LoadReport), WeightsError> {
    let files = Files::open(files)?;
    let mut loader = Loader { files: &files, config, path: Vec::new(), used: BTreeSet::new(), defaulted: Vec::new(), errors: Vec::new() };
    let model = model.map(&mut loader);
    if let Some(e) = loader.errors.into_iter().next() {
        return Err(e);
    }
    let unused = files.index.keys().filter(|k| !loader.used.contains(*k) && !ignored(k, config)).cloned().collect::<BTreeSet<_>>().into_iter().collect();
    Ok((model, LoadReport { keys_read: loader.used.len(), unused, defaulted: loader.defaulted }))
}

struct Saver<'a> {
    config: &'a DeepSeekV3Config,
    path: Vec<String>,
    out: BTreeMap<String, (Vec<f32>, Vec<usize>)>,
    errors: Vec<WeightsError>,
}

impl<B: Backend> ModuleVisitor<B> for Saver<'_> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let Some(source) = source(&self.path, self.config) else {
            self.errors.push(WeightsError::Unmapped { param: self.path.join(".") });
            return;
        };
        let tensor = param.val();
        let shape = tensor.dims().to_vec();
        let mut values: Vec<f32> = tensor.into_data().convert::<f32>().into_vec().expect("f32 parameter");
        if let Some(rope) = &source.rope {
            let cols = shape[shape.len() - 1];
            let mut back = vec![0.0; values.len()];
            for (r, row) in values.chunks(cols).enumerate() {
                for (c, &v) in row.iter().enumerate() {
                    back[r * cols + interleaved_column(c, rope)] = v;
                }
            }
            values = back;
        }
        match source.layout {
            Layout::Same => {
                self.out.insert(source.key, (values, shape));
            }
            Layout::Transposed => {
                self.out.insert(source.key, (transpose(&values, shape[0], shape[1]), vec![shape[1], shape[0]]));
            }
            Layout::Experts(n) => {
                let (i, o) = (shape[1], shape[2]);
                for (e, w) in values.chunks(i * o).take(n).enumerate() {
                    self.out.insert(source.key.replace("{e}", &e.to_string()), (transpose(w, i, o), vec![o, i]));
                }
            }
        }
    }
}

/// Writes `model`'s parameters to one safetensors file under Hugging Face key names, f32,
/// in the file layouts [`load_safetensors`] reads; returns the number of tensors written.
///
/// # Errors
/// A parameter without a Hugging Face name, or the file cannot be written.
pub fn save_safetensors<B: Backend>(model: &DeepSeekV3<B>, config: &DeepSeekV3Config, path: impl AsRef<Path>) -> Result<usize, WeightsError> {
    let mut saver = Saver { config, path: Vec::new(), out: BTreeMap::new(), errors: Vec::new() };
    model.visit(&mut saver);
    if let Some(e) = saver.errors.into_iter().next() {
        return Err(e);
    }
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = saver.out.into_iter().map(|(k, (v, s))| (k, v.iter().flat_map(|x| x.to_le_bytes()).collect(), s)).collect();
    let path = path.as_ref();
    let err = |reason: String| WeightsError::File { path: path.to_path_buf(), reason };
    let views = bytes.iter().map(|(k, b, s)| TensorView::new(Dtype::F32, s.clone(), b).map(|v| (k.clone(), v))).collect::<Result<Vec<_>, _>>().map_err(|e| err(e.to_string()))?;
    let n = views.len();
    safetensors::serialize_to_file(views, None, path).map_err(|e| err(e.to_string()))?;
    Ok(n)
}
