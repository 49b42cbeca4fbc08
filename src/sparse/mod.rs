//! Distillation from a sparse teacher: the top-k log-probabilities that an API returns, or
//! that were stored offline instead of full logits.

use crate::{
    DistillBackend, DistillError, DistillLossConfig, DistillOutput, DistillParams, Divergence,
    Kernel, SparseCall, Validation,
    backend::{SparseInputs, SparseSetup},
    error::{non_empty, or_panic, panicking},
    kernel::reference::{Probs, divergence_rows, gather_columns, mix_rows, scale_soft},
    rank::{Rank, RankTargets, TokenRank, flatten},
    reduction::{count, ignored_rows, pairwise_sum, reduce_rows},
    softmax::check_temperature,
    validation::DeviceCheck,
};
use burn::{
    config::Config,
    module::Module,
    tensor::{Bool, IndexingUpdateOp, Int, Tensor, TensorData, activation, backend::Backend},
};

pub(crate) use crate::tail::ROUNDING;
pub use crate::tail::{StudentSupport, TAIL_FLOOR, TailPolicy};

mod checks;
mod composed;
mod teacher;

use checks::duplicate_pairs;
pub(crate) use checks::first_bad_entry;
pub use teacher::SparseTeacher;
use teacher::check_shapes;

/// Configuration of a [`SparseDistillLoss`].
///
/// The dense loss's settings (temperature `T`, `α`, divergence, `T²` scaling, ignore index,
/// label smoothing, reduction, input checks) come from a [`DistillLossConfig`].
///
/// ```
/// use burn_distill::{DistillLossConfig, SparseDistillLossConfig, StudentSupport, TailPolicy};
///
/// let loss = SparseDistillLossConfig::new(DistillLossConfig::new().with_temperature(2.0))
///     .with_tail(TailPolicy::Renormalize { student: StudentSupport::TopK })
///     .with_generation_temperature(1.0)
///     .init();
/// assert_eq!(loss.params().temperature(), 2.0);
/// ```
#[derive(Config, Debug)]
pub struct SparseDistillLossConfig {
    /// The settings shared with the dense loss. `kernel` picks the fused sparse kernel or the
    /// composed reference; `vocab_mismatch` does not apply. A `logit_softcap` `c` caps the
    /// student's logits, `z ← c · tanh(z / c)`, before the loss (the teacher's log-probabilities
    /// are taken as given: store those of the capped teacher).
    pub loss: DistillLossConfig,
    /// What to do with the teacher's missing mass.
    #[config(default = "TailPolicy::TailBucket")]
    pub tail: TailPolicy,
    /// The temperature `T_gen` at which the teacher's log-probabilities were produced; they
    /// are re-tempered to the distillation temperature `T` as `p ∝ exp(ℓ · T_gen / T)`.
    #[config(default = 1.0)]
    pub generation_temperature: f64,
}

impl SparseDistillLossConfig {
    panicking! {
        /// Validates the configuration and builds the loss.
        ///
        /// # Panics
        /// With the message of [`SparseDistillLossConfig::try_init`]'s error.
        pub fn init(&self) -> SparseDistillLoss {
            self.try_init()
        }
    }

    /// Validates the configuration and builds the loss, or says which value is wrong.
    pub fn try_init(&self) -> Result<SparseDistillLoss, DistillError> {
        let dense = self.loss.try_init()?;
        check_temperature("generation_temperature", self.generation_temperature)?;
        let divergence = dense.params().divergence();
        if self.tail
            == (TailPolicy::Renormalize {
                student: StudentSupport::FullVocab,
            })
            && divergence != Divergence::ForwardKl
        {
            return Err(DistillError::invalid(
                "divergence",
                format!("{divergence:?} with TailPolicy::Renormalize {{ student: FullVocab }}"),
                "Divergence::ForwardKl (the student's full-vocabulary probabilities do not sum \
                 to one over the top-k), or StudentSupport::TopK / TailPolicy::TailBucket",
            ));
        }
        Ok(SparseDistillLoss {
            tail: self.tail,
            generation_temperature: self.generation_temperature,
            dense,
        })
    }
}

/// The distillation loss against a [`SparseTeacher`] (top-k log-probabilities).
///
/// For each row `i` with student logits `z`, valid teacher entries `K` (indices and
/// log-probabilities `ℓ_j` at `T_gen`), `r = T_gen / T` and target `y_i`:
///
/// ```text
/// z ← c · tanh(z / c)         (only with a logit_softcap c)
/// Renormalize { FullVocab }:  p_j = softmax_K(r·ℓ)_j,  log q_j = log softmax_V(z / T)_j    (j ∈ K)
/// Renormalize { TopK }:       p_j = softmax_K(r·ℓ)_j,  q_j = softmax_K(z / T)_j            (j ∈ K)
/// TailBucket:                 p = softmax(r·ℓ_1, …, r·ℓ_k, r·log(1 − Σ_K exp ℓ))
///                             q = (softmax_V(z / T)_j for j ∈ K,  Σ_{v∉K} softmax_V(z / T)_v)
/// soft_i = D(p, q) · T²       (T² only if scale_by_t2; D: see Divergence)
/// row_i  = α · soft_i + (1 − α) · hard_i      (hard_i as in DistillLoss)
/// ```
///
/// The gradient reaches all `V` student logits (through `log softmax_V` and the tail mass).
/// Rows whose target is the ignore index are `0` and leave the mean, as in
/// [`DistillLoss`](crate::DistillLoss).
///
/// ```
/// use burn::backend::{Autodiff, NdArray};
/// use burn::tensor::{Int, Tensor};
/// use burn_distill::{DistillLossConfig, SparseDistillLossConfig, SparseTeacher};
///
/// type B = Autodiff<NdArray>;
/// let device = Default::default();
/// let student = Tensor::<B, 2>::from_floats([[1.0, 2.0, 0.5, -1.0]], &device).require_grad();
/// // The API's top-2: tokens 1 and 0 with their log-probabilities.
/// let teacher = SparseTeacher::new(
///     Tensor::<B, 2, Int>::from_ints([[1, 0]], &device),
///     Tensor::<B, 2>::from_floats([[-0.2, -2.0]], &device),
/// );
/// let targets = Tensor::<B, 1, Int>::from_ints([1], &device);
///
/// let loss = SparseDistillLossConfig::new(DistillLossConfig::new().with_alpha(0.9)).init();
/// let value = loss.forward(student.clone(), teacher, targets);
/// let grads = value.backward();
/// assert!(value.into_scalar() > 0.0);
/// assert_eq!(student.grad(&grads).unwrap().dims(), [1, 4]);
/// ```
///
/// It is a (parameter-free) burn [`Module`](burn::module::Module), like
/// [`DistillLoss`](crate::DistillLoss).
#[derive(Module, Clone, Debug)]
pub struct SparseDistillLoss {
    #[module(skip)]
    pub(crate) tail: TailPolicy,
    #[module(skip)]
    generation_temperature: f64,
    /// The dense loss of the same configuration: its parameters, validation mode, kernel
    /// choice and fused-linear chunk settings.
    #[module(skip)]
    pub(crate) dense: crate::DistillLoss,
}

impl SparseDistillLoss {
    /// `teacher` as a kernel's inputs (detached), read with this loss's tail policy and `T_gen`.
    pub(crate) fn sparse_inputs<B: Backend>(&self, teacher: &SparseTeacher<B>) -> SparseInputs<B> {
        SparseInputs {
            indices: teacher.indices.clone().into_primitive(),
            log_probs: teacher.log_probs.clone().detach().into_primitive().tensor(),
            mask: teacher.mask.clone().map(Tensor::into_primitive),
            setup: SparseSetup::new(self.tail, self.generation_temperature),
        }
    }

    /// The teacher's tensors must be `[rows, k]`.
    pub(crate) fn check_teacher_shapes<B: Backend>(
        &self,
        teacher: &SparseTeacher<B>,
        rows: usize,
    ) -> Result<(), DistillError> {
        check_shapes(teacher, rows)
    }

    /// The validated parameters shared with the dense loss.
    pub fn params(&self) -> &DistillParams {
        &self.dense.params
    }

    /// The tail policy.
    pub fn tail(&self) -> TailPolicy {
        self.tail
    }

    panicking! {
        /// Full loss of `[N, V]` student logits against a sparse teacher with `N` rows and `[N]`
        /// targets. Returns `[1]` (`Mean`, `Sum`, `Normalized`) or `[N]` (`PerRow`).
        ///
        /// # Panics
        /// On bad input, with the message of [`SparseDistillLoss::try_forward_parts`].
        pub fn forward<B: DistillBackend>(&self, student_logits: Tensor<B, 2>,
            teacher: SparseTeacher<B>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
            self.try_forward_parts(student_logits, teacher, Some(targets)).loss
        }

        /// Soft term only: every row counts.
        ///
        /// # Panics
        /// As [`SparseDistillLoss::forward`].
        pub fn forward_soft<B: DistillBackend>(&self, student_logits: Tensor<B, 2>,
            teacher: SparseTeacher<B>) -> Tensor<B, 1> {
            self.try_forward_parts(student_logits, teacher, None).loss
        }

        /// Sequence form: `[B, T, V]` student logits, a teacher of `B·T` rows (see
        /// [`SparseTeacher::from_seq`]) and `[B, T]` targets (prompt and padding tokens set to the
        /// ignore index).
        ///
        /// # Panics
        /// As [`SparseDistillLoss::forward`].
        pub fn forward_seq<B: DistillBackend>(&self, student_logits: Tensor<B, 3>,
            teacher: SparseTeacher<B>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
            self.try_forward_parts(student_logits, teacher, Some(targets)).loss
        }
    }

    /// The loss with its soft and hard parts, or an error naming the bad argument.
    ///
    /// # Shapes
    /// - rows (`D = 2`): `[N, V]` student logits, a teacher of `N` rows, optional `[N]`
    ///   targets;
    /// - sequences (`D = 3`): `[B, T, V]` student logits, a teacher of `B·T` rows (see
    ///   [`SparseTeacher::from_seq`]), optional `[B, T]` targets, taken as `B·T` token rows;
    /// - output: `[1]`, or `[N]` (`[B·T]`, row-major) for `PerRow`.
    pub fn try_forward_parts<B: DistillBackend, const D: usize>(
        &self,
        student_logits: Tensor<B, D>,
        teacher: SparseTeacher<B>,
        targets: Option<RankTargets<B, D>>,
    ) -> Result<DistillOutput<B>, DistillError>
    where
        Rank<D>: TokenRank<B>,
    {
        let (student_logits, targets) = flatten(student_logits, targets)?;
        let [n, v] = student_logits.dims();
        non_empty("student_logits", [n, v], "V")?;
        check_shapes(&teacher, n)?;
        let student_logits = self.dense.soft_cap(student_logits);
        let target_check = self.dense.check_targets(targets.as_ref(), [n, v])?;
        let ignored = ignored_rows(targets.as_ref(), self.dense.params.ignore_index);
        let fused = match self.dense.kernel {
            Kernel::Reference => None,
            _ => B::distill_sparse_fused(SparseCall::new(
                student_logits.clone().into_primitive().tensor(),
                self.sparse_inputs(&teacher),
                targets.clone().map(Tensor::into_primitive),
                self.dense.params,
            )),
        };
        if fused.is_none() && self.dense.kernel == Kernel::Fused {
            return Err(DistillError::invalid(
                "kernel",
                "Kernel::Fused",
                format!(
                    "Kernel::Auto or Kernel::Reference: backend {} has no fused \
                     sparse-teacher kernel for {:?} logits",
                    B::name(&student_logits.device()),
                    student_logits.dtype()
                ),
            ));
        }
        // The teacher's check: the fused kernels find bad entries themselves (the row is NaN),
        // so a NaN loss is all there is to count; the composed path counts with tensor ops.
        let checked = self.dense.validation != Validation::Off;
        let (output, bad) = match fused {
            Some(out) => {
                let output = DistillOutput::from(out.parts);
                // The soft term too: with α = 0 a row without a valid entry leaves the loss
                // finite.
                let bad = checked.then(|| {
                    count(output.loss.clone().is_nan()) + count(output.soft.clone().is_nan())
                });
                (output, bad)
            }
            None => {
                let bad = checked.then(|| self.bad_entries(&teacher, ignored.clone(), v));
                let (soft, broken) = self.soft_rows(student_logits.clone(), teacher.clone());
                let mut rows = mix_rows(soft, student_logits, targets, &self.dense.params);
                // A kept row whose teacher is not a distribution is NaN whole (whatever α), as
                // in the fused kernels, with a zero gradient.
                let broken = match &ignored {
                    Some(ignored) => broken.bool_and(ignored.clone().bool_not()),
                    None => broken,
                };
                rows.loss = rows.loss.mask_fill(broken.clone(), f64::NAN);
                rows.hard = rows.hard.map(|h| h.mask_fill(broken, f64::NAN));
                let reduce = |t| reduce_rows(t, ignored.clone(), self.dense.params.reduction);
                let output = DistillOutput {
                    loss: reduce(rows.loss),
                    soft: reduce(rows.soft),
                    hard: rows.hard.map(reduce),
                    checks: Vec::new(),
                };
                (output, bad)
            }
        };
        let teacher_check = match bad {
            None => None,
            Some(bad) => {
                let tail = self.tail;
                DeviceCheck::new(bad, move |_| {
                    first_bad_entry(&teacher, ignored.clone(), v, tail)
                })
                .apply(self.dense.validation)?
            }
        };
        Ok(output.with_check(target_check).with_check(teacher_check))
    }
}
