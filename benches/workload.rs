//! The benchmark workloads, shared by `benches/distill.rs` (criterion) and
//! `examples/bench_table.rs` (the markdown table).
#![allow(dead_code)]

use burn::nn::loss::{CrossEntropyLossConfig, KLDivLossConfig, Reduction as NnReduction};
use burn::tensor::{Device, Distribution, Int, Tensor, activation};
use burn_distill::{
    DistillLoss, DistillLossConfig, Kernel, SparseDistillLoss, SparseDistillLossConfig,
    SparseTeacher, TailPolicy,
};

/// Entries per row of the sparse (top-k) teacher, as an API returns them: 20, or
/// `BURN_DISTILL_TOP_K`.
pub fn top_k() -> usize {
    std::env::var("BURN_DISTILL_TOP_K")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(20)
}

/// The benchmarked loss: Hinton's full loss, T = 4, α = 0.9, forward KL, mean.
pub fn loss(kernel: Kernel) -> DistillLoss {
    DistillLossConfig::new()
        .with_temperature(4.0)
        .with_alpha(0.9)
        .with_kernel(kernel)
        .init()
}

/// The sparse-teacher loss on the same settings: top-k log-probabilities, tail bucket.
pub fn sparse_loss(kernel: Kernel) -> SparseDistillLoss {
    SparseDistillLossConfig::new(
        DistillLossConfig::new()
            .with_temperature(4.0)
            .with_alpha(0.9)
            .with_kernel(kernel),
    )
    .with_tail(TailPolicy::TailBucket)
    .init()
}

/// Inputs of one shape: f32 student and teacher logits and targets, and the teacher's top-k
/// (indices and log-probabilities at T = 1) for the sparse loss.
pub struct Inputs {
    pub student: Tensor<2>,
    pub teacher: Tensor<2>,
    pub targets: Tensor<1, Int>,
    pub top_indices: Tensor<2, Int>,
    pub top_log_probs: Tensor<2>,
}

impl Inputs {
    /// The inputs on `device` (without autodiff: see [`Inputs::lift`]).
    pub fn new([n, v]: [usize; 2], device: &Device) -> Self {
        device.seed(7);
        let teacher = Tensor::random([n, v], Distribution::Normal(0.0, 3.0), device);
        let (top_log_probs, top_indices) =
            activation::log_softmax(teacher.clone(), 1).topk_with_indices(top_k().min(v), 1);
        Self {
            student: Tensor::random([n, v], Distribution::Normal(0.0, 3.0), device),
            teacher,
            targets: Tensor::random([n], Distribution::Uniform(0.0, v as f64), device),
            top_indices,
            top_log_probs,
        }
    }

    /// The same inputs with autodiff (on the device's `autodiff()` form).
    pub fn lift(&self) -> Inputs {
        Inputs {
            student: self.student.clone().autodiff(),
            teacher: self.teacher.clone().autodiff(),
            targets: self.targets.clone().autodiff(),
            top_indices: self.top_indices.clone().autodiff(),
            top_log_probs: self.top_log_probs.clone().autodiff(),
        }
    }

    /// The sparse teacher.
    pub fn sparse_teacher(&self) -> SparseTeacher {
        SparseTeacher::new(self.top_indices.clone(), self.top_log_probs.clone())
    }

    /// Bytes of the two logit inputs.
    pub fn input_bytes(&self) -> usize {
        2 * self.student.shape().num_elements() * 4
    }
}

/// What is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// `DistillLoss` with `Kernel::Fused`.
    Fused,
    /// `DistillLoss` with `Kernel::Reference`.
    Reference,
    /// burn-nn's `KLDivLoss` (on log_softmax / softmax) · T² and `CrossEntropyLoss`.
    BurnNn,
    /// `SparseDistillLoss` against the teacher's top-20 (tail bucket), composed burn ops.
    Sparse,
    /// The same with the fused sparse kernel (`Kernel::Auto`: the reference where the device
    /// has none).
    SparseFused,
}

impl Variant {
    pub const ALL: [Variant; 5] = [
        Variant::Fused,
        Variant::Reference,
        Variant::BurnNn,
        Variant::Sparse,
        Variant::SparseFused,
    ];

    pub fn name(self) -> String {
        let k = top_k();
        match self {
            Variant::Fused => "fused".into(),
            Variant::Reference => "reference".into(),
            Variant::BurnNn => "burn-nn KLDivLoss".into(),
            Variant::Sparse => format!("sparse top-{k} (tail bucket), composed"),
            Variant::SparseFused => format!("sparse top-{k} (tail bucket), fused"),
        }
    }
}

/// burn-nn's composition of the same loss.
pub fn burn_nn_loss(inputs: &Inputs) -> Tensor<1> {
    let t = 4.0;
    let log_q = activation::log_softmax(inputs.student.clone().mul_scalar(1.0 / t), 1);
    let p = activation::softmax(inputs.teacher.clone().mul_scalar(1.0 / t), 1);
    let soft = KLDivLossConfig::new()
        .init()
        .forward(log_q, p, NnReduction::BatchMean)
        .mul_scalar(t * t);
    let hard = CrossEntropyLossConfig::new()
        .init(&inputs.student.device())
        .forward(inputs.student.clone(), inputs.targets.clone());
    soft.mul_scalar(0.9) + hard.mul_scalar(0.1)
}

/// Forward only, on inputs without autodiff; waits for the result.
pub fn forward(variant: Variant, inputs: &Inputs) {
    let value = match variant {
        Variant::Fused => loss(Kernel::Fused).forward(
            inputs.student.clone(),
            inputs.teacher.clone(),
            inputs.targets.clone(),
        ),
        Variant::Reference => loss(Kernel::Reference).forward(
            inputs.student.clone(),
            inputs.teacher.clone(),
            inputs.targets.clone(),
        ),
        Variant::BurnNn => burn_nn_loss(inputs),
        Variant::Sparse | Variant::SparseFused => sparse_loss(sparse_kernel(variant)).forward(
            inputs.student.clone(),
            inputs.sparse_teacher(),
            inputs.targets.clone(),
        ),
    };
    let _ = value.into_scalar::<f32>();
}

/// Forward and backward, on inputs with autodiff ([`Inputs::lift`]); waits for the student
/// gradient.
pub fn forward_backward(variant: Variant, inputs: &Inputs) {
    let student = inputs.student.clone().require_grad();
    let tracked = Inputs {
        student: student.clone(),
        teacher: inputs.teacher.clone(),
        targets: inputs.targets.clone(),
        top_indices: inputs.top_indices.clone(),
        top_log_probs: inputs.top_log_probs.clone(),
    };
    let value = match variant {
        Variant::Fused | Variant::Reference => forward_value(variant, &tracked),
        Variant::BurnNn => burn_nn_loss(&tracked),
        Variant::Sparse | Variant::SparseFused => sparse_loss(sparse_kernel(variant)).forward(
            student.clone(),
            tracked.sparse_teacher(),
            tracked.targets.clone(),
        ),
    };
    let grads = value.backward();
    let grad = student.grad(&grads).expect("gradient");
    grad.device().sync().expect("sync");
    drop(grad);
}

fn sparse_kernel(variant: Variant) -> Kernel {
    if variant == Variant::Sparse {
        Kernel::Reference
    } else {
        Kernel::Auto
    }
}

fn forward_value(variant: Variant, inputs: &Inputs) -> Tensor<1> {
    let kernel = if variant == Variant::Fused {
        Kernel::Fused
    } else {
        Kernel::Reference
    };
    loss(kernel).forward(
        inputs.student.clone(),
        inputs.teacher.clone(),
        inputs.targets.clone(),
    )
}

/// The streaming bound on the CPU: read both inputs once, write one fresh `[N, V]` output
/// (`out = s − t`), with rayon over rows, on raw slices. The output is allocated like the fused
/// kernel's gradient (zeroed, huge pages advised), so that both pay the same page faults.
#[cfg(feature = "flex")]
pub fn cpu_stream(student: &[f32], teacher: &[f32], v: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = burn_distill::internals::zeroed_grad::<f32>(student.len());
    out.par_chunks_mut(v)
        .zip(student.par_chunks(v).zip(teacher.par_chunks(v)))
        .for_each(|(o, (s, t))| {
            for ((o, s), t) in o.iter_mut().zip(s).zip(t) {
                *o = s - t;
            }
        });
    out
}
