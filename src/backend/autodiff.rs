//! `Autodiff<B>` over any [`DistillOps`] backend: the fused loss is one backward node whose
//! state is the gradient the kernel formed in the forward pass; the backward pass scales it by
//! the upstream gradient ([`DistillOps::distill_scale_grad`]), in place on Flex.

use burn::backend::{
    AutodiffBackend, Backend, TensorMetadata,
    autodiff::{
        Autodiff,
        checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
        grads::Gradients,
        ops::{Backward, Ops, OpsKind},
    },
    tensor::{FloatTensor, IntTensor},
};

use burn::tensor::DType;

use super::ops::{DenseSettings, DistillOps, FusedRows, SparseSetup};

/// The backward node of a fused loss: `∂student = grad · upstream`, in the student's dtype;
/// the teacher (detached by contract) gets nothing.
#[derive(Debug)]
struct FusedBackward {
    /// The student's dtype: the kernels' gradient may be wider (f32 for f16 logits on CubeCL,
    /// so that a loss scale meets it unrounded); it is rounded once, after the scale.
    dtype: DType,
}

impl<B: Backend + DistillOps> Backward<B, 2> for FusedBackward {
    /// The `[N, V]` gradient of the reduced loss for an upstream gradient of 1.
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let upstream = grads.consume::<B>(&ops.node);
        if let [Some(student), _] = ops.parents {
            let grad = in_dtype::<B>(B::distill_scale_grad(ops.state, upstream), self.dtype);
            grads.register::<B>(student.id, grad);
        }
    }
}

/// `t` in `dtype` (cast only where it differs).
fn in_dtype<B: Backend>(t: FloatTensor<B>, dtype: DType) -> FloatTensor<B> {
    if t.dtype() == dtype {
        t
    } else {
        B::float_cast(t, dtype.into())
    }
}

/// The backward node of [`DistillOps::distill_attach`]: each present input gets its gradient
/// from the forward pass times the `[1]` upstream gradient.
#[derive(Debug)]
struct AttachBackward {
    present: [bool; 3],
    /// The inputs' dtypes (each gradient is rounded to its input's once, after the scale).
    dtypes: [DType; 3],
}

impl<B: Backend + DistillOps> Backward<B, 3> for AttachBackward {
    /// The inputs' gradients for an upstream gradient of 1.
    type State = [FloatTensor<B>; 3];

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let upstream = grads.consume::<B>(&ops.node);
        let inputs = ops.parents.into_iter().zip(ops.state);
        for ((parent, grad), (present, dtype)) in
            inputs.zip(self.present.into_iter().zip(self.dtypes))
        {
            if let (Some(parent), true) = (parent, present) {
                let shape = grad.shape();
                let scaled = if upstream.shape().num_elements() == 1 {
                    // As one row of all its elements: the scale of a `[1]` upstream (in place
                    // on Flex, where the gradient is the loss's own).
                    let flat = B::float_reshape(grad, [1, shape.num_elements()].into());
                    B::float_reshape(B::distill_scale_grad(flat, upstream.clone()), shape)
                } else {
                    // A `PerRow` loss's `[N]` upstream over an `[N, …]` gradient's rows.
                    B::distill_scale_grad(grad, upstream.clone())
                };
                grads.register::<B>(parent.id, in_dtype::<B>(scaled, dtype));
            }
        }
    }
}

/// A fused loss of the tracked `student` (and an untracked second float input, the teacher):
/// `kernel(student, other, settings)` on the inner backend with the gradient formed where the
/// student is tracked, its loss the output of one [`FusedBackward`] node.
fn tracked<B: Backend + DistillOps, C: CheckpointStrategy>(
    student: FloatTensor<Autodiff<B, C>>,
    other: FloatTensor<Autodiff<B, C>>,
    settings: DenseSettings,
    kernel: impl FnOnce(FloatTensor<B>, FloatTensor<B>, DenseSettings) -> FusedRows<B>,
) -> FusedRows<Autodiff<B, C>> {
    let (student, student_node) = student.into_parts();
    let (other, other_node) = other.into_parts();
    let dtype = student.dtype();
    let prep = FusedBackward { dtype }
        .prepare::<C>([student_node, other_node])
        .compute_bound()
        .stateful();
    let (loss, soft, hard, grad) = match prep {
        OpsKind::Tracked(prep) => {
            let settings = DenseSettings {
                with_grad: true,
                ..settings
            };
            let out = kernel(student, other, settings);
            // The node's state is the only holder of the gradient (the output's `grad` is a
            // placeholder), so that the backward scales it in place on Flex.
            let placeholder = out.hard.clone();
            let loss = prep.finish(out.grad, out.loss);
            (loss, out.soft, out.hard, placeholder)
        }
        OpsKind::UnTracked(prep) => {
            let out = kernel(student, other, settings);
            (prep.finish(out.loss), out.soft, out.hard, out.grad)
        }
    };
    FusedRows {
        loss,
        soft: Autodiff::<B, C>::from_inner(soft),
        hard: Autodiff::<B, C>::from_inner(hard),
        grad: Autodiff::<B, C>::from_inner(grad),
    }
}

impl<B: Backend + DistillOps, C: CheckpointStrategy> DistillOps for Autodiff<B, C> {
    fn distill_dense(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        targets: IntTensor<Self>,
        scale: FloatTensor<Self>,
        settings: DenseSettings,
    ) -> FusedRows<Self> {
        let (targets, scale) = (Self::int_inner(targets), Self::inner(scale));
        tracked(student, teacher, settings, |s, t, settings| {
            B::distill_dense(s, t, targets, scale, settings)
        })
    }

    fn distill_sparse(
        student: FloatTensor<Self>,
        indices: IntTensor<Self>,
        log_probs: FloatTensor<Self>,
        targets: IntTensor<Self>,
        scale: FloatTensor<Self>,
        settings: DenseSettings,
        setup: SparseSetup,
    ) -> FusedRows<Self> {
        let (indices, targets) = (Self::int_inner(indices), Self::int_inner(targets));
        let scale = Self::inner(scale);
        tracked(student, log_probs, settings, |s, lp, settings| {
            B::distill_sparse(s, indices, lp, targets, scale, settings, setup)
        })
    }

    fn distill_attach(
        value: FloatTensor<Self>,
        a: FloatTensor<Self>,
        ga: FloatTensor<Self>,
        b: FloatTensor<Self>,
        gb: FloatTensor<Self>,
        c: FloatTensor<Self>,
        gc: FloatTensor<Self>,
        present: [bool; 3],
    ) -> FloatTensor<Self> {
        let dtypes = [a.dtype(), b.dtype(), c.dtype()];
        let nodes = [a, b, c].map(|t| t.into_parts().1);
        let value = Self::inner(value);
        let prep = AttachBackward { present, dtypes }
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful();
        match prep {
            OpsKind::Tracked(prep) => {
                let state = [Self::inner(ga), Self::inner(gb), Self::inner(gc)];
                prep.finish(state, value)
            }
            OpsKind::UnTracked(prep) => prep.finish(value),
        }
    }

    fn distill_scale_grad(
        grad: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        // Not differentiable (the backward of a loss): constants of the inner backend.
        let grad = B::distill_scale_grad(Self::inner(grad), Self::inner(upstream));
        Self::from_inner(grad)
    }
}
