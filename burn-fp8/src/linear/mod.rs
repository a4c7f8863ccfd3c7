//! [`Fp8Linear`]: a drop-in for Burn's `Linear` whose three GEMMs run in FP8.
//!
//! Forward (Fprop), input gradient (Dgrad) and weight gradient (Wgrad) all run the
//! tile-scaled FP8 GEMM with f32 accumulation, as DeepSeek-V3 trains (report §3.3):
//! activations and gradients quantized per 1×128 tile, weights per 128×128 block, master
//! weights and their gradients in f32. The input is kept for backward in FP8, already
//! tiled along the tokens as Wgrad needs it. The backward can be split into an input step
//! now and a weight step later ([`WeightGradQueue`]), which zero-bubble pipeline schedules
//! use. [`copy_params`] converts a model between `Linear` and `Fp8Linear` layers.
//!
//! ```
//! use burn::backend::{Autodiff, NdArray};
//! use burn::nn::LinearConfig;
//! use burn::tensor::{Distribution, Tensor};
//! use burn_fp8::linear::Fp8Linear;
//!
//! type B = Autodiff<NdArray>;
//! let device = Default::default();
//! let fp8 = Fp8Linear::from(LinearConfig::new(384, 256).init::<B>(&device));
//! let linear = fp8.clone().into_linear(); // same parameters, f32 GEMMs
//!
//! let x = Tensor::<B, 3>::random([2, 16, 384], Distribution::Normal(0.0, 1.0), &device);
//! let (y, y_ref) = (fp8.forward(x.clone()), linear.forward(x));
//! let err = (y.clone() - y_ref.clone()).powi_scalar(2).mean().into_scalar()
//!     / y_ref.powi_scalar(2).mean().into_scalar();
//! assert!(err < 4e-3); // relative mean-square error of E4M3 operands, ≈ 1.4e-3
//!
//! let grads = y.sum().backward();
//! assert_eq!(fp8.weight.grad(&grads).unwrap().dims(), [384, 256]);
//! ```

mod convert;
mod deferred;
pub mod ops;

pub use convert::{copy_params, ParamCopyError};
pub use deferred::WeightGradQueue;
pub(crate) use deferred::WgradTask;

use crate::{Fp8Backend, Fp8Layout, QuantConfig};
use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::{backend::Backend, Tensor, TensorPrimitive};
use serde::{Deserialize, Serialize};

/// How the operands of an FP8 Linear's three GEMMs are quantized.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fp8Recipe {
    /// The layer input, for Fprop (1×128 along features) and Wgrad (1×128 along tokens).
    pub input: QuantConfig,
    /// The weight, for Fprop and Dgrad.
    pub weight: QuantConfig,
    /// The output gradient, for Dgrad (along features) and Wgrad (along tokens).
    pub grad: QuantConfig,
}

impl Fp8Recipe {
    /// DeepSeek-V3: E4M3 everywhere, 1×128 activation and gradient tiles, 128×128 weight
    /// blocks, exact (not power-of-two) scales.
    pub const fn deepseek_v3() -> Self {
        Self { input: QuantConfig::activation(), weight: QuantConfig::weight(), grad: QuantConfig::activation() }
    }
}

impl Default for Fp8Recipe {
    fn default() -> Self {
        Self::deepseek_v3()
    }
}

/// Configuration of an [`Fp8Linear`]; the fields and defaults of Burn's `LinearConfig`,
/// plus the FP8 recipe.
#[derive(Config, Debug)]
pub struct Fp8LinearConfig {
    /// Input features.
    pub d_input: usize,
    /// Output features.
    pub d_output: usize,
    /// Whether to add a bias (kept and applied in f32).
    #[config(default = true)]
    pub bias: bool,
    /// Initializer of weight and bias (Burn's `Linear` default).
    #[config(default = "Initializer::KaimingUniform{gain: 0.5773502691896258, fan_out_only: false}")]
    pub initializer: Initializer,
    /// Quantization of the three GEMMs' operands.
    #[config(default = "Fp8Recipe::deepseek_v3()")]
    pub recipe: Fp8Recipe,
}

impl Fp8LinearConfig {
    /// Initializes the layer; the parameters are drawn exactly as Burn's `Linear` draws them.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Fp8Linear<B> {
        let linear = LinearConfig::new(self.d_input, self.d_output).with_bias(self.bias).with_initializer(self.initializer.clone()).init(device);
        Fp8Linear::from(linear).with_recipe(self.recipe)
    }
}

/// A Linear layer whose forward and backward GEMMs run in FP8.
///
/// Same parameters, layout and record as Burn's `Linear`: `weight` is `[d_input,
/// d_output]`, `bias` `[d_output]`, both f32 (the master copy the optimizer updates). A
/// record saved from a `Linear` loads into an `Fp8Linear` and back.
///
/// # Shapes
/// - input: `[..., d_input]`
/// - output: `[..., d_output]`
///
/// Any `d_input`, `d_output` and token count work: partial 128-wide tiles are quantized
/// on their own elements and the GEMMs handle the tails, so nothing is padded by the
/// caller. Memory for the input saved for backward is [`Fp8Linear::saved_input_bytes`].
#[derive(Module, Debug)]
pub struct Fp8Linear<B: Backend> {
    /// `[d_input, d_output]`, f32 master weight.
    pub weight: Param<Tensor<B, 2>>,
    /// `[d_output]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// Quantization of the GEMM operands (not part of the record).
    #[module(skip)]
    pub recipe: Fp8Recipe,
}

impl<B: Backend> Fp8Linear<B> {
    /// Same layer with another recipe.
    pub fn with_recipe(mut self, recipe: Fp8Recipe) -> Self {
        self.recipe = recipe;
        self
    }

    /// Back to Burn's `Linear`, with the same parameters (ids included).
    pub fn into_linear(self) -> Linear<B> {
        Linear { weight: self.weight, bias: self.bias }
    }

    /// Bytes this layer keeps from its input for backward, for `tokens` input rows: the
    /// FP8 codes of `xᵀ`, each row padded to whole 128-token tiles, plus one f32 scale per
    /// tile. Burn's `Linear` keeps the f32 input, `4 · tokens · d_input` bytes.
    pub fn saved_input_bytes(&self, tokens: usize) -> usize {
        let [d_input, _] = self.weight.dims();
        let layout = Fp8Layout { shape: [d_input, tokens], config: self.recipe.input };
        let ([r, w], [sr, sc]) = (layout.data_shape(), layout.scale_shape());
        4 * (r * w + sr * sc)
    }
}

impl<B: Backend> From<Linear<B>> for Fp8Linear<B> {
    /// Takes over the parameters (ids included) with DeepSeek-V3's recipe.
    ///
    /// Lazily initialized parameters are initialized here. Burn clones a parameter that
    /// is still uninitialized into an independent lazy parameter that draws its own
    /// values, so convert the layer itself rather than a clone of a fresh one (clones of
    /// the converted layer share its values).
    fn from(linear: Linear<B>) -> Self {
        let weight = linear.weight.map(|w| w);
        let bias = linear.bias.map(|b| b.map(|b| b));
        Self { weight, bias, recipe: Fp8Recipe::deepseek_v3() }
    }
}

impl<B: Fp8Backend> Fp8Linear<B> {
    /// `input · weight + bias`, with the GEMM in FP8.
    ///
    /// # Shapes
    /// - input: `[..., d_input]`
    /// - output: `[..., d_output]`
    ///
    /// # Panics
    /// If the last input dimension is not `d_input`.
    pub fn forward<const D: usize>(&self, input: Tensor<B, D>) -> Tensor<B, D> {
        let dims = input.dims();
        let [d_input, d_output] = self.weight.dims();
        assert!(D >= 1 && dims[D - 1] == d_input, "Fp8Linear with weight [d_input {d_input}, d_output {d_output}] needs inputs [..., {d_input}], got {dims:?}");
        let mut out = dims;
        out[D - 1] = d_output;
        let tokens = dims[..D - 1].iter().product();
        if tokens == 0 {
            // Burn's reshape reads a 0 as "keep this dimension", so no empty [0, d] views.
            return Tensor::zeros(out, &input.device());
        }
        let x = input.reshape([tokens, d_input]).into_primitive().tensor();
        let w = self.weight.val().into_primitive().tensor();
        let y = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(B::fp8_linear(x, w, self.recipe)));
        let y = match &self.bias {
            Some(bias) => y + bias.val().unsqueeze_dim(0),
            None => y,
        };
        y.reshape(out)
    }
}

/// A Linear layer of either precision, so a model can be written once and instantiated
/// with `Linear` or [`Fp8Linear`] (convert between the two with [`copy_params`]).
///
/// ```
/// use burn::module::Module;
/// use burn::nn::{Linear, LinearConfig};
/// use burn::tensor::{backend::Backend, Tensor};
/// use burn_fp8::linear::LinearLayer;
///
/// #[derive(Module, Debug)]
/// struct Mlp<B: Backend, L: Module<B>> {
///     up: L,
///     down: L,
///     backend: core::marker::PhantomData<B>,
/// }
///
/// impl<B: Backend, L: LinearLayer<B>> Mlp<B, L> {
///     fn new(d: usize, device: &B::Device) -> Self {
///         let up = L::init(&LinearConfig::new(d, 4 * d), device);
///         let down = L::init(&LinearConfig::new(4 * d, d), device);
///         Self { up, down, backend: core::marker::PhantomData }
///     }
///     fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
///         self.down.forward(burn::tensor::activation::gelu(self.up.forward(x)))
///     }
/// }
/// # let _ = Mlp::<burn::backend::NdArray, Linear<_>>::new(8, &Default::default());
/// ```
pub trait LinearLayer<B: Backend>: Module<B> {
    /// Builds the layer from Burn's `LinearConfig` (its `Row` layout).
    fn init(config: &LinearConfig, device: &B::Device) -> Self;

    /// Applies the layer to `[..., d_input]`.
    fn forward<const D: usize>(&self, input: Tensor<B, D>) -> Tensor<B, D>;
}

impl<B: Backend> LinearLayer<B> for Linear<B> {
    fn init(config: &LinearConfig, device: &B::Device) -> Self {
        config.init(device)
    }

    fn forward<const D: usize>(&self, input: Tensor<B, D>) -> Tensor<B, D> {
        Linear::forward(self, input)
    }
}

impl<B: Fp8Backend> LinearLayer<B> for Fp8Linear<B> {
    fn init(config: &LinearConfig, device: &B::Device) -> Self {
        Fp8Linear::from(config.init(device))
    }

    fn forward<const D: usize>(&self, input: Tensor<B, D>) -> Tensor<B, D> {
        Fp8Linear::forward(self, input)
    }
}
