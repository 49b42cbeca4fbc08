//! The composed (tensor-op) path of the sparse loss: the soft rows on the student's
//! full-vocabulary log-probabilities, gathered at the teacher's entries.

use super::*;

impl SparseDistillLoss {
    /// The `[N]` soft rows, `T²`-scaled, NaN for a row without any valid teacher entry; and the
    /// `[N]` rows whose teacher is not a distribution (an index outside the vocabulary or seen
    /// twice, a log-probability above 0 or NaN, a tail-bucket mass above 1), NaN too.
    pub(super) fn soft_rows(
        &self,
        student: Tensor<2>,
        teacher: SparseTeacher,
    ) -> (Tensor<1>, Tensor<1, Bool>) {
        let neg_inf = f64::NEG_INFINITY;
        let t = self.dense.params.temperature;
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
        let first = Tensor::<1, Int>::arange(0..k as i64, &log_probs.device())
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
        let at_k =
            gather_columns(scaled.clone(), indices.clone()).mask_fill(invalid.clone(), neg_inf);

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
        let soft = divergence_rows(self.dense.params.divergence, Probs::new(log_p, log_q));
        let broken = out_of_range_rows.bool_or(not_a_teacher).squeeze_dim(1);
        let soft = scale_soft(soft, &self.dense.params)
            .mask_fill(empty.squeeze_dim(1), f64::NAN)
            .mask_fill(broken.clone(), f64::NAN);
        (soft, broken)
    }
}

/// `[N, 1]` rows of `log Σ_j exp(x_j)`, stable; `−inf` for a row of `−inf`, whose gradient is
/// then blocked by the mask that produced it.
fn log_sum_exp(x: Tensor<2>) -> Tensor<2> {
    let max = x.clone().detach().max_dim(1);
    let max = max.clone().mask_fill(max.is_inf(), 0.0);
    (x - max.clone()).exp().sum_dim(1).log() + max
}

/// Log-probabilities of the distribution `∝ exp(x)` over each row.
fn normalize(x: Tensor<2>) -> Tensor<2> {
    x.clone() - log_sum_exp(x)
}
