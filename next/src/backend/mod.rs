//! What a backend implementer needs: the extension trait of the fused kernels
//! ([`DistillOps`]), its inputs and outputs, and the choice between a backend's kernel and the
//! composed reference path.
//!
//! A training loop never calls anything here: the losses of the crate root dispatch through
//! it. One home per backend family: `flex.rs` (the CPU kernels on Flex's host memory), and
//! `autodiff.rs` (the backward node of every fused loss).

use burn::backend::{Dispatch, DispatchDevice};
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
mod ops;

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

/// The sparse-teacher loss of `[N, V]` rows by the device's fused kernel, where `kernel`
/// allows and the device has one; `None` where the loss runs its composed path
/// (`Kernel::Reference`, or `Auto` without a kernel); an error for `Kernel::Fused` without one.
pub(crate) fn sparse(
    student: Tensor<2>,
    teacher: &crate::SparseTeacher<2>,
    targets: Option<Tensor<1, Int>>,
    params: &DistillParams,
    setup: SparseSetup,
    kernel: Kernel,
) -> Result<Option<DistillParts>, DistillError> {
    let (device, dtype, k) = (student.device(), student.dtype(), teacher.dims()[1]);
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
    // The mask folded in: a `false` entry as `−∞` (one float input instead of two); a NaN as
    // `+∞`, which the kernels' "above 0" test makes a NaN row (a comparison with NaN is false,
    // and the entry would pass for missing).
    let log_probs = teacher.log_probs.clone().detach();
    let log_probs = log_probs
        .clone()
        .mask_fill(log_probs.is_nan(), f64::INFINITY);
    let log_probs = match &teacher.mask {
        Some(mask) => log_probs.mask_fill(mask.clone().bool_not(), f64::NEG_INFINITY),
        None => log_probs,
    };
    let call = KernelInputs::new(&student, targets, params);
    let out = <Dispatch as DistillOps>::distill_sparse(
        student.into_dispatch(),
        teacher.indices.clone().into_dispatch(),
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
