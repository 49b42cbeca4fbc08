//! `Autodiff<B>`: fused losses of `B` wrapped in one generic backward node.
//!
//! Every fused loss of the crate computes its gradients in the forward pass (the row is in
//! cache then; a second pass would read it again). [`FusedBackward`] is the one autodiff op they
//! all use, for any number of differentiable inputs (the dense loss: the student logits; the
//! fused-linear loss: the student's hidden states, head weight and bias): the forward stores
//! `∂loss/∂input` for each, and the backward scales them by the upstream gradient.

use burn::backend::autodiff::{
    Autodiff,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::tensor::{
    DType, TensorMetadata,
    ops::{FloatTensor, IntTensor},
};

use super::{DistillBackend, DistillParams, DistillParts, FusedOutput, SparseInputs, SparseSetup};
use super::{LinearGrads, LinearRun, LinearSetup, LinearSide, LogitsRun, SparseLinearRun};
use crate::DistillError;

/// Backward of a fused loss with `N` differentiable inputs: the gradients computed by the
/// forward pass (one per input, in order), times the upstream gradient.
#[derive(Debug)]
struct FusedBackward<const N: usize>;

impl<B: DistillBackend, const N: usize> Backward<B, N> for FusedBackward<N> {
    /// `∂ loss / ∂ input_k`, computed by the forward pass (possibly in a wider dtype than the
    /// input's: [`DistillBackend::fused_grad_dtype`]), and the dtype of each input.
    type State = (Vec<FloatTensor<B>>, Vec<DType>);

    fn backward(
        self,
        ops: Ops<Self::State, N>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let upstream = grads.consume::<B>(&ops.node);
        let (state, dtypes) = ops.state;
        for ((parent, grad), dtype) in ops.parents.into_iter().zip(state).zip(dtypes) {
            let Some(parent) = parent else { continue };
            let grad = if grad.shape().num_dims() == 2 {
                B::distill_scale_grad(grad, upstream.clone())
            } else {
                let upstream = B::float_cast(upstream.clone(), grad.dtype().into());
                B::float_mul(grad, upstream)
            };
            // Scaled in the gradient's dtype, rounded once to the input's.
            let grad = if grad.dtype() == dtype {
                grad
            } else {
                B::float_cast(grad, dtype.into())
            };
            grads.register::<B>(parent.id, grad);
        }
    }
}

/// A fused loss as an autodiff op of `N` inputs.
///
/// `forward(tracked)` runs on the inner backend and returns the loss parts and, when
/// `tracked`, the gradients of `parts.loss` with respect to the `N` inputs (in order); `None`
/// where it cannot (no fused kernel for these inputs). Everything else the closure uses is a
/// constant: it gets no gradient and its graph is not extended.
fn fused_op<B, C, const N: usize>(
    inputs: [&FloatTensor<Autodiff<B, C>>; N],
    forward: impl FnOnce(bool) -> Option<(DistillParts<B>, Vec<FloatTensor<B>>)>,
) -> Option<DistillParts<Autodiff<B, C>>>
where
    B: DistillBackend,
    C: CheckpointStrategy,
{
    let dtypes: Vec<DType> = inputs.iter().map(|t| t.primitive.dtype()).collect();
    let (loss, parts) = match FusedBackward::<N>
        .prepare::<C>(inputs.map(|t| t.node.clone()))
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (parts, grads) = forward(true)?;
            // A kernel asked for its gradients that returned fewer is a bug of that kernel;
            // fail loudly rather than train without them.
            assert_eq!(
                grads.len(),
                N,
                "burn-distill: a fused kernel omitted a gradient"
            );
            (prep.finish((grads, dtypes), parts.loss.clone()), parts)
        }
        OpsKind::UnTracked(prep) => {
            let (parts, _) = forward(false)?;
            (prep.finish(parts.loss.clone()), parts)
        }
    };
    Some(DistillParts {
        loss,
        soft: constant::<B, C>(parts.soft),
        hard: parts.hard.map(constant::<B, C>),
    })
}

/// `tensor` as a constant of `Autodiff<B, C>`: what `AutodiffBackend::from_inner` does, but
/// without requiring `Autodiff<B, C>: AutodiffBackend`, which burn's `distributed` feature
/// (burn-train's DDP) grants only where `B: DistributedBackend` (not NdArray or Flex); so the
/// crate compiles, and runs on every backend, with that feature on.
fn constant<B, C>(tensor: FloatTensor<B>) -> FloatTensor<Autodiff<B, C>>
where
    B: DistillBackend,
    C: CheckpointStrategy,
{
    match FusedBackward::<0>
        .prepare::<C>([])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((Vec::new(), Vec::new()), tensor),
        OpsKind::UnTracked(prep) => prep.finish(tensor),
    }
}

/// A fused loss whose only differentiable input is the student's logits (dense or sparse):
/// `run(student, with_grad)` on `B`, as a tracked op; `with_grad` also returns the gradient.
fn fused_student<B, C>(
    student: &FloatTensor<Autodiff<B, C>>,
    with_grad: bool,
    run: impl FnOnce(FloatTensor<B>, bool) -> Option<FusedOutput<B>>,
) -> Option<FusedOutput<Autodiff<B, C>>>
where
    B: DistillBackend,
    C: CheckpointStrategy,
{
    let mut grad = None;
    let parts = fused_op::<B, C, 1>([student], |tracked| {
        let out = run(student.primitive.clone(), tracked || with_grad)?;
        if with_grad {
            grad = out.grad.clone();
        }
        let grads = if tracked {
            out.grad.into_iter().collect()
        } else {
            Vec::new()
        };
        Some((out.parts, grads))
    })?;
    Some(FusedOutput {
        parts,
        grad: grad.map(constant::<B, C>),
    })
}

/// The inner backend's view of one side of a fused-linear loss.
fn inner_side<B: DistillBackend, C: CheckpointStrategy>(
    side: &LinearSide<Autodiff<B, C>>,
) -> LinearSide<B> {
    LinearSide {
        hidden: side.hidden.primitive.clone(),
        weight: side.weight.primitive.clone(),
        bias: side.bias.as_ref().map(|b| b.primitive.clone()),
    }
}

/// A fused-linear loss as an op of the student's hidden states and, where `setup` computes
/// their gradients, its weight and bias.
fn linear_op<B: DistillBackend, C: CheckpointStrategy>(
    student: &LinearSide<Autodiff<B, C>>,
    setup: &LinearSetup,
    run: impl FnOnce(bool) -> Option<(DistillParts<B>, Vec<FloatTensor<B>>)>,
) -> Option<DistillParts<Autodiff<B, C>>> {
    let h = &student.hidden;
    let w = setup.weight_grad.then_some(&student.weight);
    let b = student.bias.as_ref().filter(|_| setup.bias_grad);
    match (w, b) {
        (Some(w), Some(b)) => fused_op::<B, C, 3>([h, w, b], run),
        (Some(w), None) => fused_op::<B, C, 2>([h, w], run),
        (None, Some(b)) => fused_op::<B, C, 2>([h, b], run),
        (None, None) => fused_op::<B, C, 1>([h], run),
    }
}

/// `setup` with the head's gradients left out where the weight or bias does not require one
/// (a frozen `Param`): no `[H, V]` product for a head nobody trains.
fn tracked_setup<B: DistillBackend, C: CheckpointStrategy>(
    student: &LinearSide<Autodiff<B, C>>,
    setup: &LinearSetup,
) -> LinearSetup {
    let tracked = |t: &FloatTensor<Autodiff<B, C>>| !t.node.requirement.is_none();
    LinearSetup {
        weight_grad: setup.weight_grad && tracked(&student.weight),
        bias_grad: setup.bias_grad && student.bias.as_ref().is_some_and(tracked),
        ..*setup
    }
}

impl<B: DistillBackend, C: CheckpointStrategy> DistillBackend for Autodiff<B, C> {
    inner_capabilities!(B);

    /// The fused kernel of `B` as a tracked op of the student (see `fused_op`); the default
    /// [`DistillBackend::distill_loss`] then differentiates through it.
    fn distill_fused(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        targets: Option<IntTensor<Self>>,
        params: &DistillParams,
        with_grad: bool,
    ) -> Option<FusedOutput<Self>> {
        fused_student(&student, with_grad, |student, with_grad| {
            B::distill_fused(student, teacher.primitive, targets, params, with_grad)
        })
    }

    /// The sparse kernel of `B` as a tracked op of the student (the teacher is a constant).
    fn distill_sparse_fused(
        student: FloatTensor<Self>,
        teacher: SparseInputs<Self>,
        targets: Option<IntTensor<Self>>,
        params: &DistillParams,
        setup: SparseSetup,
        with_grad: bool,
    ) -> Option<FusedOutput<Self>> {
        let teacher = SparseInputs::<B> {
            indices: teacher.indices,
            log_probs: teacher.log_probs.primitive,
            mask: teacher.mask,
        };
        fused_student(&student, with_grad, |student, with_grad| {
            B::distill_sparse_fused(student, teacher, targets, params, setup, with_grad)
        })
    }

    /// `run` on `B` (for the vocabulary-parallel loss, where the peers registered with
    /// burn-collective) as a tracked op of the student's logits; the backward only scales the
    /// gradient computed in the forward, so it communicates nothing.
    fn distill_logits_tracked<R: LogitsRun>(
        run: &R,
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        targets: Option<IntTensor<Self>>,
        params: &DistillParams,
        with_grad: bool,
    ) -> Result<FusedOutput<Self>, DistillError> {
        let mut error = None;
        let out = fused_student(&student, with_grad, |student, with_grad| {
            run.run::<B>(student, teacher.primitive, targets, params, with_grad)
                .map_err(|e| error = Some(e))
                .ok()
        });
        // `None` only comes from an error of `run`, recorded in `error`.
        out.ok_or_else(|| {
            error.unwrap_or_else(|| DistillError::Collective {
                operation: "tracked loss".into(),
                message: "no output".into(),
            })
        })
    }

    /// `run` chunk by chunk on `B`, with the student's gradients produced in the forward (one
    /// op with the hidden states and, where trained, the weight and the bias as inputs).
    fn distill_linear_tracked<R: LinearRun>(
        run: &R,
        student: LinearSide<Self>,
        teacher: LinearSide<Self>,
        targets: Option<IntTensor<Self>>,
        setup: &LinearSetup,
    ) -> Result<Option<DistillParts<Self>>, DistillError> {
        let (s, t) = (inner_side(&student), inner_side(&teacher));
        let setup = &tracked_setup(&student, setup);
        let mut error = None;
        let out = linear_op(&student, setup, |tracked| {
            match run.run::<B>(s, t, targets, setup, tracked) {
                Ok(out) => {
                    out.map(|(parts, g)| (parts, g.map(LinearGrads::into_vec).unwrap_or_default()))
                }
                Err(e) => {
                    error = Some(e);
                    None
                }
            }
        });
        match error {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// [`Self::distill_linear_tracked`] against a sparse teacher.
    fn distill_sparse_linear_tracked<R: SparseLinearRun>(
        run: &R,
        student: LinearSide<Self>,
        teacher: SparseInputs<Self>,
        targets: Option<IntTensor<Self>>,
        setup: &LinearSetup,
        sparse: SparseSetup,
    ) -> Option<DistillParts<Self>> {
        let s = inner_side(&student);
        let t = SparseInputs::<B> {
            indices: teacher.indices,
            log_probs: teacher.log_probs.primitive,
            mask: teacher.mask,
        };
        let setup = &tracked_setup(&student, setup);
        linear_op(&student, setup, |tracked| {
            let (parts, grads) = run.run::<B>(s, t, targets, setup, sparse, tracked)?;
            Some((parts, grads.map(LinearGrads::into_vec).unwrap_or_default()))
        })
    }
}
