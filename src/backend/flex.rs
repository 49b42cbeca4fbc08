//! Flex: the CPU kernels of [`crate::kernel::cpu`] on the tensors' host memory, zero-copy for
//! contiguous inputs; the gradient is written once and scaled in place in the backward pass.

use burn::backend::flex::{Flex, FlexTensor, Layout};
use burn::tensor::{Bytes, DType, Shape};

use super::ops::{DenseSettings, DistillOps, FusedRows, SparseSetup};
use crate::kernel::{cpu, real::Real, sparse_cpu};

/// The float dtypes of the CPU kernels.
pub(super) const CPU_DTYPES: &[DType] = &[DType::F32, DType::F64];

impl DistillOps for Flex {
    fn distill_dense(
        student: FlexTensor,
        teacher: FlexTensor,
        targets: FlexTensor,
        _scale: FlexTensor,
        settings: DenseSettings,
    ) -> FusedRows<Flex> {
        match (student.dtype(), teacher.dtype()) {
            (DType::F32, DType::F32) => dense::<f32>(student, teacher, targets, settings),
            (DType::F64, DType::F64) => dense::<f64>(student, teacher, targets, settings),
            (s, t) => panic!(
                "burn-distill: the Flex kernel takes f32 or f64 logits of one dtype, got \
                 student {s:?} and teacher {t:?} (the loss checks this before the call)"
            ),
        }
    }

    fn distill_sparse(
        student: FlexTensor,
        indices: FlexTensor,
        log_probs: FlexTensor,
        targets: FlexTensor,
        _scale: FlexTensor,
        settings: DenseSettings,
        setup: SparseSetup,
    ) -> FusedRows<Flex> {
        let teacher = (indices, log_probs);
        match student.dtype() {
            DType::F32 => sparse::<f32>(student, teacher, targets, settings, setup),
            DType::F64 => sparse::<f64>(student, teacher, targets, settings, setup),
            other => panic!(
                "burn-distill: the Flex kernel takes f32 or f64 logits, got {other:?} (the loss \
                 checks this before the call)"
            ),
        }
    }

    fn distill_attach(
        value: FlexTensor,
        _a: FlexTensor,
        _ga: FlexTensor,
        _b: FlexTensor,
        _gb: FlexTensor,
        _c: FlexTensor,
        _gc: FlexTensor,
        _present: [bool; 3],
    ) -> FlexTensor {
        value
    }

    fn distill_scale_grad(mut grad: FlexTensor, upstream: FlexTensor) -> FlexTensor {
        let scale = host_f64(&upstream);
        if scale.iter().all(|&s| s == 1.0) {
            // The usual `loss.backward()`: nothing to scale.
            return grad;
        }
        let v = grad.layout().shape()[1];
        fn scale_rows<R: Real>(g: Option<&mut [R]>, v: usize, scale: &[f64]) -> bool {
            g.map(|g| scale_in_place(g, v, scale)).is_some()
        }
        // In place where the gradient is the kernel's own (not shared, contiguous).
        let done = grad.is_contiguous()
            && match grad.dtype() {
                DType::F32 => scale_rows(grad.try_storage_mut::<f32>(), v, &scale),
                DType::F64 => scale_rows(grad.try_storage_mut::<f64>(), v, &scale),
                _ => false,
            };
        if done {
            return grad;
        }
        let grad = grad.to_contiguous();
        match grad.dtype() {
            DType::F32 => scaled_copy::<f32>(&grad, &scale),
            DType::F64 => scaled_copy::<f64>(&grad, &scale),
            other => panic!("burn-distill: a Flex gradient of {other:?}, expected f32 or f64"),
        }
    }
}

/// The dense row kernel on `R` logits.
fn dense<R: Real + bytemuck::Pod>(
    student: FlexTensor,
    teacher: FlexTensor,
    targets: FlexTensor,
    settings: DenseSettings,
) -> FusedRows<Flex> {
    let (student, teacher) = (student.to_contiguous(), teacher.to_contiguous());
    let [n, v] = [student.layout().shape()[0], student.layout().shape()[1]];
    let s: &[R] = student
        .as_slice()
        .expect("contiguous logits of their dtype");
    let t: &[R] = teacher
        .as_slice()
        .expect("contiguous logits of their dtype");
    let targets = settings.labels.then(|| host_i64(&targets));
    let params = &settings.params;
    let out = cpu::distill_rows(s, t, v, targets.as_deref(), params, settings.with_grad);
    finish(out, [n, v], params)
}

/// The sparse row kernel on `R` logits (the `[N, k]` teacher is read to the host: it is
/// small).
fn sparse<R: Real + bytemuck::Pod>(
    student: FlexTensor,
    (indices, log_probs): (FlexTensor, FlexTensor),
    targets: FlexTensor,
    settings: DenseSettings,
    setup: SparseSetup,
) -> FusedRows<Flex> {
    let student = student.to_contiguous();
    let [n, v] = [student.layout().shape()[0], student.layout().shape()[1]];
    let s: &[R] = student
        .as_slice()
        .expect("contiguous logits of their dtype");
    let k = indices.layout().shape()[1];
    let (indices, log_probs) = (host_i64(&indices), host_f64(&log_probs));
    // Missing entries are `−∞` (the mask is folded in before the call).
    let valid = vec![true; n * k];
    let host = sparse_cpu::HostTeacher {
        k,
        indices: &indices,
        log_probs: &log_probs,
        valid: &valid,
    };
    let targets = settings.labels.then(|| host_i64(&targets));
    let params = &settings.params;
    let teacher_setup = (setup.tail, setup.generation_temperature);
    let y = targets.as_deref();
    let out = cpu::rows_with(s.len(), settings.with_grad, |grad| {
        sparse_cpu::sparse_rows_into(s, v, &host, y, params, teacher_setup, grad)
    });
    finish(out, [n, v], params)
}

/// A CPU kernel's rows reduced as `params` say (summed in f64), and its gradient.
fn finish<R: Real + bytemuck::Pod>(
    out: cpu::CpuRows<R>,
    [n, v]: [usize; 2],
    params: &crate::DistillParams,
) -> FusedRows<Flex> {
    let column = |f: fn(&cpu::RowOut<R>) -> R| match params.reduction.factor(out.kept) {
        None => tensor(out.rows.iter().map(f).collect::<Vec<R>>(), [n]),
        Some(factor) => {
            // Sum in f64: N row values, exact enough for any N.
            let sum: f64 = out.rows.iter().map(|r| f(r).to_f64()).sum();
            tensor(vec![R::of(sum * factor)], [1])
        }
    };
    FusedRows {
        loss: column(|r| r.loss),
        soft: column(|r| r.soft),
        hard: column(|r| r.hard),
        grad: match out.grad {
            Some(g) => tensor(g, [n, v]),
            None => tensor(Vec::<R>::new(), [0, v]),
        },
    }
}

/// A contiguous Flex tensor of `values` (moved, not copied).
fn tensor<R: Real + bytemuck::Pod, const D: usize>(
    values: Vec<R>,
    shape: [usize; D],
) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(values),
        Layout::contiguous(Shape::new(shape)),
        R::dtype(),
    )
}

/// An int tensor's values (Flex's ints are i32 by default, i64 where asked).
fn host_i64(t: &FlexTensor) -> Vec<i64> {
    let t = t.to_contiguous();
    match t.dtype() {
        DType::I32 => t
            .as_slice::<i32>()
            .expect("i32")
            .iter()
            .map(|&x| x as i64)
            .collect(),
        DType::I64 => t.as_slice::<i64>().expect("i64").to_vec(),
        other => panic!("burn-distill: targets of {other:?}, expected i32 or i64"),
    }
}

/// A (small) float tensor's values as f64: the upstream gradient (`[1]` or `[N]`), a sparse
/// teacher's log-probabilities.
fn host_f64(t: &FlexTensor) -> Vec<f64> {
    let t = t.to_contiguous();
    match t.dtype() {
        DType::F32 => t
            .as_slice::<f32>()
            .expect("f32")
            .iter()
            .map(|&x| x as f64)
            .collect(),
        DType::F64 => t.as_slice::<f64>().expect("f64").to_vec(),
        DType::F16 | DType::BF16 => t.into_data().iter::<f64>().collect(),
        other => panic!("burn-distill: float values of {other:?}, expected a float dtype"),
    }
}

/// `grad[i, :] *= scale[i]` (or `*= scale[0]`) in place, rows in parallel; skipped when every
/// factor is 1 (the usual `loss.backward()`).
fn scale_in_place<R: Real>(grad: &mut [R], v: usize, scale: &[f64]) {
    use rayon::prelude::*;
    if scale.iter().all(|&s| s == 1.0) || v == 0 {
        return;
    }
    grad.par_chunks_mut(v).enumerate().for_each(|(i, row)| {
        let f = R::of(if scale.len() == 1 { scale[0] } else { scale[i] });
        for x in row {
            *x = *x * f;
        }
    });
}

/// [`scale_in_place`] on a copy (a shared gradient).
fn scaled_copy<R: Real + bytemuck::Pod>(grad: &FlexTensor, scale: &[f64]) -> FlexTensor {
    let [n, v] = [grad.layout().shape()[0], grad.layout().shape()[1]];
    let mut values = grad.as_slice::<R>().expect("contiguous gradient").to_vec();
    scale_in_place(&mut values, v, scale);
    tensor(values, [n, v])
}
