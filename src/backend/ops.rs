//! The extension trait of the fused kernels: burn 0.22's `#[backend_extension]` generates its
//! `Dispatch` implementation, which routes each call to the backend of the tensors' device.

use burn::backend::{
    Backend, ExtensionType, backend_extension,
    tensor::{FloatTensor, IntTensor},
};

use crate::{DistillParams, TailPolicy};

/// The settings of one dense kernel call: the loss's parameters, whether the targets are real
/// (without them the kernel gets an empty `[0]` tensor: the extension macro takes no `Option`
/// tensors) and whether it forms the gradient.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DenseSettings {
    /// The validated loss parameters.
    pub params: DistillParams,
    /// Are the `targets` real (`false`: soft term only; the targets tensor is `[0]`)?
    pub labels: bool,
    /// Form the `[N, V]` gradient of the reduced loss with respect to the student's logits.
    pub with_grad: bool,
}

/// How a sparse teacher's entries are read: the tail policy and the generation temperature
/// `T_gen` of its log-probabilities.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparseSetup {
    pub(crate) tail: TailPolicy,
    pub(crate) generation_temperature: f64,
}

impl SparseSetup {
    /// The settings of a sparse-teacher loss (for backends implementing
    /// [`DistillOps::distill_sparse`] and their tests).
    pub fn new(tail: TailPolicy, generation_temperature: f64) -> Self {
        Self {
            tail,
            generation_temperature,
        }
    }

    /// The tail policy.
    pub fn tail(&self) -> TailPolicy {
        self.tail
    }

    /// The generation temperature `T_gen` of the log-probabilities.
    pub fn generation_temperature(&self) -> f64 {
        self.generation_temperature
    }
}

/// What a fused dense kernel returns: the loss and its parts reduced as the parameters say
/// (`[1]`, or `[N]` for `PerRow`), and the gradient of `loss` with respect to the student's
/// logits for an upstream gradient of 1 (`[N, V]`; a placeholder when not asked for).
#[derive(ExtensionType, Debug)]
#[extension_type(fusion: cfg(feature = "fusion"))]
pub struct FusedRows<B: Backend> {
    /// `α·soft + (1 − α)·hard` (`soft` without labels).
    pub loss: FloatTensor<B>,
    /// The soft term (T²-scaled if configured).
    pub soft: FloatTensor<B>,
    /// The hard term (zeros without labels).
    pub hard: FloatTensor<B>,
    /// `∂loss/∂student`, or a placeholder (`[0, V]` on Flex, `[1, V]` on CubeCL).
    pub grad: FloatTensor<B>,
}

/// The fused kernels of a backend. Implemented for Flex (the CPU kernels), for CubeCL's
/// backend (wgpu, CUDA; burn's fusion wrapper registers each call as one custom operation of
/// its stream) and for `Autodiff<B>` over any implementation (the gradient formed in the forward pass is the
/// backward node's state: no second pass over the logits).
///
/// Kernels only: the composed reference path is ordinary tensor code
/// ([`reference_loss`](super::reference_loss)), and which path runs is decided by
/// [`has_fused_kernel`](super::has_fused_kernel) before any call, so an unlisted backend never
/// reaches the macro's "not supported" panic.
#[backend_extension(
    Autodiff,
    Flex: cfg(feature = "flex"),
    Cube: cfg(feature = "cube"),
    Fusion: cfg(feature = "fusion"),
)]
pub trait DistillOps: Backend {
    /// The dense loss of `[N, V]` student and teacher logits against `[N]` targets (`[0]`
    /// without labels), in one pass over the rows. `scale` is the `[1]` factor of the
    /// reduction (`1/kept` for `Mean`, counted on the device; 1 for `PerRow`), which the
    /// gradient carries (the CPU kernel counts its kept rows itself).
    #[fusion(meta = dense_meta)]
    fn distill_dense(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        targets: IntTensor<Self>,
        scale: FloatTensor<Self>,
        settings: DenseSettings,
    ) -> FusedRows<Self>;

    /// The loss of `[N, V]` student logits against a sparse teacher: `[N, k]` token indices
    /// and log-probabilities at `T_gen` (a missing entry: `−∞`; a mask is folded in before the
    /// call), read as `setup` says; targets and `scale` as in [`DistillOps::distill_dense`].
    #[fusion(meta = sparse_meta)]
    fn distill_sparse(
        student: FloatTensor<Self>,
        indices: IntTensor<Self>,
        log_probs: FloatTensor<Self>,
        targets: IntTensor<Self>,
        scale: FloatTensor<Self>,
        settings: DenseSettings,
        setup: SparseSetup,
    ) -> FusedRows<Self>;

    /// `value` (a loss computed without autodiff: `[1]`, or `[N]` row losses) as the output of
    /// a node whose inputs are `a`, `b` and `c` and whose gradients, formed in the forward pass,
    /// are `ga`, `gb` and `gc` (for an upstream gradient of 1; `present[i]` false: input `i`
    /// gets none; with `[N]` row losses each gradient is `[N, …]`, row `i` that of loss `i`):
    /// the fused-linear losses, which form `∂h`, `∂W` and `∂b` chunk by chunk, and the
    /// vocabulary-parallel loss. Without autodiff, `value` itself.
    #[fusion(dtype = value, shape = value)]
    #[allow(clippy::too_many_arguments)]
    fn distill_attach(
        value: FloatTensor<Self>,
        a: FloatTensor<Self>,
        ga: FloatTensor<Self>,
        b: FloatTensor<Self>,
        gb: FloatTensor<Self>,
        c: FloatTensor<Self>,
        gc: FloatTensor<Self>,
        present: [bool; 3],
    ) -> FloatTensor<Self>;

    /// `grad · upstream`, the upstream gradient (`[1]`, or `[N]` for a `PerRow` loss)
    /// broadcast over each row of the `[N, V]` gradient: the backward of the fused losses.
    #[fusion(dtype = grad, shape = grad)]
    fn distill_scale_grad(
        grad: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// The outputs of [`DistillOps::distill_sparse`] on CubeCL: as the dense kernel's.
#[cfg(feature = "fusion")]
#[allow(clippy::too_many_arguments)]
fn sparse_meta(
    student: &burn::backend::fusion::custom::TensorSpec,
    _indices: &burn::backend::fusion::custom::TensorSpec,
    log_probs: &burn::backend::fusion::custom::TensorSpec,
    targets: &burn::backend::fusion::custom::TensorSpec,
    scale: &burn::backend::fusion::custom::TensorSpec,
    settings: &DenseSettings,
    _setup: &SparseSetup,
) -> FusedRowsMetadata {
    dense_meta(student, log_probs, targets, scale, settings)
}

/// The outputs of [`DistillOps::distill_dense`] on CubeCL, before the kernel runs (burn's
/// fusion wrapper defers it): f32 row values, reduced to `[1]` or `[N]`, and the gradient in
/// the kernel's gradient dtype.
#[cfg(feature = "fusion")]
fn dense_meta(
    student: &burn::backend::fusion::custom::TensorSpec,
    _teacher: &burn::backend::fusion::custom::TensorSpec,
    _targets: &burn::backend::fusion::custom::TensorSpec,
    _scale: &burn::backend::fusion::custom::TensorSpec,
    settings: &DenseSettings,
) -> FusedRowsMetadata {
    use burn::backend::fusion::custom::TensorSpec;
    use burn::tensor::{DType, Shape};
    let [n, v] = [student.shape[0], student.shape[1]];
    let rows = match settings.params.reduction.factor(1) {
        None => n,
        Some(_) => 1,
    };
    let row = || TensorSpec::new(Shape::new([rows]), DType::F32);
    let grad_rows = if settings.with_grad { n } else { 1 };
    FusedRowsMetadata {
        loss: row(),
        soft: row(),
        hard: row(),
        grad: TensorSpec::new(
            Shape::new([grad_rows, v]),
            super::cube::grad_dtype(student.dtype),
        ),
    }
}
