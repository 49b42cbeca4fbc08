//! An offline store of sparse teachers: the top-`k` token indices and log-probabilities of a
//! teacher, computed once, written batch by batch (`[N, k]` rows or `[B, T, k]` sequences), and
//! read back as [`SparseTeacher`] batches in dataset order or by row: `[N, k]` rows, or
//! `[B, T, k]` sequences of a store written from sequences of `T` tokens.
//!
//! # Format
//! One [safetensors](https://huggingface.co/docs/safetensors) file, memory-mapped when read.
//! Rows are grouped in chunks of `chunk_rows`; chunk `c` holds two tensors:
//! - `indices.c`: `U8`, the `rows · k` token indices bit-packed with the fewest bits the
//!   vocabulary needs (`⌈log₂ V⌉`: 17 for 128,256 tokens) in blocks of 128 values
//!   ([`bitpacking`]'s `BitPacker4x`, the last block zero-padded);
//! - `log_probs.c`: `F16` or `BF16`, `[rows, k]` log-probabilities (`−∞`: a missing entry).
//!
//! The header's metadata names the format and its version, the vocabulary size, `k`, the
//! generation temperature, the index width, the value type, the row count, the chunk size and a
//! CRC-32 of each chunk's bytes. Opening checks all of it against the tensors; each chunk's
//! checksum is verified the first time the chunk is read. Writing goes to side files that are
//! renamed into place only by [`TeacherStoreWriter::finish`], so a file at the store's path is
//! always complete.

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    io::{BufWriter, Write},
    ops::Range,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use bitpacking::{BitPacker, BitPacker4x};
use burn::{
    config::Config,
    tensor::{Device, Int, Tensor, TensorData},
};
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};

use crate::{DistillError, SparseTeacher};

mod header;
mod host;
mod reader;
mod writer;

#[cfg(feature = "dataset")]
pub use host::{AlignedDataset, TeacherBatcher, TeacherSeqBatcher, TeacherStoreDataset};
pub use host::{HostTeacher, ReadAhead};
pub use reader::TeacherStore;
pub use writer::TeacherStoreWriter;

/// The `format` value in a store's metadata.
pub const STORE_FORMAT: &str = "burn-distill-topk";
/// The version of the store format this crate writes and reads.
pub const STORE_VERSION: u32 = 1;
/// Values per bit-packed block.
const BLOCK: usize = BitPacker4x::BLOCK_LEN;

/// How a store keeps log-probabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum StoreValues {
    /// IEEE half precision: 11 significant bits (log-probability error ≤ 2⁻¹¹ relative).
    F16,
    /// bfloat16: 8 significant bits, the range of f32.
    Bf16,
}

impl StoreValues {
    fn name(self) -> &'static str {
        match self {
            StoreValues::F16 => "f16",
            StoreValues::Bf16 => "bf16",
        }
    }
    fn dtype(self) -> Dtype {
        match self {
            StoreValues::F16 => Dtype::F16,
            StoreValues::Bf16 => Dtype::BF16,
        }
    }
    /// Rounds `x ≤ 0` toward `−∞` (so that a row's stored probabilities never sum to more
    /// than the teacher's, which a tail bucket needs).
    fn encode(self, x: f32) -> u16 {
        let bits = match self {
            StoreValues::F16 => f16::from_f32(x).to_bits(),
            StoreValues::Bf16 => bf16::from_f32(x).to_bits(),
        };
        // A negative value rounded up (toward 0) steps one unit of magnitude down.
        if self.decode(bits) > x && x < 0.0 && x.is_finite() {
            bits + 1
        } else {
            bits
        }
    }

    /// The value the store keeps for a log-probability `x` (rounded toward `−∞`; values in
    /// `(0, ROUNDING]` are stored as 0).
    pub fn quantize(self, x: f32) -> f32 {
        self.decode(self.encode(if x > 0.0 { 0.0 } else { x }))
    }
    fn decode(self, bits: u16) -> f32 {
        match self {
            StoreValues::F16 => f16::from_bits(bits).to_f32(),
            StoreValues::Bf16 => bf16::from_bits(bits).to_f32(),
        }
    }
}

/// Configuration of a [`TeacherStoreWriter`].
///
/// ```
/// use burn_distill::store::{StoreValues, TeacherStoreConfig};
///
/// let config = TeacherStoreConfig::new(128_256, 64).with_values(StoreValues::Bf16);
/// assert_eq!(config.index_bits(), 17);
/// // 64 · 17 bits of indices and 64 · 2 bytes of values per token.
/// assert_eq!(config.bytes_per_token(), 64.0 * 17.0 / 8.0 + 128.0);
/// ```
#[derive(Config, Debug)]
pub struct TeacherStoreConfig {
    /// Vocabulary size `V` of the teacher.
    pub vocab: usize,
    /// Entries per row (`k` of the top-`k`).
    pub k: usize,
    /// Generation temperature `T_gen` of the stored log-probabilities (recorded, for the
    /// sparse loss's correction).
    #[config(default = 1.0)]
    pub generation_temperature: f64,
    /// Storage type of the log-probabilities.
    #[config(default = "StoreValues::F16")]
    pub values: StoreValues,
    /// Rows per chunk (the unit of writing, checksumming and decoding).
    #[config(default = 65536)]
    pub chunk_rows: usize,
}

impl TeacherStoreConfig {
    /// Bits per stored index: the fewest that hold `V − 1`.
    pub fn index_bits(&self) -> u8 {
        (usize::BITS - self.vocab.saturating_sub(1).leading_zeros()).max(1) as u8
    }

    /// Bytes per token (row), without the padding of each chunk's last block.
    pub fn bytes_per_token(&self) -> f64 {
        self.k as f64 * (self.index_bits() as f64 / 8.0 + 2.0)
    }

    fn validate(&self) -> Result<(), StoreError> {
        let bad = |arg: &str, got: String, expected: &str| {
            Err(StoreError::Invalid(DistillError::invalid(
                arg, got, expected,
            )))
        };
        if self.vocab == 0 || self.vocab > u32::MAX as usize + 1 {
            return bad(
                "vocab",
                self.vocab.to_string(),
                "a vocabulary size in [1, 2³²)",
            );
        }
        if self.k == 0 || self.k > self.vocab {
            return bad("k", self.k.to_string(), "entries per row in [1, vocab]");
        }
        if self.chunk_rows == 0 {
            return bad("chunk_rows", "0".into(), "rows per chunk >= 1");
        }
        // A chunk's `chunk_rows · k` values (2 bytes each) must be addressable.
        if self
            .chunk_rows
            .checked_mul(self.k)
            .and_then(|e| e.checked_mul(2))
            .is_none_or(|bytes| bytes > isize::MAX as usize)
        {
            return bad(
                "chunk_rows",
                self.chunk_rows.to_string(),
                &format!(
                    "rows per chunk whose chunk_rows · k · 2 bytes (k = {}) fit in memory",
                    self.k
                ),
            );
        }
        crate::softmax::check_temperature("generation_temperature", self.generation_temperature)
            .map_err(StoreError::Invalid)
    }
}

/// What can go wrong with a store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Reading or writing the file failed.
    #[error("teacher store {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a complete, intact store (truncated, damaged, or not a store at all).
    #[error("teacher store {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The store was written with other settings than the caller expects.
    #[error("teacher store {path}: {field} is {found}, expected {expected}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// The setting (`vocab`, `k`, `version`, …).
        field: &'static str,
        /// Its value in the file.
        found: String,
        /// The caller's value.
        expected: String,
    },
    /// A bad configuration or bad rows given to the writer, or a bad row range, sequence
    /// length or shape to the reader.
    #[error(transparent)]
    Invalid(#[from] DistillError),
    /// An earlier write of this writer failed; the store cannot be completed.
    #[error("teacher store {path}: an earlier write failed, the store cannot be completed")]
    Poisoned {
        /// The store's path.
        path: PathBuf,
    },
}

/// What a store's header says.
#[derive(Clone, Debug, PartialEq)]
pub struct StoreInfo {
    /// Format version.
    pub version: u32,
    /// Vocabulary size.
    pub vocab: usize,
    /// Entries per row.
    pub k: usize,
    /// Generation temperature of the log-probabilities.
    pub generation_temperature: f64,
    /// Bits per index.
    pub index_bits: u8,
    /// Storage type of the log-probabilities.
    pub values: StoreValues,
    /// Rows (tokens) stored.
    pub rows: usize,
    /// Rows per chunk.
    pub chunk_rows: usize,
    /// Size of the file in bytes.
    pub file_bytes: u64,
    /// The writer's free-form metadata (which teacher, tokenizer and generation settings wrote
    /// the store; see [`TeacherStoreWriter::set_metadata`]), covered by the header checksum.
    pub metadata: BTreeMap<String, String>,
}

/// The prefix of the writer's own metadata keys in the safetensors header.
const USER_PREFIX: &str = "user.";

/// Metadata keys of the safetensors header.
#[derive(Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
    vocab: usize,
    k: usize,
    generation_temperature: f64,
    index_bits: u8,
    values: String,
    rows: usize,
    chunk_rows: usize,
    crc32: Vec<u32>,
}

/// CRC-32 of the metadata (every key but `header_crc32`, sorted), so that a damaged header
/// value (a temperature, a vocabulary size) is found, not read.
fn header_crc(metadata: &HashMap<String, String>) -> u32 {
    let mut keys: Vec<&String> = metadata.keys().filter(|k| *k != "header_crc32").collect();
    keys.sort();
    let mut h = crc32fast::Hasher::new();
    for k in keys {
        h.update(k.as_bytes());
        h.update(b"=");
        h.update(metadata[k].as_bytes());
        h.update(b"\n");
    }
    h.finalize()
}

/// Bytes of one chunk's packed indices.
fn packed_len(rows: usize, k: usize, bits: u8) -> usize {
    (rows * k).div_ceil(BLOCK) * BLOCK * bits as usize / 8
}

fn chunk_crc(indices: &[u8], values: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(indices);
    h.update(values);
    h.finalize()
}
