//! The sparse teacher: `[N, k]` indices and log-probabilities, an optional mask, and the
//! checks of its shapes.

use super::*;

/// A sparse teacher: for each of `N` rows, `k` token indices and their log-probabilities.
///
/// Rows may have fewer than `k` valid entries: mark the missing ones with a `−inf`
/// log-probability or a `false` in the optional mask (their index is then not read).
/// Log-probabilities are those of the teacher's full distribution at the generation
/// temperature, `log_softmax(z_t / T_gen)` (what an API's `logprobs` returns), not logits.
#[derive(Clone, Debug)]
pub struct SparseTeacher<B: Backend> {
    pub(crate) indices: Tensor<B, 2, Int>,
    pub(crate) log_probs: Tensor<B, 2>,
    pub(crate) mask: Option<Tensor<B, 2, Bool>>,
}

impl<B: Backend> SparseTeacher<B> {
    /// A teacher from `[N, k]` token indices and `[N, k]` log-probabilities.
    pub fn new(indices: Tensor<B, 2, Int>, log_probs: Tensor<B, 2>) -> Self {
        Self {
            indices,
            log_probs,
            mask: None,
        }
    }

    /// A teacher from `[B, T, k]` sequences, flattened to `B·T` rows (row-major, as
    /// [`SparseDistillLoss::forward_seq`] flattens the student).
    ///
    /// # Panics
    /// If the two shapes differ, with the message of [`SparseTeacher::try_from_seq`].
    pub fn from_seq(indices: Tensor<B, 3, Int>, log_probs: Tensor<B, 3>) -> Self {
        or_panic(Self::try_from_seq(indices, log_probs))
    }

    /// [`SparseTeacher::from_seq`] that returns an error instead of panicking.
    pub fn try_from_seq(
        indices: Tensor<B, 3, Int>,
        log_probs: Tensor<B, 3>,
    ) -> Result<Self, DistillError> {
        let [b, t, k] = indices.dims();
        let note = " (batch, sequence, top-k)";
        crate::error::same_dims("log_probs", log_probs.dims(), "indices", [b, t, k], note)?;
        Ok(Self::new(
            indices.reshape([b * t, k]),
            log_probs.reshape([b * t, k]),
        ))
    }

    /// Keeps only the entries where `mask` (`[N, k]`) is `true`.
    pub fn with_mask(mut self, mask: Tensor<B, 2, Bool>) -> Self {
        self.mask = Some(mask);
        self
    }

    /// The top-`k` of a dense teacher at generation temperature `T_gen`:
    /// `topk(log_softmax(z_t / T_gen))`, as an API would return them. For tests, for
    /// offline storage, and to compare sparse with dense distillation.
    ///
    /// # Panics
    /// If `k` is 0 or larger than the vocabulary, or `T_gen` is not a finite number `> 0`.
    pub fn from_logits(
        teacher_logits: Tensor<B, 2>,
        k: usize,
        generation_temperature: f64,
    ) -> Self {
        or_panic(Self::try_from_logits(
            teacher_logits,
            k,
            generation_temperature,
        ))
    }

    /// [`SparseTeacher::from_logits`] that returns an error instead of panicking.
    pub fn try_from_logits(
        teacher_logits: Tensor<B, 2>,
        k: usize,
        generation_temperature: f64,
    ) -> Result<Self, DistillError> {
        check_temperature("generation_temperature", generation_temperature)?;
        let v = teacher_logits.dims()[1];
        if k == 0 || k > v {
            return Err(DistillError::invalid(
                "k",
                k,
                format!("a number of tokens in [1, {v}] (the teacher's vocabulary)"),
            ));
        }
        let log_p = activation::log_softmax(
            teacher_logits
                .detach()
                .mul_scalar(generation_temperature.recip()),
            1,
        );
        let (log_probs, indices) = log_p.topk_with_indices(k, 1);
        Ok(Self::new(indices, log_probs))
    }

    /// Indices and log-probabilities on the host, row-major.
    pub(crate) fn to_host(&self) -> (Vec<i64>, Vec<f32>) {
        fn host<E: burn::tensor::Element>(data: burn::tensor::TensorData) -> Vec<E> {
            data.convert::<E>().to_vec().expect("values converted to E")
        }
        (host(self.indices.to_data()), host(self.log_probs.to_data()))
    }

    /// The mask on the host, row-major, if any.
    pub(crate) fn mask_on_host(&self) -> Option<Vec<bool>> {
        self.mask
            .as_ref()
            .map(|m| m.to_data().iter::<bool>().collect())
    }

    /// `[N, k]` token indices.
    pub fn indices(&self) -> &Tensor<B, 2, Int> {
        &self.indices
    }

    /// `[N, k]` log-probabilities.
    pub fn log_probs(&self) -> &Tensor<B, 2> {
        &self.log_probs
    }

    /// `[N, k]`: rows and entries per row.
    pub fn dims(&self) -> [usize; 2] {
        self.indices.dims()
    }
}

/// The teacher's tensors must be `[N, k]` with `k ≥ 1`, all three of the same shape.
pub(super) fn check_shapes<B: Backend>(
    teacher: &SparseTeacher<B>,
    rows: usize,
) -> Result<(), DistillError> {
    let dims = teacher.dims();
    if dims[0] != rows || dims[1] == 0 {
        return Err(DistillError::invalid(
            "teacher indices",
            format!("shape {dims:?}"),
            format!("shape [{rows}, k] with k >= 1 (one row per row of the student logits)"),
        ));
    }
    let others = [
        ("teacher log_probs", Some(teacher.log_probs.dims())),
        ("teacher mask", teacher.mask.as_ref().map(Tensor::dims)),
    ];
    for (argument, shape) in others {
        if let Some(shape) = shape
            && shape != dims
        {
            return Err(DistillError::invalid(
                argument,
                format!("shape {shape:?}"),
                format!("the shape of the teacher indices {dims:?}"),
            ));
        }
    }
    Ok(())
}
