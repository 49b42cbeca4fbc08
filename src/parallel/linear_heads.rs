//! The fused-linear form of the vocabulary-parallel loss: this peer's slice of both LM heads,
//! run chunk by chunk of rows through the shard loss.

use super::*;

impl DistillLoss {
    /// The fused-linear loss of a vocabulary-parallel LM head: this peer's slice of both heads
    /// (`Linear` layers `H → V_p` for columns `shard.offset() .. + V_p`), the `[N, H]` hidden
    /// states (the same on every peer) and `[N]` targets; the loss of the whole vocabulary, as
    /// [`DistillLoss::forward_linear`] on the unsharded heads, with logits computed
    /// `chunk_rows × V_p` at a time (never `[N, V]`; the chunk size comes from
    /// `linear_chunk_rows` or from `linear_chunk_bytes` for the widest shard, counting the
    /// dozen `[c, V_p]` buffers of the composed shard loss). The chunks follow the kept rows,
    /// so the targets must be the same on every peer, and every peer must agree on whether the
    /// student is trained (that adds the hidden-state exchange). The loss runs as composed
    /// burn ops on each shard whatever the [`Kernel`](crate::Kernel) setting.
    ///
    /// Gradients: the student head's weight and bias get their columns' gradient; the student's
    /// hidden states get the full `∂loss/∂h`, summed over the peers' head slices by one more
    /// exchange of `N·H` floats (what Megatron's column-parallel input operator does in its
    /// backward), so a trunk replicated on every peer receives the exact gradient.
    ///
    /// # Shapes
    /// - `student_hidden`: `[N, H_s]`, `student_head`: `Linear` `H_s → V_p`
    /// - `teacher_hidden`: `[N, H_t]`, `teacher_head`: `Linear` `H_t → V_p`
    /// - `targets`: `[N]` global class indices; output as [`DistillLoss::forward`]
    ///
    /// # Panics
    /// As [`DistillLoss::forward_vocab_parallel`]; also for `Reduction::PerRow` when the
    /// student is trained, at the caller's line.
    #[track_caller]
    #[allow(clippy::too_many_arguments)] // 0.1's six arguments and the exchange
    pub fn forward_linear_vocab_parallel(
        &self,
        student_hidden: Tensor<2>,
        student_head: &Linear,
        teacher_hidden: Tensor<2>,
        teacher_head: &Linear,
        targets: Tensor<1, Int>,
        shard: &VocabShard,
        exchange: &dyn RowExchange,
    ) -> Tensor<1> {
        let heads = (student_head, teacher_head);
        let peer = (shard, exchange);
        or_panic(self.linear_vocab_parallel(
            student_hidden,
            teacher_hidden,
            heads,
            Some(targets),
            peer,
        ))
        .loss
    }

    /// [`DistillLoss::forward_linear_vocab_parallel`] that returns an error instead of
    /// panicking.
    #[allow(clippy::too_many_arguments)] // 0.1's six arguments and the exchange
    pub fn try_forward_linear_vocab_parallel(
        &self,
        student_hidden: Tensor<2>,
        student_head: &Linear,
        teacher_hidden: Tensor<2>,
        teacher_head: &Linear,
        targets: Tensor<1, Int>,
        shard: &VocabShard,
        exchange: &dyn RowExchange,
    ) -> Result<Tensor<1>, DistillError> {
        let heads = (student_head, teacher_head);
        let peer = (shard, exchange);
        self.linear_vocab_parallel(student_hidden, teacher_hidden, heads, Some(targets), peer)
            .map(|out| out.loss)
    }

    /// [`DistillLoss::forward_linear_vocab_parallel`]'s loss and parts (soft only without
    /// targets).
    ///
    /// # Panics
    /// As [`DistillLoss::forward_linear_vocab_parallel`].
    #[track_caller]
    #[allow(clippy::too_many_arguments)] // 0.1's six arguments and the exchange
    pub fn forward_linear_vocab_parallel_parts(
        &self,
        student_hidden: Tensor<2>,
        student_head: &Linear,
        teacher_hidden: Tensor<2>,
        teacher_head: &Linear,
        targets: Option<Tensor<1, Int>>,
        shard: &VocabShard,
        exchange: &dyn RowExchange,
    ) -> DistillOutput {
        let heads = (student_head, teacher_head);
        let peer = (shard, exchange);
        or_panic(self.linear_vocab_parallel(student_hidden, teacher_hidden, heads, targets, peer))
    }

    /// [`DistillLoss::forward_linear_vocab_parallel_parts`] that returns an error naming the
    /// bad argument or the exchange step that failed, instead of panicking.
    #[allow(clippy::too_many_arguments)] // 0.1's six arguments and the exchange
    pub fn try_forward_linear_vocab_parallel_parts(
        &self,
        student_hidden: Tensor<2>,
        student_head: &Linear,
        teacher_hidden: Tensor<2>,
        teacher_head: &Linear,
        targets: Option<Tensor<1, Int>>,
        shard: &VocabShard,
        exchange: &dyn RowExchange,
    ) -> Result<DistillOutput, DistillError> {
        let heads = (student_head, teacher_head);
        let peer = (shard, exchange);
        self.linear_vocab_parallel(student_hidden, teacher_hidden, heads, targets, peer)
    }

    /// Every fused-linear form: the checks, the chunks (each through the shard loss, on
    /// tensors without autodiff), the hidden-state gradient summed across the peers, the
    /// student's gradients attached as one backward node.
    fn linear_vocab_parallel(
        &self,
        student_hidden: Tensor<2>,
        teacher_hidden: Tensor<2>,
        (student_head, teacher_head): (&Linear, &Linear),
        targets: Option<Tensor<1, Int>>,
        (shard, exchange): (&VocabShard, &dyn RowExchange),
    ) -> Result<DistillOutput, DistillError> {
        let n = student_hidden.dims()[0];
        if teacher_hidden.dims()[0] != n {
            return Err(DistillError::invalid(
                "teacher_hidden",
                format!("shape {:?}", teacher_hidden.dims()),
                format!("{n} rows, as student_hidden"),
            ));
        }
        let student = Side::new(student_hidden, student_head, "student")?;
        let teacher = Side::new(teacher_hidden, teacher_head, "teacher")?.detach();
        let (vs, vt) = (student.weight.dims()[1], teacher.weight.dims()[1]);
        if vt != vs {
            return Err(DistillError::invalid(
                "teacher_head",
                format!("{vt} output columns"),
                format!("the student head's {vs} (both heads sliced alike)"),
            ));
        }
        let targets = targets.map(Tensor::inner);
        let check = self.check_shard("student_head", vs, n, targets.as_ref(), shard)?;
        let device = student.hidden.device();
        let rows = self.linear_chunk_rows_with(shard.vocab.div_ceil(shard.peers), 12, &device);
        let setup = self.linear_setup(rows);
        let with_grad = student.is_tracked();
        let autodiff = student.hidden.is_autodiff();
        // The shards' layout is checked with the first chunk; a chunk's error is kept here
        // (the chunk loop only knows "no gradient from this chunk").
        let (first, failed) = (
            Cell::new(self.validation == Validation::Eager),
            RefCell::new(None),
        );
        let chunks = ParallelChunks {
            side: teacher.inner(),
            cap: self.logit_softcap,
            shard,
            exchange,
            first: &first,
            failed: &failed,
        };
        let out = linear::chunked(student.inner(), chunks, targets, &setup, with_grad);
        if let Some(error) = failed.take() {
            return Err(error);
        }
        let Some((parts, grads)) = out else {
            return Err(DistillError::invalid(
                "reduction",
                "PerRow",
                "Mean, Sum or Normalized for a trained vocabulary-parallel fused-linear \
                 loss (per-row upstream weights are only known in the backward pass)",
            ));
        };
        let lift = |t: Tensor<1>| if autodiff { t.autodiff() } else { t };
        let loss = match grads {
            Some(g) => {
                let hidden = sum_across(
                    exchange,
                    g.hidden,
                    "all-reduce of the hidden-state gradient",
                )?;
                backend::attach(
                    parts.loss,
                    (student.hidden.clone(), Some(hidden)),
                    (student.weight.clone(), g.weight),
                    student.bias.clone().map(|b| (b, g.bias)),
                )
            }
            None => lift(parts.loss),
        };
        let parts = DistillParts {
            loss,
            soft: lift(parts.soft),
            hard: parts.hard.map(lift),
        };
        Ok(DistillOutput::from(parts).with_check(check))
    }
}

/// The teacher's head slice of a vocabulary-parallel fused-linear loss, cut in chunks like the
/// student's: each chunk's `[c, V_p]` logits of both models through the shard loss.
struct ParallelChunks<'a> {
    side: Side,
    cap: Option<f64>,
    shard: &'a VocabShard,
    exchange: &'a dyn RowExchange,
    /// Is the next chunk the first (whose exchange checks the shards' layout)?
    first: &'a Cell<bool>,
    /// The error of the chunk that failed.
    failed: &'a RefCell<Option<DistillError>>,
}

impl ChunkTeacher for ParallelChunks<'_> {
    #[cfg(feature = "flex")]
    fn host(&self) -> backend::HostLinearTeacher {
        unreachable!("the vocabulary-parallel chunks never run the host loop")
    }

    fn aligned(&self, vs: usize) -> usize {
        vs
    }

    fn keep(self, index: &Tensor<1, Int>) -> Self {
        Self {
            side: Side {
                hidden: self.side.hidden.select(0, index.clone()),
                ..self.side
            },
            ..self
        }
    }

    fn loss(
        &self,
        rows: Range<usize>,
        zs: Tensor<2>,
        targets: Option<Tensor<1, Int>>,
        params: &DistillParams,
        with_grad: bool,
    ) -> Option<(DistillParts, Option<Tensor<2>>)> {
        let side = &self.side;
        let zt = linear::logits(side.hidden.clone().slice(rows), &side.weight, &side.bias);
        let zt = match self.cap {
            // `· (1/c)`, as `DistillLoss::soft_cap`.
            Some(c) => zt.mul_scalar(c.recip()).tanh().mul_scalar(c),
            None => zt,
        };
        let run = ShardRun {
            shard: self.shard,
            exchange: self.exchange,
            check: self.first.replace(false),
            with_grad,
        };
        match vocab_parallel(zs, zt, targets, params, &run) {
            Ok(out) => Some(out),
            Err(error) => {
                self.failed.replace(Some(error));
                None
            }
        }
    }
}
