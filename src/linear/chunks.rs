//! The fused-linear loss chunk by chunk of kept rows, as tensor code on tensors without
//! autodiff, in named phases (the kept rows, each chunk's loss, the sums of the parts, the
//! student's gradients), and the materialised form it is held to.

use burn::tensor::{DType, Device, IndexingUpdateOp, Int, Tensor, TensorData, kind::Basic};

use crate::backend::{self, DistillParts};
use crate::{DistillParams, Reduction, SparseTeacher};

use super::{LinearSetup, Side};

type T<const D: usize> = Tensor<D>;
/// `(loss, soft, hard)` of a chunk, reduced or per row.
type Parts = (T<1>, T<1>, Option<T<1>>);

/// `c · tanh(z / c)`, and `tanh(z / c)` (for the gradient `1 − tanh²`), with a soft-cap `c`.
pub(crate) fn soft_cap(z: T<2>, cap: Option<f64>) -> (T<2>, Option<T<2>>) {
    match cap {
        Some(c) => {
            // `· (1/c)`, not `/ c`: burn's autodiff backpropagates `div_scalar` with `1/c`
            // rounded to f32 (0.21).
            let t = z.mul_scalar(c.recip()).tanh();
            (t.clone().mul_scalar(c), Some(t))
        }
        None => (z, None),
    }
}

/// `h W + b` for `[c, H]` hidden rows.
pub(crate) fn logits(hidden: T<2>, weight: &T<2>, bias: &Option<T<1>>) -> T<2> {
    let z = hidden.matmul(weight.clone());
    match bias {
        Some(b) => z + b.clone().unsqueeze_dim(0),
        None => z,
    }
}

/// The teacher of a chunked fused-linear loss: its rows are cut like the student's (the kept
/// rows, then chunks of them), and each chunk meets the student's `[c, V_s]` logits.
pub(crate) trait ChunkTeacher {
    /// The teacher as the device's host loop takes it (Flex).
    #[cfg(feature = "flex")]
    fn host(&self) -> backend::HostLinearTeacher;
    /// The loss's vocabulary for a student head of `vs` columns.
    fn aligned(&self, vs: usize) -> usize;
    /// The rows `index` (the kept rows, in order).
    fn keep(self, index: &Tensor<1, Int>) -> Self;
    /// The loss of the student's logits `zs` of kept rows `rows` against the teacher's, with
    /// the gradient `∂loss/∂zs` on the student's own vocabulary when `with_grad`: `None` where
    /// no fused kernel gives it (the caller materialises the logits).
    fn loss(
        &self,
        rows: core::ops::Range<usize>,
        zs: T<2>,
        targets: Option<Tensor<1, Int>>,
        params: &DistillParams,
        with_grad: bool,
    ) -> Option<(DistillParts, Option<T<2>>)>;
}

/// A dense teacher (hidden states and head): each chunk's logits, capped and aligned with the
/// student's by the vocabulary policy.
pub(crate) struct DenseChunks {
    side: Side,
    setup: LinearSetup,
}

impl DenseChunks {
    pub(crate) fn new(side: Side, setup: &LinearSetup) -> Self {
        Self {
            side,
            setup: *setup,
        }
    }
}

impl ChunkTeacher for DenseChunks {
    #[cfg(feature = "flex")]
    fn host(&self) -> backend::HostLinearTeacher {
        let s = &self.side;
        backend::HostLinearTeacher::Dense((s.hidden.clone(), s.weight.clone(), s.bias.clone()))
    }

    fn aligned(&self, vs: usize) -> usize {
        let vt = self.side.weight.dims()[1];
        let divergence = self.setup.params.divergence;
        // Checked by the loss before the chunks.
        (self.setup.vocab_mismatch)
            .aligned_width(vs, vt, divergence)
            .unwrap_or(vs)
    }

    fn keep(self, index: &Tensor<1, Int>) -> Self {
        Self {
            side: Side {
                hidden: self.side.hidden.select(0, index.clone()),
                ..self.side
            },
            ..self
        }
    }

    fn loss(
        &self,
        rows: core::ops::Range<usize>,
        zs: T<2>,
        targets: Option<Tensor<1, Int>>,
        params: &DistillParams,
        with_grad: bool,
    ) -> Option<(DistillParts, Option<T<2>>)> {
        let side = &self.side;
        let (zt, _) = soft_cap(
            logits(side.hidden.clone().slice(rows), &side.weight, &side.bias),
            self.setup.logit_softcap,
        );
        let vs = zs.dims()[1];
        let (zs, zt) = self
            .setup
            .vocab_mismatch
            .align(zs, zt, params.divergence)
            .unwrap_or_else(|e| panic!("burn-distill: {e} (checked before the chunks)"));
        let (parts, g) =
            backend::dense_chunk(zs, zt, targets, params, self.setup.kernel, with_grad)?;
        // Back to the student's `V_s` columns (the alignment truncated or padded them).
        Some((parts, g.map(|g| to_width(g, vs))))
    }
}

/// A sparse teacher's rows, cut like the student's.
pub(crate) struct SparseChunks {
    teacher: SparseTeacher<2>,
    setup: backend::SparseSetup,
}

impl SparseChunks {
    pub(crate) fn new(teacher: SparseTeacher<2>, setup: backend::SparseSetup) -> Self {
        Self { teacher, setup }
    }
}

impl ChunkTeacher for SparseChunks {
    #[cfg(feature = "flex")]
    fn host(&self) -> backend::HostLinearTeacher {
        let (indices, log_probs) = self.teacher.kernel_inputs();
        backend::HostLinearTeacher::Sparse(indices, log_probs, self.setup)
    }

    fn aligned(&self, vs: usize) -> usize {
        vs
    }

    fn keep(self, index: &Tensor<1, Int>) -> Self {
        let t = self.teacher;
        Self {
            teacher: SparseTeacher {
                indices: t.indices.select(0, index.clone()),
                log_probs: t.log_probs.select(0, index.clone()),
                mask: t.mask.map(|m| m.select(0, index.clone())),
            },
            ..self
        }
    }

    fn loss(
        &self,
        rows: core::ops::Range<usize>,
        zs: T<2>,
        targets: Option<Tensor<1, Int>>,
        params: &DistillParams,
        with_grad: bool,
    ) -> Option<(DistillParts, Option<T<2>>)> {
        let t = &self.teacher;
        let chunk = SparseTeacher {
            indices: t.indices.clone().slice(rows.clone()),
            log_probs: t.log_probs.clone().slice(rows.clone()),
            mask: t.mask.clone().map(|m| m.slice(rows)),
        };
        backend::sparse_chunk(
            zs,
            chunk.kernel_inputs(),
            targets,
            params,
            self.setup,
            with_grad,
        )
    }
}

/// `g` with `vs` columns: narrowed, or padded with zeros.
fn to_width(g: T<2>, vs: usize) -> T<2> {
    let [c, va] = g.dims();
    if va > vs {
        g.narrow(1, 0, vs)
    } else if va < vs {
        let zeros = Tensor::zeros([c, vs - va], (&g.device(), g.dtype()));
        Tensor::cat(vec![g, zeros], 1)
    } else {
        g
    }
}

/// The rows of a chunked loss that reach the matmuls: those whose target is not the ignore
/// index (one read of the targets to the host), or all `n` rows.
struct KeptRows {
    n: usize,
    /// The kept rows' indices; `None` when every row is kept.
    index: Option<Tensor<1, Int>>,
}

impl KeptRows {
    fn new(
        n: usize,
        targets: Option<&Tensor<1, Int>>,
        ignore_index: Option<i64>,
        device: &Device,
    ) -> Self {
        let index = match (targets, ignore_index) {
            (Some(t), Some(ignore)) => {
                let values: Vec<i64> = t.to_data().iter::<i64>().collect();
                let kept: Vec<i64> = (0..n as i64)
                    .filter(|&i| values[i as usize] != ignore)
                    .collect();
                (kept.len() < n).then(|| {
                    let len = kept.len();
                    Tensor::from_data(TensorData::new(kept, [len]), device)
                })
            }
            _ => None,
        };
        Self { n, index }
    }

    /// The kept rows of `t`.
    fn select<const D: usize, K: Basic>(&self, t: Tensor<D, K>) -> Tensor<D, K> {
        match &self.index {
            Some(i) => t.select(0, i.clone()),
            None => t,
        }
    }

    /// Values of the kept rows back at their rows of `[n, …]`, zero on the others.
    fn scatter<const D: usize>(&self, kept: T<D>) -> T<D> {
        match &self.index {
            Some(i) => {
                let mut dims = kept.dims();
                dims[0] = self.n;
                Tensor::zeros(dims, (&kept.device(), kept.dtype())).select_assign(
                    0,
                    i.clone(),
                    kept,
                    IndexingUpdateOp::Add,
                )
            }
            None => kept,
        }
    }
}

/// The loss parts of the chunks: summed (the per-chunk parameters already divide by the whole
/// batch's count), or kept per row for `Reduction::PerRow`.
struct PartSums {
    per_row: bool,
    sums: Option<Parts>,
    rows: Vec<Parts>,
}

impl PartSums {
    fn new(per_row: bool) -> Self {
        Self {
            per_row,
            sums: None,
            rows: Vec::new(),
        }
    }

    fn add(&mut self, parts: DistillParts) {
        let parts = (parts.loss, parts.soft, parts.hard);
        if self.per_row {
            self.rows.push(parts);
        } else {
            self.sums = Some(match self.sums.take() {
                None => parts,
                Some((l, s, hd)) => (
                    l + parts.0,
                    s + parts.1,
                    hd.zip(parts.2).map(|(a, b)| a + b),
                ),
            });
        }
    }

    /// The parts of the whole batch (rows of ignored targets 0 for `PerRow`), in `dtype`.
    fn finish(
        self,
        kept: &KeptRows,
        has_hard: bool,
        dtype: DType,
        device: &Device,
    ) -> DistillParts {
        let zero = |len: usize| Tensor::<1>::zeros([len], (device, dtype));
        let (l, s, hd) = if self.per_row {
            let cat = |f: &dyn Fn(&Parts) -> T<1>| {
                let kept_rows = if self.rows.is_empty() {
                    zero(0)
                } else {
                    Tensor::cat(self.rows.iter().map(f).collect(), 0)
                };
                kept.scatter(kept_rows)
            };
            (
                cat(&|r| r.0.clone()),
                cat(&|r| r.1.clone()),
                has_hard.then(|| cat(&|r| r.2.clone().expect("hard rows with targets"))),
            )
        } else {
            self.sums
                .unwrap_or_else(|| (zero(1), zero(1), has_hard.then(|| zero(1))))
        };
        DistillParts {
            loss: l,
            soft: s,
            hard: hd,
        }
    }
}

/// The student's gradients, formed chunk by chunk from `g = ∂loss/∂z_s` in the forward pass,
/// in the fused kernels' gradient dtype (f32 for f16 on CubeCL, so that a loss scale meets them
/// unrounded; the backward rounds once to each input's).
struct StudentGrads {
    /// `W_s` in the gradient dtype.
    weight: T<2>,
    has_bias: bool,
    setup: LinearSetup,
    hidden: Vec<T<2>>,
    grad_w: Option<T<2>>,
    grad_b: Option<T<1>>,
}

impl StudentGrads {
    fn new(weight: T<2>, has_bias: bool, setup: &LinearSetup) -> Self {
        Self {
            weight,
            has_bias,
            setup: *setup,
            hidden: Vec::new(),
            grad_w: None,
            grad_b: None,
        }
    }

    /// One chunk: `g` on the aligned vocabulary, the chunk's hidden rows `hs_c` and the cap's
    /// `tanh` of its logits.
    fn add(&mut self, g: T<2>, hs_c: T<2>, tanh_s: Option<T<2>>) {
        let gdt = self.weight.dtype();
        let wide = |t: T<2>| if t.dtype() == gdt { t } else { t.cast(gdt) };
        let g = wide(g);
        // Through the cap: `∂(c · tanh(z / c))/∂z = 1 − tanh²(z / c)`.
        let g = match tanh_s {
            Some(t) => g * wide((t.clone() * t).neg().add_scalar(1.0)),
            None => g,
        };
        // `g W_sᵀ` as `(W_s gᵀ)ᵀ`: backends whose matmul wants standard layouts (NdArray)
        // then copy the `[c, V]` chunk, not the `[H, V]` weight, for every chunk.
        self.hidden.push(
            self.weight
                .clone()
                .matmul(g.clone().transpose())
                .transpose(),
        );
        if self.setup.weight_grad {
            let gw = wide(hs_c).transpose().matmul(g.clone());
            self.grad_w = Some(match self.grad_w.take() {
                None => gw,
                Some(acc) => acc + gw,
            });
        }
        if self.has_bias && self.setup.bias_grad {
            // `1ᵀ g`, a product like `∂W`'s: no `[c, V]` temporary, and no reduce kernel
            // (burn 0.21's column `sum_dim(0)` on wgpu drops rows past about 65,532).
            let [c, v] = g.dims();
            let ones = Tensor::<2>::ones([1, c], (&g.device(), g.dtype()));
            let gb = ones.matmul(g).reshape([v]);
            self.grad_b = Some(match self.grad_b.take() {
                None => gb,
                Some(acc) => acc + gb,
            });
        }
    }

    /// The gradients of all `[n, H]` hidden rows (zero on ignored rows) and of the head.
    fn finish(self, kept: &KeptRows) -> LinearGrads {
        let [h, vs] = self.weight.dims();
        let (device, gdt) = (self.weight.device(), self.weight.dtype());
        let hidden = if self.hidden.is_empty() {
            Tensor::<2>::zeros([kept.n, h], (&device, gdt))
        } else {
            kept.scatter(Tensor::cat(self.hidden, 0))
        };
        LinearGrads {
            hidden,
            weight: self.setup.weight_grad.then(|| {
                self.grad_w
                    .unwrap_or_else(|| Tensor::zeros([h, vs], (&device, gdt)))
            }),
            bias: (self.has_bias && self.setup.bias_grad).then(|| {
                self.grad_b
                    .unwrap_or_else(|| Tensor::zeros([vs], (&device, gdt)))
            }),
        }
    }
}

/// The student's gradients of a chunked fused-linear loss, formed in the forward pass.
pub(crate) struct LinearGrads {
    /// `[N, H_s]` gradient of the hidden states (zero on ignored rows).
    pub hidden: T<2>,
    /// `[H_s, V_s]` gradient of the head's weight, unless the head is frozen.
    pub weight: Option<T<2>>,
    /// `[V_s]` gradient of the head's bias, if it has one and is trained.
    pub bias: Option<T<1>>,
}

/// The loss (and, with `with_grad`, the student's gradients) chunk by chunk, on tensors
/// without autodiff.
///
/// Ignored rows are dropped before the matmuls (one read of the targets to the host). Returns
/// `None` when a gradient is asked and no fused kernel gives a chunk's, or for
/// `Reduction::PerRow` with a gradient (each row's upstream weight is only known in the
/// backward pass); the caller then materialises the logits.
pub(crate) fn chunked(
    student: Side,
    teacher: impl ChunkTeacher,
    targets: Option<Tensor<1, Int>>,
    setup: &LinearSetup,
    with_grad: bool,
) -> Option<(DistillParts, Option<LinearGrads>)> {
    let params = setup.params;
    let per_row = params.reduction == Reduction::PerRow;
    if with_grad && per_row {
        return None;
    }
    let Side {
        hidden: hs,
        weight: ws,
        bias: bs,
    } = student;
    let device = hs.device();
    let has_hard = targets.is_some();

    let kept = KeptRows::new(hs.dims()[0], targets.as_ref(), params.ignore_index, &device);
    let hs_k = kept.select(hs.clone());
    let teacher = match &kept.index {
        Some(i) => teacher.keep(i),
        None => teacher,
    };
    let targets_k = targets.map(|t| kept.select(t));
    let m = hs_k.dims()[0];
    let chunk_params = crate::params::chunk_params(&params, m);

    // The gradients in f32 for f16 hidden states (the CubeCL kernels' gradient dtype, so that
    // a loss scale meets them unrounded; the backward rounds once to each input's).
    let gdt = if hs.dtype() == DType::F16 {
        DType::F32
    } else {
        hs.dtype()
    };
    let mut sums = PartSums::new(per_row);
    let ws_g = if ws.dtype() == gdt {
        ws.clone()
    } else {
        ws.clone().cast(gdt)
    };
    let mut grads = StudentGrads::new(ws_g, bs.is_some(), setup);
    let chunk = setup.chunk_rows.max(1);
    let mut loss_dtype = hs.dtype();
    for r0 in (0..m).step_by(chunk) {
        let r1 = (r0 + chunk).min(m);
        let hs_c = hs_k.clone().slice(r0..r1);
        let (zs, tanh_s) = soft_cap(logits(hs_c.clone(), &ws, &bs), setup.logit_softcap);
        let y = targets_k.clone().map(|t| t.slice(r0..r1));
        let (parts, g) = teacher.loss(r0..r1, zs, y, &chunk_params, with_grad)?;
        loss_dtype = parts.loss.dtype();
        sums.add(parts);
        if let Some(g) = g {
            grads.add(g, hs_c, tanh_s);
        }
    }
    let parts = sums.finish(&kept, has_hard, loss_dtype, &device);
    // Counted once the chunks gave the loss (not where a chunk sent the caller to the
    // materialised logits).
    CHUNKED_CALLS.with(|calls| calls.set(calls.get() + 1));
    Some((parts, with_grad.then(|| grads.finish(&kept))))
}

thread_local! {
    /// Runs of the chunk loop that gave the loss, on this thread (for the tests: that the
    /// fused path ran).
    pub(crate) static CHUNKED_CALLS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}
