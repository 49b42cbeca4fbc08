//! The fused CPU kernel: one row per task (rayon), every quantity from one read of the row.
//!
//! Per row, with `T` the temperature and `s`, `t` the student and teacher logits:
//!
//! 1. the maxima of `s` and `t`;
//! 2. `e_s = exp((s − max s)/T)`, `e_t = exp((t − max t)/T)` (and `exp(s − max s)` for the hard
//!    term when `T ≠ 1`) into per-thread scratch rows, with their sums;
//! 3. the divergence and the hard cross-entropy from the normalised scratch rows;
//! 4. if asked, the gradient of the row loss with respect to `s`, written once.
//!
//! Steps 2–4 run over the row while it sits in the core's cache, so main memory sees one read
//! of each input and one write of the gradient. Extra memory is O(threads · V) of scratch and
//! O(N) of outputs. The loops are written with independent lanes and a branch-free `exp` so
//! that they vectorize; the row function is compiled for AVX-512, AVX2+FMA and baseline x86-64
//! and picked at run time.

use rayon::prelude::*;

use super::real::Real;
use crate::{DistillParams, Divergence};

/// Lanes of the accumulator arrays (independent partial sums, so sums vectorize).
const LANES: usize = 16;

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
    /// `[N·V]` gradient of each row loss with respect to its student logits, if asked.
    pub grad: Option<Vec<R>>,
}

/// Per-thread scratch rows.
struct Scratch<R> {
    es: Vec<R>,
    et: Vec<R>,
    e1: Vec<R>,
    g: Vec<R>,
}

impl<R: Real> Scratch<R> {
    fn new(v: usize) -> Self {
        Self {
            es: vec![R::ZERO; v],
            et: vec![R::ZERO; v],
            e1: vec![R::ZERO; v],
            g: vec![R::ZERO; v],
        }
    }
}

/// Row losses (and optionally gradients) of `[N, V]` row-major logits.
pub fn distill_rows<R: Real>(
    student: &[R],
    teacher: &[R],
    v: usize,
    targets: Option<&[i64]>,
    params: &DistillParams,
    with_grad: bool,
) -> CpuRows<R> {
    assert_eq!(student.len(), teacher.len());
    assert!(v > 0 && student.len() % v == 0);
    let n = student.len() / v;
    let target = |i: usize| RowTarget::of(targets.map(|t| t[i]), v, params.ignore_index);
    let inputs = |i: usize| (&student[i * v..(i + 1) * v], &teacher[i * v..(i + 1) * v]);
    if with_grad {
        let mut grad = vec![R::ZERO; n * v];
        let rows = grad
            .par_chunks_mut(v)
            .enumerate()
            .map_init(
                || Scratch::new(v),
                |scratch, (i, g)| {
                    let (s, t) = inputs(i);
                    row(s, t, target(i), params, scratch, Some(g))
                },
            )
            .collect();
        CpuRows {
            rows,
            grad: Some(grad),
        }
    } else {
        let rows = (0..n)
            .into_par_iter()
            .map_init(
                || Scratch::new(v),
                |scratch, i| {
                    let (s, t) = inputs(i);
                    row(s, t, target(i), params, scratch, None)
                },
            )
            .collect();
        CpuRows { rows, grad: None }
    }
}

/// One row, on the widest instruction set this CPU has.
fn row<R: Real>(
    s: &[R],
    t: &[R],
    target: RowTarget,
    params: &DistillParams,
    scratch: &mut Scratch<R>,
    grad: Option<&mut [R]>,
) -> RowOut<R> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return unsafe { row_avx512(s, t, target, params, scratch, grad) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { row_avx2(s, t, target, params, scratch, grad) };
        }
    }
    row_body(s, t, target, params, scratch, grad)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma,bmi2")]
fn row_avx512<R: Real>(
    s: &[R],
    t: &[R],
    target: RowTarget,
    params: &DistillParams,
    scratch: &mut Scratch<R>,
    grad: Option<&mut [R]>,
) -> RowOut<R> {
    row_body(s, t, target, params, scratch, grad)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn row_avx2<R: Real>(
    s: &[R],
    t: &[R],
    target: RowTarget,
    params: &DistillParams,
    scratch: &mut Scratch<R>,
    grad: Option<&mut [R]>,
) -> RowOut<R> {
    row_body(s, t, target, params, scratch, grad)
}

/// `Σ f(i)` over `0..len` with `LANES` independent accumulators.
#[inline(always)]
fn lane_sum<R: Real>(len: usize, mut f: impl FnMut(usize) -> R) -> R {
    let mut acc = [R::ZERO; LANES];
    let full = len / LANES * LANES;
    let mut i = 0;
    while i < full {
        for (l, a) in acc.iter_mut().enumerate() {
            *a = *a + f(i + l);
        }
        i += LANES;
    }
    let mut total = R::ZERO;
    for j in full..len {
        total = total + f(j);
    }
    acc.iter().fold(total, |x, y| x + *y)
}

/// Maximum of a row with `LANES` independent accumulators.
#[inline(always)]
fn lane_max<R: Real>(x: &[R]) -> R {
    let mut acc = [R::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = a.max(v);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(R::NEG_INFINITY, |m, &v| m.max(v));
    acc.iter().fold(tail, |m, &v| m.max(v))
}

/// `out[j] = exp((x[j] − max)·scale)` and `Σ out`.
#[inline(always)]
fn exp_into<R: Real>(x: &[R], max: R, scale: R, out: &mut [R]) -> R {
    let out = &mut out[..x.len()];
    lane_sum(x.len(), |j| {
        let e = ((x[j] - max) * scale).exp();
        out[j] = e;
        e
    })
}

#[inline(always)]
fn select<R: Real>(cond: bool, a: R, b: R) -> R {
    if cond { a } else { b }
}

#[inline(always)]
fn row_body<R: Real>(
    s: &[R],
    t: &[R],
    target: RowTarget,
    params: &DistillParams,
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
    let temperature = params.temperature;
    let inv_t = R::of(temperature.recip());
    let unit_t = temperature == 1.0;
    let Scratch { es, et, e1, g } = scratch;

    // Passes 1–2: maxima, tempered exponentials and their sums.
    let (ms, mt) = (lane_max(s), lane_max(t));
    let sum_s = exp_into(s, ms, inv_t, es);
    let sum_t = exp_into(t, mt, inv_t, et);
    let (lse_s, lse_t) = (sum_s.ln(), sum_t.ln());
    let (inv_ss, inv_st) = (R::ONE / sum_s, R::ONE / sum_t);

    // Pass 3: the divergence D, and Σ_j q_j g_j for the gradient (g_j = ∂D/∂q_j).
    let q = |j: usize| es[j] * inv_ss;
    let p = |j: usize| et[j] * inv_st;
    let lq = |j: usize| (s[j] - ms) * inv_t - lse_s;
    let lp = |j: usize| (t[j] - mt) * inv_t - lse_t;
    let (div, sum_qg) = match params.divergence {
        Divergence::ForwardKl => {
            let d = lane_sum(v, |j| {
                let pj = p(j);
                select(pj > R::ZERO, pj * (lp(j) - lq(j)), R::ZERO)
            });
            (d, R::ZERO)
        }
        Divergence::ReverseKl => {
            let d = lane_sum(v, |j| {
                let qj = q(j);
                select(qj > R::ZERO, qj * (lq(j) - lp(j)), R::ZERO)
            });
            (d, d)
        }
        Divergence::Jsd { beta } => {
            let (b, b1) = (R::of(beta), R::of(1.0 - beta));
            let mut dp = R::ZERO;
            let mut dq = R::ZERO;
            for j in 0..v {
                let (pj, qj) = (p(j), q(j));
                let m = b * pj + b1 * qj;
                let lm = if m > R::ZERO { m.ln() } else { R::ZERO };
                if pj > R::ZERO {
                    dp = dp + pj * (lp(j) - lm);
                }
                let gj = if qj > R::ZERO { lq(j) - lm } else { R::ZERO };
                g[j] = b1 * gj;
                dq = dq + qj * gj;
            }
            (b * dp + b1 * dq, b1 * dq)
        }
        Divergence::SkewKl { lambda } => {
            let (l, l1) = (R::of(lambda), R::of(1.0 - lambda));
            let mut d = R::ZERO;
            let mut sqg = R::ZERO;
            for j in 0..v {
                let (pj, qj) = (p(j), q(j));
                let m = l * pj + l1 * qj;
                if pj > R::ZERO {
                    d = d + pj * (lp(j) - m.ln());
                }
                let gj = if m > R::ZERO { -(l1 * pj / m) } else { R::ZERO };
                g[j] = gj;
                sqg = sqg + qj * gj;
            }
            (d, sqg)
        }
        Divergence::SkewReverseKl { lambda } => {
            let (l, l1) = (R::of(lambda), R::of(1.0 - lambda));
            let mut d = R::ZERO;
            let mut sqg = R::ZERO;
            for j in 0..v {
                let (pj, qj) = (p(j), q(j));
                let m = l1 * pj + l * qj;
                let gj = if qj > R::ZERO {
                    let ratio = lq(j) - m.ln();
                    d = d + qj * ratio;
                    ratio + R::ONE - l * qj / m
                } else {
                    R::ZERO
                };
                g[j] = gj;
                sqg = sqg + qj * gj;
            }
            (d, sqg)
        }
        Divergence::Tvd => {
            let half = R::of(0.5);
            let mut d = R::ZERO;
            let mut sqg = R::ZERO;
            for j in 0..v {
                let (pj, qj) = (p(j), q(j));
                let diff = qj - pj;
                d = d + select(diff > R::ZERO, diff, -diff);
                let gj = if diff > R::ZERO {
                    half
                } else if diff < R::ZERO {
                    -half
                } else {
                    R::ZERO
                };
                g[j] = gj;
                sqg = sqg + qj * gj;
            }
            (half * d, sqg)
        }
    };
    let t2 = if params.scale_by_t2 {
        R::of(temperature * temperature)
    } else {
        R::ONE
    };
    let soft = t2 * div;

    // The hard term at T = 1: log softmax(s)[y], and the mean log-prob over finite columns.
    let smoothing = params.label_smoothing;
    let (hard, sum_1, finite) = match class {
        None => (R::ZERO, R::ONE, R::ONE),
        Some(y) => {
            let sum_1 = if unit_t {
                sum_s
            } else {
                exp_into(s, ms, R::ONE, e1)
            };
            let lse_1 = sum_1.ln();
            let nll = lse_1 - (s[y] - ms);
            if smoothing == 0.0 {
                (nll, sum_1, R::ONE)
            } else {
                let count = lane_sum(v, |j| select(s[j].is_finite(), R::ONE, R::ZERO));
                let total = lane_sum(v, |j| select(s[j].is_finite(), s[j] - ms, R::ZERO));
                let mean_log_prob = total / count - lse_1;
                let eps = R::of(smoothing);
                ((R::ONE - eps) * nll - eps * mean_log_prob, sum_1, count)
            }
        }
    };
    let alpha = if class.is_some() { params.alpha } else { 1.0 };
    let loss = if alpha == 1.0 {
        soft
    } else if alpha == 0.0 {
        hard
    } else {
        R::of(alpha) * soft + R::of(1.0 - alpha) * hard
    };
    let out = RowOut { loss, soft, hard };

    // Pass 4: d loss / d s_k = a · ∂soft/∂s_k + b · ∂hard/∂s_k.
    let Some(grad) = grad else { return out };
    let grad = &mut grad[..v];
    let a = R::of(alpha) * t2 * inv_t;
    let b = R::of(1.0 - alpha);
    let eps = R::of(smoothing);
    let inv_1 = R::ONE / sum_1;
    let e1: &[R] = if unit_t { es } else { e1 };
    let soft_grad = |j: usize| -> R {
        let qj = q(j);
        match params.divergence {
            Divergence::ForwardKl => qj - p(j),
            Divergence::ReverseKl => select(qj > R::ZERO, qj * (lq(j) - lp(j) - div), R::ZERO),
            _ => qj * (g[j] - sum_qg),
        }
    };
    let hard_grad = |j: usize| -> R {
        let sj = e1[j] * inv_1;
        select(s[j].is_finite(), sj - eps / finite, sj)
    };
    match (alpha == 0.0, class.is_none() || alpha == 1.0) {
        (false, true) => {
            for (j, gj) in grad.iter_mut().enumerate() {
                *gj = a * soft_grad(j);
            }
        }
        (true, _) => {
            for (j, gj) in grad.iter_mut().enumerate() {
                *gj = b * hard_grad(j);
            }
        }
        (false, false) => {
            for (j, gj) in grad.iter_mut().enumerate() {
                *gj = a * soft_grad(j) + b * hard_grad(j);
            }
        }
    }
    if let Some(y) = class {
        grad[y] = grad[y] - b * (R::ONE - eps);
    }
    out
}
