//! The fused sparse-teacher CubeCL kernel (wgpu, CUDA): one cube per row, f32 accumulation;
//! the same math as [`crate::kernel::sparse_cpu`], laid out for a GPU. The launch and the
//! backend glue live in `crate::backend::cube`.
//!
//! Per row with logits `z`, valid teacher entries `K` (index `i_j`, log-probability `ℓ_j`),
//! `r = T_gen / T`:
//!
//! 1. the `k` entries go to shared memory, with their rank among the row's valid indices (a
//!    sorted copy), which also finds indices seen twice; with indices outside `[0, V)`,
//!    log-probabilities above 0 and a tail-bucket mass above 1 (beyond the checks' rounding
//!    allowance), such a row is NaN with a zero gradient (bad input caught inside the kernel);
//! 2. one online-softmax pass over the row: the maximum and `S = Σ_v e^{(z_v − m)/T}`, the
//!    temperature-1 sums of the hard term and, for the tail bucket, the tail's own maximum
//!    and sum over `v ∉ K` (membership by merging each unit's increasing columns with the
//!    sorted indices; the tail is never a difference of two sums, so it neither cancels nor
//!    underflows);
//! 3. the divergence on the `k + 1` *virtual logits* (student `u_j`, teacher `w_j = r·ℓ_j`, and
//!    the tail bucket), with `g = ∂D/∂u` kept in shared memory, as in the CPU kernel;
//! 4. if asked, the gradient in one more pass: `g_tail · e^{(z_v − m_tail)/T} / S_tail` outside
//!    K and `g_j` on K (tail bucket), `g_j` on K (renormalised top-k), or
//!    `e_v / S − p_v [v ∈ K]` (full-vocabulary student), times `α·T²/T` and the reduction's
//!    factor, plus the hard term's `softmax(z) − (1 − ε)·onehot − ε/V`.
//!
//! The student row is read twice with the gradient (once without), as vectors of the width the
//! dense kernel uses, and the gradient written once, as the dense kernel does.

use cubecl::prelude::*;

use super::cube::{DivKind, column_grad, column_term, row_max, row_sum, soft_logit_grad};
use crate::tail::TAIL_FLOOR;
use crate::vocab::MASKED_LOGIT;
use crate::{StudentSupport, TailPolicy};

/// The tail policy a kernel is specialised for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum TailKind {
    /// [`TailPolicy::TailBucket`].
    Bucket,
    /// [`TailPolicy::Renormalize`] with [`StudentSupport::TopK`].
    TopK,
    /// [`TailPolicy::Renormalize`] with [`StudentSupport::FullVocab`] (forward KL only).
    FullVocab,
}

impl TailKind {
    pub(crate) fn of(tail: TailPolicy) -> Self {
        match tail {
            TailPolicy::TailBucket => Self::Bucket,
            TailPolicy::Renormalize {
                student: StudentSupport::TopK,
            } => Self::TopK,
            TailPolicy::Renormalize {
                student: StudentSupport::FullVocab,
            } => Self::FullVocab,
        }
    }
}

/// Advances `at` to the first of the `count` sorted valid indices that is `≥ column` and says
/// whether it is `column`. A unit visits its columns in increasing order, so its cursor moves
/// at most `count` times over a whole pass: a merge, not a search per column.
#[cube]
fn member(sorted: &SharedMemory<u32>, count: u32, at: &mut u32, column: u32) -> bool {
    while *at < count && sorted[*at as usize] < column {
        *at += 1;
    }
    let mut found = false;
    if *at < count {
        found = sorted[*at as usize] == column;
    }
    found
}

/// Row losses, soft and hard terms (f32) and optionally the gradient (the logits' dtype) of
/// `[N, V]` student logits against `[N, k]` teacher entries (`log_probs` in f32, `−∞` for a
/// missing entry). One cube per row at `CUBE_POS`; specialised at compile time for the
/// divergence, the tail policy, targets, ignore index, gradient and `k`.
// `x - x` and `0 / 0` below build 0 and NaN from runtime values (WGSL has no NaN literal).
#[allow(clippy::eq_op, clippy::collapsible_if)]
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
pub(crate) fn sparse_kernel<F: Float, I: Numeric, G: Float, N: Size>(
    student: &Tensor<Vector<F, N>>,
    indices: &Tensor<I>,
    log_probs: &Tensor<f32>,
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
    ratio: f32,
    ignore: i32,
    #[comptime] kind: DivKind,
    #[comptime] tail: TailKind,
    #[comptime] with_targets: bool,
    #[comptime] with_ignore: bool,
    #[comptime] with_grad: bool,
    #[comptime] k: usize,
    #[define(F, I, G)] _dtypes: [StorageType; 3],
) {
    let row = CUBE_POS;
    if row >= loss.shape(0) {
        terminate!();
    }
    let unit = UNIT_POS_X as usize;
    let step = CUBE_DIM_X as usize;
    let v = student.shape(1);
    let width = student.vector_size();
    let vectors = v / width;
    let s_base = row * (student.stride(0) / width);
    let g_base = row * (grad.stride(0) / width);
    let zero = inv_t - inv_t;
    let nan = zero / zero;
    let neg_inf = (zero - 1.0) / zero;
    let none = u32::new(2_147_483_647);
    let mut smem = SharedMemory::<f32>::new(256usize);
    // Entries in their order: index (`none` = 2³¹ − 1, above any column, if missing), `w = r·ℓ`; the valid indices sorted,
    // with the entry each came from; `u` and `∂D/∂u` of the virtual row (entry k: the tail).
    let mut entry_index = SharedMemory::<u32>::new(k);
    let mut entry_w = SharedMemory::<f32>::new(k + 1);
    let mut sorted = SharedMemory::<u32>::new(k);
    let mut sorted_entry = SharedMemory::<u32>::new(k);
    let mut entry_u = SharedMemory::<f32>::new(k + 1);
    let mut entry_g = SharedMemory::<f32>::new(k + 1);

    let class = i32::cast_from(targets[row * targets.stride(0)]);
    let mut skip = false;
    let mut bad_target = false;
    if with_targets {
        if with_ignore {
            skip = class == ignore;
        }
        bad_target = !skip && (class < 0 || class >= v as i32);
    }
    let active = !skip && !bad_target;

    // 1. The entries: validity, range (and log-probabilities above 0), mass.
    let mut valid_count = f32::new(0.0);
    let mut out_of_range = f32::new(0.0);
    let mut mass = f32::new(0.0);
    let mut e = unit;
    while e < k {
        let lp = log_probs[row * log_probs.stride(0) + e * log_probs.stride(1)];
        let raw = i32::cast_from(indices[row * indices.stride(0) + e * indices.stride(1)]);
        let mut index = none;
        if lp > -3.0e38f32 {
            if raw < 0 || raw >= v as i32 {
                out_of_range += 1.0;
            } else {
                index = u32::cast_from(raw);
                valid_count += 1.0;
                mass += lp.exp();
                if lp > 1.0e-3f32 {
                    out_of_range += 1.0;
                }
            }
        }
        entry_index[e] = index;
        entry_w[e] = ratio * lp;
        e += step;
    }
    let valid_count = row_sum(&mut smem, valid_count);
    let out_of_range = row_sum(&mut smem, out_of_range);
    let mass = row_sum(&mut smem, mass);
    let count = u32::cast_from(valid_count);
    // Ranks: a valid entry's position among the valid indices; the missing ones after them.
    let mut duplicates = f32::new(0.0);
    let mut e = unit;
    while e < k {
        let index = entry_index[e];
        let mut rank = u32::new(0);
        if index != none {
            for other in 0..k {
                let o = entry_index[other];
                if o < index {
                    rank += 1;
                }
                if o == index && other != e {
                    duplicates += 1.0;
                }
            }
        } else {
            rank = count;
            for other in 0..e {
                if entry_index[other] == none {
                    rank += 1;
                }
            }
        }
        // Duplicates share a rank; their row is NaN below, whatever the sorted copy holds.
        sorted[rank as usize] = index;
        sorted_entry[rank as usize] = e as u32;
        e += step;
    }
    let duplicates = row_sum(&mut smem, duplicates);
    // (The limits of the checks, `crate::tail::ROUNDING`: a log-probability above 1e-3, or a
    // tail-bucket mass above 1 + 1e-3, is not a distribution.)
    let mut bad_teacher = out_of_range > 0.0 || duplicates > 0.0;
    if comptime!(tail == TailKind::Bucket) {
        bad_teacher = bad_teacher || mass > 1.001f32;
    }
    let live = active && !bad_teacher;
    let len = select(live, vectors, 0);

    // 2. One online-softmax pass: S (at T), the T = 1 sums of the hard term, the tail's own.
    let bucket = comptime!(tail == TailKind::Bucket);
    let mut ms = f32::new(-3.0e38);
    let mut sum_s = f32::new(0.0);
    let mut sum_1 = f32::new(0.0);
    let mut mtail = f32::new(-3.0e38);
    let mut sum_tail = f32::new(0.0);
    let mut finite = f32::new(0.0);
    let mut total = f32::new(0.0);
    let mut cursor = u32::new(0);
    let mut jv = unit;
    while jv < len {
        let sv = student[s_base + jv];
        #[unroll]
        for l in 0..width {
            let s = f32::cast_from(sv[l]);
            if s > ms {
                sum_s *= ((ms - s) * inv_t).exp();
                sum_1 *= (ms - s).exp();
                ms = s;
            }
            sum_s += ((s - ms) * inv_t).exp();
            sum_1 += (s - ms).exp();
            if bucket {
                if !member(&sorted, count, &mut cursor, (jv * width + l) as u32) {
                    if s > mtail {
                        sum_tail *= ((mtail - s) * inv_t).exp();
                        mtail = s;
                    }
                    sum_tail += ((s - mtail) * inv_t).exp();
                }
            }
            if s > f32::new(comptime!(MASKED_LOGIT as f32)) {
                finite += 1.0;
                total += s;
            }
        }
        jv += step;
    }
    let row_ms = row_max(&mut smem, ms);
    let sum_s = row_sum(&mut smem, sum_s * ((ms - row_ms) * inv_t).exp());
    let sum_1 = row_sum(&mut smem, sum_1 * (ms - row_ms).exp());
    let finite = row_sum(&mut smem, finite);
    let total = row_sum(&mut smem, total) - finite * row_ms;
    let mut row_mtail = f32::new(-3.0e38);
    let mut tail_sum = f32::new(0.0);
    if bucket {
        row_mtail = row_max(&mut smem, mtail);
        tail_sum = row_sum(&mut smem, sum_tail * ((mtail - row_mtail) * inv_t).exp());
    }
    let ms = row_ms;
    let lse_s = sum_s.ln();
    let lse_1 = sum_1.ln();

    // 3. The virtual row: u and w of every valid entry (and of the tail bucket), its
    // divergence D and g = ∂D/∂u.
    let has_tail = bucket && count < v as u32;
    let mut e = unit;
    while e < k + 1 {
        let mut u = f32::new(-3.0e38);
        let mut w = f32::new(-3.0e38);
        if e < k {
            let index = entry_index[e];
            if index != none && live {
                let at = index as usize;
                let s = f32::cast_from(student[s_base + at / width][at % width]);
                u = (s - ms) * inv_t;
                if comptime!(tail != TailKind::TopK) {
                    u -= lse_s;
                }
                w = entry_w[e];
            }
        } else if has_tail {
            u = (row_mtail - ms) * inv_t + tail_sum.ln() - lse_s;
            // The teacher's tail, at least `TAIL_FLOOR` (a certain teacher stays finite).
            let left = f32::max(1.0 - mass, f32::new(comptime!(TAIL_FLOOR as f32)));
            w = ratio * left.ln();
        }
        entry_u[e] = u;
        entry_w[e] = w;
        e += step;
    }
    sync_cube();
    // Maxima and log-sum-exps of both virtual rows (the full-vocabulary student's u is
    // already a log-probability: no renormalisation).
    let mut mu = f32::new(-3.0e38);
    let mut mw = f32::new(-3.0e38);
    let mut e = unit;
    while e < k + 1 {
        mu = f32::max(mu, entry_u[e]);
        mw = f32::max(mw, entry_w[e]);
        e += step;
    }
    let mu = row_max(&mut smem, mu);
    let mw = row_max(&mut smem, mw);
    let mut su = f32::new(0.0);
    let mut sw = f32::new(0.0);
    let mut e = unit;
    while e < k + 1 {
        let u = entry_u[e];
        let w = entry_w[e];
        if u > -3.0e38f32 {
            su += (u - mu).exp();
        }
        if w > -3.0e38f32 {
            sw += (w - mw).exp();
        }
        e += step;
    }
    let lse_u = mu + row_sum(&mut smem, su).ln();
    let lse_w = mw + row_sum(&mut smem, sw).ln();
    let full_vocab = comptime!(tail == TailKind::FullVocab);
    let mut div = f32::new(0.0);
    let mut sqg = f32::new(0.0);
    let mut e = unit;
    while e < k + 1 {
        let u = entry_u[e];
        let w = entry_w[e];
        if u > -3.0e38f32 || w > -3.0e38f32 {
            let mut lq = u - lse_u;
            if full_vocab {
                lq = u;
            }
            // A teacher bucket without mass has `ln p = −∞` (reverse KL is then +∞, not finite).
            let lp = select(w > -3.0e38f32, w - lse_w, neg_inf);
            let q = select(u > -3.0e38f32, lq.exp(), 0.0);
            let p = select(w > -3.0e38f32, lp.exp(), 0.0);
            div += column_term(q, p, lq, lp, mix, kind);
            if comptime!(kind != DivKind::ForwardKl && kind != DivKind::ReverseKl) {
                sqg += q * column_grad(q, p, lq, mix, kind);
            }
        }
        e += step;
    }
    let div = row_sum(&mut smem, div);
    let sqg = row_sum(&mut smem, sqg);
    let mut e = unit;
    while e < k + 1 {
        let u = entry_u[e];
        let w = entry_w[e];
        let mut g = f32::new(0.0);
        if u > -3.0e38f32 || w > -3.0e38f32 {
            let lq = u - lse_u;
            let lp = select(w > -3.0e38f32, w - lse_w, neg_inf);
            let q = select(u > -3.0e38f32, lq.exp(), 0.0);
            let p = select(w > -3.0e38f32, lp.exp(), 0.0);
            if full_vocab {
                g = -p;
            } else {
                g = soft_logit_grad(q, p, lq, lp, div, sqg, mix, kind);
            }
        }
        entry_g[e] = g;
        e += step;
    }
    sync_cube();

    let mut soft_value = t2 * div;
    if count == 0 {
        soft_value = nan;
    }
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
    let mut row_loss = a * soft_value + b * hard_value;
    if a == 1.0 {
        row_loss = soft_value;
    } else if a == 0.0 {
        row_loss = hard_value;
    }
    if unit == 0 {
        if live {
            loss[row] = row_loss;
            soft[row] = soft_value;
            hard[row] = hard_value;
        } else {
            // 0 for ignored rows, NaN for a bad target or bad teacher entries.
            let mut value = zero;
            if !skip {
                value = nan;
            }
            loss[row] = value;
            soft[row] = value;
            hard[row] = value;
        }
    }

    // 4. The gradient of the reduced loss.
    if with_grad {
        let factor = scale[0];
        let mut ca = a * t2 * inv_t * factor;
        if count == 0 {
            ca = zero;
        }
        let cb = b * factor;
        let eps_f = eps / finite;
        let tail_g = entry_g[k];
        let mut cursor = u32::new(0);
        let mut jv = unit;
        while jv < vectors {
            let mut out = Vector::<G, N>::empty();
            if live {
                let sv = student[s_base + jv];
                #[unroll]
                for l in 0..width {
                    let j = jv * width + l;
                    let s = f32::cast_from(sv[l]);
                    let in_k = member(&sorted, count, &mut cursor, j as u32);
                    let mut soft_grad = f32::new(0.0);
                    if in_k {
                        soft_grad = entry_g[sorted_entry[cursor as usize] as usize];
                    }
                    if bucket {
                        if !in_k && tail_sum > 0.0 {
                            soft_grad = tail_g * ((s - row_mtail) * inv_t).exp() / tail_sum;
                        }
                    }
                    if full_vocab {
                        soft_grad += ((s - ms) * inv_t - lse_s).exp();
                    }
                    let mut value = ca * soft_grad;
                    if cb != 0.0 {
                        let mut h = (s - ms - lse_1).exp();
                        if s > f32::new(comptime!(MASKED_LOGIT as f32)) {
                            h -= eps_f;
                        }
                        if j == safe_class {
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
