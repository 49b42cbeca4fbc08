//! The fused CubeCL kernel (wgpu, CUDA): f32 accumulation whatever the logits' dtype. The launch
//! and the backend glue live in `crate::backend::cube`.
//!
//! Per row, the units of the row stride over the vocabulary, loading `N` logits at a time (one
//! vector: 16 bytes where the device and V allow it): one online-softmax pass gives the maxima
//! and the sums of the tempered exponentials (and of the temperature-1 ones, and the
//! finite-column count for label smoothing) and, for forward KL, the divergence in closed form;
//! the other divergences take a second pass for the divergence and `Σ q·∂D/∂q`; a last pass, if
//! asked, writes the gradient of the reduced loss. Forward KL thus reads each row twice with the
//! gradient (once without) and writes the gradient once. A cube holds one row of 256 units, or
//! when V is small several rows of fewer units (so that few units idle). Reductions across a
//! row go through shared memory (a tree), which every device has; no plane (subgroup)
//! operations are required. `−inf` logits (vocabulary padding) contribute nothing; no `−inf`
//! literal is needed (WGSL has none): the running maxima start at `−3.0e38`.

use cubecl::prelude::*;

pub(crate) use super::cube_row::{DivKind, RowOutLaunch, RowParamsLaunch, RowSpec};
use super::cube_row::{
    GradWeights, Online, RowOut, RowParams, RowStats, column_grad, column_term, finish_row,
    logit_grad, row_max, row_sum, row_target, soft_logit_grad, zero_vector,
};

/// Units per cube: one row of up to `BLOCK` units, or several rows of fewer when V is small.
pub(crate) const BLOCK: u32 = 256;

/// Row losses, soft and hard terms (in f32 whatever the logits' dtype), and optionally the
/// gradient (in `G`: the logits' dtype, or f32 for f16 logits, so that entries below f16's
/// range survive until the upstream gradient, e.g. a loss scale, is applied). `scale` is the
/// f32 factor of the reduction.
///
/// A cube holds `CUBE_DIM_Y` rows of `CUBE_DIM_X` units each (several rows per cube when V is
/// small); its rows start at `CUBE_POS · CUBE_DIM_Y`, so the launch may spread cubes over a
/// 2-D or 3-D cube count (wgpu caps one dimension at 65,535 workgroups). Logits are read and
/// the gradient written as vectors of `N` elements (`V` a multiple of `N`, rows contiguous).
/// Every unit reaches every barrier: rows past the last, ignored rows and rows with a bad
/// target run their loops zero times and write nothing (or zeros, NaN) instead of returning.
/// Specialised at compile time for the divergence, the presence of targets and of an ignore
/// index, the gradient and the vector width.
// `x - x` below builds 0 from a runtime value; NaN comes in as `params.nan` (WGSL has no NaN
// literal, and CubeCL 0.11 folds a run-time `0 / 0` into one);
// `if comptime { if runtime {} }` stays nested so that the outer test is resolved at compile time.
#[allow(clippy::eq_op, clippy::collapsible_if)]
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
pub(crate) fn distill_kernel<F: Float, I: Numeric, G: Float, N: Size>(
    student: &Tensor<Vector<F, N>>,
    teacher: &Tensor<Vector<F, N>>,
    targets: &Tensor<I>,
    scale: &Tensor<f32>,
    out: &mut RowOut<Vector<G, N>>,
    params: RowParams,
    #[comptime] spec: RowSpec,
    #[define(F, I, G)] _dtypes: [ElemType; 3],
) {
    let kind = comptime!(spec.kind);
    let labeled = comptime!(spec.labeled);
    let n = out.loss.shape(0);
    // Whole cubes past the last row leave (a condition uniform over the cube).
    if CUBE_POS * (CUBE_DIM_Y as usize) >= n {
        terminate!();
    }
    let row = CUBE_POS * (CUBE_DIM_Y as usize) + UNIT_POS_Y as usize;
    let in_range = row < n;
    let safe_row = select(in_range, row, n - 1);
    let unit = UNIT_POS_X as usize;
    let width = student.vector_size();
    let v = student.shape(1);
    let vectors = v / width;
    let s_base = safe_row * (student.stride(0) / width);
    let t_base = safe_row * (teacher.stride(0) / width);
    let g_base = safe_row * (out.grad.stride(0) / width);
    let inv_t = params.inv_t;
    let mut smem = Shared::<[f32]>::new_slice(256usize);

    let target = row_target(
        targets,
        safe_row,
        v,
        params.ignore,
        labeled,
        comptime!(spec.with_ignore),
    );
    let live = in_range && !target.skip && !target.bad;
    // The loops of a row that is not live run zero times; the reductions still see every unit.
    let len = select(live, vectors, 0);

    // Pass 1 (online softmax) and, for forward KL, the divergence; a second pass for the
    // other divergences, with Σ q·∂D/∂q.
    let fkl = comptime!(kind == DivKind::ForwardKl);
    let mut div = f32::new(0.0);
    let stats = online_pass(
        student, teacher, s_base, t_base, len, inv_t, &mut smem, &mut div, fkl,
    );
    let mut sqg = f32::new(0.0);
    if !fkl {
        div = divergence_pass(
            student, teacher, s_base, t_base, len, &stats, inv_t, params.mix, &mut smem, &mut sqg,
            kind,
        );
    }

    // The row's loss, and the gradient of the reduced loss (zeros on ignored and bad rows).
    let safe_class = select(live, target.class as usize, 0);
    // 0 for ignored rows, NaN for out-of-range targets (a kernel argument: WGSL has no NaN
    // literal).
    let zero = inv_t - inv_t;
    let fallback = select(target.bad, params.nan, zero);
    let (first, soft_value, soft_scale, factor) = (
        in_range && unit == 0,
        params.t2 * div,
        params.t2 * inv_t,
        scale[0],
    );
    let weights = finish_row(
        student, s_base, safe_class, &stats, out, row, first, live, fallback, soft_value,
        soft_scale, &params, factor, div, sqg, labeled,
    );
    if comptime!(spec.with_grad) {
        if in_range {
            gradient_pass(
                student, teacher, out, s_base, t_base, g_base, live, safe_class, &stats, &weights,
                inv_t, params.mix, kind,
            );
        }
    }
}

/// Pass 1 of the dense kernel: over this unit's `len` vectors the student's online softmax
/// ([`Online`]) and the teacher's maximum `mt` and `sum_t = Σ e^{(t−mt)/T}`, with, for forward
/// KL, `w = Σ e^{(t−mt)/T}·(t − s)` (rescaled with `sum_t`); then the row's statistics across
/// its units, and for forward KL the divergence into `div` without another pass over the row
/// (closed form, as `Σ p = 1`: `KL = E_p[t − s]/T − (mt − ms)/T − lse_t + lse_s`). Every unit
/// of the cube must call it.
#[cube]
#[allow(clippy::too_many_arguments, clippy::collapsible_if)]
fn online_pass<F: Float, N: Size>(
    student: &Tensor<Vector<F, N>>,
    teacher: &Tensor<Vector<F, N>>,
    s_base: usize,
    t_base: usize,
    len: usize,
    inv_t: f32,
    smem: &mut Shared<[f32]>,
    div: &mut f32,
    #[comptime] fkl: bool,
) -> RowStats {
    let width = student.vector_size();
    let mut online = Online::new();
    let mut mt = f32::new(-3.0e38);
    let mut sum_t = f32::new(0.0);
    let mut w = f32::new(0.0);
    let mut jv = UNIT_POS_X as usize;
    while jv < len {
        let sv = student[s_base + jv];
        let tv = teacher[t_base + jv];
        #[unroll]
        for l in 0..width {
            let s = f32::cast_from(sv.extract(l));
            let t = f32::cast_from(tv.extract(l));
            online.add(s, inv_t);
            if t > mt {
                let r = ((mt - t) * inv_t).exp();
                sum_t *= r;
                w *= r;
                mt = t;
            }
            let et = ((t - mt) * inv_t).exp();
            sum_t += et;
            if fkl {
                if et > 0.0 {
                    w += et * (t - s);
                }
            }
        }
        jv += CUBE_DIM_X as usize;
    }
    let row = online.row(smem, inv_t);
    let row_mt = row_max(smem, mt);
    let rt = ((mt - row_mt) * inv_t).exp();
    let sum_t = row_sum(smem, sum_t * rt);
    let lse_t = sum_t.ln();
    if fkl {
        let w = row_sum(smem, w * rt);
        *div = w / sum_t * inv_t - (row_mt - row.ms) * inv_t - lse_t + row.sum_s.ln();
    }
    row.stats(row_mt, lse_t, f32::new(-3.0e38), f32::new(0.0))
}

/// Pass 2 of the dense kernel (divergences other than forward KL): the row's divergence `D`,
/// and `Σ q·∂D/∂q` into `sqg`. Every unit of the cube must call it.
#[cube]
#[allow(clippy::too_many_arguments)]
fn divergence_pass<F: Float, N: Size>(
    student: &Tensor<Vector<F, N>>,
    teacher: &Tensor<Vector<F, N>>,
    s_base: usize,
    t_base: usize,
    len: usize,
    stats: &RowStats,
    inv_t: f32,
    mix: f32,
    smem: &mut Shared<[f32]>,
    sqg: &mut f32,
    #[comptime] kind: DivKind,
) -> f32 {
    let width = student.vector_size();
    let mut div = f32::new(0.0);
    let mut unit_sqg = f32::new(0.0);
    let mut jv = UNIT_POS_X as usize;
    while jv < len {
        let sv = student[s_base + jv];
        let tv = teacher[t_base + jv];
        #[unroll]
        for l in 0..width {
            let lq = (f32::cast_from(sv.extract(l)) - stats.ms) * inv_t - stats.lse_s;
            let lp = (f32::cast_from(tv.extract(l)) - stats.mt) * inv_t - stats.lse_t;
            let q = lq.exp();
            let p = lp.exp();
            div += column_term(q, p, lq, lp, mix, kind);
            unit_sqg += q * column_grad(q, p, lq, mix, kind);
        }
        jv += CUBE_DIM_X as usize;
    }
    *sqg = row_sum(smem, unit_sqg);
    row_sum(smem, div)
}

/// The last pass of the dense kernel: the gradient of the reduced loss over this unit's
/// vectors of the row, zeros when the row is not live.
#[cube]
#[allow(clippy::too_many_arguments)]
fn gradient_pass<F: Float, G: Float, N: Size>(
    student: &Tensor<Vector<F, N>>,
    teacher: &Tensor<Vector<F, N>>,
    out: &mut RowOut<Vector<G, N>>,
    s_base: usize,
    t_base: usize,
    g_base: usize,
    live: bool,
    class: usize,
    stats: &RowStats,
    weights: &GradWeights,
    inv_t: f32,
    mix: f32,
    #[comptime] kind: DivKind,
) {
    let width = student.vector_size();
    let vectors = student.shape(1) / width;
    let mut jv = UNIT_POS_X as usize;
    while jv < vectors {
        let mut vector = zero_vector::<G, N>(width);
        if live {
            let sv = student[s_base + jv];
            let tv = teacher[t_base + jv];
            #[unroll]
            for l in 0..width {
                let s = f32::cast_from(sv.extract(l));
                let lq = (s - stats.ms) * inv_t - stats.lse_s;
                let lp = (f32::cast_from(tv.extract(l)) - stats.mt) * inv_t - stats.lse_t;
                let q = lq.exp();
                let p = lp.exp();
                let soft = soft_logit_grad(q, p, lq, lp, weights.div, weights.sqg, mix, kind);
                let at_class = jv * width + l == class;
                let value = logit_grad(weights, s, stats.ms, stats.lse_1, soft, at_class);
                vector.insert(l, G::cast_from(value));
            }
        }
        out.grad[g_base + jv] = vector;
        jv += CUBE_DIM_X as usize;
    }
}
