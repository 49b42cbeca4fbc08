//! The fused CPU kernel plugged into NdArray and Flex: zero-copy access to the logits,
//! outputs handed back without copies.

use burn::tensor::{
    DType, Int, Tensor, TensorData,
    backend::Backend,
    ops::{FloatTensor, IntTensor},
};

use super::{cpu, real::Real};
use crate::{DistillParams, DistillRows, FusedRows};

/// Runs the CPU kernel on row-major slices and wraps the outputs as tensors of `B`.
pub(crate) fn fused_on_slices<B: Backend, R: Real>(
    student: &[R],
    teacher: &[R],
    [n, v]: [usize; 2],
    targets: Option<IntTensor<B>>,
    params: &DistillParams,
    with_grad: bool,
    device: &B::Device,
) -> FusedRows<B> {
    let targets: Option<Vec<i64>> = targets.map(|t| {
        Tensor::<B, 1, Int>::from_primitive(t)
            .into_data()
            .iter::<i64>()
            .collect()
    });
    let has_targets = targets.is_some();
    let out = cpu::distill_rows(student, teacher, v, targets.as_deref(), params, with_grad);
    let column = |f: fn(&cpu::RowOut<R>) -> R| {
        let values: Vec<R> = out.rows.iter().map(f).collect();
        B::float_from_data(TensorData::new(values, [n]), device)
    };
    FusedRows {
        rows: DistillRows {
            loss: column(|r| r.loss),
            soft: column(|r| r.soft),
            hard: has_targets.then(|| column(|r| r.hard)),
        },
        grad: out
            .grad
            .map(|g| B::float_from_data(TensorData::new(g, [n, v]), device)),
    }
}

fn cpu_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F64)
}

#[cfg(feature = "ndarray")]
mod ndarray {
    use burn::backend::ndarray::{
        FloatNdArrayElement, IntNdArrayElement, NdArray, NdArrayTensor, QuantElement, SharedArray,
    };
    use burn::tensor::{TensorMetadata, ops::FloatTensorOps};

    use super::*;
    use crate::DistillBackend;

    impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> DistillBackend
        for NdArray<E, I, Q>
    where
        NdArrayTensor: From<SharedArray<E>>,
        NdArrayTensor: From<SharedArray<I>>,
    {
        fn has_fused_kernel(student: &FloatTensor<Self>, teacher: &FloatTensor<Self>) -> bool {
            student.dtype() == teacher.dtype() && cpu_dtype(student.dtype())
        }

        fn distill_fused(
            student: FloatTensor<Self>,
            teacher: FloatTensor<Self>,
            targets: Option<IntTensor<Self>>,
            params: &DistillParams,
            with_grad: bool,
        ) -> FusedRows<Self> {
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
        fn has_fused_kernel(student: &FloatTensor<Self>, teacher: &FloatTensor<Self>) -> bool {
            student.dtype() == teacher.dtype() && cpu_dtype(student.dtype())
        }

        fn distill_fused(
            student: FloatTensor<Self>,
            teacher: FloatTensor<Self>,
            targets: Option<IntTensor<Self>>,
            params: &DistillParams,
            with_grad: bool,
        ) -> FusedRows<Self> {
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
    }
}
