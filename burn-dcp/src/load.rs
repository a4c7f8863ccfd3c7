//! Reading a checkpoint back, into any sharding: each request names a tensor and a run of
//! its elements; the reader copies the overlapping byte ranges of the chunks that hold
//! them out of the memory-mapped shard files.

use crate::chunk::{dtype_of, dtype_size};
use crate::error::io;
use crate::metadata::{ChunkMeta, Metadata, TensorMeta};
use crate::DcpError;
use burn::tensor::TensorData;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A memory-mapped shard file and where its header ends.
struct Mapped {
    map: memmap2::Mmap,
    data_start: usize,
    header: safetensors::tensor::Metadata,
}

/// A complete checkpoint opened for reading. Files are mapped when a request first needs
/// them, so a rank touches only the files (and pages) holding what it loads; each chunk
/// read is checked against its CRC-32 once (the whole chunk, the first time).
pub struct Reader {
    dir: PathBuf,
    meta: Metadata,
    files: Mutex<HashMap<String, Arc<Mapped>>>,
    verified: Mutex<HashSet<(String, String)>>,
    bytes_read: Mutex<u64>,
}

impl Reader {
    /// Opens the checkpoint in `dir`.
    ///
    /// # Errors
    /// [`DcpError::Incomplete`] for a save that did not finish (no `metadata.json`),
    /// [`DcpError::Corrupt`] for metadata that does not parse.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, DcpError> {
        let dir = dir.as_ref().to_path_buf();
        let meta = Metadata::read(&dir)?;
        Ok(Reader { dir, meta, files: Mutex::default(), verified: Mutex::default(), bytes_read: Mutex::new(0) })
    }

    /// The newest complete checkpoint under `root`, opened; `None` when there is none.
    ///
    /// # Errors
    /// As [`crate::latest`] and [`Reader::open`].
    pub fn latest(root: impl AsRef<Path>) -> Result<Option<Self>, DcpError> {
        crate::latest(root)?.map(|(_, dir)| Reader::open(dir)).transpose()
    }

    /// The checkpoint's metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    /// The checkpoint's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The step it was saved at.
    pub fn step(&self) -> u64 {
        self.meta.step
    }

    /// Tensor `name`'s global shape, dtype and chunks.
    pub fn tensor(&self, name: &str) -> Option<&TensorMeta> {
        self.meta.tensors.get(name)
    }

    /// The JSON value `key` of the snapshot's extras.
    pub fn extra(&self, key: &str) -> Option<&str> {
        self.meta.extra.get(key).map(String::as_str)
    }

    /// Bytes copied out of the shard files so far (what the requests asked for).
    pub fn bytes_read(&self) -> u64 {
        *self.bytes_read.lock().expect("counter")
    }

    /// Checks that tensor `name` is in the checkpoint with global shape `shape`.
    ///
    /// # Errors
    /// [`DcpError::Missing`] or [`DcpError::Shape`] naming the tensor (and both shapes).
    pub fn check(&self, name: &str, shape: &[usize]) -> Result<&TensorMeta, DcpError> {
        let t = self.tensor(name).ok_or_else(|| DcpError::Missing { tensor: name.into(), detail: format!("not in the checkpoint {}", self.dir.display()) })?;
        if t.shape != shape {
            return Err(DcpError::Shape { tensor: name.into(), checkpoint: t.shape.clone(), expected: shape.to_vec() });
        }
        Ok(t)
    }

    /// Elements `start .. start + len` of tensor `name` (flattened row-major), as a 1-D
    /// tensor of the stored dtype, from whichever chunks hold them.
    ///
    /// # Errors
    /// The tensor or some of the elements are not in the checkpoint; a shard file is
    /// missing, truncated or corrupted, or a chunk fails its checksum: each naming the
    /// file and the tensor.
    pub fn read(&self, name: &str, start: usize, len: usize) -> Result<TensorData, DcpError> {
        let t = self.tensor(name).ok_or_else(|| DcpError::Missing { tensor: name.into(), detail: format!("not in the checkpoint {}", self.dir.display()) })?;
        let end = start + len;
        if end > t.numel() {
            return Err(DcpError::Missing { tensor: name.into(), detail: format!("elements {start}..{end} asked for, it has {} (shape {:?})", t.numel(), t.shape) });
        }
        let size = dtype_size(&t.dtype, name)?;
        let mut out = vec![0u8; len * size];
        let mut at = start;
        for c in t.chunks.iter().filter(|c| c.start < end && c.start + c.len > start) {
            if c.start > at {
                break;
            }
            let bytes = self.chunk_bytes(name, t, c)?;
            let (lo, hi) = (at.max(c.start), end.min(c.start + c.len));
            out[(lo - start) * size..(hi - start) * size].copy_from_slice(&bytes[(lo - c.start) * size..(hi - c.start) * size]);
            at = hi;
        }
        if at != end {
            return Err(DcpError::Missing { tensor: name.into(), detail: format!("elements {at}..{end} are in no chunk") });
        }
        *self.bytes_read.lock().expect("counter") += out.len() as u64;
        Ok(TensorData::from_bytes_vec(out, [len], dtype_of(&t.dtype, name)?.0))
    }

    /// The whole tensor `name`, checked to have `shape`.
    ///
    /// # Errors
    /// As [`Reader::check`] and [`Reader::read`].
    pub fn read_whole(&self, name: &str, shape: &[usize]) -> Result<TensorData, DcpError> {
        let numel = self.check(name, shape)?.numel();
        let flat = self.read(name, 0, numel)?;
        Ok(TensorData::from_bytes_vec(flat.as_bytes().to_vec(), shape.to_vec(), flat.dtype))
    }

    /// The mapped bytes of one chunk, checksummed the first time.
    fn chunk_bytes(&self, name: &str, t: &TensorMeta, c: &ChunkMeta) -> Result<ChunkBytes, DcpError> {
        let file = self.map(&c.file)?;
        let path = self.dir.join(&c.file);
        let info = file.header.info(&c.key).ok_or_else(|| DcpError::Corrupt { file: path.clone(), detail: format!("no chunk {:?} (of tensor {name:?})", c.key) })?;
        let (lo, hi) = (file.data_start + info.data_offsets.0, file.data_start + info.data_offsets.1);
        let size = dtype_size(&t.dtype, name)?;
        if hi > file.map.len() || hi - lo != c.len * size {
            return Err(DcpError::Corrupt {
                file: path,
                detail: format!("chunk {:?} of tensor {name:?} has {} bytes, the metadata says {}", c.key, hi.saturating_sub(lo), c.len * size),
            });
        }
        let key = (c.file.clone(), c.key.clone());
        if !self.verified.lock().expect("verified set").contains(&key) {
            if crc32fast::hash(&file.map[lo..hi]) != c.crc32 {
                return Err(DcpError::Checksum { file: path, tensor: name.into(), start: c.start });
            }
            self.verified.lock().expect("verified set").insert(key);
        }
        Ok(ChunkBytes { file, lo, hi })
    }

    /// Shard file `name`, mapped once.
    fn map(&self, name: &str) -> Result<Arc<Mapped>, DcpError> {
        if let Some(m) = self.files.lock().expect("file table").get(name) {
            return Ok(m.clone());
        }
        let path = self.dir.join(name);
        let expected = *self.meta.files.get(name).ok_or_else(|| DcpError::Corrupt { file: path.clone(), detail: "not listed in the metadata".into() })?;
        let file = std::fs::File::open(&path).map_err(io(&path))?;
        let got = file.metadata().map_err(io(&path))?.len();
        if got != expected {
            return Err(DcpError::Truncated { file: path, expected, got });
        }
        // SAFETY: the map is read only; a checkpoint's files are not modified once its
        // metadata is written (saves go to new directories).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io(&path))?;
        let (header_len, header) =
            safetensors::SafeTensors::read_metadata(&map).map_err(|e| DcpError::Corrupt { file: path.clone(), detail: format!("not a safetensors file: {e}") })?;
        let mapped = Arc::new(Mapped { map, data_start: 8 + header_len, header });
        self.files.lock().expect("file table").insert(name.into(), mapped.clone());
        Ok(mapped)
    }
}

/// A chunk's bytes inside its mapped file.
struct ChunkBytes {
    file: Arc<Mapped>,
    lo: usize,
    hi: usize,
}

impl core::ops::Deref for ChunkBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.file.map[self.lo..self.hi]
    }
}
