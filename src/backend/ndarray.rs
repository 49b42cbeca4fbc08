//! NdArray: the CPU kernels of [`crate::kernel`] on the arrays' memory, zero-copy (the methods
//! are the CPU backends' shared ones, `cpu::host_kernels!`).

use std::borrow::Cow;

use burn::backend::ndarray::{
    FloatNdArrayElement, IntNdArrayElement, NdArray, NdArrayTensor, QuantElement, SharedArray,
};
use burn::tensor::{DType, ops::FloatTensor};

use super::cpu::{HostFloats, host_kernels};
use crate::DistillBackend;
use crate::kernel::real::Real;

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

    fn unique_mut<R: Real>(tensor: &mut FloatTensor<Self>) -> Option<&mut [R]> {
        macro_rules! slice {
            ($storage:expr, $ty:ty) => {{
                if !$storage.is_unique() {
                    return None;
                }
                let array = $storage.ensure_owned();
                bytemuck::try_cast_slice_mut::<$ty, R>(array.as_slice_mut()?).ok()
            }};
        }
        match tensor {
            NdArrayTensor::F32(storage) if R::dtype() == DType::F32 => slice!(storage, f32),
            NdArrayTensor::F64(storage) if R::dtype() == DType::F64 => slice!(storage, f64),
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
    host_kernels!();
}
