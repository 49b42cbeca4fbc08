//! Distillation from a sparse teacher: the top-k log-probabilities that an API returns, or
//! that were stored offline instead of full logits.

use crate::{
    DistillError, DistillLossConfig, DistillOutput, DistillParams, Divergence, Validation,
    backend::{self, SparseSetup},
    error::or_panic,
    kernel::reference::{Probs, divergence_rows, gather_columns, mix_rows, scale_soft},
    rank::{Rank, RankTargets, TokenRank},
    reduction::{count, ignored_rows, pairwise_sum, reduce_rows},
    softmax::check_temperature,
    validation::DeviceCheck,
};
use burn::{
    config::Config,
    module::Module,
    tensor::{Bool, IndexingUpdateOp, Int, Tensor, TensorData},
};

pub(crate) use crate::tail::ROUNDING;
pub use crate::tail::{StudentSupport, TAIL_FLOOR, TailPolicy};

mod checks;
mod composed;
mod teacher;

use checks::duplicate_pairs;
pub(crate) use checks::first_bad_entry;
pub use teacher::SparseTeacher;

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
    /// Validates the configuration and builds the loss.
    ///
    /// # Panics
    /// With the message of [`SparseDistillLossConfig::try_init`]'s error, at the caller's line.
    #[track_caller]
    pub fn init(&self) -> SparseDistillLoss {
        or_panic(self.try_init())
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
/// use burn::tensor::{Device, Int, Tensor};
/// use burn_distill::{DistillLossConfig, SparseDistillLossConfig, SparseTeacher};
///
/// let device = Device::default().autodiff();
/// let student = Tensor::<2>::from_floats([[1.0, 2.0, 0.5, -1.0]], &device).require_grad();
/// // The API's top-2: tokens 1 and 0 with their log-probabilities.
/// let teacher = SparseTeacher::new(
///     Tensor::<2, Int>::from_ints([[1, 0]], &device),
///     Tensor::<2>::from_floats([[-0.2, -2.0]], &device),
/// );
/// let targets = Tensor::<1, Int>::from_ints([1], &device);
///
/// let loss = SparseDistillLossConfig::new(DistillLossConfig::new().with_alpha(0.9)).init();
/// let value = loss.forward(student.clone(), teacher, targets);
/// let grads = value.backward();
/// let grad = student.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
/// // 0.9 · KL(p‖q) over (token 0, token 1, tail) + 0.1 · CE, by hand in f64: p = (e^−2,
/// // e^−0.2, 1 − e^−2 − e^−0.2), q = the student's softmax on them (tokens 2 and 3 pooled).
/// assert!((value.into_scalar::<f32>() - 0.152_341).abs() < 1e-5);
/// // The gradient reaches every logit (the tail's through the bucket), and sums to 0.
/// assert!(grad[3] > 0.0 && grad.iter().sum::<f32>().abs() < 1e-6, "{grad:?}");
/// ```
///
/// It is a (parameter-free) burn [`Module`](burn::module::Module), like
/// [`DistillLoss`](crate::DistillLoss).
#[derive(Module, Debug)]
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
    /// The tail policy and generation temperature of this loss.
    pub(crate) fn setup(&self) -> SparseSetup {
        SparseSetup::new(self.tail, self.generation_temperature)
    }

    /// The validated parameters shared with the dense loss.
    pub fn params(&self) -> &DistillParams {
        &self.dense.params
    }

    /// The tail policy.
    pub fn tail(&self) -> TailPolicy {
        self.tail
    }

    /// Full loss of `[N, V]` student logits against a `[N, k]` sparse teacher and `[N]`
    /// targets. Returns `[1]` (`Mean`, `Sum`, `Normalized`) or `[N]` (`PerRow`).
    ///
    /// # Panics
    /// On bad input, with the message of [`SparseDistillLoss::try_forward`], at the caller's
    /// line.
    #[track_caller]
    pub fn forward(
        &self,
        student_logits: Tensor<2>,
        teacher: SparseTeacher<2>,
        targets: Tensor<1, Int>,
    ) -> Tensor<1> {
        or_panic(self.try_forward(student_logits, teacher, targets))
    }

    /// [`SparseDistillLoss::forward`] that returns an error instead of panicking.
    pub fn try_forward(
        &self,
        student_logits: Tensor<2>,
        teacher: SparseTeacher<2>,
        targets: Tensor<1, Int>,
    ) -> Result<Tensor<1>, DistillError> {
        self.parts(student_logits, teacher, Some(targets))
            .map(|out| out.loss)
    }

    /// Soft term only: every row counts.
    ///
    /// # Panics
    /// As [`SparseDistillLoss::forward`].
    #[track_caller]
    pub fn forward_soft(&self, student_logits: Tensor<2>, teacher: SparseTeacher<2>) -> Tensor<1> {
        or_panic(self.try_forward_soft(student_logits, teacher))
    }

    /// [`SparseDistillLoss::forward_soft`] that returns an error instead of panicking.
    pub fn try_forward_soft(
        &self,
        student_logits: Tensor<2>,
        teacher: SparseTeacher<2>,
    ) -> Result<Tensor<1>, DistillError> {
        self.parts(student_logits, teacher, None)
            .map(|out| out.loss)
    }

    /// The loss and its soft and hard parts from one computation; `targets` `None` for the
    /// soft term alone.
    ///
    /// # Panics
    /// As [`SparseDistillLoss::forward`].
    #[track_caller]
    pub fn forward_parts(
        &self,
        student_logits: Tensor<2>,
        teacher: SparseTeacher<2>,
        targets: Option<Tensor<1, Int>>,
    ) -> DistillOutput {
        or_panic(self.try_forward_parts(student_logits, teacher, targets))
    }

    /// [`SparseDistillLoss::forward_parts`] that returns an error instead of panicking.
    pub fn try_forward_parts(
        &self,
        student_logits: Tensor<2>,
        teacher: SparseTeacher<2>,
        targets: Option<Tensor<1, Int>>,
    ) -> Result<DistillOutput, DistillError> {
        self.parts(student_logits, teacher, targets)
    }

    /// Sequence form: `[B, T, V]` student logits, a `[B, T, k]` teacher and `[B, T]` targets
    /// (prompt and padding tokens set to the ignore index). Errors name positions and shapes
    /// as the caller passed them.
    ///
    /// # Panics
    /// As [`SparseDistillLoss::forward`].
    #[track_caller]
    pub fn forward_seq(
        &self,
        student_logits: Tensor<3>,
        teacher: SparseTeacher<3>,
        targets: Tensor<2, Int>,
    ) -> Tensor<1> {
        or_panic(self.try_forward_seq(student_logits, teacher, targets))
    }

    /// [`SparseDistillLoss::forward_seq`] that returns an error instead of panicking.
    pub fn try_forward_seq(
        &self,
        student_logits: Tensor<3>,
        teacher: SparseTeacher<3>,
        targets: Tensor<2, Int>,
    ) -> Result<Tensor<1>, DistillError> {
        self.parts(student_logits, teacher, Some(targets))
            .map(|out| out.loss)
    }

    /// Sequence form of [`SparseDistillLoss::forward_soft`].
    ///
    /// # Panics
    /// As [`SparseDistillLoss::forward`].
    #[track_caller]
    pub fn forward_seq_soft(
        &self,
        student_logits: Tensor<3>,
        teacher: SparseTeacher<3>,
    ) -> Tensor<1> {
        or_panic(self.try_forward_seq_soft(student_logits, teacher))
    }

    /// [`SparseDistillLoss::forward_seq_soft`] that returns an error instead of panicking.
    pub fn try_forward_seq_soft(
        &self,
        student_logits: Tensor<3>,
        teacher: SparseTeacher<3>,
    ) -> Result<Tensor<1>, DistillError> {
        self.parts(student_logits, teacher, None)
            .map(|out| out.loss)
    }

    /// Sequence form of [`SparseDistillLoss::forward_parts`].
    ///
    /// # Panics
    /// As [`SparseDistillLoss::forward`].
    #[track_caller]
    pub fn forward_seq_parts(
        &self,
        student_logits: Tensor<3>,
        teacher: SparseTeacher<3>,
        targets: Option<Tensor<2, Int>>,
    ) -> DistillOutput {
        or_panic(self.try_forward_seq_parts(student_logits, teacher, targets))
    }

    /// [`SparseDistillLoss::forward_seq_parts`] that returns an error instead of panicking.
    pub fn try_forward_seq_parts(
        &self,
        student_logits: Tensor<3>,
        teacher: SparseTeacher<3>,
        targets: Option<Tensor<2, Int>>,
    ) -> Result<DistillOutput, DistillError> {
        self.parts(student_logits, teacher, targets)
    }

    /// Every form, at either rank: shapes checked as the caller passed them, then the tokens
    /// taken as rows.
    fn parts<const D: usize>(
        &self,
        student_logits: Tensor<D>,
        teacher: SparseTeacher<D>,
        targets: Option<RankTargets<D>>,
    ) -> Result<DistillOutput, DistillError>
    where
        Rank<D>: TokenRank,
    {
        let dims = student_logits.dims();
        crate::rank::non_empty("student_logits", dims)?;
        let lead = &dims[..D - 1];
        teacher.check_shapes(lead)?;
        let targets = targets
            .map(|t| <Rank<D> as TokenRank>::flat_targets(t, lead))
            .transpose()?;
        let v = dims[D - 1];
        let target_check = self.dense.check_targets(targets.as_ref(), v, lead)?;
        let student = self.dense.soft_cap(crate::rank::flat_rows(student_logits));
        self.rows_parts(student, teacher.rows(), targets, lead.to_vec())
            .map(|out| out.with_check(target_check))
    }

    /// The loss of `[N, V]` rows against an `[N, k]` teacher; `lead` is the caller's shape of
    /// the rows (for the teacher's errors).
    fn rows_parts(
        &self,
        student_logits: Tensor<2>,
        teacher: SparseTeacher<2>,
        targets: Option<Tensor<1, Int>>,
        lead: Vec<usize>,
    ) -> Result<DistillOutput, DistillError> {
        let v = student_logits.dims()[1];
        let ignored = ignored_rows(targets.as_ref(), self.dense.params.ignore_index);
        let fused = backend::sparse(
            student_logits.clone(),
            teacher.kernel_inputs(),
            targets.clone(),
            &self.dense.params,
            self.setup(),
            self.dense.kernel,
        )?;
        // The teacher's check: the fused kernels find bad entries themselves (the row is NaN),
        // so a NaN loss is all there is to count; the composed path counts with tensor ops.
        let checked = self.dense.validation != Validation::Off;
        let (output, bad) = match fused {
            Some(parts) => {
                let output = DistillOutput::from(parts);
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
                let output = DistillOutput::from(backend::DistillParts {
                    loss: reduce(rows.loss),
                    soft: reduce(rows.soft),
                    hard: rows.hard.map(reduce),
                });
                (output, bad)
            }
        };
        let teacher_check = match bad {
            None => None,
            Some(bad) => {
                let tail = self.tail;
                DeviceCheck::new(bad, move |_| {
                    first_bad_entry(&teacher, ignored.clone(), v, tail, &lead)
                })
                .apply(self.dense.validation)?
            }
        };
        Ok(output.with_check(teacher_check))
    }
}
