//! A module's trainable parameters as one flat vector: their order, shapes and offsets
//! ([`Layout`]), the gradients or values of all of them flattened into one 1-D tensor
//! and back, and the partition of that vector among ranks at parameter boundaries.

use crate::DpError;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use burn_comm::Comm;
use std::collections::{HashMap, HashSet};

/// The trainable float parameters of a module in visiting order (the order is the
/// module's structure, the same on every rank that built the same module).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Each parameter's id on this rank.
    pub ids: Vec<ParamId>,
    /// Each parameter's shape.
    pub shapes: Vec<Vec<usize>>,
    /// `offsets[i]..offsets[i + 1]`: parameter `i` in the flat vector
    /// (`offsets.len() == ids.len() + 1`).
    pub offsets: Vec<usize>,
    /// Each parameter's index, by id.
    position: HashMap<ParamId, usize>,
}

impl Layout {
    /// The trainable (`require_grad`) float parameters of `module`.
    pub fn of<B: Backend, M: Module<B>>(module: &M) -> Layout {
        let mut v = Collect(Vec::new());
        module.visit(&mut v);
        Layout::new(v.0)
    }

    fn new(params: Vec<(ParamId, Vec<usize>)>) -> Layout {
        let mut offsets = vec![0];
        for (_, shape) in &params {
            offsets.push(offsets[offsets.len() - 1] + shape.iter().product::<usize>());
        }
        let position = params.iter().enumerate().map(|(i, (id, _))| (*id, i)).collect();
        let (ids, shapes) = params.into_iter().unzip();
        Layout { ids, shapes, offsets, position }
    }

    /// The same parameters but those in `skip` (e.g. parameters synchronised otherwise).
    pub fn without(&self, skip: &HashSet<ParamId>) -> Layout {
        self.filter(|id| !skip.contains(id))
    }

    /// Only the parameters in `keep`, in the layout's order.
    pub fn only(&self, keep: &HashSet<ParamId>) -> Layout {
        self.filter(|id| keep.contains(id))
    }

    fn filter(&self, keep: impl Fn(&ParamId) -> bool) -> Layout {
        Layout::new(self.ids.iter().zip(&self.shapes).filter(|(id, _)| keep(id)).map(|(id, s)| (*id, s.clone())).collect())
    }

    /// The index of parameter `id`, if it is in the layout.
    pub fn index(&self, id: &ParamId) -> Option<usize> {
        self.position.get(id).copied()
    }

    /// Elements of the flat vector.
    pub fn numel(&self) -> usize {
        *self.offsets.last().expect("offsets start at 0")
    }

    /// Parameters.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the module has no trainable parameter.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Checks that every rank of `comm` has the same shapes in the same order
    /// (collective).
    ///
    /// # Errors
    /// [`DpError::Layout`] naming the first parameter that differs and both shapes, or
    /// the parameter counts.
    pub fn check(&self, comm: &Comm) -> Result<(), DpError> {
        let all = comm.all_gather_host("dp layout", self.shapes.clone())?;
        let me = comm.global_rank(comm.rank());
        for (r, other) in all.iter().enumerate() {
            let theirs = comm.global_rank(r);
            if other.len() != self.shapes.len() {
                let detail = format!("{} trainable parameters here, {} on rank {theirs}", self.shapes.len(), other.len());
                return Err(DpError::Layout { rank: me, detail });
            }
            if let Some(i) = (0..other.len()).find(|&i| other[i] != self.shapes[i]) {
                let detail = format!("parameter {i} has shape {:?} here, {:?} on rank {theirs}", self.shapes[i], other[i]);
                return Err(DpError::Layout { rank: me, detail });
            }
        }
        Ok(())
    }

    /// Cuts the flat vector into `parts` runs of whole parameters with about equal
    /// elements: `bounds[r]..bounds[r + 1]` is part `r` (`parts + 1` bounds, in elements).
    /// Parts may be empty when there are fewer parameters than parts, and uneven when one
    /// parameter is larger than a part.
    pub fn partition(&self, parts: usize) -> Vec<usize> {
        let total = self.numel();
        let mut bounds = vec![0];
        for r in 1..parts {
            let target = total * r / parts;
            let nearest = self.offsets.iter().copied().min_by_key(|&o| o.abs_diff(target)).expect("offsets start at 0");
            bounds.push(nearest.max(*bounds.last().expect("bounds start at 0")));
        }
        bounds.push(total);
        bounds
    }

    /// The parameters whose elements lie in `lo..hi` (a range of [`Layout::partition`]).
    pub fn params_in(&self, lo: usize, hi: usize) -> std::ops::Range<usize> {
        let first = self.offsets.iter().position(|&o| o >= lo).unwrap_or(self.len());
        let end = self.offsets.iter().position(|&o| o >= hi).unwrap_or(self.len());
        first.min(self.len())..end.min(self.len())
    }
}

struct Collect(Vec<(ParamId, Vec<usize>)>);

impl<B: Backend> ModuleVisitor<B> for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if param.is_require_grad() {
            self.0.push((param.id, param.shape().to_vec()));
        }
    }
}

/// The gradients of the layout's parameters `range` taken out of `grads`, flattened in
/// order into one vector (zeros for a parameter without a gradient on this rank, so that
/// every rank contributes the same layout).
pub fn take_grads<B: AutodiffBackend, M: Module<B>>(module: &M, layout: &Layout, range: std::ops::Range<usize>, grads: &mut GradientsParams) -> Tensor<B::InnerBackend, 1> {
    let mut v = TakeGrads::<B> { layout, range, grads, parts: Vec::new() };
    module.visit(&mut v);
    flat(v.parts, &module_device(module))
}

struct TakeGrads<'a, B: AutodiffBackend> {
    layout: &'a Layout,
    range: std::ops::Range<usize>,
    grads: &'a mut GradientsParams,
    parts: Vec<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for TakeGrads<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !self.layout.index(&param.id).is_some_and(|i| self.range.contains(&i)) {
            return;
        }
        let n = param.shape().num_elements();
        let g = self.grads.remove::<B::InnerBackend, D>(param.id).map(|g| g.reshape([n]));
        self.parts.push(g.unwrap_or_else(|| Tensor::zeros([n], &param.device())));
    }
}

/// Registers the slices of `flat` (the flattened gradients of the layout's parameters
/// `range`, in order) as those parameters' gradients.
pub fn put_grads<B: Backend>(layout: &Layout, range: std::ops::Range<usize>, flat: Tensor<B, 1>, grads: &mut GradientsParams) {
    let base = layout.offsets[range.start];
    for i in range {
        let (lo, hi) = (layout.offsets[i] - base, layout.offsets[i + 1] - base);
        let g = flat.clone().slice([lo..hi]);
        match layout.shapes[i].len() {
            1 => grads.register::<B, 1>(layout.ids[i], g),
            2 => grads.register::<B, 2>(layout.ids[i], g.reshape(dims::<2>(&layout.shapes[i]))),
            3 => grads.register::<B, 3>(layout.ids[i], g.reshape(dims::<3>(&layout.shapes[i]))),
            4 => grads.register::<B, 4>(layout.ids[i], g.reshape(dims::<4>(&layout.shapes[i]))),
            5 => grads.register::<B, 5>(layout.ids[i], g.reshape(dims::<5>(&layout.shapes[i]))),
            n => panic!("burn-dp: parameters of rank {n} are not supported (1 to 5 dimensions)"),
        }
    }
}

pub(crate) fn dims<const D: usize>(shape: &[usize]) -> [usize; D] {
    shape.try_into().expect("the layout's rank")
}

/// The values of the layout's parameters `range`, flattened in order (inner backend).
pub fn take_values<B: AutodiffBackend, M: Module<B>>(module: &M, layout: &Layout, range: std::ops::Range<usize>) -> Tensor<B::InnerBackend, 1> {
    values(module, layout, range).inner()
}

/// The values of the layout's parameters `range`, flattened in order, detached from any
/// autodiff graph (any backend).
pub fn values<B: Backend, M: Module<B>>(module: &M, layout: &Layout, range: std::ops::Range<usize>) -> Tensor<B, 1> {
    let mut v = TakeValues::<B> { layout, range, parts: Vec::new() };
    module.visit(&mut v);
    flat(v.parts, &module_device(module))
}

struct TakeValues<'a, B: Backend> {
    layout: &'a Layout,
    range: std::ops::Range<usize>,
    parts: Vec<Tensor<B, 1>>,
}

impl<B: Backend> ModuleVisitor<B> for TakeValues<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.layout.index(&param.id).is_some_and(|i| self.range.contains(&i)) {
            let n = param.shape().num_elements();
            self.parts.push(param.val().detach().reshape([n]));
        }
    }
}

/// `module` with the value of every parameter of `layout` replaced by its slice of
/// `flat` (the layout's whole flat vector; ids and `require_grad` kept).
pub fn put_values<B: AutodiffBackend, M: Module<B>>(module: M, layout: &Layout, flat: Tensor<B::InnerBackend, 1>) -> M {
    module.map(&mut PutValues::<B> { layout, flat })
}

struct PutValues<'a, B: AutodiffBackend> {
    layout: &'a Layout,
    flat: Tensor<B::InnerBackend, 1>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for PutValues<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let Some(i) = self.layout.index(&param.id) else {
            return param;
        };
        let (lo, hi) = (self.layout.offsets[i], self.layout.offsets[i + 1]);
        let (id, tensor, mapper) = param.consume();
        let value = self.flat.clone().slice([lo..hi]).reshape(tensor.dims());
        let value = Tensor::<B, D>::from_inner(value).require_grad();
        Param::from_mapped_value(id, value, mapper)
    }
}

/// One vector of `parts` (an empty vector on `device` when there are none).
pub(crate) fn flat<B: Backend>(parts: Vec<Tensor<B, 1>>, device: &B::Device) -> Tensor<B, 1> {
    match parts.len() {
        0 => Tensor::zeros([0], device),
        1 => parts.into_iter().next().expect("one part"),
        _ => Tensor::cat(parts, 0),
    }
}

/// The device of a module's first parameter (the default device for a module without).
pub(crate) fn module_device<B: Backend, M: Module<B>>(module: &M) -> B::Device {
    module.devices().into_iter().next().unwrap_or_default()
}
