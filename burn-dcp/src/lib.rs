//! Distributed checkpoints for Burn, on safetensors files: the shape of PyTorch's
//! Distributed Checkpoint (per-rank shards, one global metadata file, load-time
//! resharding, asynchronous save) for any parallel layout.
//!
//! A rank describes what it holds as [`Chunk`]s of global tensors: elements
//! `start .. start + len` of a tensor flattened row-major, which covers a replicated
//! tensor (the whole), an expert-parallel rank's experts (a dim-0 slice) and an FSDP or
//! ZeRO shard (any run of a flattened parameter). A [`Checkpointer`] saves the chunks of
//! every rank collectively:
//!
//! - every distinct chunk is written once, by the lowest rank holding it, to that rank's
//!   file `step-{N}/rank-{r}.safetensors` (all ranks write at once);
//! - `step-{N}/metadata.json` — each tensor's global shape, dtype and chunks (file, key,
//!   elements, CRC-32), the files' sizes, and named JSON values such as the step and the
//!   data position — is written last, atomically, by rank 0: its presence marks the
//!   checkpoint complete, and [`latest`] passes over directories without it;
//! - [`Checkpointer::save_async`] returns once the snapshot is on the host; the files are
//!   written by a background thread, and the next save waits for the previous one.
//!
//! A [`Reader`] loads into any world size: each rank asks for the runs of elements it
//! holds now and gets them from the overlapping chunks of the memory-mapped files
//! (only the files and pages holding them are read), checksummed. Missing, truncated or
//! corrupted files, checksum mismatches and shape mismatches are errors naming the file
//! and the tensor. [`Fault`] injects crashes into saves for tests.
//!
//! The crate knows nothing of models: the DeepSeek-V3 model's layouts (DDP, ZeRO-1,
//! FSDP/HSDP, EP, pipeline stages) and their optimizer state are mapped to chunks in
//! `burn_deepseek::checkpoint`.

mod checkpointer;
mod chunk;
mod error;
mod fault;
mod load;
mod metadata;
mod save;

pub use checkpointer::{AsyncSave, Checkpointer};
pub use chunk::{Chunk, Snapshot};
pub use error::DcpError;
pub use fault::{Fault, FaultAction, FaultPoint};
pub use load::Reader;
pub use metadata::{latest, step_dir, ChunkMeta, Metadata, TensorMeta, FORMAT, METADATA};
pub use save::SaveReport;
