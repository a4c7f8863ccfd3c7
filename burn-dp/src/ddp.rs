//! DDP: every rank holds the whole module and its optimizer; after each backward the
//! gradients are averaged over the data-parallel ranks, in buckets.

use crate::collective::all_reduce;
use crate::layout::{put_grads, take_grads, Layout};
use crate::DpError;
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn_comm::Comm;

/// PyTorch DDP's default bucket: 25 MiB of gradients per all-reduce.
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

/// Gradient averaging over the data-parallel ranks of `comm`.
///
/// The trainable parameters are cut into buckets of whole parameters, from the last to the
/// first (the order the backward produces them), each at most [`Ddp::bucket_bytes`] unless
/// one parameter is larger; each bucket is one all-reduce. Burn 0.21's `backward` returns
/// all gradients at once (no per-parameter hook), so the buckets start after it rather
/// than during it.
///
/// With each rank's loss the mean over its own batch and equal batches on every rank, the
/// averaged gradient is that of the mean loss over the concatenated batch: the ranks take
/// the step one device would take on all their examples.
///
/// # Example
/// ```
/// use burn::backend::{Autodiff, NdArray};
/// use burn::module::Module;
/// use burn::nn::LinearConfig;
/// use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
/// use burn::tensor::Tensor;
/// use burn_comm::{launch, Comm, Transport};
/// use burn_dp::{Ddp, DpError};
///
/// type B = Autodiff<NdArray>;
/// let device = Default::default();
/// // Burn draws weights lazily, at first use: fork draws them now, once for all ranks.
/// let model = LinearConfig::new(4, 2).init::<B>(&device).fork(&device);
/// let weights = launch(Comm::group(2, Transport::Host), |comm| {
///     let ddp = Ddp::new(comm.clone());
///     let mut optim = AdamWConfig::new().init();
///     // Each in-process rank works on its own replica: the same values, fresh leaves.
///     let model = model.clone().fork(&device);
///     let x = Tensor::<B, 2>::ones([3, 4], &device) * (comm.rank() as f32 + 1.0);
///     let grads = GradientsParams::from_grads(model.forward(x).mean().backward(), &model);
///     let grads = ddp.sync(&model, grads)?; // the mean over both ranks
///     let model = optim.step(1e-2, model, grads);
///     Ok::<_, DpError>(model.weight.val().into_data())
/// })
/// .unwrap();
/// assert_eq!(weights[0], weights[1]); // the replicas stay equal
/// ```
#[derive(Clone, Debug)]
pub struct Ddp {
    comm: Comm,
    bucket_bytes: usize,
    /// The layout checked across ranks, reused while the module keeps it.
    checked: std::sync::Arc<std::sync::Mutex<Option<Layout>>>,
}

impl Ddp {
    /// DDP over the ranks of `comm` (the mesh's `dp` communicator), 25 MiB buckets.
    pub fn new(comm: Comm) -> Self {
        Ddp { comm, bucket_bytes: DEFAULT_BUCKET_BYTES, checked: Default::default() }
    }

    /// The same with buckets of at most `bytes` of f32 gradients (at least one parameter
    /// per bucket).
    pub fn with_bucket_bytes(mut self, bytes: usize) -> Self {
        self.bucket_bytes = bytes.max(1);
        self
    }

    /// The bucket size in bytes.
    pub fn bucket_bytes(&self) -> usize {
        self.bucket_bytes
    }

    /// The data-parallel group.
    pub fn comm(&self) -> &Comm {
        &self.comm
    }

    /// The buckets of `layout`: ranges of parameters, last parameters first.
    pub fn buckets(&self, layout: &Layout) -> Vec<std::ops::Range<usize>> {
        let per = (self.bucket_bytes / 4).max(1);
        let mut out = Vec::new();
        let mut end = layout.len();
        while end > 0 {
            let mut start = end - 1;
            while start > 0 && layout.offsets[end] - layout.offsets[start - 1] <= per {
                start -= 1;
            }
            out.push(start..end);
            end = start;
        }
        out
    }

    /// `grads` averaged over the ranks, for every trainable parameter of `module` (a
    /// parameter without a gradient on a rank counts as zeros there). Collective: every
    /// rank calls it after its backward, with the same module structure.
    ///
    /// # Errors
    /// [`DpError::Layout`] when the ranks' modules differ (checked on the first call and
    /// whenever the module's parameters change); a failed or stalled rank.
    pub fn sync<B: AutodiffBackend, M: AutodiffModule<B>>(&self, module: &M, mut grads: GradientsParams) -> Result<GradientsParams, DpError> {
        let layout = checked_layout(&self.checked, module, &self.comm)?;
        let world = self.comm.world_size() as f32;
        for bucket in self.buckets(&layout) {
            let flat = take_grads(module, &layout, bucket.clone(), &mut grads);
            let mean = all_reduce(flat, &self.comm)?.div_scalar(world);
            put_grads(&layout, bucket, mean, &mut grads);
        }
        Ok(grads)
    }
}

/// The layout of `module`, checked across the ranks of `comm` when it is new (the first
/// call, or a module whose parameters changed).
pub(crate) fn checked_layout<B: AutodiffBackend, M: AutodiffModule<B>>(cache: &std::sync::Mutex<Option<Layout>>, module: &M, comm: &Comm) -> Result<Layout, DpError> {
    let layout = Layout::of::<B, M>(module);
    let mut cached = cache.lock().unwrap_or_else(|e| e.into_inner());
    // Parameter ids survive optimizer steps, so this is the first call on every rank (a
    // rank alone with a new module meets the others' next collective: a mismatch error).
    if cached.as_ref() != Some(&layout) {
        layout.check(comm)?;
        *cached = Some(layout.clone());
    }
    Ok(layout)
}
