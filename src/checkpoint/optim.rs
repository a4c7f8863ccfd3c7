//! AdamW's state (burn-dp's [`AdamW`] under Burn's optimizer adaptor) as chunks and back:
//! the two moments sharded like their parameters, in their stored dtype, and the step
//! count of each parameter.

use super::params::{reshape, slice, Flat, FlatShard};
use super::{CheckpointError, Holding, Named};
use burn::module::{Module, ModuleDisplay, ModuleVisitor, Param, ParamId};
use burn::optim::record::AdaptorRecord;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use burn_dcp::{Chunk, Reader};
use burn_dp::{AdamW, AdamWState, Fsdp};
use std::collections::HashSet;

/// The optimizer record of burn-dp's AdamW through Burn's adaptor, by parameter id (the
/// `Record` of `OptimizerAdaptor<AdamW, M, B>`).
pub type AdamWRecord<B> = hashbrown::HashMap<ParamId, AdaptorRecord<AdamW, B>>;

/// The suffixes of a parameter's state tensors (PyTorch's AdamW names).
pub const EXP_AVG: &str = ".exp_avg";
/// Second moment.
pub const EXP_AVG_SQ: &str = ".exp_avg_sq";
/// Steps taken (one `U64`).
pub const STEP: &str = ".step";

fn step_chunk(named: &Named, time: usize) -> Chunk {
    Chunk::new(format!("{}{STEP}", named.name), vec![1], 0, TensorData::new(vec![time as u64], [1]))
}

fn read_step(reader: &Reader, named: &Named) -> Result<usize, CheckpointError> {
    let t = reader.read_whole(&format!("{}{STEP}", named.name), &[1])?;
    Ok(t.to_vec::<u64>().map_err(|e| CheckpointError::Layout { tensor: format!("{}{STEP}", named.name), detail: format!("{e:?}") })?[0] as usize)
}

impl Holding<'_> {
    /// The chunks of `record`, the AdamW state of `module`'s parameters (the parameters
    /// whose state this rank keeps: all of them, or a ZeRO-1 shard's); the flat shards of
    /// an FSDP module go through [`Holding::fsdp_adamw_chunks`].
    ///
    /// # Errors
    /// As [`Holding::module_chunks`].
    pub fn adamw_chunks<B: AutodiffBackend, M: Module<B>>(&self, module: &M, record: &AdamWRecord<B>) -> Result<Vec<Chunk>, CheckpointError> {
        self.state_chunks(module, record, None)
    }

    /// The chunks of the AdamW state of an FSDP module: each shard's moments cut into the
    /// runs of its parameters.
    ///
    /// # Errors
    /// As [`Holding::module_chunks`].
    pub fn fsdp_adamw_chunks<B: AutodiffBackend, M: Module<B> + ModuleDisplay>(&self, fsdp: &Fsdp<B, M>, record: &AdamWRecord<B>) -> Result<Vec<Chunk>, CheckpointError> {
        self.state_chunks(fsdp, record, Some(&Flat::of(fsdp)))
    }

    fn state_chunks<B: AutodiffBackend, M: Module<B>>(&self, module: &M, record: &AdamWRecord<B>, flat: Option<&Flat>) -> Result<Vec<Chunk>, CheckpointError> {
        struct Visit<'a, 'h, B: AutodiffBackend> {
            holding: &'a Holding<'h>,
            record: &'a AdamWRecord<B>,
            flat: Option<&'a Flat>,
            out: Result<Vec<Chunk>, CheckpointError>,
        }
        impl<B: AutodiffBackend> Visit<'_, '_, B> {
            fn add<const D: usize>(&self, id: ParamId, state: AdamWState<B::InnerBackend, D>) -> Result<Vec<Chunk>, CheckpointError> {
                // The snapshot's device-to-host copies.
                let (m1, m2) = (state.moment_1.into_data(), state.moment_2.into_data());
                let mut out = Vec::new();
                match self.flat.and_then(|f| f.shards.get(&id)) {
                    Some(shard) => {
                        for p in self.holding.pieces(shard)? {
                            out.push(Chunk::new(format!("{}{EXP_AVG}", p.named.name), p.named.shape.clone(), p.start, slice(&m1, p.at, p.len)));
                            out.push(Chunk::new(format!("{}{EXP_AVG_SQ}", p.named.name), p.named.shape.clone(), p.start, slice(&m2, p.at, p.len)));
                            out.push(step_chunk(p.named, state.time));
                        }
                    }
                    None => {
                        let (named, start) = self.holding.place(&id, &m1.shape.to_vec(), || format!("the parameter of optimizer state {id}"))?;
                        out.push(Chunk::new(format!("{}{EXP_AVG}", named.name), named.shape.clone(), start, m1));
                        out.push(Chunk::new(format!("{}{EXP_AVG_SQ}", named.name), named.shape.clone(), start, m2));
                        out.push(step_chunk(named, state.time));
                    }
                }
                Ok(out)
            }
        }
        impl<B: AutodiffBackend> ModuleVisitor<B> for Visit<'_, '_, B> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                let (Ok(_), Some(rec)) = (&self.out, self.record.get(&param.id)) else {
                    return;
                };
                let chunks = self.add::<D>(param.id, rec.clone().into_state::<D>());
                match (chunks, &mut self.out) {
                    (Ok(c), Ok(out)) => out.extend(c),
                    (Err(e), _) => self.out = Err(e),
                    _ => {}
                }
            }
        }
        let mut v = Visit { holding: self, record, flat, out: Ok(Vec::new()) };
        module.visit(&mut v);
        v.out
    }

    /// The AdamW record of `module`'s trainable parameters (those in `keep`: a ZeRO-1
    /// shard's; all when `None`) from `reader`, on their devices. A parameter without
    /// saved state (the checkpoint predates its first step) gets none.
    ///
    /// # Errors
    /// A moment whose shape differs from its parameter's, or that misses some of the
    /// elements this rank holds; a file that fails to read.
    pub fn load_adamw<B: AutodiffBackend, M: Module<B>>(&self, module: &M, reader: &Reader, keep: Option<&HashSet<ParamId>>) -> Result<AdamWRecord<B>, CheckpointError> {
        self.read_state(module, reader, keep, None)
    }

    /// The AdamW record of an FSDP module's shards from `reader`, for this rank's place
    /// in its sharding.
    ///
    /// # Errors
    /// As [`Holding::load_adamw`]; the parameters of one shard with different step
    /// counts.
    pub fn load_fsdp_adamw<B: AutodiffBackend, M: Module<B> + ModuleDisplay>(&self, fsdp: &Fsdp<B, M>, reader: &Reader) -> Result<AdamWRecord<B>, CheckpointError> {
        let flat = Flat::of(fsdp);
        let keep: HashSet<ParamId> = flat.shards.keys().copied().collect();
        self.read_state(fsdp, reader, Some(&keep), Some(&flat))
    }

    fn read_state<B: AutodiffBackend, M: Module<B>>(
        &self,
        module: &M,
        reader: &Reader,
        keep: Option<&HashSet<ParamId>>,
        flat: Option<&Flat>,
    ) -> Result<AdamWRecord<B>, CheckpointError> {
        struct Visit<'a, 'h, B: AutodiffBackend> {
            holding: &'a Holding<'h>,
            reader: &'a Reader,
            keep: Option<&'a HashSet<ParamId>>,
            flat: Option<&'a Flat>,
            out: Result<AdamWRecord<B>, CheckpointError>,
        }
        /// The moments and step of one parameter or shard; `None` without saved state.
        type Read = Option<(TensorData, TensorData, usize)>;
        impl<B: AutodiffBackend> Visit<'_, '_, B> {
            fn shard(&self, shard: &FlatShard) -> Result<Read, CheckpointError> {
                let pieces = self.holding.pieces(shard)?;
                let Some(first) = pieces.first() else {
                    return Ok(None);
                };
                if self.reader.tensor(&format!("{}{EXP_AVG}", first.named.name)).is_none() {
                    return Ok(None);
                }
                let time = read_step(self.reader, first.named)?;
                for p in &pieces[1..] {
                    let t = read_step(self.reader, p.named)?;
                    if t != time {
                        let detail = format!("{t} steps, {} has {time}: one FSDP shard keeps one step count", first.named.name);
                        return Err(CheckpointError::Layout { tensor: format!("{}{STEP}", p.named.name), detail });
                    }
                }
                Ok(Some((self.holding.read_flat(self.reader, shard, EXP_AVG)?, self.holding.read_flat(self.reader, shard, EXP_AVG_SQ)?, time)))
            }

            fn whole(&self, id: &ParamId, local: Vec<usize>, path: String) -> Result<Read, CheckpointError> {
                let (named, start) = self.holding.place(id, &local, || path)?;
                let name = format!("{}{EXP_AVG}", named.name);
                if self.reader.tensor(&name).is_none() {
                    return Ok(None);
                }
                let numel = local.iter().product();
                let read = |suffix: &str| -> Result<TensorData, CheckpointError> {
                    let name = format!("{}{suffix}", named.name);
                    self.reader.check(&name, &named.shape)?;
                    Ok(reshape(self.reader.read(&name, start, numel)?, local.clone()))
                };
                Ok(Some((read(EXP_AVG)?, read(EXP_AVG_SQ)?, read_step(self.reader, named)?)))
            }
        }
        impl<B: AutodiffBackend> ModuleVisitor<B> for Visit<'_, '_, B> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                if self.out.is_err() || !param.is_require_grad() || self.keep.is_some_and(|k| !k.contains(&param.id)) {
                    return;
                }
                let read = match self.flat.and_then(|f| f.shards.get(&param.id)) {
                    Some(shard) => self.shard(shard),
                    None => self.whole(&param.id, param.lazy_shape().dims::<D>().to_vec(), format!("parameter {}", param.id)),
                };
                match (read, &mut self.out) {
                    (Ok(Some((m1, m2, time))), Ok(out)) => {
                        let device = param.lazy_device();
                        let tensor = |d: TensorData| {
                            let dtype = d.dtype;
                            Tensor::<B::InnerBackend, D>::from_data(d, (&device, dtype))
                        };
                        let state = AdamWState { moment_1: tensor(m1), moment_2: tensor(m2), time };
                        out.insert(param.id, AdaptorRecord::from_state::<D>(state));
                    }
                    (Err(e), _) => self.out = Err(e),
                    _ => {}
                }
            }
        }
        let mut v = Visit { holding: self, reader, keep, flat, out: Ok(AdamWRecord::new()) };
        module.visit(&mut v);
        v.out
    }
}
