//! `Autodiff<B>`: a fused loss of `B` wrapped in one generic backward node.
//!
//! Every fused loss of the crate computes its gradient in the forward pass (the row is in
//! cache then; a second pass would read it again). [`fused_with_grad`] is the one autodiff op
//! they all use: it runs a forward closure on the inner backend, asking for the gradient only
//! when the student is tracked, and registers a backward step that scales that gradient by
//! the upstream gradient.

use burn::backend::autodiff::{
    Autodiff,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::tensor::{
    DType,
    backend::AutodiffBackend,
    ops::{FloatTensor, IntTensor},
};

use super::{DistillBackend, DistillParams, DistillParts, FusedOutput};

/// Backward of a fused loss: the gradient computed by the forward kernel, times the upstream.
#[derive(Debug)]
struct FusedBackward;

impl<B: DistillBackend> Backward<B, 1> for FusedBackward {
    /// `∂ loss / ∂ student`, computed by the forward kernel.
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

/// A fused loss with its gradient computed in the forward, as an autodiff op of `student`.
///
/// `forward(student, with_grad)` runs on the inner backend and returns the loss parts and, when
/// `with_grad`, the gradient of `parts.loss` with respect to `student` (same shape), or `None`
/// where the inner backend has no fused kernel for these inputs. The teacher and every other
/// input are constants of the closure: they get no gradient and their graphs are not extended.
pub(crate) fn fused_with_grad<B, C, F>(
    student: FloatTensor<Autodiff<B, C>>,
    forward: F,
) -> Option<DistillParts<Autodiff<B, C>>>
where
    B: DistillBackend,
    C: CheckpointStrategy,
    F: FnOnce(FloatTensor<B>, bool) -> Option<FusedOutput<B>>,
{
    let (loss, parts) = match FusedBackward
        .prepare::<C>([student.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let fused = forward(student.primitive, true)?;
            // A kernel that was asked for the gradient and returned none is a bug of that
            // kernel; fail loudly rather than train without a gradient.
            let grad = fused
                .grad
                .unwrap_or_else(|| panic!("burn-distill: a fused kernel omitted its gradient"));
            (prep.finish(grad, fused.parts.loss.clone()), fused.parts)
        }
        OpsKind::UnTracked(prep) => {
            let fused = forward(student.primitive, false)?;
            (prep.finish(fused.parts.loss.clone()), fused.parts)
        }
    };
    Some(DistillParts {
        loss,
        soft: Autodiff::<B, C>::from_inner(parts.soft),
        hard: parts.hard.map(Autodiff::<B, C>::from_inner),
    })
}

impl<B: DistillBackend, C: CheckpointStrategy> DistillBackend for Autodiff<B, C> {
    fn fused_kernel_dtypes() -> &'static [DType] {
        B::fused_kernel_dtypes()
    }

    fn fused_loss_dtype(logits: DType) -> DType {
        B::fused_loss_dtype(logits)
    }

    /// The fused kernel of `B` as a tracked op of the student (see `fused_with_grad`); the
    /// default [`DistillBackend::distill_loss`] then differentiates through it.
    fn distill_fused(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        targets: Option<IntTensor<Self>>,
        params: &DistillParams,
        with_grad: bool,
    ) -> Option<FusedOutput<Self>> {
        let mut grad = None;
        let parts = fused_with_grad::<B, C, _>(student, |student, tracked| {
            let out = B::distill_fused(
                student,
                teacher.primitive,
                targets,
                params,
                tracked || with_grad,
            )?;
            if with_grad {
                grad = out.grad.clone();
            }
            Some(out)
        })?;
        Some(FusedOutput {
            parts,
            grad: grad.map(Self::from_inner),
        })
    }
}
