//! The fused CPU kernel: one row per task (rayon), every quantity from one read of the row.
//!
//! Per row, with `T` the temperature and `s`, `t` the student and teacher logits:
//!
//! 1. the maxima of `s` and `t`;
//! 2. `e_s = exp((s − max s)/T)`, `e_t = exp((t − max t)/T)` (and `exp(s − max s)` for the hard
//!    term when `T ≠ 1`) into per-thread scratch rows, with their sums;
//! 3. the divergence and the hard cross-entropy from the normalised scratch rows;
//! 4. if asked, the gradient of the reduced loss with respect to `s`, written once (the
//!    reduction's `1/count` is folded in, so a backward pass with upstream gradient 1 has
//!    nothing left to do).
//!
//! Steps 2–4 run over the row while it sits in the core's cache, so main memory sees one read
//! of each input and one write of the gradient. Extra memory is O(threads · V) of scratch and
//! O(N) of outputs. The loops are written with independent lanes and a branch-free `exp` so
//! that they vectorize; the row function is compiled for AVX-512, AVX2+FMA and baseline x86-64
//! and picked at run time.

use rayon::prelude::*;

use super::real::Real;
pub use super::simd::{Isa, force_isa, zeroed_grad};
pub(super) use super::simd::{lane_max, lane_sum, selected_isa};
use super::simd::{lane_sum_map, lane_sum_zip3, pow_const, select};
use crate::{DistillParams, Divergence};

/// The target of one row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RowTarget {
    /// Soft loss only.
    NoLabel,
    /// The row is ignored: zero loss, zero gradient.
    Ignored,
    /// The target is out of range: NaN loss, zero gradient.
    Bad,
    /// A valid class index.
    Class(usize),
}

impl RowTarget {
    /// Classifies the target of a row.
    pub fn of(target: Option<i64>, classes: usize, ignore_index: Option<i64>) -> Self {
        match target {
            None => Self::NoLabel,
            Some(t) if Some(t) == ignore_index => Self::Ignored,
            Some(t) if t < 0 || t >= classes as i64 => Self::Bad,
            Some(t) => Self::Class(t as usize),
        }
    }
}

/// Outputs of one row.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RowOut<R> {
    /// `α·soft + (1 − α)·hard` (or `soft` without a label).
    pub loss: R,
    /// The soft term (T²-scaled if configured).
    pub soft: R,
    /// The hard term (0 without a label).
    pub hard: R,
}

/// Outputs of a batch.
#[derive(Debug)]
pub struct CpuRows<R> {
    /// Per-row outputs.
    pub rows: Vec<RowOut<R>>,
    /// Number of rows that are not ignored.
    pub kept: usize,
    /// `[N·V]` gradient of the reduced loss with respect to the student logits, if asked
    /// (for `Reduction::PerRow`, row `i` holds the gradient of row loss `i`).
    pub grad: Option<Vec<R>>,
}

/// Per-thread scratch rows.
struct Scratch<R> {
    es: Vec<R>,
    et: Vec<R>,
    e1: Vec<R>,
    g: Vec<R>,
    d1: Vec<R>,
    d2: Vec<R>,
}

impl<R: Real> Scratch<R> {
    fn new(v: usize) -> Self {
        Self {
            es: vec![R::ZERO; v],
            et: vec![R::ZERO; v],
            e1: vec![R::ZERO; v],
            g: vec![R::ZERO; v],
            d1: vec![R::ZERO; v],
            d2: vec![R::ZERO; v],
        }
    }
}

/// Row losses (and optionally the gradient of the reduced loss) of `[N, V]` row-major logits.
pub fn distill_rows<R: Real>(
    student: &[R],
    teacher: &[R],
    v: usize,
    targets: Option<&[i64]>,
    params: &DistillParams,
    with_grad: bool,
) -> CpuRows<R> {
    let mut grad = with_grad.then(|| zeroed_grad::<R>(student.len()));
    let (rows, kept) = distill_rows_into(student, teacher, v, targets, params, grad.as_deref_mut());
    CpuRows { rows, kept, grad }
}

/// [`distill_rows`] writing the gradient into `grad` (`[N·V]`, every entry overwritten, so a
/// buffer can be reused across calls): the per-row outputs and the number of rows kept.
pub fn distill_rows_into<R: Real>(
    student: &[R],
    teacher: &[R],
    v: usize,
    targets: Option<&[i64]>,
    params: &DistillParams,
    grad: Option<&mut [R]>,
) -> (Vec<RowOut<R>>, usize) {
    assert_eq!(student.len(), teacher.len(), "student and teacher lengths");
    assert!(v > 0 && student.len().is_multiple_of(v), "[N, V] logits");
    let n = student.len() / v;
    if let Some(targets) = targets {
        assert_eq!(targets.len(), n, "one target per row");
    }
    let target = |i: usize| RowTarget::of(targets.map(|t| t[i]), v, params.ignore_index);
    let kept = (0..n).filter(|&i| target(i) != RowTarget::Ignored).count();
    let isa = selected_isa();
    // The gradient of the reduced loss: each row's gradient times the reduction's factor
    // (1 per row for `PerRow`).
    let grad_scale = params.reduction.factor(kept).unwrap_or(1.0);
    let inputs = |i: usize| (&student[i * v..(i + 1) * v], &teacher[i * v..(i + 1) * v]);
    let rows = match grad {
        Some(grad) => {
            assert_eq!(grad.len(), n * v, "[N, V] gradient");
            grad.par_chunks_mut(v)
                .enumerate()
                .map_init(
                    || Scratch::new(v),
                    |scratch, (i, g)| {
                        let (s, t) = inputs(i);
                        row(isa, s, t, target(i), params, grad_scale, scratch, Some(g))
                    },
                )
                .collect()
        }
        None => (0..n)
            .into_par_iter()
            .map_init(
                || Scratch::new(v),
                |scratch, i| {
                    let (s, t) = inputs(i);
                    row(isa, s, t, target(i), params, grad_scale, scratch, None)
                },
            )
            .collect(),
    };
    (rows, kept)
}

/// One row, on the given instruction set (one [`selected_isa`] of this CPU).
#[allow(clippy::too_many_arguments)]
fn row<R: Real>(
    isa: Isa,
    s: &[R],
    t: &[R],
    target: RowTarget,
    params: &DistillParams,
    grad_scale: f64,
    scratch: &mut Scratch<R>,
    grad: Option<&mut [R]>,
) -> RowOut<R> {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `selected_isa` only returns instruction sets whose every enabled feature
        // `Isa::available` detected on this CPU.
        Isa::Avx512 => unsafe { row_avx512(s, t, target, params, grad_scale, scratch, grad) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { row_avx2(s, t, target, params, grad_scale, scratch, grad) },
        _ => row_body(s, t, target, params, grad_scale, scratch, grad),
    }
}

/// # Safety
/// The CPU must support every feature enabled here (as [`Isa::available`] checks).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma,bmi2")]
unsafe fn row_avx512<R: Real>(
    s: &[R],
    t: &[R],
    target: RowTarget,
    params: &DistillParams,
    grad_scale: f64,
    scratch: &mut Scratch<R>,
    grad: Option<&mut [R]>,
) -> RowOut<R> {
    row_body(s, t, target, params, grad_scale, scratch, grad)
}

/// # Safety
/// The CPU must support AVX2 and FMA (as [`Isa::available`] checks).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2<R: Real>(
    s: &[R],
    t: &[R],
    target: RowTarget,
    params: &DistillParams,
    grad_scale: f64,
    scratch: &mut Scratch<R>,
    grad: Option<&mut [R]>,
) -> RowOut<R> {
    row_body(s, t, target, params, grad_scale, scratch, grad)
}

/// The dense row kernel on short rows at the baseline instruction set (the sparse kernel's
/// `k + 1` virtual logits), soft term only.
pub(super) struct SmallRow<R>(Scratch<R>);

impl<R: Real> SmallRow<R> {
    pub(super) fn new(len: usize) -> Self {
        Self(Scratch::new(len))
    }

    /// `D(softmax(t), softmax(s))` (with `params`) and its gradient with respect to `s`.
    pub(super) fn run(
        &mut self,
        s: &[R],
        t: &[R],
        params: &DistillParams,
        grad: &mut [R],
    ) -> RowOut<R> {
        row_body(
            s,
            t,
            RowTarget::NoLabel,
            params,
            1.0,
            &mut self.0,
            Some(grad),
        )
    }
}

/// Calls `$body` with `$K` bound to the constant `k ∈ 2..=8` (loops that use `pow_const::<K>`
/// are then compiled once per power and vectorize).
macro_rules! with_power {
    ($k:expr, $K:ident => $body:expr) => {
        with_power!(@arms $k, $K => $body; 2 3 4 5 6 7 8)
    };
    (@arms $k:expr, $K:ident => $body:expr; $($n:literal)*) => {
        match $k {
            $($n => {
                const $K: u32 = $n;
                $body
            })*
            _ => unreachable!("Unit::Power holds 2..=8"),
        }
    };
}

/// How the temperature-1 exponentials of the hard term are obtained from `e_s`.
#[derive(Clone, Copy)]
enum Unit {
    /// `T = 1`: they are `e_s` itself.
    Same,
    /// `T` is a small integer `k`: `exp(s − max) = e_s^k`, by multiplication.
    Power(u32),
    /// Any other `T`: computed with `exp` into scratch.
    Exp,
}

// The loops below index slices that all have the row's length `v`, with no cross-element
// dependency, so that LLVM vectorizes them; sums go through scratch rows and `lane_sum`.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn row_body<R: Real>(
    s: &[R],
    t: &[R],
    target: RowTarget,
    params: &DistillParams,
    grad_scale: f64,
    scratch: &mut Scratch<R>,
    grad: Option<&mut [R]>,
) -> RowOut<R> {
    let v = s.len();
    let class = match target {
        RowTarget::Ignored | RowTarget::Bad => {
            if let Some(g) = grad {
                g.fill(R::ZERO);
            }
            let value = select(target == RowTarget::Bad, R::NAN, R::ZERO);
            return RowOut {
                loss: value,
                soft: value,
                hard: value,
            };
        }
        RowTarget::NoLabel => None,
        RowTarget::Class(c) => Some(c),
    };
    let t = &t[..v];
    let Scratch {
        es,
        et,
        e1,
        g,
        d1,
        d2,
    } = scratch;
    let (es, et, e1, g, d1, d2) = (
        &mut es[..v],
        &mut et[..v],
        &mut e1[..v],
        &mut g[..v],
        &mut d1[..v],
        &mut d2[..v],
    );
    let temperature = params.temperature;
    let inv_t = R::of(temperature.recip());
    let unit = if class.is_none() || temperature == 1.0 {
        Unit::Same
    } else if temperature.fract() == 0.0 && (2.0..=8.0).contains(&temperature) {
        Unit::Power(temperature as u32)
    } else {
        Unit::Exp
    };

    // Passes 1–2: maxima, tempered exponentials and their sums (and the T = 1 sum).
    let (ms, mt) = (lane_max(s), lane_max(t));
    for j in 0..v {
        es[j] = ((s[j] - ms) * inv_t).exp();
        et[j] = ((t[j] - mt) * inv_t).exp();
    }
    let (sum_s, sum_t) = (lane_sum(es), lane_sum(et));
    let sum_1 = match unit {
        Unit::Same => sum_s,
        // Forward KL computes e_s^k on the fly in its gradient loop; the other divergences
        // read it from scratch.
        Unit::Power(k) if params.divergence == Divergence::ForwardKl => {
            with_power!(k, K => lane_sum_map(es, pow_const::<R, K>))
        }
        Unit::Power(k) => with_power!(k, K => {
            for (o, &e) in e1.iter_mut().zip(es.iter()) {
                *o = pow_const::<R, K>(e);
            }
            lane_sum(e1)
        }),
        Unit::Exp => {
            for j in 0..v {
                e1[j] = (s[j] - ms).exp();
            }
            lane_sum(e1)
        }
    };
    let (es, et, e1) = (&*es, &*et, &*e1);
    let (lse_s, lse_t) = (sum_s.ln(), sum_t.ln());
    let (inv_ss, inv_st) = (R::ONE / sum_s, R::ONE / sum_t);
    // log q_j = s_j/T − cs and log p_j = t_j/T − ct.
    let (cs, ct) = (ms * inv_t + lse_s, mt * inv_t + lse_t);

    // Pass 3: the divergence D (terms in d1), and Σ_j q_j g_j (terms in d2) where g_j is
    // ∂D/∂q_j (in g), as needed by the gradient. Forward KL needs neither g nor Σ q g.
    let (div, sum_qg) = match params.divergence {
        // Σ_j p_j (log p_j − log q_j) = (1/T) Σ_j p_j (t_j − s_j) − ct + cs, as Σ_j p_j = 1:
        // one sum over the row, nothing stored.
        Divergence::ForwardKl => {
            let weighted = lane_sum_zip3(et, t, s, |e, y, x| {
                select(e > R::ZERO, e * (y - x), R::ZERO)
            });
            (weighted * inv_st * inv_t - ct + cs, R::ZERO)
        }
        Divergence::ReverseKl => {
            for j in 0..v {
                let q = es[j] * inv_ss;
                d1[j] = select(q > R::ZERO, q * ((s[j] - t[j]) * inv_t - cs + ct), R::ZERO);
            }
            let d = lane_sum(d1);
            (d, d)
        }
        Divergence::Jsd { beta } => {
            let (b, b1) = (R::of(beta), R::of(1.0 - beta));
            for j in 0..v {
                let (q, p) = (es[j] * inv_ss, et[j] * inv_st);
                let m = b * p + b1 * q;
                let lm = select(m > R::ZERO, m, R::ONE).ln();
                let gq = select(q > R::ZERO, s[j] * inv_t - cs - lm, R::ZERO);
                d1[j] = select(p > R::ZERO, p * (t[j] * inv_t - ct - lm), R::ZERO);
                d2[j] = q * gq;
                g[j] = b1 * gq;
            }
            let (dp, dq) = (lane_sum(d1), lane_sum(d2));
            (b * dp + b1 * dq, b1 * dq)
        }
        Divergence::SkewKl { lambda } => {
            let (l, l1) = (R::of(lambda), R::of(1.0 - lambda));
            for j in 0..v {
                let (q, p) = (es[j] * inv_ss, et[j] * inv_st);
                let m = l * p + l1 * q;
                let safe_m = select(m > R::ZERO, m, R::ONE);
                let gq = select(m > R::ZERO, -(l1 * p / safe_m), R::ZERO);
                d1[j] = select(p > R::ZERO, p * (t[j] * inv_t - ct - safe_m.ln()), R::ZERO);
                d2[j] = q * gq;
                g[j] = gq;
            }
            (lane_sum(d1), lane_sum(d2))
        }
        Divergence::SkewReverseKl { lambda } => {
            let (l, l1) = (R::of(lambda), R::of(1.0 - lambda));
            for j in 0..v {
                let (q, p) = (es[j] * inv_ss, et[j] * inv_st);
                let m = select(q > R::ZERO, l1 * p + l * q, R::ONE);
                let ratio = select(q > R::ZERO, s[j] * inv_t - cs - m.ln(), R::ZERO);
                let gq = select(q > R::ZERO, ratio + R::ONE - l * q / m, R::ZERO);
                d1[j] = q * ratio;
                d2[j] = q * gq;
                g[j] = gq;
            }
            (lane_sum(d1), lane_sum(d2))
        }
        Divergence::Tvd => {
            let half = R::of(0.5);
            for j in 0..v {
                let q = es[j] * inv_ss;
                let diff = q - et[j] * inv_st;
                let gq = select(diff > R::ZERO, half, select(diff < R::ZERO, -half, R::ZERO));
                d1[j] = select(diff > R::ZERO, diff, -diff);
                d2[j] = q * gq;
                g[j] = gq;
            }
            (half * lane_sum(d1), lane_sum(d2))
        }
    };
    let g = &*g;
    let t2 = R::of(params.soft_factor());

    // The hard term at T = 1: log softmax(s)[y], and the mean log-prob over the classes (not
    // padding: `MASKED_LOGIT`).
    let smoothing = params.label_smoothing;
    let lse_1 = sum_1.ln();
    let (hard, finite) = match class {
        None => (R::ZERO, R::ONE),
        Some(y) => {
            let nll = lse_1 - (s[y] - ms);
            if smoothing == 0.0 {
                (nll, R::ONE)
            } else {
                let count = lane_sum_map(s, |x| select(x.is_class(), R::ONE, R::ZERO));
                let total = lane_sum_map(s, |x| select(x.is_class(), x - ms, R::ZERO));
                let eps = R::of(smoothing);
                let mean_log_prob = total / count - lse_1;
                ((R::ONE - eps) * nll - eps * mean_log_prob, count)
            }
        }
    };
    let alpha = if class.is_some() { params.alpha } else { 1.0 };
    let out = |div: R| {
        let soft = t2 * div;
        let loss = if alpha == 1.0 {
            soft
        } else if alpha == 0.0 {
            hard
        } else {
            R::of(alpha) * soft + R::of(1.0 - alpha) * hard
        };
        RowOut { loss, soft, hard }
    };

    // Pass 4: d loss / d s_j = a · ∂soft/∂s_j + b · ∂hard/∂s_j, scaled by the reduction.
    let Some(grad) = grad else { return out(div) };
    let grad = &mut grad[..v];
    let a = R::of(alpha * grad_scale) * t2 * inv_t;
    let b = R::of((1.0 - alpha) * grad_scale);
    let inv_1 = R::ONE / sum_1;
    let eps_f = R::of(smoothing) / finite;
    let with_hard = alpha != 1.0;
    // ∂hard/∂s_j without the one-hot part: softmax_j − ε/F on the classes.
    let hard_grad = |x: R, e: R| {
        let s1 = e * inv_1;
        select(x.is_class(), s1 - eps_f, s1)
    };
    match (params.divergence, unit, with_hard) {
        (Divergence::ForwardKl, _, false) => {
            for j in 0..v {
                grad[j] = a * (es[j] * inv_ss - et[j] * inv_st);
            }
        }
        (Divergence::ForwardKl, Unit::Same, true) => {
            for j in 0..v {
                let soft = es[j] * inv_ss - et[j] * inv_st;
                grad[j] = a * soft + b * hard_grad(s[j], es[j]);
            }
        }
        (Divergence::ForwardKl, Unit::Power(k), true) => with_power!(k, K => {
            for j in 0..v {
                let soft = es[j] * inv_ss - et[j] * inv_st;
                grad[j] = a * soft + b * hard_grad(s[j], pow_const::<R, K>(es[j]));
            }
        }),
        (Divergence::ForwardKl, Unit::Exp, true) => {
            for j in 0..v {
                let soft = es[j] * inv_ss - et[j] * inv_st;
                grad[j] = a * soft + b * hard_grad(s[j], e1[j]);
            }
        }
        (Divergence::ReverseKl, _, _) => {
            for j in 0..v {
                let q = es[j] * inv_ss;
                let soft = select(
                    q > R::ZERO,
                    q * ((s[j] - t[j]) * inv_t - cs + ct - div),
                    R::ZERO,
                );
                let hard = hard_grad(s[j], unit_exp(unit, es[j], e1[j]));
                grad[j] = a * soft + select(with_hard, b * hard, R::ZERO);
            }
        }
        _ => {
            for j in 0..v {
                let q = es[j] * inv_ss;
                let soft = q * (g[j] - sum_qg);
                let hard = hard_grad(s[j], unit_exp(unit, es[j], e1[j]));
                grad[j] = a * soft + select(with_hard, b * hard, R::ZERO);
            }
        }
    }
    if let Some(y) = class {
        grad[y] = grad[y] - b * (R::ONE - R::of(smoothing));
    }
    out(div)
}

/// `exp(s_j − max s)` from `e_s` (`T = 1`) or the scratch row `e1` (filled otherwise, except
/// for forward KL with an integer `T`, which never calls this).
#[inline(always)]
fn unit_exp<R: Real>(unit: Unit, es: R, e1: R) -> R {
    match unit {
        Unit::Same => es,
        Unit::Power(_) | Unit::Exp => e1,
    }
}
