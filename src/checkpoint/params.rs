//! A rank's parameters as chunks and back: whole or expert-sliced parameters of any
//! module, and FSDP's flat shards cut at parameter boundaries.

use super::{CheckpointError, Holding, Named};
use burn::module::{Module, ModuleDisplay, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use burn_dcp::{Chunk, DcpError, Reader};
use burn_dp::{Fsdp, Layout};
use std::collections::{HashMap, HashSet};

/// One FSDP shard: its group's layout and the flat elements `lo..hi` this rank holds.
pub(crate) struct FlatShard {
    pub layout: Layout,
    pub lo: usize,
    pub hi: usize,
}

/// FSDP's flat shards by id, and the ids of the parameters they hold (one-element
/// placeholders in the hollow module).
pub(crate) struct Flat {
    pub shards: HashMap<ParamId, FlatShard>,
    pub sharded: HashSet<ParamId>,
}

impl Flat {
    pub fn of<B: Backend, M: Module<B> + ModuleDisplay>(fsdp: &Fsdp<B, M>) -> Self {
        let mut shards = HashMap::new();
        let mut sharded = HashSet::new();
        for g in 0..fsdp.num_groups() {
            let s = fsdp.shards(g);
            let me = s.comm.rank();
            let layout = fsdp.layout(g).clone();
            sharded.extend(layout.ids.iter().copied());
            shards.insert(fsdp.shard(g).id, FlatShard { layout, lo: s.bounds[me], hi: s.bounds[me + 1] });
        }
        Flat { shards, sharded }
    }
}

/// A run of one parameter inside a flat shard.
pub(crate) struct Piece<'a> {
    pub named: &'a Named,
    /// First element in the whole tensor.
    pub start: usize,
    /// First element in the shard.
    pub at: usize,
    pub len: usize,
}

impl<'a> Holding<'a> {
    /// The runs of each parameter inside `shard`, in flat order.
    pub(crate) fn pieces(&self, shard: &FlatShard) -> Result<Vec<Piece<'a>>, CheckpointError> {
        let l = &shard.layout;
        let mut out = Vec::new();
        for i in 0..l.len() {
            let (lo, hi) = (l.offsets[i].max(shard.lo), l.offsets[i + 1].min(shard.hi));
            if lo >= hi {
                continue;
            }
            let (named, base) = self.place(&l.ids[i], &l.shapes[i], || format!("FSDP parameter {} of its group", i))?;
            out.push(Piece { named, start: base + lo - l.offsets[i], at: lo - shard.lo, len: hi - lo });
        }
        Ok(out)
    }

    /// The chunks of every float parameter of `module` (whole, or this rank's experts):
    /// one host copy of each (the snapshot).
    ///
    /// # Errors
    /// A parameter not in the names, or held in a shape that is neither whole nor an
    /// expert slice.
    pub fn module_chunks<B: Backend, M: Module<B>>(&self, module: &M) -> Result<Vec<Chunk>, CheckpointError> {
        self.chunks_except(module, &HashSet::new())
    }

    fn chunks_except<B: Backend, M: Module<B>>(&self, module: &M, skip: &HashSet<ParamId>) -> Result<Vec<Chunk>, CheckpointError> {
        list(module, skip, true)
            .into_iter()
            .map(|p| {
                let (named, start) = self.place(&p.id, &p.shape, || p.path.join("."))?;
                let data = p.data.expect("listed with their values");
                Ok(Chunk::new(named.name.clone(), named.shape.clone(), start, data))
            })
            .collect()
    }

    /// A copy of `module` with every float parameter read from `reader` (whole, or this
    /// rank's experts). Every value is read before the copy is made: on an error there is
    /// no half-loaded module, and `module` is untouched.
    ///
    /// # Errors
    /// The first parameter (in module order) whose tensor is missing or has another
    /// shape in the checkpoint (both shapes named), or a file that fails to read.
    pub fn load_module<B: Backend, M: Module<B>>(&self, module: &M, reader: &Reader) -> Result<M, CheckpointError> {
        let values = self.read_except(module, reader, &HashSet::new())?;
        Ok(module.clone().map(&mut Fill { values }))
    }

    fn read_except<B: Backend, M: Module<B>>(&self, module: &M, reader: &Reader, skip: &HashSet<ParamId>) -> Result<HashMap<ParamId, TensorData>, CheckpointError> {
        let mut out = HashMap::new();
        for p in list(module, skip, false) {
            let (named, start) = self.place(&p.id, &p.shape, || p.path.join("."))?;
            reader.check(&named.name, &named.shape)?;
            let flat = reader.read(&named.name, start, p.shape.iter().product())?;
            out.insert(p.id, reshape(flat, p.shape));
        }
        Ok(out)
    }

    /// The chunks of an FSDP module: each flat shard cut into the runs of its
    /// parameters, and the parameters it keeps whole (the balancing bias, ...).
    ///
    /// # Errors
    /// As [`Holding::module_chunks`].
    pub fn fsdp_chunks<B: Backend, M: Module<B> + ModuleDisplay>(&self, fsdp: &Fsdp<B, M>) -> Result<Vec<Chunk>, CheckpointError> {
        let flat = Flat::of(fsdp);
        let mut out = self.chunks_except(fsdp.hollow(), &flat.sharded)?;
        for g in 0..fsdp.num_groups() {
            let shard = fsdp.shard(g);
            // The snapshot's device-to-host copy of the shard.
            let data = shard.val().into_data();
            for p in self.pieces(&flat.shards[&shard.id])? {
                out.push(Chunk::new(p.named.name.clone(), p.named.shape.clone(), p.start, slice(&data, p.at, p.len)));
            }
        }
        Ok(out)
    }

    /// A copy of `fsdp` with its shards and whole parameters read from `reader`, for this
    /// rank's place in its sharding (any sharding may have written the checkpoint); as
    /// [`Holding::load_module`], all or nothing.
    ///
    /// # Errors
    /// As [`Holding::load_module`].
    pub fn load_fsdp<B: Backend, M: Module<B> + ModuleDisplay>(&self, fsdp: &Fsdp<B, M>, reader: &Reader) -> Result<Fsdp<B, M>, CheckpointError> {
        let flat = Flat::of(fsdp);
        let mut values = self.read_except(fsdp.hollow(), reader, &flat.sharded)?;
        // A rank with an empty shard (more ranks than elements) keeps its empty tensor.
        for (id, shard) in flat.shards.iter().filter(|(_, s)| s.hi > s.lo) {
            values.insert(*id, self.read_flat(reader, shard, "")?);
        }
        Ok(fsdp.clone().map(&mut Fill { values }))
    }

    /// The elements `lo..hi` of a flat shard, read parameter run by parameter run from
    /// the tensors named `{name}{suffix}`.
    pub(crate) fn read_flat(&self, reader: &Reader, shard: &FlatShard, suffix: &str) -> Result<TensorData, CheckpointError> {
        let mut bytes = Vec::new();
        let mut dtype = None;
        for p in self.pieces(shard)? {
            let name = format!("{}{suffix}", p.named.name);
            reader.check(&name, &p.named.shape)?;
            let run = reader.read(&name, p.start, p.len)?;
            if *dtype.get_or_insert(run.dtype) != run.dtype {
                return Err(CheckpointError::Layout { tensor: name, detail: format!("stored as {:?}, the shard's other parameters as {:?}", run.dtype, dtype) });
            }
            bytes.extend_from_slice(run.as_bytes());
        }
        let dtype = dtype.ok_or_else(|| DcpError::Missing { tensor: format!("an FSDP shard of elements {}..{}", shard.lo, shard.hi), detail: "it holds no parameter".into() })?;
        Ok(TensorData::from_bytes_vec(bytes, [shard.hi - shard.lo], dtype))
    }
}

/// A float parameter of a module, in visiting order.
pub(crate) struct Listed {
    pub id: ParamId,
    /// Its path in the module tree (enum variants included).
    pub path: Vec<String>,
    /// Its shape here.
    pub shape: Vec<usize>,
    /// Its value on the host, when listed with values.
    pub data: Option<TensorData>,
}

/// Every float parameter of `module` but those in `skip`; with `values`, each one's value
/// copied to the host (the snapshot of a save: the device-to-host copy it needs).
pub(crate) fn list<B: Backend, M: Module<B>>(module: &M, skip: &HashSet<ParamId>, values: bool) -> Vec<Listed> {
    struct Visit<'a> {
        skip: &'a HashSet<ParamId>,
        values: bool,
        path: Vec<String>,
        out: Vec<Listed>,
    }
    impl<B: Backend> ModuleVisitor<B> for Visit<'_> {
        fn enter_module(&mut self, name: &str, _container: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if !self.skip.contains(&param.id) {
                let data = self.values.then(|| param.val().into_data());
                self.out.push(Listed { id: param.id, path: self.path.clone(), shape: param.lazy_shape().dims::<D>().to_vec(), data });
            }
        }
    }
    let mut v = Visit { skip, values, path: Vec::new(), out: Vec::new() };
    module.visit(&mut v);
    v.out
}

/// `len` elements of `data` from element `at`, as a 1-D tensor.
pub(crate) fn slice(data: &TensorData, at: usize, len: usize) -> TensorData {
    let size = data.dtype.size();
    TensorData::from_bytes_vec(data.as_bytes()[at * size..(at + len) * size].to_vec(), [len], data.dtype)
}

/// `data` with shape `shape` (same elements).
pub(crate) fn reshape(data: TensorData, shape: Vec<usize>) -> TensorData {
    let dtype = data.dtype;
    TensorData::from_bytes_vec(data.into_bytes().to_vec(), shape, dtype)
}

/// Replaces the parameters whose ids have a value (their ids and autodiff settings kept).
struct Fill {
    values: HashMap<ParamId, TensorData>,
}

impl<B: Backend> ModuleMapper<B> for Fill {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        match self.values.remove(&param.id) {
            Some(data) => {
                let id = param.id;
                let tensor = Tensor::from_data(data, &param.lazy_device());
                param.transform_for_load(tensor, id)
            }
            None => param,
        }
    }
}
