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
use burn::tensor::{DType, TensorMetadata, ops::FloatTensor};

use super::{DenseCall, DistillBackend, DistillParts, FusedOutput, KernelCall, SparseCall};
use super::{LinearCall, LinearGrads, LinearOutput, LinearRun, LinearSetup, LinearSide};
use super::{LogitsRun, SparseInputs, SparseLinearCall, SparseLinearRun};
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

/// A call of `Autodiff<B, C>` with `[N, V]` student logits.
type LogitsCall<B, C, T, P> = KernelCall<Autodiff<B, C>, FloatTensor<Autodiff<B, C>>, T, P>;
/// A call of `Autodiff<B, C>` with the student's hidden states and head.
type HiddenCall<B, C, T> = KernelCall<Autodiff<B, C>, LinearSide<Autodiff<B, C>>, T, LinearSetup>;

/// A fused loss whose only differentiable input is the student's logits (dense or sparse):
/// `kernel(call)` on `B`, as a tracked op; `call.with_grad` also returns the gradient.
fn fused_student<B, C, T, P>(
    call: LogitsCall<B, C, T, P>,
    kernel: impl FnOnce(KernelCall<B, FloatTensor<B>, T, P>) -> Option<FusedOutput<B>>,
) -> Option<FusedOutput<Autodiff<B, C>>>
where
    B: DistillBackend,
    C: CheckpointStrategy,
{
    let student = call.student.clone();
    let with_grad = call.with_grad;
    let call = call.map(|s, t, y| (s.primitive, t, y));
    let mut grad = None;
    let parts = fused_op::<B, C, 1>([&student], |tracked| {
        let out = kernel(call.with_grad(tracked || with_grad))?;
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

/// The inner backend's view of a sparse teacher (a constant).
fn inner_sparse<B: DistillBackend, C: CheckpointStrategy>(
    teacher: SparseInputs<Autodiff<B, C>>,
) -> SparseInputs<B> {
    SparseInputs {
        indices: teacher.indices,
        log_probs: teacher.log_probs.primitive,
        mask: teacher.mask,
        setup: teacher.setup,
    }
}

/// The inner backend's view of one side of a fused-linear loss.
fn inner_side<B: DistillBackend, C: CheckpointStrategy>(
    side: LinearSide<Autodiff<B, C>>,
) -> LinearSide<B> {
    LinearSide {
        hidden: side.hidden.primitive,
        weight: side.weight.primitive,
        bias: side.bias.map(|b| b.primitive),
    }
}

/// A fused-linear loss as an op of the student's hidden states and, where the setup computes
/// their gradients (and the head is trained, see `tracked_setup`), its weight and bias: `run`
/// on `B` with the teacher's inputs as `teacher` gives them.
fn linear_op<B: DistillBackend, C: CheckpointStrategy, T, T2>(
    call: HiddenCall<B, C, T>,
    teacher: impl FnOnce(T) -> T2,
    run: impl FnOnce(KernelCall<B, LinearSide<B>, T2, LinearSetup>) -> Option<LinearOutput<B>>,
) -> Option<DistillParts<Autodiff<B, C>>> {
    let student = call.student.clone();
    let setup = tracked_setup(&student, &call.settings);
    let mut call = call.map(|s, t, y| (inner_side(s), teacher(t), y));
    call.settings = setup;
    let forward = |tracked: bool| {
        let (parts, grads) = run(call.with_grad(tracked))?;
        Some((parts, grads.map(LinearGrads::into_vec).unwrap_or_default()))
    };
    let h = &student.hidden;
    let w = setup.weight_grad.then_some(&student.weight);
    let b = student.bias.as_ref().filter(|_| setup.bias_grad);
    match (w, b) {
        (Some(w), Some(b)) => fused_op::<B, C, 3>([h, w, b], forward),
        (Some(w), None) => fused_op::<B, C, 2>([h, w], forward),
        (None, Some(b)) => fused_op::<B, C, 2>([h, b], forward),
        (None, None) => fused_op::<B, C, 1>([h], forward),
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
    fn distill_fused(call: DenseCall<Self>) -> Option<FusedOutput<Self>> {
        fused_student(call.map(|s, t, y| (s, t.primitive, y)), B::distill_fused)
    }

    /// The sparse kernel of `B` as a tracked op of the student (the teacher is a constant).
    fn distill_sparse_fused(call: SparseCall<Self>) -> Option<FusedOutput<Self>> {
        fused_student(
            call.map(|s, t, y| (s, inner_sparse(t), y)),
            B::distill_sparse_fused,
        )
    }

    /// `run` on `B` (for the vocabulary-parallel loss, where the peers registered with
    /// burn-collective) as a tracked op of the student's logits; the backward only scales the
    /// gradient computed in the forward, so it communicates nothing.
    fn distill_logits_tracked<R: LogitsRun>(
        run: &R,
        call: DenseCall<Self>,
    ) -> Result<FusedOutput<Self>, DistillError> {
        let mut error = None;
        let call = call.map(|s, t, y| (s, t.primitive, y));
        let out = fused_student(call, |call| {
            run.run::<B>(call).map_err(|e| error = Some(e)).ok()
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
        call: LinearCall<Self>,
    ) -> Result<Option<DistillParts<Self>>, DistillError> {
        let mut error = None;
        let out = linear_op(call, inner_side, |call| match run.run::<B>(call) {
            Ok(out) => out,
            Err(e) => {
                error = Some(e);
                None
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
        call: SparseLinearCall<Self>,
    ) -> Option<DistillParts<Self>> {
        linear_op(call, inner_sparse, |call| run.run::<B>(call))
    }
}
