//! Conformance suites for devices, exported so that any backend the crate runs on — Flex,
//! wgpu, CUDA, one added later or a user's — is tested by one line of
//! [`conformance_tests!`](crate::conformance_tests) naming a device:
//!
//! - golden: every case of the float64 PyTorch references (dense losses and sparse teachers),
//!   loss and student gradient, at f32 tolerances (per entry, absolute plus relative);
//! - parity: the fused kernel against the reference implementation on random problems with odd
//!   vocabularies, `−inf` padding, ignored rows, every divergence and reduction;
//! - on-policy and cross-tokenizer: every case of `tests/golden/onpolicy.json` (sampled-token
//!   loss with both kernels; ULD and GOLD's hybrid), loss and student gradient;
//! - validation: bad targets and sparse-teacher entries caught in `forward`, on the device
//!   (named by `DistillOutput::validate`) or left as NaN rows, with both kernels.
//!
//! The reference data (`tests/golden/*.json`, and the scripts in `scripts/` that wrote them)
//! is embedded in the crate. Not part of the loss API: these functions panic with a report of
//! every mismatch, as tests do.

use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::Deserialize;
use serde_json::Value;

use crate::{DistillLoss, DistillLossConfig, Divergence, Kernel, Reduction};

pub mod onpolicy;
pub mod parity;
pub mod sparse;
pub mod validation;

#[derive(Deserialize)]
struct GoldenFile<C> {
    format: u32,
    cases: Vec<C>,
}

/// The text of an embedded golden file of `tests/golden/`.
fn golden_text(name: &str) -> &'static str {
    match name {
        "losses.json" => include_str!("../../tests/golden/losses.json"),
        "topk.json" => include_str!("../../tests/golden/topk.json"),
        "conventions.json" => include_str!("../../tests/golden/conventions.json"),
        other => panic!("no golden file {other} (losses.json, topk.json, conventions.json)"),
    }
}

/// The raw cases of a golden file of `tests/golden/` (embedded in the crate).
pub fn load_cases<C: serde::de::DeserializeOwned>(name: &str) -> Vec<C> {
    let file: GoldenFile<C> = serde_json::from_str(golden_text(name))
        .unwrap_or_else(|e| panic!("golden file tests/golden/{name} is not valid: {e}"));
    assert_eq!(file.format, 1, "format of tests/golden/{name}");
    file.cases
}

#[derive(Deserialize)]
pub(crate) struct RawCase {
    name: String,
    shape: [usize; 2],
    student: Vec<Value>,
    teacher: Vec<Value>,
    targets: Option<Vec<i64>>,
    config: RawConfig,
    expected: RawExpected,
}

/// The dense loss settings of a golden case.
#[derive(Deserialize)]
#[allow(missing_docs)]
pub struct RawConfig {
    pub temperature: f64,
    pub alpha: f64,
    pub divergence: String,
    pub beta: Option<f64>,
    pub lambda: Option<f64>,
    pub scale_by_t2: bool,
    pub ignore_index: Option<i64>,
    pub label_smoothing: f64,
    pub reduction: String,
}

/// The expected loss and student gradient of a golden case.
#[derive(Deserialize)]
#[allow(missing_docs)]
pub struct RawExpected {
    pub loss: Vec<Value>,
    pub grad_student: Vec<Value>,
}

impl RawConfig {
    /// The dense loss configuration these settings describe.
    pub fn dense(&self) -> DistillLossConfig {
        DistillLossConfig::new()
            .with_temperature(self.temperature)
            .with_alpha(self.alpha)
            .with_divergence(parse_divergence(&self.divergence, self.beta, self.lambda))
            .with_scale_by_t2(self.scale_by_t2)
            .with_ignore_index(self.ignore_index)
            .with_label_smoothing(self.label_smoothing)
            .with_reduction(parse_reduction(&self.reduction))
    }
}

/// One golden case, decoded.
#[derive(Clone, Debug)]
#[allow(missing_docs)]
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

/// A number of a golden file (`"-inf"` and `"inf"` are strings there).
pub fn number(v: &Value) -> f64 {
    match v {
        Value::Number(n) => n.as_f64().unwrap(),
        Value::String(s) if s == "-inf" => f64::NEG_INFINITY,
        Value::String(s) if s == "inf" => f64::INFINITY,
        other => panic!("unexpected number in golden file: {other}"),
    }
}

/// [`number`] of each value.
pub fn numbers(v: &[Value]) -> Vec<f64> {
    v.iter().map(number).collect()
}

/// A divergence from its golden-file name and parameters.
pub fn parse_divergence(name: &str, beta: Option<f64>, lambda: Option<f64>) -> Divergence {
    match name {
        "forward_kl" => Divergence::ForwardKl,
        "reverse_kl" => Divergence::ReverseKl,
        "jsd" => Divergence::Jsd {
            beta: beta.unwrap(),
        },
        "skew_kl" => Divergence::SkewKl {
            lambda: lambda.unwrap(),
        },
        "skew_reverse_kl" => Divergence::SkewReverseKl {
            lambda: lambda.unwrap(),
        },
        "tvd" => Divergence::Tvd,
        other => panic!("unknown divergence {other}"),
    }
}

/// A reduction from its golden-file name.
pub fn parse_reduction(name: &str) -> Reduction {
    match name {
        "mean" => Reduction::Mean,
        "sum" => Reduction::Sum,
        "none" | "per_row" => Reduction::PerRow,
        other => panic!("unknown reduction {other}"),
    }
}

/// All dense golden cases (`tests/golden/losses.json`).
pub fn golden_cases() -> Vec<Case> {
    load_cases::<RawCase>("losses.json")
        .into_iter()
        .map(|c| {
            let config = c.config.dense();
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

/// `[N, V]` float tensor from row-major values, in the device's float dtype.
pub fn tensor2(values: &[f64], shape: [usize; 2], device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

/// `[N]` int tensor.
pub fn ints(values: &[i64], device: &Device) -> Tensor<1, Int> {
    Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), device)
}

/// Float values of a tensor, as f64.
pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data().iter::<f64>().collect()
}

/// Runs the loss of a case on an autodiff `device`; returns (loss values, student gradient).
pub fn run_case(loss: &DistillLoss, case: &Case, device: &Device) -> (Vec<f64>, Vec<f64>) {
    let teacher = tensor2(&case.teacher, case.shape, device);
    let targets = case.targets.as_ref().map(|t| ints(t, device));
    let student = tensor2(&case.student, case.shape, device);
    loss_and_grad(student, |s| loss.forward_parts(s, teacher, targets).loss)
}

/// The values of `loss(student)` and the student's gradient (of their sum), on an autodiff
/// device.
pub fn loss_and_grad(
    student: Tensor<2>,
    loss: impl FnOnce(Tensor<2>) -> Tensor<1>,
) -> (Vec<f64>, Vec<f64>) {
    let student = student.require_grad();
    let value = loss(student.clone());
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

/// Mismatches of a case's `[(loss, expected), (gradient, expected)]` at `[loss, gradient]`
/// tolerances, as readable lines; asserts that the gradient is finite.
pub fn compare(
    name: &str,
    [loss, grad]: [(&[f64], &[f64]); 2],
    tol: [(f64, f64); 2],
) -> Vec<String> {
    assert!(
        grad.0.iter().all(|g| g.is_finite()),
        "{name}: non-finite gradient"
    );
    mismatches("loss", loss.0, loss.1, tol[0].0, tol[0].1)
        .into_iter()
        .chain(mismatches("grad", grad.0, grad.1, tol[1].0, tol[1].1))
        .map(|m| format!("{name}: {m}"))
        .collect()
}

/// Loss tolerance of the golden README (f32).
pub const LOSS_TOL: (f64, f64) = (1e-5, 2e-4);
/// Gradient tolerance of the golden README (f32).
pub const GRAD_TOL: (f64, f64) = (1e-5, 2e-3);

/// Every golden case, forward and gradient, on `device` with autodiff (and forward on the
/// device itself, without autodiff), with the given kernel.
pub fn assert_golden(device: &Device, kernel: Kernel) {
    let cases = golden_cases();
    assert_eq!(cases.len(), 38, "the full golden set");
    let tracked = device.clone().autodiff();
    let plain = device.clone().inner();
    let mut failures = Vec::new();
    for case in &cases {
        let loss = case.config.clone().with_kernel(kernel).init();
        let (value, grad) = run_case(&loss, case, &tracked);
        failures.extend(compare(
            &case.name,
            [(&value, &case.loss), (&grad, &case.grad)],
            [LOSS_TOL, GRAD_TOL],
        ));

        // Forward only, without autodiff.
        let student = tensor2(&case.student, case.shape, &plain);
        let teacher = tensor2(&case.teacher, case.shape, &plain);
        let value = match &case.targets {
            Some(t) => loss.forward(student, teacher, ints(t, &plain)),
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

/// The conformance suites of [`crate::testing`] as `#[test]` functions for one device, in a
/// module of the given name: golden (dense, with `Kernel::Auto` and `Kernel::Reference`),
/// sparse golden (reference and `Auto`).
/// With `fused` after the device, also golden with `Kernel::Fused` and fused-against-reference
/// parity (vocabularies 1 to 1031), for a device that has a fused kernel.
///
/// `$device` is an expression giving the device (without autodiff: the suites add it where
/// they need gradients).
///
/// ```ignore
/// use burn::tensor::Device;
/// burn_distill::conformance_tests!(flex, Device::flex(), fused);
/// burn_distill::conformance_tests!(remote, my_device());
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($name:ident, $device:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $crate::conformance_tests!(@tests $device;
                golden_auto: assert_golden[$crate::Kernel::Auto];
                golden_reference: assert_golden[$crate::Kernel::Reference];
                sparse_golden: sparse::assert_sparse_golden[
                    $crate::testing::LOSS_TOL,
                    $crate::testing::GRAD_TOL
                ];
                validation_dense: validation::assert_dense[];
                validation_sparse: validation::assert_sparse[];
                sampled_token_golden_auto: onpolicy::assert_sampled_golden[$crate::Kernel::Auto];
                sampled_token_golden_reference:
                    onpolicy::assert_sampled_golden[$crate::Kernel::Reference];
                cross_tokenizer_golden: onpolicy::assert_cross_golden[];
            );
        }
    };
    ($name:ident, $device:expr, fused) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $crate::conformance_tests!(@tests $device;
                golden_auto: assert_golden[$crate::Kernel::Auto];
                golden_reference: assert_golden[$crate::Kernel::Reference];
                golden_fused: assert_golden[$crate::Kernel::Fused];
                sparse_golden: sparse::assert_sparse_golden[
                    $crate::testing::LOSS_TOL,
                    $crate::testing::GRAD_TOL
                ];
                validation_dense: validation::assert_dense[];
                validation_sparse: validation::assert_sparse[];
                sampled_token_golden_auto: onpolicy::assert_sampled_golden[$crate::Kernel::Auto];
                sampled_token_golden_reference:
                    onpolicy::assert_sampled_golden[$crate::Kernel::Reference];
                cross_tokenizer_golden: onpolicy::assert_cross_golden[];
                fused_matches_reference: parity::sweep[&[1, 2, 3, 17, 1024, 1031]];
            );
        }
    };
    // One `#[test]` a line: `name: function in crate::testing[further arguments];`, each
    // called as `function(&$device, arguments…)`.
    (@tests $device:expr; $($test:ident: $($f:ident)::+ [$($arg:expr),*];)*) => {
        $(
            #[test]
            fn $test() {
                $crate::testing::$($f)::+(&$device $(, $arg)*);
            }
        )*
    };
}

/// The default wgpu device, after checking once that an adapter exists: without one (a
/// machine with no GPU and no software Vulkan driver) this panics with one line saying how to
/// get one, instead of a panic deep inside cubecl.
#[cfg(feature = "wgpu")]
pub fn wgpu_device() -> Device {
    use std::sync::OnceLock;
    static PROBE: OnceLock<Result<(), ()>> = OnceLock::new();
    let probe = PROBE.get_or_init(|| {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let result = std::panic::catch_unwind(|| {
            let device = Device::wgpu(Default::default());
            Tensor::<1>::zeros([1], &device).into_data();
        });
        std::panic::set_hook(hook);
        result.map_err(|_| ())
    });
    if probe.is_err() {
        panic!(
            "burn-distill: no wgpu adapter on this machine (creating the default wgpu device \
             failed); install a Vulkan driver (Debian/Ubuntu: `apt-get install \
             mesa-vulkan-drivers` gives a software one) or run the tests without wgpu: \
             `cargo test` (Flex only)"
        );
    }
    Device::wgpu(Default::default())
}
