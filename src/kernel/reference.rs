//! The reference implementation: composed burn tensor ops.
//!
//! Backend-generic and differentiable through burn's autodiff. It materialises several
//! `[N, V]` intermediates, so it is slow and memory hungry on large vocabularies; it exists as
//! the oracle that the fused kernels are tested against, and as the fallback on backends
//! without a fused kernel.

use burn::tensor::{Bool, Int, Tensor};

use crate::{DistillParams, Divergence, temperature_log_softmax};

/// Per-row losses, as tensors (reduced into [`DistillParts`](crate::DistillParts)).
#[derive(Debug, Clone)]
pub struct RowTensors {
    /// `[N]` row losses `α·soft + (1 − α)·hard` (or `soft` without targets), differentiable
    /// with respect to the student logits.
    pub loss: Tensor<1>,
    /// `[N]` soft term per row (T²-scaled if configured), detached.
    pub soft: Tensor<1>,
    /// `[N]` hard term per row, detached; `None` without targets.
    pub hard: Option<Tensor<1>>,
}

/// `[N]` soft term per row (`T²`-scaled if configured) of `[N, V]` student and teacher
/// logits, computed with burn tensor ops: `D(softmax(t/T) ‖ softmax(s/T))`, differentiable
/// with respect to the student (the teacher is detached). [`mix_rows`] adds the hard term.
pub fn soft_rows(student: Tensor<2>, teacher: Tensor<2>, params: &DistillParams) -> Tensor<1> {
    let t = params.temperature;
    let log_q = temperature_log_softmax(student, t, 1);
    let log_p = temperature_log_softmax(teacher.detach(), t, 1);
    scale_soft(
        divergence_rows(params.divergence, Probs::new(log_p, log_q)),
        params,
    )
}

/// `soft · T²` if the parameters ask for it.
pub fn scale_soft(soft: Tensor<1>, params: &DistillParams) -> Tensor<1> {
    match params.soft_factor() {
        1.0 => soft,
        factor => soft.mul_scalar(factor),
    }
}

/// Mixes `[N]` soft rows (differentiable) with the hard cross-entropy of the `[N, V]` student
/// logits against `targets`: `α · soft + (1 − α) · hard`, ignored rows `0`, rows with an
/// out-of-range target NaN. Without targets the soft rows are the loss.
pub fn mix_rows(
    soft: Tensor<1>,
    student: Tensor<2>,
    targets: Option<Tensor<1, Int>>,
    params: &DistillParams,
) -> RowTensors {
    let Some(targets) = targets else {
        return RowTensors {
            soft: soft.clone().detach(),
            loss: soft,
            hard: None,
        };
    };

    let classes = student.dims()[1] as i64;
    let out_of_range = targets
        .clone()
        .lower_elem(0)
        .bool_or(targets.clone().greater_equal_elem(classes));
    let ignored: Option<Tensor<1, Bool>> =
        params.ignore_index.map(|i| targets.clone().equal_elem(i));
    let (skipped, bad) = match ignored.clone() {
        Some(ignored) => (
            ignored.clone().bool_or(out_of_range.clone()),
            out_of_range.bool_and(ignored.bool_not()),
        ),
        None => (out_of_range.clone(), out_of_range),
    };
    let hard = hard_rows(
        student,
        targets.mask_fill(skipped, 0),
        params.label_smoothing,
    );
    let alpha = params.alpha;
    // Skip a term whose weight is exactly 0, so that an infinite term cannot turn into NaN.
    let loss = if alpha == 1.0 {
        soft.clone()
    } else if alpha == 0.0 {
        hard.clone()
    } else {
        soft.clone().mul_scalar(alpha) + hard.clone().mul_scalar(1.0 - alpha)
    };
    let mask = |rows: Tensor<1>| {
        let rows = match ignored.clone() {
            Some(ignored) => rows.mask_fill(ignored, 0.0),
            None => rows,
        };
        rows.mask_fill(bad.clone(), f64::NAN)
    };
    RowTensors {
        loss: mask(loss),
        soft: mask(soft.detach()),
        hard: Some(mask(hard.detach())),
    }
}

/// The teacher's (`p`) and the student's (`q`) `[N, V]` log-probabilities and probabilities,
/// each exponential taken once for every function of the pair that needs them.
#[derive(Clone, Debug)]
pub struct Probs {
    /// `log p`.
    pub log_p: Tensor<2>,
    /// `log q`.
    pub log_q: Tensor<2>,
    /// `p = e^{log p}`.
    pub p: Tensor<2>,
    /// `q = e^{log q}`.
    pub q: Tensor<2>,
}

impl Probs {
    /// The teacher's `log_p` and the student's `log_q`, with their exponentials.
    pub fn new(log_p: Tensor<2>, log_q: Tensor<2>) -> Self {
        let (p, q) = (log_p.clone().exp(), log_q.clone().exp());
        Self { log_p, log_q, p, q }
    }
}

/// `[N]` divergence per row between the teacher (`p`) and the student (`q`). See
/// [`Divergence`] for the formulas.
pub fn divergence_rows(divergence: Divergence, probs: Probs) -> Tensor<1> {
    let Probs { log_p, log_q, p, q } = probs;
    let rows = match divergence {
        Divergence::ForwardKl => weighted_log_ratio(p, log_p, log_q),
        Divergence::ReverseKl => weighted_log_ratio(q, log_q, log_p),
        Divergence::Jsd { beta } => {
            let log_m = safe_log(p.clone().mul_scalar(beta) + q.clone().mul_scalar(1.0 - beta));
            weighted_log_ratio(p, log_p, log_m.clone()).mul_scalar(beta)
                + weighted_log_ratio(q, log_q, log_m).mul_scalar(1.0 - beta)
        }
        Divergence::SkewKl { lambda } => {
            let log_m = safe_log(p.clone().mul_scalar(lambda) + q.mul_scalar(1.0 - lambda));
            weighted_log_ratio(p, log_p, log_m)
        }
        Divergence::SkewReverseKl { lambda } => {
            let log_m = safe_log(p.mul_scalar(1.0 - lambda) + q.clone().mul_scalar(lambda));
            weighted_log_ratio(q, log_q, log_m)
        }
        Divergence::Tvd => (p - q).abs().sum_dim(1).mul_scalar(0.5),
    };
    rows.squeeze_dim(1)
}

/// `[N]` hard cross-entropy at temperature 1 with PyTorch's label smoothing `ε`:
/// `−(1 − ε) log softmax(z)[y] − ε · mean_j log softmax(z)[j]`, the mean taken over the
/// classes (logits that are not padding by the rule of [`crate::MASKED_LOGIT`]).
pub fn hard_rows(student: Tensor<2>, targets: Tensor<1, Int>, label_smoothing: f64) -> Tensor<1> {
    let log_q = temperature_log_softmax(student, 1.0, 1);
    let nll = log_q.clone().gather(1, targets.unsqueeze_dim(1)).neg();
    let rows = if label_smoothing != 0.0 {
        // Padding (not a class), by the one rule of `MASKED_LOGIT`, read on `log q = z − lse`
        // (the same test to f32's rounding of `lse` against 3e38; a mask on `z` itself makes
        // burn-cubecl-fusion 0.21 panic in its block fuser).
        let padding = log_q
            .clone()
            .greater_elem(crate::vocab::MASKED_LOGIT)
            .bool_not();
        // `ones_like` rather than `Bool::float()`, which would not keep the logits' dtype.
        let count = log_q.ones_like().mask_fill(padding.clone(), 0.0).sum_dim(1);
        let mean = log_q.mask_fill(padding, 0.0).sum_dim(1) / count;
        nll.mul_scalar(1.0 - label_smoothing) - mean.mul_scalar(label_smoothing)
    } else {
        nll
    };
    rows.squeeze_dim(1)
}

/// `[N, 1]` rows of `Σ_j w_j (log_a_j − log_b_j)` with `0 · (anything) = 0`: columns where
/// the weight is zero are masked before the product, so that `−inf − (−inf)` never produces a
/// NaN, in the value or in the gradient.
fn weighted_log_ratio(weight: Tensor<2>, log_a: Tensor<2>, log_b: Tensor<2>) -> Tensor<2> {
    let zero = weight.clone().lower_equal_elem(0.0);
    (weight * (log_a - log_b).mask_fill(zero, 0.0)).sum_dim(1)
}

/// `log m` where `m > 0`, `0` where `m = 0` (such columns always carry zero weight); the mask
/// comes before the log so that its gradient stays finite.
fn safe_log(m: Tensor<2>) -> Tensor<2> {
    let zero = m.clone().lower_equal_elem(0.0);
    m.mask_fill(zero, 1.0).log()
}

/// `x[i, indices[i, j]]`: `[N, V]` values and `[N, k]` column indices → `[N, k]`.
///
/// A `select` on the flattened values where the flat index fits an `i32` (wgpu's and CUDA's
/// int type), a `gather` beyond: burn-fusion 0.21 (`Wgpu`) computed the gather wrongly after a
/// row reduction for some shapes (V = 16, k = 1: a tail-bucket loss of 1.0896 for 0.6423; a
/// cross-tokenizer merge after a softmax), where the select is right.
pub(crate) fn gather_columns(x: Tensor<2>, indices: Tensor<2, Int>) -> Tensor<2> {
    let [n, v] = x.dims();
    let [_, k] = indices.dims();
    if n * v <= i32::MAX as usize {
        let rows = Tensor::<1, Int>::arange(0..n as i64, &x.device())
            .mul_scalar(v as i64)
            .unsqueeze_dim::<2>(1);
        let flat = (indices + rows).reshape([n * k]);
        x.reshape([n * v]).select(0, flat).reshape([n, k])
    } else {
        x.gather(1, indices)
    }
}
