//! The fused-linear loss on host slices (NdArray, Flex): the student's LM head, a fused row
//! kernel against the teacher's chunk and the student's gradients, chunk by chunk of rows, in
//! buffers allocated once per call.
//!
//! Per chunk of `c` kept rows (gathered, so ignored rows never reach a matmul):
//!
//! - `z_s = h_s W_s + b_s` into a `[c, V]` buffer (soft-capped, `c · tanh(z / c)`, and aligned
//!   to the loss's vocabulary in place);
//! - the teacher's chunk ([`HostChunkTeacher`]): a dense teacher forms `z_t = h_t W_t + b_t` in
//!   a second `[c, V]` buffer and runs the dense row kernel of [`super::cpu`]; a sparse one
//!   gathers its `[c, k]` entries and runs the sparse row kernel of [`super::sparse_cpu`].
//!   Either writes `g = ∂loss/∂z_s` into a `[c, V]` gradient buffer (times `1 − tanh²(z_s / c)`
//!   under a cap, recovered from the capped `z_s`);
//! - `∂h_s = g W_sᵀ`, `∂W_s += h_sᵀ g` (one GEMM accumulating in place, `β = 1`: no `[H, V]`
//!   temporary per chunk; none at all for a frozen head), `∂b_s += Σ_rows g`.
//!
//! GEMMs are `matrixmultiply`'s (NdArray's own), on strided views: the transposes are strides,
//! never copies. Extra memory: two `[c, V]` buffers (three with a dense teacher), `[c, H]` ones,
//! and the gradients.

use rayon::prelude::*;

use super::cpu::{self, RowOut, zeroed_grad};
use super::real::Real;
use super::sparse_cpu::{self, HostTeacher};
use crate::{DistillParams, TailPolicy};

/// A float with a general matrix product (`matrixmultiply`'s `sgemm` / `dgemm`).
pub trait Gemm: Real {
    /// `C ← A B + β C` on strided views (`C` row-major with unit column stride).
    fn gemm(a: View<'_, Self>, b: View<'_, Self>, beta: Self, c: ViewMut<'_, Self>);
}

/// The layout of a strided `[rows, cols]` matrix in a slice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl Layout {
    /// The first `cols` columns of `rows` rows `row_stride` apart, checked to lie within `len`
    /// elements and not to overlap.
    fn row_major(rows: usize, cols: usize, row_stride: usize, len: usize) -> Self {
        assert!(
            cols <= row_stride || rows <= 1,
            "rows of the matrix overlap"
        );
        if rows > 0 && cols > 0 {
            assert!(
                (rows - 1) * row_stride + cols <= len,
                "matrix view out of its slice"
            );
        }
        Self {
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose (strides swapped: the same elements).
    fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
}

/// A strided `[rows, cols]` matrix in a slice: read (`D = &[R]`, [`View`]) or written
/// (`D = &mut [R]`, [`ViewMut`]).
#[derive(Clone, Copy, Debug)]
pub struct Matrix<D> {
    data: D,
    layout: Layout,
}

/// A matrix read from a slice.
pub type View<'a, R> = Matrix<&'a [R]>;
/// A matrix written in a slice.
pub type ViewMut<'a, R> = Matrix<&'a mut [R]>;

impl<D> Matrix<D> {
    /// The first `cols` columns of a row-major matrix whose rows are `row_stride` apart.
    pub fn row_major<R>(data: D, rows: usize, cols: usize, row_stride: usize) -> Self
    where
        D: AsRef<[R]>,
    {
        let layout = Layout::row_major(rows, cols, row_stride, data.as_ref().len());
        Self { data, layout }
    }

    /// The transpose (nothing copied).
    pub fn t(self) -> Self {
        Self {
            layout: self.layout.t(),
            ..self
        }
    }
}

/// `C ← A B + β C`, as the transposed problem `Cᵀ ← Bᵀ Aᵀ + β Cᵀ` when `B` is the larger
/// operand: `matrixmultiply` packs `A` in blocks across its threads but `B` on one thread, so
/// the large head weight goes where the packing is parallel.
pub fn gemm<R: Gemm>(a: View<'_, R>, b: View<'_, R>, beta: R, c: ViewMut<'_, R>) {
    let size = |l: Layout| l.rows * l.cols;
    if size(b.layout) > size(a.layout) {
        R::gemm(b.t(), a.t(), beta, c.t());
    } else {
        R::gemm(a, b, beta, c);
    }
}

macro_rules! gemm_impl {
    ($ty:ty, $f:path) => {
        impl Gemm for $ty {
            fn gemm(a: View<'_, Self>, b: View<'_, Self>, beta: Self, c: ViewMut<'_, Self>) {
                let (la, lb, lc) = (a.layout, b.layout, c.layout);
                assert!(
                    la.rows == lc.rows && lb.cols == lc.cols && la.cols == lb.rows,
                    "gemm shapes: {la:?} × {lb:?} into {lc:?}"
                );
                if lc.rows == 0 || lc.cols == 0 {
                    return;
                }
                // SAFETY: every layout was checked against its slice when built (every
                // element it addresses lies inside, its rows do not overlap; transposing keeps
                // the same elements); `c` is borrowed mutably, so it aliases neither `a` nor
                // `b`.
                unsafe {
                    $f(
                        la.rows,
                        la.cols,
                        lb.cols,
                        1.0,
                        a.data.as_ptr(),
                        la.row_stride as isize,
                        la.col_stride as isize,
                        b.data.as_ptr(),
                        lb.row_stride as isize,
                        lb.col_stride as isize,
                        beta,
                        c.data.as_mut_ptr(),
                        lc.row_stride as isize,
                        lc.col_stride as isize,
                    )
                }
            }
        }
    };
}
gemm_impl!(f32, matrixmultiply::sgemm);
gemm_impl!(f64, matrixmultiply::dgemm);

/// One side of the loss on the host: `[N, H]` hidden states, an `[H, V]` head, a `[V]` bias.
#[derive(Clone, Copy, Debug)]
pub struct HostSide<'a, R> {
    /// `[N, H]` row-major hidden states.
    pub hidden: &'a [R],
    /// `[H, V]` row-major weight.
    pub weight: &'a [R],
    /// `[V]` bias.
    pub bias: Option<&'a [R]>,
    /// `H`.
    pub width: usize,
    /// `V`.
    pub vocab: usize,
}

/// How the chunks run.
#[derive(Clone, Copy, Debug)]
pub struct HostPlan<'a> {
    /// The rows to compute, in order (ignored rows left out).
    pub kept: &'a [usize],
    /// Every row's target, if any (indexed by row, not by kept position).
    pub targets: Option<&'a [i64]>,
    /// The loss parameters; their reduction's factor scales the gradient.
    pub params: &'a DistillParams,
    /// The common vocabulary of both sides' logits: columns past a side's own `V` are `−∞`
    /// (padding), a side's columns past it are dropped (truncation).
    pub aligned: usize,
    /// Logit soft-cap `c`.
    pub cap: Option<f64>,
    /// Rows per chunk (at least 1).
    pub chunk: usize,
    /// Are the student's gradients computed?
    pub with_grad: bool,
    /// With `with_grad`: is the head weight's gradient computed (the `[H, V]` GEMMs)?
    pub weight_grad: bool,
    /// With `with_grad`: is the bias's gradient computed?
    pub bias_grad: bool,
}

/// The student's gradients: `[N, H_s]` hidden (zero on rows left out), `[H_s, V_s]` weight,
/// `[V_s]` bias.
#[derive(Debug)]
pub struct HostGrads<R> {
    /// `∂loss/∂h_s`.
    pub hidden: Vec<R>,
    /// `∂loss/∂W_s`, unless `plan.weight_grad` is false.
    pub weight: Option<Vec<R>>,
    /// `∂loss/∂b_s`, if the head has a bias.
    pub bias: Option<Vec<R>>,
}

/// The teacher of the host loop: for one chunk of kept rows, the row outputs against the
/// student's `[c, aligned]` logits and, when asked, `∂loss/∂z_s` written into every entry of
/// `grad`.
pub trait HostChunkTeacher<R: Real> {
    /// The chunk's rows against the student's logits, the gradient written into `grad`.
    fn rows(&mut self, chunk: Chunk<'_, R>, grad: Option<&mut [R]>) -> Vec<RowOut<R>>;
}

/// One chunk of the host loop: the rows `kept` (row indices of the batch), the student's
/// `[c, aligned]` logits `zs` of those rows, their targets and the chunk's parameters.
#[derive(Clone, Copy)]
pub struct Chunk<'a, R> {
    /// Row indices of the batch.
    pub kept: &'a [usize],
    /// `[c, aligned]` student logits.
    pub zs: &'a [R],
    /// The loss's vocabulary width.
    pub aligned: usize,
    /// `[c]` targets.
    pub targets: Option<&'a [i64]>,
    /// The parameters (the reduction's factor over all kept rows).
    pub params: &'a DistillParams,
}

/// A dense teacher on the host: its hidden states and head, each chunk's logits formed (capped
/// and aligned like the student's) in a buffer reused across chunks, then the dense row kernel.
pub struct DenseHostTeacher<'a, R> {
    side: HostSide<'a, R>,
    cap: Option<f64>,
    hidden: Vec<R>,
    logits: Vec<R>,
}

impl<'a, R: Real> DenseHostTeacher<'a, R> {
    /// The teacher `side`, its logits capped at `cap`.
    pub fn new(side: HostSide<'a, R>, cap: Option<f64>) -> Self {
        Self {
            side,
            cap,
            hidden: Vec::new(),
            logits: Vec::new(),
        }
    }
}

impl<R: Gemm> HostChunkTeacher<R> for DenseHostTeacher<'_, R> {
    fn rows(&mut self, chunk: Chunk<'_, R>, grad: Option<&mut [R]>) -> Vec<RowOut<R>> {
        let (kept, aligned) = (chunk.kept, chunk.aligned);
        let (c, width) = (kept.len(), self.side.width);
        grow(&mut self.hidden, c * width);
        grow(&mut self.logits, c * aligned);
        let hidden = &mut self.hidden[..c * width];
        gather(self.side.hidden, width, kept, hidden);
        let zt = &mut self.logits[..c * aligned];
        logits(&self.side, hidden, aligned, self.cap, zt);
        cpu::distill_rows_into(chunk.zs, zt, aligned, chunk.targets, chunk.params, grad).0
    }
}

/// A sparse teacher on the host (`[N, k]` entries): each chunk's rows gathered into buffers
/// reused across chunks, then the sparse row kernel.
pub struct SparseHostTeacher<'a> {
    teacher: HostTeacher<'a>,
    setup: (TailPolicy, f64),
    indices: Vec<i64>,
    log_probs: Vec<f64>,
    valid: Vec<bool>,
}

impl<'a> SparseHostTeacher<'a> {
    /// The teacher's entries with the loss's `(tail, generation_temperature)`.
    pub fn new(teacher: HostTeacher<'a>, setup: (TailPolicy, f64)) -> Self {
        Self {
            teacher,
            setup,
            indices: Vec::new(),
            log_probs: Vec::new(),
            valid: Vec::new(),
        }
    }
}

impl<R: Real> HostChunkTeacher<R> for SparseHostTeacher<'_> {
    fn rows(&mut self, chunk: Chunk<'_, R>, grad: Option<&mut [R]>) -> Vec<RowOut<R>> {
        let k = self.teacher.k;
        let (indices, log_probs, valid) = (&mut self.indices, &mut self.log_probs, &mut self.valid);
        indices.clear();
        log_probs.clear();
        valid.clear();
        for &i in chunk.kept {
            let entries = i * k..(i + 1) * k;
            indices.extend_from_slice(&self.teacher.indices[entries.clone()]);
            log_probs.extend_from_slice(&self.teacher.log_probs[entries.clone()]);
            valid.extend_from_slice(&self.teacher.valid[entries]);
        }
        let teacher = HostTeacher {
            k,
            indices,
            log_probs,
            valid,
        };
        let Chunk {
            zs,
            aligned,
            targets,
            params,
            ..
        } = chunk;
        sparse_cpu::sparse_rows_into(zs, aligned, &teacher, targets, params, self.setup, grad).0
    }
}

/// `buffer` at least `len` long (grown once, to the largest chunk).
fn grow<R: Real>(buffer: &mut Vec<R>, len: usize) {
    if buffer.len() < len {
        buffer.resize(len, R::ZERO);
    }
}

thread_local! {
    /// Calls of the fused-linear host loop on this thread (a test hook: the tests check that
    /// NdArray and Flex run it, since every fallback gives the same values).
    pub(crate) static HOST_LINEAR_CALLS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}
/// The fused-linear loss on host slices: the outputs of the kept rows (in `plan.kept` order)
/// and, with `plan.with_grad`, the student's gradients of the reduced loss.
pub fn linear_rows<R: Gemm>(
    student: HostSide<'_, R>,
    teacher: &mut impl HostChunkTeacher<R>,
    plan: &HostPlan<'_>,
) -> (Vec<RowOut<R>>, Option<HostGrads<R>>) {
    HOST_LINEAR_CALLS.with(|calls| calls.set(calls.get() + 1));
    let (va, m) = (plan.aligned, plan.kept.len());
    let chunk = plan.chunk.clamp(1, m.max(1));
    let mut zs = zeroed_grad::<R>(chunk * va);
    let mut g = if plan.with_grad {
        zeroed_grad::<R>(chunk * va)
    } else {
        Vec::new()
    };
    let mut hs = vec![R::ZERO; chunk * student.width];
    let mut dh = vec![
        R::ZERO;
        if plan.with_grad {
            chunk * student.width
        } else {
            0
        }
    ];
    let mut grads = plan.with_grad.then(|| HostGrads {
        hidden: vec![R::ZERO; student.hidden.len()],
        weight: plan
            .weight_grad
            .then(|| zeroed_grad::<R>(student.width * student.vocab)),
        bias: student
            .bias
            .filter(|_| plan.bias_grad)
            .map(|b| vec![R::ZERO; b.len()]),
    });
    // The student's columns that reach the loss.
    let vs = student.vocab.min(va);
    let mut rows = Vec::with_capacity(m);
    let mut targets = Vec::with_capacity(chunk);
    for (index, kept) in plan.kept.chunks(chunk).enumerate() {
        let c = kept.len();
        let zs = &mut zs[..c * va];
        gather(student.hidden, student.width, kept, &mut hs);
        logits(&student, &hs[..c * student.width], va, plan.cap, zs);
        targets.clear();
        if let Some(t) = plan.targets {
            targets.extend(kept.iter().map(|&i| t[i]));
        }
        let chunk = Chunk {
            kept,
            zs,
            aligned: va,
            targets: plan.targets.map(|_| targets.as_slice()),
            params: plan.params,
        };
        let Some(grads) = grads.as_mut() else {
            rows.extend(teacher.rows(chunk, None));
            continue;
        };
        let g = &mut g[..c * va];
        rows.extend(teacher.rows(chunk, Some(g)));
        if let Some(cap) = plan.cap {
            // `∂(c · tanh(z / c))/∂z = 1 − tanh²(z / c)`, with `tanh(z / c)` = capped `z` / c.
            let inv = R::of(cap.recip());
            g.par_chunks_mut(va)
                .zip(zs.par_chunks(va))
                .for_each(|(g, z)| {
                    for (g, &z) in g[..vs].iter_mut().zip(&z[..vs]) {
                        let t = z * inv;
                        // At least 0: in f32, `t` can round to just past ±1 when saturated.
                        *g = *g * (R::ONE - t * t).max(R::ZERO);
                    }
                });
        }
        let g = View::row_major(&*g, c, vs, va);
        student_grads(
            &student,
            &hs[..c * student.width],
            kept,
            g,
            index == 0,
            &mut dh,
            grads,
        );
    }
    (rows, grads)
}

/// One chunk's share of the student's gradients from `g = ∂loss/∂z_s` (`[c, V_s]`): `∂h = g Wᵀ`
/// into the kept rows, `∂W += hᵀ g` in place (overwritten on the `first` chunk; no `[H, V]`
/// product at all for a frozen or tied head), `∂b += Σ_rows g`.
fn student_grads<R: Gemm>(
    student: &HostSide<'_, R>,
    hs: &[R],
    kept: &[usize],
    g: View<'_, R>,
    first: bool,
    dh: &mut [R],
    grads: &mut HostGrads<R>,
) {
    let (c, width) = (kept.len(), student.width);
    let vs = g.layout.cols;
    let w = View::row_major(student.weight, width, vs, student.vocab);
    let dh_c = ViewMut::row_major(&mut dh[..c * width], c, width, width);
    gemm(g, w.t(), R::ZERO, dh_c);
    for (&i, row) in kept.iter().zip(dh.chunks(width)) {
        grads.hidden[i * width..(i + 1) * width].copy_from_slice(row);
    }
    if let Some(weight) = grads.weight.as_mut() {
        let h = View::row_major(hs, c, width, width);
        let dw = ViewMut::row_major(weight, width, vs, student.vocab);
        gemm(h.t(), g, if first { R::ZERO } else { R::ONE }, dw);
    }
    if let Some(db) = grads.bias.as_mut() {
        const BLOCK: usize = 1024;
        let stride = g.layout.row_stride;
        db[..vs]
            .par_chunks_mut(BLOCK)
            .enumerate()
            .for_each(|(block, acc)| {
                let start = block * BLOCK;
                for r in 0..c {
                    let row = &g.data[r * stride + start..r * stride + start + acc.len()];
                    for (a, &x) in acc.iter_mut().zip(row) {
                        *a = *a + x;
                    }
                }
            });
    }
}

/// Rows `kept` of an `[N, width]` matrix, packed into `out`.
fn gather<R: Real>(matrix: &[R], width: usize, kept: &[usize], out: &mut [R]) {
    for (&i, row) in kept.iter().zip(out.chunks_mut(width)) {
        row.copy_from_slice(&matrix[i * width..(i + 1) * width]);
    }
}

/// `z = h W + b` for `c` packed hidden rows, soft-capped, into `[c, aligned]` rows: the side's
/// first `min(V, aligned)` columns, then `−∞` padding.
fn logits<R: Gemm>(
    side: &HostSide<'_, R>,
    hidden: &[R],
    aligned: usize,
    cap: Option<f64>,
    z: &mut [R],
) {
    let c = hidden.len() / side.width;
    let v = side.vocab.min(aligned);
    let h = View::row_major(hidden, c, side.width, side.width);
    let w = View::row_major(side.weight, side.width, v, side.vocab);
    gemm(h, w, R::ZERO, ViewMut::row_major(z, c, v, aligned));
    if side.bias.is_none() && cap.is_none() && v == aligned {
        return;
    }
    z.par_chunks_mut(aligned).for_each(|row| {
        let (row, pad) = row.split_at_mut(v);
        if let Some(b) = side.bias {
            for (z, &b) in row.iter_mut().zip(b) {
                *z = *z + b;
            }
        }
        if let Some(c) = cap {
            for z in row.iter_mut() {
                *z = R::of(c * (z.to_f64() / c).tanh());
            }
        }
        pad.fill(R::NEG_INFINITY);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `A B` by the definition, for the GEMM views.
    fn naive(a: &[f64], b: &[f64], [m, k, n]: [usize; 3]) -> Vec<f64> {
        (0..m * n)
            .map(|ij| (0..k).map(|p| a[ij / n * k + p] * b[p * n + ij % n]).sum())
            .collect()
    }

    /// `A` (`[m, k]`, `sin` of a ramp of step `sa`), `B` (`[k, n]`, `cos`, step `sb`) and
    /// `A B`.
    fn problem([m, k, n]: [usize; 3], [sa, sb]: [f64; 2]) -> [Vec<f64>; 3] {
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * sa).sin()).collect();
        let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * sb).cos()).collect();
        let want = naive(&a, &b, [m, k, n]);
        [a, b, want]
    }

    #[test]
    fn gemm_views_follow_their_strides() {
        let (m, k, n) = (3, 5, 4);
        let [a, b, want] = problem([m, k, n], [0.7, 1.3]);
        // Plain, then `Aᵀᵀ` through a transposed copy, accumulating (β = 1) on top of `A B`.
        let mut c = vec![0.0; m * n];
        f64::gemm(
            View::row_major(&a, m, k, k),
            View::row_major(&b, k, n, n),
            0.0,
            ViewMut::row_major(&mut c, m, n, n),
        );
        let at: Vec<f64> = (0..k * m).map(|i| a[i % m * k + i / m]).collect();
        f64::gemm(
            View::row_major(&at, k, m, m).t(),
            View::row_major(&b, k, n, n),
            1.0,
            ViewMut::row_major(&mut c, m, n, n),
        );
        for (c, w) in c.iter().zip(&want) {
            assert!((c - 2.0 * w).abs() < 1e-12, "{c} vs {}", 2.0 * w);
        }
        // The first 2 columns of B into a wider output: the rest of each row is untouched.
        let mut c = vec![7.0; m * 6];
        f64::gemm(
            View::row_major(&a, m, k, k),
            View::row_major(&b, k, 2, n),
            0.0,
            ViewMut::row_major(&mut c, m, 2, 6),
        );
        for i in 0..m {
            for j in 0..6 {
                let want = if j < 2 { want[i * n + j] } else { 7.0 };
                assert!((c[i * 6 + j] - want).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn gemm_runs_the_transposed_problem_when_b_is_larger() {
        // `B` larger than `A`: computed as `Cᵀ = Bᵀ Aᵀ` into the transposed output view, with
        // `β = 1` on a strided output (row stride 9 for 7 columns).
        let (m, k, n) = (2, 3, 7);
        let [a, b, want] = problem([m, k, n], [0.9, 0.4]);
        let mut c = vec![1.0; m * 9];
        gemm(
            View::row_major(&a, m, k, k),
            View::row_major(&b, k, n, n),
            1.0,
            ViewMut::row_major(&mut c, m, n, 9),
        );
        for i in 0..m {
            for j in 0..9 {
                let want = if j < n { 1.0 + want[i * n + j] } else { 1.0 };
                assert!((c[i * 9 + j] - want).abs() < 1e-12, "{i},{j}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "matrix view out of its slice")]
    fn views_past_their_slice_are_refused() {
        let data = [0.0f32; 5];
        View::row_major(&data, 2, 3, 3);
    }
}
