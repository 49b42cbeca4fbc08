//! The distillation loss: configuration, validation, dispatch and reduction.

use burn::{
    config::Config,
    module::Module,
    tensor::{Int, Tensor, TensorMetadata, TensorPrimitive, backend::Backend},
};

use crate::{
    DistillBackend, DistillError, DistillParams, Divergence, Kernel, Reduction, Validation,
    VocabMismatch,
    error::{non_empty, panicking, same_dims},
    rank::{Rank, RankTargets, TokenRank, flatten, flatten_like},
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
    /// [`DistillBackend::linear_chunk_bytes`], 64 MiB on the CPU backends and 512 MiB on
    /// CubeCL (wgpu, CUDA), where every chunk also pays an `[H, V]` weight-gradient pass.
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
    panicking! {
        /// Validates the configuration and builds the loss.
        ///
        /// # Panics
        /// With the message of [`DistillLossConfig::try_init`]'s error.
        pub fn init(&self) -> DistillLoss {
            self.try_init()
        }
    }

    /// Validates the configuration and builds the loss, or says which value is wrong.
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
/// use burn::backend::{Autodiff, NdArray};
/// use burn::tensor::{Int, Tensor};
/// use burn_distill::DistillLossConfig;
///
/// type B = Autodiff<NdArray>;
/// let device = Default::default();
/// let student = Tensor::<B, 2>::from_floats([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], &device)
///     .require_grad();
/// let teacher = Tensor::<B, 2>::from_floats([[0.5, 3.0, 0.0], [0.2, -2.0, 4.0]], &device);
/// let targets = Tensor::<B, 1, Int>::from_ints([1, 2], &device);
///
/// let loss = DistillLossConfig::new().with_temperature(2.0).with_alpha(0.9).init();
/// let value = loss.forward(student.clone(), teacher, targets);
/// let grads = value.backward();
/// // α·T²·KL(p‖q) + (1 − α)·CE, averaged over the two rows (computed by hand in f64).
/// assert!((value.into_scalar() - 0.206_432).abs() < 1e-5);
/// assert_eq!(student.grad(&grads).unwrap().dims(), [2, 3]);
/// ```
///
/// It is a (parameter-free) burn [`Module`], so it can sit in a model struct as a field.
///
/// # Shapes
/// - `student_logits`, `teacher_logits`: `[N, V]` (`forward*`) or `[B, T, V]` (`forward_seq*`)
/// - `targets`: `[N]` or `[B, T]` class indices (ignored rows: the ignore index)
/// - output: `[1]` (`Mean`, `Sum`, `Normalized`) or `[N]` / `[B·T]` (`PerRow`)
#[derive(Module, Clone, Debug)]
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
    linear_chunk_rows: Option<usize>,
    #[module(skip)]
    linear_chunk_bytes: Option<usize>,
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
pub struct DistillOutput<B: Backend> {
    /// The loss, `α · soft + (1 − α) · hard` (or `soft` without targets).
    pub loss: Tensor<B, 1>,
    /// The soft term (T²-scaled if configured), detached.
    pub soft: Tensor<B, 1>,
    /// The hard cross-entropy term, detached; `None` without targets.
    pub hard: Option<Tensor<B, 1>>,
    /// The input checks queued on the device ([`Validation::Deferred`]).
    pub(crate) checks: Vec<DeviceCheck<B>>,
}

impl<B: Backend> DistillOutput<B> {
    /// Reads the input checks that a forward with [`Validation::Deferred`] queued on the
    /// device (one read-back) and names the first bad value; `Ok` without any (with
    /// [`Validation::Eager`] the forward has checked already, with [`Validation::Off`] nothing
    /// is checked).
    ///
    /// ```
    /// use burn::backend::NdArray;
    /// use burn::tensor::{Int, Tensor};
    /// use burn_distill::{DistillError, DistillLossConfig, Validation};
    ///
    /// let device = Default::default();
    /// let loss = DistillLossConfig::new().with_validation(Validation::Deferred).init();
    /// let logits = Tensor::<NdArray, 2>::zeros([2, 3], &device);
    /// let targets = Tensor::<NdArray, 1, Int>::from_ints([1, 7], &device);
    /// // No read-back here: the bad target makes its row, and the mean, NaN...
    /// let out = loss.try_forward_parts(logits.clone(), logits, Some(targets)).unwrap();
    /// assert!(out.loss.clone().into_scalar().is_nan());
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
    pub(crate) fn with_check(mut self, check: Option<DeviceCheck<B>>) -> Self {
        self.checks.extend(check);
        self
    }
}

impl<B: Backend> From<crate::DistillParts<B>> for DistillOutput<B> {
    /// The backend primitives of a loss as tensors.
    fn from(parts: crate::DistillParts<B>) -> Self {
        let float = |t| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(t));
        Self {
            loss: float(parts.loss),
            soft: float(parts.soft),
            hard: parts.hard.map(float),
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

    /// Rows per chunk of the fused-linear losses on backend `B` for a vocabulary of `v`
    /// columns.
    pub fn linear_chunk_rows<B: DistillBackend>(&self, v: usize) -> usize {
        let buffers = if self.logit_softcap.is_some() { 4 } else { 3 };
        self.linear_chunk_rows_with::<B>(v, buffers)
    }

    /// [`DistillLoss::linear_chunk_rows`] for a loss that keeps `buffers` f32 `[c, V]`
    /// buffers per chunk.
    pub(crate) fn linear_chunk_rows_with<B: DistillBackend>(
        &self,
        v: usize,
        buffers: usize,
    ) -> usize {
        let budget = self
            .linear_chunk_bytes
            .unwrap_or_else(B::linear_chunk_bytes);
        self.linear_chunk_rows
            .unwrap_or_else(|| budget / (buffers * 4 * v.max(1)))
            .max(1)
    }

    panicking! {
        /// The same loss with another reduction, e.g. [`Reduction::Normalized`] with this step's
        /// token count for gradient accumulation (cheap: the loss holds no tensors).
        ///
        /// # Panics
        /// If the reduction is invalid (`Normalized { items: 0 }`).
        pub fn with_reduction(&self, reduction: Reduction) -> Self {
            self.try_with_reduction(reduction)
        }
    }

    /// [`DistillLoss::with_reduction`] that returns an error instead of panicking.
    pub fn try_with_reduction(&self, reduction: Reduction) -> Result<Self, DistillError> {
        reduction.validate()?;
        Ok(Self {
            params: self.params.with_reduction(reduction),
            ..self.clone()
        })
    }

    panicking! {
        /// Full loss (soft and hard terms) of `[N, V]` logits against `[N]` targets.
        ///
        /// Returns `[1]` for `Mean`, `Sum` and `Normalized`, `[N]` for `PerRow`.
        ///
        /// # Panics
        /// On bad shapes or out-of-range targets, with the message of [`DistillLoss::try_forward`].
        pub fn forward<B: DistillBackend>(&self, student_logits: Tensor<B, 2>,
            teacher_logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
            self.try_forward(student_logits, teacher_logits, targets)
        }
    }

    /// [`DistillLoss::forward`] that returns an error instead of panicking.
    pub fn try_forward<B: DistillBackend>(
        &self,
        student_logits: Tensor<B, 2>,
        teacher_logits: Tensor<B, 2>,
        targets: Tensor<B, 1, Int>,
    ) -> Result<Tensor<B, 1>, DistillError> {
        self.try_forward_parts(student_logits, teacher_logits, Some(targets))
            .map(|out| out.loss)
    }

    panicking! {
        /// Soft term only (no labels) of `[N, V]` logits: every row counts.
        ///
        /// # Panics
        /// If the shapes differ or are empty.
        pub fn forward_soft<B: DistillBackend>(&self, student_logits: Tensor<B, 2>,
            teacher_logits: Tensor<B, 2>) -> Tensor<B, 1> {
            self.try_forward_parts(student_logits, teacher_logits, None).loss
        }

        /// The loss and its soft and hard parts, from one computation.
        ///
        /// # Panics
        /// As [`DistillLoss::forward`].
        pub fn forward_parts<B: DistillBackend>(&self, student_logits: Tensor<B, 2>,
            teacher_logits: Tensor<B, 2>, targets: Option<Tensor<B, 1, Int>>) -> DistillOutput<B> {
            self.try_forward_parts(student_logits, teacher_logits, targets)
        }

        /// Sequence form: `[B, T, V]` logits against `[B, T]` targets (prompt or padding tokens
        /// set to the ignore index). `Mean` averages over the non-ignored tokens of the whole
        /// batch; `PerRow` returns the `B·T` token losses flattened row-major (reshape them to
        /// `[B, T]`).
        ///
        /// # Panics
        /// On bad shapes or out-of-range targets, with the message of
        /// [`DistillLoss::try_forward_parts`].
        pub fn forward_seq<B: DistillBackend>(&self, student_logits: Tensor<B, 3>,
            teacher_logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
            self.try_forward_parts(student_logits, teacher_logits, Some(targets)).loss
        }

        /// Sequence form of [`DistillLoss::forward_soft`]: `[B, T, V]` logits, every token counts.
        ///
        /// # Panics
        /// If the shapes differ or are empty.
        pub fn forward_seq_soft<B: DistillBackend>(&self, student_logits: Tensor<B, 3>,
            teacher_logits: Tensor<B, 3>) -> Tensor<B, 1> {
            self.try_forward_parts(student_logits, teacher_logits, None).loss
        }
    }

    /// `c · tanh(z / c)` with this loss's soft-cap `c`, or `z` without one. Before the
    /// vocabulary alignment, so that `PadNegInf` columns stay `−∞`.
    pub(crate) fn soft_cap<B: Backend, const D: usize>(&self, z: Tensor<B, D>) -> Tensor<B, D> {
        match self.logit_softcap {
            // `· (1/c)`, not `/ c`: burn-autodiff 0.21 backpropagates `div_scalar` with `1/c`
            // rounded to f32.
            Some(c) => z.mul_scalar(c.recip()).tanh().mul_scalar(c),
            None => z,
        }
    }

    /// The loss and its parts, or an error naming the bad argument.
    ///
    /// # Shapes
    /// - rows (`D = 2`): `[N, V]` logits, optional `[N]` targets;
    /// - sequences (`D = 3`): `[B, T, V]` logits, optional `[B, T]` targets (prompt and
    ///   padding tokens set to the ignore index), taken as their `B·T` token rows;
    /// - output: `[1]`, or `[N]` (`[B·T]`, row-major) for `PerRow`.
    pub fn try_forward_parts<B: DistillBackend, const D: usize>(
        &self,
        student_logits: Tensor<B, D>,
        teacher_logits: Tensor<B, D>,
        targets: Option<RankTargets<B, D>>,
    ) -> Result<DistillOutput<B>, DistillError>
    where
        Rank<D>: TokenRank<B>,
    {
        let student_dims = student_logits.dims();
        let teacher_logits = flatten_like("teacher_logits", teacher_logits, student_dims)?;
        let (student_logits, targets) = flatten(student_logits, targets)?;
        self.rows_parts(
            self.soft_cap(student_logits),
            self.soft_cap(teacher_logits),
            targets,
        )
    }

    /// [`DistillLoss::try_forward_parts`] of logits already soft-capped.
    fn rows_parts<B: DistillBackend>(
        &self,
        student_logits: Tensor<B, 2>,
        teacher_logits: Tensor<B, 2>,
        targets: Option<Tensor<B, 1, Int>>,
    ) -> Result<DistillOutput<B>, DistillError> {
        let (student_logits, teacher_logits) =
            self.vocab_mismatch
                .align(student_logits, teacher_logits, self.params.divergence)?;
        let [n, v] = student_logits.dims();
        non_empty("student_logits", [n, v], "V")?;
        let teacher_dims = teacher_logits.dims();
        same_dims("teacher_logits", teacher_dims, "student_logits", [n, v], "")?;
        let check = self.check_targets(targets.as_ref(), [n, v])?;

        let (student, teacher) = (
            student_logits.into_primitive().tensor(),
            teacher_logits.into_primitive().tensor(),
        );
        if self.kernel == Kernel::Fused && !B::has_fused_kernel(&student, &teacher) {
            return Err(DistillError::invalid(
                "kernel",
                "Kernel::Fused",
                format!(
                    "Kernel::Auto or Kernel::Reference: backend {} has no fused distillation \
                     kernel for {:?} logits",
                    B::name(&B::float_device(&student)),
                    student.dtype()
                ),
            ));
        }
        let parts = B::distill_loss(
            student,
            teacher,
            targets.map(Tensor::into_primitive),
            &self.params,
            self.kernel,
        );
        Ok(DistillOutput::from(parts).with_check(check))
    }
}

impl DistillLoss {
    /// Optional `[N]` targets of `[N, classes]` logits, checked as [`check_row_targets`] with
    /// this loss's validation mode and ignore index.
    pub(crate) fn check_targets<B: Backend>(
        &self,
        targets: Option<&Tensor<B, 1, Int>>,
        dims: [usize; 2],
    ) -> Result<Option<DeviceCheck<B>>, DistillError> {
        let (validation, ignore) = (self.validation, self.params.ignore_index);
        targets.map_or(Ok(None), |t| check_row_targets(t, dims, validation, ignore))
    }
}

/// `[N]` targets of `[N, V]` logits: the shape now, the values as `validation` says (the
/// returned check is the deferred one).
pub(crate) fn check_row_targets<B: Backend>(
    targets: &Tensor<B, 1, Int>,
    [rows, classes]: [usize; 2],
    validation: Validation,
    ignore_index: Option<i64>,
) -> Result<Option<DeviceCheck<B>>, DistillError> {
    if targets.dims() != [rows] {
        return Err(DistillError::invalid(
            "targets",
            format!("shape {:?}", targets.dims()),
            format!("shape [{rows}] (one class index per row of the logits)"),
        ));
    }
    if validation == Validation::Off {
        return Ok(None);
    }
    target_check(targets, classes, ignore_index).apply(validation)
}

/// The targets' check: `[1]` number of targets outside `[0, classes)` that are not the ignore
/// index, counted on the device; the host scan for the first one runs only when it is not 0.
fn target_check<B: Backend>(
    targets: &Tensor<B, 1, Int>,
    classes: usize,
    ignore_index: Option<i64>,
) -> DeviceCheck<B> {
    index_check(targets, classes, ignore_index, move |row, value| {
        DistillError::TargetOutOfRange {
            row,
            value,
            classes,
            ignore_index,
        }
    })
}
