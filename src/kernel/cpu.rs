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
use crate::{DistillParams, Divergence, Reduction};

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
    /// Number of rows that are not ignored.
    pub kept: usize,
    /// `[N·V]` gradient of the reduced loss with respect to the student logits, if asked
    /// (for `Reduction::None`, row `i` holds the gradient of row loss `i`).
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

/// Row losses (and optionally the gradient of the reduced loss) of `[N, V]` row-major logits.
pub fn distill_rows<R: Real>(
    student: &[R],
    teacher: &[R],
    v: usize,
    targets: Option<&[i64]>,
    params: &DistillParams,
    reduction: Reduction,
    with_grad: bool,
) -> CpuRows<R> {
    assert_eq!(student.len(), teacher.len());
    assert!(v > 0 && student.len() % v == 0);
    let n = student.len() / v;
    let target = |i: usize| RowTarget::of(targets.map(|t| t[i]), v, params.ignore_index);
    let kept = (0..n).filter(|&i| target(i) != RowTarget::Ignored).count();
    let grad_scale = match reduction {
        Reduction::Mean => 1.0 / kept.max(1) as f64,
        Reduction::Sum | Reduction::None => 1.0,
    };
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
                    row(s, t, target(i), params, grad_scale, scratch, Some(g))
                },
            )
            .collect();
        CpuRows {
            rows,
            kept,
            grad: Some(grad),
        }
    } else {
        let rows = (0..n)
            .into_par_iter()
            .map_init(
                || Scratch::new(v),
                |scratch, i| {
                    let (s, t) = inputs(i);
                    row(s, t, target(i), params, grad_scale, scratch, None)
                },
            )
            .collect();
        CpuRows {
            rows,
            kept,
            grad: None,
        }
    }
}

/// One row, on the widest instruction set this CPU has.
fn row<R: Real>(
    s: &[R],
    t: &[R],
    target: RowTarget,
    params: &DistillParams,
    grad_scale: f64,
    scratch: &mut Scratch<R>,
    grad: Option<&mut [R]>,
) -> RowOut<R> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return unsafe { row_avx512(s, t, target, params, grad_scale, scratch, grad) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { row_avx2(s, t, target, params, grad_scale, scratch, grad) };
        }
    }
    row_body(s, t, target, params, grad_scale, scratch, grad)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma,bmi2")]
fn row_avx512<R: Real>(
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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn row_avx2<R: Real>(
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

/// One pass over a row with `LANES` independent lanes: `f` maps the `K` inputs at a column to
/// `M` outputs (written) and `S` summands (accumulated per lane, so that the sums vectorize).
/// All slices have the row's length.
#[inline(always)]
fn lanes<R: Real, const K: usize, const M: usize, const S: usize>(
    ins: [&[R]; K],
    mut outs: [&mut [R]; M],
    mut f: impl FnMut([R; K]) -> ([R; M], [R; S]),
) -> [R; S] {
    let v = outs.first().map_or_else(|| ins[0].len(), |o| o.len());
    let full = v / LANES;
    let mut acc = [[R::ZERO; LANES]; S];
    for c in 0..full {
        let range = c * LANES..(c + 1) * LANES;
        let chunk: [&[R; LANES]; K] =
            core::array::from_fn(|k| ins[k][range.clone()].try_into().unwrap());
        let out: [&mut [R; LANES]; M] = outs
            .each_mut()
            .map(|o| (&mut o[range.clone()]).try_into().unwrap());
        for l in 0..LANES {
            let (o, x) = f(core::array::from_fn(|k| chunk[k][l]));
            for m in 0..M {
                out[m][l] = o[m];
            }
            for q in 0..S {
                acc[q][l] = acc[q][l] + x[q];
            }
        }
    }
    let mut tail = [R::ZERO; S];
    for j in full * LANES..v {
        let (o, x) = f(core::array::from_fn(|k| ins[k][j]));
        for m in 0..M {
            outs[m][j] = o[m];
        }
        for q in 0..S {
            tail[q] = tail[q] + x[q];
        }
    }
    core::array::from_fn(|q| acc[q].iter().fold(tail[q], |a, b| a + *b))
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

#[inline(always)]
fn select<R: Real>(cond: bool, a: R, b: R) -> R {
    if cond { a } else { b }
}

/// `x^k` by repeated multiplication (`k ≥ 1`).
#[inline(always)]
fn powi<R: Real>(x: R, k: u32) -> R {
    let mut y = x;
    for _ in 1..k {
        y = y * x;
    }
    y
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
    let (es, et, e1, g) = (
        &mut scratch.es[..v],
        &mut scratch.et[..v],
        &mut scratch.e1[..v],
        &mut scratch.g[..v],
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
    let [sum_s, sum_t, sum_1] = match unit {
        Unit::Power(k) => lanes([s, t], [es, et], |[x, y]| {
            let (a, b) = (((x - ms) * inv_t).exp(), ((y - mt) * inv_t).exp());
            ([a, b], [a, b, powi(a, k)])
        }),
        _ => {
            let [a, b] = lanes([s, t], [es, et], |[x, y]| {
                let (a, b) = (((x - ms) * inv_t).exp(), ((y - mt) * inv_t).exp());
                ([a, b], [a, b])
            });
            let one = match unit {
                Unit::Exp => lanes([s], [&mut *e1], |[x]| {
                    let e = (x - ms).exp();
                    ([e], [e])
                })[0],
                _ => a,
            };
            [a, b, one]
        }
    };
    let (es, et) = (&*es, &*et);
    let (lse_s, lse_t) = (sum_s.ln(), sum_t.ln());
    let (inv_ss, inv_st) = (R::ONE / sum_s, R::ONE / sum_t);
    // log q_j = (s_j − m_s)/T − lse_s = s_j/T − c_s, likewise for p.
    let (cs, ct) = (ms * inv_t + lse_s, mt * inv_t + lse_t);

    // Pass 3: the divergence D, and Σ_j q_j g_j for the gradient (g_j = ∂D/∂q_j, in scratch).
    let (div, sum_qg) = match params.divergence {
        Divergence::ForwardKl => {
            let [d] = lanes([s, t, et], [], |[x, y, b]| {
                let p = b * inv_st;
                (
                    [],
                    [select(
                        p > R::ZERO,
                        p * ((y - x) * inv_t - ct + cs),
                        R::ZERO,
                    )],
                )
            });
            (d, R::ZERO)
        }
        Divergence::ReverseKl => {
            let [d] = lanes([s, t, es], [], |[x, y, a]| {
                let q = a * inv_ss;
                (
                    [],
                    [select(
                        q > R::ZERO,
                        q * ((x - y) * inv_t - cs + ct),
                        R::ZERO,
                    )],
                )
            });
            (d, d)
        }
        Divergence::Jsd { beta } => {
            let (b, b1) = (R::of(beta), R::of(1.0 - beta));
            let [dp, dq] = lanes([s, t, es, et], [&mut *g], |[x, y, ea, eb]| {
                let (q, p) = (ea * inv_ss, eb * inv_st);
                let m = b * p + b1 * q;
                let lm = select(m > R::ZERO, m, R::ONE).ln();
                let dp = select(p > R::ZERO, p * (y * inv_t - ct - lm), R::ZERO);
                let gq = select(q > R::ZERO, x * inv_t - cs - lm, R::ZERO);
                ([b1 * gq], [dp, q * gq])
            });
            (b * dp + b1 * dq, b1 * dq)
        }
        Divergence::SkewKl { lambda } => {
            let (l, l1) = (R::of(lambda), R::of(1.0 - lambda));
            let [d, sqg] = lanes([t, es, et], [&mut *g], |[y, ea, eb]| {
                let (q, p) = (ea * inv_ss, eb * inv_st);
                let m = l * p + l1 * q;
                let safe_m = select(m > R::ZERO, m, R::ONE);
                let d = select(p > R::ZERO, p * (y * inv_t - ct - safe_m.ln()), R::ZERO);
                let gq = select(m > R::ZERO, -(l1 * p / safe_m), R::ZERO);
                ([gq], [d, q * gq])
            });
            (d, sqg)
        }
        Divergence::SkewReverseKl { lambda } => {
            let (l, l1) = (R::of(lambda), R::of(1.0 - lambda));
            let [d, sqg] = lanes([s, es, et], [&mut *g], |[x, ea, eb]| {
                let (q, p) = (ea * inv_ss, eb * inv_st);
                let m = select(q > R::ZERO, l1 * p + l * q, R::ONE);
                let ratio = select(q > R::ZERO, x * inv_t - cs - m.ln(), R::ZERO);
                let gq = select(q > R::ZERO, ratio + R::ONE - l * q / m, R::ZERO);
                ([gq], [q * ratio, q * gq])
            });
            (d, sqg)
        }
        Divergence::Tvd => {
            let half = R::of(0.5);
            let [d, sqg] = lanes([es, et], [&mut *g], |[ea, eb]| {
                let diff = ea * inv_ss - eb * inv_st;
                let gq = select(diff > R::ZERO, half, select(diff < R::ZERO, -half, R::ZERO));
                (
                    [gq],
                    [select(diff > R::ZERO, diff, -diff), ea * inv_ss * gq],
                )
            });
            (half * d, sqg)
        }
    };
    let g = &*g;
    let t2 = if params.scale_by_t2 {
        R::of(temperature * temperature)
    } else {
        R::ONE
    };
    let soft = t2 * div;

    // The hard term at T = 1: log softmax(s)[y], and the mean log-prob over finite columns.
    let smoothing = params.label_smoothing;
    let lse_1 = sum_1.ln();
    let (hard, finite) = match class {
        None => (R::ZERO, R::ONE),
        Some(y) => {
            let nll = lse_1 - (s[y] - ms);
            if smoothing == 0.0 {
                (nll, R::ONE)
            } else {
                let [count, total] = lanes([s], [], |[x]| {
                    let f = x.is_finite();
                    ([], [select(f, R::ONE, R::ZERO), select(f, x - ms, R::ZERO)])
                });
                let eps = R::of(smoothing);
                let mean_log_prob = total / count - lse_1;
                ((R::ONE - eps) * nll - eps * mean_log_prob, count)
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

    // Pass 4: d loss / d s_j = a · ∂soft/∂s_j + b · ∂hard/∂s_j, scaled by the reduction.
    let Some(grad) = grad else { return out };
    let grad = &mut grad[..v];
    let a = R::of(alpha * grad_scale) * t2 * inv_t;
    let b = R::of((1.0 - alpha) * grad_scale);
    let inv_1 = R::ONE / sum_1;
    let eps_f = R::of(smoothing) / finite;
    let hard_grad = |x: R, e: R| {
        let s1 = e * inv_1;
        select(x.is_finite(), s1 - eps_f, s1)
    };
    let with_hard = alpha != 1.0;
    // The soft gradient of column j, from q_j, p_j, the log-ratio inputs and g_j.
    match (params.divergence, unit, with_hard) {
        (Divergence::ForwardKl, _, false) => {
            lanes([es, et], [grad], |[ea, eb]| {
                ([a * (ea * inv_ss - eb * inv_st)], [])
            });
        }
        (Divergence::ForwardKl, Unit::Same, true) => {
            lanes([s, es, et], [grad], |[x, ea, eb]| {
                let q = ea * inv_ss;
                ([a * (q - eb * inv_st) + b * hard_grad(x, ea)], [])
            });
        }
        (Divergence::ForwardKl, Unit::Power(k), true) => {
            lanes([s, es, et], [grad], |[x, ea, eb]| {
                let q = ea * inv_ss;
                ([a * (q - eb * inv_st) + b * hard_grad(x, powi(ea, k))], [])
            });
        }
        (Divergence::ReverseKl, _, _) => {
            let e1: &[R] = if matches!(unit, Unit::Exp) { e1 } else { es };
            lanes([s, t, es, e1], [grad], |[x, y, ea, e]| {
                let q = ea * inv_ss;
                let soft = select(q > R::ZERO, q * ((x - y) * inv_t - cs + ct - div), R::ZERO);
                let hard = if with_hard {
                    hard_grad(x, unit_exp(unit, ea, e))
                } else {
                    R::ZERO
                };
                ([a * soft + b * hard], [])
            });
        }
        _ => {
            let e1: &[R] = if matches!(unit, Unit::Exp) { e1 } else { es };
            lanes([s, es, et, g, e1], [grad], |[x, ea, eb, gj, e]| {
                let soft = match params.divergence {
                    Divergence::ForwardKl => ea * inv_ss - eb * inv_st,
                    _ => ea * inv_ss * (gj - sum_qg),
                };
                let hard = if with_hard {
                    hard_grad(x, unit_exp(unit, ea, e))
                } else {
                    R::ZERO
                };
                ([a * soft + b * hard], [])
            });
        }
    }
    if let Some(y) = class {
        grad[y] = grad[y] - b * (R::ONE - R::of(smoothing));
    }
    out
}

/// `exp(s_j − max s)` from `e_s` (and the scratch row of `Unit::Exp`).
#[inline(always)]
fn unit_exp<R: Real>(unit: Unit, es: R, e1: R) -> R {
    match unit {
        Unit::Same => es,
        Unit::Power(k) => powi(es, k),
        Unit::Exp => e1,
    }
}
