//! The fused CPU kernel plugged into NdArray and Flex: zero-copy access to the logits,
//! outputs handed back without copies.

use burn::tensor::{
    DType, Int, Tensor, TensorData, TensorPrimitive,
    backend::Backend,
    ops::{FloatTensor, IntTensor},
};

use super::{cpu, real::Real};
use crate::{DistillParams, DistillParts, FusedOutput, Reduction};

/// Runs the CPU kernel on row-major slices, reduces on the host and wraps the outputs as
/// tensors of `B`.
pub(crate) fn fused_on_slices<B: Backend, R: Real>(
    student: &[R],
    teacher: &[R],
    [n, v]: [usize; 2],
    targets: Option<IntTensor<B>>,
    params: &DistillParams,
    with_grad: bool,
    device: &B::Device,
) -> FusedOutput<B> {
    let targets: Option<Vec<i64>> = targets.map(|t| {
        Tensor::<B, 1, Int>::from_primitive(t)
            .into_data()
            .iter::<i64>()
            .collect()
    });
    let has_targets = targets.is_some();
    let out = cpu::distill_rows(
        student,
        teacher,
        v,
        targets.as_deref(),
        params,
        params.reduction,
        with_grad,
    );
    let column = |f: fn(&cpu::RowOut<R>) -> R| {
        let data = match params.reduction {
            Reduction::None => TensorData::new(out.rows.iter().map(f).collect::<Vec<R>>(), [n]),
            reduction => {
                // Sum in f64: N row values, exact enough for any N.
                let sum: f64 = out.rows.iter().map(|r| f(r).to_f64()).sum();
                let value = match reduction {
                    Reduction::Mean => sum / out.kept.max(1) as f64,
                    _ => sum,
                };
                TensorData::new(vec![R::of(value)], [1])
            }
        };
        B::float_from_data(data, device)
    };
    FusedOutput {
        parts: DistillParts {
            loss: column(|r| r.loss),
            soft: column(|r| r.soft),
            hard: has_targets.then(|| column(|r| r.hard)),
        },
        grad: out
            .grad
            .map(|g| B::float_from_data(TensorData::new(g, [n, v]), device)),
    }
}

/// Upstream gradient values, as f64 (a handful: `[1]` or `[N]`).
fn upstream_values<B: Backend>(upstream: FloatTensor<B>) -> Vec<f64> {
    Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(upstream))
        .into_data()
        .iter::<f64>()
        .collect()
}

/// `grad[i, :] *= scale[i]` (or `*= scale[0]`) in place, rows in parallel; skipped when every
/// factor is 1 (the usual `loss.backward()`).
fn scale_in_place<R: Real>(grad: &mut [R], v: usize, scale: &[f64]) {
    use rayon::prelude::*;
    if scale.iter().all(|&s| s == 1.0) {
        return;
    }
    grad.par_chunks_mut(v).enumerate().for_each(|(i, row)| {
        let f = R::of(if scale.len() == 1 { scale[0] } else { scale[i] });
        for x in row {
            *x = *x * f;
        }
    });
}

/// Out-of-place fallback of [`scale_in_place`] (shared or non-contiguous gradients).
fn scale_by_mul<B: Backend>(grad: FloatTensor<B>, scale: Vec<f64>) -> FloatTensor<B> {
    let n = scale.len();
    let device = B::float_device(&grad);
    let scale = B::float_from_data(TensorData::new(scale, [n]), &device);
    B::float_mul(grad, B::float_reshape(scale, [n, 1].into()))
}

/// The dtypes of the CPU kernel.
const CPU_DTYPES: &[DType] = &[DType::F32, DType::F64];

#[cfg(feature = "ndarray")]
mod ndarray {
    use burn::backend::ndarray::{
        FloatNdArrayElement, IntNdArrayElement, NdArray, NdArrayTensor, QuantElement, SharedArray,
    };
    use burn::tensor::{TensorMetadata, ops::FloatTensorOps};

    use super::CPU_DTYPES;

    use super::*;
    use crate::DistillBackend;

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
        ) -> FusedOutput<Self> {
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
                (NdArrayTensor::F32(s), NdArrayTensor::F32(t)) => run!(s, t),
                (NdArrayTensor::F64(s), NdArrayTensor::F64(t)) => run!(s, t),
                _ => unreachable!("has_fused_kernel checked the dtypes"),
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
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::tensor::TensorMetadata;

    use super::*;
    use crate::DistillBackend;

    fn contiguous(t: &FlexTensor) -> std::borrow::Cow<'_, FlexTensor> {
        if t.is_contiguous() {
            std::borrow::Cow::Borrowed(t)
        } else {
            std::borrow::Cow::Owned(t.to_contiguous())
        }
    }

    impl DistillBackend for Flex {
        fn fused_kernel_dtypes() -> &'static [DType] {
            CPU_DTYPES
        }

        fn distill_fused(
            student: FloatTensor<Self>,
            teacher: FloatTensor<Self>,
            targets: Option<IntTensor<Self>>,
            params: &DistillParams,
            with_grad: bool,
        ) -> FusedOutput<Self> {
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
            match student.dtype() {
                DType::F32 => run!(f32),
                DType::F64 => run!(f64),
                _ => unreachable!("has_fused_kernel checked the dtype"),
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
}
