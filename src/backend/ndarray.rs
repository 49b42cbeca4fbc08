//! NdArray: the CPU kernel of [`crate::kernel::cpu`] on the arrays' memory, zero-copy.

use std::borrow::Cow;

use burn::backend::ndarray::{
    FloatNdArrayElement, IntNdArrayElement, NdArray, NdArrayTensor, QuantElement, SharedArray,
};
use burn::tensor::{
    DType, TensorMetadata,
    ops::{FloatTensor, FloatTensorOps, IntTensor},
};

use super::cpu::{
    CPU_DTYPES, HostFloats, fused_on_slices, linear_chunked, scale_by_mul, scale_in_place,
    sparse_linear_chunked, sparse_on_slices, upstream_values,
};
use super::{SparseInputs, SparseSetup};
use crate::kernel::real::Real;
use crate::{DistillBackend, DistillParams, FusedOutput, LinearOutput, LinearSetup, LinearSide};

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> HostFloats for NdArray<E, I, Q>
where
    NdArrayTensor: From<SharedArray<E>>,
    NdArrayTensor: From<SharedArray<I>>,
{
    fn row_major<R: Real>(tensor: &FloatTensor<Self>) -> Option<Cow<'_, [R]>> {
        macro_rules! slice {
            ($a:expr, $ty:ty) => {{
                let view = $a.view();
                Some(match view.to_slice() {
                    Some(s) => Cow::Borrowed(bytemuck::try_cast_slice::<$ty, R>(s).ok()?),
                    None => Cow::Owned(
                        view.iter()
                            .map(|&x| bytemuck::try_cast::<$ty, R>(x).ok())
                            .collect::<Option<Vec<R>>>()?,
                    ),
                })
            }};
        }
        match tensor {
            NdArrayTensor::F32(a) if R::dtype() == DType::F32 => slice!(a, f32),
            NdArrayTensor::F64(a) if R::dtype() == DType::F64 => slice!(a, f64),
            _ => None,
        }
    }
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> DistillBackend
    for NdArray<E, I, Q>
where
    NdArrayTensor: From<SharedArray<E>>,
    NdArrayTensor: From<SharedArray<I>>,
{
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
        let shape = student.shape();
        let shape = [shape[0], shape[1]];
        let device = Self::float_device(&student);
        macro_rules! run {
            ($s:expr, $t:expr) => {{
                let (s, t) = ($s.view(), $t.view());
                let (s, t) = (s.as_standard_layout(), t.as_standard_layout());
                fused_on_slices::<Self, _>(
                    s.as_slice().expect("standard layout"),
                    t.as_slice().expect("standard layout"),
                    shape,
                    targets,
                    params,
                    with_grad,
                    &device,
                )
            }};
        }
        match (&student, &teacher) {
            (NdArrayTensor::F32(s), NdArrayTensor::F32(t)) => Some(run!(s, t)),
            (NdArrayTensor::F64(s), NdArrayTensor::F64(t)) => Some(run!(s, t)),
            _ => None,
        }
    }

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
        let shape = student.shape();
        let shape = [shape[0], shape[1]];
        let device = Self::float_device(&student);
        macro_rules! run {
            ($s:expr) => {{
                let s = $s.view();
                let s = s.as_standard_layout();
                sparse_on_slices::<Self, _>(
                    s.as_slice().expect("standard layout"),
                    shape,
                    teacher,
                    targets,
                    params,
                    setup,
                    with_grad,
                    &device,
                )
            }};
        }
        match &student {
            NdArrayTensor::F32(s) => Some(run!(s)),
            NdArrayTensor::F64(s) => Some(run!(s)),
            _ => None,
        }
    }

    fn distill_scale_grad(
        grad: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let scale = upstream_values::<Self>(upstream);
        let v = grad.shape()[1];
        let mut grad = grad;
        match &mut grad {
            NdArrayTensor::F32(storage) if storage.is_unique() => {
                let array = storage.ensure_owned();
                scale_in_place(array.as_slice_mut().expect("standard layout"), v, &scale);
            }
            NdArrayTensor::F64(storage) if storage.is_unique() => {
                let array = storage.ensure_owned();
                scale_in_place(array.as_slice_mut().expect("standard layout"), v, &scale);
            }
            _ => return scale_by_mul::<Self>(grad, scale),
        }
        grad
    }
}
