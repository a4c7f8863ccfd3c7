//! Moving parameters between two models of the same structure, e.g. one built with Burn's
//! `Linear` and its twin built with [`super::Fp8Linear`].

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{backend::Backend, Tensor};
use std::collections::BTreeMap;

/// Why [`copy_params`] refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParamCopyError {
    /// Float parameters of the target with no parameter at the same path in the source.
    Missing(Vec<String>),
    /// Float parameters of the source with no parameter at the same path in the target.
    Unused(Vec<String>),
    /// Parameters at the same path with different shapes: `(path, source, target)`.
    Shape(Vec<(String, Vec<usize>, Vec<usize>)>),
}

impl core::fmt::Display for ParamCopyError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Missing(p) => write!(f, "the source model has no parameter at {p:?}"),
            Self::Unused(p) => write!(f, "the target model has no parameter at {p:?}"),
            Self::Shape(p) => write!(f, "parameter shapes differ (path, source, target): {p:?}"),
        }
    }
}

impl std::error::Error for ParamCopyError {}

struct Source<B: Backend> {
    path: Vec<String>,
    params: BTreeMap<String, (ParamId, Tensor<B, 1>, Vec<usize>)>,
}

impl<B: Backend> ModuleVisitor<B> for Source<B> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val();
        let shape = value.dims().to_vec();
        let flat = value.reshape([shape.iter().product::<usize>()]);
        self.params.insert(self.path.join("."), (param.id, flat, shape));
    }
}

struct Target<B: Backend> {
    path: Vec<String>,
    source: BTreeMap<String, (ParamId, Tensor<B, 1>, Vec<usize>)>,
    missing: Vec<String>,
    shapes: Vec<(String, Vec<usize>, Vec<usize>)>,
}

impl<B: Backend> ModuleMapper<B> for Target<B> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let path = self.path.join(".");
        let Some((id, flat, shape)) = self.source.remove(&path) else {
            self.missing.push(path);
            return param;
        };
        let (_, value, mapper) = param.consume();
        if shape != value.dims() {
            self.shapes.push((path, shape, value.dims().to_vec()));
            return Param::from_mapped_value(ParamId::new(), value, mapper);
        }
        // `detach` makes a new leaf, so the copy does not hang off the source's graph.
        let copied = flat.reshape(value.dims()).detach().set_require_grad(value.is_require_grad());
        Param::from_mapped_value(id, copied, mapper)
    }
}

/// Returns `target` with every float parameter replaced by the source's parameter at the
/// same module path (`"layers.0.attn.q.weight"`), keeping the source's parameter ids (so
/// optimizer state keyed by id carries over) and the target's gradient requirement.
///
/// This is how a model built with Burn's `Linear` becomes its FP8 twin and back: write the
/// model generic over [`super::LinearLayer`], build the other instantiation, and copy. The
/// two must have the same parameter paths and shapes, which `Linear` and
/// [`super::Fp8Linear`] (both `weight [d_input, d_output]`, `bias [d_output]`) guarantee.
///
/// # Errors
/// Names every path that is missing on either side or whose shapes differ; nothing is
/// partially applied to the returned value in that case (the error replaces it).
///
/// # Example
/// ```
/// use burn::backend::NdArray;
/// use burn::nn::{Linear, LinearConfig};
/// use burn_fp8::linear::{copy_params, Fp8Linear, Fp8LinearConfig};
///
/// let device = Default::default();
/// let f32_layer: Linear<NdArray> = LinearConfig::new(64, 32).init(&device);
/// let fp8_layer: Fp8Linear<NdArray> = Fp8LinearConfig::new(64, 32).init(&device);
/// let fp8_layer = copy_params(&f32_layer, fp8_layer).unwrap();
/// assert_eq!(fp8_layer.weight.id, f32_layer.weight.id);
/// fp8_layer.weight.val().into_data().assert_eq(&f32_layer.weight.val().into_data(), true);
///
/// let too_wide: Fp8Linear<NdArray> = Fp8LinearConfig::new(64, 48).init(&device);
/// assert!(copy_params(&f32_layer, too_wide).is_err());
/// ```
pub fn copy_params<B: Backend, S: Module<B>, T: Module<B>>(source: &S, target: T) -> Result<T, ParamCopyError> {
    let mut visitor = Source { path: Vec::new(), params: BTreeMap::new() };
    source.visit(&mut visitor);
    let mut mapper = Target { path: Vec::new(), source: visitor.params, missing: Vec::new(), shapes: Vec::new() };
    let target = target.map(&mut mapper);
    if !mapper.missing.is_empty() {
        return Err(ParamCopyError::Missing(mapper.missing));
    }
    if !mapper.shapes.is_empty() {
        return Err(ParamCopyError::Shape(mapper.shapes));
    }
    if !mapper.source.is_empty() {
        return Err(ParamCopyError::Unused(mapper.source.into_keys().collect()));
    }
    Ok(target)
}
