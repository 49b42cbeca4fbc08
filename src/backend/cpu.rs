//! Glue shared by the CPU backends (NdArray, Flex): the CPU kernel of [`crate::kernel::cpu`]
//! run on row-major host slices, its outputs wrapped as tensors without copies.

use burn::tensor::{
    DType, Int, Tensor, TensorData, TensorMetadata, TensorPrimitive,
    backend::Backend,
    ops::{FloatTensor, IntTensor},
};

use super::{DenseCall, DistillParams, DistillParts, FusedOutput, KernelCall, SparseCall};
use super::{LinearCall, SparseInputs, SparseLinearCall};
use crate::kernel::{
    cpu,
    linear_cpu::{self, Gemm, HostChunkTeacher, HostPlan, HostSide},
    real::Real,
    sparse_cpu,
};
use crate::{
    DistillBackend, Kernel, LinearGrads, LinearOutput, LinearSetup, LinearSide, Reduction,
};
use std::borrow::Cow;

/// Targets on the host.
fn host_targets<B: Backend>(targets: Option<IntTensor<B>>) -> Option<Vec<i64>> {
    targets.map(|t| {
        Tensor::<B, 1, Int>::from_primitive(t)
            .into_data()
            .iter::<i64>()
            .collect()
    })
}

/// The `[N, k]` sparse teacher on the host: `k`, indices, log-probabilities, validity.
fn host_sparse<B: Backend>(
    teacher: SparseInputs<B>,
    n: usize,
) -> (usize, Vec<i64>, Vec<f64>, Vec<bool>) {
    let indices = Tensor::<B, 2, Int>::from_primitive(teacher.indices);
    let k = indices.dims()[1];
    let indices: Vec<i64> = indices.into_data().iter::<i64>().collect();
    let log_probs: Vec<f64> =
        Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(teacher.log_probs))
            .into_data()
            .iter::<f64>()
            .collect();
    let valid: Vec<bool> = match teacher.mask {
        Some(mask) => Tensor::<B, 2, burn::tensor::Bool>::from_primitive(mask)
            .into_data()
            .iter::<bool>()
            .collect(),
        None => vec![true; n * k],
    };
    (k, indices, log_probs, valid)
}

/// A CPU backend whose float tensors the host kernels can read as slices: all a CPU backend
/// provides; its `DistillBackend` methods are the generic ones below ([`host_kernels!`]).
pub(super) trait HostFloats: DistillBackend {
    /// The tensor's elements in row-major order, borrowed where they already are; `None` where
    /// the tensor does not hold `R`.
    fn row_major<R: Real>(tensor: &FloatTensor<Self>) -> Option<Cow<'_, [R]>>;
    /// The tensor's elements to write in place: `Some` where it holds `R` in row-major order
    /// and is not shared.
    fn unique_mut<R: Real>(tensor: &mut FloatTensor<Self>) -> Option<&mut [R]>;
}

/// [`DistillBackend::distill_fused`] of a CPU backend: the dense row kernel in f32 or f64.
pub(super) fn fused<B: HostFloats>(call: DenseCall<B>) -> Option<FusedOutput<B>> {
    fn run<B: HostFloats, R: Real>(call: DenseCall<B>) -> Option<FusedOutput<B>> {
        let (s, t) = (
            B::row_major::<R>(&call.student)?,
            B::row_major::<R>(&call.teacher)?,
        );
        let v = call.student.shape()[1];
        let targets = host_targets::<B>(call.targets);
        let params = &call.settings;
        let out = cpu::distill_rows(&s, &t, v, targets.as_deref(), params, call.with_grad);
        Some(output_of_rows(
            out,
            &call.student,
            targets.is_some(),
            params,
        ))
    }
    match (call.student.dtype(), call.teacher.dtype()) {
        (DType::F32, DType::F32) => run::<B, f32>(call),
        (DType::F64, DType::F64) => run::<B, f64>(call),
        _ => None,
    }
}

/// [`DistillBackend::distill_sparse_fused`] of a CPU backend: the sparse row kernel in f32 or
/// f64 (the `[N, k]` teacher is read to the host: it is small).
pub(super) fn sparse_fused<B: HostFloats>(call: SparseCall<B>) -> Option<FusedOutput<B>> {
    fn run<B: HostFloats, R: Real>(call: SparseCall<B>) -> Option<FusedOutput<B>> {
        let s = B::row_major::<R>(&call.student)?;
        let [n, v] = [call.student.shape()[0], call.student.shape()[1]];
        let setup = call.teacher.setup;
        let (k, indices, log_probs, valid) = host_sparse::<B>(call.teacher, n);
        let targets = host_targets::<B>(call.targets);
        let host = sparse_cpu::HostTeacher {
            k,
            indices: &indices,
            log_probs: &log_probs,
            valid: &valid,
        };
        let params = &call.settings;
        let teacher_setup = (setup.tail, setup.generation_temperature);
        let y = targets.as_deref();
        let out = cpu::rows_with(s.len(), call.with_grad, |grad| {
            sparse_cpu::sparse_rows_into(&s, v, &host, y, params, teacher_setup, grad)
        });
        Some(output_of_rows(
            out,
            &call.student,
            targets.is_some(),
            params,
        ))
    }
    match call.student.dtype() {
        DType::F32 => run::<B, f32>(call),
        DType::F64 => run::<B, f64>(call),
        _ => None,
    }
}

/// [`DistillBackend::distill_scale_grad`] of a CPU backend: in place where the gradient is not
/// shared (it is the kernel's own), a broadcast multiply otherwise.
pub(super) fn scale_grad<B: HostFloats>(
    mut grad: FloatTensor<B>,
    upstream: FloatTensor<B>,
) -> FloatTensor<B> {
    let scale = upstream_values::<B>(upstream);
    let [n, v] = [grad.shape()[0], grad.shape()[1]];
    fn scale_rows<R: Real>(g: Option<&mut [R]>, [n, v]: [usize; 2], scale: &[f64]) -> bool {
        g.filter(|g| g.len() == n * v)
            .map(|g| scale_in_place(g, v, scale))
            .is_some()
    }
    let done = match grad.dtype() {
        DType::F32 => scale_rows(B::unique_mut::<f32>(&mut grad), [n, v], &scale),
        DType::F64 => scale_rows(B::unique_mut::<f64>(&mut grad), [n, v], &scale),
        _ => false,
    };
    if done {
        grad
    } else {
        scale_by_mul::<B>(grad, scale)
    }
}

/// The `DistillBackend` methods of a CPU backend, one body for NdArray and Flex: the generic
/// functions of this module over the backend's [`HostFloats`].
macro_rules! host_kernels {
    () => {
        fn fused_kernel_dtypes() -> &'static [burn::tensor::DType] {
            super::cpu::CPU_DTYPES
        }

        fn distill_fused(call: crate::DenseCall<Self>) -> Option<crate::FusedOutput<Self>> {
            super::cpu::fused::<Self>(call)
        }

        fn has_sparse_fused_kernel(dtype: burn::tensor::DType, _k: usize) -> bool {
            super::cpu::CPU_DTYPES.contains(&dtype)
        }

        fn distill_sparse_fused(call: crate::SparseCall<Self>) -> Option<crate::FusedOutput<Self>> {
            super::cpu::sparse_fused::<Self>(call)
        }

        fn distill_scale_grad(
            grad: burn::tensor::ops::FloatTensor<Self>,
            upstream: burn::tensor::ops::FloatTensor<Self>,
        ) -> burn::tensor::ops::FloatTensor<Self> {
            super::cpu::scale_grad::<Self>(grad, upstream)
        }

        fn distill_linear_chunked(
            call: crate::LinearCall<Self>,
        ) -> Option<crate::LinearOutput<Self>> {
            super::cpu::linear_chunked::<Self>(call)
        }

        fn distill_sparse_linear_chunked(
            call: crate::SparseLinearCall<Self>,
        ) -> Option<crate::LinearOutput<Self>> {
            super::cpu::sparse_linear_chunked::<Self>(call)
        }
    };
}
pub(super) use host_kernels;

/// [`DistillBackend::distill_linear_chunked`] of a CPU backend: the host loop of
/// [`linear_cpu::linear_rows`] for f32 and f64 with the fused kernel; `None` otherwise (the loss
/// then runs its composed chunks): `Kernel::Reference`, other dtypes, zero-width hidden states,
/// and `Reduction::PerRow` with a gradient.
pub(super) fn linear_chunked<B: HostFloats>(call: LinearCall<B>) -> Option<LinearOutput<B>> {
    let setup = call.settings;
    let zero_width = [&call.student.weight, &call.teacher.weight]
        .iter()
        .any(|w| w.shape()[0] == 0);
    if setup.kernel == Kernel::Reference || zero_width {
        return None;
    }
    if call.with_grad && setup.params.reduction == Reduction::PerRow {
        // Each row's upstream weight is only known in the backward pass: the caller
        // materialises the logits.
        return None;
    }
    let aligned = setup
        .vocab_mismatch
        .aligned_width(
            call.student.weight.shape()[1],
            call.teacher.weight.shape()[1],
            setup.params.divergence,
        )
        .unwrap_or_else(|e| panic!("burn-distill: {e} (checked before the chunks)"));
    fn host<B: HostFloats, R: Gemm>(
        call: &LinearCall<B>,
        aligned: usize,
    ) -> Option<LinearOutput<B>> {
        let t = host_sides::<B, R>(&call.teacher)?;
        let mut teacher =
            linear_cpu::DenseHostTeacher::new(host_side(&t), call.settings.logit_softcap);
        linear_host::<B, R, _>(call.with_teacher(&mut teacher), aligned)
    }
    match call.student.hidden.dtype() {
        DType::F32 => host::<B, f32>(&call, aligned),
        DType::F64 => host::<B, f64>(&call, aligned),
        _ => None,
    }
}

/// [`DistillBackend::distill_sparse_linear_chunked`] of a CPU backend: the host loop of
/// [`linear_cpu::linear_rows`] around the sparse row kernel for f32 and f64; `None` otherwise
/// (the loss then runs its composed chunks, or materialises the logits where no fused sparse
/// kernel applies: `Kernel::Reference`, another dtype, `Reduction::PerRow` with a gradient).
pub(super) fn sparse_linear_chunked<B: HostFloats>(
    call: SparseLinearCall<B>,
) -> Option<LinearOutput<B>> {
    let (setup, dtype) = (call.settings, call.student.hidden.dtype());
    let k = call.teacher.indices.shape()[1];
    if setup.kernel == Kernel::Reference
        || !B::has_sparse_fused_kernel(dtype, k)
        || (call.with_grad && setup.params.reduction == Reduction::PerRow)
        || call.student.weight.shape()[0] == 0
    {
        return None;
    }
    let n = call.student.hidden.shape()[0];
    let vocab = call.student.weight.shape()[1];
    let sparse = call.teacher.setup;
    let (k, indices, log_probs, valid) = host_sparse::<B>(call.teacher.clone(), n);
    let mut teacher = linear_cpu::SparseHostTeacher::new(
        sparse_cpu::HostTeacher {
            k,
            indices: &indices,
            log_probs: &log_probs,
            valid: &valid,
        },
        (sparse.tail, sparse.generation_temperature),
    );
    match dtype {
        DType::F32 => linear_host::<B, f32, _>(call.with_teacher(&mut teacher), vocab),
        DType::F64 => linear_host::<B, f64, _>(call.with_teacher(&mut teacher), vocab),
        _ => None,
    }
}

/// A side's hidden states, weight and bias read as `R`, and the weight's `[H, V]`.
type Slices<'a, R> = (Cow<'a, [R]>, Cow<'a, [R]>, Option<Cow<'a, [R]>>, [usize; 2]);

/// `side`'s tensors as slices of `R`; `None` where one of them holds another type.
fn host_sides<B: HostFloats, R: Real>(side: &LinearSide<B>) -> Option<Slices<'_, R>> {
    let bias = match &side.bias {
        Some(b) => Some(B::row_major::<R>(b)?),
        None => None,
    };
    let shape = side.weight.shape();
    Some((
        B::row_major::<R>(&side.hidden)?,
        B::row_major::<R>(&side.weight)?,
        bias,
        [shape[0], shape[1]],
    ))
}

/// The slices of [`host_sides`] as a [`HostSide`].
fn host_side<'a, R: Real>((h, w, b, [width, vocab]): &'a Slices<'_, R>) -> HostSide<'a, R> {
    HostSide {
        hidden: h,
        weight: w,
        bias: b.as_deref(),
        width: *width,
        vocab: *vocab,
    }
}

/// [`linear_on_slices`] on the student's tensors read as `R`; `None` where one of them holds
/// another type.
fn linear_host<B: HostFloats, R: Gemm, T: HostChunkTeacher<R>>(
    call: KernelCall<B, &LinearSide<B>, &mut T, LinearSetup>,
    aligned: usize,
) -> Option<LinearOutput<B>> {
    let s = host_sides::<B, R>(call.student)?;
    let device = B::float_device(&call.student.hidden);
    let call = call.map(|_, t, y| (host_side(&s), t, y));
    Some(linear_on_slices::<B, R, T>(call, aligned, &device))
}

/// The fused-linear loss on host slices ([`linear_cpu::linear_rows`]) with the fused kernel,
/// its outputs wrapped as tensors of `B` (not for `Reduction::PerRow` with a gradient).
fn linear_on_slices<B: Backend, R: Gemm, T: HostChunkTeacher<R>>(
    call: KernelCall<B, HostSide<'_, R>, &mut T, LinearSetup>,
    aligned: usize,
    device: &B::Device,
) -> LinearOutput<B> {
    let (student, setup) = (call.student, call.settings);
    let params = setup.params;
    let n = student.hidden.len() / student.width;
    let targets = host_targets::<B>(call.targets);
    let kept: Vec<usize> = match (&targets, params.ignore_index) {
        (Some(t), Some(ignore)) => (0..n).filter(|&i| t[i] != ignore).collect(),
        _ => (0..n).collect(),
    };
    let m = kept.len();
    let chunk_params = crate::params::chunk_params(&params, m);
    let plan = HostPlan {
        kept: &kept,
        targets: targets.as_deref(),
        params: &chunk_params,
        aligned,
        cap: setup.logit_softcap,
        chunk: setup.chunk_rows,
        with_grad: call.with_grad,
        weight_grad: setup.weight_grad,
        bias_grad: setup.bias_grad,
    };
    let (rows, grads) = linear_cpu::linear_rows(student, call.teacher, &plan);
    let column = |f: fn(&cpu::RowOut<R>) -> R| {
        let data = match chunk_params.reduction.factor(m) {
            None => {
                let mut values = vec![R::ZERO; n];
                for (&i, row) in kept.iter().zip(&rows) {
                    values[i] = f(row);
                }
                TensorData::new(values, [n])
            }
            Some(factor) => {
                let sum: f64 = rows.iter().map(|r| f(r).to_f64()).sum();
                TensorData::new(vec![R::of(sum * factor)], [1])
            }
        };
        B::float_from_data(data, device)
    };
    let parts = DistillParts {
        loss: column(|r| r.loss),
        soft: column(|r| r.soft),
        hard: targets.is_some().then(|| column(|r| r.hard)),
    };
    let tensor = |values: Vec<R>, shape: Vec<usize>| {
        B::float_from_data(TensorData::new(values, shape), device)
    };
    let grads = grads.map(|g| LinearGrads {
        hidden: tensor(g.hidden, vec![n, student.width]),
        weight: g
            .weight
            .map(|w| tensor(w, vec![student.width, student.vocab])),
        bias: g.bias.map(|b| tensor(b, vec![student.vocab])),
    });
    (parts, grads)
}

/// The kernel's rows reduced on the host (in f64) and wrapped as tensors of `B`, on the
/// device of the `[N, V]` `student` logits.
fn output_of_rows<B: Backend, R: Real>(
    out: cpu::CpuRows<R>,
    student: &FloatTensor<B>,
    has_targets: bool,
    params: &DistillParams,
) -> FusedOutput<B> {
    let [n, v] = [student.shape()[0], student.shape()[1]];
    let device = &B::float_device(student);
    let column = |f: fn(&cpu::RowOut<R>) -> R| {
        let data = match params.reduction.factor(out.kept) {
            None => TensorData::new(out.rows.iter().map(f).collect::<Vec<R>>(), [n]),
            Some(factor) => {
                // Sum in f64: N row values, exact enough for any N.
                let sum: f64 = out.rows.iter().map(|r| f(r).to_f64()).sum();
                TensorData::new(vec![R::of(sum * factor)], [1])
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
    // In the gradient's dtype (Flex keeps the data's f64 otherwise, and its mul wants one).
    let scale = B::float_cast(
        B::float_from_data(TensorData::new(scale, [n]), &device),
        grad.dtype().into(),
    );
    B::float_mul(grad, B::float_reshape(scale, [n, 1].into()))
}

/// The dtypes of the CPU kernel.
pub(super) const CPU_DTYPES: &[DType] = &[DType::F32, DType::F64];
