//! The backend extension trait that the loss dispatches through.

use burn::tensor::{
    Int, Tensor, TensorPrimitive,
    backend::Backend,
    ops::{FloatTensor, IntTensor},
};

use crate::{Divergence, kernel::reference};

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

/// A backend that can compute distillation losses.
///
/// This is the extension point of the crate (in the style of `burn-vision`'s `VisionBackend`):
/// [`DistillLoss`](crate::DistillLoss) calls [`DistillBackend::distill_rows`] and reduces the
/// result. Every method has a default body, the [reference implementation](mod@crate::kernel::reference) built
/// from burn tensor ops, so any backend can opt in with an empty `impl`. It is implemented for
/// NdArray, Flex, the CubeCL backends (wgpu, CUDA), burn's `Fusion` wrapper and `Autodiff<B>`.
pub trait DistillBackend: Backend {
    /// Row losses of `[N, V]` student and teacher logits against optional `[N]` targets.
    ///
    /// Shapes and parameters have already been validated by the caller.
    fn distill_rows(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        targets: Option<IntTensor<Self>>,
        params: &DistillParams,
    ) -> DistillRows<Self> {
        let rows = reference::distill_rows::<Self>(
            Tensor::from_primitive(TensorPrimitive::Float(student)),
            Tensor::from_primitive(TensorPrimitive::Float(teacher)),
            targets.map(Tensor::<Self, 1, Int>::from_primitive),
            params,
        );
        DistillRows {
            loss: rows.loss.into_primitive().tensor(),
            soft: rows.soft.into_primitive().tensor(),
            hard: rows.hard.map(|h| h.into_primitive().tensor()),
        }
    }
}

impl<B: DistillBackend, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy>
    DistillBackend for burn::backend::Autodiff<B, C>
{
}

#[cfg(feature = "ndarray")]
mod ndarray {
    use burn::backend::ndarray::{
        FloatNdArrayElement, IntNdArrayElement, NdArray, NdArrayTensor, QuantElement, SharedArray,
    };

    impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> super::DistillBackend
        for NdArray<E, I, Q>
    where
        NdArrayTensor: From<SharedArray<E>>,
        NdArrayTensor: From<SharedArray<I>>,
    {
    }
}

#[cfg(feature = "flex")]
impl DistillBackend for burn::backend::Flex {}

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
