//! The split backward: input gradients now, weight gradients later.
//!
//! Zero-bubble pipeline schedules (ZB1P, DualPipe) run the backward pass of a stage in two
//! steps: `B`, which produces the gradient the previous stage waits for, and `W`, the
//! weight gradients, which nobody waits for and which fill the pipeline's idle slots.
//! [`WeightGradQueue::defer`] runs a backward pass in which every [`super::Fp8Linear`]
//! registers its input gradient (and bias gradient) as usual but queues its Wgrad GEMM
//! with both FP8 operands already quantized; [`WeightGradQueue::flush`] runs the queued
//! GEMMs and adds their results to the gradients. Together they give bit-identical
//! gradients to a plain `backward()`, which runs the same GEMMs on the same operands.

use burn::backend::autodiff::{grads::Gradients, NodeId};
use std::cell::RefCell;

use super::ops;
use crate::{Fp8Backend, Fp8Tensor};

/// One queued weight-gradient GEMM.
pub(crate) struct WgradTask<B: Fp8Backend> {
    /// The autodiff node of the weight the gradient belongs to.
    pub node: NodeId,
    /// `xᵀ [K, M]`, tiled along the tokens.
    pub x_t: Fp8Tensor<B>,
    /// `dyᵀ [N, M]`, tiled along the tokens.
    pub dy_t: Fp8Tensor<B>,
}

/// Object-safe view of a [`WgradTask`] of any backend.
trait Deferred: Send {
    fn run(self: Box<Self>, grads: &mut Gradients);
}

impl<B: Fp8Backend> Deferred for WgradTask<B> {
    fn run(self: Box<Self>, grads: &mut Gradients) {
        let dw = ops::backward_weight(&self.x_t, &self.dy_t);
        grads.register::<B>(self.node, dw.into_primitive().tensor());
    }
}

thread_local! {
    /// The queue of the `defer` call running on this thread, if any. Burn runs a backward
    /// pass on the thread that calls `backward()`, so the backward steps land here.
    static ACTIVE: RefCell<Option<Vec<Box<dyn Deferred>>>> = const { RefCell::new(None) };
}

impl<B: Fp8Backend> WgradTask<B> {
    /// Queues the task if a [`WeightGradQueue::defer`] is running on this thread, else
    /// computes the weight gradient now.
    pub(crate) fn submit(self, grads: &mut Gradients) {
        let task: Box<dyn Deferred> = Box::new(self);
        let rejected = ACTIVE.with(|active| match active.borrow_mut().as_mut() {
            Some(queue) => {
                queue.push(task);
                None
            }
            None => Some(task),
        });
        if let Some(task) = rejected {
            task.run(grads);
        }
    }
}

/// Weight-gradient GEMMs held back from a backward pass, to be run later.
///
/// # Example
/// ```
/// use burn::backend::{Autodiff, NdArray};
/// use burn::tensor::{Distribution, Tensor};
/// use burn_fp8::linear::{Fp8LinearConfig, WeightGradQueue};
///
/// type B = Autodiff<NdArray>;
/// let device = Default::default();
/// let layer = Fp8LinearConfig::new(256, 128).init::<B>(&device);
/// let x = Tensor::<B, 3>::random([2, 8, 256], Distribution::Normal(0.0, 1.0), &device).require_grad();
/// let loss = layer.forward(x.clone()).powi_scalar(2).mean();
///
/// let mut queue = WeightGradQueue::new();
/// let mut grads = queue.defer(|| loss.backward()); // step B: input and bias gradients
/// assert!(x.grad(&grads).is_some());
/// assert!(layer.weight.grad(&grads).is_none());
/// assert_eq!(queue.len(), 1);
///
/// queue.flush(&mut grads); // step W, whenever the schedule has room for it
/// assert!(layer.weight.grad(&grads).is_some());
/// ```
#[derive(Default)]
pub struct WeightGradQueue {
    tasks: Vec<Box<dyn Deferred>>,
}

impl WeightGradQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `backward` (a closure calling `backward()` on a loss) with the weight-gradient
    /// GEMMs of every [`super::Fp8Linear`] it reaches queued here instead of run.
    ///
    /// # Panics
    /// If another `defer` is already running on this thread.
    pub fn defer<R>(&mut self, backward: impl FnOnce() -> R) -> R {
        ACTIVE.with(|active| {
            let mut active = active.borrow_mut();
            assert!(active.is_none(), "WeightGradQueue::defer called inside another defer on the same thread");
            *active = Some(Vec::new());
        });
        // Take the queue back even if `backward` unwinds, so this thread stays usable.
        struct Restore<'a>(&'a mut Vec<Box<dyn Deferred>>);
        impl Drop for Restore<'_> {
            fn drop(&mut self) {
                let queued = ACTIVE.with(|active| active.borrow_mut().take()).unwrap_or_default();
                self.0.extend(queued);
            }
        }
        let _restore = Restore(&mut self.tasks);
        backward()
    }

    /// Number of queued weight gradients.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Runs every queued weight-gradient GEMM, in the order queued, adding each result to
    /// `grads` (the gradients the deferred backward returned, or any container the
    /// weights' gradients should accumulate into). Returns how many ran.
    ///
    /// `Gradients` is what `backward()` returns on Burn's `Autodiff` backend; code generic
    /// over `B: AutodiffBackend` names it with the bound `B: AutodiffBackend<Gradients =
    /// Gradients>`.
    pub fn flush(&mut self, grads: &mut Gradients) -> usize {
        let n = self.tasks.len();
        for task in self.tasks.drain(..) {
            task.run(grads);
        }
        n
    }
}

impl core::fmt::Debug for WeightGradQueue {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("WeightGradQueue").field("len", &self.tasks.len()).finish()
    }
}
