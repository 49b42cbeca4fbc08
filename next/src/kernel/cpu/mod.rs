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
pub(super) use super::simd::{IsaKernel, lane_max, lane_sum, on_isa, selected_isa};
use crate::DistillParams;

mod row;
use row::{RowCall, RowInputs};

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
    rows_with(student.len(), with_grad, |grad| {
        distill_rows_into(student, teacher, v, targets, params, grad)
    })
}

/// `rows(grad)` with a fresh zeroed gradient buffer of `len` elements when `with_grad`.
pub fn rows_with<R: Real>(
    len: usize,
    with_grad: bool,
    rows: impl FnOnce(Option<&mut [R]>) -> (Vec<RowOut<R>>, usize),
) -> CpuRows<R> {
    let mut grad = with_grad.then(|| zeroed_grad::<R>(len));
    let (rows, kept) = rows(grad.as_deref_mut());
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
    let inputs = |i: usize| RowInputs {
        s: &student[i * v..(i + 1) * v],
        t: &teacher[i * v..(i + 1) * v],
        target: target(i),
        params,
        grad_scale,
    };
    let run = |scratch: &mut Scratch<R>, i: usize, grad: Option<&mut [R]>| {
        let inputs = inputs(i);
        on_isa(
            isa,
            RowCall {
                inputs,
                scratch,
                grad,
            },
        )
    };
    let rows = match grad {
        Some(grad) => {
            assert_eq!(grad.len(), n * v, "[N, V] gradient");
            grad.par_chunks_mut(v)
                .enumerate()
                .map_init(
                    || Scratch::new(v),
                    |scratch, (i, g)| run(scratch, i, Some(g)),
                )
                .collect()
        }
        None => (0..n)
            .into_par_iter()
            .map_init(|| Scratch::new(v), |scratch, i| run(scratch, i, None))
            .collect(),
    };
    (rows, kept)
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
        let inputs = RowInputs {
            target: RowTarget::NoLabel,
            grad_scale: 1.0,
            s,
            t,
            params,
        };
        let scratch = &mut self.0;
        RowCall {
            inputs,
            scratch,
            grad: Some(grad),
        }
        .run()
    }
}
