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

use super::cpu::{self, IsaKernel, RowOut, RowTarget};
use super::real::Real;
use crate::{DistillParams, Reduction, TailPolicy};

mod row;
use row::{Student, Terms};

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

/// Row losses of `[N, V]` student logits against a sparse teacher, writing the gradient of the
/// reduced loss into `grad` (`[N·V]`, every entry overwritten, so a buffer can be reused across
/// calls): the per-row outputs and the number of rows kept. `(tail, generation_temperature)`
/// as the sparse loss's.
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
        let call = RowCall {
            row: &row,
            ctx: &ctx,
            scratch,
            grad: g,
        };
        cpu::on_isa(isa, call)
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

/// One call of a sparse row, run on an instruction set by [`on_isa`].
struct RowCall<'a, 'b, R> {
    row: &'a Row<'b, R>,
    ctx: &'a Ctx<'a>,
    scratch: &'a mut Scratch<R>,
    grad: Option<&'a mut [R]>,
}

impl<R: Real> IsaKernel for RowCall<'_, '_, R> {
    type Out = RowOut<R>;

    #[inline(always)]
    fn run(self) -> RowOut<R> {
        self.row.body(self.ctx, self.scratch, self.grad)
    }
}

impl<R: Real> Row<'_, R> {
    #[inline(always)]
    fn body(&self, ctx: &Ctx<'_>, scratch: &mut Scratch<R>, grad: Option<&mut [R]>) -> RowOut<R> {
        let class = match self.target {
            RowTarget::Ignored | RowTarget::Bad => {
                if let Some(g) = grad {
                    g.fill(R::ZERO);
                }
                return if self.target == RowTarget::Bad {
                    nan_row()
                } else {
                    RowOut::default()
                };
            }
            RowTarget::NoLabel => None,
            RowTarget::Class(c) => Some(c),
        };
        let mut entries = std::mem::take(&mut scratch.entries);
        let out = if self.checked_entries(ctx.tail, &mut entries, &mut scratch.in_k) {
            self.valid_row(ctx, class, &entries, scratch, grad)
        } else {
            if let Some(g) = grad {
                g.fill(R::ZERO);
            }
            nan_row()
        };
        scratch.entries = entries;
        out
    }

    /// Phase 1, the entries and their checks: the valid entries `(index, ℓ)` into `entries`;
    /// false (the row is NaN) for an index out of range or seen twice, a log-probability above
    /// 0 or a tail-bucket mass above 1 (unchecked input, beyond the checks' rounding allowance),
    /// as on the GPU.
    #[inline(always)]
    fn checked_entries(
        &self,
        tail: TailPolicy,
        entries: &mut Vec<(usize, f64)>,
        in_k: &mut [bool],
    ) -> bool {
        let v = self.z.len();
        entries.clear();
        for ((&index, &lp), &ok) in self.indices.iter().zip(self.log_probs).zip(self.valid) {
            if !ok || lp == f64::NEG_INFINITY {
                continue;
            }
            if index < 0 || index as usize >= v {
                return false;
            }
            entries.push((index as usize, lp));
        }
        let mass: f64 = entries.iter().map(|&(_, lp)| lp.exp()).sum();
        let mut bad = entries.iter().any(|&(_, lp)| lp > crate::tail::ROUNDING)
            || (tail == TailPolicy::TailBucket && mass > 1.0 + crate::tail::ROUNDING);
        for &(i, _) in entries.iter() {
            bad |= std::mem::replace(&mut in_k[i], true);
        }
        for &(i, _) in entries.iter() {
            in_k[i] = false;
        }
        !bad
    }

    /// A row whose entries passed the checks: the phases after the first.
    #[inline(always)]
    fn valid_row(
        &self,
        ctx: &Ctx<'_>,
        class: Option<usize>,
        entries: &[(usize, f64)],
        scratch: &mut Scratch<R>,
        grad: Option<&mut [R]>,
    ) -> RowOut<R> {
        let params = ctx.params;
        let student = Student::of(self.z, params.temperature, &mut scratch.e);
        // Before the soft term, which zeroes the top-k of `e` for the tail bucket.
        let hard = class.map(|y| self.hard_term(y, params, &student, scratch));
        let soft = self.soft_term(ctx, entries, &student, scratch);
        let alpha = params.alpha;
        // A term whose weight is exactly 0 is skipped (an infinite term must not give NaN).
        let (loss, hard_value) = match hard {
            Some(h) if alpha == 1.0 => (soft.value, h.value),
            Some(h) if alpha == 0.0 => (h.value, h.value),
            Some(h) => (alpha * soft.value + (1.0 - alpha) * h.value, h.value),
            None => (soft.value, 0.0),
        };
        if let Some(g) = grad {
            let terms = Terms {
                class,
                hard,
                soft: &soft,
                entries,
                student: &student,
            };
            self.gradient(ctx, &terms, scratch, g);
        }
        RowOut {
            loss: R::of(loss),
            soft: R::of(soft.value),
            hard: R::of(hard_value),
        }
    }
}

/// The outputs of a NaN row (bad input).
fn nan_row<R: Real>() -> RowOut<R> {
    RowOut {
        loss: R::NAN,
        soft: R::NAN,
        hard: R::NAN,
    }
}
