//! The row pieces shared by the dense ([`super::cube`]) and sparse ([`super::sparse_cube`])
//! CubeCL kernels: the divergence's column terms and gradients, the reductions across a row's
//! units, the student's online softmax, the target, the hard term, the α-mix, the row writes
//! and the weights of the gradient.

use cubecl::prelude::*;

use crate::Divergence;
use crate::vocab::MASKED_LOGIT;

/// The divergence a kernel is specialised for (a compile-time parameter: one kernel per
/// divergence, no branch on it in the inner loops). The mixture weight stays a runtime value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum DivKind {
    ForwardKl,
    ReverseKl,
    Jsd,
    SkewKl,
    SkewReverseKl,
    Tvd,
}

impl DivKind {
    /// The kernel's divergence and mixture weight (`β` or `λ`; `0` where there is none).
    pub(crate) fn of(divergence: Divergence) -> (Self, f32) {
        match divergence {
            Divergence::ForwardKl => (Self::ForwardKl, 0.0),
            Divergence::ReverseKl => (Self::ReverseKl, 0.0),
            Divergence::Jsd { beta } => (Self::Jsd, beta as f32),
            Divergence::SkewKl { lambda } => (Self::SkewKl, lambda as f32),
            Divergence::SkewReverseKl { lambda } => (Self::SkewReverseKl, lambda as f32),
            Divergence::Tvd => (Self::Tvd, 0.0),
        }
    }
}

/// A kernel's row outputs: `[N]` row losses, soft and hard terms (f32), and the `[N, V]`
/// gradient as vectors `G` (a `[1, V]` placeholder when the kernel writes none).
#[derive(CubeLaunch, CubeType)]
pub(crate) struct RowOut<G: CubePrimitive> {
    pub loss: OwnedTensor<f32>,
    pub soft: OwnedTensor<f32>,
    pub hard: OwnedTensor<f32>,
    pub grad: OwnedTensor<G>,
}

/// The loss settings both kernels read at run time: `1/T`, the soft term's factor (`T²` or 1),
/// `α`, label smoothing `ε`, the divergence's mixture weight (`β`, `λ` or 0) and the ignore
/// index (any value without one), and NaN and `−∞` (the kernel cannot build them: WGSL has no
/// NaN or infinity literal, and CubeCL folds a run-time `0 / 0` or `−1 / 0` into one).
#[derive(CubeLaunch, CubeType, Clone, Copy)]
pub(crate) struct RowParams {
    pub inv_t: f32,
    pub t2: f32,
    pub alpha: f32,
    pub eps: f32,
    pub mix: f32,
    pub ignore: i32,
    pub nan: f32,
    pub neg_inf: f32,
}

/// What both kernels are specialised for at compile time: the divergence, the presence of
/// targets and of an ignore index, and the gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct RowSpec {
    pub kind: DivKind,
    pub labeled: bool,
    pub with_ignore: bool,
    pub with_grad: bool,
}

/// Sum of `value` over the `CUBE_DIM_X` units of this unit's row (every unit of the row gets
/// the result). Every unit of the cube must call it.
#[cube]
pub(crate) fn row_sum(smem: &mut Shared<[f32]>, value: f32) -> f32 {
    row_reduce(smem, value, false)
}

/// Maximum of `value` over the units of this unit's row (as [`row_sum`]).
#[cube]
pub(crate) fn row_max(smem: &mut Shared<[f32]>, value: f32) -> f32 {
    row_reduce(smem, value, true)
}

/// The sum, or with `max` the maximum, of `value` over the units of this unit's row: a
/// shared-memory tree in the row's segment.
#[cube]
fn row_reduce(smem: &mut Shared<[f32]>, value: f32, #[comptime] max: bool) -> f32 {
    let unit = UNIT_POS_X as usize;
    let base = UNIT_POS_Y as usize * CUBE_DIM_X as usize;
    smem[base + unit] = value;
    sync_cube();
    // A runtime value: a loop counter must not be a comptime constant.
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if unit < stride {
            let other = smem[base + unit + stride];
            if max {
                if other > smem[base + unit] {
                    smem[base + unit] = other;
                }
            } else {
                smem[base + unit] += other;
            }
        }
        sync_cube();
        stride /= 2;
    }
    let total = smem[base];
    sync_cube();
    total
}

/// The divergence term of column `j`, for divergence `kind` with mixture weight `mix`.
#[cube]
pub(crate) fn column_term(
    q: f32,
    p: f32,
    lq: f32,
    lp: f32,
    mix: f32,
    #[comptime] kind: DivKind,
) -> f32 {
    let mut d = f32::new(0.0);
    match kind {
        DivKind::ForwardKl => {
            if p > 0.0 {
                d = p * (lp - lq);
            }
        }
        DivKind::ReverseKl => {
            if q > 0.0 {
                d = q * (lq - lp);
            }
        }
        DivKind::Jsd => {
            // mix = β
            let m = mix * p + (1.0 - mix) * q;
            if m > 0.0 {
                let lm = m.ln();
                if p > 0.0 {
                    d = mix * p * (lp - lm);
                }
                if q > 0.0 {
                    d += (1.0 - mix) * q * (lq - lm);
                }
            }
        }
        DivKind::SkewKl => {
            // mix = λ: KL(p ‖ λp + (1−λ)q)
            let m = mix * p + (1.0 - mix) * q;
            if p > 0.0 {
                d = p * (lp - m.ln());
            }
        }
        DivKind::SkewReverseKl => {
            // mix = λ: KL(q ‖ (1−λ)p + λq)
            if q > 0.0 {
                let m = (1.0 - mix) * p + mix * q;
                d = q * (lq - m.ln());
            }
        }
        DivKind::Tvd => {
            let diff = q - p;
            if diff > 0.0 {
                d = diff * 0.5f32;
            } else {
                d = -diff * 0.5f32;
            }
        }
    }
    d
}

/// `g_j = ∂D/∂q_j` of column `j` for JSD, skew KL, skew reverse KL and TVD (forward and
/// reverse KL have closed forms in the gradient pass and never call this).
#[cube]
pub(crate) fn column_grad(q: f32, p: f32, lq: f32, mix: f32, #[comptime] kind: DivKind) -> f32 {
    let mut g = f32::new(0.0);
    match kind {
        DivKind::Jsd => {
            let m = mix * p + (1.0 - mix) * q;
            if q > 0.0 {
                g = (1.0 - mix) * (lq - m.ln());
            }
        }
        DivKind::SkewKl => {
            let m = mix * p + (1.0 - mix) * q;
            if m > 0.0 {
                g = -((1.0 - mix) * p / m);
            }
        }
        DivKind::SkewReverseKl => {
            if q > 0.0 {
                let m = (1.0 - mix) * p + mix * q;
                g = lq - m.ln() + 1.0 - mix * q / m;
            }
        }
        DivKind::Tvd => {
            let diff = q - p;
            if diff > 0.0 {
                g = 0.5f32;
            } else if diff < 0.0 {
                g = -0.5f32;
            }
        }
        DivKind::ForwardKl | DivKind::ReverseKl => {}
    }
    g
}

/// `∂D/∂u_j` of a softmax row `q = softmax(u)` against `p`: `q − p` (forward KL),
/// `q (log q − log p − D)` (reverse KL), `q (g_j − Σ q g)` (the others, `g = ∂D/∂q`).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn soft_logit_grad(
    q: f32,
    p: f32,
    lq: f32,
    lp: f32,
    div: f32,
    sqg: f32,
    mix: f32,
    #[comptime] kind: DivKind,
) -> f32 {
    let mut g = f32::new(0.0);
    match kind {
        DivKind::ForwardKl => {
            g = q - p;
        }
        DivKind::ReverseKl => {
            if q > 0.0 {
                g = q * (lq - lp - div);
            }
        }
        _ => {
            g = q * (column_grad(q, p, lq, mix, kind) - sqg);
        }
    }
    g
}

/// A row's target: its class, and whether the row is skipped (the target is the ignore
/// index) or bad (a target outside `[0, v)`); class 0, neither, without targets (`targets` is
/// then a dummy tensor of zeros).
#[derive(CubeType, Clone, Copy)]
pub(crate) struct Target {
    pub class: i32,
    pub skip: bool,
    pub bad: bool,
}

/// Row `row`'s [`Target`].
#[cube]
pub(crate) fn row_target<I: Numeric>(
    targets: &Tensor<I>,
    row: usize,
    v: usize,
    ignore: i32,
    #[comptime] labeled: bool,
    #[comptime] with_ignore: bool,
) -> Target {
    let class = i32::cast_from(targets[row * targets.stride(0)]);
    let mut skip = false;
    let mut bad = false;
    if labeled {
        if with_ignore {
            skip = class == ignore;
        }
        bad = !skip && (class < 0 || class >= v as i32);
    }
    Target { class, skip, bad }
}

/// A unit's online softmax of the student row: the running maximum `ms`, the sums of
/// `e^{(s−ms)/T}` and of `e^{s−ms}` (the hard term's, at T = 1), rescaled when the maximum
/// grows, and the count and sum of the finite (not padding) logits for label smoothing; after
/// [`Online::row`], the row's values.
#[derive(CubeType, Clone, Copy)]
pub(crate) struct Online {
    pub ms: f32,
    pub sum_s: f32,
    pub sum_1: f32,
    pub finite: f32,
    pub total: f32,
}

#[cube]
impl Online {
    /// The empty state.
    pub(crate) fn new() -> Online {
        Online {
            ms: f32::new(-3.0e38),
            sum_s: f32::new(0.0),
            sum_1: f32::new(0.0),
            finite: f32::new(0.0),
            total: f32::new(0.0),
        }
    }

    /// One student logit `s`.
    pub(crate) fn add(&mut self, s: f32, inv_t: f32) {
        if s > self.ms {
            self.sum_s *= ((self.ms - s) * inv_t).exp();
            self.sum_1 *= (self.ms - s).exp();
            self.ms = s;
        }
        self.sum_s += ((s - self.ms) * inv_t).exp();
        self.sum_1 += (s - self.ms).exp();
        if s > f32::new(comptime!(MASKED_LOGIT as f32)) {
            self.finite += 1.0;
            self.total += s;
        }
    }

    /// The row's values from every unit's: the row maximum, each sum rescaled to it and summed
    /// over the row's units, and the finite logits' total relative to the maximum. Every unit
    /// of the cube must call it.
    pub(crate) fn row(&self, smem: &mut Shared<[f32]>, inv_t: f32) -> Online {
        let ms = row_max(smem, self.ms);
        let finite = row_sum(smem, self.finite);
        Online {
            ms,
            sum_s: row_sum(smem, self.sum_s * ((self.ms - ms) * inv_t).exp()),
            sum_1: row_sum(smem, self.sum_1 * (self.ms - ms).exp()),
            finite,
            total: row_sum(smem, self.total) - finite * ms,
        }
    }

    /// The statistics of a row's values, with the teacher's (dense kernel) or the tail
    /// bucket's (sparse kernel).
    pub(crate) fn stats(&self, mt: f32, lse_t: f32, tail_max: f32, tail_sum: f32) -> RowStats {
        RowStats {
            ms: self.ms,
            lse_s: self.sum_s.ln(),
            lse_1: self.sum_1.ln(),
            finite: self.finite,
            total: self.total,
            mt,
            lse_t,
            tail_max,
            tail_sum,
        }
    }
}

/// The hard term of a row at T = 1: `(1 − ε)·(−log softmax(s)[y]) − ε·(mean log-probability
/// over the finite logits)`.
#[cube]
pub(crate) fn hard_term<F: Float, N: Size>(
    student: &Tensor<Vector<F, N>>,
    s_base: usize,
    class: usize,
    stats: &RowStats,
    eps: f32,
) -> f32 {
    let width = student.vector_size();
    let s_y = f32::cast_from(student[s_base + class / width].extract_dynamic(class % width));
    let nll = stats.lse_1 - (s_y - stats.ms);
    (1.0 - eps) * nll - eps * (stats.total / stats.finite - stats.lse_1)
}

/// `a·soft + b·hard`, leaving out a term whose weight is exactly 0 (so that an infinite term
/// cannot give NaN).
#[cube]
pub(crate) fn mix_terms(a: f32, soft: f32, b: f32, hard: f32) -> f32 {
    let mut value = a * soft + b * hard;
    if a == 1.0 {
        value = soft;
    } else if a == 0.0 {
        value = hard;
    }
    value
}

/// `∂hard/∂s_j` of one logit: `softmax(s)_j − ε/F` on the finite logits (`eps_f = ε/F`),
/// minus `1 − ε` at the target.
#[cube]
pub(crate) fn hard_grad(s: f32, ms: f32, lse_1: f32, eps: f32, eps_f: f32, at_class: bool) -> f32 {
    let mut h = (s - ms - lse_1).exp();
    if s > f32::new(comptime!(MASKED_LOGIT as f32)) {
        h -= eps_f;
    }
    if at_class {
        h -= 1.0 - eps;
    }
    h
}

/// The gradient of the reduced loss at one logit `s`: `ca · soft` plus, where the hard term
/// counts (`cb ≠ 0`), `cb · ∂hard/∂s`.
#[cube]
pub(crate) fn logit_grad(
    weights: &GradWeights,
    s: f32,
    ms: f32,
    lse_1: f32,
    soft: f32,
    at_class: bool,
) -> f32 {
    let mut value = weights.ca * soft;
    if weights.cb != 0.0 {
        value += weights.cb * hard_grad(s, ms, lse_1, weights.eps, weights.eps_f, at_class);
    }
    value
}

/// A vector of zeros: the gradient of a row that is not live.
#[cube]
pub(crate) fn zero_vector<G: Float, N: Size>(#[comptime] width: usize) -> Vector<G, N> {
    let mut out = Vector::<G, N>::empty();
    #[unroll]
    for l in 0..width {
        out.insert(l, G::cast_from(0.0f32));
    }
    out
}

/// A row's softmax statistics after the online pass; every unit of the row holds them.
#[derive(CubeType, Clone, Copy)]
pub(crate) struct RowStats {
    /// The student's row maximum.
    pub ms: f32,
    /// `log Σ e^{(s−ms)/T}`.
    pub lse_s: f32,
    /// `log Σ e^{s−ms}` (the hard term's, at T = 1).
    pub lse_1: f32,
    /// The count of the finite (not padding) logits, and their total relative to `ms`.
    pub finite: f32,
    pub total: f32,
    /// The teacher's row maximum (dense kernel).
    pub mt: f32,
    /// `log Σ e^{(t−mt)/T}` (dense kernel).
    pub lse_t: f32,
    /// The tail bucket's maximum and `Σ e^{(z−max)/T}` over the columns outside the teacher's
    /// top-k (sparse kernel).
    pub tail_max: f32,
    pub tail_sum: f32,
}

/// The weights of a row's gradient: `ca = α·T²/T` and `cb = 1 − α` times the reduction's
/// factor, label smoothing `ε` and `ε/F`, the divergence `D` and `Σ q·∂D/∂q`.
#[derive(CubeType, Clone, Copy)]
pub(crate) struct GradWeights {
    pub ca: f32,
    pub cb: f32,
    pub eps: f32,
    pub eps_f: f32,
    pub div: f32,
    pub sqg: f32,
}

/// The end of a row, shared by both kernels: its hard term (with targets), the loss
/// `α·soft + (1 − α)·hard` written with the soft and hard terms by the row's first unit when
/// `write` (`fallback` in all three when the row is not live), and the weights of its
/// gradient: `ca = α·soft_scale·factor` (`soft_scale = T²/T`, or 0), `cb = (1 − α)·factor`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn finish_row<F: Float, G: CubePrimitive, N: Size>(
    student: &Tensor<Vector<F, N>>,
    s_base: usize,
    class: usize,
    stats: &RowStats,
    out: &mut RowOut<G>,
    row: usize,
    write: bool,
    live: bool,
    fallback: f32,
    soft_value: f32,
    soft_scale: f32,
    params: &RowParams,
    factor: f32,
    div: f32,
    sqg: f32,
    #[comptime] labeled: bool,
) -> GradWeights {
    let mut hard_value = f32::new(0.0);
    let mut a = f32::new(1.0);
    let mut b = f32::new(0.0);
    if labeled {
        a = params.alpha;
        b = 1.0 - params.alpha;
        hard_value = hard_term(student, s_base, class, stats, params.eps);
    }
    let row_loss = mix_terms(a, soft_value, b, hard_value);
    if write {
        // The row's values when it is live, `fallback` in all three otherwise.
        let mut l = fallback;
        let mut s = fallback;
        let mut h = fallback;
        if live {
            l = row_loss;
            s = soft_value;
            h = hard_value;
        }
        out.loss[row] = l;
        out.soft[row] = s;
        out.hard[row] = h;
    }
    GradWeights {
        ca: a * soft_scale * factor,
        cb: b * factor,
        eps: params.eps,
        eps_f: params.eps / stats.finite,
        div,
        sqg,
    }
}
