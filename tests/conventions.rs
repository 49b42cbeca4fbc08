//! "Coming from PyTorch, Liger, TRL, torchtune": each row of the README's table, against that
//! tool's own formula in float64 (`tests/golden/conventions.json`, written by
//! `scripts/conventions_golden.py`, which transcribes each tool's source and asserts the
//! mapping in Python first). Float64 on Flex (0.1 ran it on `Autodiff<NdArray<f64>>`).
#![cfg(feature = "flex")]

mod common;

use burn::tensor::{DType, Int, Tensor, TensorData};
use burn_distill::{DistillLossConfig, Kernel, Reduction};
use common::{
    flex_autodiff, load_cases, mismatches, numbers, parse_divergence, values_f64 as values,
};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
struct Case {
    tool: String,
    name: String,
    shape: [usize; 3],
    student: Vec<Value>,
    teacher: Vec<Value>,
    labels: Option<Vec<i64>>,
    crate_config: CrateConfig,
    post: Post,
    expected: Expected,
}

#[derive(Deserialize)]
struct CrateConfig {
    temperature: f64,
    alpha: f64,
    divergence: String,
    beta: Option<f64>,
    scale_by_t2: bool,
    ignore_index: Option<i64>,
    label_smoothing: f64,
    reduction: String,
    items: Option<u64>,
    with_labels: bool,
}

#[derive(Deserialize)]
struct Post {
    scale: f64,
    add_teacher_entropy: bool,
    teacher_entropy_weight: Option<f64>,
}

#[derive(Deserialize)]
struct Expected {
    loss: Value,
    grad_student: Vec<Value>,
}

impl CrateConfig {
    fn config(&self) -> DistillLossConfig {
        let reduction = match self.reduction.as_str() {
            "mean" => Reduction::Mean,
            "sum" => Reduction::Sum,
            "normalized" => Reduction::Normalized {
                items: self.items.expect("normalized needs items"),
            },
            other => panic!("unknown reduction {other}"),
        };
        DistillLossConfig::new()
            .with_temperature(self.temperature)
            .with_alpha(self.alpha)
            .with_divergence(parse_divergence(&self.divergence, self.beta, None))
            .with_scale_by_t2(self.scale_by_t2)
            .with_ignore_index(self.ignore_index)
            .with_label_smoothing(self.label_smoothing)
            .with_reduction(reduction)
    }
}

/// Mean teacher entropy `Σ_kept H(softmax(z_t)) / max(K, 1)` (torchtune's soft cross-entropy
/// minus KL), in f64 on the host.
fn mean_teacher_entropy(teacher: &[f64], v: usize, labels: Option<&[i64]>) -> f64 {
    let mut total = 0.0;
    let mut kept = 0usize;
    for (i, row) in teacher.chunks(v).enumerate() {
        if labels.is_some_and(|l| l[i] == -100) {
            continue;
        }
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|t| (t - max).exp()).sum::<f64>().ln();
        total -= row.iter().map(|t| (t - lse).exp() * (t - lse)).sum::<f64>();
        kept += 1;
    }
    total / kept.max(1) as f64
}

fn run(case: &Case, kernel: Kernel) -> Vec<String> {
    let device = flex_autodiff();
    let [b, t, v] = case.shape;
    let cfg = &case.crate_config;
    let loss = cfg.config().with_kernel(kernel).init();
    let student_values = numbers(&case.student);
    let teacher_values = numbers(&case.teacher);
    let f64s = (&device, DType::F64);
    let student: Tensor<3> =
        Tensor::from_data(TensorData::new(student_values, [b, t, v]), f64s).require_grad();
    let teacher: Tensor<3> =
        Tensor::from_data(TensorData::new(teacher_values.clone(), [b, t, v]), f64s);
    let labels = case.labels.clone();
    let value = if cfg.with_labels {
        let labels = labels.clone().expect("labels");
        let targets: Tensor<2, Int> = Tensor::from_data(TensorData::new(labels, [b, t]), &device);
        loss.forward_seq(student.clone(), teacher, targets)
    } else {
        loss.forward_seq_soft(student.clone(), teacher)
    };
    let value = value.mul_scalar(case.post.scale);
    let grads = value.backward();
    let grad = values(student.grad(&grads).expect("student gradient"));
    let mut loss_value = values(value)[0];
    if case.post.add_teacher_entropy {
        let mask = labels.as_deref().filter(|_| cfg.with_labels);
        loss_value += case.post.teacher_entropy_weight.unwrap_or(1.0)
            * mean_teacher_entropy(&teacher_values, v, mask);
    }
    let expected_loss = common::number(&case.expected.loss);
    let expected_grad = numbers(&case.expected.grad_student);
    mismatches("loss", &[loss_value], &[expected_loss], 1e-12, 1e-10)
        .into_iter()
        .chain(mismatches("grad", &grad, &expected_grad, 1e-13, 1e-9))
        .map(|m| format!("{} ({}, {kernel:?}): {m}", case.name, case.tool))
        .collect()
}

#[test]
fn every_tool_convention_is_reproduced_in_f64() {
    let cases: Vec<Case> = load_cases("conventions.json");
    let tools: std::collections::BTreeSet<_> = cases.iter().map(|c| c.tool.as_str()).collect();
    for tool in [
        "pytorch_hinton",
        "trl_gkd",
        "liger_jsd",
        "liger_fused_linear_jsd",
        "torchtune_forward_kl",
        "torchtune_reverse_kl",
        "torchtune_kd_recipe",
    ] {
        assert!(tools.contains(tool), "no case for {tool}");
    }
    let mut failures = Vec::new();
    for case in &cases {
        for kernel in [Kernel::Fused, Kernel::Reference] {
            failures.extend(run(case, kernel));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
