//! One row of the dense CPU kernel, in its four phases: exponentials, divergence, hard term,
//! gradient (see the parent module).

use super::super::real::Real;
use super::super::simd::{lane_max, lane_sum, lane_sum_map, lane_sum_zip3, pow_const, select};
use super::{IsaKernel, RowOut, RowTarget, Scratch};
use crate::{DistillParams, Divergence};

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

/// What the first passes leave for the others: maxima, `1/Σ` of the tempered exponentials
/// (in scratch), the offsets of the log-probabilities (`log q_j = s_j/T − cs`,
/// `log p_j = t_j/T − ct`), the temperature-1 sum of the hard term and how it was obtained.
#[derive(Clone, Copy)]
struct RowSums<R> {
    inv_t: R,
    ms: R,
    inv_ss: R,
    inv_st: R,
    cs: R,
    ct: R,
    sum_1: R,
    unit: Unit,
}

/// The inputs of one row of the dense kernel: `[V]` student and teacher logits, the target,
/// the parameters and the reduction's factor of the gradient.
#[derive(Clone, Copy)]
pub(super) struct RowInputs<'a, R> {
    pub(super) s: &'a [R],
    pub(super) t: &'a [R],
    pub(super) target: RowTarget,
    pub(super) params: &'a DistillParams,
    pub(super) grad_scale: f64,
}

/// One row of the dense kernel: its inputs, scratch rows and, if asked, the row's gradient.
pub(super) struct RowCall<'a, R> {
    pub(super) inputs: RowInputs<'a, R>,
    pub(super) scratch: &'a mut Scratch<R>,
    pub(super) grad: Option<&'a mut [R]>,
}

impl<R: Real> IsaKernel for RowCall<'_, R> {
    type Out = RowOut<R>;

    #[inline(always)]
    fn run(self) -> RowOut<R> {
        row_body(self)
    }
}

// The loops below index slices that all have the row's length `v`, with no cross-element
// dependency, so that LLVM vectorizes them; sums go through scratch rows and `lane_sum`. Every
// phase is `inline(always)`, so that it is compiled for the instruction set of its caller.
#[inline(always)]
fn row_body<R: Real>(call: RowCall<'_, R>) -> RowOut<R> {
    let RowInputs {
        s,
        t,
        target,
        params,
        grad_scale,
    } = call.inputs;
    let (scratch, grad) = (call.scratch, call.grad);
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
    let (es, et, e1, g) = (&mut es[..v], &mut et[..v], &mut e1[..v], &mut g[..v]);
    let sums = exponentials(s, t, class.is_some(), params, es, et, e1);
    let (es, et, e1) = (&*es, &*et, &*e1);
    let (div, sum_qg) = soft_divergence(s, t, es, et, &sums, params.divergence, g, d1, d2);
    let (hard, finite) = hard_term(s, class, &sums, params.label_smoothing);
    let alpha = if class.is_some() { params.alpha } else { 1.0 };
    let t2 = R::of(params.soft_factor());
    let soft = t2 * div;
    let loss = if alpha == 1.0 {
        soft
    } else if alpha == 0.0 {
        hard
    } else {
        R::of(alpha) * soft + R::of(1.0 - alpha) * hard
    };
    if let Some(grad) = grad {
        let mix = GradMix {
            a: R::of(alpha * grad_scale) * t2 * sums.inv_t,
            b: R::of((1.0 - alpha) * grad_scale),
            eps: params.label_smoothing,
            eps_f: R::of(params.label_smoothing) / finite,
            with_hard: alpha != 1.0,
        };
        let rows = Rows { s, t, es, et, e1 };
        gradient(
            &rows,
            class,
            &sums,
            params.divergence,
            div,
            sum_qg,
            &*g,
            &mix,
            grad,
        );
    }
    RowOut { loss, soft, hard }
}

/// Passes 1–2: maxima, tempered exponentials (into `es`, `et`) and their sums, and the
/// temperature-1 sum of the hard term (from `es` when `T` is 1 or a small integer).
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn exponentials<R: Real>(
    s: &[R],
    t: &[R],
    labelled: bool,
    params: &DistillParams,
    es: &mut [R],
    et: &mut [R],
    e1: &mut [R],
) -> RowSums<R> {
    let v = s.len();
    let temperature = params.temperature;
    let inv_t = R::of(temperature.recip());
    let unit = if !labelled || temperature == 1.0 {
        Unit::Same
    } else if temperature.fract() == 0.0 && (2.0..=8.0).contains(&temperature) {
        Unit::Power(temperature as u32)
    } else {
        Unit::Exp
    };
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
    RowSums {
        inv_t,
        ms,
        inv_ss: R::ONE / sum_s,
        inv_st: R::ONE / sum_t,
        cs: ms * inv_t + sum_s.ln(),
        ct: mt * inv_t + sum_t.ln(),
        sum_1,
        unit,
    }
}

/// Pass 3: the divergence `D` (terms in `d1`) and `Σ_j q_j g_j` (terms in `d2`), where
/// `g_j = ∂D/∂q_j` (into `g`) as the gradient needs it. Forward KL needs neither `g` nor `Σ q g`.
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
#[inline(always)]
fn soft_divergence<R: Real>(
    s: &[R],
    t: &[R],
    es: &[R],
    et: &[R],
    sums: &RowSums<R>,
    divergence: Divergence,
    g: &mut [R],
    d1: &mut [R],
    d2: &mut [R],
) -> (R, R) {
    let v = s.len();
    let (d1, d2) = (&mut d1[..v], &mut d2[..v]);
    let (inv_t, inv_ss, inv_st) = (sums.inv_t, sums.inv_ss, sums.inv_st);
    let (cs, ct) = (sums.cs, sums.ct);
    match divergence {
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
    }
}

/// The hard term at `T = 1`: `−log softmax(s)[y]`, label-smoothed with the mean
/// log-probability over the classes (not padding: `MASKED_LOGIT`); and the number of classes
/// `F` (1 without smoothing).
#[inline(always)]
fn hard_term<R: Real>(s: &[R], class: Option<usize>, sums: &RowSums<R>, smoothing: f64) -> (R, R) {
    let Some(y) = class else {
        return (R::ZERO, R::ONE);
    };
    let lse_1 = sums.sum_1.ln();
    let nll = lse_1 - (s[y] - sums.ms);
    if smoothing == 0.0 {
        return (nll, R::ONE);
    }
    let count = lane_sum_map(s, |x| select(x.is_class(), R::ONE, R::ZERO));
    let total = lane_sum_map(s, |x| select(x.is_class(), x - sums.ms, R::ZERO));
    let eps = R::of(smoothing);
    let mean_log_prob = total / count - lse_1;
    ((R::ONE - eps) * nll - eps * mean_log_prob, count)
}

/// The row's inputs and its exponentials from passes 1–2.
struct Rows<'a, R> {
    s: &'a [R],
    t: &'a [R],
    es: &'a [R],
    et: &'a [R],
    e1: &'a [R],
}

/// The weights of the gradient: `a = α·T²/T` times the reduction's factor on the soft term,
/// `b = (1 − α)` times it on the hard term, label smoothing `ε` and `ε/F`.
struct GradMix<R> {
    a: R,
    b: R,
    eps: f64,
    eps_f: R,
    with_hard: bool,
}

/// Pass 4: `∂loss/∂s_j = a·∂soft/∂s_j + b·∂hard/∂s_j`, written once into `grad`.
#[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
#[inline(always)]
fn gradient<R: Real>(
    rows: &Rows<'_, R>,
    class: Option<usize>,
    sums: &RowSums<R>,
    divergence: Divergence,
    div: R,
    sum_qg: R,
    g: &[R],
    mix: &GradMix<R>,
    grad: &mut [R],
) {
    let Rows { s, t, es, et, e1 } = *rows;
    let v = s.len();
    let grad = &mut grad[..v];
    let RowSums {
        inv_t,
        inv_ss,
        inv_st,
        cs,
        ct,
        sum_1,
        unit,
        ..
    } = *sums;
    let GradMix {
        a,
        b,
        eps_f,
        with_hard,
        ..
    } = *mix;
    let inv_1 = R::ONE / sum_1;
    // ∂hard/∂s_j without the one-hot part: softmax_j − ε/F on the classes.
    let hard_grad = |x: R, e: R| {
        let s1 = e * inv_1;
        select(x.is_class(), s1 - eps_f, s1)
    };
    match (divergence, unit, with_hard) {
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
        grad[y] = grad[y] - b * (R::ONE - R::of(mix.eps));
    }
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
