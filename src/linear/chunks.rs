//! The backend-generic fused-linear loss: burn tensor ops chunk by chunk of kept rows, in named
//! phases (the kept rows, each chunk's loss, the sums of the parts, the student's gradients),
//! and the materialised form it is held to.

use burn::tensor::{
    BasicOps, IndexingUpdateOp, Int, Tensor, TensorData, TensorPrimitive, backend::Backend,
    ops::FloatTensor,
};

use crate::{DenseCall, KernelCall, LinearCall};
use crate::{DistillBackend, DistillParams, DistillParts, FusedOutput, Kernel, Reduction};

use super::{LinearGrads, LinearOutput, LinearSetup, LinearSide};

type T<B, const D: usize> = Tensor<B, D>;
/// `(loss, soft, hard)` of a chunk, reduced or per row.
type Parts<B> = (T<B, 1>, T<B, 1>, Option<T<B, 1>>);

/// A float primitive as a tensor.
pub(crate) fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// `c · tanh(z / c)`, and `tanh(z / c)` (for the gradient `1 − tanh²`), with a soft-cap `c`.
pub(crate) fn soft_cap<B: Backend>(z: T<B, 2>, cap: Option<f64>) -> (T<B, 2>, Option<T<B, 2>>) {
    match cap {
        Some(c) => {
            // `· (1/c)`, not `/ c`: burn-autodiff 0.21 backpropagates `div_scalar` with `1/c`
            // rounded to f32.
            let t = z.mul_scalar(c.recip()).tanh();
            (t.clone().mul_scalar(c), Some(t))
        }
        None => (z, None),
    }
}

/// `h W + b` for `[c, H]` hidden rows.
pub(crate) fn logits<B: Backend>(
    hidden: T<B, 2>,
    weight: &T<B, 2>,
    bias: &Option<T<B, 1>>,
) -> T<B, 2> {
    let z = hidden.matmul(weight.clone());
    match bias {
        Some(b) => z + b.clone().unsqueeze_dim(0),
        None => z,
    }
}

/// The fused-linear loss's chunks on a backend: its fused-linear kernel (the host loop of
/// NdArray and Flex) where it has one, [`chunked`] otherwise.
pub(crate) struct Chunks;

impl crate::LinearRun for Chunks {
    fn run<B: DistillBackend>(
        &self,
        call: LinearCall<B>,
    ) -> Result<Option<LinearOutput<B>>, crate::DistillError> {
        Ok(B::distill_linear_chunked(call.clone()).or_else(|| chunked::<B>(call)))
    }
}

/// The loss (and, with `with_grad`, the student's gradients) chunk by chunk on backend `B`.
///
/// Ignored rows are dropped before the matmuls (one read of the targets to the host). Returns
/// `None` when a gradient is asked and `B` has no fused kernel for the logits, or for
/// `Reduction::PerRow` with a gradient (each row's upstream weight is only known in the
/// backward pass); the caller then materialises the logits.
pub(crate) fn chunked<B: DistillBackend>(call: LinearCall<B>) -> Option<LinearOutput<B>> {
    let setup = call.settings;
    let chunk_loss = |chunk: DenseCall<B>| {
        let fused = setup.kernel != Kernel::Reference
            && B::has_fused_kernel(&chunk.student, &chunk.teacher);
        Ok::<_, std::convert::Infallible>(if fused {
            B::distill_fused(chunk)
        } else if chunk.with_grad {
            None
        } else {
            let parts = B::distill_loss(
                chunk.student,
                chunk.teacher,
                chunk.targets,
                &chunk.settings,
                Kernel::Reference,
            );
            Some(FusedOutput { parts, grad: None })
        })
    };
    let call = call.map(|s, t, y| (s, DenseChunks::new(t, &setup), y));
    match chunked_with(call, chunk_loss) {
        Ok(out) => out,
        Err(never) => match never {},
    }
}

/// The teacher of a chunked fused-linear loss: its rows are cut like the student's (the kept
/// rows, then chunks of them), and each chunk meets the student's `[c, V_s]` logits.
pub(crate) trait ChunkTeacher<B: Backend> {
    /// What the loss of one chunk takes from the teacher.
    type Chunk;
    /// The rows `index` (the kept rows, in order).
    fn keep(self, index: &Tensor<B, 1, Int>) -> Self;
    /// Kept rows `rows` against the student's logits `zs` of those rows: the student's
    /// logits brought to the loss's vocabulary, and the teacher's chunk.
    fn chunk(&self, rows: core::ops::Range<usize>, zs: T<B, 2>) -> (T<B, 2>, Self::Chunk);
}

/// A dense teacher (hidden states and head): each chunk's logits, capped and aligned with the
/// student's by the vocabulary policy.
pub(crate) struct DenseChunks<B: Backend> {
    hidden: T<B, 2>,
    weight: T<B, 2>,
    bias: Option<T<B, 1>>,
    setup: LinearSetup,
}

impl<B: Backend> DenseChunks<B> {
    pub(crate) fn new(teacher: LinearSide<B>, setup: &LinearSetup) -> Self {
        Self {
            hidden: float::<B, 2>(teacher.hidden),
            weight: float::<B, 2>(teacher.weight),
            bias: teacher.bias.map(float::<B, 1>),
            setup: *setup,
        }
    }
}

impl<B: Backend> ChunkTeacher<B> for DenseChunks<B> {
    type Chunk = FloatTensor<B>;

    fn keep(self, index: &Tensor<B, 1, Int>) -> Self {
        Self {
            hidden: self.hidden.select(0, index.clone()),
            ..self
        }
    }

    fn chunk(&self, rows: core::ops::Range<usize>, zs: T<B, 2>) -> (T<B, 2>, FloatTensor<B>) {
        let (zt, _) = soft_cap(
            logits(self.hidden.clone().slice(rows), &self.weight, &self.bias),
            self.setup.logit_softcap,
        );
        let (zs, zt) = self
            .setup
            .vocab_mismatch
            .align(zs, zt, self.setup.params.divergence)
            .unwrap_or_else(|e| panic!("burn-distill: {e} (checked before the chunks)"));
        (zs, zt.into_primitive().tensor())
    }
}

/// The rows of a chunked loss that reach the matmuls: those whose target is not the ignore
/// index (one read of the targets to the host), or all `n` rows.
struct KeptRows<B: Backend> {
    n: usize,
    /// The kept rows' indices; `None` when every row is kept.
    index: Option<Tensor<B, 1, Int>>,
}

impl<B: Backend> KeptRows<B> {
    fn new(
        n: usize,
        targets: Option<&Tensor<B, 1, Int>>,
        ignore_index: Option<i64>,
        device: &B::Device,
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
    fn select<const D: usize, K: BasicOps<B>>(&self, t: Tensor<B, D, K>) -> Tensor<B, D, K> {
        match &self.index {
            Some(i) => t.select(0, i.clone()),
            None => t,
        }
    }

    /// Values of the kept rows back at their rows of `[n, …]`, zero on the others.
    fn scatter<const D: usize>(&self, kept: T<B, D>) -> T<B, D> {
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
struct PartSums<B: Backend> {
    per_row: bool,
    sums: Option<Parts<B>>,
    rows: Vec<Parts<B>>,
}

impl<B: Backend> PartSums<B> {
    fn new(per_row: bool) -> Self {
        Self {
            per_row,
            sums: None,
            rows: Vec::new(),
        }
    }

    fn add(&mut self, parts: DistillParts<B>) {
        let parts = (
            float::<B, 1>(parts.loss),
            float::<B, 1>(parts.soft),
            parts.hard.map(float::<B, 1>),
        );
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
        kept: &KeptRows<B>,
        has_hard: bool,
        dtype: burn::tensor::DType,
        device: &B::Device,
    ) -> DistillParts<B> {
        let zero = |len: usize| Tensor::<B, 1>::zeros([len], (device, dtype));
        let (l, s, hd) = if self.per_row {
            let cat = |f: &dyn Fn(&Parts<B>) -> T<B, 1>| {
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
            loss: l.into_primitive().tensor(),
            soft: s.into_primitive().tensor(),
            hard: hd.map(|t| t.into_primitive().tensor()),
        }
    }
}

/// The student's gradients, formed chunk by chunk from `g = ∂loss/∂z_s` in the forward pass,
/// in the fused kernels' gradient dtype (f32 for f16 on CubeCL, so that a loss scale meets them
/// unrounded; the backward rounds once to each input's).
struct StudentGrads<B: Backend> {
    /// `W_s` in the gradient dtype.
    weight: T<B, 2>,
    has_bias: bool,
    setup: LinearSetup,
    hidden: Vec<T<B, 2>>,
    grad_w: Option<T<B, 2>>,
    grad_b: Option<T<B, 1>>,
}

impl<B: Backend> StudentGrads<B> {
    fn new(weight: T<B, 2>, has_bias: bool, setup: &LinearSetup) -> Self {
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
    fn add(&mut self, g: FloatTensor<B>, hs_c: T<B, 2>, tanh_s: Option<T<B, 2>>) {
        let gdt = self.weight.dtype();
        let wide = |t: T<B, 2>| if t.dtype() == gdt { t } else { t.cast(gdt) };
        // Back to the student's `V_s` columns (the alignment truncated or padded them).
        let g = float::<B, 2>(g).cast(gdt);
        let (va, vs) = (g.dims()[1], self.weight.dims()[1]);
        let g = if va > vs {
            g.narrow(1, 0, vs)
        } else if va < vs {
            let zeros = Tensor::zeros([g.dims()[0], vs - va], (&g.device(), gdt));
            Tensor::cat(vec![g, zeros], 1)
        } else {
            g
        };
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
            let ones = Tensor::<B, 2>::ones([1, c], (&g.device(), g.dtype()));
            let gb = ones.matmul(g).reshape([v]);
            self.grad_b = Some(match self.grad_b.take() {
                None => gb,
                Some(acc) => acc + gb,
            });
        }
    }

    /// The gradients of all `[n, H]` hidden rows (zero on ignored rows) and of the head.
    fn finish(self, kept: &KeptRows<B>) -> LinearGrads<B> {
        let [h, vs] = self.weight.dims();
        let (device, gdt) = (self.weight.device(), self.weight.dtype());
        let hidden = if self.hidden.is_empty() {
            Tensor::<B, 2>::zeros([kept.n, h], (&device, gdt))
        } else {
            kept.scatter(Tensor::cat(self.hidden, 0))
        };
        LinearGrads {
            hidden: hidden.into_primitive().tensor(),
            weight: self.setup.weight_grad.then(|| {
                self.grad_w
                    .unwrap_or_else(|| Tensor::zeros([h, vs], (&device, gdt)))
                    .into_primitive()
                    .tensor()
            }),
            bias: (self.has_bias && self.setup.bias_grad).then(|| {
                self.grad_b
                    .unwrap_or_else(|| Tensor::zeros([vs], (&device, gdt)))
                    .into_primitive()
                    .tensor()
            }),
        }
    }
}

/// [`chunked`] with the loss of each chunk's `[c, V]` student logits against the teacher's
/// chunk given by `chunk_loss(call)` (its gradient asked for when `call.with_grad`): `Ok(None)`
/// where it cannot (the caller then materialises the logits), `Err` to stop.
pub(crate) fn chunked_with<B: DistillBackend, E, C: ChunkTeacher<B>>(
    call: KernelCall<B, LinearSide<B>, C, LinearSetup>,
    mut chunk_loss: impl FnMut(
        KernelCall<B, FloatTensor<B>, C::Chunk, DistillParams>,
    ) -> Result<Option<FusedOutput<B>>, E>,
) -> Result<Option<LinearOutput<B>>, E> {
    let (student, teacher) = (call.student, call.teacher);
    let (setup, with_grad) = (&call.settings, call.with_grad);
    let params = setup.params;
    let per_row = params.reduction == Reduction::PerRow;
    if with_grad && per_row {
        return Ok(None);
    }
    let (hs, ws) = (float::<B, 2>(student.hidden), float::<B, 2>(student.weight));
    let bs = student.bias.map(float::<B, 1>);
    let device = hs.device();
    let targets = call.targets.map(Tensor::<B, 1, Int>::from_primitive);
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

    let gdt = B::fused_grad_dtype(hs.dtype());
    let mut sums = PartSums::new(per_row);
    let ws_g = if ws.dtype() == gdt {
        ws.clone()
    } else {
        ws.clone().cast(gdt)
    };
    let mut grads = StudentGrads::new(ws_g, bs.is_some(), setup);
    let chunk = setup.chunk_rows.max(1);
    for r0 in (0..m).step_by(chunk) {
        let r1 = (r0 + chunk).min(m);
        let hs_c = hs_k.clone().slice(r0..r1);
        let (zs, tanh_s) = soft_cap(logits(hs_c.clone(), &ws, &bs), setup.logit_softcap);
        let (zs, zt) = teacher.chunk(r0..r1, zs);
        let y = targets_k.clone().map(|t| t.slice(r0..r1).into_primitive());
        let zs = zs.into_primitive().tensor();
        let chunk_call = KernelCall::new(zs, zt, y, chunk_params).with_grad(with_grad);
        let Some(out) = chunk_loss(chunk_call)? else {
            return Ok(None);
        };
        sums.add(out.parts);
        if let Some(g) = out.grad {
            grads.add(g, hs_c, tanh_s);
        }
    }
    let parts = sums.finish(&kept, has_hard, B::fused_loss_dtype(hs.dtype()), &device);
    Ok(Some((parts, with_grad.then(|| grads.finish(&kept)))))
}

/// The same loss with the logits materialised (`[N, V]`), through the backend's own ops (and so
/// through autodiff): the fallback where no fused kernel applies, and the oracle of the tests.
pub(crate) fn materialised<B: DistillBackend>(call: LinearCall<B>) -> DistillParts<B> {
    let setup = &call.settings;
    let side = |s: LinearSide<B>, weight_grad: bool, bias_grad: bool| {
        // A frozen or tied head gets no gradient here either.
        let weight = float::<B, 2>(s.weight);
        let weight = if weight_grad { weight } else { weight.detach() };
        let bias = s
            .bias
            .map(|b| float::<B, 1>(b))
            .map(|b| if bias_grad { b } else { b.detach() });
        let z = logits(float::<B, 2>(s.hidden), &weight, &bias);
        soft_cap(z, setup.logit_softcap).0
    };
    let zs = side(call.student, setup.weight_grad, setup.bias_grad);
    let zt = side(call.teacher, false, false);
    let (zs, zt) = setup
        .vocab_mismatch
        .align(zs, zt, setup.params.divergence)
        .unwrap_or_else(|e| panic!("burn-distill: {e} (checked before)"));
    B::distill_loss(
        zs.into_primitive().tensor(),
        zt.detach().into_primitive().tensor(),
        call.targets,
        &setup.params,
        setup.kernel,
    )
}
