//! The distillation loss: configuration, validation, dispatch and reduction.

use burn::{
    config::Config,
    module::Module,
    tensor::{Int, Tensor},
};

use crate::{
    DistillError, DistillParams, Divergence, Kernel, Reduction, Validation, VocabMismatch, backend,
    error::or_panic,
    rank::{Rank, RankTargets, TokenRank},
    softmax::check_temperature,
    validation::{DeviceCheck, index_check, validate},
};

/// Configuration of a [`DistillLoss`].
///
/// ```
/// use burn_distill::{DistillLossConfig, Divergence, Reduction};
///
/// let loss = DistillLossConfig::new()
///     .with_temperature(4.0)
///     .with_alpha(0.9)
///     .with_divergence(Divergence::Jsd { beta: 0.5 })
///     .with_reduction(Reduction::Mean)
///     .init();
/// assert_eq!(loss.params().temperature(), 4.0);
/// ```
#[derive(Config, Debug)]
pub struct DistillLossConfig {
    /// Temperature `T` of the teacher and student distributions in the soft term; finite, `> 0`.
    #[config(default = 1.0)]
    pub temperature: f64,
    /// Weight `α ∈ [0, 1]` of the soft term; the hard term gets `1 − α`.
    #[config(default = 0.5)]
    pub alpha: f64,
    /// The divergence of the soft term.
    #[config(default = "Divergence::ForwardKl")]
    pub divergence: Divergence,
    /// Multiply the soft term by `T²` (Hinton et al.), so that its gradient keeps the same
    /// magnitude as the temperature changes.
    #[config(default = true)]
    pub scale_by_t2: bool,
    /// Rows (tokens) whose target equals this value are left out of both terms and of the mean.
    #[config(default = "Some(-100)")]
    pub ignore_index: Option<i64>,
    /// Label smoothing `ε ∈ [0, 1)` of the hard term (PyTorch's convention).
    #[config(default = 0.0)]
    pub label_smoothing: f64,
    /// How row losses are reduced.
    #[config(default = "Reduction::Mean")]
    pub reduction: Reduction,
    /// When the values of the inputs are checked (targets in `[0, V)` or the ignore index):
    /// [`Validation::Eager`] (the default) in every `forward`, at the cost of one read-back
    /// from the device, a pipeline stall on a GPU; [`Validation::Deferred`] on the device,
    /// read only by [`DistillOutput::validate`]; or [`Validation::Off`]. Unchecked (or not yet
    /// validated), an out-of-range target makes its row (and so a `Mean` or `Sum` loss) NaN:
    /// never a silently wrong value.
    #[config(default = "Validation::Eager")]
    pub validation: Validation,
    /// Which implementation computes the loss: [`Kernel::Auto`] (the fused kernel where the
    /// backend has one, else the reference), [`Kernel::Reference`] or [`Kernel::Fused`].
    #[config(default = "Kernel::Auto")]
    pub kernel: Kernel,
    /// What to do when student and teacher vocabularies differ: [`VocabMismatch::Error`]
    /// (default), `Truncate` or `PadNegInf`.
    #[config(default = "VocabMismatch::Error")]
    pub vocab_mismatch: VocabMismatch,
    /// Rows of logits computed at a time by the fused-linear losses
    /// ([`DistillLoss::forward_linear`]); `None` (the default) derives it from
    /// `linear_chunk_bytes`.
    #[config(default = "None")]
    pub linear_chunk_rows: Option<usize>,
    /// Memory budget of the fused-linear losses' chunks when `linear_chunk_rows` is `None`:
    /// rows such that three f32 `[rows, V]` buffers (student and teacher logits, gradient; four
    /// with a `logit_softcap`) fit, at least one. `None` (the default): the backend's
    /// device's budget, 64 MiB on the CPU (Flex) and 512 MiB on CubeCL (wgpu, CUDA), where
    /// every chunk also pays an `[H, V]` weight-gradient pass.
    #[config(default = "None")]
    pub linear_chunk_bytes: Option<usize>,
    /// Logit soft-capping `z ↦ c · tanh(z / c)` of both models' logits before anything else
    /// (Gemma 2's `final_logit_softcapping`, e.g. `Some(30.0)`), in [`DistillLoss::forward`],
    /// the sequence forms and the fused-linear losses; the gradient flows through the cap.
    /// `None` (the default) leaves the logits as they are. Finite and `> 0`. A `−∞` logit of
    /// the caller's becomes `−c` (only the `PadNegInf` padding, added after the cap, stays
    /// `−∞`). The sparse-teacher loss caps the student only. With a cap the
    /// fused-linear chunks keep a fourth `[rows, V]` buffer (`tanh`), and the automatic chunk
    /// size counts it.
    #[config(default = "None")]
    pub logit_softcap: Option<f64>,
    /// Do the fused-linear losses compute the gradient of the student head (its `[H, V]`
    /// weight and its bias)? `true` by default; `false` for a head that is frozen or tied to
    /// an embedding updated elsewhere: then no `[H, V]` product is formed at all and the head
    /// gets no gradient from this loss (the hidden states still do). With `true`, a weight (or
    /// bias) that does not require a gradient (a frozen `Param`, a LoRA-only run) is skipped
    /// the same way on `Autodiff` backends.
    #[config(default = true)]
    pub linear_head_grad: bool,
}

impl DistillLossConfig {
    /// Validates the configuration and builds the loss.
    ///
    /// # Panics
    /// With the message of [`DistillLossConfig::try_init`]'s error, at the caller's line.
    #[track_caller]
    pub fn init(&self) -> DistillLoss {
        or_panic(self.try_init())
    }

    /// Validates the configuration and builds the loss, or says which value is wrong.
    ///
    /// ```
    /// use burn_distill::DistillLossConfig;
    ///
    /// let err = DistillLossConfig::new().with_alpha(1.5).try_init().unwrap_err();
    /// assert_eq!(err.to_string(), "invalid alpha: got 1.5, expected a number in [0, 1]");
    /// ```
    pub fn try_init(&self) -> Result<DistillLoss, DistillError> {
        check_temperature("temperature", self.temperature)?;
        if !(0.0..=1.0).contains(&self.alpha) {
            return Err(DistillError::invalid(
                "alpha",
                self.alpha,
                "a number in [0, 1]",
            ));
        }
        let divergence = self.divergence.resolved()?;
        self.reduction.validate()?;
        if self.linear_chunk_rows == Some(0) {
            return Err(DistillError::invalid(
                "linear_chunk_rows",
                "Some(0)",
                "None (automatic) or Some(rows >= 1)",
            ));
        }
        if let Some(cap) = self.logit_softcap
            && !(cap.is_finite() && cap > 0.0)
        {
            return Err(DistillError::invalid(
                "logit_softcap",
                format!("Some({cap})"),
                "None or Some(c) with c finite and > 0",
            ));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return Err(DistillError::invalid(
                "label_smoothing",
                self.label_smoothing,
                "a number in [0, 1)",
            ));
        }
        Ok(DistillLoss {
            params: DistillParams {
                temperature: self.temperature,
                alpha: self.alpha,
                divergence,
                scale_by_t2: self.scale_by_t2,
                ignore_index: self.ignore_index,
                label_smoothing: self.label_smoothing,
                reduction: self.reduction,
            },
            validation: self.validation,
            kernel: self.kernel,
            vocab_mismatch: self.vocab_mismatch,
            linear_chunk_rows: self.linear_chunk_rows,
            linear_chunk_bytes: self.linear_chunk_bytes,
            logit_softcap: self.logit_softcap,
            linear_head_grad: self.linear_head_grad,
        })
    }
}

/// The knowledge-distillation loss.
///
/// For each row `i` (a sample, or a token of a sequence) with student logits `z_s`, teacher
/// logits `z_t` and target `y_i`:
///
/// ```text
/// z ← c · tanh(z / c)            (both models, only with a logit_softcap c)
/// p = softmax(z_t / T),  q = softmax(z_s / T)
/// soft_i = D(p, q) · T²          (T² only if scale_by_t2; D: see Divergence)
/// hard_i = −(1 − ε) log softmax(z_s)[y_i] − ε · mean_j log softmax(z_s)[j]
/// row_i  = α · soft_i + (1 − α) · hard_i      (soft_i alone without targets)
/// ```
///
/// Rows whose target is the ignore index are `0` and excluded from the mean. The teacher never
/// receives a gradient.
///
/// ```
/// use burn::tensor::{Device, Int, Tensor};
/// use burn_distill::DistillLossConfig;
///
/// let device = Device::default().autodiff();
/// let student = Tensor::<2>::from_floats([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], &device)
///     .require_grad();
/// let teacher = Tensor::<2>::from_floats([[0.5, 3.0, 0.0], [0.2, -2.0, 4.0]], &device);
/// let targets = Tensor::<1, Int>::from_ints([1, 2], &device);
///
/// let loss = DistillLossConfig::new().with_temperature(2.0).with_alpha(0.9).init();
/// let value = loss.forward(student.clone(), teacher, targets);
/// let grads = value.backward();
/// // α·T²·KL(p‖q) + (1 − α)·CE, averaged over the two rows (computed by hand in f64).
/// assert!((value.into_scalar::<f32>() - 0.206_432).abs() < 1e-5);
/// let grad = student.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
/// // (α·T·(q − p) + (1 − α)·(softmax(z_s) − onehot(y))) / N, by hand in f64: the target
/// // logit of row 0 is pulled up.
/// assert!((grad[1] - -0.181_822).abs() < 1e-5, "{grad:?}");
/// ```
///
/// It is a (parameter-free) burn [`Module`], so it can sit in a model struct as a field.
///
/// # Shapes
/// - `student_logits`, `teacher_logits`: `[N, V]` (`forward*`) or `[B, T, V]` (`forward_seq*`)
/// - `targets`: `[N]` or `[B, T]` class indices (ignored rows: the ignore index)
/// - output: `[1]` (`Mean`, `Sum`, `Normalized`) or `[N]` / `[B·T]` row-major (`PerRow`)
#[derive(Module, Debug)]
pub struct DistillLoss {
    #[module(skip)]
    pub(crate) params: DistillParams,
    #[module(skip)]
    pub(crate) validation: Validation,
    #[module(skip)]
    pub(crate) kernel: Kernel,
    #[module(skip)]
    pub(crate) vocab_mismatch: VocabMismatch,
    #[module(skip)]
    pub(crate) linear_chunk_rows: Option<usize>,
    #[module(skip)]
    pub(crate) linear_chunk_bytes: Option<usize>,
    #[module(skip)]
    pub(crate) logit_softcap: Option<f64>,
    #[module(skip)]
    pub(crate) linear_head_grad: bool,
}

/// The loss together with its soft and hard parts, for logging.
///
/// All three are reduced the same way. `loss` carries the gradient; `soft` and `hard` are
/// detached copies of the two terms (before the `α` weighting) computed in the same pass.
#[derive(Clone, Debug)]
pub struct DistillOutput {
    /// The loss, `α · soft + (1 − α) · hard` (or `soft` without targets).
    pub loss: Tensor<1>,
    /// The soft term (T²-scaled if configured), detached.
    pub soft: Tensor<1>,
    /// The hard cross-entropy term, detached; `None` without targets.
    pub hard: Option<Tensor<1>>,
    /// The input checks queued on the device ([`Validation::Deferred`]).
    pub(crate) checks: Vec<DeviceCheck>,
}

impl DistillOutput {
    /// Reads the input checks that a forward with [`Validation::Deferred`] queued on the
    /// device (one read-back) and names the first bad value; `Ok` without any (with
    /// [`Validation::Eager`] the forward has checked already, with [`Validation::Off`] nothing
    /// is checked).
    ///
    /// ```
    /// use burn::tensor::{Device, Int, Tensor};
    /// use burn_distill::{DistillError, DistillLossConfig, Validation};
    ///
    /// let device = Device::default();
    /// let loss = DistillLossConfig::new().with_validation(Validation::Deferred).init();
    /// let logits = Tensor::<2>::zeros([2, 3], &device);
    /// let targets = Tensor::<1, Int>::from_ints([1, 7], &device);
    /// // No read-back here: the bad target makes its row, and the mean, NaN...
    /// let out = loss.forward_parts(logits.clone(), logits, Some(targets));
    /// assert!(out.loss.clone().into_scalar::<f32>().is_nan());
    /// // ...and validation names it.
    /// assert!(matches!(
    ///     out.validate(),
    ///     Err(DistillError::TargetOutOfRange { row: 1, value: 7, classes: 3, .. })
    /// ));
    /// ```
    pub fn validate(&self) -> Result<(), DistillError> {
        validate(&self.checks)
    }

    /// The output with `check` queued.
    pub(crate) fn with_check(mut self, check: Option<DeviceCheck>) -> Self {
        self.checks.extend(check);
        self
    }
}

impl From<backend::DistillParts> for DistillOutput {
    fn from(parts: backend::DistillParts) -> Self {
        Self {
            loss: parts.loss,
            soft: parts.soft,
            hard: parts.hard,
            checks: Vec::new(),
        }
    }
}

impl DistillLoss {
    /// The validated parameters of this loss.
    pub fn params(&self) -> &DistillParams {
        &self.params
    }

    /// The logit soft-capping constant `c`, if any (see
    /// [`DistillLossConfig::logit_softcap`]).
    pub fn logit_softcap(&self) -> Option<f64> {
        self.logit_softcap
    }

    /// The same loss with another reduction, e.g. [`Reduction::Normalized`] with this step's
    /// token count for gradient accumulation (cheap: the loss holds no tensors).
    ///
    /// # Panics
    /// If the reduction is invalid (`Normalized { items: 0 }`), at the caller's line.
    #[track_caller]
    pub fn with_reduction(&self, reduction: Reduction) -> Self {
        or_panic(self.try_with_reduction(reduction))
    }

    /// [`DistillLoss::with_reduction`] that returns an error instead of panicking.
    pub fn try_with_reduction(&self, reduction: Reduction) -> Result<Self, DistillError> {
        reduction.validate()?;
        Ok(Self {
            params: self.params.with_reduction(reduction),
            ..self.clone()
        })
    }

    /// Full loss (soft and hard terms) of `[N, V]` logits against `[N]` targets.
    ///
    /// Returns `[1]` for `Mean`, `Sum` and `Normalized`, `[N]` for `PerRow`.
    ///
    /// # Panics
    /// On bad shapes or out-of-range targets, with the message of
    /// [`DistillLoss::try_forward`], at the caller's line.
    #[track_caller]
    pub fn forward(
        &self,
        student_logits: Tensor<2>,
        teacher_logits: Tensor<2>,
        targets: Tensor<1, Int>,
    ) -> Tensor<1> {
        or_panic(self.try_forward(student_logits, teacher_logits, targets))
    }

    /// [`DistillLoss::forward`] that returns an error instead of panicking.
    pub fn try_forward(
        &self,
        student_logits: Tensor<2>,
        teacher_logits: Tensor<2>,
        targets: Tensor<1, Int>,
    ) -> Result<Tensor<1>, DistillError> {
        self.parts(student_logits, teacher_logits, Some(targets))
            .map(|out| out.loss)
    }

    /// Soft term only (no labels) of `[N, V]` logits: every row counts.
    ///
    /// # Panics
    /// If the shapes differ or are empty, at the caller's line.
    #[track_caller]
    pub fn forward_soft(&self, student_logits: Tensor<2>, teacher_logits: Tensor<2>) -> Tensor<1> {
        or_panic(self.try_forward_soft(student_logits, teacher_logits))
    }

    /// [`DistillLoss::forward_soft`] that returns an error instead of panicking.
    pub fn try_forward_soft(
        &self,
        student_logits: Tensor<2>,
        teacher_logits: Tensor<2>,
    ) -> Result<Tensor<1>, DistillError> {
        self.parts(student_logits, teacher_logits, None)
            .map(|out| out.loss)
    }

    /// The loss and its soft and hard parts of `[N, V]` logits, from one computation;
    /// `targets` `None` for the soft term alone.
    ///
    /// # Panics
    /// As [`DistillLoss::forward`].
    #[track_caller]
    pub fn forward_parts(
        &self,
        student_logits: Tensor<2>,
        teacher_logits: Tensor<2>,
        targets: Option<Tensor<1, Int>>,
    ) -> DistillOutput {
        or_panic(self.try_forward_parts(student_logits, teacher_logits, targets))
    }

    /// [`DistillLoss::forward_parts`] that returns an error instead of panicking.
    pub fn try_forward_parts(
        &self,
        student_logits: Tensor<2>,
        teacher_logits: Tensor<2>,
        targets: Option<Tensor<1, Int>>,
    ) -> Result<DistillOutput, DistillError> {
        self.parts(student_logits, teacher_logits, targets)
    }

    /// Sequence form: `[B, T, V]` logits against `[B, T]` targets (prompt or padding tokens
    /// set to the ignore index). `Mean` averages over the non-ignored tokens of the whole
    /// batch; `PerRow` returns the `B·T` token losses flattened row-major (reshape them to
    /// `[B, T]`). Errors name positions and shapes as the caller passed them (`targets[1, 5]`,
    /// `shape [4, 32, 500]`).
    ///
    /// # Panics
    /// On bad shapes or out-of-range targets, with the message of
    /// [`DistillLoss::try_forward_seq`], at the caller's line.
    #[track_caller]
    pub fn forward_seq(
        &self,
        student_logits: Tensor<3>,
        teacher_logits: Tensor<3>,
        targets: Tensor<2, Int>,
    ) -> Tensor<1> {
        or_panic(self.try_forward_seq(student_logits, teacher_logits, targets))
    }

    /// [`DistillLoss::forward_seq`] that returns an error instead of panicking.
    pub fn try_forward_seq(
        &self,
        student_logits: Tensor<3>,
        teacher_logits: Tensor<3>,
        targets: Tensor<2, Int>,
    ) -> Result<Tensor<1>, DistillError> {
        self.parts(student_logits, teacher_logits, Some(targets))
            .map(|out| out.loss)
    }

    /// Sequence form of [`DistillLoss::forward_soft`]: `[B, T, V]` logits, every token counts.
    ///
    /// # Panics
    /// If the shapes differ or are empty, at the caller's line.
    #[track_caller]
    pub fn forward_seq_soft(
        &self,
        student_logits: Tensor<3>,
        teacher_logits: Tensor<3>,
    ) -> Tensor<1> {
        or_panic(self.try_forward_seq_soft(student_logits, teacher_logits))
    }

    /// [`DistillLoss::forward_seq_soft`] that returns an error instead of panicking.
    pub fn try_forward_seq_soft(
        &self,
        student_logits: Tensor<3>,
        teacher_logits: Tensor<3>,
    ) -> Result<Tensor<1>, DistillError> {
        self.parts(student_logits, teacher_logits, None)
            .map(|out| out.loss)
    }

    /// Sequence form of [`DistillLoss::forward_parts`]: `[B, T, V]` logits, optional
    /// `[B, T]` targets.
    ///
    /// # Panics
    /// As [`DistillLoss::forward_seq`].
    #[track_caller]
    pub fn forward_seq_parts(
        &self,
        student_logits: Tensor<3>,
        teacher_logits: Tensor<3>,
        targets: Option<Tensor<2, Int>>,
    ) -> DistillOutput {
        or_panic(self.try_forward_seq_parts(student_logits, teacher_logits, targets))
    }

    /// [`DistillLoss::forward_seq_parts`] that returns an error instead of panicking.
    pub fn try_forward_seq_parts(
        &self,
        student_logits: Tensor<3>,
        teacher_logits: Tensor<3>,
        targets: Option<Tensor<2, Int>>,
    ) -> Result<DistillOutput, DistillError> {
        self.parts(student_logits, teacher_logits, targets)
    }

    /// `c · tanh(z / c)` with this loss's soft-cap `c`, or `z` without one. Before the
    /// vocabulary alignment, so that `PadNegInf` columns stay `−∞`.
    pub(crate) fn soft_cap<const D: usize>(&self, z: Tensor<D>) -> Tensor<D> {
        match self.logit_softcap {
            // `· (1/c)`, not `/ c`: burn's autodiff backpropagates `div_scalar` with `1/c`
            // rounded to f32 (0.21).
            Some(c) => z.mul_scalar(c.recip()).tanh().mul_scalar(c),
            None => z,
        }
    }

    /// Every form of the loss, at either rank: the shapes are checked as the caller passed
    /// them, then the tokens are taken as rows.
    fn parts<const D: usize>(
        &self,
        student_logits: Tensor<D>,
        teacher_logits: Tensor<D>,
        targets: Option<RankTargets<D>>,
    ) -> Result<DistillOutput, DistillError>
    where
        Rank<D>: TokenRank,
    {
        crate::rank::same_lead(
            "teacher_logits",
            teacher_logits.dims(),
            student_logits.dims(),
        )?;
        let (student_logits, teacher_logits) = self.vocab_mismatch.align(
            self.soft_cap(student_logits),
            self.soft_cap(teacher_logits),
            self.params.divergence,
        )?;
        let dims = student_logits.dims();
        crate::rank::non_empty("student_logits", dims)?;
        crate::rank::same_shape(
            "teacher_logits",
            teacher_logits.dims(),
            "student_logits",
            dims,
        )?;
        let targets = targets
            .map(|t| <Rank<D> as TokenRank>::flat_targets(t, &dims[..D - 1]))
            .transpose()?;
        let v = dims[D - 1];
        let check = self.check_targets(targets.as_ref(), v, &dims[..D - 1])?;
        let (student, teacher) = (
            crate::rank::flat_rows(student_logits),
            crate::rank::flat_rows(teacher_logits),
        );
        let out = backend::dense(student, teacher, targets, &self.params, self.kernel)?;
        Ok(DistillOutput::from(out).with_check(check))
    }

    /// Flat `[N]` targets of `[N, classes]` rows (a sequence's `lead = [B, T]` tokens),
    /// checked as this loss's validation mode says; errors name positions in `lead`.
    pub(crate) fn check_targets(
        &self,
        targets: Option<&Tensor<1, Int>>,
        classes: usize,
        lead: &[usize],
    ) -> Result<Option<DeviceCheck>, DistillError> {
        let (validation, ignore) = (self.validation, self.params.ignore_index);
        match targets {
            Some(t) if validation != Validation::Off => {
                target_check(t, classes, ignore, lead.to_vec()).apply(validation)
            }
            _ => Ok(None),
        }
    }
}

/// The targets' check: `[1]` number of targets outside `[0, classes)` that are not the ignore
/// index, counted on the device; the host scan for the first one runs only when it is not 0.
fn target_check(
    targets: &Tensor<1, Int>,
    classes: usize,
    ignore_index: Option<i64>,
    lead: Vec<usize>,
) -> DeviceCheck {
    index_check(targets, classes, ignore_index, move |row, value| {
        DistillError::TargetOutOfRange {
            row,
            at: crate::error::unravel(row, &lead),
            value,
            classes,
            ignore_index,
        }
    })
}
