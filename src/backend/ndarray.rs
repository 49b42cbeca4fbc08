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
    CPU_DTYPES, fused_on_slices, linear_on_slices, scale_by_mul, scale_in_place, sparse_on_slices,
    upstream_values,
};
use super::{SparseInputs, SparseSetup};
use crate::kernel::linear_cpu::{Gemm, HostSide};
use crate::{DistillBackend, DistillParams, FusedOutput, LinearOutput, LinearSetup, LinearSide};

/// The float types of NdArray's tensors that the host kernels read.
trait HostFloat: Gemm {
    /// The tensor's elements in row-major order (borrowed where they already are), if the
    /// tensor holds this type.
    fn row_major(t: &NdArrayTensor) -> Option<Cow<'_, [Self]>>;
}

macro_rules! host_float {
    ($ty:ty, $variant:ident) => {
        impl HostFloat for $ty {
            fn row_major(t: &NdArrayTensor) -> Option<Cow<'_, [Self]>> {
                match t {
                    NdArrayTensor::$variant(a) => {
                        let view = a.view();
                        Some(match view.to_slice() {
                            Some(s) => Cow::Borrowed(s),
                            None => Cow::Owned(view.iter().copied().collect()),
                        })
                    }
                    _ => None,
                }
            }
        }
    };
}
host_float!(f32, F32);
host_float!(f64, F64);

/// [`linear_on_slices`] on NdArray tensors of element `R`; `None` (outer) where some tensor
/// holds another type.
fn linear_host<R: HostFloat, E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement>(
    student: &LinearSide<NdArray<E, I, Q>>,
    teacher: &LinearSide<NdArray<E, I, Q>>,
    targets: Option<IntTensor<NdArray<E, I, Q>>>,
    setup: &LinearSetup,
    with_grad: bool,
) -> Option<Option<LinearOutput<NdArray<E, I, Q>>>>
where
    NdArrayTensor: From<SharedArray<E>>,
    NdArrayTensor: From<SharedArray<I>>,
{
    type Slices<'a, R> = (Cow<'a, [R]>, Cow<'a, [R]>, Option<Cow<'a, [R]>>, [usize; 2]);
    fn slices<
        R: HostFloat,
        B: burn::tensor::backend::Backend<FloatTensorPrimitive = NdArrayTensor>,
    >(
        side: &LinearSide<B>,
    ) -> Option<Slices<'_, R>> {
        let bias = match &side.bias {
            Some(b) => Some(R::row_major(b)?),
            None => None,
        };
        let shape = side.weight.shape();
        Some((
            R::row_major(&side.hidden)?,
            R::row_major(&side.weight)?,
            bias,
            [shape[0], shape[1]],
        ))
    }
    fn host<'a, R>((h, w, b, [width, vocab]): &'a Slices<'_, R>) -> HostSide<'a, R>
    where
        [R]: ToOwned<Owned = Vec<R>>,
    {
        HostSide {
            hidden: h,
            weight: w,
            bias: b.as_deref(),
            width: *width,
            vocab: *vocab,
        }
    }
    let (s, t) = (slices::<R, _>(student)?, slices::<R, _>(teacher)?);
    let device = NdArray::<E, I, Q>::float_device(&student.hidden);
    Some(linear_on_slices::<NdArray<E, I, Q>, R>(
        host(&s),
        host(&t),
        targets,
        setup,
        with_grad,
        &device,
    ))
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
        let host = match student.hidden.dtype() {
            DType::F32 => {
                linear_host::<f32, E, I, Q>(&student, &teacher, targets.clone(), setup, with_grad)
            }
            DType::F64 => {
                linear_host::<f64, E, I, Q>(&student, &teacher, targets.clone(), setup, with_grad)
            }
            _ => None,
        };
        match host {
            Some(Some(out)) => Some(out),
            _ => crate::linear::chunked::<Self>(student, teacher, targets, setup, with_grad),
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
