//! Fused-linear distillation: the loss straight from hidden states and LM heads, chunk by chunk
//! of rows, so that the `[N, V]` logits of the student and the teacher never exist at once.
//!
//! Per chunk of `c` kept rows: `z_s = h_s W_s + b_s` and `z_t = h_t W_t + b_t` (`[c, V]`), the
//! fused loss kernel of the backend on them, which also returns `g = ∂loss/∂z_s`; then, when
//! the student is trained, `∂h_s = g W_sᵀ`, `∂W_s += h_sᵀ g`, `∂b_s += Σ_rows g`, all in the
//! forward pass. The backward pass only scales the stored gradients by the upstream gradient
//! (as Liger-Kernel's fused-linear losses do). Extra memory: three `[c, V]` chunks (four with a
//! logit soft-cap, whose `tanh` is kept for the gradient) plus the gradients of the student's
//! parameters, which training needs anyway.
//!
//! This module holds the backend-generic form (burn tensor ops per chunk), which wgpu, CUDA
//! and burn's fusion wrapper run. NdArray and Flex override
//! [`DistillBackend::distill_linear_chunked`] with the host loop of `kernel::linear_cpu`
//! (buffers allocated once, `∂W_s` accumulated in place, three `[c, V]` buffers even with a
//! cap). The tests hold the host loop (NdArray, Flex) and this form (wgpu, and
//! `Kernel::Reference` everywhere) to the materialised loss.

use burn::nn::Linear;
use burn::tensor::{
    IndexingUpdateOp, Int, Tensor, TensorData, TensorPrimitive, backend::Backend, ops::FloatTensor,
    ops::IntTensor,
};

use crate::{
    DistillBackend, DistillError, DistillLoss, DistillOutput, DistillParams, DistillParts, Kernel,
    Reduction, error::or_panic, loss::check_row_targets,
};

pub(crate) use crate::backend::{LinearGrads, LinearOutput, LinearSetup, LinearSide};

type T<B, const D: usize> = Tensor<B, D>;
/// `(loss, soft, hard)` of a chunk, reduced or per row.
type Parts<B> = (T<B, 1>, T<B, 1>, Option<T<B, 1>>);

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

/// The loss (and, with `with_grad`, the student's gradients) chunk by chunk on backend `B`.
///
/// Ignored rows are dropped before the matmuls (one read of the targets to the host). Returns
/// `None` when a gradient is asked and `B` has no fused kernel for the logits, or for
/// `Reduction::PerRow` with a gradient (each row's upstream weight is only known in the
/// backward pass); the caller then materialises the logits.
pub(crate) fn chunked<B: DistillBackend>(
    student: LinearSide<B>,
    teacher: LinearSide<B>,
    targets: Option<IntTensor<B>>,
    setup: &LinearSetup,
    with_grad: bool,
) -> Option<LinearOutput<B>> {
    let fused = |zs: FloatTensor<B>, zt, y, params: &DistillParams| {
        Ok::<_, std::convert::Infallible>(
            if setup.kernel != Kernel::Reference && B::has_fused_kernel(&zs, &zt) {
                B::distill_fused(zs, zt, y, params, with_grad)
            } else if with_grad {
                None
            } else {
                Some(crate::FusedOutput {
                    parts: B::distill_loss(zs, zt, y, params, Kernel::Reference),
                    grad: None,
                })
            },
        )
    };
    let teacher = DenseChunks::new(teacher, setup);
    match chunked_with(student, teacher, targets, setup, with_grad, fused) {
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

/// [`chunked`] with the loss of each chunk's `[c, V]` student logits against the teacher's
/// chunk given by `chunk_loss(student, teacher, targets, params)` (its gradient asked for when
/// `with_grad`): `Ok(None)` where it cannot (the caller then materialises the logits), `Err`
/// to stop.
pub(crate) fn chunked_with<B: DistillBackend, E, C: ChunkTeacher<B>>(
    student: LinearSide<B>,
    teacher: C,
    targets: Option<IntTensor<B>>,
    setup: &LinearSetup,
    with_grad: bool,
    mut chunk_loss: impl FnMut(
        FloatTensor<B>,
        C::Chunk,
        Option<IntTensor<B>>,
        &DistillParams,
    ) -> Result<Option<crate::FusedOutput<B>>, E>,
) -> Result<Option<LinearOutput<B>>, E> {
    let params = setup.params;
    if with_grad && params.reduction == Reduction::PerRow {
        return Ok(None);
    }
    let (hs, ws) = (float::<B, 2>(student.hidden), float::<B, 2>(student.weight));
    let bs = student.bias.map(float::<B, 1>);
    let [n, h] = hs.dims();
    let vs = ws.dims()[1];
    let device = hs.device();
    // The student's gradients in the fused kernels' gradient dtype (f32 for f16 on CubeCL),
    // so that a loss scale meets them unrounded; the backward rounds once to each input's.
    let gdt = B::fused_grad_dtype(hs.dtype());
    let wide = |t: T<B, 2>| if t.dtype() == gdt { t } else { t.cast(gdt) };
    let ws_g = wide(ws.clone());
    let targets = targets.map(Tensor::<B, 1, Int>::from_primitive);

    // Kept rows, on the host: ignored rows never reach a matmul.
    let kept: Option<Vec<i64>> = match (&targets, params.ignore_index) {
        (Some(t), Some(ignore)) => {
            let values: Vec<i64> = t.to_data().iter::<i64>().collect();
            let kept: Vec<i64> = (0..n as i64)
                .filter(|&i| values[i as usize] != ignore)
                .collect();
            (kept.len() < n).then_some(kept)
        }
        _ => None,
    };
    let index = kept
        .as_ref()
        .map(|k| Tensor::<B, 1, Int>::from_data(TensorData::new(k.clone(), [k.len()]), &device));
    let select2 = |t: T<B, 2>| match &index {
        Some(i) => t.select(0, i.clone()),
        None => t,
    };
    let hs_k = select2(hs.clone());
    let teacher = match &index {
        Some(i) => teacher.keep(i),
        None => teacher,
    };
    let targets_k = targets.clone().map(|t| match &index {
        Some(i) => t.select(0, i.clone()),
        None => t,
    });
    let m = hs_k.dims()[0];

    let chunk_params = crate::params::chunk_params(&params, m);
    let per_row = params.reduction == Reduction::PerRow;

    let mut sums: Option<Parts<B>> = None;
    let mut rows: Vec<Parts<B>> = Vec::new();
    let mut grad_h: Vec<T<B, 2>> = Vec::new();
    let mut grad_w: Option<T<B, 2>> = None;
    let mut grad_b: Option<T<B, 1>> = None;
    let chunk = setup.chunk_rows.max(1);
    let mut r0 = 0;
    while r0 < m {
        let r1 = (r0 + chunk).min(m);
        let hs_c = hs_k.clone().slice(r0..r1);
        let (zs, tanh_s) = soft_cap(logits(hs_c.clone(), &ws, &bs), setup.logit_softcap);
        let (zs, zt) = teacher.chunk(r0..r1, zs);
        let y = targets_k.clone().map(|t| t.slice(r0..r1).into_primitive());
        let zs = zs.into_primitive().tensor();
        let Some(out) = chunk_loss(zs, zt, y, &chunk_params)? else {
            return Ok(None);
        };
        let parts = (
            float::<B, 1>(out.parts.loss),
            float::<B, 1>(out.parts.soft),
            out.parts.hard.map(float::<B, 1>),
        );
        if per_row {
            rows.push(parts);
        } else {
            sums = Some(match sums {
                None => parts,
                Some((l, s, hd)) => (
                    l + parts.0,
                    s + parts.1,
                    hd.zip(parts.2).map(|(a, b)| a + b),
                ),
            });
        }
        if let Some(g) = out.grad {
            // `∂loss/∂z_s` on the aligned vocabulary, back to the student's `V_s` columns, in
            // the gradient dtype.
            let g = float::<B, 2>(g).cast(gdt);
            let va = g.dims()[1];
            let g = if va > vs {
                g.narrow(1, 0, vs)
            } else if va < vs {
                let [c, _] = g.dims();
                let zeros = Tensor::zeros([c, vs - va], (&device, g.dtype()));
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
            grad_h.push(ws_g.clone().matmul(g.clone().transpose()).transpose());
            if setup.weight_grad {
                let gw = wide(hs_c).transpose().matmul(g.clone());
                grad_w = Some(match grad_w {
                    None => gw,
                    Some(acc) => acc + gw,
                });
            }
            if bs.is_some() && setup.bias_grad {
                let gb = g.sum_dim(0).squeeze_dim(0);
                grad_b = Some(match grad_b {
                    None => gb,
                    Some(acc) => acc + gb,
                });
            }
        }
        r0 = r1;
    }

    let loss_dtype = B::fused_loss_dtype(hs.dtype());
    let zero = || Tensor::<B, 1>::zeros([1], (&device, loss_dtype));
    let has_hard = targets.is_some();
    let parts = if per_row {
        let cat =
            |f: &dyn Fn(&Parts<B>) -> T<B, 1>| -> T<B, 1> {
                let kept_rows = if rows.is_empty() {
                    Tensor::<B, 1>::zeros([0], (&device, loss_dtype))
                } else {
                    Tensor::cat(rows.iter().map(f).collect(), 0)
                };
                match &index {
                    Some(i) => Tensor::<B, 1>::zeros([n], (&device, kept_rows.dtype()))
                        .select_assign(0, i.clone(), kept_rows, IndexingUpdateOp::Add),
                    None => kept_rows,
                }
            };
        DistillParts {
            loss: cat(&|r| r.0.clone()).into_primitive().tensor(),
            soft: cat(&|r| r.1.clone()).into_primitive().tensor(),
            hard: has_hard.then(|| {
                cat(&|r| r.2.clone().expect("hard rows with targets"))
                    .into_primitive()
                    .tensor()
            }),
        }
    } else {
        let (l, s, hd) = sums.unwrap_or_else(|| (zero(), zero(), has_hard.then(zero)));
        DistillParts {
            loss: l.into_primitive().tensor(),
            soft: s.into_primitive().tensor(),
            hard: hd.map(|t| t.into_primitive().tensor()),
        }
    };

    let grads = with_grad.then(|| {
        let zeros_h = || Tensor::<B, 2>::zeros([n, h], (&device, gdt));
        let gh = if grad_h.is_empty() {
            zeros_h()
        } else {
            let kept_grad = Tensor::cat(grad_h, 0);
            match &index {
                Some(i) => zeros_h().select_assign(0, i.clone(), kept_grad, IndexingUpdateOp::Add),
                None => kept_grad,
            }
        };
        LinearGrads {
            hidden: gh.into_primitive().tensor(),
            weight: setup.weight_grad.then(|| {
                grad_w
                    .unwrap_or_else(|| Tensor::zeros([h, vs], (&device, gdt)))
                    .into_primitive()
                    .tensor()
            }),
            bias: bs.as_ref().filter(|_| setup.bias_grad).map(|_| {
                grad_b
                    .unwrap_or_else(|| Tensor::zeros([vs], (&device, gdt)))
                    .into_primitive()
                    .tensor()
            }),
        }
    });
    Ok(Some((parts, grads)))
}

/// The same loss with the logits materialised (`[N, V]`), through the backend's own ops (and so
/// through autodiff): the fallback where no fused kernel applies, and the oracle of the tests.
pub(crate) fn materialised<B: DistillBackend>(
    student: LinearSide<B>,
    teacher: LinearSide<B>,
    targets: Option<IntTensor<B>>,
    setup: &LinearSetup,
) -> DistillParts<B> {
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
    let zs = side(student, setup.weight_grad, setup.bias_grad);
    let zt = side(teacher, false, false);
    let (zs, zt) = setup
        .vocab_mismatch
        .align(zs, zt, setup.params.divergence)
        .unwrap_or_else(|e| panic!("burn-distill: {e} (checked before)"));
    B::distill_loss(
        zs.into_primitive().tensor(),
        zt.detach().into_primitive().tensor(),
        targets,
        &setup.params,
        setup.kernel,
    )
}

/// The student's and teacher's sides of a fused-linear loss, checked: `[N, H]` hidden states
/// matching their heads' input width, one number of rows; the teacher detached.
pub(crate) fn linear_sides<B: Backend>(
    student_hidden: Tensor<B, 2>,
    student_head: &Linear<B>,
    teacher_hidden: Tensor<B, 2>,
    teacher_head: &Linear<B>,
) -> Result<(LinearSide<B>, LinearSide<B>), DistillError> {
    let side = |hidden: Tensor<B, 2>, head: &Linear<B>, name: &str| {
        let weight = head.weight.val();
        let [n, h] = hidden.dims();
        let [wh, v] = weight.dims();
        if n == 0 || h != wh || v == 0 {
            return Err(DistillError::invalid(
                format!("{name}_hidden"),
                format!("shape [{n}, {h}] with a head of weight [{wh}, {v}]"),
                format!("[N >= 1, {wh}] rows for the {name} head ({wh} → {v})"),
            ));
        }
        Ok(LinearSide {
            hidden: hidden.into_primitive().tensor(),
            weight: weight.into_primitive().tensor(),
            bias: head
                .bias
                .as_ref()
                .map(|b| b.val().into_primitive().tensor()),
        })
    };
    let [n, _] = student_hidden.dims();
    let [nt, _] = teacher_hidden.dims();
    if nt != n {
        return Err(DistillError::invalid(
            "teacher_hidden",
            format!("shape {:?}", teacher_hidden.dims()),
            format!("{n} rows, as student_hidden"),
        ));
    }
    let student = side(student_hidden, student_head, "student")?;
    let teacher = side(teacher_hidden.detach(), teacher_head, "teacher")?;
    let teacher = LinearSide {
        weight: float::<B, 2>(teacher.weight)
            .detach()
            .into_primitive()
            .tensor(),
        bias: teacher
            .bias
            .map(|b| float::<B, 1>(b).detach().into_primitive().tensor()),
        ..teacher
    };
    Ok((student, teacher))
}

impl DistillLoss {
    /// The loss from hidden states and LM heads, without ever holding the `[N, V]` logits:
    /// `forward(student_hidden · W_s + b_s, teacher_hidden · W_t + b_t, targets)`, computed
    /// chunk by chunk of rows (see [`DistillLossConfig::linear_chunk_rows`]). Ignored rows are
    /// dropped before the matmuls. Gradients reach `student_hidden` and the student head's
    /// weight and bias; the teacher and its head get none.
    ///
    /// # Shapes
    /// - `student_hidden`: `[N, H_s]`, `student_head`: `Linear` `H_s → V_s`
    /// - `teacher_hidden`: `[N, H_t]`, `teacher_head`: `Linear` `H_t → V_t` (`V_t ≠ V_s` only
    ///   with a [`VocabMismatch`](crate::VocabMismatch) policy)
    /// - `targets`: `[N]`; output as [`DistillLoss::forward`]
    ///
    /// ```
    /// use burn::backend::{Autodiff, NdArray};
    /// use burn::nn::LinearConfig;
    /// use burn::tensor::{Int, Tensor};
    /// use burn_distill::DistillLossConfig;
    ///
    /// type B = Autodiff<NdArray>;
    /// let device = Default::default();
    /// let student_head = LinearConfig::new(2, 3).init::<B>(&device);
    /// let teacher_head = LinearConfig::new(4, 3).init::<B>(&device);
    /// let hs = Tensor::<B, 2>::from_floats([[1.0, -0.5], [0.3, 2.0]], &device).require_grad();
    /// let ht = Tensor::<B, 2>::from_floats([[0.2, 1.0, -1.0, 0.5], [1.5, 0.0, 0.4, -0.3]], &device);
    /// let targets = Tensor::<B, 1, Int>::from_ints([2, 0], &device);
    /// // One row per chunk here; by default from a 64 MiB budget.
    /// let loss = DistillLossConfig::new().with_linear_chunk_rows(Some(1)).init();
    ///
    /// let fused = loss.forward_linear(hs.clone(), &student_head, ht.clone(), &teacher_head, targets.clone());
    /// let logits = loss.forward(student_head.forward(hs.clone()), teacher_head.forward(ht), targets);
    /// let (a, b) = (fused.clone().into_scalar(), logits.into_scalar());
    /// assert!((a - b).abs() < 1e-5 && a > 0.0);
    /// let grads = fused.backward();
    /// assert_eq!(student_head.weight.val().grad(&grads).unwrap().dims(), [2, 3]);
    /// assert_eq!(hs.grad(&grads).unwrap().dims(), [2, 2]);
    /// ```
    ///
    /// # Panics
    /// On bad shapes or targets, with the message of [`DistillLoss::try_forward_linear_parts`].
    ///
    /// [`DistillLossConfig::linear_chunk_rows`]: crate::DistillLossConfig::linear_chunk_rows
    pub fn forward_linear<B: DistillBackend>(
        &self,
        student_hidden: Tensor<B, 2>,
        student_head: &Linear<B>,
        teacher_hidden: Tensor<B, 2>,
        teacher_head: &Linear<B>,
        targets: Tensor<B, 1, Int>,
    ) -> Tensor<B, 1> {
        or_panic(self.try_forward_linear_parts(
            student_hidden,
            student_head,
            teacher_hidden,
            teacher_head,
            Some(targets),
        ))
        .loss
    }

    /// [`DistillLoss::forward_linear`] without labels (soft term only; every row counts).
    ///
    /// # Panics
    /// As [`DistillLoss::forward_linear`].
    pub fn forward_linear_soft<B: DistillBackend>(
        &self,
        student_hidden: Tensor<B, 2>,
        student_head: &Linear<B>,
        teacher_hidden: Tensor<B, 2>,
        teacher_head: &Linear<B>,
    ) -> Tensor<B, 1> {
        or_panic(self.try_forward_linear_parts(
            student_hidden,
            student_head,
            teacher_hidden,
            teacher_head,
            None,
        ))
        .loss
    }

    /// Sequence form of [`DistillLoss::forward_linear`]: `[B, T, H]` hidden states and
    /// `[B, T]` targets.
    ///
    /// # Panics
    /// As [`DistillLoss::forward_linear`].
    pub fn forward_linear_seq<B: DistillBackend>(
        &self,
        student_hidden: Tensor<B, 3>,
        student_head: &Linear<B>,
        teacher_hidden: Tensor<B, 3>,
        teacher_head: &Linear<B>,
        targets: Tensor<B, 2, Int>,
    ) -> Tensor<B, 1> {
        or_panic(self.try_forward_linear_seq_parts(
            student_hidden,
            student_head,
            teacher_hidden,
            teacher_head,
            Some(targets),
        ))
        .loss
    }

    /// Sequence form of [`DistillLoss::try_forward_linear_parts`].
    pub fn try_forward_linear_seq_parts<B: DistillBackend>(
        &self,
        student_hidden: Tensor<B, 3>,
        student_head: &Linear<B>,
        teacher_hidden: Tensor<B, 3>,
        teacher_head: &Linear<B>,
        targets: Option<Tensor<B, 2, Int>>,
    ) -> Result<DistillOutput<B>, DistillError> {
        let [b, t, hs] = student_hidden.dims();
        let [tb, tt, ht] = teacher_hidden.dims();
        if [tb, tt] != [b, t] {
            return Err(DistillError::invalid(
                "teacher_hidden",
                format!("shape {:?}", teacher_hidden.dims()),
                format!("[{b}, {t}, H_t] (the student's batch and sequence)"),
            ));
        }
        if let Some(targets) = &targets {
            crate::loss::check_seq_targets(targets, b, t)?;
        }
        self.try_forward_linear_parts(
            student_hidden.reshape([b * t, hs]),
            student_head,
            teacher_hidden.reshape([b * t, ht]),
            teacher_head,
            targets.map(|y| y.reshape([b * t])),
        )
    }

    /// The fused-linear loss and its parts, or an error naming the bad argument.
    pub fn try_forward_linear_parts<B: DistillBackend>(
        &self,
        student_hidden: Tensor<B, 2>,
        student_head: &Linear<B>,
        teacher_hidden: Tensor<B, 2>,
        teacher_head: &Linear<B>,
        targets: Option<Tensor<B, 1, Int>>,
    ) -> Result<DistillOutput<B>, DistillError> {
        let vs = student_head.weight.dims()[1];
        let vt = teacher_head.weight.dims()[1];
        // Targets index the aligned vocabulary, as in `forward` on the logits.
        let classes = self
            .vocab_mismatch
            .aligned_width(vs, vt, self.params.divergence)?;
        let n = student_hidden.dims()[0];
        let dtype = student_hidden.dtype();
        let device = student_hidden.device();
        let (student, teacher) =
            linear_sides(student_hidden, student_head, teacher_hidden, teacher_head)?;
        if self.kernel == Kernel::Fused && !B::fused_kernel_dtypes().contains(&dtype) {
            return Err(DistillError::invalid(
                "kernel",
                "Kernel::Fused",
                format!(
                    "Kernel::Auto or Kernel::Reference: backend {} has no fused distillation \
                     kernel for {dtype:?} logits",
                    B::name(&device),
                ),
            ));
        }
        let check = match &targets {
            Some(targets) => check_row_targets(
                targets,
                [n, classes],
                self.validation,
                self.params.ignore_index,
            )?,
            None => None,
        };
        let setup = LinearSetup {
            params: self.params,
            kernel: self.kernel,
            vocab_mismatch: self.vocab_mismatch,
            chunk_rows: self.linear_chunk_rows::<B>(vs.max(vt)),
            logit_softcap: self.logit_softcap,
            weight_grad: self.linear_head_grad,
            bias_grad: self.linear_head_grad,
        };
        let parts = B::distill_linear(
            student,
            teacher,
            targets.map(Tensor::into_primitive),
            &setup,
        );
        Ok(DistillOutput::from(parts).with_check(check))
    }
}
