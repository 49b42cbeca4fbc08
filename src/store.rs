//! An offline store of sparse teachers: the top-`k` token indices and log-probabilities of a
//! teacher, computed once, written batch by batch, and read back as [`SparseTeacher`] batches
//! in dataset order or by row.
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
    tensor::{Int, Tensor, TensorData, backend::Backend},
};
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};

use crate::{DistillError, SparseTeacher};

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
    /// A bad configuration or bad rows given to the writer, or a bad row range to the reader.
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

/// A chunk written to the side file: its rows and byte ranges there.
#[derive(Debug)]
struct WrittenChunk {
    rows: usize,
    indices: Range<usize>,
    values: Range<usize>,
    crc: u32,
}

/// Writes a store batch by batch. Nothing is visible at the store's path until
/// [`TeacherStoreWriter::finish`]; a writer dropped before that removes its side files (named
/// after the store, the process and the writer, so that writers never share one). The data is
/// written twice: to a side file while appending, then into the safetensors file by `finish`.
///
/// ```
/// use burn::backend::NdArray;
/// use burn::tensor::Tensor;
/// use burn_distill::store::{TeacherStore, TeacherStoreConfig, TeacherStoreWriter};
///
/// let path = std::env::temp_dir().join(format!("doc-store-{}.safetensors", std::process::id()));
/// let device = Default::default();
/// let mut writer = TeacherStoreWriter::create(&path, TeacherStoreConfig::new(5, 2)).unwrap();
/// // Teacher logits of two tokens: their top-2 log-probabilities at T_gen = 1 are stored.
/// let logits = Tensor::<NdArray, 2>::from_floats([[2.0, 0.0, 1.0, -1.0, 0.5], [0.0; 5]], &device);
/// writer.append_logits(logits).unwrap();
/// let info = writer.finish().unwrap();
/// assert_eq!((info.rows, info.index_bits), (2, 3));
///
/// let store = TeacherStore::open(&path).unwrap();
/// let (indices, log_probs) = store.read_rows(0..1).unwrap();
/// assert_eq!(indices, [0, 2]);
/// let lse = (2f32.exp() + 1.0 + 1f32.exp() + (-1f32).exp() + 0.5f32.exp()).ln();
/// assert!((log_probs[0] - (2.0 - lse)).abs() < 2e-3); // f16 rounding
/// std::fs::remove_file(&path).unwrap();
/// ```
#[derive(Debug)]
pub struct TeacherStoreWriter {
    path: PathBuf,
    side: PathBuf,
    assembled: PathBuf,
    poisoned: bool,
    file: Option<BufWriter<File>>,
    config: TeacherStoreConfig,
    bits: u8,
    offset: usize,
    rows: usize,
    pending_indices: Vec<u32>,
    pending_values: Vec<u16>,
    chunks: Vec<WrittenChunk>,
    metadata: BTreeMap<String, String>,
}

impl TeacherStoreWriter {
    /// Starts a store at `path` (written there by [`TeacherStoreWriter::finish`]).
    pub fn create(path: impl AsRef<Path>, config: TeacherStoreConfig) -> Result<Self, StoreError> {
        config.validate()?;
        let path = path.as_ref().to_path_buf();
        static WRITERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = format!(
            "{}-{}",
            std::process::id(),
            WRITERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let side = partial(&path, &format!("data-{id}"));
        let assembled = partial(&path, &format!("file-{id}"));
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&side)
            .map_err(|source| StoreError::Io {
                path: side.clone(),
                source,
            })?;
        Ok(Self {
            assembled,
            poisoned: false,
            bits: config.index_bits(),
            path,
            side,
            file: Some(BufWriter::new(file)),
            config,
            offset: 0,
            rows: 0,
            pending_indices: Vec::new(),
            pending_values: Vec::new(),
            chunks: Vec::new(),
            metadata: BTreeMap::new(),
        })
    }

    /// Rows appended so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Records `key = value` in the store's header, for [`TeacherStore::check_metadata`]: which
    /// teacher, tokenizer, data and generation settings wrote the store, so that it cannot be
    /// used with other data silently. Free-form (a later value of a key replaces the earlier);
    /// the key must be non-empty. Returned by [`StoreInfo::metadata`].
    pub fn set_metadata(
        &mut self,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<(), StoreError> {
        let key = key.into();
        if key.is_empty() {
            return Err(DistillError::invalid(
                "metadata key",
                "\"\"",
                "a non-empty key (e.g. \"teacher\", \"tokenizer\")",
            )
            .into());
        }
        self.metadata.insert(key, value.into());
        Ok(())
    }

    /// Appends rows given on the host: `indices` and `log_probs` hold `k` entries per row,
    /// row-major. Indices must lie in `[0, V)`; log-probabilities must be `≤ 0` (up to 1e-3 of
    /// rounding, as the sparse loss accepts) or `−∞` (a missing entry); otherwise nothing is appended and the error names
    /// the row (counted from the start of the store) and the value.
    pub fn append_rows(&mut self, indices: &[i64], log_probs: &[f32]) -> Result<(), StoreError> {
        self.check_poisoned()?;
        let k = self.config.k;
        if indices.len() != log_probs.len() || !indices.len().is_multiple_of(k) {
            return Err(DistillError::invalid(
                "log_probs",
                format!("{} values for {} indices", log_probs.len(), indices.len()),
                format!("as many values as indices, k = {k} per row"),
            )
            .into());
        }
        for (i, (&index, &lp)) in indices.iter().zip(log_probs).enumerate() {
            let row = self.rows + i / k;
            if lp == f32::NEG_INFINITY {
                continue; // missing entry: its index is not read
            }
            if index < 0 || index as usize >= self.config.vocab {
                return Err(DistillError::invalid(
                    format!("indices (row {row}, entry {})", i % k),
                    index,
                    format!("a token index in [0, {})", self.config.vocab),
                )
                .into());
            }
            if lp.is_nan() || lp as f64 > crate::tail::ROUNDING {
                return Err(DistillError::invalid(
                    format!("log_probs (row {row}, entry {})", i % k),
                    lp,
                    "a log-probability <= 0, or -inf for a missing entry",
                )
                .into());
            }
        }
        for (&index, &lp) in indices.iter().zip(log_probs) {
            let missing = lp == f32::NEG_INFINITY;
            self.pending_indices
                .push(if missing { 0 } else { index as u32 });
            self.pending_values
                .push(self.config.values.encode(if lp > 0.0 { 0.0 } else { lp }));
            if self.pending_indices.len() == self.config.chunk_rows * k {
                self.flush_chunk()?;
            }
        }
        self.rows += indices.len() / k;
        Ok(())
    }

    /// Appends a sparse teacher's rows (read back from the device; masked entries are stored
    /// as missing).
    pub fn append<B: Backend>(&mut self, teacher: &SparseTeacher<B>) -> Result<(), StoreError> {
        let [_, k] = teacher.dims();
        if k != self.config.k {
            return Err(DistillError::invalid(
                "teacher",
                format!("k = {k}"),
                format!("k = {} (the store's)", self.config.k),
            )
            .into());
        }
        let (indices, mut log_probs) = teacher.to_host();
        if let Some(mask) = teacher.mask_on_host() {
            for (lp, keep) in log_probs.iter_mut().zip(mask) {
                if !keep {
                    *lp = f32::NEG_INFINITY;
                }
            }
        }
        self.append_rows(&indices, &log_probs)
    }

    /// Appends the top-`k` of `[N, V]` teacher logits at the store's generation temperature
    /// (see [`SparseTeacher::from_logits`]).
    pub fn append_logits<B: Backend>(&mut self, logits: Tensor<B, 2>) -> Result<(), StoreError> {
        let v = logits.dims()[1];
        if v != self.config.vocab {
            return Err(DistillError::invalid(
                "logits",
                format!("shape {:?}", logits.dims()),
                format!("[N, {}] (the store's vocabulary)", self.config.vocab),
            )
            .into());
        }
        let teacher = SparseTeacher::try_from_logits(
            logits,
            self.config.k,
            self.config.generation_temperature,
        )?;
        self.append(&teacher)
    }

    fn io<T>(&mut self, r: std::io::Result<T>) -> Result<T, StoreError> {
        r.map_err(|source| {
            self.poisoned = true;
            StoreError::Io {
                path: self.side.clone(),
                source,
            }
        })
    }

    fn check_poisoned(&self) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    /// Packs and writes the pending rows as one chunk.
    fn flush_chunk(&mut self) -> Result<(), StoreError> {
        if self.pending_indices.is_empty() {
            return Ok(());
        }
        let k = self.config.k;
        let rows = self.pending_indices.len() / k;
        let mut packed = vec![0u8; packed_len(rows, k, self.bits)];
        let packer = BitPacker4x::new();
        let block_bytes = BLOCK * self.bits as usize / 8;
        let mut block = [0u32; BLOCK];
        for (b, values) in self.pending_indices.chunks(BLOCK).enumerate() {
            block[..values.len()].copy_from_slice(values);
            block[values.len()..].fill(0);
            let out = &mut packed[b * block_bytes..(b + 1) * block_bytes];
            packer.compress(&block, out, self.bits);
        }
        let values: Vec<u8> = self
            .pending_values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let crc = chunk_crc(&packed, &values);
        let file = self.file.as_mut().expect("open until finish");
        let written = file
            .write_all(&packed)
            .and_then(|_| file.write_all(&values));
        self.io(written)?;
        let start = self.offset;
        self.chunks.push(WrittenChunk {
            rows,
            indices: start..start + packed.len(),
            values: start + packed.len()..start + packed.len() + values.len(),
            crc,
        });
        self.offset += packed.len() + values.len();
        self.pending_indices.clear();
        self.pending_values.clear();
        Ok(())
    }

    /// Writes the last chunk and the file, and moves it to the store's path (atomically: a
    /// rename on the same file system). Returns what the header says.
    pub fn finish(mut self) -> Result<StoreInfo, StoreError> {
        self.check_poisoned()?;
        self.flush_chunk()?;
        let file = self.file.take().expect("open until finish");
        let file = self.io(file.into_inner().map_err(|e| e.into_error()))?;
        self.io(file.sync_all())?;
        drop(file);
        let side = File::open(&self.side);
        let side = self.io(side)?;
        // SAFETY: the side file is this writer's own, complete and no longer written.
        let data = unsafe { memmap2::Mmap::map(&side) };
        let data = self.io(data)?;
        let (k, dtype) = (self.config.k, self.config.values.dtype());
        let mut views = Vec::with_capacity(2 * self.chunks.len());
        for (c, chunk) in self.chunks.iter().enumerate() {
            let indices = &data[chunk.indices.clone()];
            let values = &data[chunk.values.clone()];
            views.push((
                format!("indices.{c}"),
                Bytes(Dtype::U8, vec![indices.len()], indices),
            ));
            views.push((
                format!("log_probs.{c}"),
                Bytes(dtype, vec![chunk.rows, k], values),
            ));
        }
        let header = Header {
            format: STORE_FORMAT.into(),
            version: STORE_VERSION,
            vocab: self.config.vocab,
            k,
            generation_temperature: self.config.generation_temperature,
            index_bits: self.bits,
            values: self.config.values.name().into(),
            rows: self.rows,
            chunk_rows: self.config.chunk_rows,
            crc32: self.chunks.iter().map(|c| c.crc).collect(),
        };
        let mut metadata = metadata_of(&header);
        for (key, value) in &self.metadata {
            metadata.insert(format!("{USER_PREFIX}{key}"), value.clone());
        }
        metadata.insert("header_crc32".into(), header_crc(&metadata).to_string());
        let assembled = self.assembled.clone();
        let result =
            safetensors::serialize_to_file(views, Some(metadata), &assembled).map_err(|e| {
                StoreError::Io {
                    path: assembled.clone(),
                    source: std::io::Error::other(e.to_string()),
                }
            });
        drop(data);
        result?;
        // A handle with write access: Windows flushes only those.
        let synced = File::options()
            .write(true)
            .open(&assembled)
            .and_then(|f| f.sync_all());
        self.io(synced)?;
        std::fs::rename(&assembled, &self.path).map_err(|source| StoreError::Io {
            path: self.path.clone(),
            source,
        })?;
        let _ = std::fs::remove_file(&self.side);
        TeacherStore::open(&self.path).map(|s| s.info)
    }
}

impl Drop for TeacherStoreWriter {
    fn drop(&mut self) {
        // Unfinished: leave nothing behind (a finished writer has removed its side file).
        let _ = std::fs::remove_file(&self.side);
        let _ = std::fs::remove_file(&self.assembled);
    }
}

/// `path` with a `.partial-<what>` suffix: where the writer works before the final rename.
fn partial(path: &Path, what: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".partial-{what}"));
    path.with_file_name(name)
}

fn metadata_of(h: &Header) -> HashMap<String, String> {
    let value = serde_json::to_value(h).expect("a header serialises");
    value
        .as_object()
        .expect("an object")
        .iter()
        .map(|(k, v)| {
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), text)
        })
        .collect()
}

/// A byte range of the side file as a safetensors tensor.
struct Bytes<'a>(Dtype, Vec<usize>, &'a [u8]);

impl View for Bytes<'_> {
    fn dtype(&self) -> Dtype {
        self.0
    }
    fn shape(&self) -> &[usize] {
        &self.1
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(self.2)
    }
    fn data_len(&self) -> usize {
        self.2.len()
    }
}

/// A chunk of an open store: first row, rows, and byte ranges in the mapped file.
#[derive(Debug)]
struct Chunk {
    first_row: usize,
    rows: usize,
    indices: Range<usize>,
    values: Range<usize>,
    crc: u32,
    verified: OnceLock<bool>,
}

/// A store opened for reading (memory-mapped).
#[derive(Debug)]
pub struct TeacherStore {
    path: PathBuf,
    map: memmap2::Mmap,
    info: StoreInfo,
    chunks: Vec<Chunk>,
}

impl TeacherStore {
    /// Opens and checks a store: header (and its checksum), format, version, and every
    /// tensor's type, shape and place (the data's checksums are verified per chunk on first
    /// read).
    ///
    /// The file is memory-mapped: it must not be modified in place while open (writers of
    /// this module never do: they rename a new file over the path, and an open store keeps
    /// reading the old file). On Windows, a store that is open cannot be replaced by a
    /// writer's `finish`. If another process *truncates* the file while it is open, reading a
    /// page past the new end raises `SIGBUS` on Linux and macOS (an access violation on
    /// Windows) and the process ends: no error can be returned for it. A chunk's checksum is
    /// verified once, on its first read; later in-place changes are not seen.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < 8 {
            return Err(StoreError::Corrupt {
                path,
                reason: format!("{len} bytes, shorter than a safetensors header"),
            });
        }
        // SAFETY: a finished store is never written again (writers rename a new file over it).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let corrupt = |reason: String| StoreError::Corrupt {
            path: path.clone(),
            reason,
        };
        let (_, metadata) = SafeTensors::read_metadata(&map)
            .map_err(|e| corrupt(format!("not a complete safetensors file ({e})")))?;
        let meta = metadata
            .metadata()
            .as_ref()
            .ok_or_else(|| corrupt("no store metadata in the header".into()))?;
        let field = |key: &str| {
            meta.get(key)
                .ok_or_else(|| corrupt(format!("no `{key}` in the header")))
        };
        if field("format")? != STORE_FORMAT {
            return Err(corrupt(format!(
                "format `{}`, not `{STORE_FORMAT}`",
                field("format")?
            )));
        }
        // The version first: another version may have other keys.
        let version = field("version")?;
        if version != &STORE_VERSION.to_string() {
            return Err(StoreError::Mismatch {
                path,
                field: "version",
                found: version.clone(),
                expected: format!("{STORE_VERSION} (this crate's store format)"),
            });
        }
        if field("header_crc32")? != &header_crc(meta).to_string() {
            return Err(corrupt(
                "header checksum mismatch (a damaged header value)".into(),
            ));
        }
        let parse = |key: &str| -> Result<serde_json::Value, StoreError> {
            let text = field(key)?;
            serde_json::from_str(text).or_else(|_| Ok(serde_json::Value::String(text.clone())))
        };
        let header: Header = serde_json::from_value(serde_json::Value::Object(
            [
                "format",
                "version",
                "vocab",
                "k",
                "generation_temperature",
                "index_bits",
                "values",
                "rows",
                "chunk_rows",
                "crc32",
            ]
            .into_iter()
            .map(|key| Ok((key.to_string(), parse(key)?)))
            .collect::<Result<_, StoreError>>()?,
        ))
        .map_err(|e| corrupt(format!("bad header ({e})")))?;
        let values = match header.values.as_str() {
            "f16" => StoreValues::F16,
            "bf16" => StoreValues::Bf16,
            other => return Err(corrupt(format!("value type `{other}`"))),
        };
        let config = TeacherStoreConfig::new(header.vocab, header.k)
            .with_chunk_rows(header.chunk_rows)
            .with_generation_temperature(header.generation_temperature);
        config
            .validate()
            .map_err(|e| corrupt(format!("bad header ({e})")))?;
        let entries = header.rows.checked_mul(header.k);
        if entries.is_none_or(|e| e / 8 > map.len()) || header.index_bits != config.index_bits() {
            return Err(corrupt(format!(
                "k = {}, chunk_rows = {}, index_bits = {} for a vocabulary of {}",
                header.k, header.chunk_rows, header.index_bits, header.vocab
            )));
        }
        let tensors = SafeTensors::deserialize(&map)
            .map_err(|e| corrupt(format!("not a complete safetensors file ({e})")))?;
        let n_chunks = header.rows.div_ceil(header.chunk_rows);
        if header.crc32.len() != n_chunks || tensors.len() != 2 * n_chunks {
            return Err(corrupt(format!(
                "{} tensors and {} checksums for {} rows in chunks of {}",
                tensors.len(),
                header.crc32.len(),
                header.rows,
                header.chunk_rows
            )));
        }
        let base = map.as_ptr() as usize;
        let mut chunks = Vec::with_capacity(n_chunks);
        for c in 0..n_chunks {
            let first_row = c * header.chunk_rows;
            let rows = header.chunk_rows.min(header.rows - first_row);
            let tensor = |name: String, dtype: Dtype, shape: Vec<usize>| {
                let t = tensors
                    .tensor(&name)
                    .map_err(|_| corrupt(format!("no tensor `{name}`")))?;
                if t.dtype() != dtype || t.shape() != shape {
                    return Err(corrupt(format!(
                        "`{name}` is {:?} {:?}, expected {dtype:?} {shape:?}",
                        t.dtype(),
                        t.shape()
                    )));
                }
                let start = t.data().as_ptr() as usize - base;
                Ok(start..start + t.data().len())
            };
            let indices = tensor(
                format!("indices.{c}"),
                Dtype::U8,
                vec![packed_len(rows, header.k, header.index_bits)],
            )?;
            let value_range = tensor(
                format!("log_probs.{c}"),
                values.dtype(),
                vec![rows, header.k],
            )?;
            chunks.push(Chunk {
                first_row,
                rows,
                indices,
                values: value_range,
                crc: header.crc32[c],
                verified: OnceLock::new(),
            });
        }
        let info = StoreInfo {
            version: header.version,
            vocab: header.vocab,
            k: header.k,
            generation_temperature: header.generation_temperature,
            index_bits: header.index_bits,
            values,
            rows: header.rows,
            chunk_rows: header.chunk_rows,
            file_bytes: map.len() as u64,
            metadata: meta
                .iter()
                .filter_map(|(k, v)| Some((k.strip_prefix(USER_PREFIX)?.to_string(), v.clone())))
                .collect(),
        };
        Ok(Self {
            path,
            map,
            info,
            chunks,
        })
    }

    /// What the header says.
    pub fn info(&self) -> &StoreInfo {
        &self.info
    }

    /// Rows (tokens) stored.
    pub fn rows(&self) -> usize {
        self.info.rows
    }

    /// Fails unless the store has this vocabulary size and `k` (e.g. those of the student and
    /// the run's configuration).
    pub fn check(&self, vocab: usize, k: usize) -> Result<(), StoreError> {
        for (field, found, expected) in [("vocab", self.info.vocab, vocab), ("k", self.info.k, k)] {
            if found != expected {
                return Err(StoreError::Mismatch {
                    path: self.path.clone(),
                    field,
                    found: found.to_string(),
                    expected: expected.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Fails unless the writer recorded `key = expected` (see
    /// [`TeacherStoreWriter::set_metadata`]): a store written for another teacher, tokenizer or
    /// data set is an error naming the key and both values.
    pub fn check_metadata(&self, key: &str, expected: &str) -> Result<(), StoreError> {
        match self.info.metadata.get(key) {
            Some(found) if found == expected => Ok(()),
            found => Err(StoreError::Mismatch {
                path: self.path.clone(),
                field: "metadata",
                found: match found {
                    Some(v) => format!("{key} = {v:?}"),
                    None => format!("no {key:?}"),
                },
                expected: format!("{key} = {expected:?}"),
            }),
        }
    }

    /// Rows `range` on the host: `k` indices and `k` log-probabilities per row, row-major
    /// (`−∞` marks a missing entry; its index reads 0).
    pub fn read_rows(&self, range: Range<usize>) -> Result<(Vec<i64>, Vec<f32>), StoreError> {
        let k = self.info.k;
        let mut indices = Vec::with_capacity(range.len() * k);
        let mut log_probs = Vec::with_capacity(range.len() * k);
        self.read_into(range, &mut indices, &mut log_probs)?;
        Ok((indices, log_probs))
    }

    /// Rows `range` appended to `indices` and `log_probs` (chunk by chunk, each bit-packed
    /// block decoded once).
    fn read_into(
        &self,
        range: Range<usize>,
        indices: &mut Vec<i64>,
        log_probs: &mut Vec<f32>,
    ) -> Result<(), StoreError> {
        if range.start > range.end || range.end > self.info.rows {
            return Err(DistillError::invalid(
                "range",
                format!("{range:?}"),
                format!("rows within 0..{}", self.info.rows),
            )
            .into());
        }
        let mut row = range.start;
        while row < range.end {
            let c = row / self.info.chunk_rows;
            let chunk = &self.chunks[c];
            let end = range.end.min(chunk.first_row + chunk.rows);
            self.read_chunk(
                chunk,
                row - chunk.first_row..end - chunk.first_row,
                indices,
                log_probs,
            )?;
            row = end;
        }
        Ok(())
    }

    /// The given rows on the host, in that order (a shuffled data loader's batch). Runs of
    /// consecutive rows (a sequence's tokens) are decoded together, chunk by chunk, each
    /// bit-packed block once, whatever order the rows come in.
    pub fn gather_host(&self, rows: &[usize]) -> Result<HostTeacher, StoreError> {
        let k = self.info.k;
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.info.rows) {
            return Err(DistillError::invalid(
                "rows",
                format!("row {bad}"),
                format!("rows within 0..{}", self.info.rows),
            )
            .into());
        }
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_unstable_by_key(|&i| rows[i]);
        let mut out = HostTeacher {
            rows: rows.len(),
            k,
            indices: vec![0; rows.len() * k],
            log_probs: vec![0.0; rows.len() * k],
        };
        let (mut run_i, mut run_l) = (Vec::new(), Vec::new());
        let mut i = 0;
        while i < order.len() {
            let start = rows[order[i]];
            let mut j = i + 1;
            while j < order.len() && rows[order[j]] <= rows[order[j - 1]] + 1 {
                j += 1;
            }
            let end = rows[order[j - 1]] + 1;
            run_i.clear();
            run_l.clear();
            self.read_into(start..end, &mut run_i, &mut run_l)?;
            for &o in &order[i..j] {
                let from = (rows[o] - start) * k;
                out.indices[o * k..(o + 1) * k].copy_from_slice(&run_i[from..from + k]);
                out.log_probs[o * k..(o + 1) * k].copy_from_slice(&run_l[from..from + k]);
            }
            i = j;
        }
        Ok(out)
    }

    /// Decodes `batches` (each a list of rows, as [`TeacherStore::gather_host`] takes) on a
    /// background thread, up to `depth + 1` batches (`depth` at least 1: `depth` waiting, one
    /// being decoded) ahead of the consumer, so that
    /// decoding overlaps the training step: the returned iterator yields them in order. The
    /// thread stops when the iterator is dropped.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use burn_distill::store::{TeacherStore, TeacherStoreConfig, TeacherStoreWriter};
    /// # let path = std::env::temp_dir().join(format!("doc-ahead-{}.safetensors", std::process::id()));
    /// # let mut writer = TeacherStoreWriter::create(&path, TeacherStoreConfig::new(8, 2)).unwrap();
    /// # writer.append_rows(&[0, 1, 2, 3, 4, 5], &[-0.1, -2.0, -0.2, -3.0, -0.3, -4.0]).unwrap();
    /// # writer.finish().unwrap();
    /// let store = Arc::new(TeacherStore::open(&path).unwrap());
    /// let batches = vec![vec![2, 0], vec![1]];
    /// let host: Vec<_> = store.clone().read_ahead(batches, 2).map(Result::unwrap).collect();
    /// assert_eq!(host[0].indices, [4, 5, 0, 1]);
    /// assert_eq!(host[1], store.gather_host(&[1]).unwrap());
    /// # std::fs::remove_file(&path).unwrap();
    /// ```
    pub fn read_ahead(self: Arc<Self>, batches: Vec<Vec<usize>>, depth: usize) -> ReadAhead {
        let (sender, receiver) = std::sync::mpsc::sync_channel(depth.max(1));
        let worker = std::thread::Builder::new()
            .name("burn-distill-store-read-ahead".into())
            .spawn(move || {
                for rows in batches {
                    if sender.send(self.gather_host(&rows)).is_err() {
                        break; // the consumer is gone
                    }
                }
            })
            .expect("spawn the read-ahead thread");
        ReadAhead {
            receiver: Some(receiver),
            worker: Some(worker),
        }
    }

    /// Decodes rows `local` of `chunk` (after checking its checksum once).
    fn read_chunk(
        &self,
        chunk: &Chunk,
        local: Range<usize>,
        indices: &mut Vec<i64>,
        log_probs: &mut Vec<f32>,
    ) -> Result<(), StoreError> {
        let (packed, values) = (
            &self.map[chunk.indices.clone()],
            &self.map[chunk.values.clone()],
        );
        if !*chunk
            .verified
            .get_or_init(|| chunk_crc(packed, values) == chunk.crc)
        {
            return Err(StoreError::Corrupt {
                path: self.path.clone(),
                reason: format!(
                    "checksum mismatch in chunk {} (rows {}..{})",
                    chunk.first_row / self.info.chunk_rows,
                    chunk.first_row,
                    chunk.first_row + chunk.rows
                ),
            });
        }
        let (k, bits) = (self.info.k, self.info.index_bits);
        let (p0, p1) = (local.start * k, local.end * k);
        let block_bytes = BLOCK * bits as usize / 8;
        let packer = BitPacker4x::new();
        let mut block = [0u32; BLOCK];
        for b in p0 / BLOCK..p1.div_ceil(BLOCK) {
            packer.decompress(
                &packed[b * block_bytes..(b + 1) * block_bytes],
                &mut block,
                bits,
            );
            let lo = p0.max(b * BLOCK) - b * BLOCK;
            let hi = p1.min((b + 1) * BLOCK) - b * BLOCK;
            if let Some(&bad) = block[lo..hi]
                .iter()
                .find(|&&i| i as usize >= self.info.vocab)
            {
                return Err(StoreError::Corrupt {
                    path: self.path.clone(),
                    reason: format!("index {bad} in a vocabulary of {}", self.info.vocab),
                });
            }
            indices.extend(block[lo..hi].iter().map(|&i| i as i64));
        }
        let kind = self.info.values;
        let start = log_probs.len();
        log_probs.extend(
            values[2 * p0..2 * p1]
                .chunks_exact(2)
                .map(|b| kind.decode(u16::from_le_bytes([b[0], b[1]]))),
        );
        // The writer stores log-probabilities `≤ 0` or `−∞`: anything else (a file with
        // recomputed checksums, a foreign writer) is not a teacher, whatever its checksum says.
        if let Some((at, &bad)) = log_probs[start..]
            .iter()
            .enumerate()
            .find(|&(_, &lp)| lp.is_nan() || lp > 0.0)
        {
            let row = chunk.first_row + local.start + at / k;
            return Err(StoreError::Corrupt {
                path: self.path.clone(),
                reason: format!(
                    "log-probability {bad} at row {row}, entry {} (stored values are <= 0 or \
                     -inf)",
                    at % k
                ),
            });
        }
        Ok(())
    }

    /// Rows `range` as a [`SparseTeacher`] on `device`.
    pub fn batch<B: Backend>(
        &self,
        range: Range<usize>,
        device: &B::Device,
    ) -> Result<SparseTeacher<B>, StoreError> {
        let (indices, log_probs) = self.read_rows(range.clone())?;
        Ok(teacher_of(
            indices,
            log_probs,
            range.len(),
            self.info.k,
            device,
        ))
    }

    /// The given rows, in that order (a shuffled data loader's batch), as a [`SparseTeacher`]
    /// (decoded as [`TeacherStore::gather_host`] does).
    pub fn gather<B: Backend>(
        &self,
        rows: &[usize],
        device: &B::Device,
    ) -> Result<SparseTeacher<B>, StoreError> {
        Ok(self.gather_host(rows)?.to_teacher(device))
    }

    /// Consecutive batches of `batch_rows` rows (at least 1; the last batch shorter), in
    /// stored order.
    pub fn batches<'a, B: Backend>(
        &'a self,
        batch_rows: usize,
        device: &'a B::Device,
    ) -> impl Iterator<Item = Result<SparseTeacher<B>, StoreError>> + 'a {
        let step = batch_rows.max(1);
        (0..self.info.rows)
            .step_by(step)
            .map(move |r| self.batch(r..r.saturating_add(step).min(self.info.rows), device))
    }
}

/// Rows of a store decoded on the host: `[rows, k]` indices and log-probabilities, row-major
/// (`−∞` marks a missing entry; its index reads 0). What a data loader's worker or the
/// read-ahead thread hands to the training step.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTeacher {
    /// Rows.
    pub rows: usize,
    /// Entries per row.
    pub k: usize,
    /// `rows · k` token indices.
    pub indices: Vec<i64>,
    /// `rows · k` log-probabilities.
    pub log_probs: Vec<f32>,
}

impl HostTeacher {
    /// The rows as a [`SparseTeacher`] on `device`.
    pub fn to_teacher<B: Backend>(self, device: &B::Device) -> SparseTeacher<B> {
        teacher_of(self.indices, self.log_probs, self.rows, self.k, device)
    }

    /// The rows of `parts`, one after the other (a batch of items); `None` for no parts or
    /// parts of different `k`.
    pub fn concat(parts: Vec<HostTeacher>) -> Option<HostTeacher> {
        let k = parts.first()?.k;
        if parts.iter().any(|p| p.k != k) {
            return None;
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let mut out = HostTeacher {
            rows,
            k,
            indices: Vec::with_capacity(rows * k),
            log_probs: Vec::with_capacity(rows * k),
        };
        for p in parts {
            out.indices.extend(p.indices);
            out.log_probs.extend(p.log_probs);
        }
        Some(out)
    }
}

/// Batches of a store decoded ahead on a background thread (see [`TeacherStore::read_ahead`]).
#[derive(Debug)]
pub struct ReadAhead {
    receiver: Option<std::sync::mpsc::Receiver<Result<HostTeacher, StoreError>>>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl Iterator for ReadAhead {
    type Item = Result<HostTeacher, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.receiver.as_ref()?.recv() {
            Ok(batch) => Some(batch),
            Err(_) => {
                // The thread is done: at the end of the batches, or by a panic, which is
                // raised here rather than passing for a shorter epoch.
                if let Some(worker) = self.worker.take()
                    && let Err(panic) = worker.join()
                {
                    std::panic::resume_unwind(panic);
                }
                None
            }
        }
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        // Closing the channel first ends the thread at its next send.
        drop(self.receiver.take());
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// `−∞` log-probabilities mark missing entries (their index, 0, is valid and contributes
/// nothing), as [`SparseTeacher`] documents.
fn teacher_of<B: Backend>(
    indices: Vec<i64>,
    log_probs: Vec<f32>,
    rows: usize,
    k: usize,
    device: &B::Device,
) -> SparseTeacher<B> {
    SparseTeacher::new(
        Tensor::<B, 2, Int>::from_data(TensorData::new(indices, [rows, k]), device),
        Tensor::<B, 2>::from_data(TensorData::new(log_probs, [rows, k]), device),
    )
}

/// A store as a burn `Dataset`: item `i` holds rows `[i·T, (i+1)·T)` (the teacher of the
/// `i`-th sequence of `T` tokens of the token dataset it was written from, in that order),
/// decoded as one range (chunk by chunk, not row by row). Pair it with the token dataset by
/// [`AlignedDataset`] and batch the teacher with [`TeacherBatcher`]; burn's data loaders then
/// decode on their worker threads, beside the training step.
#[cfg(feature = "dataset")]
#[derive(Clone, Debug)]
pub struct TeacherStoreDataset {
    store: Arc<TeacherStore>,
    rows_per_item: usize,
}

#[cfg(feature = "dataset")]
impl TeacherStoreDataset {
    /// Items of `rows_per_item` rows (`≥ 1`, dividing the store's rows: a store written from
    /// whole sequences).
    pub fn new(store: Arc<TeacherStore>, rows_per_item: usize) -> Result<Self, StoreError> {
        let rows = store.rows();
        if rows_per_item == 0 || !rows.is_multiple_of(rows_per_item) {
            return Err(DistillError::invalid(
                "rows_per_item",
                rows_per_item,
                format!("a divisor >= 1 of the store's {rows} rows (tokens per sequence)"),
            )
            .into());
        }
        Ok(Self {
            store,
            rows_per_item,
        })
    }

    /// The store.
    pub fn store(&self) -> &Arc<TeacherStore> {
        &self.store
    }
}

#[cfg(feature = "dataset")]
impl burn::data::dataset::Dataset<HostTeacher> for TeacherStoreDataset {
    /// # Panics
    /// On a damaged chunk, with the [`StoreError`] (a burn `Dataset` cannot return an error,
    /// and a shorter dataset would be a silent wrong value).
    fn get(&self, index: usize) -> Option<HostTeacher> {
        let start = index.checked_mul(self.rows_per_item)?;
        if start >= self.store.rows() {
            return None;
        }
        let (k, t) = (self.store.info().k, self.rows_per_item);
        let mut out = HostTeacher {
            rows: t,
            k,
            indices: Vec::with_capacity(t * k),
            log_probs: Vec::with_capacity(t * k),
        };
        self.store
            .read_into(start..start + t, &mut out.indices, &mut out.log_probs)
            .unwrap_or_else(|e| panic!("burn-distill: {e}"));
        Some(out)
    }

    fn len(&self) -> usize {
        self.store.rows() / self.rows_per_item
    }
}

/// A token dataset and the teacher store written from it, item by item: `(item, teacher)`.
#[cfg(feature = "dataset")]
#[derive(Clone, Debug)]
pub struct AlignedDataset<D> {
    tokens: D,
    teacher: TeacherStoreDataset,
}

#[cfg(feature = "dataset")]
impl<D> AlignedDataset<D> {
    /// Pairs `tokens` with `teacher`; they must have as many items (a store written from
    /// another data set, or another sequence length, is an error naming both counts).
    pub fn new<I>(tokens: D, teacher: TeacherStoreDataset) -> Result<Self, StoreError>
    where
        D: burn::data::dataset::Dataset<I>,
    {
        use burn::data::dataset::Dataset;
        if tokens.len() != teacher.len() {
            return Err(StoreError::Mismatch {
                path: teacher.store.path.clone(),
                field: "items",
                found: format!("{} items of {} rows", teacher.len(), teacher.rows_per_item),
                expected: format!("{} items (the token dataset's)", tokens.len()),
            });
        }
        Ok(Self { tokens, teacher })
    }
}

#[cfg(feature = "dataset")]
impl<D, I> burn::data::dataset::Dataset<(I, HostTeacher)> for AlignedDataset<D>
where
    D: burn::data::dataset::Dataset<I>,
{
    fn get(&self, index: usize) -> Option<(I, HostTeacher)> {
        Some((self.tokens.get(index)?, self.teacher.get(index)?))
    }

    fn len(&self) -> usize {
        self.tokens.len()
    }
}

/// Batches [`HostTeacher`] items into one [`SparseTeacher`] (their rows one after the other,
/// as the token batcher stacks the sequences).
#[cfg(feature = "dataset")]
#[derive(Clone, Copy, Debug, Default)]
pub struct TeacherBatcher;

#[cfg(feature = "dataset")]
impl<B: Backend> burn::data::dataloader::batcher::Batcher<B, HostTeacher, SparseTeacher<B>>
    for TeacherBatcher
{
    /// # Panics
    /// On no items, or items of different `k` (one store gives one `k`).
    fn batch(&self, items: Vec<HostTeacher>, device: &B::Device) -> SparseTeacher<B> {
        HostTeacher::concat(items)
            .expect("burn-distill: a teacher batch of items of one store (at least one, one k)")
            .to_teacher(device)
    }
}
