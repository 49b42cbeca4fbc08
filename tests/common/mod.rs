//! Shared test helpers: the golden cases of `tests/golden/losses.json` and their runner.
#![allow(dead_code)]

use std::path::PathBuf;

use burn::tensor::{Int, Tensor, TensorData, backend::AutodiffBackend, backend::Backend};
use burn_distill::{DistillBackend, DistillLoss, DistillLossConfig, Divergence, Kernel, Reduction};
use serde::Deserialize;
use serde_json::Value;

/// Where the golden file lives (a copy of `../shared/golden/losses.json`).
pub fn golden_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/losses.json")
}

#[derive(Deserialize)]
struct GoldenFile {
    format: u32,
    cases: Vec<RawCase>,
}

#[derive(Deserialize)]
struct RawCase {
    name: String,
    shape: [usize; 2],
    student: Vec<Value>,
    teacher: Vec<Value>,
    targets: Option<Vec<i64>>,
    config: RawConfig,
    expected: RawExpected,
}

#[derive(Deserialize)]
struct RawConfig {
    temperature: f64,
    alpha: f64,
    divergence: String,
    beta: Option<f64>,
    lambda: Option<f64>,
    scale_by_t2: bool,
    ignore_index: Option<i64>,
    label_smoothing: f64,
    reduction: String,
}

#[derive(Deserialize)]
struct RawExpected {
    loss: Vec<Value>,
    grad_student: Vec<Value>,
}

/// One golden case, decoded.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    pub shape: [usize; 2],
    pub student: Vec<f64>,
    pub teacher: Vec<f64>,
    pub targets: Option<Vec<i64>>,
    pub config: DistillLossConfig,
    pub loss: Vec<f64>,
    pub grad: Vec<f64>,
}

fn number(v: &Value) -> f64 {
    match v {
        Value::Number(n) => n.as_f64().unwrap(),
        Value::String(s) if s == "-inf" => f64::NEG_INFINITY,
        Value::String(s) if s == "inf" => f64::INFINITY,
        other => panic!("unexpected number in golden file: {other}"),
    }
}

fn numbers(v: &[Value]) -> Vec<f64> {
    v.iter().map(number).collect()
}

/// All golden cases. Fails, naming the path, if the file is missing.
pub fn golden_cases() -> Vec<Case> {
    let path = golden_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read golden file {}: {e}", path.display()));
    let file: GoldenFile = serde_json::from_str(&text).expect("golden file is valid JSON");
    assert_eq!(file.format, 1, "golden file format");
    file.cases
        .into_iter()
        .map(|c| {
            let divergence = match c.config.divergence.as_str() {
                "forward_kl" => Divergence::ForwardKl,
                "reverse_kl" => Divergence::ReverseKl,
                "jsd" => Divergence::Jsd {
                    beta: c.config.beta.unwrap(),
                },
                "skew_kl" => Divergence::SkewKl {
                    lambda: c.config.lambda.unwrap(),
                },
                "skew_reverse_kl" => Divergence::SkewReverseKl {
                    lambda: c.config.lambda.unwrap(),
                },
                "tvd" => Divergence::Tvd,
                other => panic!("unknown divergence {other}"),
            };
            let reduction = match c.config.reduction.as_str() {
                "mean" => Reduction::Mean,
                "sum" => Reduction::Sum,
                "none" => Reduction::None,
                other => panic!("unknown reduction {other}"),
            };
            let config = DistillLossConfig::new()
                .with_temperature(c.config.temperature)
                .with_alpha(c.config.alpha)
                .with_divergence(divergence)
                .with_scale_by_t2(c.config.scale_by_t2)
                .with_ignore_index(c.config.ignore_index)
                .with_label_smoothing(c.config.label_smoothing)
                .with_reduction(reduction);
            Case {
                name: c.name,
                shape: c.shape,
                student: numbers(&c.student),
                teacher: numbers(&c.teacher),
                targets: c.targets,
                config,
                loss: numbers(&c.expected.loss),
                grad: numbers(&c.expected.grad_student),
            }
        })
        .collect()
}

/// `[N, V]` float tensor from row-major values.
pub fn tensor2<B: Backend>(values: &[f64], shape: [usize; 2], device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

/// `[N]` int tensor.
pub fn ints<B: Backend>(values: &[i64], device: &B::Device) -> Tensor<B, 1, Int> {
    Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), device)
}

/// Float values of a tensor, as f64.
pub fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data().iter::<f64>().collect()
}

/// Runs the loss of a case; returns (loss values, student gradient).
pub fn run_case<B: AutodiffBackend + DistillBackend>(
    loss: &DistillLoss,
    case: &Case,
    device: &B::Device,
) -> (Vec<f64>, Vec<f64>) {
    let student = tensor2::<B>(&case.student, case.shape, device).require_grad();
    let teacher = tensor2::<B>(&case.teacher, case.shape, device);
    let value = match &case.targets {
        Some(t) => loss.forward(student.clone(), teacher, ints::<B>(t, device)),
        None => loss.forward_soft(student.clone(), teacher),
    };
    let grads = value.clone().sum().backward();
    let grad = student.grad(&grads).expect("student has a gradient");
    (values(value), values(grad))
}

/// Is `actual` within `abs + rel·|expected|` of `expected`? (Infinities must match exactly.)
pub fn close(actual: f64, expected: f64, abs: f64, rel: f64) -> bool {
    if expected.is_infinite() || actual.is_infinite() {
        return actual == expected;
    }
    (actual - expected).abs() <= abs + rel * expected.abs()
}

/// Failures of `actual` against `expected` at the given tolerance, as readable lines.
pub fn mismatches(what: &str, actual: &[f64], expected: &[f64], abs: f64, rel: f64) -> Vec<String> {
    if actual.len() != expected.len() {
        return vec![format!(
            "{what}: {} values, expected {}",
            actual.len(),
            expected.len()
        )];
    }
    actual
        .iter()
        .zip(expected)
        .enumerate()
        .filter(|(_, (a, e))| !close(**a, **e, abs, rel))
        .map(|(i, (a, e))| format!("{what}[{i}] = {a}, expected {e}"))
        .take(5)
        .collect()
}

/// Loss tolerance of the golden README (f32).
pub const LOSS_TOL: (f64, f64) = (1e-5, 2e-4);
/// Gradient tolerance of the golden README (f32).
pub const GRAD_TOL: (f64, f64) = (1e-5, 2e-3);

/// Every golden case, forward and gradient, on backend `B` (and forward on its inner backend),
/// with the given kernel.
pub fn assert_golden<B>(device: &B::Device, kernel: Kernel)
where
    B: AutodiffBackend + DistillBackend,
    B::InnerBackend: DistillBackend,
{
    let cases = golden_cases();
    assert!(cases.len() >= 38, "expected the full golden set");
    let mut failures = Vec::new();
    for case in &cases {
        let loss = case.config.clone().with_kernel(kernel).init();
        let (value, grad) = run_case::<B>(&loss, case, device);
        failures.extend(
            mismatches("loss", &value, &case.loss, LOSS_TOL.0, LOSS_TOL.1)
                .into_iter()
                .chain(mismatches(
                    "grad", &grad, &case.grad, GRAD_TOL.0, GRAD_TOL.1,
                ))
                .map(|m| format!("{}: {m}", case.name)),
        );
        assert!(
            grad.iter().all(|g| g.is_finite()),
            "{}: non-finite gradient",
            case.name
        );

        // Forward only, on the inner backend (no autodiff).
        let inner_device = device.clone();
        let student = tensor2::<B::InnerBackend>(&case.student, case.shape, &inner_device);
        let teacher = tensor2::<B::InnerBackend>(&case.teacher, case.shape, &inner_device);
        let value = match &case.targets {
            Some(t) => loss.forward(student, teacher, ints::<B::InnerBackend>(t, &inner_device)),
            None => loss.forward_soft(student, teacher),
        };
        failures.extend(
            mismatches(
                "inner loss",
                &values(value),
                &case.loss,
                LOSS_TOL.0,
                LOSS_TOL.1,
            )
            .into_iter()
            .map(|m| format!("{}: {m}", case.name)),
        );
    }
    assert!(
        failures.is_empty(),
        "golden mismatches:\n{}",
        failures.join("\n")
    );
}
