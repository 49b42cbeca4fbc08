//! The fused sparse-teacher CPU kernel: the student row read in one pass per quantity while it
//! sits in cache, the `k` teacher entries on the side, the gradient written once.
//!
//! Per row with logits `z`, valid teacher entries `K` (index `i_j`, log-probability `ℓ_j`),
//! `r = T_gen / T`, `e_v = exp((z_v − max z)/T)` and `S = Σ_v e_v`:
//!
//! - the divergence runs on `k + 1` *virtual logits* through the dense row kernel at `T = 1`:
//!   student `u_j = log(e_{i_j} / S)`, `u_tail = log(Σ_{v∉K} e_v / S)` (`TailBucket`; the sum
//!   is taken with the top-k zeroed, not by subtraction), or `u_j = (z_{i_j} − max z)/T`
//!   (`Renormalize { TopK }`); teacher `w_j = r·ℓ_j`, `w_tail = r·log(1 − Σ_K e^ℓ)`. The dense
//!   kernel returns `D` and `g = ∂D/∂u`;
//! - back to `z`: `∂u_j/∂z` puts `g_j / T` on `i_j`, and the tail puts `g_tail · e_v / (T·Σ_{v∉K}
//!   e_v)` on every `v ∉ K` (`Σ g = 0` cancels the rest); `Renormalize { FullVocab }` (forward KL
//!   only) is `(e_v / S − p_v [v ∈ K]) / T`;
//! - the hard term and its gradient `softmax(z) − (1 − ε)·onehot − ε/V`, as the dense kernel.
//!
//! Rows without a valid entry have a NaN soft term and no soft gradient; an index outside
//! `[0, V)` or seen twice in a row, a log-probability above 0 or a tail-bucket mass above 1
//! (unchecked input) makes the row NaN, never a read out of bounds or a wrong finite value.

use rayon::prelude::*;

use super::cpu::{self, CpuRows, Isa, RowOut, RowTarget};
use super::real::Real;
use crate::{DistillParams, Reduction, StudentSupport, TailPolicy};

/// The teacher of a batch on the host: `[N, k]` row-major indices, log-probabilities and
/// validity (mask and `ℓ ≠ −∞`).
pub struct HostTeacher<'a> {
    /// Entries per row.
    pub k: usize,
    /// Token indices.
    pub indices: &'a [i64],
    /// Log-probabilities at `T_gen`.
    pub log_probs: &'a [f64],
    /// Whether each entry is present.
    pub valid: &'a [bool],
}

/// Per-thread scratch.
struct Scratch<R> {
    e: Vec<R>,
    e1: Vec<R>,
    u: Vec<R>,
    w: Vec<R>,
    gu: Vec<R>,
    in_k: Vec<bool>,
    saved: Vec<R>,
    full_vocab_p: Vec<f64>,
    entries: Vec<(usize, f64)>,
    small: cpu::SmallRow<R>,
}

/// Row losses (and, with `with_grad`, the gradient of the reduced loss) of `[N, V]` student
/// logits against a sparse teacher.
#[allow(clippy::too_many_arguments)]
pub fn sparse_rows<R: Real>(
    student: &[R],
    v: usize,
    teacher: &HostTeacher<'_>,
    targets: Option<&[i64]>,
    params: &DistillParams,
    tail: TailPolicy,
    generation_temperature: f64,
    with_grad: bool,
) -> CpuRows<R> {
    let teacher_setup = (tail, generation_temperature);
    if with_grad {
        let mut grad = cpu::zeroed_grad::<R>(student.len());
        let (rows, kept) = sparse_rows_into(
            student,
            v,
            teacher,
            targets,
            params,
            teacher_setup,
            Some(&mut grad),
        );
        CpuRows {
            rows,
            kept,
            grad: Some(grad),
        }
    } else {
        let (rows, kept) =
            sparse_rows_into(student, v, teacher, targets, params, teacher_setup, None);
        CpuRows {
            rows,
            kept,
            grad: None,
        }
    }
}

/// [`sparse_rows`] writing the gradient into `grad` (`[N·V]`, every entry overwritten, so a
/// buffer can be reused across calls): the per-row outputs and the number of rows kept.
/// `(tail, generation_temperature)` as the sparse loss's.
pub fn sparse_rows_into<R: Real>(
    student: &[R],
    v: usize,
    teacher: &HostTeacher<'_>,
    targets: Option<&[i64]>,
    params: &DistillParams,
    (tail, generation_temperature): (TailPolicy, f64),
    grad: Option<&mut [R]>,
) -> (Vec<RowOut<R>>, usize) {
    assert!(v > 0 && student.len().is_multiple_of(v), "[N, V] logits");
    let n = student.len() / v;
    let k = teacher.k;
    assert!(
        teacher.indices.len() == n * k
            && teacher.log_probs.len() == n * k
            && teacher.valid.len() == n * k,
        "[N, k] teacher"
    );
    if let Some(targets) = targets {
        assert_eq!(targets.len(), n, "one target per row");
    }
    let target = |i: usize| RowTarget::of(targets.map(|t| t[i]), v, params.ignore_index);
    let kept = (0..n).filter(|&i| target(i) != RowTarget::Ignored).count();
    let grad_scale = params.reduction.factor(kept).unwrap_or(1.0);
    let virtual_params = DistillParams {
        temperature: 1.0,
        alpha: 1.0,
        divergence: params.divergence,
        scale_by_t2: false,
        ignore_index: None,
        label_smoothing: 0.0,
        reduction: Reduction::Sum,
    };
    let ratio = generation_temperature / params.temperature;
    let isa = cpu::selected_isa();
    let init = || Scratch {
        e: vec![R::ZERO; v],
        e1: vec![R::ZERO; v],
        u: Vec::with_capacity(k + 1),
        w: Vec::with_capacity(k + 1),
        gu: vec![R::ZERO; k + 1],
        in_k: vec![false; v],
        saved: Vec::with_capacity(k),
        full_vocab_p: Vec::with_capacity(k),
        entries: Vec::with_capacity(k),
        small: cpu::SmallRow::new(k + 1),
    };
    let run = |scratch: &mut Scratch<R>, i: usize, g: Option<&mut [R]>| {
        let entries = i * k..(i + 1) * k;
        let row = Row {
            z: &student[i * v..(i + 1) * v],
            indices: &teacher.indices[entries.clone()],
            log_probs: &teacher.log_probs[entries.clone()],
            valid: &teacher.valid[entries],
            target: target(i),
        };
        let ctx = Ctx {
            params,
            virtual_params: &virtual_params,
            tail,
            ratio,
            grad_scale,
        };
        row.run(isa, &ctx, scratch, g)
    };
    let rows = match grad {
        Some(grad) => {
            assert_eq!(grad.len(), n * v, "[N, V] gradient");
            grad.par_chunks_mut(v)
                .enumerate()
                .map_init(init, |scratch, (i, g)| run(scratch, i, Some(g)))
                .collect()
        }
        None => (0..n)
            .into_par_iter()
            .map_init(init, |scratch, i| run(scratch, i, None))
            .collect(),
    };
    (rows, kept)
}

/// The settings every row shares.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    params: &'a DistillParams,
    virtual_params: &'a DistillParams,
    tail: TailPolicy,
    ratio: f64,
    grad_scale: f64,
}

struct Row<'a, R> {
    z: &'a [R],
    indices: &'a [i64],
    log_probs: &'a [f64],
    valid: &'a [bool],
    target: RowTarget,
}

impl<R: Real> Row<'_, R> {
    /// The row on the given instruction set (one that `cpu::selected_isa` detected).
    fn run(
        &self,
        isa: Isa,
        ctx: &Ctx<'_>,
        scratch: &mut Scratch<R>,
        grad: Option<&mut [R]>,
    ) -> RowOut<R> {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `selected_isa` only returns instruction sets whose every enabled feature
            // was detected on this CPU.
            Isa::Avx512 => unsafe { self.run_avx512(ctx, scratch, grad) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx2 => unsafe { self.run_avx2(ctx, scratch, grad) },
            _ => self.body(ctx, scratch, grad),
        }
    }

    /// # Safety
    /// The CPU must support every feature enabled here.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma,bmi2")]
    unsafe fn run_avx512(
        &self,
        ctx: &Ctx<'_>,
        scratch: &mut Scratch<R>,
        grad: Option<&mut [R]>,
    ) -> RowOut<R> {
        self.body(ctx, scratch, grad)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(
        &self,
        ctx: &Ctx<'_>,
        scratch: &mut Scratch<R>,
        grad: Option<&mut [R]>,
    ) -> RowOut<R> {
        self.body(ctx, scratch, grad)
    }

    #[inline(always)]
    fn body(&self, ctx: &Ctx<'_>, scratch: &mut Scratch<R>, grad: Option<&mut [R]>) -> RowOut<R> {
        let Ctx {
            params,
            virtual_params,
            tail,
            ratio,
            grad_scale,
        } = *ctx;
        let z = self.z;
        let v = z.len();
        let nan = RowOut {
            loss: R::NAN,
            soft: R::NAN,
            hard: R::NAN,
        };
        let class = match self.target {
            RowTarget::Ignored | RowTarget::Bad => {
                if let Some(g) = grad {
                    g.fill(R::ZERO);
                }
                return if self.target == RowTarget::Bad {
                    nan
                } else {
                    RowOut::default()
                };
            }
            RowTarget::NoLabel => None,
            RowTarget::Class(c) => Some(c),
        };
        // The valid entries; an index out of range (unchecked input) makes the row NaN.
        let mut entries = std::mem::take(&mut scratch.entries);
        entries.clear();
        for ((&index, &lp), &ok) in self.indices.iter().zip(self.log_probs).zip(self.valid) {
            if !ok || lp == f64::NEG_INFINITY {
                continue;
            }
            if index < 0 || index as usize >= v {
                if let Some(g) = grad {
                    g.fill(R::ZERO);
                }
                scratch.entries = entries;
                return nan;
            }
            entries.push((index as usize, lp));
        }
        // An index seen twice in the row, a log-probability above 0 or a tail-bucket mass above
        // 1 (unchecked input, beyond the checks' rounding allowance) makes the row NaN, as on
        // the GPU.
        let in_k = &mut scratch.in_k;
        let mass: f64 = entries.iter().map(|&(_, lp)| lp.exp()).sum();
        let mut duplicate = entries.iter().any(|&(_, lp)| lp > crate::tail::ROUNDING)
            || (tail == TailPolicy::TailBucket && mass > 1.0 + crate::tail::ROUNDING);
        for &(i, _) in entries.iter() {
            duplicate |= std::mem::replace(&mut in_k[i], true);
        }
        for &(i, _) in entries.iter() {
            in_k[i] = false;
        }
        if duplicate {
            if let Some(g) = grad {
                g.fill(R::ZERO);
            }
            scratch.entries = entries;
            return nan;
        }
        let t = params.temperature;
        let inv_t = R::of(t.recip());
        let m = cpu::lane_max(z);
        let e = &mut scratch.e[..v];
        for (e, &x) in e.iter_mut().zip(z) {
            *e = ((x - m) * inv_t).exp();
        }
        let sum_t = cpu::lane_sum(e).to_f64();
        let log_sum_t = sum_t.ln();

        // The hard term (its exponentials: `e` at T = 1, else `e1`).
        let hard = class.map(|y| {
            let sum_1 = if t == 1.0 {
                sum_t
            } else {
                let e1 = &mut scratch.e1[..v];
                if t.fract() == 0.0 && (2.0..=8.0).contains(&t) {
                    // `exp(z − max) = e^T` by multiplication (as the dense kernel).
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
            let mut h = -(1.0 - eps) * (z[y].to_f64() - lse_1);
            // Smoothing averages over the classes (padding, `MASKED_LOGIT`, is not one).
            let mut finite = 0usize;
            if eps > 0.0 {
                let mut total = 0.0;
                for &x in z {
                    if x.is_class() {
                        finite += 1;
                        total += (x - m).to_f64();
                    }
                }
                let mean = total / finite as f64 + m.to_f64() - lse_1;
                h -= eps * mean;
            }
            (h, sum_1, finite)
        });
        // The soft term on the virtual logits.
        let soft_factor = params.soft_factor();
        let (u, w, gu) = (&mut scratch.u, &mut scratch.w, &mut scratch.gu);
        u.clear();
        w.clear();
        let zt = |i: usize| ((z[i] - m) * inv_t).to_f64();
        let mut tail_sum = 0.0;
        let mut rescaled = false;
        let saved = &mut scratch.saved;
        let full_vocab_p = &mut scratch.full_vocab_p;
        full_vocab_p.clear();
        let soft = if entries.is_empty() {
            f64::NAN
        } else {
            match tail {
                TailPolicy::TailBucket => {
                    // Σ_{v∉K} e_v with the top-k zeroed (no cancellation); they stay zeroed
                    // for the gradient pass (`saved` keeps them for the hard term).
                    saved.clear();
                    for &(i, _) in entries.iter() {
                        saved.push(e[i]);
                        e[i] = R::ZERO;
                    }
                    tail_sum = cpu::lane_sum(e).to_f64();
                    let mut tail_shift = 0.0;
                    if tail_sum == 0.0 && entries.len() < v {
                        // Every tail exponential underflowed: rescale by the tail's own max.
                        let in_k = &mut scratch.in_k;
                        for &(i, _) in entries.iter() {
                            in_k[i] = true;
                        }
                        let mut tmax = R::NEG_INFINITY;
                        for (j, &x) in z.iter().enumerate() {
                            if !in_k[j] {
                                tmax = tmax.max(x);
                            }
                        }
                        if tmax.is_finite() {
                            for (j, (e, &x)) in e.iter_mut().zip(z).enumerate() {
                                *e = if in_k[j] {
                                    R::ZERO
                                } else {
                                    ((x - tmax) * inv_t).exp()
                                };
                            }
                            tail_sum = cpu::lane_sum(e).to_f64();
                            tail_shift = ((tmax - m) * inv_t).to_f64();
                            rescaled = true;
                        }
                        for &(i, _) in entries.iter() {
                            in_k[i] = false;
                        }
                    }
                    let mass: f64 = entries
                        .iter()
                        .map(|&(_, lp)| lp.exp())
                        .sum::<f64>()
                        .min(1.0);
                    let no_tail = entries.len() == v;
                    for &(i, lp) in &entries {
                        u.push(R::of(zt(i) - log_sum_t));
                        w.push(R::of(ratio * lp));
                    }
                    u.push(R::of(tail_sum.ln() + tail_shift - log_sum_t));
                    w.push(R::of(if no_tail {
                        f64::NEG_INFINITY
                    } else {
                        ratio * (-mass).ln_1p().max(crate::tail::TAIL_FLOOR.ln())
                    }));
                    self.virtual_soft(u, w, gu, virtual_params, &mut scratch.small)
                }
                TailPolicy::Renormalize {
                    student: StudentSupport::TopK,
                } => {
                    for &(i, lp) in &entries {
                        u.push(R::of(zt(i)));
                        w.push(R::of(ratio * lp));
                    }
                    self.virtual_soft(u, w, gu, virtual_params, &mut scratch.small)
                }
                TailPolicy::Renormalize {
                    student: StudentSupport::FullVocab,
                } => {
                    // Forward KL against log q_j = z_{i_j}/T − log S (not renormalised).
                    let wmax = entries
                        .iter()
                        .map(|&(_, lp)| ratio * lp)
                        .fold(f64::NEG_INFINITY, f64::max);
                    let lse = wmax
                        + entries
                            .iter()
                            .map(|&(_, lp)| (ratio * lp - wmax).exp())
                            .sum::<f64>()
                            .ln();
                    let mut d = 0.0;
                    for &(i, lp) in &entries {
                        let log_p = ratio * lp - lse;
                        let p = log_p.exp();
                        full_vocab_p.push(p);
                        if p > 0.0 {
                            d += p * (log_p - (zt(i) - log_sum_t));
                        }
                    }
                    d
                }
            }
        } * soft_factor;

        let alpha = params.alpha;
        // A term whose weight is exactly 0 is skipped (an infinite term must not give NaN).
        let (loss, hard_value) = match hard {
            Some((h, _, _)) if alpha == 1.0 => (soft, h),
            Some((h, _, _)) if alpha == 0.0 => (h, h),
            Some((h, _, _)) => (alpha * soft + (1.0 - alpha) * h, h),
            None => (soft, 0.0),
        };

        if let Some(g) = grad {
            let a = if class.is_some() { alpha } else { 1.0 } * grad_scale;
            let b = (1.0 - alpha) * grad_scale;
            let soft_on = a != 0.0 && !entries.is_empty();
            // The soft term's share on every column outside the top-k (zero on it).
            let bulk = match tail {
                _ if !soft_on => 0.0,
                TailPolicy::TailBucket if tail_sum > 0.0 => {
                    soft_factor * gu[entries.len()].to_f64() * inv_t.to_f64() / tail_sum
                }
                TailPolicy::Renormalize {
                    student: StudentSupport::FullVocab,
                } => soft_factor * inv_t.to_f64() / sum_t,
                _ => 0.0,
            };
            let bulk = R::of(a * bulk);
            match hard {
                Some((_, sum_1, finite)) if b != 0.0 => {
                    // The hard term's exponentials: `e` itself at T = 1 unless it was zeroed
                    // on the top-k or rescaled (then recomputed, or restored below).
                    let e1: &[R] = if t != 1.0 {
                        &scratch.e1[..v]
                    } else if rescaled {
                        let e1 = &mut scratch.e1[..v];
                        for (e1, &x) in e1.iter_mut().zip(z) {
                            *e1 = (x - m).exp();
                        }
                        e1
                    } else {
                        e
                    };
                    let hb = R::of(b / sum_1);
                    let eps = params.label_smoothing;
                    let hc = R::of(if eps > 0.0 {
                        b * eps / finite as f64
                    } else {
                        0.0
                    });
                    for (((g, &ev), &e1v), &x) in g.iter_mut().zip(e.iter()).zip(e1).zip(z) {
                        let smooth = if x.is_class() { hc } else { R::ZERO };
                        *g = bulk * ev + hb * e1v - smooth;
                    }
                    // The top-k's hard share where `e` (= e1 at T = 1) was zeroed there.
                    if t == 1.0
                        && !rescaled
                        && tail == TailPolicy::TailBucket
                        && !entries.is_empty()
                    {
                        for (&(i, _), &s) in entries.iter().zip(saved.iter()) {
                            g[i] = g[i] + hb * s;
                        }
                    }
                    if let Some(y) = class {
                        g[y] = g[y] - R::of(b * (1.0 - eps));
                    }
                }
                _ => {
                    for (g, &ev) in g.iter_mut().zip(e.iter()) {
                        *g = bulk * ev;
                    }
                }
            }
            if soft_on {
                let scale = a * soft_factor * inv_t.to_f64();
                for (j, &(i, _)) in entries.iter().enumerate() {
                    let delta = match tail {
                        TailPolicy::Renormalize {
                            student: StudentSupport::FullVocab,
                        } => -scale * full_vocab_p[j],
                        _ => scale * gu[j].to_f64(),
                    };
                    g[i] = g[i] + R::of(delta);
                }
            }
        }
        scratch.entries = entries;
        RowOut {
            loss: R::of(loss),
            soft: R::of(soft),
            hard: R::of(hard_value),
        }
    }

    /// `D` of the virtual rows through the dense row kernel, `∂D/∂u` into `gu`.
    fn virtual_soft(
        &self,
        u: &[R],
        w: &[R],
        gu: &mut [R],
        params: &DistillParams,
        small: &mut cpu::SmallRow<R>,
    ) -> f64 {
        let gu = &mut gu[..u.len()];
        small.run(u, w, params, gu).soft.to_f64()
    }
}
