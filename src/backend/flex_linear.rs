//! Flex's fused-linear loss: the host loop of [`crate::kernel::linear_cpu`] on the tensors'
//! memory (GEMMs accumulating in place, buffers allocated once per call), for f32 and f64.

use burn::backend::flex::{Flex, FlexTensor};
use burn::tensor::{DType, Int, Tensor};

use super::DistillParts;
use crate::kernel::linear_cpu::{
    self, DenseHostTeacher, Gemm, HostPlan, HostSide, SparseHostTeacher,
};
use crate::kernel::{cpu, real::Real, sparse_cpu};
use crate::{DistillParams, Reduction};

/// One side of a fused-linear loss on the inner device: `[N, H]` hidden states, `[H, V]`
/// weight, optional `[V]` bias.
pub(crate) type HostLinearSide = (Tensor<2>, Tensor<2>, Option<Tensor<1>>);

/// The teacher of a fused-linear loss on the host: hidden states and head, or a sparse
/// teacher's `[N, k]` indices and log-probabilities (`−∞` where missing) with its setup.
// Built once per loss call and read by reference: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum HostLinearTeacher {
    /// A dense teacher (its logits soft-capped like the student's).
    Dense(HostLinearSide),
    /// A sparse teacher.
    Sparse(Tensor<2, Int>, Tensor<2>, super::SparseSetup),
}

/// How the host loop runs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HostLinearPlan {
    pub(crate) params: DistillParams,
    pub(crate) kernel: crate::Kernel,
    /// The loss's vocabulary (the student's and the teacher's aligned).
    pub(crate) aligned: usize,
    pub(crate) cap: Option<f64>,
    pub(crate) chunk_rows: usize,
    pub(crate) with_grad: bool,
    pub(crate) weight_grad: bool,
    pub(crate) bias_grad: bool,
}

/// The student's gradients of the host loop: hidden states, weight, bias.
pub(crate) type HostLinearGrads = (Tensor<2>, Option<Tensor<2>>, Option<Tensor<1>>);

/// The fused-linear loss by the host loop where the tensors are Flex's, in f32 or f64, and
/// the plan allows (not `Reduction::PerRow` with a gradient); `None` otherwise (the loss runs
/// its chunks as tensor code).
pub(crate) fn linear_host(
    student: &HostLinearSide,
    teacher: &HostLinearTeacher,
    targets: Option<&Tensor<1, Int>>,
    plan: &HostLinearPlan,
) -> Option<(DistillParts, Option<HostLinearGrads>)> {
    if plan.with_grad && plan.params.reduction == Reduction::PerRow {
        return None;
    }
    match student.0.dtype() {
        DType::F32 => run::<f32>(student, teacher, targets, plan),
        DType::F64 => run::<f64>(student, teacher, targets, plan),
        _ => None,
    }
}

/// A Flex tensor, contiguous (no copy when it already is), if it holds `R`.
fn flex<R: Real, const D: usize>(t: &Tensor<D>) -> Option<FlexTensor> {
    if t.dtype() != R::dtype() {
        return None;
    }
    Some(t.clone().try_into_primitive::<Flex>().ok()?.to_contiguous())
}

/// A side's Flex tensors, and its weight's `[H, V]`.
struct Tensors(FlexTensor, FlexTensor, Option<FlexTensor>, [usize; 2]);

impl Tensors {
    fn new<R: Real>((h, w, b): &HostLinearSide) -> Option<Self> {
        let bias = match b {
            Some(b) => Some(flex::<R, 1>(b)?),
            None => None,
        };
        Some(Self(flex::<R, 2>(h)?, flex::<R, 2>(w)?, bias, w.dims()))
    }

    /// The side as slices borrowed from the tensors.
    fn side<R: Real + bytemuck::Pod>(&self) -> Option<HostSide<'_, R>> {
        let [width, vocab] = self.3;
        Some(HostSide {
            hidden: self.0.as_slice()?,
            weight: self.1.as_slice()?,
            bias: match &self.2 {
                Some(b) => Some(b.as_slice()?),
                None => None,
            },
            width,
            vocab,
        })
    }
}

fn run<R: Gemm + bytemuck::Pod>(
    student: &HostLinearSide,
    teacher: &HostLinearTeacher,
    targets: Option<&Tensor<1, Int>>,
    plan: &HostLinearPlan,
) -> Option<(DistillParts, Option<HostLinearGrads>)> {
    let s = Tensors::new::<R>(student)?;
    let device = student.0.device();
    let n = student.0.dims()[0];
    let targets: Option<Vec<i64>> = targets.map(|t| t.to_data().iter::<i64>().collect());
    let params = plan.params;
    let kept: Vec<usize> = match (&targets, params.ignore_index) {
        (Some(t), Some(ignore)) => (0..n).filter(|&i| t[i] != ignore).collect(),
        _ => (0..n).collect(),
    };
    let m = kept.len();
    let chunk_params = crate::params::chunk_params(&params, m);
    let host_plan = HostPlan {
        kept: &kept,
        targets: targets.as_deref(),
        params: &chunk_params,
        aligned: plan.aligned,
        cap: plan.cap,
        chunk: plan.chunk_rows,
        with_grad: plan.with_grad,
        weight_grad: plan.weight_grad,
        bias_grad: plan.bias_grad,
    };
    let (rows, grads) = match teacher {
        HostLinearTeacher::Dense(t) => {
            let t = Tensors::new::<R>(t)?;
            let mut teacher = DenseHostTeacher::new(t.side()?, plan.cap);
            linear_cpu::linear_rows(s.side()?, &mut teacher, &host_plan)
        }
        HostLinearTeacher::Sparse(indices, log_probs, setup) => {
            let k = indices.dims()[1];
            let indices: Vec<i64> = indices.to_data().iter::<i64>().collect();
            let log_probs: Vec<f64> = log_probs.to_data().iter::<f64>().collect();
            let valid = vec![true; n * k];
            let host = sparse_cpu::HostTeacher {
                k,
                indices: &indices,
                log_probs: &log_probs,
                valid: &valid,
            };
            let mut teacher =
                SparseHostTeacher::new(host, (setup.tail, setup.generation_temperature));
            linear_cpu::linear_rows(s.side()?, &mut teacher, &host_plan)
        }
    };
    let tensor = |values: Vec<R>, shape: Vec<usize>| -> burn::tensor::TensorData {
        burn::tensor::TensorData::new(values, shape)
    };
    let float =
        |data: burn::tensor::TensorData| Tensor::<1>::from_data(data, (&device, R::dtype()));
    let column = |f: fn(&cpu::RowOut<R>) -> R| {
        let data = match chunk_params.reduction.factor(m) {
            None => {
                let mut values = vec![R::ZERO; n];
                for (&i, row) in kept.iter().zip(&rows) {
                    values[i] = f(row);
                }
                tensor(values, vec![n])
            }
            Some(factor) => {
                // Sum in f64: the rows' values, exact enough for any N.
                let sum: f64 = rows.iter().map(|r| f(r).to_f64()).sum();
                tensor(vec![R::of(sum * factor)], vec![1])
            }
        };
        float(data)
    };
    let parts = DistillParts {
        loss: column(|r| r.loss),
        soft: column(|r| r.soft),
        hard: targets.is_some().then(|| column(|r| r.hard)),
    };
    let [width, vocab] = s.3;
    let grads = grads.map(|g| {
        let t2 = |v: Vec<R>, shape: [usize; 2]| {
            Tensor::<2>::from_data(tensor(v, shape.to_vec()), (&device, R::dtype()))
        };
        (
            t2(g.hidden, [n, width]),
            g.weight.map(|w| t2(w, [width, vocab])),
            g.bias.map(|b| float(tensor(b, vec![vocab]))),
        )
    });
    Some((parts, grads))
}
