//! Custom operations in Burn's fusion stream, shared by the backend traits of this crate
//! ([`crate::MoeBackend`], [`crate::mla::MlaBackend`]) on `Fusion<B>`: an op is registered
//! with its input and output tensors and runs `B`'s implementation when the stream
//! executes.

use burn::tensor::{DType, Element, Shape};
use burn_fusion::{
    stream::{Operation, OperationStreams},
    FusionBackend, FusionRuntime, FusionTensor,
};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use core::marker::PhantomData;

pub(crate) type Handles<B> = HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;
pub(crate) type Ft<B> = FusionTensor<<B as FusionBackend>::FusionRuntime>;

/// An op's static arguments and what it runs on `B` when the stream executes: it reads
/// its inputs from `h` and registers its outputs there, in the order they were declared.
pub(crate) trait CustomOp<B: FusionBackend>: Copy + core::fmt::Debug + Send + Sync + 'static {
    fn execute(&self, inputs: &[TensorIr], outputs: &[TensorIr], h: &mut Handles<B>);
}

#[derive(Debug)]
struct Custom<B, O> {
    desc: CustomOpIr,
    op: O,
    _backend: PhantomData<B>,
}

impl<B: FusionBackend, O: CustomOp<B>> Operation<B::FusionRuntime> for Custom<B, O> {
    fn execute(&self, h: &mut Handles<B>) {
        self.op.execute(&self.desc.inputs, &self.desc.outputs, h);
    }
}

/// Registers `op` on `inputs`, producing outputs of the given shapes and dtypes.
pub(crate) fn register<B: FusionBackend, O: CustomOp<B>>(name: &'static str, inputs: Vec<Ft<B>>, outputs: &[(Vec<usize>, DType)], op: O) -> Vec<Ft<B>> {
    let client = inputs[0].client.clone();
    let outputs: Vec<TensorIr> = outputs.iter().map(|(shape, dtype)| TensorIr::uninit(client.create_empty_handle(), Shape::from(shape.clone()), *dtype)).collect();
    let streams = OperationStreams::with_inputs(inputs.iter());
    let irs: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
    let desc = CustomOpIr::new(name, &irs, &outputs);
    client.register(streams, OperationIr::Custom(desc.clone()), Custom::<B, O> { desc, op, _backend: PhantomData })
}

/// [`register`] for an op with one float output of `shape` in the backend's float dtype.
pub(crate) fn register_float<B: FusionBackend, O: CustomOp<B>>(name: &'static str, inputs: Vec<Ft<B>>, shape: Vec<usize>, op: O) -> Ft<B> {
    register::<B, O>(name, inputs, &[(shape, B::FloatElem::dtype())], op).pop().expect("one output")
}
