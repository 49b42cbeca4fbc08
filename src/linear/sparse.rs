//! Sparse teachers without the student's logits: [`SparseDistillLoss::forward_linear`], the
//! sparse loss from the student's hidden states and LM head, chunk by chunk of rows, so that
//! the student's `[N, V]` logits (the largest tensor of a step with a stored or API teacher)
//! never exist.
//!
//! Per chunk of `c` kept rows: `z = h W + b` (`[c, V]`), the device's fused sparse kernel
//! against the teacher's `c` rows, which also returns `g = ∂loss/∂z`; then `∂h = g Wᵀ`,
//! `∂W += hᵀ g`, `∂b += 1ᵀ g`, all in the forward pass (the chunk loop of [`crate::linear`],
//! with the sparse teacher's rows cut like the student's). A logit soft-cap caps the
//! student's logits in each chunk. Where no fused sparse kernel applies (`Kernel::Reference`,
//! `k` beyond the GPU kernel's, `PerRow` with a gradient) the logits are materialised and the
//! composed path runs.

use burn::nn::Linear;
use burn::tensor::{Int, Tensor};

use super::{LinearSetup, Side, SparseChunks, run_chunks};
use crate::{
    DistillError, DistillOutput, Kernel, SparseDistillLoss, SparseTeacher, VocabMismatch, backend,
    error::or_panic,
    rank::{Rank, RankTargets, TokenRank, flat_rows},
    reduction::{count, ignored_rows},
    validation::DeviceCheck,
};

impl SparseDistillLoss {
    /// The sparse loss from the student's `[N, H]` hidden states and LM head against a
    /// `[N, k]` teacher, without the student's `[N, V]` logits: `forward(student_hidden ·
    /// W + b, teacher, targets)` computed chunk by chunk of rows (see
    /// [`DistillLossConfig::linear_chunk_rows`](crate::DistillLossConfig::linear_chunk_rows)).
    /// Gradients reach the hidden states and the head's weight and bias.
    ///
    /// ```
    /// use burn::nn::LinearConfig;
    /// use burn::tensor::{Device, Int, Tensor};
    /// use burn_distill::{DistillLossConfig, SparseDistillLossConfig, SparseTeacher};
    ///
    /// let device = Device::default().autodiff();
    /// let head = LinearConfig::new(2, 4).init(&device);
    /// let hs = Tensor::<2>::from_floats([[1.0, -0.5], [0.3, 2.0]], &device).require_grad();
    /// let teacher = SparseTeacher::new(
    ///     Tensor::<2, Int>::from_ints([[1, 0], [3, 2]], &device),
    ///     Tensor::<2>::from_floats([[-0.2, -2.0], [-0.5, -1.5]], &device),
    /// );
    /// let targets = Tensor::<1, Int>::from_ints([1, 3], &device);
    /// let loss = SparseDistillLossConfig::new(DistillLossConfig::new().with_linear_chunk_rows(Some(1)))
    ///     .init();
    /// let fused = loss.forward_linear(hs.clone(), &head, teacher.clone(), targets.clone());
    /// let logits = loss.forward(head.forward(hs.clone()), teacher, targets);
    /// let (a, b) = (fused.clone().into_scalar::<f32>(), logits.into_scalar::<f32>());
    /// assert!((a - b).abs() < 1e-5 && a > 0.0);
    /// let grads = fused.backward();
    /// assert_eq!(head.weight.val().grad(&grads).unwrap().dims(), [2, 4]);
    /// ```
    ///
    /// # Panics
    /// On bad input, with the message of [`SparseDistillLoss::try_forward_linear`], at the
    /// caller's line.
    #[track_caller]
    pub fn forward_linear(
        &self,
        student_hidden: Tensor<2>,
        student_head: &Linear,
        teacher: SparseTeacher<2>,
        targets: Tensor<1, Int>,
    ) -> Tensor<1> {
        or_panic(self.linear_parts(student_hidden, student_head, teacher, Some(targets))).loss
    }

    /// [`SparseDistillLoss::forward_linear`] that returns an error instead of panicking.
    pub fn try_forward_linear(
        &self,
        student_hidden: Tensor<2>,
        student_head: &Linear,
        teacher: SparseTeacher<2>,
        targets: Tensor<1, Int>,
    ) -> Result<Tensor<1>, DistillError> {
        Ok(self
            .linear_parts(student_hidden, student_head, teacher, Some(targets))?
            .loss)
    }

    /// [`SparseDistillLoss::forward_linear`] without labels (soft term only).
    ///
    /// # Panics
    /// As [`SparseDistillLoss::forward_linear`].
    #[track_caller]
    pub fn forward_linear_soft(
        &self,
        student_hidden: Tensor<2>,
        student_head: &Linear,
        teacher: SparseTeacher<2>,
    ) -> Tensor<1> {
        or_panic(self.linear_parts(student_hidden, student_head, teacher, None)).loss
    }

    /// [`SparseDistillLoss::forward_linear_soft`] that returns an error instead of panicking.
    pub fn try_forward_linear_soft(
        &self,
        student_hidden: Tensor<2>,
        student_head: &Linear,
        teacher: SparseTeacher<2>,
    ) -> Result<Tensor<1>, DistillError> {
        Ok(self
            .linear_parts(student_hidden, student_head, teacher, None)?
            .loss)
    }

    /// The sparse fused-linear loss with its soft and hard parts.
    ///
    /// # Panics
    /// As [`SparseDistillLoss::forward_linear`].
    #[track_caller]
    pub fn forward_linear_parts(
        &self,
        student_hidden: Tensor<2>,
        student_head: &Linear,
        teacher: SparseTeacher<2>,
        targets: Option<Tensor<1, Int>>,
    ) -> DistillOutput {
        or_panic(self.linear_parts(student_hidden, student_head, teacher, targets))
    }

    /// [`SparseDistillLoss::forward_linear_parts`] that returns an error instead of panicking.
    pub fn try_forward_linear_parts(
        &self,
        student_hidden: Tensor<2>,
        student_head: &Linear,
        teacher: SparseTeacher<2>,
        targets: Option<Tensor<1, Int>>,
    ) -> Result<DistillOutput, DistillError> {
        self.linear_parts(student_hidden, student_head, teacher, targets)
    }

    /// Sequence form of [`SparseDistillLoss::forward_linear`]: `[B, T, H]` hidden states, a
    /// `[B, T, k]` teacher, `[B, T]` targets.
    ///
    /// # Panics
    /// As [`SparseDistillLoss::forward_linear`].
    #[track_caller]
    pub fn forward_linear_seq(
        &self,
        student_hidden: Tensor<3>,
        student_head: &Linear,
        teacher: SparseTeacher<3>,
        targets: Tensor<2, Int>,
    ) -> Tensor<1> {
        or_panic(self.linear_parts(student_hidden, student_head, teacher, Some(targets))).loss
    }

    /// [`SparseDistillLoss::forward_linear_seq`] that returns an error instead of panicking.
    pub fn try_forward_linear_seq(
        &self,
        student_hidden: Tensor<3>,
        student_head: &Linear,
        teacher: SparseTeacher<3>,
        targets: Tensor<2, Int>,
    ) -> Result<Tensor<1>, DistillError> {
        Ok(self
            .linear_parts(student_hidden, student_head, teacher, Some(targets))?
            .loss)
    }

    /// Sequence form of [`SparseDistillLoss::forward_linear_soft`].
    ///
    /// # Panics
    /// As [`SparseDistillLoss::forward_linear`].
    #[track_caller]
    pub fn forward_linear_seq_soft(
        &self,
        student_hidden: Tensor<3>,
        student_head: &Linear,
        teacher: SparseTeacher<3>,
    ) -> Tensor<1> {
        or_panic(self.linear_parts(student_hidden, student_head, teacher, None)).loss
    }

    /// [`SparseDistillLoss::forward_linear_seq_soft`] that returns an error instead of
    /// panicking.
    pub fn try_forward_linear_seq_soft(
        &self,
        student_hidden: Tensor<3>,
        student_head: &Linear,
        teacher: SparseTeacher<3>,
    ) -> Result<Tensor<1>, DistillError> {
        Ok(self
            .linear_parts(student_hidden, student_head, teacher, None)?
            .loss)
    }

    /// Sequence form of [`SparseDistillLoss::forward_linear_parts`].
    ///
    /// # Panics
    /// As [`SparseDistillLoss::forward_linear`].
    #[track_caller]
    pub fn forward_linear_seq_parts(
        &self,
        student_hidden: Tensor<3>,
        student_head: &Linear,
        teacher: SparseTeacher<3>,
        targets: Option<Tensor<2, Int>>,
    ) -> DistillOutput {
        or_panic(self.linear_parts(student_hidden, student_head, teacher, targets))
    }

    /// [`SparseDistillLoss::forward_linear_seq_parts`] that returns an error instead of
    /// panicking.
    pub fn try_forward_linear_seq_parts(
        &self,
        student_hidden: Tensor<3>,
        student_head: &Linear,
        teacher: SparseTeacher<3>,
        targets: Option<Tensor<2, Int>>,
    ) -> Result<DistillOutput, DistillError> {
        self.linear_parts(student_hidden, student_head, teacher, targets)
    }

    /// Every sparse fused-linear form, at either rank.
    fn linear_parts<const D: usize>(
        &self,
        student_hidden: Tensor<D>,
        student_head: &Linear,
        teacher: SparseTeacher<D>,
        targets: Option<RankTargets<D>>,
    ) -> Result<DistillOutput, DistillError>
    where
        Rank<D>: TokenRank,
    {
        let dims = student_hidden.dims();
        let lead = &dims[..D - 1];
        let targets = targets
            .map(|t| <Rank<D> as TokenRank>::flat_targets(t, lead))
            .transpose()?;
        let student = Side::new(flat_rows(student_hidden), student_head, "student")?;
        teacher.check_shapes(lead)?;
        let teacher = teacher.rows();
        let (dtype, device) = (student.hidden.dtype(), student.hidden.device());
        let [k, v] = [teacher.dims()[1], student.weight.dims()[1]];
        let dense = &self.dense;
        if dense.kernel == Kernel::Fused && !backend::has_sparse_fused_kernel(&device, dtype, k) {
            return Err(DistillError::invalid(
                "kernel",
                "Kernel::Fused",
                format!(
                    "Kernel::Auto or Kernel::Reference: device {device:?} has no fused \
                     sparse-teacher kernel for {dtype:?} logits and k = {k}"
                ),
            ));
        }
        let target_check = dense.check_targets(targets.as_ref(), v, lead)?;
        // Two `[c, V]` buffers per chunk, the student's logits and their gradient (and the
        // pre-cap logits under a cap).
        let cap = dense.logit_softcap;
        let rows = dense.linear_chunk_rows_with(v, if cap.is_some() { 3 } else { 2 }, &device);
        let setup = LinearSetup {
            vocab_mismatch: VocabMismatch::Error,
            ..dense.linear_setup(rows)
        };
        let fused = dense.kernel != Kernel::Reference;
        let chunks = SparseChunks::new(inner_teacher(&teacher), self.setup());
        let parts = fused
            .then(|| run_chunks(&student, chunks, targets.clone(), &setup))
            .flatten();
        let Some(parts) = parts else {
            // No fused sparse kernel here: the logits, through the composed path (a frozen or
            // tied head gets no gradient here either).
            let logits = student.logits(None, setup.weight_grad);
            let out = self.try_forward_parts(logits, teacher, targets)?;
            return Ok(out);
        };
        let output = DistillOutput::from(parts);
        // The fused kernels make a row with a bad teacher NaN: the NaN count is the check.
        let teacher_check = if dense.validation == crate::Validation::Off {
            None
        } else {
            let bad = count(output.loss.clone().is_nan()) + count(output.soft.clone().is_nan());
            let ignored = ignored_rows(targets.as_ref(), dense.params.ignore_index);
            let (tail, lead) = (self.tail, lead.to_vec());
            DeviceCheck::new(bad, move |_| {
                crate::sparse::first_bad_entry(&teacher, ignored.clone(), v, tail, &lead)
            })
            .apply(dense.validation)?
        };
        Ok(output.with_check(target_check).with_check(teacher_check))
    }
}

/// The teacher's tensors without autodiff (the chunks').
fn inner_teacher(teacher: &SparseTeacher<2>) -> SparseTeacher<2> {
    SparseTeacher {
        indices: teacher.indices.clone().inner(),
        log_probs: teacher.log_probs.clone().inner(),
        mask: teacher.mask.clone().map(Tensor::inner),
    }
}
