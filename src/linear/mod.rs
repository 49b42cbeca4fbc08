//! Fused-linear distillation: the loss straight from hidden states and LM heads, chunk by chunk
//! of rows, so that the `[N, V]` logits of the student and the teacher never exist at once.
//!
//! Per chunk of `c` kept rows: `z_s = h_s W_s + b_s` and `z_t = h_t W_t + b_t` (`[c, V]`), the
//! fused loss kernel of the device on them, which also returns `g = ∂loss/∂z_s`; then, when
//! the student is trained, `∂h_s = g W_sᵀ`, `∂W_s += h_sᵀ g`, `∂b_s += 1ᵀ g`, all in the forward
//! pass, on tensors without autodiff. One backward node carries the three gradients; the
//! backward pass only scales them by the upstream gradient (as Liger-Kernel's fused-linear
//! losses do). Extra memory: three `[c, V]` chunks (four with a logit soft-cap, whose `tanh` is
//! kept for the gradient) plus the gradients of the student's parameters, which training needs
//! anyway. Where no fused kernel gives a chunk's gradient (`Kernel::Reference`, a device without
//! one, `Reduction::PerRow` with a gradient) the logits are materialised and autodiff runs.

use burn::nn::Linear;
use burn::tensor::{Int, Tensor};

use crate::{
    DistillError, DistillLoss, DistillOutput, DistillParams, Kernel, VocabMismatch,
    backend::{self, DistillParts},
    error::or_panic,
    rank::{Rank, RankTargets, TokenRank, flat_rows, same_lead},
    validation::DeviceCheck,
};

mod chunks;
mod sparse;

use chunks::soft_cap;
pub(crate) use chunks::{
    CHUNKED_CALLS, ChunkTeacher, DenseChunks, LinearGrads, SparseChunks, chunked, logits,
};

/// How a fused-linear loss runs: the loss parameters, the kernel choice, the vocabulary policy
/// and the number of rows per chunk (all validated by [`DistillLoss`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct LinearSetup {
    pub(crate) params: DistillParams,
    pub(crate) kernel: Kernel,
    pub(crate) vocab_mismatch: VocabMismatch,
    pub(crate) chunk_rows: usize,
    pub(crate) logit_softcap: Option<f64>,
    pub(crate) weight_grad: bool,
    pub(crate) bias_grad: bool,
}

/// One side of a fused-linear loss (student or teacher): `[N, H]` hidden states and an
/// `[H, V]` head (burn's `Linear` layout) with an optional `[V]` bias.
#[derive(Clone, Debug)]
pub(crate) struct Side {
    pub(crate) hidden: Tensor<2>,
    pub(crate) weight: Tensor<2>,
    pub(crate) bias: Option<Tensor<1>>,
}

impl Side {
    /// `[N, H]` rows and a head, checked: the head's input width, at least one row and column.
    pub(crate) fn new(hidden: Tensor<2>, head: &Linear, name: &str) -> Result<Self, DistillError> {
        let weight = head.weight.val();
        let [n, h] = hidden.dims();
        let [wh, v] = weight.dims();
        if n == 0 || h != wh || v == 0 {
            return Err(DistillError::invalid(
                format!("{name}_hidden"),
                format!("shape [{n}, {h}] with a head of weight [{wh}, {v}]"),
                format!("[N >= 1, {wh}] rows for the {name} head ({wh} → {v})"),
            ));
        }
        Ok(Self {
            hidden,
            weight,
            bias: head.bias.as_ref().map(|b| b.val()),
        })
    }

    /// Does any tensor of this side record a gradient?
    pub(crate) fn is_tracked(&self) -> bool {
        self.hidden.is_tracked()
            || self.weight.is_tracked()
            || self.bias.as_ref().is_some_and(Tensor::is_tracked)
    }

    /// The side on the inner device, without autodiff (the chunks' tensors).
    pub(crate) fn inner(&self) -> Self {
        Self {
            hidden: self.hidden.clone().inner(),
            weight: self.weight.clone().inner(),
            bias: self.bias.clone().map(Tensor::inner),
        }
    }

    /// The side detached (the teacher).
    pub(crate) fn detach(self) -> Self {
        Self {
            hidden: self.hidden.detach(),
            weight: self.weight.detach(),
            bias: self.bias.map(Tensor::detach),
        }
    }

    /// `z = h W + b`, soft-capped with `cap`, through autodiff (the materialised path);
    /// `weight_grad` false: the head gets no gradient (frozen or tied).
    pub(crate) fn logits(&self, cap: Option<f64>, weight_grad: bool) -> Tensor<2> {
        let keep = |t: Tensor<2>| if weight_grad { t } else { t.detach() };
        let bias = self
            .bias
            .clone()
            .map(|b| if weight_grad { b } else { b.detach() });
        soft_cap(
            logits(self.hidden.clone(), &keep(self.weight.clone()), &bias),
            cap,
        )
        .0
    }
}

/// A fused-linear loss from the chunks of `student` against `teacher` (inner tensors), with
/// the student's gradients attached to its tracked inputs as one backward node; `None` where
/// the chunks cannot give them (the caller materialises the logits).
pub(crate) fn run_chunks(
    student: &Side,
    teacher: impl ChunkTeacher,
    targets: Option<Tensor<1, Int>>,
    setup: &LinearSetup,
) -> Option<DistillParts> {
    let with_grad = student.is_tracked();
    let autodiff = student.hidden.is_autodiff();
    let targets = targets.map(Tensor::inner);
    let inner = student.inner();
    let (parts, grads) = match host(&inner, &teacher, targets.as_ref(), setup, with_grad) {
        Some(out) => out,
        None => chunked(inner, teacher, targets, setup, with_grad)?,
    };
    let lift = |t: Tensor<1>| if autodiff { t.autodiff() } else { t };
    let loss = match grads {
        Some(g) => backend::attach(
            parts.loss,
            (student.hidden.clone(), Some(g.hidden)),
            (student.weight.clone(), g.weight),
            student.bias.clone().map(|b| (b, g.bias)),
        ),
        None => lift(parts.loss),
    };
    Some(DistillParts {
        loss,
        soft: lift(parts.soft),
        hard: parts.hard.map(lift),
    })
}

/// The device's host loop (Flex), where it runs the loss.
#[cfg(feature = "flex")]
fn host(
    student: &Side,
    teacher: &impl ChunkTeacher,
    targets: Option<&Tensor<1, Int>>,
    setup: &LinearSetup,
    with_grad: bool,
) -> Option<(DistillParts, Option<LinearGrads>)> {
    let plan = backend::HostLinearPlan {
        params: setup.params,
        kernel: setup.kernel,
        aligned: teacher.aligned(student.weight.dims()[1]),
        cap: setup.logit_softcap,
        chunk_rows: setup.chunk_rows,
        with_grad,
        weight_grad: setup.weight_grad,
        bias_grad: setup.bias_grad,
    };
    let side = (
        student.hidden.clone(),
        student.weight.clone(),
        student.bias.clone(),
    );
    let (parts, grads) = backend::linear_host(&side, &teacher.host(), targets, &plan)?;
    let grads = grads.map(|(hidden, weight, bias)| LinearGrads {
        hidden,
        weight,
        bias,
    });
    Some((parts, grads))
}

/// No host loop without Flex.
#[cfg(not(feature = "flex"))]
fn host(
    _: &Side,
    _: &impl ChunkTeacher,
    _: Option<&Tensor<1, Int>>,
    _: &LinearSetup,
    _: bool,
) -> Option<(DistillParts, Option<LinearGrads>)> {
    None
}

impl DistillLoss {
    /// How this loss's fused-linear forms run, `chunk_rows` kept rows at a time.
    pub(crate) fn linear_setup(&self, chunk_rows: usize) -> LinearSetup {
        LinearSetup {
            params: self.params,
            kernel: self.kernel,
            vocab_mismatch: self.vocab_mismatch,
            chunk_rows,
            logit_softcap: self.logit_softcap,
            weight_grad: self.linear_head_grad,
            bias_grad: self.linear_head_grad,
        }
    }

    /// Rows per chunk of the fused-linear losses for a vocabulary of `v` columns on `device`.
    pub fn linear_chunk_rows(&self, v: usize, device: &burn::tensor::Device) -> usize {
        let buffers = if self.logit_softcap.is_some() { 4 } else { 3 };
        self.linear_chunk_rows_with(v, buffers, device)
    }

    /// [`DistillLoss::linear_chunk_rows`] for a loss that keeps `buffers` f32 `[c, V]`
    /// buffers per chunk.
    pub(crate) fn linear_chunk_rows_with(
        &self,
        v: usize,
        buffers: usize,
        device: &burn::tensor::Device,
    ) -> usize {
        let budget = self
            .linear_chunk_bytes
            .unwrap_or_else(|| backend::linear_chunk_bytes(device));
        self.linear_chunk_rows
            .unwrap_or_else(|| budget / (buffers * 4 * v.max(1)))
            .max(1)
    }

    /// The loss from hidden states and LM heads, without ever holding the `[N, V]` logits:
    /// `forward(student_hidden · W_s + b_s, teacher_hidden · W_t + b_t, targets)`, computed
    /// chunk by chunk of rows (see [`DistillLossConfig::linear_chunk_rows`]). Ignored rows are
    /// dropped before the matmuls. Gradients reach `student_hidden` and the student head's
    /// weight and bias; the teacher and its head get none.
    ///
    /// # Shapes
    /// - `student_hidden`: `[N, H_s]`, `student_head`: `Linear` `H_s → V_s`
    /// - `teacher_hidden`: `[N, H_t]`, `teacher_head`: `Linear` `H_t → V_t` (`V_t ≠ V_s` only
    ///   with a [`VocabMismatch`] policy)
    /// - `targets`: `[N]`; output as [`DistillLoss::forward`]
    ///
    /// ```
    /// use burn::nn::LinearConfig;
    /// use burn::tensor::{Device, Int, Tensor};
    /// use burn_distill::DistillLossConfig;
    ///
    /// let device = Device::default().autodiff();
    /// let student_head = LinearConfig::new(2, 3).init(&device);
    /// let teacher_head = LinearConfig::new(4, 3).init(&device);
    /// let hs = Tensor::<2>::from_floats([[1.0, -0.5], [0.3, 2.0]], &device).require_grad();
    /// let ht = Tensor::<2>::from_floats([[0.2, 1.0, -1.0, 0.5], [1.5, 0.0, 0.4, -0.3]], &device);
    /// let targets = Tensor::<1, Int>::from_ints([2, 0], &device);
    /// // One row per chunk here; by default from a 64 MiB budget.
    /// let loss = DistillLossConfig::new().with_linear_chunk_rows(Some(1)).init();
    ///
    /// let fused =
    ///     loss.forward_linear(hs.clone(), &student_head, ht.clone(), &teacher_head, targets.clone());
    /// let logits = loss.forward(student_head.forward(hs.clone()), teacher_head.forward(ht), targets);
    /// let (a, b) = (fused.clone().into_scalar::<f32>(), logits.into_scalar::<f32>());
    /// assert!((a - b).abs() < 1e-5 && a > 0.0);
    /// let grads = fused.backward();
    /// assert_eq!(student_head.weight.val().grad(&grads).unwrap().dims(), [2, 3]);
    /// assert_eq!(hs.grad(&grads).unwrap().dims(), [2, 2]);
    /// ```
    ///
    /// # Panics
    /// On bad shapes or targets, with the message of [`DistillLoss::try_forward_linear`], at
    /// the caller's line.
    ///
    /// [`DistillLossConfig::linear_chunk_rows`]: crate::DistillLossConfig::linear_chunk_rows
    #[track_caller]
    pub fn forward_linear(
        &self,
        student_hidden: Tensor<2>,
        student_head: &Linear,
        teacher_hidden: Tensor<2>,
        teacher_head: &Linear,
        targets: Tensor<1, Int>,
    ) -> Tensor<1> {
        let heads = (student_head, teacher_head);
        or_panic(self.linear_parts(student_hidden, teacher_hidden, heads, Some(targets))).loss
    }

    /// [`DistillLoss::forward_linear`] that returns an error instead of panicking.
    pub fn try_forward_linear(
        &self,
        student_hidden: Tensor<2>,
        student_head: &Linear,
        teacher_hidden: Tensor<2>,
        teacher_head: &Linear,
        targets: Tensor<1, Int>,
    ) -> Result<Tensor<1>, DistillError> {
        let heads = (student_head, teacher_head);
        Ok(self
            .linear_parts(student_hidden, teacher_hidden, heads, Some(targets))?
            .loss)
    }

    /// [`DistillLoss::forward_linear`] without labels (soft term only; every row counts).
    ///
    /// # Panics
    /// As [`DistillLoss::forward_linear`].
    #[track_caller]
    pub fn forward_linear_soft(
        &self,
        student_hidden: Tensor<2>,
        student_head: &Linear,
        teacher_hidden: Tensor<2>,
        teacher_head: &Linear,
    ) -> Tensor<1> {
        let heads = (student_head, teacher_head);
        or_panic(self.linear_parts(student_hidden, teacher_hidden, heads, None)).loss
    }

    /// [`DistillLoss::forward_linear_soft`] that returns an error instead of panicking.
    pub fn try_forward_linear_soft(
        &self,
        student_hidden: Tensor<2>,
        student_head: &Linear,
        teacher_hidden: Tensor<2>,
        teacher_head: &Linear,
    ) -> Result<Tensor<1>, DistillError> {
        let heads = (student_head, teacher_head);
        Ok(self
            .linear_parts(student_hidden, teacher_hidden, heads, None)?
            .loss)
    }

    /// The fused-linear loss with its soft and hard parts; `targets` `None` for the soft term
    /// alone.
    ///
    /// # Panics
    /// As [`DistillLoss::forward_linear`].
    #[track_caller]
    pub fn forward_linear_parts(
        &self,
        student_hidden: Tensor<2>,
        student_head: &Linear,
        teacher_hidden: Tensor<2>,
        teacher_head: &Linear,
        targets: Option<Tensor<1, Int>>,
    ) -> DistillOutput {
        let heads = (student_head, teacher_head);
        or_panic(self.linear_parts(student_hidden, teacher_hidden, heads, targets))
    }

    /// [`DistillLoss::forward_linear_parts`] that returns an error instead of panicking.
    pub fn try_forward_linear_parts(
        &self,
        student_hidden: Tensor<2>,
        student_head: &Linear,
        teacher_hidden: Tensor<2>,
        teacher_head: &Linear,
        targets: Option<Tensor<1, Int>>,
    ) -> Result<DistillOutput, DistillError> {
        let heads = (student_head, teacher_head);
        self.linear_parts(student_hidden, teacher_hidden, heads, targets)
    }

    /// Sequence form of [`DistillLoss::forward_linear`]: `[B, T, H]` hidden states and
    /// `[B, T]` targets.
    ///
    /// # Panics
    /// As [`DistillLoss::forward_linear`].
    #[track_caller]
    pub fn forward_linear_seq(
        &self,
        student_hidden: Tensor<3>,
        student_head: &Linear,
        teacher_hidden: Tensor<3>,
        teacher_head: &Linear,
        targets: Tensor<2, Int>,
    ) -> Tensor<1> {
        let heads = (student_head, teacher_head);
        or_panic(self.linear_parts(student_hidden, teacher_hidden, heads, Some(targets))).loss
    }

    /// [`DistillLoss::forward_linear_seq`] that returns an error instead of panicking.
    pub fn try_forward_linear_seq(
        &self,
        student_hidden: Tensor<3>,
        student_head: &Linear,
        teacher_hidden: Tensor<3>,
        teacher_head: &Linear,
        targets: Tensor<2, Int>,
    ) -> Result<Tensor<1>, DistillError> {
        let heads = (student_head, teacher_head);
        Ok(self
            .linear_parts(student_hidden, teacher_hidden, heads, Some(targets))?
            .loss)
    }

    /// Sequence form of [`DistillLoss::forward_linear_soft`].
    ///
    /// # Panics
    /// As [`DistillLoss::forward_linear`].
    #[track_caller]
    pub fn forward_linear_seq_soft(
        &self,
        student_hidden: Tensor<3>,
        student_head: &Linear,
        teacher_hidden: Tensor<3>,
        teacher_head: &Linear,
    ) -> Tensor<1> {
        let heads = (student_head, teacher_head);
        or_panic(self.linear_parts(student_hidden, teacher_hidden, heads, None)).loss
    }

    /// [`DistillLoss::forward_linear_seq_soft`] that returns an error instead of panicking.
    pub fn try_forward_linear_seq_soft(
        &self,
        student_hidden: Tensor<3>,
        student_head: &Linear,
        teacher_hidden: Tensor<3>,
        teacher_head: &Linear,
    ) -> Result<Tensor<1>, DistillError> {
        let heads = (student_head, teacher_head);
        Ok(self
            .linear_parts(student_hidden, teacher_hidden, heads, None)?
            .loss)
    }

    /// Sequence form of [`DistillLoss::forward_linear_parts`].
    ///
    /// # Panics
    /// As [`DistillLoss::forward_linear`].
    #[track_caller]
    pub fn forward_linear_seq_parts(
        &self,
        student_hidden: Tensor<3>,
        student_head: &Linear,
        teacher_hidden: Tensor<3>,
        teacher_head: &Linear,
        targets: Option<Tensor<2, Int>>,
    ) -> DistillOutput {
        let heads = (student_head, teacher_head);
        or_panic(self.linear_parts(student_hidden, teacher_hidden, heads, targets))
    }

    /// [`DistillLoss::forward_linear_seq_parts`] that returns an error instead of panicking.
    pub fn try_forward_linear_seq_parts(
        &self,
        student_hidden: Tensor<3>,
        student_head: &Linear,
        teacher_hidden: Tensor<3>,
        teacher_head: &Linear,
        targets: Option<Tensor<2, Int>>,
    ) -> Result<DistillOutput, DistillError> {
        let heads = (student_head, teacher_head);
        self.linear_parts(student_hidden, teacher_hidden, heads, targets)
    }

    /// Every fused-linear form, at either rank.
    fn linear_parts<const D: usize>(
        &self,
        student_hidden: Tensor<D>,
        teacher_hidden: Tensor<D>,
        (student_head, teacher_head): (&Linear, &Linear),
        targets: Option<RankTargets<D>>,
    ) -> Result<DistillOutput, DistillError>
    where
        Rank<D>: TokenRank,
    {
        let dims = student_hidden.dims();
        same_lead("teacher_hidden", teacher_hidden.dims(), dims)?;
        let lead = &dims[..D - 1];
        let targets = targets
            .map(|t| <Rank<D> as TokenRank>::flat_targets(t, lead))
            .transpose()?;
        let (student_hidden, teacher_hidden) =
            (flat_rows(student_hidden), flat_rows(teacher_hidden));
        let [n, _] = student_hidden.dims();
        if teacher_hidden.dims()[0] != n {
            return Err(DistillError::invalid(
                "teacher_hidden",
                format!("shape {:?}", teacher_hidden.dims()),
                format!("{n} rows, as student_hidden"),
            ));
        }
        let (vs, vt) = (student_head.weight.dims()[1], teacher_head.weight.dims()[1]);
        // Targets index the aligned vocabulary, as in `forward` on the logits.
        let classes = self
            .vocab_mismatch
            .aligned_width(vs, vt, self.params.divergence)?;
        let device = student_hidden.device();
        let dtype = student_hidden.dtype();
        let student = Side::new(student_hidden, student_head, "student")?;
        let teacher = Side::new(teacher_hidden, teacher_head, "teacher")?.detach();
        if self.kernel == Kernel::Fused && !backend::has_fused_kernel(&device, dtype) {
            return Err(DistillError::invalid(
                "kernel",
                "Kernel::Fused",
                format!(
                    "Kernel::Auto or Kernel::Reference: device {device:?} has no fused \
                     distillation kernel for {dtype:?} logits"
                ),
            ));
        }
        let check: Option<DeviceCheck> = self.check_targets(targets.as_ref(), classes, lead)?;
        let setup = self.linear_setup(self.linear_chunk_rows(vs.max(vt), &device));
        let chunks = DenseChunks::new(teacher.inner(), &setup);
        let parts = match run_chunks(&student, chunks, targets.clone(), &setup) {
            Some(parts) => parts,
            // No fused kernel for a gradient, or `Reduction::PerRow` with one: the logits,
            // through autodiff.
            None => self.materialised(&student, &teacher, targets, &setup)?,
        };
        Ok(DistillOutput::from(parts).with_check(check))
    }

    /// The same loss with the logits materialised (`[N, V]`), through autodiff: the fallback
    /// where no fused kernel applies, and the oracle of the tests.
    fn materialised(
        &self,
        student: &Side,
        teacher: &Side,
        targets: Option<Tensor<1, Int>>,
        setup: &LinearSetup,
    ) -> Result<DistillParts, DistillError> {
        let zs = student.logits(setup.logit_softcap, setup.weight_grad);
        let zt = teacher.logits(setup.logit_softcap, false);
        let (zs, zt) = setup
            .vocab_mismatch
            .align(zs, zt, setup.params.divergence)?;
        backend::dense(zs, zt.detach(), targets, &setup.params, setup.kernel)
    }
}
