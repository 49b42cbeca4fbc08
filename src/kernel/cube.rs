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

use crate::Divergence;
use crate::vocab::MASKED_LOGIT;

/// Units per cube: one row of up to `BLOCK` units, or several rows of fewer when V is small.
pub(crate) const BLOCK: u32 = 256;

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

/// Sum of `value` over the `CUBE_DIM_X` units of this unit's row (a shared-memory tree in the
/// row's segment; every unit of the row gets the result). Every unit of the cube must call it.
#[cube]
pub(crate) fn row_sum(smem: &mut SharedMemory<f32>, value: f32) -> f32 {
    let unit = UNIT_POS_X as usize;
    let base = UNIT_POS_Y as usize * CUBE_DIM_X as usize;
    smem[base + unit] = value;
    sync_cube();
    // A runtime value: a loop counter must not be a comptime constant.
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if unit < stride {
            smem[base + unit] = smem[base + unit] + smem[base + unit + stride];
        }
        sync_cube();
        stride /= 2;
    }
    let total = smem[base];
    sync_cube();
    total
}

/// Maximum of `value` over the units of this unit's row (as [`row_sum`]).
#[cube]
pub(crate) fn row_max(smem: &mut SharedMemory<f32>, value: f32) -> f32 {
    let unit = UNIT_POS_X as usize;
    let base = UNIT_POS_Y as usize * CUBE_DIM_X as usize;
    smem[base + unit] = value;
    sync_cube();
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if unit < stride {
            let other = smem[base + unit + stride];
            if other > smem[base + unit] {
                smem[base + unit] = other;
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
                d = diff * 0.5;
            } else {
                d = -diff * 0.5;
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
                g = 0.5;
            } else if diff < 0.0 {
                g = -0.5;
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
// `x - x` and `0 / 0` below build 0 and NaN from runtime values (WGSL has no NaN literal);
// `if comptime { if runtime {} }` stays nested so that the outer test is resolved at compile time.
#[allow(clippy::eq_op, clippy::collapsible_if)]
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
pub(crate) fn distill_kernel<F: Float, I: Numeric, G: Float, N: Size>(
    student: &Tensor<Vector<F, N>>,
    teacher: &Tensor<Vector<F, N>>,
    targets: &Tensor<I>,
    scale: &Tensor<f32>,
    loss: &mut Tensor<f32>,
    soft: &mut Tensor<f32>,
    hard: &mut Tensor<f32>,
    grad: &mut Tensor<Vector<G, N>>,
    inv_t: f32,
    t2: f32,
    alpha: f32,
    eps: f32,
    mix: f32,
    ignore: i32,
    #[comptime] kind: DivKind,
    #[comptime] with_targets: bool,
    #[comptime] with_ignore: bool,
    #[comptime] with_grad: bool,
    #[define(F, I, G)] _dtypes: [StorageType; 3],
) {
    let n = loss.shape(0);
    // Whole cubes past the last row leave (a condition uniform over the cube).
    if CUBE_POS * (CUBE_DIM_Y as usize) >= n {
        terminate!();
    }
    let row = CUBE_POS * (CUBE_DIM_Y as usize) + UNIT_POS_Y as usize;
    let in_range = row < n;
    let safe_row = select(in_range, row, n - 1);
    let unit = UNIT_POS_X as usize;
    let step = CUBE_DIM_X as usize;
    let width = student.vector_size();
    let v = student.shape(1);
    let vectors = v / width;
    let s_base = safe_row * (student.stride(0) / width);
    let t_base = safe_row * (teacher.stride(0) / width);
    let g_base = safe_row * (grad.stride(0) / width);
    let mut smem = SharedMemory::<f32>::new(256usize);

    // Without labels `targets` is a dummy `[N]` tensor of zeros.
    let class = i32::cast_from(targets[safe_row * targets.stride(0)]);
    let mut skip = false;
    let mut bad = false;
    if with_targets {
        if with_ignore {
            skip = class == ignore;
        }
        bad = !skip && (class < 0 || class >= v as i32);
    }
    let live = in_range && !skip && !bad;
    // The loops of a row that is not live run zero times; the reductions still see every unit.
    let len = select(live, vectors, 0);

    // Pass 1 (online softmax): running maxima and sums of exponentials, rescaled when a
    // maximum grows; for forward KL also `w = Σ e^{(t−mt)/T}·(t − s)`, from which the
    // divergence follows without another pass over the row.
    let fkl = comptime!(kind == DivKind::ForwardKl);
    let mut ms = f32::new(-3.0e38);
    let mut mt = f32::new(-3.0e38);
    let mut sum_s = f32::new(0.0);
    let mut sum_1 = f32::new(0.0);
    let mut sum_t = f32::new(0.0);
    let mut w = f32::new(0.0);
    let mut finite = f32::new(0.0);
    let mut total = f32::new(0.0);
    let mut jv = unit;
    while jv < len {
        let sv = student[s_base + jv];
        let tv = teacher[t_base + jv];
        #[unroll]
        for l in 0..width {
            let s = f32::cast_from(sv[l]);
            let t = f32::cast_from(tv[l]);
            if s > ms {
                sum_s *= ((ms - s) * inv_t).exp();
                sum_1 *= (ms - s).exp();
                ms = s;
            }
            sum_s += ((s - ms) * inv_t).exp();
            sum_1 += (s - ms).exp();
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
            if s > f32::new(comptime!(MASKED_LOGIT as f32)) {
                finite += 1.0;
                total += s;
            }
        }
        jv += step;
    }
    // Across the row's units: the row maxima, then each unit's sums rescaled to them.
    let row_ms = row_max(&mut smem, ms);
    let row_mt = row_max(&mut smem, mt);
    let rt = ((mt - row_mt) * inv_t).exp();
    let sum_s = row_sum(&mut smem, sum_s * ((ms - row_ms) * inv_t).exp());
    let sum_1 = row_sum(&mut smem, sum_1 * (ms - row_ms).exp());
    let sum_t = row_sum(&mut smem, sum_t * rt);
    let finite = row_sum(&mut smem, finite);
    let total = row_sum(&mut smem, total) - finite * row_ms;
    let ms = row_ms;
    let mt = row_mt;
    let lse_s = sum_s.ln();
    let lse_t = sum_t.ln();
    let lse_1 = sum_1.ln();

    // The divergence and Σ q g: closed form for forward KL (Σ p = 1),
    // KL = E_p[t − s]/T − (mt − ms)/T − lse_t + lse_s; a second pass for the others.
    let mut div = f32::new(0.0);
    let mut sqg = f32::new(0.0);
    if fkl {
        let w = row_sum(&mut smem, w * rt);
        div = w / sum_t * inv_t - (mt - ms) * inv_t - lse_t + lse_s;
    } else {
        let mut jv = unit;
        while jv < len {
            let sv = student[s_base + jv];
            let tv = teacher[t_base + jv];
            #[unroll]
            for l in 0..width {
                let lq = (f32::cast_from(sv[l]) - ms) * inv_t - lse_s;
                let lp = (f32::cast_from(tv[l]) - mt) * inv_t - lse_t;
                let q = lq.exp();
                let p = lp.exp();
                div += column_term(q, p, lq, lp, mix, kind);
                sqg += q * column_grad(q, p, lq, mix, kind);
            }
            jv += step;
        }
        div = row_sum(&mut smem, div);
        sqg = row_sum(&mut smem, sqg);
    }

    let soft_value = t2 * div;
    let mut hard_value = f32::new(0.0);
    let mut a = f32::new(1.0);
    let mut b = f32::new(0.0);
    let safe_class = select(live, class as usize, 0);
    if with_targets {
        a = alpha;
        b = 1.0 - alpha;
        let s_y = f32::cast_from(student[s_base + safe_class / width][safe_class % width]);
        let nll = lse_1 - (s_y - ms);
        hard_value = (1.0 - eps) * nll - eps * (total / finite - lse_1);
    }
    // A term whose weight is exactly 0 is left out, so that an infinite term cannot give NaN.
    let mut row_loss = a * soft_value + b * hard_value;
    if a == 1.0 {
        row_loss = soft_value;
    } else if a == 0.0 {
        row_loss = hard_value;
    }
    if in_range && unit == 0 {
        if live {
            loss[row] = row_loss;
            soft[row] = soft_value;
            hard[row] = hard_value;
        } else {
            // 0 for ignored rows, NaN for out-of-range targets (WGSL has no NaN literal).
            let zero = inv_t - inv_t;
            let mut value = zero;
            if bad {
                value = zero / zero;
            }
            loss[row] = value;
            soft[row] = value;
            hard[row] = value;
        }
    }

    // Last pass: the gradient of the reduced loss (zeros on ignored and bad rows).
    if with_grad {
        if in_range {
            let factor = scale[0];
            let ca = a * t2 * inv_t * factor;
            let cb = b * factor;
            let eps_f = eps / finite;
            let mut jv = unit;
            while jv < vectors {
                let mut out = Vector::<G, N>::empty();
                if live {
                    let sv = student[s_base + jv];
                    let tv = teacher[t_base + jv];
                    #[unroll]
                    for l in 0..width {
                        let s = f32::cast_from(sv[l]);
                        let lq = (s - ms) * inv_t - lse_s;
                        let lp = (f32::cast_from(tv[l]) - mt) * inv_t - lse_t;
                        let q = lq.exp();
                        let p = lp.exp();
                        let mut value = ca * soft_logit_grad(q, p, lq, lp, div, sqg, mix, kind);
                        if cb != 0.0 {
                            let mut h = (s - ms - lse_1).exp();
                            if s > f32::new(comptime!(MASKED_LOGIT as f32)) {
                                h -= eps_f;
                            }
                            if jv * width + l == safe_class {
                                h -= 1.0 - eps;
                            }
                            value += cb * h;
                        }
                        out[l] = G::cast_from(value);
                    }
                } else {
                    #[unroll]
                    for l in 0..width {
                        out[l] = G::cast_from(0.0f32);
                    }
                }
                grad[g_base + jv] = out;
                jv += step;
            }
        }
    }
}
