//! Reading a store: opened and checked, memory-mapped, chunks decoded and verified on first
//! read, batches gathered.

use super::header::{Chunk, chunks_of, read_header};
use super::host::{teacher_of, teacher_seq_of};
use super::*;

/// A store opened for reading (memory-mapped).
#[derive(Debug)]
pub struct TeacherStore {
    pub(super) path: PathBuf,
    map: memmap2::Mmap,
    pub(super) info: StoreInfo,
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
        let (header, values, metadata) = read_header(&map, &path)?;
        let chunks = chunks_of(&map, &header, values, &path)?;
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
            metadata,
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
    pub(super) fn read_into(
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

    /// Rows `range` as an `[N, k]` [`SparseTeacher`] on `device`.
    pub fn batch(&self, range: Range<usize>, device: &Device) -> Result<SparseTeacher, StoreError> {
        let (indices, log_probs) = self.read_rows(range.clone())?;
        Ok(teacher_of(
            indices,
            log_probs,
            range.len(),
            self.info.k,
            device,
        ))
    }

    /// Sequences `sequences` of a store written from sequences of `seq_len = T` tokens
    /// (sequence `s`: rows `s·T..(s+1)·T`, as `TeacherStoreDataset` numbers its items) as a
    /// `[B, T, k]` [`SparseTeacher`] on `device`, `B = sequences.len()`. `T` must divide the
    /// store's rows.
    ///
    /// ```
    /// # use burn::tensor::Device;
    /// # use burn_distill::store::{TeacherStore, TeacherStoreConfig, TeacherStoreWriter};
    /// # let path = std::env::temp_dir().join(format!("doc-batch-seq-{}.safetensors", std::process::id()));
    /// # let mut writer = TeacherStoreWriter::create(&path, TeacherStoreConfig::new(8, 2)).unwrap();
    /// # writer.append_rows(&[0, 1, 2, 3, 4, 5, 6, 7], &[-0.5; 8]).unwrap();
    /// # writer.finish().unwrap();
    /// let store = TeacherStore::open(&path).unwrap();
    /// // Four rows: two sequences of two tokens.
    /// let teacher = store.batch_seq(1..2, 2, &Device::default()).unwrap();
    /// assert_eq!(teacher.dims(), [1, 2, 2]);
    /// let indices: Vec<i64> = teacher.indices().to_data().iter::<i64>().collect();
    /// assert_eq!(indices, [4, 5, 6, 7]);
    /// let err = store.batch_seq(0..1, 3, &Device::default()).unwrap_err();
    /// assert_eq!(
    ///     err.to_string(),
    ///     "invalid seq_len: got 3, expected a divisor >= 1 of the store's 4 rows (tokens per \
    ///      sequence)"
    /// );
    /// # std::fs::remove_file(&path).unwrap();
    /// ```
    pub fn batch_seq(
        &self,
        sequences: Range<usize>,
        seq_len: usize,
        device: &Device,
    ) -> Result<SparseTeacher<3>, StoreError> {
        let count = self.sequences(seq_len)?;
        if sequences.start > sequences.end || sequences.end > count {
            return Err(DistillError::invalid(
                "sequences",
                format!("{sequences:?}"),
                format!("sequences within 0..{count} (of {seq_len} rows each)"),
            )
            .into());
        }
        let (start, end) = (sequences.start * seq_len, sequences.end * seq_len);
        let (indices, log_probs) = self.read_rows(start..end)?;
        Ok(teacher_seq_of(
            indices,
            log_probs,
            [sequences.len(), seq_len],
            self.info.k,
            device,
        ))
    }

    /// The given rows, in that order (a shuffled data loader's batch), as an `[N, k]`
    /// [`SparseTeacher`] (decoded as [`TeacherStore::gather_host`] does).
    pub fn gather(&self, rows: &[usize], device: &Device) -> Result<SparseTeacher, StoreError> {
        Ok(self.gather_host(rows)?.to_teacher(device))
    }

    /// The given sequences of `seq_len` tokens, in that order (a shuffled data loader's batch
    /// of sequences), as a `[B, T, k]` [`SparseTeacher`] (sequences numbered as
    /// [`TeacherStore::batch_seq`] numbers them; decoded as [`TeacherStore::gather_host`]
    /// does).
    pub fn gather_seq(
        &self,
        sequences: &[usize],
        seq_len: usize,
        device: &Device,
    ) -> Result<SparseTeacher<3>, StoreError> {
        let count = self.sequences(seq_len)?;
        if let Some(&bad) = sequences.iter().find(|&&s| s >= count) {
            return Err(DistillError::invalid(
                "sequences",
                format!("sequence {bad}"),
                format!("sequences within 0..{count} (of {seq_len} rows each)"),
            )
            .into());
        }
        let rows: Vec<usize> = sequences
            .iter()
            .flat_map(|&s| s * seq_len..(s + 1) * seq_len)
            .collect();
        let host = self.gather_host(&rows)?;
        Ok(teacher_seq_of(
            host.indices,
            host.log_probs,
            [sequences.len(), seq_len],
            self.info.k,
            device,
        ))
    }

    /// Consecutive batches of `batch_rows` rows (at least 1; the last batch shorter), in
    /// stored order, as `[N, k]` [`SparseTeacher`]s.
    pub fn batches<'a>(
        &'a self,
        batch_rows: usize,
        device: &'a Device,
    ) -> impl Iterator<Item = Result<SparseTeacher, StoreError>> + 'a {
        let step = batch_rows.max(1);
        (0..self.info.rows)
            .step_by(step)
            .map(move |r| self.batch(r..r.saturating_add(step).min(self.info.rows), device))
    }

    /// The number of sequences of `seq_len` rows in the store, if `seq_len` divides its rows.
    pub(super) fn sequences(&self, seq_len: usize) -> Result<usize, StoreError> {
        let rows = self.info.rows;
        if seq_len == 0 || !rows.is_multiple_of(seq_len) {
            return Err(DistillError::invalid(
                "seq_len",
                seq_len,
                format!("a divisor >= 1 of the store's {rows} rows (tokens per sequence)"),
            )
            .into());
        }
        Ok(rows / seq_len)
    }
}
