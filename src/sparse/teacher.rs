//! The sparse teacher: `[N, k]` (or `[B, T, k]`) indices and log-probabilities, an optional
//! mask, and the checks of its shapes.

use burn::tensor::{Bool, Int, Tensor, activation};

use crate::{DistillError, error::or_panic, softmax::check_temperature};

/// A sparse teacher: for each row (`D = 2`: `[N, k]`) or token (`D = 3`: `[B, T, k]`), `k`
/// token indices and their log-probabilities.
///
/// Rows may have fewer than `k` valid entries: mark the missing ones with a `−inf`
/// log-probability or a `false` in the optional mask (their index is then not read).
/// Log-probabilities are those of the teacher's full distribution at the generation
/// temperature, `log_softmax(z_t / T_gen)` (what an API's `logprobs` returns), not logits.
///
/// ```
/// use burn::tensor::{Device, Int, Tensor};
/// use burn_distill::SparseTeacher;
///
/// let device = Device::default();
/// // A batch of 2 sequences of 3 tokens, the teacher's top-2 at each.
/// let indices = Tensor::<3, Int>::zeros([2, 3, 2], &device);
/// let log_probs = Tensor::<3>::full([2, 3, 2], -1.0, &device);
/// let teacher = SparseTeacher::new(indices, log_probs);
/// assert_eq!(teacher.dims(), [2, 3, 2]);
/// ```
#[derive(Clone, Debug)]
pub struct SparseTeacher<const D: usize = 2> {
    pub(crate) indices: Tensor<D, Int>,
    pub(crate) log_probs: Tensor<D>,
    pub(crate) mask: Option<Tensor<D, Bool>>,
}

impl<const D: usize> SparseTeacher<D> {
    /// A teacher from `[…, k]` token indices and `[…, k]` log-probabilities (`[N, k]` rows or
    /// `[B, T, k]` sequences; the loss checks the shapes against the student's).
    pub fn new(indices: Tensor<D, Int>, log_probs: Tensor<D>) -> Self {
        Self {
            indices,
            log_probs,
            mask: None,
        }
    }

    /// Keeps only the entries where `mask` (the indices' shape) is `true`.
    pub fn with_mask(mut self, mask: Tensor<D, Bool>) -> Self {
        self.mask = Some(mask);
        self
    }

    /// `[…, k]` token indices.
    pub fn indices(&self) -> &Tensor<D, Int> {
        &self.indices
    }

    /// `[…, k]` log-probabilities.
    pub fn log_probs(&self) -> &Tensor<D> {
        &self.log_probs
    }

    /// The mask, if any.
    pub fn mask(&self) -> Option<&Tensor<D, Bool>> {
        self.mask.as_ref()
    }

    /// The shape of the indices: `[N, k]` or `[B, T, k]`.
    pub fn dims(&self) -> [usize; D] {
        self.indices.dims()
    }

    /// The teacher as `[rows, k]` (a sequence's `B·T` tokens row-major, as the loss takes the
    /// student's).
    pub(crate) fn rows(self) -> SparseTeacher<2> {
        let dims = self.dims();
        let flat = [dims[..D - 1].iter().product::<usize>(), dims[D - 1]];
        SparseTeacher {
            indices: self.indices.reshape(flat),
            log_probs: self.log_probs.reshape(flat),
            mask: self.mask.map(|m| m.reshape(flat)),
        }
    }

    /// The teacher's tensors must have the student's leading dimensions `lead` and `k ≥ 1`
    /// entries, all three of the same shape. Errors name the shapes as the caller passed them.
    pub(crate) fn check_shapes(&self, lead: &[usize]) -> Result<(), DistillError> {
        let dims = self.dims();
        if dims[..D - 1] != *lead || dims[D - 1] == 0 {
            let layout = if D == 2 { "[N, V]" } else { "[B, T, V]" };
            return Err(DistillError::invalid(
                "teacher indices",
                format!("shape {dims:?}"),
                format!(
                    "shape [{}, k] with k >= 1 (one row of entries per token of the {layout} \
                     student logits)",
                    crate::error::position(lead)
                ),
            ));
        }
        let others = [
            ("teacher log_probs", Some(self.log_probs.dims())),
            ("teacher mask", self.mask.as_ref().map(Tensor::dims)),
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
}

impl SparseTeacher<2> {
    /// The top-`k` of a dense teacher at generation temperature `T_gen`:
    /// `topk(log_softmax(z_t / T_gen))`, as an API would return them. For tests, for
    /// offline storage, and to compare sparse with dense distillation.
    ///
    /// # Panics
    /// If `k` is 0 or larger than the vocabulary, or `T_gen` is not a finite number `> 0`, at
    /// the caller's line.
    #[track_caller]
    pub fn from_logits(teacher_logits: Tensor<2>, k: usize, generation_temperature: f64) -> Self {
        or_panic(Self::try_from_logits(
            teacher_logits,
            k,
            generation_temperature,
        ))
    }

    /// [`SparseTeacher::from_logits`] that returns an error instead of panicking.
    pub fn try_from_logits(
        teacher_logits: Tensor<2>,
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

    /// The indices, and the log-probabilities as the fused kernels take them (detached): the
    /// mask folded in, a `false` entry as `−∞` (one float input instead of two); a NaN as `+∞`,
    /// which the kernels' "above 0" test makes a NaN row (a comparison with NaN is false, and
    /// the entry would pass for missing).
    pub(crate) fn kernel_inputs(&self) -> (Tensor<2, Int>, Tensor<2>) {
        let log_probs = self.log_probs.clone().detach();
        let log_probs = log_probs
            .clone()
            .mask_fill(log_probs.is_nan(), f64::INFINITY);
        let log_probs = match &self.mask {
            Some(mask) => log_probs.mask_fill(mask.clone().bool_not(), f64::NEG_INFINITY),
            None => log_probs,
        };
        (self.indices.clone(), log_probs)
    }

    /// Indices and log-probabilities on the host, row-major.
    pub(crate) fn to_host(&self) -> (Vec<i64>, Vec<f32>) {
        (
            self.indices.to_data().iter::<i64>().collect(),
            self.log_probs.to_data().iter::<f32>().collect(),
        )
    }

    /// The mask on the host, row-major, if any.
    pub(crate) fn mask_on_host(&self) -> Option<Vec<bool>> {
        self.mask
            .as_ref()
            .map(|m| m.to_data().iter::<bool>().collect())
    }
}
