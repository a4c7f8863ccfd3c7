//! The paged latent cache: per token only `c_kv ‖ k_rope` (`kv_lora_rank +
//! qk_rope_head_dim` values), in pages of [`PAGE_SIZE`] rows, with a page table per
//! sequence.

use super::config::MlaConfig;
use burn::tensor::{backend::Backend, IndexingUpdateOp, Int, Tensor, TensorData};
use core::fmt;
use std::collections::BTreeMap;

/// Rows per page (FlashMLA's block size).
pub const PAGE_SIZE: usize = crate::kernel::mla::PAGE;

/// A sequence's id in a [`LatentCache`].
pub type SeqId = u64;

/// Why a cache operation was refused (the cache is left unchanged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheError {
    /// Not enough free pages for the tokens to append.
    Full {
        /// Pages the append needs.
        needed: usize,
        /// Pages free.
        free: usize,
    },
    /// The sequence is not in the page table.
    UnknownSequence {
        /// Its id.
        id: SeqId,
    },
    /// The sequence is already in the page table.
    DuplicateSequence {
        /// Its id.
        id: SeqId,
    },
    /// A sequence would grow beyond the rotary table.
    TooLong {
        /// Its id.
        id: SeqId,
        /// The length it would reach.
        len: usize,
        /// The longest the model serves (`max_seq_len`).
        max: usize,
    },
    /// An input does not have the size the model or cache expects.
    Dims {
        /// Which input.
        what: &'static str,
        /// The size expected.
        expected: usize,
        /// The size given.
        got: usize,
    },
}

impl fmt::Display for CacheError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheError::Full { needed, free } => write!(f, "latent cache full: the append needs {needed} pages, {free} are free"),
            CacheError::UnknownSequence { id } => write!(f, "sequence {id} is not in the page table"),
            CacheError::DuplicateSequence { id } => write!(f, "sequence {id} is already in the page table"),
            CacheError::TooLong { id, len, max } => write!(f, "sequence {id} would reach {len} tokens, beyond max_seq_len {max}"),
            CacheError::Dims { what, expected, got } => write!(f, "{what}: expected {expected}, got {got}"),
        }
    }
}

impl std::error::Error for CacheError {}

#[derive(Clone, Debug, Default)]
struct Sequence {
    pages: Vec<u32>,
    len: usize,
}

/// Where appended tokens went: per token its sequence's position and its cache row.
#[derive(Clone, Debug, Default)]
pub(crate) struct CacheSlots {
    pub positions: Vec<usize>,
    pub rows: Vec<usize>,
    pub sequences: Vec<SeqId>,
}

/// One layer's latent cache on one device.
///
/// # Shapes
/// The storage is `[pages · PAGE_SIZE, kv_lora_rank + qk_rope_head_dim]`; a sequence's
/// token `t` lives in row `pages[t / PAGE_SIZE] · PAGE_SIZE + t % PAGE_SIZE`.
#[derive(Debug)]
pub struct LatentCache<B: Backend> {
    rows: Tensor<B, 2>,
    width: usize,
    max_seq_len: usize,
    free: Vec<u32>,
    sequences: BTreeMap<SeqId, Sequence>,
}

impl<B: Backend> LatentCache<B> {
    /// An empty cache of `pages` pages for a layer of `config`, on `device`.
    pub fn new(config: &MlaConfig, pages: usize, device: &B::Device) -> Self {
        let width = config.cache_width();
        Self {
            rows: Tensor::zeros([pages * PAGE_SIZE, width], device),
            width,
            max_seq_len: config.max_seq_len,
            free: (0..pages as u32).rev().collect(),
            sequences: BTreeMap::new(),
        }
    }

    /// Values per cached token (`kv_lora_rank + qk_rope_head_dim`).
    pub fn width(&self) -> usize {
        self.width
    }

    /// Bytes per cached token (f32 storage).
    pub fn bytes_per_token(&self) -> usize {
        self.width * core::mem::size_of::<f32>()
    }

    /// Pages not held by any sequence.
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// Adds an empty sequence.
    ///
    /// # Errors
    /// [`CacheError::DuplicateSequence`] when `id` is already there.
    pub fn add_sequence(&mut self, id: SeqId) -> Result<(), CacheError> {
        if self.sequences.contains_key(&id) {
            return Err(CacheError::DuplicateSequence { id });
        }
        self.sequences.insert(id, Sequence::default());
        Ok(())
    }

    /// Removes a sequence and frees its pages (zeroed for their next owner).
    ///
    /// # Errors
    /// [`CacheError::UnknownSequence`].
    pub fn remove_sequence(&mut self, id: SeqId) -> Result<(), CacheError> {
        let seq = self.sequences.remove(&id).ok_or(CacheError::UnknownSequence { id })?;
        let device = self.rows.device();
        for page in seq.pages {
            let start = page as usize * PAGE_SIZE;
            self.rows = self.rows.clone().slice_assign([start..start + PAGE_SIZE, 0..self.width], Tensor::zeros([PAGE_SIZE, self.width], &device));
            self.free.push(page);
        }
        Ok(())
    }

    /// Drops `id`'s tokens from position `len` on (the rejected drafts of speculative
    /// decoding): their rows are zeroed, as a fresh append expects, and pages left empty
    /// are freed. A `len` at or beyond the sequence's length changes nothing.
    ///
    /// # Errors
    /// [`CacheError::UnknownSequence`].
    pub fn truncate(&mut self, id: SeqId, len: usize) -> Result<(), CacheError> {
        let seq = self.sequences.get_mut(&id).ok_or(CacheError::UnknownSequence { id })?;
        if len >= seq.len {
            return Ok(());
        }
        let device = self.rows.device();
        let (from, to) = (len, seq.len);
        // Zero the dropped rows page by page: one slice assignment per page touched.
        let mut t = from;
        while t < to {
            let page = seq.pages[t / PAGE_SIZE] as usize;
            let end = to.min((t / PAGE_SIZE + 1) * PAGE_SIZE);
            let (a, b) = (page * PAGE_SIZE + t % PAGE_SIZE, page * PAGE_SIZE + (end - 1) % PAGE_SIZE + 1);
            self.rows = self.rows.clone().slice_assign([a..b, 0..self.width], Tensor::zeros([b - a, self.width], &device));
            t = end;
        }
        seq.len = len;
        let keep = len.div_ceil(PAGE_SIZE);
        self.free.extend(seq.pages.drain(keep..));
        Ok(())
    }

    /// Tokens cached for `id`.
    ///
    /// # Errors
    /// [`CacheError::UnknownSequence`].
    pub fn len(&self, id: SeqId) -> Result<usize, CacheError> {
        self.sequences.get(&id).map(|s| s.len).ok_or(CacheError::UnknownSequence { id })
    }

    /// The sequence's cached rows in token order, `[len, width]`.
    ///
    /// # Errors
    /// [`CacheError::UnknownSequence`].
    pub fn contiguous(&self, id: SeqId) -> Result<Tensor<B, 2>, CacheError> {
        let seq = self.sequences.get(&id).ok_or(CacheError::UnknownSequence { id })?;
        let rows: Vec<i64> = (0..seq.len).map(|t| (seq.pages[t / PAGE_SIZE] as usize * PAGE_SIZE + t % PAGE_SIZE) as i64).collect();
        Ok(self.rows.clone().select(0, Tensor::from_data(TensorData::new(rows, [seq.len]), &self.rows.device())))
    }

    /// Reserves rows for `ids[i]`'s next token, in order (an id may repeat: its tokens
    /// take consecutive positions). All or nothing.
    pub(crate) fn place(&mut self, ids: &[SeqId]) -> Result<CacheSlots, CacheError> {
        let mut grow: BTreeMap<SeqId, usize> = BTreeMap::new();
        for &id in ids {
            *grow.entry(id).or_default() += 1;
        }
        let mut needed = 0;
        for (&id, &n) in &grow {
            let seq = self.sequences.get(&id).ok_or(CacheError::UnknownSequence { id })?;
            let len = seq.len + n;
            if len > self.max_seq_len {
                return Err(CacheError::TooLong { id, len, max: self.max_seq_len });
            }
            needed += len.div_ceil(PAGE_SIZE) - seq.pages.len();
        }
        if needed > self.free.len() {
            return Err(CacheError::Full { needed, free: self.free.len() });
        }
        let mut placement = CacheSlots::default();
        for &id in ids {
            let seq = self.sequences.get_mut(&id).expect("checked above");
            if seq.len == seq.pages.len() * PAGE_SIZE {
                seq.pages.push(self.free.pop().expect("counted above"));
            }
            placement.rows.push(seq.pages[seq.len / PAGE_SIZE] as usize * PAGE_SIZE + seq.len % PAGE_SIZE);
            placement.positions.push(seq.len);
            placement.sequences.push(id);
            seq.len += 1;
        }
        Ok(placement)
    }

    /// Writes `values [n, width]` to the placed rows (fresh rows hold zeros: the add
    /// stores the values exactly).
    pub(crate) fn write(&mut self, placement: &CacheSlots, values: Tensor<B, 2>) {
        let device = self.rows.device();
        let rows: Vec<i64> = placement.rows.iter().map(|&r| r as i64).collect();
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [placement.rows.len()]), &device);
        self.rows = self.rows.clone().select_assign(0, index, values, IndexingUpdateOp::Add);
    }

    /// The page table and lengths of queries that see their sequence up to and including
    /// `positions[i]`: `pages [n, P]` (unused entries 0), `lens [n]`.
    pub(crate) fn tables(&self, sequences: &[SeqId], positions: &[usize]) -> (Tensor<B, 2, Int>, Tensor<B, 1, Int>) {
        let device = self.rows.device();
        let n = sequences.len();
        let width = sequences.iter().map(|id| self.sequences[id].pages.len()).max().unwrap_or(0).max(1);
        let mut pages = vec![0i64; n * width];
        for (i, id) in sequences.iter().enumerate() {
            for (j, &p) in self.sequences[id].pages.iter().enumerate() {
                pages[i * width + j] = p as i64;
            }
        }
        let lens: Vec<i64> = positions.iter().map(|&p| p as i64 + 1).collect();
        (Tensor::from_data(TensorData::new(pages, [n, width]), &device), Tensor::from_data(TensorData::new(lens, [n]), &device))
    }

    /// The storage, `[pages · PAGE_SIZE, width]`.
    pub fn rows(&self) -> Tensor<B, 2> {
        self.rows.clone()
    }
}
