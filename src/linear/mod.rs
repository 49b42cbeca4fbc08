//! Fused-linear distillation: the loss straight from hidden states and LM heads, chunk by chunk
//! of rows, so that the `[N, V]` logits of the student and the teacher never exist at once.
//!
//! Per chunk of `c` kept rows: `z_s = h_s W_s + b_s` and `z_t = h_t W_t + b_t` (`[c, V]`), the
//! fused loss kernel of the backend on them, which also returns `g = ∂loss/∂z_s`; then, when
//! the student is trained, `∂h_s = g W_sᵀ`, `∂W_s += h_sᵀ g`, `∂b_s += Σ_rows g`, all in the
//! forward pass. The backward pass only scales the stored gradients by the upstream gradient
//! (as Liger-Kernel's fused-linear losses do). Extra memory: three `[c, V]` chunks (four with a
//! logit soft-cap, whose `tanh` is kept for the gradient) plus the gradients of the student's
//! parameters, which training needs anyway.
//!
//! `chunks` holds the backend-generic form (burn tensor ops per chunk), which wgpu, CUDA
//! and burn's fusion wrapper run. NdArray and Flex override
//! [`DistillBackend::distill_linear_chunked`] with the host loop of `kernel::linear_cpu`
//! (buffers allocated once, `∂W_s` accumulated in place, three `[c, V]` buffers even with a
//! cap). The tests hold the host loop (NdArray, Flex) and this form (wgpu, and
//! `Kernel::Reference` everywhere) to the materialised loss.

use burn::nn::Linear;
use burn::tensor::{Int, Tensor, backend::Backend};

use crate::{
    DistillBackend, DistillError, DistillLoss, DistillOutput, Kernel,
    error::panicking,
    rank::{Rank, RankTargets, TokenRank, flatten, flatten_like},
};

mod chunks;

use crate::LinearCall;
pub(crate) use crate::backend::{LinearGrads, LinearOutput, LinearSetup, LinearSide};
#[cfg(feature = "collective")]
pub(crate) use chunks::DenseChunks;
pub(crate) use chunks::{ChunkTeacher, chunked_with, float, logits};
use chunks::{Chunks, materialised};

/// The student's and teacher's sides of a fused-linear loss, checked: `[N, H]` hidden states
/// matching their heads' input width, one number of rows; the teacher detached.
pub(crate) fn linear_sides<B: Backend>(
    student_hidden: Tensor<B, 2>,
    student_head: &Linear<B>,
    teacher_hidden: Tensor<B, 2>,
    teacher_head: &Linear<B>,
) -> Result<(LinearSide<B>, LinearSide<B>), DistillError> {
    let side = |hidden: Tensor<B, 2>, head: &Linear<B>, name: &str| {
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
        Ok(LinearSide {
            hidden: hidden.into_primitive().tensor(),
            weight: weight.into_primitive().tensor(),
            bias: head
                .bias
                .as_ref()
                .map(|b| b.val().into_primitive().tensor()),
        })
    };
    let [n, _] = student_hidden.dims();
    let [nt, _] = teacher_hidden.dims();
    if nt != n {
        return Err(DistillError::invalid(
            "teacher_hidden",
            format!("shape {:?}", teacher_hidden.dims()),
            format!("{n} rows, as student_hidden"),
        ));
    }
    let student = side(student_hidden, student_head, "student")?;
    let teacher = side(teacher_hidden.detach(), teacher_head, "teacher")?;
    let teacher = LinearSide {
        weight: float::<B, 2>(teacher.weight)
            .detach()
            .into_primitive()
            .tensor(),
        bias: teacher
            .bias
            .map(|b| float::<B, 1>(b).detach().into_primitive().tensor()),
        ..teacher
    };
    Ok((student, teacher))
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

    panicking! {
        /// The loss from hidden states and LM heads, without ever holding the `[N, V]` logits:
        /// `forward(student_hidden · W_s + b_s, teacher_hidden · W_t + b_t, targets)`, computed
        /// chunk by chunk of rows (see [`DistillLossConfig::linear_chunk_rows`]). Ignored rows are
        /// dropped before the matmuls. Gradients reach `student_hidden` and the student head's
        /// weight and bias; the teacher and its head get none.
        ///
        /// # Shapes
        /// - `student_hidden`: `[N, H_s]`, `student_head`: `Linear` `H_s → V_s`
        /// - `teacher_hidden`: `[N, H_t]`, `teacher_head`: `Linear` `H_t → V_t` (`V_t ≠ V_s` only
        ///   with a [`VocabMismatch`](crate::VocabMismatch) policy)
        /// - `targets`: `[N]`; output as [`DistillLoss::forward`]
        ///
        /// ```
        /// use burn::backend::{Autodiff, NdArray};
        /// use burn::nn::LinearConfig;
        /// use burn::tensor::{Int, Tensor};
        /// use burn_distill::DistillLossConfig;
        ///
        /// type B = Autodiff<NdArray>;
        /// let device = Default::default();
        /// let student_head = LinearConfig::new(2, 3).init::<B>(&device);
        /// let teacher_head = LinearConfig::new(4, 3).init::<B>(&device);
        /// let hs = Tensor::<B, 2>::from_floats([[1.0, -0.5], [0.3, 2.0]], &device).require_grad();
        /// let ht = Tensor::<B, 2>::from_floats([[0.2, 1.0, -1.0, 0.5], [1.5, 0.0, 0.4, -0.3]], &device);
        /// let targets = Tensor::<B, 1, Int>::from_ints([2, 0], &device);
        /// // One row per chunk here; by default from a 64 MiB budget.
        /// let loss = DistillLossConfig::new().with_linear_chunk_rows(Some(1)).init();
        ///
        /// let fused = loss.forward_linear(hs.clone(), &student_head, ht.clone(), &teacher_head, targets.clone());
        /// let logits = loss.forward(student_head.forward(hs.clone()), teacher_head.forward(ht), targets);
        /// let (a, b) = (fused.clone().into_scalar(), logits.into_scalar());
        /// assert!((a - b).abs() < 1e-5 && a > 0.0);
        /// let grads = fused.backward();
        /// assert_eq!(student_head.weight.val().grad(&grads).unwrap().dims(), [2, 3]);
        /// assert_eq!(hs.grad(&grads).unwrap().dims(), [2, 2]);
        /// ```
        ///
        /// # Panics
        /// On bad shapes or targets, with the message of [`DistillLoss::try_forward_linear_parts`].
        ///
        /// [`DistillLossConfig::linear_chunk_rows`]: crate::DistillLossConfig::linear_chunk_rows
        pub fn forward_linear<B: DistillBackend>(&self, student_hidden: Tensor<B, 2>,
            student_head: &Linear<B>, teacher_hidden: Tensor<B, 2>, teacher_head: &Linear<B>,
            targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
            self.try_forward_linear_parts(student_hidden, student_head, teacher_hidden,
                teacher_head, Some(targets)).loss
        }

        /// [`DistillLoss::forward_linear`] without labels (soft term only; every row counts).
        ///
        /// # Panics
        /// As [`DistillLoss::forward_linear`].
        pub fn forward_linear_soft<B: DistillBackend>(&self, student_hidden: Tensor<B, 2>,
            student_head: &Linear<B>, teacher_hidden: Tensor<B, 2>, teacher_head: &Linear<B>
        ) -> Tensor<B, 1> {
            self.try_forward_linear_parts(student_hidden, student_head, teacher_hidden,
                teacher_head, None).loss
        }

        /// Sequence form of [`DistillLoss::forward_linear`]: `[B, T, H]` hidden states and
        /// `[B, T]` targets.
        ///
        /// # Panics
        /// As [`DistillLoss::forward_linear`].
        pub fn forward_linear_seq<B: DistillBackend>(&self, student_hidden: Tensor<B, 3>,
            student_head: &Linear<B>, teacher_hidden: Tensor<B, 3>, teacher_head: &Linear<B>,
            targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
            self.try_forward_linear_parts(student_hidden, student_head, teacher_hidden,
                teacher_head, Some(targets)).loss
        }
    }

    /// The fused-linear loss and its parts, or an error naming the bad argument.
    ///
    /// # Shapes
    /// - rows (`D = 2`): `[N, H_s]` and `[N, H_t]` hidden states, optional `[N]` targets;
    /// - sequences (`D = 3`): `[B, T, H_s]` and `[B, T, H_t]` hidden states, optional `[B, T]`
    ///   targets, taken as `B·T` token rows;
    /// - heads: burn's `Linear` (`[H, V]` weight, optional `[V]` bias);
    /// - output: `[1]`, or `[N]` (`[B·T]`, row-major) for `PerRow`.
    pub fn try_forward_linear_parts<B: DistillBackend, const D: usize>(
        &self,
        student_hidden: Tensor<B, D>,
        student_head: &Linear<B>,
        teacher_hidden: Tensor<B, D>,
        teacher_head: &Linear<B>,
        targets: Option<RankTargets<B, D>>,
    ) -> Result<DistillOutput<B>, DistillError>
    where
        Rank<D>: TokenRank<B>,
    {
        let student_dims = student_hidden.dims();
        let teacher_hidden = flatten_like("teacher_hidden", teacher_hidden, student_dims)?;
        let (student_hidden, targets) = flatten(student_hidden, targets)?;
        let vs = student_head.weight.dims()[1];
        let vt = teacher_head.weight.dims()[1];
        // Targets index the aligned vocabulary, as in `forward` on the logits.
        let classes = self
            .vocab_mismatch
            .aligned_width(vs, vt, self.params.divergence)?;
        let n = student_hidden.dims()[0];
        let dtype = student_hidden.dtype();
        let device = student_hidden.device();
        let (student, teacher) =
            linear_sides(student_hidden, student_head, teacher_hidden, teacher_head)?;
        if self.kernel == Kernel::Fused && !B::fused_kernel_dtypes().contains(&dtype) {
            return Err(DistillError::invalid(
                "kernel",
                "Kernel::Fused",
                format!(
                    "Kernel::Auto or Kernel::Reference: backend {} has no fused distillation \
                     kernel for {dtype:?} logits",
                    B::name(&device),
                ),
            ));
        }
        let check = self.check_targets(targets.as_ref(), [n, classes])?;
        let setup = self.linear_setup(self.linear_chunk_rows::<B>(vs.max(vt)));
        let targets = targets.map(Tensor::into_primitive);
        let call = LinearCall::new(student, teacher, targets, setup);
        let tracked = B::distill_linear_tracked(&Chunks, call.clone())?;
        // No fused kernel for a gradient, or `Reduction::PerRow` with one: the logits,
        // through the backend's own ops (and so through autodiff).
        let parts = tracked.unwrap_or_else(|| materialised::<B>(call));
        Ok(DistillOutput::from(parts).with_check(check))
    }
}
