//! The backend extension trait that the loss dispatches through.

use burn::backend::autodiff::{
    Autodiff,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::tensor::{
    DType, Int, Tensor, TensorMetadata, TensorPrimitive,
    backend::{AutodiffBackend, Backend},
    ops::{FloatTensor, IntTensor},
};

use crate::{
    Divergence, Kernel, Reduction,
    kernel::reference,
    reduction::{ignored_rows, reduce_rows},
};

/// Everything a loss implementation needs to know, resolved from a validated
/// [`DistillLossConfig`](crate::DistillLossConfig).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DistillParams {
    /// Temperature `T > 0` of both distributions in the soft term.
    pub temperature: f64,
    /// Weight `α ∈ [0, 1]` of the soft term (`1 − α` for the hard term).
    pub alpha: f64,
    /// The divergence of the soft term.
    pub divergence: Divergence,
    /// Multiply the soft term by `T²`.
    pub scale_by_t2: bool,
    /// Rows whose target equals this value are left out of both terms.
    pub ignore_index: Option<i64>,
    /// Label smoothing `ε ∈ [0, 1)` of the hard term.
    pub label_smoothing: f64,
    /// How row losses are reduced.
    pub reduction: Reduction,
}

/// The reduced loss and its parts, as backend primitives: `[1]` for `Mean` and `Sum`, `[N]`
/// for `None` (row values: `0` for ignored rows, NaN for rows whose target is out of range).
#[derive(Debug, Clone)]
pub struct DistillParts<B: Backend> {
    /// `α·soft + (1 − α)·hard` (`soft` without targets), differentiable with respect to the
    /// student logits only.
    pub loss: FloatTensor<B>,
    /// The soft term (T²-scaled if configured), detached.
    pub soft: FloatTensor<B>,
    /// The hard term, detached; `None` without targets.
    pub hard: Option<FloatTensor<B>>,
}

/// Output of a fused kernel: the reduced loss and parts and, if asked, the gradient.
#[derive(Debug, Clone)]
pub struct FusedOutput<B: Backend> {
    /// The loss and its parts, as in [`DistillParts`].
    pub parts: DistillParts<B>,
    /// `[N, V]` gradient of `loss` with respect to the student logits (for `Reduction::None`,
    /// row `i` holds the gradient of row loss `i`); zero on ignored and bad rows.
    pub grad: Option<FloatTensor<B>>,
}

/// A backend that can compute distillation losses.
///
/// This is the extension point of the crate (in the style of `burn-vision`'s `VisionBackend`):
/// [`DistillLoss`](crate::DistillLoss) validates its inputs and calls
/// [`DistillBackend::distill_loss`]. Every method has a default body, so any backend can opt
/// in with an empty `impl` and gets the [reference implementation](mod@crate::kernel::reference)
/// built from burn tensor ops. Backends with a fused kernel override
/// [`DistillBackend::has_fused_kernel`] and [`DistillBackend::distill_fused`]; `Autodiff<B>`
/// then wraps the fused kernel of `B` in a custom backward node. Implemented for NdArray, Flex,
/// the CubeCL backends (wgpu, CUDA), burn's `Fusion` wrapper and `Autodiff<B>`.
pub trait DistillBackend: Backend {
    /// The logit dtypes this backend's fused kernel accepts (none by default).
    fn fused_kernel_dtypes() -> &'static [DType] {
        &[]
    }

    /// Does this backend have a fused kernel for these `[N, V]` logits? (Both of one dtype
    /// among [`DistillBackend::fused_kernel_dtypes`].)
    fn has_fused_kernel(student: &FloatTensor<Self>, teacher: &FloatTensor<Self>) -> bool {
        student.dtype() == teacher.dtype() && Self::fused_kernel_dtypes().contains(&student.dtype())
    }

    /// The fused kernel: the reduced loss of `[N, V]` logits and, when `with_grad`, its
    /// `[N, V]` gradient with respect to the student logits.
    ///
    /// Only called when [`DistillBackend::has_fused_kernel`] is true.
    fn distill_fused(
        _student: FloatTensor<Self>,
        _teacher: FloatTensor<Self>,
        _targets: Option<IntTensor<Self>>,
        _params: &DistillParams,
        _with_grad: bool,
    ) -> FusedOutput<Self> {
        unreachable!("distill_fused called on a backend without a fused kernel")
    }

    /// The backward step of the fused kernel: `grad · upstream`, where `upstream` is the
    /// gradient of the loss output (`[1]` for `Mean` and `Sum`, `[N]` per row for `None`).
    fn distill_scale_grad(
        grad: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let n = upstream.shape()[0];
        Self::float_mul(grad, Self::float_reshape(upstream, [n, 1].into()))
    }

    /// The reduced loss and its parts of `[N, V]` student and teacher logits against optional
    /// `[N]` targets. Shapes and parameters have already been validated by the caller.
    fn distill_loss(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        targets: Option<IntTensor<Self>>,
        params: &DistillParams,
        kernel: Kernel,
    ) -> DistillParts<Self> {
        if kernel != Kernel::Reference && Self::has_fused_kernel(&student, &teacher) {
            Self::distill_fused(student, teacher, targets, params, false).parts
        } else {
            reference_loss::<Self>(student, teacher, targets, params)
        }
    }
}

/// [`DistillBackend::distill_loss`] by the reference implementation.
pub fn reference_loss<B: Backend>(
    student: FloatTensor<B>,
    teacher: FloatTensor<B>,
    targets: Option<IntTensor<B>>,
    params: &DistillParams,
) -> DistillParts<B> {
    let targets = targets.map(Tensor::<B, 1, Int>::from_primitive);
    let ignored = ignored_rows(targets.as_ref(), params.ignore_index);
    let rows = reference::distill_rows::<B>(
        Tensor::from_primitive(TensorPrimitive::Float(student)),
        Tensor::from_primitive(TensorPrimitive::Float(teacher)),
        targets,
        params,
    );
    let reduce = |t: Tensor<B, 1>| {
        reduce_rows(t, ignored.clone(), params.reduction)
            .into_primitive()
            .tensor()
    };
    DistillParts {
        loss: reduce(rows.loss),
        soft: reduce(rows.soft),
        hard: rows.hard.map(reduce),
    }
}

/// Backward of the fused loss: the gradient computed by the forward kernel, times the upstream.
#[derive(Debug)]
struct FusedBackward;

impl<B: DistillBackend> Backward<B, 1> for FusedBackward {
    /// `∂ loss / ∂ student`, `[N, V]`, computed by the forward kernel.
    type State = FloatTensor<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [student] = ops.parents;
        let upstream = grads.consume::<B>(&ops.node);
        if let Some(student) = student {
            grads.register::<B>(student.id, B::distill_scale_grad(ops.state, upstream));
        }
    }
}

impl<B: DistillBackend, C: CheckpointStrategy> DistillBackend for Autodiff<B, C> {
    fn fused_kernel_dtypes() -> &'static [DType] {
        B::fused_kernel_dtypes()
    }

    fn distill_loss(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        targets: Option<IntTensor<Self>>,
        params: &DistillParams,
        kernel: Kernel,
    ) -> DistillParts<Self> {
        if kernel == Kernel::Reference || !Self::has_fused_kernel(&student, &teacher) {
            return reference_loss::<Self>(student, teacher, targets, params);
        }
        // The teacher is used as a constant: its graph (if any) is not extended.
        let teacher = teacher.primitive;
        let (loss, parts) = match FusedBackward
            .prepare::<C>([student.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let fused = B::distill_fused(student.primitive, teacher, targets, params, true);
                let grad = fused
                    .grad
                    .expect("the fused kernel returns the asked gradient");
                (prep.finish(grad, fused.parts.loss.clone()), fused.parts)
            }
            OpsKind::UnTracked(prep) => {
                let fused = B::distill_fused(student.primitive, teacher, targets, params, false);
                (prep.finish(fused.parts.loss.clone()), fused.parts)
            }
        };
        DistillParts {
            loss,
            soft: Self::from_inner(parts.soft),
            hard: parts.hard.map(Self::from_inner),
        }
    }
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod fusion;
