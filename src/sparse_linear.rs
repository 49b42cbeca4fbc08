//! Sparse teachers without the student's logits: [`SparseDistillLoss::forward_linear`], the
//! sparse loss from the student's hidden states and LM head, chunk by chunk of rows, so that
//! the student's `[N, V]` logits (the largest tensor of a step with a stored or API teacher)
//! never exist.
//!
//! Per chunk of `c` kept rows: `z = h W + b` (`[c, V]`), the backend's fused sparse kernel
//! against the teacher's `c` rows, which also returns `g = ∂loss/∂z`; then `∂h = g Wᵀ`,
//! `∂W += hᵀ g`, `∂b += Σ_rows g`, all in the forward pass (the chunk loop of
//! [`crate::linear`], with the sparse teacher's rows cut like the student's; on NdArray and
//! Flex the host loop of `kernel::linear_cpu` around the sparse row kernel). A logit soft-cap
//! caps the student's logits in each chunk. Where no fused
//! sparse kernel applies (`Kernel::Reference`, `k` beyond the GPU kernel's, `PerRow` with a
//! gradient) the logits are materialised and the composed path runs.

use burn::nn::Linear;
use burn::tensor::{Bool, Int, Tensor, backend::Backend};

use crate::{
    DistillBackend, DistillError, DistillOutput, Kernel, SparseDistillLoss, SparseInputs,
    SparseLinearCall, SparseSetup, SparseTeacher,
    error::panicking,
    linear::{self, ChunkTeacher, LinearOutput, LinearSetup, LinearSide, float},
    rank::{Rank, RankTargets, TokenRank, flatten},
    reduction::{count, ignored_rows},
    validation::DeviceCheck,
};

/// A sparse teacher's rows, cut like the student's.
pub(crate) struct SparseChunks<B: Backend> {
    indices: Tensor<B, 2, Int>,
    log_probs: Tensor<B, 2>,
    mask: Option<Tensor<B, 2, Bool>>,
    setup: SparseSetup,
}

impl<B: Backend> SparseChunks<B> {
    pub(crate) fn new(teacher: SparseInputs<B>) -> Self {
        Self {
            indices: Tensor::from_primitive(teacher.indices),
            log_probs: float::<B, 2>(teacher.log_probs),
            mask: teacher.mask.map(Tensor::from_primitive),
            setup: teacher.setup,
        }
    }
}

impl<B: Backend> ChunkTeacher<B> for SparseChunks<B> {
    type Chunk = SparseInputs<B>;

    fn keep(self, index: &Tensor<B, 1, Int>) -> Self {
        Self {
            indices: self.indices.select(0, index.clone()),
            log_probs: self.log_probs.select(0, index.clone()),
            mask: self.mask.map(|m| m.select(0, index.clone())),
            setup: self.setup,
        }
    }

    fn chunk(
        &self,
        rows: core::ops::Range<usize>,
        zs: Tensor<B, 2>,
    ) -> (Tensor<B, 2>, SparseInputs<B>) {
        let chunk = SparseInputs {
            indices: self.indices.clone().slice(rows.clone()).into_primitive(),
            log_probs: self
                .log_probs
                .clone()
                .slice(rows.clone())
                .into_primitive()
                .tensor(),
            mask: self.mask.clone().map(|m| m.slice(rows).into_primitive()),
            setup: self.setup,
        };
        (zs, chunk)
    }
}

/// The sparse fused-linear loss's chunks on a backend: its fused-linear sparse kernel (the host
/// loop of NdArray and Flex) where it has one, [`chunked`] otherwise.
pub(crate) struct SparseRun;

impl crate::SparseLinearRun for SparseRun {
    fn run<B: DistillBackend>(&self, call: SparseLinearCall<B>) -> Option<LinearOutput<B>> {
        B::distill_sparse_linear_chunked(call.clone()).or_else(|| chunked::<B>(call))
    }
}

/// The sparse loss (and, with `with_grad`, the student's gradients) chunk by chunk on `B`;
/// `None` where `B` has no fused sparse kernel for these logits and `k`, for
/// `Kernel::Reference`, and for `Reduction::PerRow` with a gradient.
pub(crate) fn chunked<B: DistillBackend>(call: SparseLinearCall<B>) -> Option<LinearOutput<B>> {
    use burn::tensor::TensorMetadata;
    let k = call.teacher.indices.shape()[1];
    let dtype = call.student.hidden.dtype();
    if call.settings.kernel == Kernel::Reference || !B::has_sparse_fused_kernel(dtype, k) {
        return None;
    }
    let call = call.map(|s, t, y| (s, SparseChunks::new(t), y));
    let chunk_loss = |chunk| Ok::<_, std::convert::Infallible>(B::distill_sparse_fused(chunk));
    match linear::chunked_with(call, chunk_loss) {
        Ok(out) => out,
        Err(never) => match never {},
    }
}

impl SparseDistillLoss {
    panicking! {
        /// The sparse loss from the student's hidden states and LM head, without ever holding its
        /// `[N, V]` logits: `forward(student_hidden · W + b, teacher, targets)`, computed chunk by
        /// chunk of rows (the dense loss's `linear_chunk_rows` / `linear_chunk_bytes`, two `[c, V]`
        /// buffers per chunk). Every tail policy, divergence, reduction, `T_gen`, ignore index and
        /// validation mode of [`SparseDistillLoss::forward`] applies; gradients reach
        /// `student_hidden` and the head's weight and bias (not with `linear_head_grad(false)`,
        /// or a frozen head).
        ///
        /// # Shapes
        /// - `student_hidden`: `[N, H]`, `student_head`: `Linear` `H → V`
        /// - `teacher`: `N` rows of `k` entries; `targets`: `[N]`
        /// - output as [`SparseDistillLoss::forward`]
        ///
        /// ```
        /// use burn::backend::{Autodiff, NdArray};
        /// use burn::nn::LinearConfig;
        /// use burn::tensor::{Int, Tensor};
        /// use burn_distill::{DistillLossConfig, SparseDistillLossConfig, SparseTeacher};
        ///
        /// type B = Autodiff<NdArray>;
        /// let device = Default::default();
        /// let head = LinearConfig::new(2, 5).init::<B>(&device);
        /// let hidden = Tensor::<B, 2>::from_floats([[1.0, -0.5], [0.3, 2.0]], &device).require_grad();
        /// let teacher = SparseTeacher::new(
        ///     Tensor::<B, 2, Int>::from_ints([[0, 3], [2, 4]], &device),
        ///     Tensor::<B, 2>::from_floats([[-0.2, -2.0], [-0.5, -1.5]], &device),
        /// );
        /// let targets = Tensor::<B, 1, Int>::from_ints([0, 2], &device);
        /// let loss = SparseDistillLossConfig::new(DistillLossConfig::new().with_linear_chunk_rows(Some(1))).init();
        ///
        /// let fused = loss.forward_linear(hidden.clone(), &head, teacher.clone(), targets.clone());
        /// let logits = loss.forward(head.forward(hidden.clone()), teacher, targets);
        /// let (a, b) = (fused.clone().into_scalar(), logits.into_scalar());
        /// assert!((a - b).abs() < 1e-5 && a > 0.0);
        /// let grads = fused.backward();
        /// assert_eq!(head.weight.val().grad(&grads).unwrap().dims(), [2, 5]);
        /// assert_eq!(hidden.grad(&grads).unwrap().dims(), [2, 2]);
        /// ```
        ///
        /// # Panics
        /// On bad input, with the message of [`SparseDistillLoss::try_forward_linear_parts`].
        pub fn forward_linear<B: DistillBackend>(&self, student_hidden: Tensor<B, 2>,
            student_head: &Linear<B>, teacher: SparseTeacher<B>, targets: Tensor<B, 1, Int>
        ) -> Tensor<B, 1> {
            self.try_forward_linear_parts(student_hidden, student_head, teacher, Some(targets)).loss
        }

        /// [`SparseDistillLoss::forward_linear`] without labels (soft term only).
        ///
        /// # Panics
        /// As [`SparseDistillLoss::forward_linear`].
        pub fn forward_linear_soft<B: DistillBackend>(&self, student_hidden: Tensor<B, 2>,
            student_head: &Linear<B>, teacher: SparseTeacher<B>) -> Tensor<B, 1> {
            self.try_forward_linear_parts(student_hidden, student_head, teacher, None).loss
        }

        /// Sequence form of [`SparseDistillLoss::forward_linear`]: `[B, T, H]` hidden states, a
        /// teacher of `B·T` rows and `[B, T]` targets.
        ///
        /// # Panics
        /// As [`SparseDistillLoss::forward_linear`].
        pub fn forward_linear_seq<B: DistillBackend>(&self, student_hidden: Tensor<B, 3>,
            student_head: &Linear<B>, teacher: SparseTeacher<B>, targets: Tensor<B, 2, Int>
        ) -> Tensor<B, 1> {
            self.try_forward_linear_parts(student_hidden, student_head, teacher, Some(targets)
            ).loss
        }
    }

    /// The fused-linear sparse loss and its parts, or an error naming the bad argument.
    ///
    /// # Shapes
    /// - rows (`D = 2`): `[N, H]` hidden states, a teacher of `N` rows, optional `[N]` targets;
    /// - sequences (`D = 3`): `[B, T, H]` hidden states, a teacher of `B·T` rows, optional
    ///   `[B, T]` targets, taken as `B·T` token rows;
    /// - output: `[1]`, or `[N]` (`[B·T]`, row-major) for `PerRow`.
    pub fn try_forward_linear_parts<B: DistillBackend, const D: usize>(
        &self,
        student_hidden: Tensor<B, D>,
        student_head: &Linear<B>,
        teacher: SparseTeacher<B>,
        targets: Option<RankTargets<B, D>>,
    ) -> Result<DistillOutput<B>, DistillError>
    where
        Rank<D>: TokenRank<B>,
    {
        let (student_hidden, targets) = flatten(student_hidden, targets)?;
        let weight = student_head.weight.val();
        let [n, h] = student_hidden.dims();
        let [wh, v] = weight.dims();
        if n == 0 || h != wh || v == 0 {
            return Err(DistillError::invalid(
                "student_hidden",
                format!("shape [{n}, {h}] with a head of weight [{wh}, {v}]"),
                format!("[N >= 1, {wh}] rows for the student head ({wh} → {v})"),
            ));
        }
        let dtype = student_hidden.dtype();
        let k = teacher.dims()[1];
        let device = student_hidden.device();
        if self.dense.kernel == Kernel::Fused && !B::has_sparse_fused_kernel(dtype, k) {
            return Err(DistillError::invalid(
                "kernel",
                "Kernel::Fused",
                format!(
                    "Kernel::Auto or Kernel::Reference: backend {} has no fused \
                     sparse-teacher kernel for {dtype:?} logits and k = {k}",
                    B::name(&device),
                ),
            ));
        }
        self.check_teacher_shapes(&teacher, n)?;
        let target_check = self.dense.check_targets(targets.as_ref(), [n, v])?;
        let cap = self.dense.logit_softcap;
        let student = LinearSide {
            hidden: student_hidden.clone().into_primitive().tensor(),
            weight: weight.into_primitive().tensor(),
            bias: student_head
                .bias
                .as_ref()
                .map(|b| b.val().into_primitive().tensor()),
        };
        // Two `[c, V]` buffers per chunk, the student's logits and their gradient (and the
        // pre-cap logits under a cap).
        let rows = (self.dense).linear_chunk_rows_with::<B>(v, if cap.is_some() { 3 } else { 2 });
        let setup = LinearSetup {
            vocab_mismatch: crate::VocabMismatch::Error,
            ..self.dense.linear_setup(rows)
        };
        let y = targets.clone().map(Tensor::into_primitive);
        let call = SparseLinearCall::new(student, self.sparse_inputs(&teacher), y, setup);
        let parts = B::distill_sparse_linear_tracked(&SparseRun, call);
        let Some(parts) = parts else {
            // No fused sparse kernel here: the logits, through the composed path (a frozen or
            // tied head gets no gradient here either).
            let frozen = !self.dense.linear_head_grad;
            let weight = student_head.weight.val();
            let weight = if frozen { weight.detach() } else { weight };
            let bias = student_head
                .bias
                .as_ref()
                .map(|b| if frozen { b.val().detach() } else { b.val() });
            let logits = linear::logits(student_hidden, &weight, &bias);
            let out = self.try_forward_parts::<B, 2>(logits, teacher, targets)?;
            return Ok(out);
        };
        let output = DistillOutput::from(parts);
        // The fused kernels make a row with a bad teacher NaN: the NaN count is the check.
        let teacher_check = if self.dense.validation == crate::Validation::Off {
            None
        } else {
            let bad = count(output.loss.clone().is_nan()) + count(output.soft.clone().is_nan());
            let ignored = ignored_rows(targets.as_ref(), self.dense.params.ignore_index);
            let tail = self.tail;
            DeviceCheck::new(bad, move |_| {
                crate::sparse::first_bad_entry(&teacher, ignored.clone(), v, tail)
            })
            .apply(self.dense.validation)?
        };
        Ok(output.with_check(target_check).with_check(teacher_check))
    }
}
