//! Decoded rows on the host, the read-ahead thread, and burn `Dataset` / `Batcher` over a
//! store.

use super::*;

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
    /// The rows as an `[N, k]` [`SparseTeacher`] on `device`.
    pub fn to_teacher(self, device: &Device) -> SparseTeacher {
        teacher_of(self.indices, self.log_probs, self.rows, self.k, device)
    }

    /// The rows as a `[B, T, k]` [`SparseTeacher`] of `B` sequences of `T` tokens on `device`
    /// (`shape = [B, T]`, with `B·T` the rows: the tokens of a sequence one after the other).
    ///
    /// ```
    /// use burn::tensor::Device;
    /// use burn_distill::store::HostTeacher;
    ///
    /// let host = HostTeacher {
    ///     rows: 4,
    ///     k: 1,
    ///     indices: vec![3, 1, 4, 1],
    ///     log_probs: vec![-0.5, -1.0, -1.5, -2.0],
    /// };
    /// let err = host.clone().to_teacher_seq([3, 2], &Device::default()).unwrap_err();
    /// assert_eq!(
    ///     err.to_string(),
    ///     "invalid shape: got [3, 2], expected [B, T] with B·T = 4 (the rows of the host teacher)"
    /// );
    /// let teacher = host.to_teacher_seq([2, 2], &Device::default()).unwrap();
    /// assert_eq!(teacher.dims(), [2, 2, 1]);
    /// ```
    pub fn to_teacher_seq(
        self,
        shape: [usize; 2],
        device: &Device,
    ) -> Result<SparseTeacher<3>, StoreError> {
        let [b, t] = shape;
        if b.checked_mul(t) != Some(self.rows) {
            return Err(DistillError::invalid(
                "shape",
                format!("{shape:?}"),
                format!(
                    "[B, T] with B·T = {} (the rows of the host teacher)",
                    self.rows
                ),
            )
            .into());
        }
        Ok(teacher_seq_of(
            self.indices,
            self.log_probs,
            shape,
            self.k,
            device,
        ))
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
    pub(super) receiver: Option<std::sync::mpsc::Receiver<Result<HostTeacher, StoreError>>>,
    pub(super) worker: Option<std::thread::JoinHandle<()>>,
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
pub(super) fn teacher_of(
    indices: Vec<i64>,
    log_probs: Vec<f32>,
    rows: usize,
    k: usize,
    device: &Device,
) -> SparseTeacher {
    SparseTeacher::new(
        Tensor::<2, Int>::from_data(TensorData::new(indices, [rows, k]), device),
        Tensor::<2>::from_data(TensorData::new(log_probs, [rows, k]), device),
    )
}

/// [`teacher_of`] for `[B, T]` tokens: a `[B, T, k]` teacher.
pub(super) fn teacher_seq_of(
    indices: Vec<i64>,
    log_probs: Vec<f32>,
    [b, t]: [usize; 2],
    k: usize,
    device: &Device,
) -> SparseTeacher<3> {
    SparseTeacher::new(
        Tensor::<3, Int>::from_data(TensorData::new(indices, [b, t, k]), device),
        Tensor::<3>::from_data(TensorData::new(log_probs, [b, t, k]), device),
    )
}

/// A store as a burn `Dataset`: item `i` holds rows `[i·T, (i+1)·T)` (the teacher of the
/// `i`-th sequence of `T` tokens of the token dataset it was written from, in that order),
/// decoded as one range (chunk by chunk, not row by row). Pair it with the token dataset by
/// [`AlignedDataset`] and batch the teacher with [`TeacherBatcher`] (`[B·T, k]` rows) or
/// [`TeacherSeqBatcher`] (`[B, T, k]` sequences); burn's data loaders then decode on their
/// worker threads, beside the training step.
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
    /// # Errors
    /// On a damaged chunk: a `DatasetError` whose
    /// [`source`](std::error::Error::source) is the [`StoreError`] (downcast it to match).
    ///
    /// # Panics
    /// If `index >= len()` (burn's `Dataset` contract, as a slice's indexing), at the
    /// caller's line.
    #[track_caller]
    fn get(&self, index: usize) -> Result<HostTeacher, burn::data::dataset::DatasetError> {
        let (k, t) = (self.store.info().k, self.rows_per_item);
        let len = self.len();
        if index >= len {
            panic!(
                "burn-distill: teacher store item {index} is out of range: the store holds \
                 {len} items of {t} rows"
            );
        }
        let start = index * t;
        let mut out = HostTeacher {
            rows: t,
            k,
            indices: Vec::with_capacity(t * k),
            log_probs: Vec::with_capacity(t * k),
        };
        self.store
            .read_into(start..start + t, &mut out.indices, &mut out.log_probs)
            .map_err(burn::data::dataset::DatasetError::new)?;
        Ok(out)
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
    /// # Errors
    /// The token dataset's error, or the teacher's (see [`TeacherStoreDataset`]).
    ///
    /// # Panics
    /// If `index >= len()` (burn's `Dataset` contract).
    #[track_caller]
    fn get(&self, index: usize) -> Result<(I, HostTeacher), burn::data::dataset::DatasetError> {
        Ok((self.tokens.get(index)?, self.teacher.get(index)?))
    }

    fn len(&self) -> usize {
        self.tokens.len()
    }
}

/// Batches [`HostTeacher`] items into one `[N, k]` [`SparseTeacher`] (their rows one after the
/// other, as the token batcher stacks the sequences: `N = B·T`).
#[cfg(feature = "dataset")]
#[derive(Clone, Copy, Debug, Default)]
pub struct TeacherBatcher;

#[cfg(feature = "dataset")]
impl burn::data::dataloader::batcher::Batcher<HostTeacher, SparseTeacher> for TeacherBatcher {
    /// # Panics
    /// On no items, or items of different `k` (one store gives one `k`).
    fn batch(&self, items: Vec<HostTeacher>, device: &Device) -> SparseTeacher {
        HostTeacher::concat(items)
            .expect("burn-distill: a teacher batch of items of one store (at least one, one k)")
            .to_teacher(device)
    }
}

/// Batches [`HostTeacher`] items of `T` rows each (the sequences of a [`TeacherStoreDataset`])
/// into one `[B, T, k]` [`SparseTeacher`], for the sequence forms of the losses
/// ([`SparseDistillLoss::forward_seq`](crate::SparseDistillLoss::forward_seq)).
#[cfg(feature = "dataset")]
#[derive(Clone, Copy, Debug, Default)]
pub struct TeacherSeqBatcher;

#[cfg(feature = "dataset")]
impl burn::data::dataloader::batcher::Batcher<HostTeacher, SparseTeacher<3>> for TeacherSeqBatcher {
    /// # Panics
    /// On no items, or items of different `k` or rows (one store gives one `k`, a
    /// [`TeacherStoreDataset`] one length).
    fn batch(&self, items: Vec<HostTeacher>, device: &Device) -> SparseTeacher<3> {
        let (b, t) = (items.len(), items.first().map_or(0, |item| item.rows));
        let ragged = items
            .iter()
            .find(|item| item.rows != t)
            .map(|item| item.rows);
        if let Some(rows) = ragged {
            panic!(
                "burn-distill: a teacher batch of sequences of one length, got items of {t} and \
                 {rows} rows"
            );
        }
        HostTeacher::concat(items)
            .expect("burn-distill: a teacher batch of items of one store (at least one, one k)")
            .to_teacher_seq([b, t], device)
            .expect("B items of T rows are B·T rows")
    }
}
