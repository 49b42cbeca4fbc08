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

use super::cube_row::{
    DivKind, GradWeights, Online, RowOut, RowParams, RowSpec, RowStats, column_grad, column_term,
    finish_row, logit_grad, row_max, row_sum, row_target, soft_logit_grad, zero_vector,
};
use crate::tail::TAIL_FLOOR;

mod entries;
use crate::{StudentSupport, TailPolicy};
use entries::{Entries, check_entries, member, no_entry};

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

/// Step 2 over this unit's `len` vectors: the student's online softmax ([`Online`]) and, for
/// the tail bucket, the tail's own running maximum and sum over the columns outside K
/// (membership by merging the unit's increasing columns with the sorted indices; the tail is
/// never a difference of two sums, so it neither cancels nor underflows); then the row's
/// statistics across its units, with the tail's maximum and sum.
/// Every unit of the cube must call it.
#[cube]
#[allow(clippy::too_many_arguments, clippy::collapsible_if)]
fn online_pass<F: Float, N: Size>(
    student: &Tensor<Vector<F, N>>,
    s_base: usize,
    len: usize,
    inv_t: f32,
    sorted: &Shared<[u32]>,
    count: u32,
    smem: &mut Shared<[f32]>,
    #[comptime] bucket: bool,
) -> RowStats {
    let width = student.vector_size();
    let mut online = Online::new();
    let mut mtail = f32::new(-3.0e38);
    let mut sum_tail = f32::new(0.0);
    let mut cursor = u32::new(0);
    let mut jv = UNIT_POS_X as usize;
    while jv < len {
        let sv = student[s_base + jv];
        #[unroll]
        for l in 0..width {
            let s = f32::cast_from(sv.extract(l));
            online.add(s, inv_t);
            if bucket {
                let (found, at) = member(sorted, count, cursor, (jv * width + l) as u32);
                cursor = at;
                if !found {
                    if s > mtail {
                        sum_tail *= ((mtail - s) * inv_t).exp();
                        mtail = s;
                    }
                    sum_tail += ((s - mtail) * inv_t).exp();
                }
            }
        }
        jv += CUBE_DIM_X as usize;
    }
    let row = online.row(smem, inv_t);
    let mut tail_max = f32::new(-3.0e38);
    let mut tail_sum = f32::new(0.0);
    if bucket {
        tail_max = row_max(smem, mtail);
        tail_sum = row_sum(smem, sum_tail * ((mtail - tail_max) * inv_t).exp());
    }
    row.stats(f32::new(0.0), f32::new(0.0), tail_max, tail_sum)
}

/// Step 3a: `u` (student) and `w = r·ℓ` (teacher) of every valid entry of the virtual row
/// into `entry_u`, `entry_w`, and, with a tail, of the tail bucket (entry `k`): `u` from the
/// tail's maximum and sum, `w` from the teacher's left-over mass, at least `TAIL_FLOOR` (a
/// certain teacher stays finite). `−3e38` marks an absent entry.
#[cube]
#[allow(clippy::too_many_arguments)]
fn virtual_row<F: Float, N: Size>(
    student: &Tensor<Vector<F, N>>,
    s_base: usize,
    entries: &mut Entries,
    live: bool,
    has_tail: bool,
    stats: &RowStats,
    inv_t: f32,
    mass: f32,
    ratio: f32,
    #[comptime] tail: TailKind,
    #[comptime] k: usize,
) {
    let width = student.vector_size();
    let mut e = UNIT_POS_X as usize;
    while e < k + 1 {
        let mut u = f32::new(-3.0e38);
        let mut w = f32::new(-3.0e38);
        if e < k {
            let index = entries.index[e];
            if index != no_entry() && live {
                let at = index as usize;
                let s = f32::cast_from(student[s_base + at / width].extract_dynamic(at % width));
                u = (s - stats.ms) * inv_t;
                if comptime!(tail != TailKind::TopK) {
                    u -= stats.lse_s;
                }
                w = entries.w[e];
            }
        } else if has_tail {
            u = (stats.tail_max - stats.ms) * inv_t + stats.tail_sum.ln() - stats.lse_s;
            let left = f32::max(1.0 - mass, f32::new(comptime!(TAIL_FLOOR as f32)));
            w = ratio * left.ln();
        }
        entries.u[e] = u;
        entries.w[e] = w;
        e += CUBE_DIM_X as usize;
    }
    sync_cube();
}

/// `log q` and `q`, `log p` and `p` of virtual entry `e` (`0` and `−∞` for an absent one; the
/// full-vocabulary student's `u` is already a log-probability).
#[cube]
fn virtual_probs(
    u: f32,
    w: f32,
    lse_u: f32,
    lse_w: f32,
    neg_inf: f32,
    #[comptime] full_vocab: bool,
) -> Vector<f32, Const<4>> {
    let mut lq = u - lse_u;
    if full_vocab {
        lq = u;
    }
    // A teacher bucket without mass has `ln p = −∞` (reverse KL is then +∞, not finite).
    let lp = select(w > -3.0e38f32, w - lse_w, neg_inf);
    let mut out = Vector::<f32, Const<4>>::empty();
    out.insert(0usize, lq);
    out.insert(1usize, select(u > -3.0e38f32, lq.exp(), 0.0));
    out.insert(2usize, lp);
    out.insert(3usize, select(w > -3.0e38f32, lp.exp(), 0.0));
    out
}

/// Step 3b: the divergence `D` of the virtual rows (both renormalised by their log-sum-exps,
/// but for the full-vocabulary student), and `g = ∂D/∂u` of every entry into `entry_g`.
/// Every unit of the cube must call it.
#[cube]
#[allow(clippy::too_many_arguments)]
fn virtual_soft(
    entries: &mut Entries,
    smem: &mut Shared<[f32]>,
    mix: f32,
    neg_inf: f32,
    #[comptime] kind: DivKind,
    #[comptime] tail: TailKind,
    #[comptime] k: usize,
) -> f32 {
    let full_vocab = comptime!(tail == TailKind::FullVocab);
    let step = CUBE_DIM_X as usize;
    let mut mu = f32::new(-3.0e38);
    let mut mw = f32::new(-3.0e38);
    let mut e = UNIT_POS_X as usize;
    while e < k + 1 {
        mu = f32::max(mu, entries.u[e]);
        mw = f32::max(mw, entries.w[e]);
        e += step;
    }
    let mu = row_max(smem, mu);
    let mw = row_max(smem, mw);
    let mut su = f32::new(0.0);
    let mut sw = f32::new(0.0);
    let mut e = UNIT_POS_X as usize;
    while e < k + 1 {
        if entries.u[e] > -3.0e38f32 {
            su += (entries.u[e] - mu).exp();
        }
        if entries.w[e] > -3.0e38f32 {
            sw += (entries.w[e] - mw).exp();
        }
        e += step;
    }
    let lse_u = mu + row_sum(smem, su).ln();
    let lse_w = mw + row_sum(smem, sw).ln();
    let mut div = f32::new(0.0);
    let mut sqg = f32::new(0.0);
    let mut e = UNIT_POS_X as usize;
    while e < k + 1 {
        let (u, w) = (entries.u[e], entries.w[e]);
        if u > -3.0e38f32 || w > -3.0e38f32 {
            let x = virtual_probs(u, w, lse_u, lse_w, neg_inf, full_vocab);
            div += column_term(
                x.extract(1usize),
                x.extract(3usize),
                x.extract(0usize),
                x.extract(2usize),
                mix,
                kind,
            );
            if comptime!(kind != DivKind::ForwardKl && kind != DivKind::ReverseKl) {
                sqg += x.extract(1usize)
                    * column_grad(
                        x.extract(1usize),
                        x.extract(3usize),
                        x.extract(0usize),
                        mix,
                        kind,
                    );
            }
        }
        e += step;
    }
    let div = row_sum(smem, div);
    let sqg = row_sum(smem, sqg);
    let mut e = UNIT_POS_X as usize;
    while e < k + 1 {
        let (u, w) = (entries.u[e], entries.w[e]);
        let mut g = f32::new(0.0);
        if u > -3.0e38f32 || w > -3.0e38f32 {
            // (`g` is taken against the renormalised `q` here, as the CPU kernel does.)
            let x = virtual_probs(u, w, lse_u, lse_w, neg_inf, false);
            if full_vocab {
                g = -x.extract(3usize);
            } else {
                g = soft_logit_grad(
                    x.extract(1usize),
                    x.extract(3usize),
                    x.extract(0usize),
                    x.extract(2usize),
                    div,
                    sqg,
                    mix,
                    kind,
                );
            }
        }
        entries.g[e] = g;
        e += step;
    }
    sync_cube();
    div
}

/// Step 4: the gradient of the reduced loss over this unit's vectors of the row:
/// `g_tail · e^{(z_v − m_tail)/T} / S_tail` outside K and `g_j` on K (tail bucket), `g_j` on K
/// (renormalised top-k), or `e_v / S − p_v [v ∈ K]` (full-vocabulary student), times `ca`,
/// plus `cb` times the hard term's; zeros when the row is not live.
#[cube]
#[allow(clippy::too_many_arguments, clippy::collapsible_if)]
fn gradient_pass<F: Float, G: Float, N: Size>(
    student: &Tensor<Vector<F, N>>,
    out: &mut RowOut<Vector<G, N>>,
    s_base: usize,
    g_base: usize,
    live: bool,
    class: usize,
    entries: &Entries,
    count: u32,
    stats: &RowStats,
    weights: &GradWeights,
    inv_t: f32,
    #[comptime] tail: TailKind,
    #[comptime] k: usize,
) {
    let width = student.vector_size();
    let vectors = student.shape(1) / width;
    let tail_g = entries.g[k];
    let mut cursor = u32::new(0);
    let mut jv = UNIT_POS_X as usize;
    while jv < vectors {
        let mut vector = zero_vector::<G, N>(width);
        if live {
            let sv = student[s_base + jv];
            #[unroll]
            for l in 0..width {
                let j = jv * width + l;
                let s = f32::cast_from(sv.extract(l));
                let (in_k, at) = member(&entries.sorted, count, cursor, j as u32);
                cursor = at;
                let mut soft_grad = f32::new(0.0);
                if in_k {
                    soft_grad = entries.g[entries.sorted_entry[cursor as usize] as usize];
                }
                if comptime!(tail == TailKind::Bucket) {
                    if !in_k && stats.tail_sum > 0.0 {
                        let e = ((s - stats.tail_max) * inv_t).exp();
                        soft_grad = tail_g * e / stats.tail_sum;
                    }
                }
                if comptime!(tail == TailKind::FullVocab) {
                    soft_grad += ((s - stats.ms) * inv_t - stats.lse_s).exp();
                }
                let value = logit_grad(weights, s, stats.ms, stats.lse_1, soft_grad, j == class);
                vector.insert(l, G::cast_from(value));
            }
        }
        out.grad[g_base + jv] = vector;
        jv += CUBE_DIM_X as usize;
    }
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
    out: &mut RowOut<Vector<G, N>>,
    params: RowParams,
    ratio: f32,
    #[comptime] spec: RowSpec,
    #[comptime] tail: TailKind,
    #[comptime] k: usize,
    #[define(F, I, G)] _dtypes: [ElemType; 3],
) {
    let labeled = comptime!(spec.labeled);
    let row = CUBE_POS;
    if row >= out.loss.shape(0) {
        terminate!();
    }
    let v = student.shape(1);
    let width = student.vector_size();
    let s_base = row * (student.stride(0) / width);
    let g_base = row * (out.grad.stride(0) / width);
    let inv_t = params.inv_t;
    let zero = inv_t - inv_t;
    let nan = params.nan;
    let neg_inf = params.neg_inf;
    let mut smem = Shared::<[f32]>::new_slice(256usize);
    let mut entries = Entries::new(k);

    let target = row_target(
        targets,
        row,
        v,
        params.ignore,
        labeled,
        comptime!(spec.with_ignore),
    );

    // 1. The entries: validity, range (and log-probabilities above 0), mass, ranks.
    let mut mass = f32::new(0.0);
    let mut bad_teacher = false;
    let count = check_entries(
        indices,
        log_probs,
        row,
        ratio,
        v,
        &mut entries,
        &mut smem,
        &mut mass,
        &mut bad_teacher,
        tail,
        k,
    );
    let bucket = comptime!(tail == TailKind::Bucket);
    let live = !target.skip && !target.bad && !bad_teacher;
    let len = select(live, v / width, 0);

    // 2. One online-softmax pass: S (at T), the T = 1 sums of the hard term, the tail's own.
    let sorted = &entries.sorted;
    let stats = online_pass(
        student, s_base, len, inv_t, sorted, count, &mut smem, bucket,
    );

    // 3. The virtual row: u and w of every valid entry (and of the tail bucket), its
    // divergence D and g = ∂D/∂u.
    let has_tail = bucket && count < v as u32;
    virtual_row(
        student,
        s_base,
        &mut entries,
        live,
        has_tail,
        &stats,
        inv_t,
        mass,
        ratio,
        tail,
        k,
    );
    let div = virtual_soft(
        &mut entries,
        &mut smem,
        params.mix,
        neg_inf,
        comptime!(spec.kind),
        tail,
        k,
    );

    // The row's loss, and the gradient of the reduced loss. A row without a valid entry has
    // a NaN soft term and no soft gradient; 0 for ignored rows, NaN for a bad target or bad
    // teacher entries.
    let soft_value = select(count == 0, nan, params.t2 * div);
    let soft_scale = select(count == 0, zero, params.t2 * inv_t);
    let safe_class = select(live, target.class as usize, 0);
    let (first, fallback, factor) = (UNIT_POS_X == 0, select(target.skip, zero, nan), scale[0]);
    let weights = finish_row(
        student, s_base, safe_class, &stats, out, row, first, live, fallback, soft_value,
        soft_scale, &params, factor, div, zero, labeled,
    );
    if comptime!(spec.with_grad) {
        gradient_pass(
            student, out, s_base, g_base, live, safe_class, &entries, count, &stats, &weights,
            inv_t, tail, k,
        );
    }
}
