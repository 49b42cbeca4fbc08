//! Phases 2–4 of a sparse row (see the parent module): the hard term, the soft term on the
//! virtual logits, the gradient.

use super::super::cpu;
use super::super::real::Real;
use super::{Ctx, Row, Scratch};
use crate::{DistillParams, StudentSupport, TailPolicy};

impl<R: Real> Row<'_, R> {
    /// Phase 2, the hard term at T = 1: `−(1 − ε)·log softmax(z)[y]`, minus `ε` times the mean
    /// log-probability over the classes (padding, `MASKED_LOGIT`, is not one). Its exponentials
    /// are `e` at T = 1, else `e1` (by multiplication for a small integer T, as the dense
    /// kernel).
    #[inline(always)]
    pub(super) fn hard_term(
        &self,
        y: usize,
        params: &DistillParams,
        student: &Student<R>,
        scratch: &mut Scratch<R>,
    ) -> Hard {
        let (z, m, t) = (self.z, student.m, params.temperature);
        let v = z.len();
        let sum_1 = if t == 1.0 {
            student.sum_t
        } else {
            let (e, e1) = (&scratch.e[..v], &mut scratch.e1[..v]);
            if t.fract() == 0.0 && (2.0..=8.0).contains(&t) {
                let power = t as u32;
                for (e1, &ev) in e1.iter_mut().zip(e.iter()) {
                    let mut y = ev;
                    for _ in 1..power {
                        y = y * ev;
                    }
                    *e1 = y;
                }
            } else {
                for (e1, &x) in e1.iter_mut().zip(z) {
                    *e1 = (x - m).exp();
                }
            }
            cpu::lane_sum(e1).to_f64()
        };
        let lse_1 = m.to_f64() + sum_1.ln();
        let eps = params.label_smoothing;
        let mut value = -(1.0 - eps) * (z[y].to_f64() - lse_1);
        let mut finite = 0usize;
        if eps > 0.0 {
            let mut total = 0.0;
            for &x in z {
                if x.is_class() {
                    finite += 1;
                    total += (x - m).to_f64();
                }
            }
            value -= eps * (total / finite as f64 + m.to_f64() - lse_1);
        }
        Hard {
            value,
            sum_1,
            finite,
        }
    }

    /// Phase 3, the soft term (`T²`-scaled) on the virtual logits of the tail policy; NaN
    /// without a valid entry.
    #[inline(always)]
    pub(super) fn soft_term(
        &self,
        ctx: &Ctx<'_>,
        entries: &[(usize, f64)],
        student: &Student<R>,
        scratch: &mut Scratch<R>,
    ) -> Soft {
        scratch.u.clear();
        scratch.w.clear();
        scratch.full_vocab_p.clear();
        let mut soft = Soft {
            value: f64::NAN,
            tail_sum: 0.0,
            rescaled: false,
        };
        if entries.is_empty() {
            return soft;
        }
        let zt = |i: usize| student.scaled(self.z[i]);
        let log_sum_t = student.sum_t.ln();
        soft.value = match ctx.tail {
            TailPolicy::TailBucket => {
                let (tail_sum, tail_shift, rescaled) = self.tail_sums(entries, student, scratch);
                soft.tail_sum = tail_sum;
                soft.rescaled = rescaled;
                let mass: f64 = entries
                    .iter()
                    .map(|&(_, lp)| lp.exp())
                    .sum::<f64>()
                    .min(1.0);
                let (u, w) = (&mut scratch.u, &mut scratch.w);
                for &(i, lp) in entries {
                    u.push(R::of(zt(i) - log_sum_t));
                    w.push(R::of(ctx.ratio * lp));
                }
                u.push(R::of(tail_sum.ln() + tail_shift - log_sum_t));
                w.push(R::of(if entries.len() == self.z.len() {
                    f64::NEG_INFINITY
                } else {
                    ctx.ratio * (-mass).ln_1p().max(crate::tail::TAIL_FLOOR.ln())
                }));
                scratch.virtual_soft(ctx.virtual_params)
            }
            TailPolicy::Renormalize {
                student: StudentSupport::TopK,
            } => {
                let (u, w) = (&mut scratch.u, &mut scratch.w);
                for &(i, lp) in entries {
                    u.push(R::of(zt(i)));
                    w.push(R::of(ctx.ratio * lp));
                }
                scratch.virtual_soft(ctx.virtual_params)
            }
            TailPolicy::Renormalize {
                student: StudentSupport::FullVocab,
            } => {
                // Forward KL against log q_j = z_{i_j}/T − log S (not renormalised).
                let w_of = |lp: f64| ctx.ratio * lp;
                let wmax = entries
                    .iter()
                    .map(|&(_, lp)| w_of(lp))
                    .fold(f64::NEG_INFINITY, f64::max);
                let lse = wmax
                    + entries
                        .iter()
                        .map(|&(_, lp)| (w_of(lp) - wmax).exp())
                        .sum::<f64>()
                        .ln();
                let mut d = 0.0;
                for &(i, lp) in entries {
                    let log_p = w_of(lp) - lse;
                    let p = log_p.exp();
                    scratch.full_vocab_p.push(p);
                    if p > 0.0 {
                        d += p * (log_p - (zt(i) - log_sum_t));
                    }
                }
                d
            }
        } * ctx.params.soft_factor();
        soft
    }

    /// The tail bucket's `Σ_{v∉K} e_v`, with the top-k zeroed in `e` (no cancellation; they
    /// stay zeroed for the gradient, `saved` keeps them for the hard term). Where every tail
    /// exponential underflowed, `e` is rescaled by the tail's own maximum: then the shift of
    /// its log and `true`.
    #[inline(always)]
    fn tail_sums(
        &self,
        entries: &[(usize, f64)],
        student: &Student<R>,
        scratch: &mut Scratch<R>,
    ) -> (f64, f64, bool) {
        let (z, v) = (self.z, self.z.len());
        let e = &mut scratch.e[..v];
        scratch.saved.clear();
        for &(i, _) in entries {
            scratch.saved.push(e[i]);
            e[i] = R::ZERO;
        }
        let tail_sum = cpu::lane_sum(e).to_f64();
        if tail_sum != 0.0 || entries.len() == v {
            return (tail_sum, 0.0, false);
        }
        let in_k = &mut scratch.in_k;
        for &(i, _) in entries {
            in_k[i] = true;
        }
        let mut tmax = R::NEG_INFINITY;
        for (j, &x) in z.iter().enumerate() {
            if !in_k[j] {
                tmax = tmax.max(x);
            }
        }
        let mut out = (tail_sum, 0.0, false);
        if tmax.is_finite() {
            for (j, (e, &x)) in e.iter_mut().zip(z).enumerate() {
                *e = if in_k[j] {
                    R::ZERO
                } else {
                    ((x - tmax) * student.inv_t).exp()
                };
            }
            let shift = ((tmax - student.m) * student.inv_t).to_f64();
            out = (cpu::lane_sum(e).to_f64(), shift, true);
        }
        for &(i, _) in entries {
            in_k[i] = false;
        }
        out
    }

    /// Phase 4, the gradient of the reduced loss: the soft term's share on every column
    /// outside the top-k (`bulk`), the hard term's `softmax(z) − ε/F − (1 − ε)·onehot`, and the
    /// soft term's `g_j` on the top-k.
    #[inline(always)]
    pub(super) fn gradient(
        &self,
        ctx: &Ctx<'_>,
        terms: &Terms<'_, R>,
        scratch: &mut Scratch<R>,
        g: &mut [R],
    ) {
        let (entries, student) = (terms.entries, terms.student);
        let (params, tail, z) = (ctx.params, ctx.tail, self.z);
        let v = z.len();
        let (t, soft_factor) = (params.temperature, params.soft_factor());
        let inv_t = student.inv_t.to_f64();
        let alpha = params.alpha;
        let a = if terms.class.is_some() { alpha } else { 1.0 } * ctx.grad_scale;
        let b = (1.0 - alpha) * ctx.grad_scale;
        let soft_on = a != 0.0 && !entries.is_empty();
        let tail_sum = terms.soft.tail_sum;
        let rescaled = terms.soft.rescaled;
        let bulk = match tail {
            _ if !soft_on => 0.0,
            TailPolicy::TailBucket if tail_sum > 0.0 => {
                soft_factor * scratch.gu[entries.len()].to_f64() * inv_t / tail_sum
            }
            TailPolicy::Renormalize {
                student: StudentSupport::FullVocab,
            } => soft_factor * inv_t / student.sum_t,
            _ => 0.0,
        };
        let bulk = R::of(a * bulk);
        match terms.hard {
            Some(hard) if b != 0.0 => {
                // The hard term's exponentials: `e` itself at T = 1 unless it was zeroed on the
                // top-k or rescaled (then recomputed, or restored below).
                if t == 1.0 && rescaled {
                    for (e1, &x) in scratch.e1[..v].iter_mut().zip(z) {
                        *e1 = (x - student.m).exp();
                    }
                }
                let e = &scratch.e[..v];
                let e1: &[R] = if t != 1.0 || rescaled {
                    &scratch.e1[..v]
                } else {
                    e
                };
                let hb = R::of(b / hard.sum_1);
                let eps = params.label_smoothing;
                let hc = R::of(if eps > 0.0 {
                    b * eps / hard.finite as f64
                } else {
                    0.0
                });
                for (((g, &ev), &e1v), &x) in g.iter_mut().zip(e.iter()).zip(e1).zip(z) {
                    let smooth = if x.is_class() { hc } else { R::ZERO };
                    *g = bulk * ev + hb * e1v - smooth;
                }
                // The top-k's hard share where `e` (= e1 at T = 1) was zeroed there.
                if t == 1.0 && !rescaled && tail == TailPolicy::TailBucket && !entries.is_empty() {
                    for (&(i, _), &s) in entries.iter().zip(scratch.saved.iter()) {
                        g[i] = g[i] + hb * s;
                    }
                }
                if let Some(y) = terms.class {
                    g[y] = g[y] - R::of(b * (1.0 - eps));
                }
            }
            _ => {
                for (g, &ev) in g.iter_mut().zip(scratch.e[..v].iter()) {
                    *g = bulk * ev;
                }
            }
        }
        if soft_on {
            let scale = a * soft_factor * inv_t;
            for (j, &(i, _)) in entries.iter().enumerate() {
                let delta = match tail {
                    TailPolicy::Renormalize {
                        student: StudentSupport::FullVocab,
                    } => -scale * scratch.full_vocab_p[j],
                    _ => scale * scratch.gu[j].to_f64(),
                };
                g[i] = g[i] + R::of(delta);
            }
        }
    }
}

/// The student row's tempered exponentials (in scratch `e`): its maximum, `1/T` and
/// `S = Σ_v e^{(z_v − m)/T}`.
#[derive(Clone, Copy)]
pub(super) struct Student<R> {
    m: R,
    inv_t: R,
    sum_t: f64,
}

impl<R: Real> Student<R> {
    #[inline(always)]
    pub(super) fn of(z: &[R], temperature: f64, e: &mut [R]) -> Self {
        let inv_t = R::of(temperature.recip());
        let m = cpu::lane_max(z);
        let e = &mut e[..z.len()];
        for (e, &x) in e.iter_mut().zip(z) {
            *e = ((x - m) * inv_t).exp();
        }
        Self {
            m,
            inv_t,
            sum_t: cpu::lane_sum(e).to_f64(),
        }
    }

    /// `(z − m)/T` in f64.
    #[inline(always)]
    fn scaled(&self, z: R) -> f64 {
        ((z - self.m) * self.inv_t).to_f64()
    }
}

/// A row's hard term, `Σ e^{z−m}` and the number of classes `F` (0 without smoothing).
#[derive(Clone, Copy)]
pub(super) struct Hard {
    pub(super) value: f64,
    sum_1: f64,
    finite: usize,
}

/// A row's soft term (`T²`-scaled), and for the tail bucket the tail's sum and whether `e`
/// was rescaled by the tail's maximum.
pub(super) struct Soft {
    pub(super) value: f64,
    tail_sum: f64,
    rescaled: bool,
}

/// What the gradient needs of the terms.
pub(super) struct Terms<'a, R> {
    pub(super) class: Option<usize>,
    pub(super) hard: Option<Hard>,
    pub(super) soft: &'a Soft,
    /// The row's valid entries (column, teacher log-probability).
    pub(super) entries: &'a [(usize, f64)],
    pub(super) student: &'a Student<R>,
}

impl<R: Real> Scratch<R> {
    /// `D` of the virtual rows `u`, `w` through the dense row kernel, `∂D/∂u` into `gu`.
    #[inline(always)]
    fn virtual_soft(&mut self, params: &DistillParams) -> f64 {
        let gu = &mut self.gu[..self.u.len()];
        self.small.run(&self.u, &self.w, params, gu).soft.to_f64()
    }
}
