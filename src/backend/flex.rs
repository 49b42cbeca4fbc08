//! Flex: the CPU kernel of [`crate::kernel::cpu`] on the tensors' memory, zero-copy.

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::{
    DType, TensorMetadata,
    ops::{FloatTensor, IntTensor},
};

use std::borrow::Cow;

use super::cpu::{
    CPU_DTYPES, HostFloats, fused_on_slices, linear_chunked, scale_by_mul, scale_in_place,
    sparse_linear_chunked, sparse_on_slices, upstream_values,
};
use super::{SparseInputs, SparseSetup};
use crate::kernel::real::Real;
use crate::{DistillBackend, DistillParams, FusedOutput, LinearOutput, LinearSetup, LinearSide};

fn contiguous(t: &FlexTensor) -> Cow<'_, FlexTensor> {
    if t.is_contiguous() {
        Cow::Borrowed(t)
    } else {
        Cow::Owned(t.to_contiguous())
    }
}

impl HostFloats for Flex {
    fn row_major<R: Real>(tensor: &FloatTensor<Self>) -> Option<Cow<'_, [R]>> {
        if tensor.dtype() != R::dtype() {
            return None;
        }
        Some(if tensor.is_contiguous() {
            Cow::Borrowed(tensor.as_slice::<R>()?)
        } else {
            Cow::Owned(tensor.to_contiguous().as_slice::<R>()?.to_vec())
        })
    }
}

impl DistillBackend for Flex {
    fn distill_linear_chunked(
        student: LinearSide<Self>,
        teacher: LinearSide<Self>,
        targets: Option<IntTensor<Self>>,
        setup: &LinearSetup,
        with_grad: bool,
    ) -> Option<LinearOutput<Self>> {
        linear_chunked(student, teacher, targets, setup, with_grad)
    }

    fn distill_sparse_linear_chunked(
        student: LinearSide<Self>,
        teacher: SparseInputs<Self>,
        targets: Option<IntTensor<Self>>,
        setup: &LinearSetup,
        sparse: SparseSetup,
        with_grad: bool,
    ) -> Option<LinearOutput<Self>> {
        sparse_linear_chunked(student, teacher, targets, setup, sparse, with_grad)
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
