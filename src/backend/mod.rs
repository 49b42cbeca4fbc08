//! What a backend implementer needs: the extension trait of the fused kernels
//! ([`DistillOps`]), its inputs and outputs, and the choice between a backend's kernel and the
//! composed reference path.
//!
//! A training loop never calls anything here: the losses of the crate root dispatch through
//! it. One home per backend family: `flex.rs` (the CPU kernels on Flex's host memory), and
//! `autodiff.rs` (the backward node of every fused loss).

use burn::backend::{Dispatch, DispatchDevice, DispatchTensor};
use burn::tensor::{DType, Device, Int, Tensor};

use crate::{
    DistillError, DistillParams, Kernel,
    kernel::reference,
    reduction::{ignored_rows, reduce_rows},
};

mod autodiff;
#[cfg(feature = "cube")]
mod cube;
#[cfg(feature = "flex")]
mod flex;
#[cfg(feature = "flex")]
mod flex_linear;
mod ops;

#[cfg(feature = "flex")]
pub(crate) use flex_linear::{HostLinearPlan, HostLinearSide, HostLinearTeacher};

pub use ops::{DenseSettings, DistillOps, FusedRows, SparseSetup};

/// A loss reduced as its parameters say, with its soft and hard parts: `[1]` for `Mean`,
/// `Sum` and `Normalized`, `[N]` for `PerRow` (row values: `0` for ignored rows, NaN for rows
/// whose target is out of range).
#[derive(Debug, Clone)]
pub struct DistillParts {
    /// `α·soft + (1 − α)·hard` (`soft` without targets), differentiable with respect to the
    /// student's inputs only.
    pub loss: Tensor<1>,
    /// The soft term (T²-scaled if configured), detached.
    pub soft: Tensor<1>,
    /// The hard term, detached; `None` without targets.
    pub hard: Option<Tensor<1>>,
}

/// Does the device have a fused dense kernel for logits of `dtype`? Flex: f32 and f64; the
/// CubeCL backends (wgpu, CUDA): f32, f16 and bf16 (with or without autodiff).
pub fn has_fused_kernel(device: &Device, dtype: DType) -> bool {
    fused_dtypes(device.as_dispatch()).contains(&dtype)
}

/// The logit dtypes of a device's fused dense kernel (none on a backend without one).
fn fused_dtypes(device: &DispatchDevice) -> &'static [DType] {
    match device {
        #[cfg(feature = "flex")]
        DispatchDevice::Flex(_) => flex::CPU_DTYPES,
        #[cfg(feature = "cube")]
        DispatchDevice::Cube(_) => cube::CUBE_DTYPES,
        DispatchDevice::Autodiff(device) => fused_dtypes(&device.clone().inner()),
        #[allow(unreachable_patterns)]
        _ => &[],
    }
}

/// The dense loss of `[N, V]` rows by the kernel `kernel` asks for: the device's fused kernel
/// (`Auto` where it has one, `Fused` always, an error where it has none) or the reference.
pub(crate) fn dense(
    student: Tensor<2>,
    teacher: Tensor<2>,
    targets: Option<Tensor<1, Int>>,
    params: &DistillParams,
    kernel: Kernel,
) -> Result<DistillParts, DistillError> {
    let (device, dtype) = (student.device(), student.dtype());
    let fused = has_fused_kernel(&device, dtype)
        && teacher.dtype() == dtype
        && fits(&device, student.dims());
    match kernel {
        Kernel::Reference => Ok(reference_loss(student, teacher, targets, params)),
        Kernel::Auto if !fused => Ok(reference_loss(student, teacher, targets, params)),
        Kernel::Fused if !fused => Err(DistillError::invalid(
            "kernel",
            "Kernel::Fused",
            format!(
                "Kernel::Auto or Kernel::Reference: device {device:?} has no fused \
                 distillation kernel for {dtype:?} student and {:?} teacher logits",
                teacher.dtype()
            ),
        )),
        _ => Ok(fused_loss(student, teacher, targets, params)),
    }
}

/// Can the fused kernel take `[N, V]` logits on this device? The CubeCL kernel addresses with
/// 32-bit offsets here (`N·V ≤ u32::MAX` elements; beyond, the reference runs); the CPU
/// kernel takes any size.
fn fits(device: &Device, [n, v]: [usize; 2]) -> bool {
    match device.as_dispatch() {
        #[cfg(feature = "cube")]
        DispatchDevice::Cube(_) => n.saturating_mul(v) <= u32::MAX as usize,
        DispatchDevice::Autodiff(inner) => fits(&Device::new(inner.clone().inner()), [n, v]),
        #[allow(unreachable_patterns)]
        _ => true,
    }
}

/// The dense loss by the device's fused kernel (one pass over the rows; under autodiff the
/// gradient is formed in that pass).
fn fused_loss(
    student: Tensor<2>,
    teacher: Tensor<2>,
    targets: Option<Tensor<1, Int>>,
    params: &DistillParams,
) -> DistillParts {
    let call = KernelInputs::new(&student, targets, params);
    let out = <Dispatch as DistillOps>::distill_dense(
        student.into_dispatch(),
        teacher.detach().into_dispatch(),
        call.targets.into_dispatch(),
        call.scale.into_dispatch(),
        call.settings,
    );
    call.settings.parts(out)
}

/// The default memory budget of a fused-linear loss's chunks on `device`: 64 MiB on the CPU
/// (Flex), 512 MiB on CubeCL (wgpu, CUDA), where every chunk also pays an `[H, V]`
/// weight-gradient product and a launch of every op, so that chunks of a few dozen rows at a
/// 128k vocabulary would spend more time there than in the loss.
pub fn linear_chunk_bytes(device: &Device) -> usize {
    if is_cube(device.as_dispatch()) {
        512 << 20
    } else {
        64 << 20
    }
}

/// The fused-linear loss by the device's host loop (Flex: in-place GEMMs around the CPU row
/// kernels, buffers allocated once per call) on tensors without autodiff; `None` on another
/// device or dtype, or for `Reduction::PerRow` with a gradient (the loss then runs its chunks
/// as tensor code).
#[cfg(feature = "flex")]
pub(crate) fn linear_host(
    student: &HostLinearSide,
    teacher: &HostLinearTeacher,
    targets: Option<&Tensor<1, Int>>,
    plan: &HostLinearPlan,
) -> Option<(DistillParts, Option<flex_linear::HostLinearGrads>)> {
    match student.0.device().as_dispatch() {
        DispatchDevice::Flex(_) if plan.kernel != Kernel::Reference => {
            flex_linear::linear_host(student, teacher, targets, plan)
        }
        _ => None,
    }
}

/// One chunk of a fused-linear loss: the dense loss of `[c, V]` logits (tensors without
/// autodiff) by the device's fused kernel, with its `[c, V]` gradient when `with_grad`; by the
/// reference without one (`Kernel::Reference`, or a device without a kernel); `None` where a
/// gradient is asked and only the reference could run (the caller materialises the logits).
pub(crate) fn dense_chunk(
    student: Tensor<2>,
    teacher: Tensor<2>,
    targets: Option<Tensor<1, Int>>,
    params: &DistillParams,
    kernel: Kernel,
    with_grad: bool,
) -> Option<(DistillParts, Option<Tensor<2>>)> {
    let (device, dtype) = (student.device(), student.dtype());
    let fused = kernel != Kernel::Reference
        && has_fused_kernel(&device, dtype)
        && teacher.dtype() == dtype
        && fits(&device, student.dims());
    if !fused {
        return (!with_grad).then(|| (reference_loss(student, teacher, targets, params), None));
    }
    let mut call = KernelInputs::new(&student, targets, params);
    call.settings.with_grad = with_grad;
    let out = <Dispatch as DistillOps>::distill_dense(
        student.into_dispatch(),
        teacher.into_dispatch(),
        call.targets.into_dispatch(),
        call.scale.into_dispatch(),
        call.settings,
    );
    let grad = with_grad.then(|| Tensor::from_dispatch(out.grad.clone()));
    Some((call.settings.parts(out), grad))
}

/// One chunk of a sparse fused-linear loss, as [`dense_chunk`] against a sparse teacher's rows;
/// `None` where no fused kernel runs it (the caller materialises the logits, or runs the
/// composed sparse path).
pub(crate) fn sparse_chunk(
    student: Tensor<2>,
    (indices, log_probs): (Tensor<2, Int>, Tensor<2>),
    targets: Option<Tensor<1, Int>>,
    params: &DistillParams,
    setup: SparseSetup,
    with_grad: bool,
) -> Option<(DistillParts, Option<Tensor<2>>)> {
    let (device, dtype, k) = (student.device(), student.dtype(), indices.dims()[1]);
    if !(has_sparse_fused_kernel(&device, dtype, k) && fits(&device, student.dims())) {
        return None;
    }
    let mut call = KernelInputs::new(&student, targets, params);
    call.settings.with_grad = with_grad;
    let out = <Dispatch as DistillOps>::distill_sparse(
        student.into_dispatch(),
        indices.into_dispatch(),
        log_probs.into_dispatch(),
        call.targets.into_dispatch(),
        call.scale.into_dispatch(),
        call.settings,
        setup,
    );
    let grad = with_grad.then(|| Tensor::from_dispatch(out.grad.clone()));
    Some((call.settings.parts(out), grad))
}

/// A loss computed without autodiff (`value`, on the inner device: `[1]`, or `[N]` row losses)
/// as the output of one backward node over the tracked inputs, each with the gradient the
/// forward pass formed (for an upstream gradient of 1; `None`: that input gets none). Without
/// autodiff, `value`.
pub(crate) fn attach(
    value: Tensor<1>,
    hidden: (Tensor<2>, Option<Tensor<2>>),
    weight: (Tensor<2>, Option<Tensor<2>>),
    bias: Option<(Tensor<1>, Option<Tensor<1>>)>,
) -> Tensor<1> {
    let device = value.device();
    let dummy = || Tensor::<1>::zeros([1], &device).into_dispatch();
    let grad = |g: Option<DispatchTensor>| g.unwrap_or_else(dummy);
    let present = [
        hidden.1.is_some(),
        weight.1.is_some(),
        bias.as_ref().is_some_and(|b| b.1.is_some()),
    ];
    let (c, gc) = match bias {
        Some((b, gb)) => (b.into_dispatch(), grad(gb.map(Tensor::into_dispatch))),
        None => (dummy(), dummy()),
    };
    Tensor::from_dispatch(<Dispatch as DistillOps>::distill_attach(
        value.into_dispatch(),
        hidden.0.into_dispatch(),
        grad(hidden.1.map(Tensor::into_dispatch)),
        weight.0.into_dispatch(),
        grad(weight.1.map(Tensor::into_dispatch)),
        c,
        gc,
        present,
    ))
}

/// [`attach`] for one input: `value` (`[1]`, or `[N]` row losses) as the output of a node over
/// `x` whose gradient `gx` the forward pass formed (`[N, …]` rows for row losses).
pub(crate) fn attach_one(value: Tensor<1>, x: Tensor<2>, gx: Tensor<2>) -> Tensor<1> {
    let device = value.device();
    let dummy = Tensor::<2>::zeros([1, 1], &device);
    attach(value, (x, Some(gx)), (dummy, None), None)
}

/// What every fused kernel takes besides its logits: the targets (`[0]` without labels), the
/// reduction's `[1]` factor counted on the device (no read-back, f32), and the settings.
struct KernelInputs {
    targets: Tensor<1, Int>,
    scale: Tensor<1>,
    settings: DenseSettings,
}

impl KernelInputs {
    fn new(student: &Tensor<2>, targets: Option<Tensor<1, Int>>, params: &DistillParams) -> Self {
        let (device, [n, _]) = (student.device(), student.dims());
        let ignored = ignored_rows(targets.as_ref(), params.ignore_index);
        let scale = params
            .reduction
            .factor_tensor(ignored, n, &device, DType::F32)
            .unwrap_or_else(|| Tensor::ones([1], (&device, DType::F32)));
        Self {
            settings: DenseSettings {
                params: *params,
                labels: targets.is_some(),
                with_grad: false,
            },
            targets: targets.unwrap_or_else(|| Tensor::<1, Int>::empty([0], &device)),
            scale,
        }
    }
}

impl DenseSettings {
    /// A kernel's outputs as the loss and its parts.
    fn parts(&self, out: FusedRows<Dispatch>) -> DistillParts {
        DistillParts {
            loss: Tensor::from_dispatch(out.loss),
            soft: Tensor::from_dispatch(out.soft),
            hard: self.labels.then(|| Tensor::from_dispatch(out.hard)),
        }
    }
}

/// Does the device have a fused sparse-teacher kernel for logits of `dtype` and `k` entries
/// per row? (The CubeCL kernel keeps a row's entries in shared memory: `k ≤ 512`.)
pub fn has_sparse_fused_kernel(device: &Device, dtype: DType, k: usize) -> bool {
    has_fused_kernel(device, dtype) && (k <= MAX_SPARSE_K || !is_cube(device.as_dispatch()))
}

/// The most teacher entries per row of the CubeCL sparse kernel (its shared memory: 24 bytes
/// each).
pub const MAX_SPARSE_K: usize = 512;

/// The dtype of the row losses the device's fused kernels return for logits of `dtype`: f32
/// on CubeCL (an f16 sum of row losses overflows at 65,504), the logits' own elsewhere; the
/// losses computed as tensor code beside them (the vocabulary-parallel shards) follow it.
pub(crate) fn fused_loss_dtype(device: &Device, dtype: DType) -> DType {
    if is_cube(device.as_dispatch()) {
        DType::F32
    } else {
        dtype
    }
}

/// Is this a CubeCL device (with or without autodiff)?
fn is_cube(device: &DispatchDevice) -> bool {
    match device {
        #[cfg(feature = "cube")]
        DispatchDevice::Cube(_) => true,
        DispatchDevice::Autodiff(device) => is_cube(&device.clone().inner()),
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

/// The sparse-teacher loss of `[N, V]` rows against `[N, k]` indices and log-probabilities (as
/// the kernels take them: `SparseTeacher::kernel_log_probs`) by the device's fused kernel,
/// where `kernel` allows and the device has one; `None` where the loss runs its composed path
/// (`Kernel::Reference`, or `Auto` without a kernel); an error for `Kernel::Fused` without one.
pub(crate) fn sparse(
    student: Tensor<2>,
    (indices, log_probs): (Tensor<2, Int>, Tensor<2>),
    targets: Option<Tensor<1, Int>>,
    params: &DistillParams,
    setup: SparseSetup,
    kernel: Kernel,
) -> Result<Option<DistillParts>, DistillError> {
    let (device, dtype, k) = (student.device(), student.dtype(), indices.dims()[1]);
    let fused = has_sparse_fused_kernel(&device, dtype, k) && fits(&device, student.dims());
    match kernel {
        Kernel::Reference => return Ok(None),
        Kernel::Auto if !fused => return Ok(None),
        Kernel::Fused if !fused => {
            return Err(DistillError::invalid(
                "kernel",
                "Kernel::Fused",
                format!(
                    "Kernel::Auto or Kernel::Reference: device {device:?} has no fused \
                     sparse-teacher kernel for {dtype:?} logits and k = {k}"
                ),
            ));
        }
        _ => {}
    }
    let call = KernelInputs::new(&student, targets, params);
    let out = <Dispatch as DistillOps>::distill_sparse(
        student.into_dispatch(),
        indices.into_dispatch(),
        log_probs.into_dispatch(),
        call.targets.into_dispatch(),
        call.scale.into_dispatch(),
        call.settings,
        setup,
    );
    Ok(Some(call.settings.parts(out)))
}

/// The dense loss by the reference implementation (composed tensor ops, differentiable on
/// every backend through burn's autodiff).
pub fn reference_loss(
    student: Tensor<2>,
    teacher: Tensor<2>,
    targets: Option<Tensor<1, Int>>,
    params: &DistillParams,
) -> DistillParts {
    let ignored = ignored_rows(targets.as_ref(), params.ignore_index);
    let soft = reference::soft_rows(student.clone(), teacher, params);
    // Ignored rows 0, rows with an out-of-range target NaN: an unchecked bad target never
    // gives a plausible-looking loss.
    let rows = reference::mix_rows(soft, student, targets, params);
    let reduce = |t: Tensor<1>| reduce_rows(t, ignored.clone(), params.reduction);
    DistillParts {
        loss: reduce(rows.loss),
        soft: reduce(rows.soft),
        hard: rows.hard.map(reduce),
    }
}
