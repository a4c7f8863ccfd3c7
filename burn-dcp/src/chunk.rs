//! What a rank hands to a save: chunks of global tensors, as host bytes.

use crate::DcpError;
use burn::tensor::{DType, TensorData};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Elements `start .. start + len` of a global tensor flattened row-major, held by one
/// rank: a whole tensor (`start` 0), a dim-0 slice (an expert-parallel rank's experts:
/// `start = rank · numel / ranks`) or any run of a flattened parameter (an FSDP shard's
/// part of it).
#[derive(Clone, Debug)]
pub struct Chunk {
    /// The global tensor's name (a Hugging Face key where it has one).
    pub name: String,
    /// The global tensor's shape.
    pub shape: Vec<usize>,
    /// The chunk's first element in the flattened tensor.
    pub start: usize,
    /// The chunk's elements (host bytes, any shape: only their number counts).
    pub data: TensorData,
}

impl Chunk {
    /// Elements `start ..` of tensor `name` of `shape`.
    pub fn new(name: impl Into<String>, shape: Vec<usize>, start: usize, data: TensorData) -> Self {
        Chunk { name: name.into(), shape, start, data }
    }

    /// The whole tensor `name` (its shape is the data's).
    pub fn whole(name: impl Into<String>, data: TensorData) -> Self {
        let shape = data.shape.to_vec();
        Chunk::new(name, shape, 0, data)
    }

    /// The chunk's elements.
    pub fn len(&self) -> usize {
        self.data.num_elements()
    }

    /// Whether the chunk has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the ranks exchange to plan a save.
    pub(crate) fn spec(&self) -> Result<ChunkSpec, DcpError> {
        let numel: usize = self.shape.iter().product();
        if self.start + self.len() > numel {
            let detail = format!("a chunk of elements {}..{} does not fit in shape {:?} ({numel} elements)", self.start, self.start + self.len(), self.shape);
            return Err(DcpError::Conflict { tensor: self.name.clone(), detail });
        }
        Ok(ChunkSpec { name: self.name.clone(), shape: self.shape.clone(), dtype: dtype_name(self.data.dtype, &self.name)?, start: self.start, len: self.len() })
    }
}

/// A chunk without its data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ChunkSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
    pub start: usize,
    pub len: usize,
}

/// One rank's part of a checkpoint: the chunks it holds, copied to the host, and small
/// JSON values (step, schedule, data position, ...) that are the same on every rank
/// (rank 0's are written).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The chunks (any order).
    pub chunks: Vec<Chunk>,
    /// Named JSON values.
    pub extra: BTreeMap<String, String>,
}

impl Snapshot {
    /// An empty snapshot.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a chunk.
    pub fn push(&mut self, chunk: Chunk) {
        self.chunks.push(chunk);
    }

    /// Adds (or replaces) the JSON value `key`.
    pub fn set_extra(&mut self, key: impl Into<String>, json: impl Into<String>) {
        self.extra.insert(key.into(), json.into());
    }

    /// Bytes of the chunks' data.
    pub fn bytes(&self) -> usize {
        self.chunks.iter().map(|c| c.data.as_bytes().len()).sum()
    }
}

/// The safetensors name of a Burn dtype.
pub(crate) fn dtype_name(dtype: DType, tensor: &str) -> Result<String, DcpError> {
    let name = match dtype {
        DType::F64 => "F64",
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::I64 => "I64",
        DType::I32 => "I32",
        DType::I16 => "I16",
        DType::I8 => "I8",
        DType::U64 => "U64",
        DType::U32 => "U32",
        DType::U16 => "U16",
        DType::U8 => "U8",
        other => {
            return Err(DcpError::Dtype { tensor: tensor.into(), detail: format!("{other:?} is not stored (floats, signed and unsigned integers are)") });
        }
    };
    Ok(name.into())
}

/// The Burn and safetensors dtypes of a stored dtype name.
pub(crate) fn dtype_of(name: &str, tensor: &str) -> Result<(DType, Dtype), DcpError> {
    Ok(match name {
        "F64" => (DType::F64, Dtype::F64),
        "F32" => (DType::F32, Dtype::F32),
        "F16" => (DType::F16, Dtype::F16),
        "BF16" => (DType::BF16, Dtype::BF16),
        "I64" => (DType::I64, Dtype::I64),
        "I32" => (DType::I32, Dtype::I32),
        "I16" => (DType::I16, Dtype::I16),
        "I8" => (DType::I8, Dtype::I8),
        "U64" => (DType::U64, Dtype::U64),
        "U32" => (DType::U32, Dtype::U32),
        "U16" => (DType::U16, Dtype::U16),
        "U8" => (DType::U8, Dtype::U8),
        other => return Err(DcpError::Dtype { tensor: tensor.into(), detail: format!("unknown stored dtype {other:?}") }),
    })
}

/// Bytes per element of a stored dtype name.
pub(crate) fn dtype_size(name: &str, tensor: &str) -> Result<usize, DcpError> {
    Ok(dtype_of(name, tensor)?.0.size())
}
