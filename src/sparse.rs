//! Distillation from a sparse teacher: the top-k log-probabilities that an API returns, or
//! that were stored offline instead of full logits.

use crate::{
    DistillBackend, DistillError, DistillLossConfig, DistillOutput, DistillParams, Divergence,
    Kernel, Validation,
    backend::{SparseInputs, SparseSetup},
    error::or_panic,
    kernel::reference::{divergence_rows, mix_rows, scale_soft},
    loss::{check_row_targets, check_seq_targets},
    reduction::{ignored_rows, reduce_rows},
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
        if log_probs.dims() != [b, t, k] {
            return Err(DistillError::invalid(
                "log_probs",
                format!("shape {:?}", log_probs.dims()),
                format!("the indices shape [{b}, {t}, {k}] (batch, sequence, top-k)"),
            ));
        }
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
        let indices = self
            .indices
            .to_data()
            .convert::<i64>()
            .to_vec()
            .expect("i64 indices");
        let log_probs = self
            .log_probs
            .to_data()
            .convert::<f32>()
            .to_vec()
            .expect("f32 values");
        (indices, log_probs)
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
    /// With the message of [`SparseDistillLossConfig::try_init`]'s error.
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
            params: *dense.params(),
            validation: self.loss.validation,
            tail: self.tail,
            generation_temperature: self.generation_temperature,
            kernel: self.loss.kernel,
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
/// It is a (parameter-free) burn [`Module`](burn::module::Module), like [`DistillLoss`](crate::DistillLoss).
#[derive(Module, Clone, Debug)]
pub struct SparseDistillLoss {
    #[module(skip)]
    pub(crate) params: DistillParams,
    #[module(skip)]
    pub(crate) validation: Validation,
    #[module(skip)]
    pub(crate) tail: TailPolicy,
    #[module(skip)]
    generation_temperature: f64,
    #[module(skip)]
    pub(crate) kernel: Kernel,
    /// The dense loss of the same configuration (the fused-linear chunk settings).
    #[module(skip)]
    pub(crate) dense: crate::DistillLoss,
}

impl SparseDistillLoss {
    /// The settings of the sparse kernels.
    pub(crate) fn sparse_setup(&self) -> SparseSetup {
        SparseSetup {
            tail: self.tail,
            generation_temperature: self.generation_temperature,
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
        &self.params
    }

    /// The tail policy.
    pub fn tail(&self) -> TailPolicy {
        self.tail
    }

    /// Full loss of `[N, V]` student logits against a sparse teacher with `N` rows and `[N]`
    /// targets. Returns `[1]` (`Mean`, `Sum`, `Normalized`) or `[N]` (`PerRow`).
    ///
    /// # Panics
    /// On bad input, with the message of [`SparseDistillLoss::try_forward_parts`].
    pub fn forward<B: DistillBackend>(
        &self,
        student_logits: Tensor<B, 2>,
        teacher: SparseTeacher<B>,
        targets: Tensor<B, 1, Int>,
    ) -> Tensor<B, 1> {
        or_panic(self.try_forward_parts(student_logits, teacher, Some(targets))).loss
    }

    /// Soft term only: every row counts.
    ///
    /// # Panics
    /// As [`SparseDistillLoss::forward`].
    pub fn forward_soft<B: DistillBackend>(
        &self,
        student_logits: Tensor<B, 2>,
        teacher: SparseTeacher<B>,
    ) -> Tensor<B, 1> {
        or_panic(self.try_forward_parts(student_logits, teacher, None)).loss
    }

    /// Sequence form: `[B, T, V]` student logits, a teacher of `B·T` rows (see
    /// [`SparseTeacher::from_seq`]) and `[B, T]` targets (prompt and padding tokens set to the
    /// ignore index).
    ///
    /// # Panics
    /// As [`SparseDistillLoss::forward`].
    pub fn forward_seq<B: DistillBackend>(
        &self,
        student_logits: Tensor<B, 3>,
        teacher: SparseTeacher<B>,
        targets: Tensor<B, 2, Int>,
    ) -> Tensor<B, 1> {
        or_panic(self.try_forward_seq_parts(student_logits, teacher, Some(targets))).loss
    }

    /// Sequence form of [`SparseDistillLoss::try_forward_parts`]: `[B, T, V]` student logits,
    /// a teacher of `B·T` rows and optional `[B, T]` targets.
    pub fn try_forward_seq_parts<B: DistillBackend>(
        &self,
        student_logits: Tensor<B, 3>,
        teacher: SparseTeacher<B>,
        targets: Option<Tensor<B, 2, Int>>,
    ) -> Result<DistillOutput<B>, DistillError> {
        let [b, t, v] = student_logits.dims();
        if let Some(targets) = &targets {
            check_seq_targets(targets, b, t)?;
        }
        self.try_forward_parts(
            student_logits.reshape([b * t, v]),
            teacher,
            targets.map(|targets| targets.reshape([b * t])),
        )
    }

    /// The loss with its soft and hard parts, or an error naming the bad argument.
    pub fn try_forward_parts<B: DistillBackend>(
        &self,
        student_logits: Tensor<B, 2>,
        teacher: SparseTeacher<B>,
        targets: Option<Tensor<B, 1, Int>>,
    ) -> Result<DistillOutput<B>, DistillError> {
        let [n, v] = student_logits.dims();
        if n == 0 || v == 0 {
            return Err(DistillError::invalid(
                "student_logits",
                format!("shape [{n}, {v}]"),
                "a non-empty [N, V] tensor",
            ));
        }
        check_shapes(&teacher, n)?;
        let student_logits = self.dense.soft_cap(student_logits);
        let target_check = match &targets {
            Some(targets) => {
                check_row_targets(targets, [n, v], self.validation, self.params.ignore_index)?
            }
            None => None,
        };
        let ignored = ignored_rows(targets.as_ref(), self.params.ignore_index);
        let fused = match self.kernel {
            Kernel::Reference => None,
            _ => B::distill_sparse_fused(
                student_logits.clone().into_primitive().tensor(),
                SparseInputs {
                    indices: teacher.indices.clone().into_primitive(),
                    log_probs: teacher.log_probs.clone().detach().into_primitive().tensor(),
                    mask: teacher.mask.clone().map(Tensor::into_primitive),
                },
                targets.clone().map(Tensor::into_primitive),
                &self.params,
                SparseSetup {
                    tail: self.tail,
                    generation_temperature: self.generation_temperature,
                },
                false,
            ),
        };
        if fused.is_none() && self.kernel == Kernel::Fused {
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
        let checked = self.validation != Validation::Off;
        let (output, bad) = match fused {
            Some(out) => {
                let output = DistillOutput::from(out.parts);
                // The soft term too: with α = 0 a row without a valid entry leaves the loss
                // finite.
                let bad = checked.then(|| {
                    output.loss.clone().is_nan().int().sum()
                        + output.soft.clone().is_nan().int().sum()
                });
                (output, bad)
            }
            None => {
                let bad = checked.then(|| self.bad_entries(&teacher, ignored.clone(), v));
                let (soft, broken) = self.soft_rows(student_logits.clone(), teacher.clone());
                let mut rows = mix_rows(soft, student_logits, targets, &self.params);
                // A kept row whose teacher is not a distribution is NaN whole (whatever α), as
                // in the fused kernels, with a zero gradient.
                let broken = match &ignored {
                    Some(ignored) => broken.bool_and(ignored.clone().bool_not()),
                    None => broken,
                };
                rows.loss = rows.loss.mask_fill(broken.clone(), f64::NAN);
                rows.hard = rows.hard.map(|h| h.mask_fill(broken, f64::NAN));
                let reduce = |t| reduce_rows(t, ignored.clone(), self.params.reduction);
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
                .apply(self.validation)?
            }
        };
        Ok(output.with_check(target_check).with_check(teacher_check))
    }

    /// The `[N]` soft rows, `T²`-scaled, NaN for a row without any valid teacher entry; and the
    /// `[N]` rows whose teacher is not a distribution (an index outside the vocabulary or seen
    /// twice, a log-probability above 0 or NaN, a tail-bucket mass above 1), NaN too.
    fn soft_rows<B: Backend>(
        &self,
        student: Tensor<B, 2>,
        teacher: SparseTeacher<B>,
    ) -> (Tensor<B, 1>, Tensor<B, 1, Bool>) {
        let neg_inf = f64::NEG_INFINITY;
        let t = self.params.temperature;
        let [n, k] = teacher.dims();
        let v = student.dims()[1];
        let log_probs = teacher.log_probs.detach();
        let mut valid = log_probs.clone().equal_elem(neg_inf).bool_not();
        if let Some(mask) = teacher.mask {
            valid = valid.bool_and(mask);
        }
        // An index outside the vocabulary (unchecked input) is not gathered: its row is NaN.
        let out_of_range = teacher
            .indices
            .clone()
            .lower_elem(0)
            .bool_or(teacher.indices.clone().greater_equal_elem(v as i64))
            .bool_and(valid.clone());
        let out_of_range_rows = out_of_range.clone().int().sum_dim(1).greater_elem(0);
        let valid = valid.bool_and(out_of_range.bool_not());
        // The rows the fused kernels make NaN (unchecked input, `Validation::Off`), NaN here too
        // so that both kernels agree row by row: a log-probability above 0 (beyond rounding) or
        // NaN, a tail-bucket mass above 1 (beyond rounding), an index seen twice.
        let mut not_a_teacher = log_probs
            .clone()
            .greater_elem(ROUNDING)
            .bool_or(log_probs.clone().is_nan())
            .bool_and(valid.clone())
            .int()
            .sum_dim(1)
            .greater_elem(0);
        if self.tail == TailPolicy::TailBucket {
            let mass = log_probs
                .clone()
                .exp()
                .mask_fill(valid.clone().bool_not(), 0.0)
                .sum_dim(1);
            not_a_teacher = not_a_teacher.bool_or(mass.greater_elem(1.0 + ROUNDING));
        }
        if k > 1 {
            let duplicates = duplicate_pairs(&teacher.indices, &valid).greater_elem(0);
            not_a_teacher = not_a_teacher.bool_or(duplicates.unsqueeze_dim(1));
        }
        // A row without any valid entry gets a dummy certain token 0 (so that nothing below
        // is NaN, in the value or the gradient) and a NaN soft term at the end.
        let count = valid.clone().int().sum_dim(1);
        let empty = count.clone().equal_elem(0);
        let first = Tensor::<B, 1, Int>::arange(0..k as i64, &log_probs.device())
            .equal_elem(0)
            .unsqueeze_dim::<2>(0)
            .expand([n, k]);
        let dummy = first.bool_and(empty.clone().expand([n, k]));
        let valid = valid.bool_or(dummy.clone());
        let invalid = valid.bool_not();
        let log_probs = log_probs
            .mask_fill(dummy, 0.0)
            .mask_fill(invalid.clone(), neg_inf);
        let indices = teacher.indices.mask_fill(invalid.clone(), 0);

        let r = self.generation_temperature / t;
        let tempered = if r == 1.0 {
            log_probs.clone()
        } else {
            log_probs.clone().mul_scalar(r)
        };
        let scaled = student.mul_scalar(t.recip());
        let lse = log_sum_exp(scaled.clone());
        // The logits at the top-k: a `select` on the flattened logits where the flat index fits
        // an `i32` (wgpu's and CUDA's int type), a `gather` beyond. burn-fusion 0.21 (`Wgpu`)
        // computes the gather wrongly after the row reduction above for some shapes (V = 16,
        // k = 1: the tail-bucket loss was 1.0896 for 0.6423); the select is right there.
        let at_k = if n * v <= i32::MAX as usize {
            let rows = Tensor::<B, 1, Int>::arange(0..n as i64, &scaled.device())
                .mul_scalar(v as i64)
                .unsqueeze_dim::<2>(1);
            let flat = (indices.clone() + rows).reshape([n * k]);
            scaled
                .clone()
                .reshape([n * v])
                .select(0, flat)
                .reshape([n, k])
        } else {
            scaled.clone().gather(1, indices.clone())
        }
        .mask_fill(invalid.clone(), neg_inf);

        let (log_p, log_q) = match self.tail {
            TailPolicy::Renormalize { student } => {
                let log_q = match student {
                    StudentSupport::FullVocab => at_k - lse,
                    StudentSupport::TopK => at_k.clone() - log_sum_exp(at_k),
                };
                (normalize(tempered), log_q)
            }
            TailPolicy::TailBucket => {
                let ones = at_k.clone().detach().ones_like().mask_fill(invalid, 0.0);
                let in_top_k = scaled
                    .clone()
                    .detach()
                    .zeros_like()
                    .scatter(1, indices, ones, IndexingUpdateOp::Add)
                    .greater_elem(0.5);
                // A top-k that covers the whole vocabulary (k distinct valid tokens = V) leaves
                // no tail: the teacher's rounding leftover `1 − Σ p` must not meet an empty
                // student bucket (+∞).
                let no_tail = count.equal_elem(v as i64);
                let mass = log_probs.exp().sum_dim(1).clamp_max(1.0);
                let tail = mass
                    .neg()
                    .log1p()
                    .clamp_min(TAIL_FLOOR.ln())
                    .mask_fill(no_tail, neg_inf);
                let tail = if r == 1.0 { tail } else { tail.mul_scalar(r) };
                let log_p = normalize(Tensor::cat(vec![tempered, tail], 1));
                let outside = log_sum_exp(scaled.mask_fill(in_top_k, neg_inf));
                (log_p, Tensor::cat(vec![at_k, outside], 1) - lse)
            }
        };
        let soft = divergence_rows(self.params.divergence, log_p, log_q);
        let broken = out_of_range_rows.bool_or(not_a_teacher).squeeze_dim(1);
        let soft = scale_soft(soft, &self.params)
            .mask_fill(empty.squeeze_dim(1), f64::NAN)
            .mask_fill(broken.clone(), f64::NAN);
        (soft, broken)
    }

    /// The composed path's teacher check (see [`Validation`]): `[1]` number of bad entries of
    /// the rows that are not ignored, counted on the device: a log-probability above 0
    /// (beyond rounding) or NaN, an index outside `[0, V)`, an index seen twice in a row, a
    /// row without a valid entry and, with the tail bucket, a top-k mass above 1 (beyond
    /// rounding).
    fn bad_entries<B: Backend>(
        &self,
        teacher: &SparseTeacher<B>,
        ignored: Option<Tensor<B, 1, Bool>>,
        classes: usize,
    ) -> Tensor<B, 1, Int> {
        let [n, k] = teacher.dims();
        let log_probs = teacher.log_probs.clone().detach();
        let indices = teacher.indices.clone();
        let device = log_probs.device();
        let keep = match &ignored {
            Some(ignored) => ignored.clone().bool_not().unsqueeze_dim::<2>(1),
            None => Tensor::<B, 2, Bool>::full([n, 1], true, &device),
        };
        let mut valid = log_probs
            .clone()
            .equal_elem(f64::NEG_INFINITY)
            .bool_not()
            .bool_and(keep.clone().expand([n, k]));
        if let Some(mask) = &teacher.mask {
            valid = valid.bool_and(mask.clone());
        }
        let count = |t: Tensor<B, 2, Bool>| t.int().sum();
        let bad_values = log_probs
            .clone()
            .greater_elem(ROUNDING)
            .bool_or(log_probs.clone().is_nan())
            .bool_and(valid.clone());
        let bad_indices = indices
            .clone()
            .lower_elem(0)
            .bool_or(indices.clone().greater_equal_elem(classes as i64))
            .bool_and(valid.clone());
        let empty = valid
            .clone()
            .int()
            .sum_dim(1)
            .equal_elem(0)
            .bool_and(keep.clone());
        let mut bad = count(bad_values) + count(bad_indices) + count(empty);
        if self.tail == TailPolicy::TailBucket {
            let mass = log_probs
                .exp()
                .mask_fill(valid.clone().bool_not(), 0.0)
                .sum_dim(1)
                .greater_elem(1.0 + ROUNDING);
            bad = bad + count(mass);
        }
        if k > 1 {
            bad = bad + duplicate_pairs(&indices, &valid).sum();
        }
        bad
    }
}

/// Reads the teacher back and names its first bad entry among the rows that are not ignored
/// (the host side of [`SparseDistillLoss::teacher_check`]).
pub(crate) fn first_bad_entry<B: Backend>(
    teacher: &SparseTeacher<B>,
    ignored: Option<Tensor<B, 1, Bool>>,
    classes: usize,
    tail: TailPolicy,
) -> Option<DistillError> {
    let [n, k] = teacher.dims();
    let indices = teacher.indices.to_data().convert::<i64>();
    let log_probs = teacher.log_probs.to_data().convert::<f64>();
    let mask = teacher.mask.as_ref().map(Tensor::to_data);
    let ignored = ignored.map(|t| t.to_data());
    let flags =
        |data: &Option<TensorData>| data.as_ref().map(|d| d.iter::<bool>().collect::<Vec<_>>());
    let (mask, ignored) = (flags(&mask), flags(&ignored));
    let indices = indices.as_slice::<i64>().expect("i64 indices");
    let log_probs = log_probs.as_slice::<f64>().expect("f64 log-probabilities");
    for row in 0..n {
        if ignored.as_ref().is_some_and(|ignored| ignored[row]) {
            continue;
        }
        let mut seen: Vec<(usize, i64)> = Vec::with_capacity(k);
        let mut mass = 0.0;
        for col in 0..k {
            let at = row * k + col;
            let lp = log_probs[at];
            if mask.as_ref().is_some_and(|mask| !mask[at]) || lp == f64::NEG_INFINITY {
                continue;
            }
            if lp.is_nan() || lp > ROUNDING {
                return Some(DistillError::invalid(
                    "teacher log_probs",
                    format!("log_probs[{row}, {col}] = {lp}"),
                    "a log-probability <= 0 (or -inf / a false mask entry for a missing \
                     token); pass log_softmax(logits / T_gen), not logits",
                ));
            }
            let index = indices[at];
            if index < 0 || index >= classes as i64 {
                return Some(DistillError::invalid(
                    "teacher indices",
                    format!("indices[{row}, {col}] = {index}"),
                    format!("a token index in [0, {classes}) (the student's vocabulary)"),
                ));
            }
            if let Some(&(first, _)) = seen.iter().find(|&&(_, i)| i == index) {
                return Some(DistillError::invalid(
                    "teacher indices",
                    format!("indices[{row}, {col}] = {index}, already at [{row}, {first}]"),
                    "distinct token indices within a row",
                ));
            }
            seen.push((col, index));
            mass += lp.exp();
        }
        if seen.is_empty() {
            return Some(DistillError::invalid(
                "teacher log_probs",
                format!("row {row} with no valid entry"),
                "at least one finite log-probability in every row whose target is not the \
                 ignore index",
            ));
        }
        if tail == TailPolicy::TailBucket && mass > 1.0 + ROUNDING {
            return Some(DistillError::invalid(
                "teacher log_probs",
                format!("row {row} with total probability {mass}"),
                "at most 1 with TailPolicy::TailBucket (log-probabilities of the teacher's \
                 full distribution)",
            ));
        }
    }
    None
}

/// `[N]`: per row, the pairs `j < j'` of valid entries with the same index, compared on the
/// device in chunks of rows (at most 2²² comparisons each).
fn duplicate_pairs<B: Backend>(
    indices: &Tensor<B, 2, Int>,
    valid: &Tensor<B, 2, Bool>,
) -> Tensor<B, 1, Int> {
    let [n, k] = indices.dims();
    let device = indices.device();
    let columns = Tensor::<B, 1, Int>::arange(0..k as i64, &device);
    let before = columns
        .clone()
        .reshape([1, k, 1])
        .lower(columns.reshape([1, 1, k]));
    let rows = ((1usize << 22) / (k * k)).max(1);
    let mut per_row = Vec::new();
    for start in (0..n).step_by(rows) {
        let c = rows.min(n - start);
        let pairs = |t: Tensor<B, 2, Int>| {
            (
                t.clone().unsqueeze_dim::<3>(2).expand([c, k, k]),
                t.unsqueeze_dim::<3>(1).expand([c, k, k]),
            )
        };
        let (a, b) = pairs(indices.clone().narrow(0, start, c));
        let (va, vb) = pairs(valid.clone().narrow(0, start, c).int());
        let same = a
            .equal(b)
            .bool_and(va.equal_elem(1))
            .bool_and(vb.equal_elem(1))
            .bool_and(before.clone().expand([c, k, k]));
        per_row.push(same.int().sum_dim(2).sum_dim(1).reshape([c]));
    }
    Tensor::cat(per_row, 0)
}

/// The teacher's tensors must be `[N, k]` with `k ≥ 1`, all three of the same shape.
fn check_shapes<B: Backend>(teacher: &SparseTeacher<B>, rows: usize) -> Result<(), DistillError> {
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

/// `[N, 1]` rows of `log Σ_j exp(x_j)`, stable; `−inf` for a row of `−inf`, whose gradient is
/// then blocked by the mask that produced it.
fn log_sum_exp<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let max = x.clone().detach().max_dim(1);
    let max = max.clone().mask_fill(max.is_inf(), 0.0);
    (x - max.clone()).exp().sum_dim(1).log() + max
}

/// Log-probabilities of the distribution `∝ exp(x)` over each row.
fn normalize<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    x.clone() - log_sum_exp(x)
}
