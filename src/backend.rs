//! The backend extension trait that the loss dispatches through.

use burn::backend::autodiff::{
    Autodiff,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::tensor::{
    Int, Tensor, TensorMetadata, TensorPrimitive,
    backend::{AutodiffBackend, Backend},
    ops::{FloatTensor, IntTensor},
};

use crate::{Divergence, Kernel, kernel::reference};

/// Everything a row-loss implementation needs to know, resolved from a validated
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
}

/// Per-row losses of a batch, as backend primitives.
#[derive(Debug, Clone)]
pub struct DistillRows<B: Backend> {
    /// `[N]` row losses `α·soft_i + (1 − α)·hard_i` (`soft_i` without targets); `0` for
    /// ignored rows, NaN for rows whose target is out of range. Differentiable with respect to
    /// the student logits only.
    pub loss: FloatTensor<B>,
    /// `[N]` soft term per row (T²-scaled if configured), detached, masked like `loss`.
    pub soft: FloatTensor<B>,
    /// `[N]` hard term per row, detached, masked like `loss`; `None` without targets.
    pub hard: Option<FloatTensor<B>>,
}

/// Output of a fused kernel: the row losses and, if asked, their gradient.
#[derive(Debug, Clone)]
pub struct FusedRows<B: Backend> {
    /// The row losses, as in [`DistillRows`].
    pub rows: DistillRows<B>,
    /// `[N, V]`: row `i` holds `∂ loss_i / ∂ student_i` (zero for ignored and bad rows).
    pub grad: Option<FloatTensor<B>>,
}

/// A backend that can compute distillation losses.
///
/// This is the extension point of the crate (in the style of `burn-vision`'s `VisionBackend`):
/// [`DistillLoss`](crate::DistillLoss) calls [`DistillBackend::distill_rows`] and reduces the
/// result. Every method has a default body, so any backend can opt in with an empty `impl`
/// and gets the [reference implementation](mod@crate::kernel::reference) built from burn tensor
/// ops. Backends with a fused kernel override [`DistillBackend::has_fused_kernel`] and
/// [`DistillBackend::distill_fused`]; `Autodiff<B>` then wraps the fused kernel of `B` in a
/// custom backward node. Implemented for NdArray, Flex, the CubeCL backends (wgpu, CUDA),
/// burn's `Fusion` wrapper and `Autodiff<B>`.
pub trait DistillBackend: Backend {
    /// Does this backend have a fused kernel for these `[N, V]` logits (dtype, layout)?
    fn has_fused_kernel(_student: &FloatTensor<Self>, _teacher: &FloatTensor<Self>) -> bool {
        false
    }

    /// The fused kernel: row losses of `[N, V]` logits and, when `with_grad`, the `[N, V]`
    /// gradient of each row loss with respect to its student row.
    ///
    /// Only called when [`DistillBackend::has_fused_kernel`] is true.
    fn distill_fused(
        _student: FloatTensor<Self>,
        _teacher: FloatTensor<Self>,
        _targets: Option<IntTensor<Self>>,
        _params: &DistillParams,
        _with_grad: bool,
    ) -> FusedRows<Self> {
        unreachable!("distill_fused called on a backend without a fused kernel")
    }

    /// `grad[i, :] · scale[i]` for `[N, V]` `grad` and `[N]` `scale`: the backward step of the
    /// fused kernel (`scale` is the upstream gradient of the row losses).
    fn distill_scale_rows(grad: FloatTensor<Self>, scale: FloatTensor<Self>) -> FloatTensor<Self> {
        let n = scale.shape()[0];
        Self::float_mul(grad, Self::float_reshape(scale, [n, 1].into()))
    }

    /// Row losses of `[N, V]` student and teacher logits against optional `[N]` targets.
    ///
    /// Shapes and parameters have already been validated by the caller.
    fn distill_rows(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        targets: Option<IntTensor<Self>>,
        params: &DistillParams,
        kernel: Kernel,
    ) -> DistillRows<Self> {
        if kernel != Kernel::Reference && Self::has_fused_kernel(&student, &teacher) {
            Self::distill_fused(student, teacher, targets, params, false).rows
        } else {
            reference_rows::<Self>(student, teacher, targets, params)
        }
    }
}

/// [`DistillBackend::distill_rows`] by the reference implementation.
pub fn reference_rows<B: Backend>(
    student: FloatTensor<B>,
    teacher: FloatTensor<B>,
    targets: Option<IntTensor<B>>,
    params: &DistillParams,
) -> DistillRows<B> {
    let rows = reference::distill_rows::<B>(
        Tensor::from_primitive(TensorPrimitive::Float(student)),
        Tensor::from_primitive(TensorPrimitive::Float(teacher)),
        targets.map(Tensor::<B, 1, Int>::from_primitive),
        params,
    );
    DistillRows {
        loss: rows.loss.into_primitive().tensor(),
        soft: rows.soft.into_primitive().tensor(),
        hard: rows.hard.map(|h| h.into_primitive().tensor()),
    }
}

/// Backward of the fused loss: `d student = grad_rows[:, None] · ∂loss_i/∂student_i`.
#[derive(Debug)]
struct FusedBackward;

impl<B: DistillBackend> Backward<B, 1> for FusedBackward {
    /// `∂ loss_i / ∂ student_i`, `[N, V]`, computed by the forward kernel.
    type State = FloatTensor<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [student] = ops.parents;
        let grad_rows = grads.consume::<B>(&ops.node);
        if let Some(student) = student {
            grads.register::<B>(student.id, B::distill_scale_rows(ops.state, grad_rows));
        }
    }
}

impl<B: DistillBackend, C: CheckpointStrategy> DistillBackend for Autodiff<B, C> {
    fn has_fused_kernel(student: &FloatTensor<Self>, teacher: &FloatTensor<Self>) -> bool {
        B::has_fused_kernel(&student.primitive, &teacher.primitive)
    }

    fn distill_rows(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        targets: Option<IntTensor<Self>>,
        params: &DistillParams,
        kernel: Kernel,
    ) -> DistillRows<Self> {
        if kernel == Kernel::Reference || !Self::has_fused_kernel(&student, &teacher) {
            return reference_rows::<Self>(student, teacher, targets, params);
        }
        // The teacher is used as a constant: its graph (if any) is not extended.
        let teacher = teacher.primitive;
        let (loss, fused) = match FusedBackward
            .prepare::<C>([student.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let fused = B::distill_fused(student.primitive, teacher, targets, params, true);
                let grad = fused
                    .grad
                    .clone()
                    .expect("the fused kernel returns a gradient");
                (prep.finish(grad, fused.rows.loss.clone()), fused)
            }
            OpsKind::UnTracked(prep) => {
                let fused = B::distill_fused(student.primitive, teacher, targets, params, false);
                (prep.finish(fused.rows.loss.clone()), fused)
            }
        };
        DistillRows {
            loss,
            soft: Self::from_inner(fused.rows.soft),
            hard: fused.rows.hard.map(Self::from_inner),
        }
    }
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod cube {
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
    use burn_fusion::{Fusion, FusionBackend};

    impl<R, F, I, BT> super::DistillBackend for CubeBackend<R, F, I, BT>
    where
        R: CubeRuntime,
        F: FloatElement,
        I: IntElement,
        BT: BoolElement,
    {
    }

    impl<B: FusionBackend + super::DistillBackend> super::DistillBackend for Fusion<B> {}
}
