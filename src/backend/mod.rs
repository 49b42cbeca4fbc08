//! The backend extension trait that the loss dispatches through, and one home per backend
//! family for its implementation (in the style of `burn-vision`):
//!
//! - [`autodiff`](self): `Autodiff<B>` (the fused kernel of `B` wrapped in one generic backward
//!   node, `FusedBackward`, for any number of differentiable inputs);
//! - `fusion`: burn's `Fusion<B>` wrapper (one custom operation of the fusion stream);
//! - `ndarray`, `flex`: the CPU kernel of [`crate::kernel`] on host slices (shared glue in
//!   `cpu`);
//! - `cube`: the CubeCL kernel on wgpu and CUDA.
//!
//! The math lives in [`crate::kernel`]; this module only moves tensors in and out.

use burn::tensor::{
    DType, Int, Tensor, TensorMetadata, TensorPrimitive,
    backend::Backend,
    ops::{FloatTensor, IntTensor},
};

use crate::{
    DistillError, Kernel,
    kernel::reference,
    reduction::{ignored_rows, reduce_rows},
};

pub use crate::params::DistillParams;
pub use call::{
    DenseCall, KernelCall, LinearCall, SparseCall, SparseInputs, SparseLinearCall, SparseSetup,
};
pub use linear_io::{LinearGrads, LinearOutput, LinearSetup, LinearSide};

/// The reduced loss and its parts, as backend primitives: `[1]` for `Mean`, `Sum` and
/// `Normalized`, `[N]` for `PerRow` (row values: `0` for ignored rows, NaN for rows whose target is
/// out of range).
#[derive(Debug, Clone)]
pub struct DistillParts<B: Backend> {
    /// `α·soft + (1 − α)·hard` (`soft` without targets), differentiable with respect to the
    /// student's inputs only (its logits; for the fused-linear loss its hidden states and head).
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
    /// `[N, V]` gradient of `loss` with respect to the student logits (for `Reduction::PerRow`,
    /// row `i` holds the gradient of row loss `i`); zero on ignored and bad rows. Its dtype is
    /// [`DistillBackend::fused_grad_dtype`] of the logits'.
    pub grad: Option<FloatTensor<B>>,
}

/// A fused-linear loss run on the backend that holds the values, producing the gradients of
/// the student's differentiable inputs in its forward pass. The losses implement it (the
/// kernel where the backend has one, the composed chunk loop otherwise); the backend's tracked
/// methods run it, on `B` itself or on the inner backend of `Autodiff<B>`, which wraps the
/// result in one backward op. The backend layer thus never imports a loss.
pub trait LinearRun {
    /// The loss parts and, with `with_grad`, the student's gradients; `Ok(None)` where this
    /// run cannot produce them (`Reduction::PerRow` with a gradient, no fused kernel for a
    /// gradient): the caller then materialises the logits, or reports why not.
    fn run<B: DistillBackend>(
        &self,
        call: LinearCall<B>,
    ) -> Result<Option<LinearOutput<B>>, DistillError>;
}

/// [`LinearRun`] against a sparse teacher.
pub trait SparseLinearRun {
    /// As [`LinearRun::run`]; `None` where no fused sparse kernel applies.
    fn run<B: DistillBackend>(&self, call: SparseLinearCall<B>) -> Option<LinearOutput<B>>;
}

/// A loss of `[N, V]` logits run on the backend that holds the values, producing the gradient
/// of the student's logits in its forward pass (as [`LinearRun`]: the vocabulary-parallel loss).
pub trait LogitsRun {
    /// The reduced loss and parts and, with `with_grad`, the gradient.
    fn run<B: DistillBackend>(&self, call: DenseCall<B>) -> Result<FusedOutput<B>, DistillError>;
}

/// A backend that can compute distillation losses.
///
/// This is the extension point of the crate (in the style of `burn-vision`'s `VisionBackend`):
/// [`DistillLoss`](crate::DistillLoss) validates its inputs and calls
/// [`DistillBackend::distill_loss`]. Every method has a default body, so any backend can opt
/// in with an empty `impl` and gets the reference implementation
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

    /// The dtype of the losses the fused kernel returns for logits of dtype `logits` (the
    /// logits' own by default; f32 on the CubeCL backends). The gradient has
    /// [`DistillBackend::fused_grad_dtype`].
    fn fused_loss_dtype(logits: DType) -> DType {
        logits
    }

    /// The dtype of the gradient the fused kernels return for logits of dtype `logits` (the
    /// logits' own by default; f32 for f16 logits on the CubeCL backends, so that a loss scale
    /// applied in the backward pass meets the unrounded gradient). The backward pass casts the
    /// scaled gradient to the logits' dtype.
    fn fused_grad_dtype(logits: DType) -> DType {
        logits
    }

    /// Can the fused kernels run on `[N, V]` logits on `device`? (True by default; the CubeCL
    /// backends need 64-bit addresses past `u32::MAX` elements.) Where not, the composed
    /// reference runs.
    fn fused_kernel_fits(_dims: [usize; 2], _device: &Self::Device) -> bool {
        true
    }

    /// The fused kernel: the reduced loss of `[N, V]` logits and, when `with_grad`, its
    /// `[N, V]` gradient with respect to the student logits; `None` where this backend has no
    /// fused kernel for these inputs (the default).
    fn distill_fused(_call: DenseCall<Self>) -> Option<FusedOutput<Self>> {
        None
    }

    /// Does this backend have a fused sparse-teacher kernel for student logits of dtype
    /// `dtype` and `k` teacher entries per row? (None by default.)
    fn has_sparse_fused_kernel(_dtype: DType, _k: usize) -> bool {
        false
    }

    /// The fused sparse-teacher kernel (see [`SparseDistillLoss`](crate::SparseDistillLoss)):
    /// the reduced loss of `[N, V]` student logits against a top-k teacher and, when
    /// `with_grad`, its `[N, V]` gradient; `None` where
    /// [`DistillBackend::has_sparse_fused_kernel`] is false (the default: the composed
    /// reference runs).
    fn distill_sparse_fused(_call: SparseCall<Self>) -> Option<FusedOutput<Self>> {
        None
    }

    /// Runs `run`, a loss of `[N, V]` logits that produces its own gradient (the
    /// vocabulary-parallel loss), as one tracked op of the student's logits: on this backend
    /// by default; `Autodiff<B>` runs it on `B` and scales the gradient in the backward pass.
    fn distill_logits_tracked<R: LogitsRun>(
        run: &R,
        call: DenseCall<Self>,
    ) -> Result<FusedOutput<Self>, DistillError> {
        run.run::<Self>(call)
    }

    /// The backward step of the fused kernel: `grad · upstream`, where `upstream` is the
    /// gradient of the loss output (`[1]` for the reductions to one value, `[N]` for `PerRow`),
    /// computed in the gradient's dtype (f32 for f16 logits on CubeCL: the upstream, e.g. a
    /// loss scale of 65,536, is never rounded to f16); the caller casts the result to the
    /// logits' dtype.
    fn distill_scale_grad(
        grad: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let n = upstream.shape()[0];
        let upstream = Tensor::<Self, 1>::from_primitive(TensorPrimitive::Float(upstream))
            .cast(grad.dtype())
            .reshape([n, 1]);
        Self::float_mul(grad, upstream.into_primitive().tensor())
    }

    /// Runs `run`, a fused-linear loss (see
    /// [`DistillLoss::forward_linear`](crate::DistillLoss::forward_linear)), as one tracked op
    /// of the student's hidden states and (where trained) head weight and bias: on this backend
    /// without gradients by default; `Autodiff<B>` runs it on `B` with the gradients computed
    /// chunk by chunk in the forward pass. `Ok(None)` where `run` gives none (the loss then
    /// materialises the logits, or says why it cannot: the vocabulary-parallel loss with
    /// `Reduction::PerRow` and a gradient).
    fn distill_linear_tracked<R: LinearRun>(
        run: &R,
        call: LinearCall<Self>,
    ) -> Result<Option<DistillParts<Self>>, DistillError> {
        Ok(run
            .run::<Self>(call.with_grad(false))?
            .map(|(parts, _)| parts))
    }

    /// [`DistillBackend::distill_linear_tracked`] against a sparse teacher (see
    /// [`SparseDistillLoss::forward_linear`](crate::SparseDistillLoss::forward_linear)); `None`
    /// where no fused sparse kernel applies (the loss then materialises the logits).
    fn distill_sparse_linear_tracked<R: SparseLinearRun>(
        run: &R,
        call: SparseLinearCall<Self>,
    ) -> Option<DistillParts<Self>> {
        run.run::<Self>(call.with_grad(false))
            .map(|(parts, _)| parts)
    }

    /// The fused-linear sparse kernel: the loss parts and, with `call.with_grad`, the student's
    /// gradients, computed `call.settings.chunk_rows()` kept rows at a time against the
    /// teacher's rows;
    /// `None` where this backend has no such kernel for these inputs (the default: the loss
    /// then runs its composed chunk loop around [`DistillBackend::distill_sparse_fused`]).
    /// NdArray and Flex run the host loop of the dense fused-linear loss around their sparse
    /// row kernel.
    fn distill_sparse_linear_chunked(_call: SparseLinearCall<Self>) -> Option<LinearOutput<Self>> {
        None
    }

    /// The default memory budget of the fused-linear losses' chunks (see
    /// [`DistillLossConfig::linear_chunk_bytes`](crate::DistillLossConfig::linear_chunk_bytes)):
    /// 64 MiB, overridden by the CubeCL backends (512 MiB).
    fn linear_chunk_bytes() -> usize {
        64 << 20
    }

    /// The fused-linear kernel: the loss parts and, with `call.with_grad`, the student's
    /// gradients (hidden states, head weight and bias), computed `call.settings.chunk_rows()`
    /// kept rows at a time; `None` where this backend has no such kernel for these inputs (the default: the
    /// loss then runs its composed chunk loop around [`DistillBackend::distill_fused`]).
    /// NdArray and Flex run one host loop with buffers allocated once and GEMMs that
    /// accumulate in place.
    fn distill_linear_chunked(_call: LinearCall<Self>) -> Option<LinearOutput<Self>> {
        None
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
        if kernel != Kernel::Reference
            && Self::has_fused_kernel(&student, &teacher)
            && let Some(out) = Self::distill_fused(DenseCall::new(
                student.clone(),
                teacher.clone(),
                targets.clone(),
                *params,
            ))
        {
            return out.parts;
        }
        reference_loss::<Self>(student, teacher, targets, params)
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
    let student = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(student));
    let teacher = Tensor::from_primitive(TensorPrimitive::Float(teacher));
    let soft = reference::soft_rows(student.clone(), teacher, params);
    // Ignored rows 0, rows with an out-of-range target NaN: an unchecked bad target never
    // gives a plausible-looking loss.
    let rows = reference::mix_rows(soft, student, targets, params);
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

/// The capability methods of a wrapper backend (`Autodiff<B>`, `Fusion<B>`): those of the
/// inner backend `$inner`.
macro_rules! inner_capabilities {
    ($inner:ident) => {
        fn fused_kernel_dtypes() -> &'static [burn::tensor::DType] {
            $inner::fused_kernel_dtypes()
        }

        fn fused_loss_dtype(logits: burn::tensor::DType) -> burn::tensor::DType {
            $inner::fused_loss_dtype(logits)
        }

        fn fused_grad_dtype(logits: burn::tensor::DType) -> burn::tensor::DType {
            $inner::fused_grad_dtype(logits)
        }

        fn fused_kernel_fits(dims: [usize; 2], device: &Self::Device) -> bool {
            $inner::fused_kernel_fits(dims, device)
        }

        fn has_sparse_fused_kernel(dtype: burn::tensor::DType, k: usize) -> bool {
            $inner::has_sparse_fused_kernel(dtype, k)
        }

        fn linear_chunk_bytes() -> usize {
            $inner::linear_chunk_bytes()
        }
    };
}

mod autodiff;
mod call;
#[cfg(any(feature = "ndarray", feature = "flex"))]
mod cpu;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod cube;
#[cfg(feature = "flex")]
mod flex;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod fusion;
mod linear_io;
#[cfg(feature = "ndarray")]
mod ndarray;
