//! Writing a store: batches appended to a side file, assembled and renamed into place.

use super::*;

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
/// use burn::tensor::{Device, Tensor};
/// use burn_distill::store::{TeacherStore, TeacherStoreConfig, TeacherStoreWriter};
///
/// let path = std::env::temp_dir().join(format!("doc-store-{}.safetensors", std::process::id()));
/// let device = Device::default();
/// let mut writer = TeacherStoreWriter::create(&path, TeacherStoreConfig::new(5, 2)).unwrap();
/// // Teacher logits of two tokens: their top-2 log-probabilities at T_gen = 1 are stored.
/// let logits = Tensor::<2>::from_floats([[2.0, 0.0, 1.0, -1.0, 0.5], [0.0; 5]], &device);
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
    /// rounding, as the sparse loss accepts) or `−∞` (a missing entry); otherwise nothing is
    /// appended and the error names the row (counted from the start of the store) and the value.
    pub fn append_rows(&mut self, indices: &[i64], log_probs: &[f32]) -> Result<(), StoreError> {
        self.append_entries(indices, log_probs, None)
    }

    /// Appends a sparse teacher's `[N, k]` rows (read back from the device; masked entries are
    /// stored as missing). A bad entry is named as [`TeacherStoreWriter::append_rows`] names it.
    pub fn append(&mut self, teacher: &SparseTeacher) -> Result<(), StoreError> {
        self.append_teacher(teacher.clone(), "N")
    }

    /// Appends a sparse teacher's `[B, T, k]` sequences: their `B·T` tokens, row-major (the
    /// rows of a sequence one after the other, as [`TeacherStore::batch_seq`] reads them
    /// back). Masked entries are stored as missing; a bad entry is named at its token
    /// `[b, t]` and its row of the store.
    ///
    /// ```
    /// use burn::tensor::{Device, Int, Tensor};
    /// use burn_distill::SparseTeacher;
    /// use burn_distill::store::{TeacherStore, TeacherStoreConfig, TeacherStoreWriter};
    ///
    /// let path = std::env::temp_dir().join(format!("doc-seq-{}.safetensors", std::process::id()));
    /// let device = Device::default();
    /// // Two sequences of two tokens, the teacher's top-1 at each.
    /// let teacher = SparseTeacher::new(
    ///     Tensor::<3, Int>::from_ints([[[4], [1]], [[0], [3]]], &device),
    ///     Tensor::<3>::from_floats([[[-0.5], [-0.25]], [[-1.0], [-2.0]]], &device),
    /// );
    /// let mut writer = TeacherStoreWriter::create(&path, TeacherStoreConfig::new(5, 1)).unwrap();
    /// writer.append_seq(&teacher).unwrap();
    /// assert_eq!(writer.finish().unwrap().rows, 4);
    ///
    /// let store = TeacherStore::open(&path).unwrap();
    /// // Token [1, 0] is the third row of the store.
    /// assert_eq!(store.read_rows(2..3).unwrap(), (vec![0], vec![-1.0]));
    /// let back = store.batch_seq(0..2, 2, &device).unwrap();
    /// assert_eq!(back.dims(), [2, 2, 1]);
    /// let indices: Vec<i64> = back.indices().to_data().iter::<i64>().collect();
    /// assert_eq!(indices, [4, 1, 0, 3]);
    /// std::fs::remove_file(&path).unwrap();
    /// ```
    pub fn append_seq(&mut self, teacher: &SparseTeacher<3>) -> Result<(), StoreError> {
        self.append_teacher(teacher.clone(), "B, T")
    }

    /// Appends the top-`k` of `[N, V]` teacher logits at the store's generation temperature
    /// (see [`SparseTeacher::from_logits`]).
    pub fn append_logits(&mut self, logits: Tensor<2>) -> Result<(), StoreError> {
        self.append_logits_of(logits, "N")
    }

    /// Appends the top-`k` of `[B, T, V]` teacher logits at the store's generation temperature:
    /// their `B·T` tokens, row-major, as [`TeacherStoreWriter::append_seq`] does.
    pub fn append_logits_seq(&mut self, logits: Tensor<3>) -> Result<(), StoreError> {
        self.append_logits_of(logits, "B, T")
    }

    /// The logits' vocabulary checked against the store's (`lead` names the leading dimensions
    /// in the message: `N`, or `B, T`), their top-`k` appended.
    fn append_logits_of<const D: usize>(
        &mut self,
        logits: Tensor<D>,
        lead: &str,
    ) -> Result<(), StoreError> {
        let dims = logits.dims();
        if dims[D - 1] != self.config.vocab {
            return Err(DistillError::invalid(
                "logits",
                format!("shape {dims:?}"),
                format!("[{lead}, {}] (the store's vocabulary)", self.config.vocab),
            )
            .into());
        }
        let rows = crate::rank::flat_rows(logits);
        let teacher = SparseTeacher::try_from_logits(
            rows,
            self.config.k,
            self.config.generation_temperature,
        )?;
        let seq_len = (D == 3).then(|| dims[1]);
        let (indices, log_probs) = teacher.to_host();
        self.append_entries(&indices, &log_probs, seq_len)
    }

    /// A teacher of either rank: its `k` checked against the store's (`lead` names the leading
    /// dimensions in the message: `N`, or `B, T`), read back with its mask folded in as missing
    /// entries.
    fn append_teacher<const D: usize>(
        &mut self,
        teacher: SparseTeacher<D>,
        lead: &str,
    ) -> Result<(), StoreError> {
        let dims = teacher.dims();
        let k = dims[D - 1];
        if k != self.config.k {
            return Err(DistillError::invalid(
                "teacher",
                format!("shape {dims:?} (k = {k})"),
                format!("[{lead}, {k}] (k = {k}, the store's)", k = self.config.k),
            )
            .into());
        }
        let seq_len = (D == 3).then(|| dims[1]);
        let teacher = teacher.rows();
        let (indices, mut log_probs) = teacher.to_host();
        if let Some(mask) = teacher.mask_on_host() {
            for (lp, keep) in log_probs.iter_mut().zip(mask) {
                if !keep {
                    *lp = f32::NEG_INFINITY;
                }
            }
        }
        self.append_entries(&indices, &log_probs, seq_len)
    }

    /// Checks and appends `k` entries per row. `seq_len`: the rows are the tokens of
    /// sequences of that length (the errors name a bad entry's token `[b, t]` too).
    fn append_entries(
        &mut self,
        indices: &[i64],
        log_probs: &[f32],
        seq_len: Option<usize>,
    ) -> Result<(), StoreError> {
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
        let name = |what: &str, i: usize| {
            let (local, entry) = (i / k, i % k);
            let row = self.rows + local;
            match seq_len {
                Some(t) => format!(
                    "{what} (token [{}, {}], entry {entry}; row {row} of the store)",
                    local / t,
                    local % t
                ),
                None => format!("{what} (row {row}, entry {entry})"),
            }
        };
        for (i, (&index, &lp)) in indices.iter().zip(log_probs).enumerate() {
            if lp == f32::NEG_INFINITY {
                continue; // missing entry: its index is not read
            }
            if index < 0 || index as usize >= self.config.vocab {
                return Err(DistillError::invalid(
                    name("indices", i),
                    index,
                    format!("a token index in [0, {})", self.config.vocab),
                )
                .into());
            }
            if lp.is_nan() || lp as f64 > crate::tail::ROUNDING {
                return Err(DistillError::invalid(
                    name("log_probs", i),
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
