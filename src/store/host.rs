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
pub(super) fn teacher_of<B: Backend>(
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
