//! Flex: the CPU kernel of [`crate::kernel::cpu`] on the tensors' memory, zero-copy.

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::{
    DType, TensorMetadata,
    ops::{FloatTensor, IntTensor},
};

use super::cpu::{
    CPU_DTYPES, fused_on_slices, linear_on_slices, scale_by_mul, scale_in_place, sparse_on_slices,
    upstream_values,
};
use super::{SparseInputs, SparseSetup};
use crate::kernel::linear_cpu::{Gemm, HostSide};
use crate::{DistillBackend, DistillParams, FusedOutput, LinearOutput, LinearSetup, LinearSide};

fn contiguous(t: &FlexTensor) -> std::borrow::Cow<'_, FlexTensor> {
    if t.is_contiguous() {
        std::borrow::Cow::Borrowed(t)
    } else {
        std::borrow::Cow::Owned(t.to_contiguous())
    }
}

/// [`linear_on_slices`] on Flex tensors of element `R`; `None` (outer) where some tensor holds
/// another type.
fn linear_host<R: Gemm>(
    student: &LinearSide<Flex>,
    teacher: &LinearSide<Flex>,
    targets: Option<IntTensor<Flex>>,
    setup: &LinearSetup,
    with_grad: bool,
) -> Option<Option<LinearOutput<Flex>>> {
    type Tensors<'a> = (
        std::borrow::Cow<'a, FlexTensor>,
        std::borrow::Cow<'a, FlexTensor>,
        Option<std::borrow::Cow<'a, FlexTensor>>,
    );
    fn tensors(side: &LinearSide<Flex>) -> Tensors<'_> {
        (
            contiguous(&side.hidden),
            contiguous(&side.weight),
            side.bias.as_ref().map(contiguous),
        )
    }
    fn host<'a, R: Gemm>((h, w, b): &'a Tensors<'_>) -> Option<HostSide<'a, R>> {
        let bias = match b {
            Some(b) => Some(b.as_slice::<R>()?),
            None => None,
        };
        let shape = w.shape();
        Some(HostSide {
            hidden: h.as_slice::<R>()?,
            weight: w.as_slice::<R>()?,
            bias,
            width: shape[0],
            vocab: shape[1],
        })
    }
    let (s, t) = (tensors(student), tensors(teacher));
    Some(linear_on_slices::<Flex, R>(
        host(&s)?,
        host(&t)?,
        targets,
        setup,
        with_grad,
        &Default::default(),
    ))
}

impl DistillBackend for Flex {
    fn distill_linear_chunked(
        student: LinearSide<Self>,
        teacher: LinearSide<Self>,
        targets: Option<IntTensor<Self>>,
        setup: &LinearSetup,
        with_grad: bool,
    ) -> Option<LinearOutput<Self>> {
        let host = match student.hidden.dtype() {
            DType::F32 => linear_host::<f32>(&student, &teacher, targets.clone(), setup, with_grad),
            DType::F64 => linear_host::<f64>(&student, &teacher, targets.clone(), setup, with_grad),
            _ => None,
        };
        match host {
            Some(Some(out)) => Some(out),
            _ => crate::linear::chunked::<Self>(student, teacher, targets, setup, with_grad),
        }
    }

    fn fused_kernel_dtypes() -> &'static [DType] {
        CPU_DTYPES
    }

    fn distill_fused(
        student: FloatTensor<Self>,
        teacher: FloatTensor<Self>,
        targets: Option<IntTensor<Self>>,
        params: &DistillParams,
        with_grad: bool,
    ) -> Option<FusedOutput<Self>> {
        let dims = student.shape();
        let shape = [dims[0], dims[1]];
        let device = Default::default();
        let (s, t) = (contiguous(&student), contiguous(&teacher));
        macro_rules! run {
            ($ty:ty) => {
                fused_on_slices::<Self, $ty>(
                    s.as_slice().expect("contiguous"),
                    t.as_slice().expect("contiguous"),
                    shape,
                    targets,
                    params,
                    with_grad,
                    &device,
                )
            };
        }
        if student.dtype() != teacher.dtype() {
            return None;
        }
        match student.dtype() {
            DType::F32 => Some(run!(f32)),
            DType::F64 => Some(run!(f64)),
            _ => None,
        }
    }

    fn has_sparse_fused_kernel(dtype: DType, _k: usize) -> bool {
        Self::fused_kernel_dtypes().contains(&dtype)
    }

    fn distill_sparse_fused(
        student: FloatTensor<Self>,
        teacher: SparseInputs<Self>,
        targets: Option<IntTensor<Self>>,
        params: &DistillParams,
        setup: SparseSetup,
        with_grad: bool,
    ) -> Option<FusedOutput<Self>> {
        let dims = student.shape();
        let shape = [dims[0], dims[1]];
        let device = Default::default();
        let s = contiguous(&student);
        macro_rules! run {
            ($ty:ty) => {
                sparse_on_slices::<Self, $ty>(
                    s.as_slice().expect("contiguous"),
                    shape,
                    teacher,
                    targets,
                    params,
                    setup,
                    with_grad,
                    &device,
                )
            };
        }
        match student.dtype() {
            DType::F32 => Some(run!(f32)),
            DType::F64 => Some(run!(f64)),
            _ => None,
        }
    }

    fn distill_scale_grad(
        grad: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let scale = upstream_values::<Self>(upstream);
        let [n, v] = [grad.shape()[0], grad.shape()[1]];
        let mut grad = grad;
        let done = grad.is_contiguous()
            && match grad.dtype() {
                DType::F32 => grad
                    .try_storage_mut::<f32>()
                    .filter(|g| g.len() == n * v)
                    .map(|g| scale_in_place(g, v, &scale))
                    .is_some(),
                DType::F64 => grad
                    .try_storage_mut::<f64>()
                    .filter(|g| g.len() == n * v)
                    .map(|g| scale_in_place(g, v, &scale))
                    .is_some(),
                _ => false,
            };
        if done {
            grad
        } else {
            scale_by_mul::<Self>(grad, scale)
        }
    }
}
