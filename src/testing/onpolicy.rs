//! Conformance suites of the on-policy and cross-tokenizer losses: every case of
//! `tests/golden/onpolicy.json` (float64 PyTorch references written by
//! `scripts/onpolicy_golden.py`), loss and student gradient under an upstream that is not 1.

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use serde::Deserialize;

use super::{GRAD_TOL, LOSS_TOL, compare, values};
use crate::{
    Kernel, Reduction,
    cross::{CrossTokenizerLossConfig, MergeStrategy, SpanAlignment, TokenRows, VocabMatch},
    onpolicy::{KlEstimator, SampledTokenLossConfig, SampledTokens},
};

#[derive(Deserialize)]
struct File {
    format: u32,
    sampled: Vec<SampledCase>,
    cross: Vec<CrossCase>,
}

#[derive(Deserialize)]
struct Expected {
    loss: Vec<f64>,
    grad: Vec<f64>,
}

impl Expected {
    /// The loss and the logits' gradient under `upstream` against these values.
    fn compare<const D: usize>(
        &self,
        name: &str,
        loss: Tensor<1>,
        logits: &Tensor<D>,
        upstream: f64,
    ) -> Vec<String> {
        let grads = (loss.clone().sum() * upstream).backward();
        let grad = logits.grad(&grads).expect("the logits have a gradient");
        compare(
            name,
            [(&values(loss), &self.loss), (&values(grad), &self.grad)],
            [LOSS_TOL, GRAD_TOL],
        )
    }
}

#[derive(Deserialize)]
struct SampledConfig {
    estimator: String,
    discount: f64,
    clip: Option<f64>,
    reduction: String,
    items: Option<u64>,
}

#[derive(Deserialize)]
struct SampledCase {
    name: String,
    shape: [usize; 3],
    logits: Vec<f64>,
    tokens: Vec<i64>,
    teacher: Vec<f64>,
    mask: Vec<bool>,
    sampler: Option<Vec<f64>>,
    config: SampledConfig,
    upstream: f64,
    expected: Expected,
}

#[derive(Deserialize)]
struct CrossConfig {
    merge: String,
    student_temperature: f64,
    teacher_temperature: f64,
    distillation_weight: f64,
    crossentropy_weight: f64,
    matched_beta: f64,
    matched_weight: Option<f64>,
    reduction: String,
}

type Spans = Vec<(usize, usize)>;

#[derive(Deserialize)]
struct CrossCase {
    name: String,
    sequences: Vec<(Spans, Spans)>,
    student_shape: [usize; 2],
    teacher_shape: [usize; 2],
    student: Vec<f64>,
    teacher: Vec<f64>,
    student_tokens: Vec<i64>,
    teacher_tokens: Vec<i64>,
    vocab: Option<Vec<(usize, usize)>>,
    config: CrossConfig,
    upstream: f64,
    expected: Expected,
}

/// The text of `tests/golden/onpolicy.json`.
fn golden_text_onpolicy() -> &'static str {
    include_str!("../../tests/golden/onpolicy.json")
}

fn file() -> File {
    let file: File = serde_json::from_str(golden_text_onpolicy())
        .unwrap_or_else(|e| panic!("golden file tests/golden/onpolicy.json is not valid: {e}"));
    assert_eq!(file.format, 1, "format of tests/golden/onpolicy.json");
    file
}

/// The number of sampled-token and cross-tokenizer cases of the golden file.
pub fn case_counts() -> (usize, usize) {
    let f = file();
    (f.sampled.len(), f.cross.len())
}

fn reduction(name: &str, items: Option<u64>) -> Reduction {
    match name {
        "mean" => Reduction::Mean,
        "sum" => Reduction::Sum,
        "normalized" => Reduction::Normalized {
            items: items.expect("normalized has items"),
        },
        "per_row" => Reduction::PerRow,
        other => panic!("unknown reduction {other}"),
    }
}

fn float<const D: usize>(v: &[f64], shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(v.to_vec(), shape), device)
}

fn int<const D: usize>(v: &[i64], shape: [usize; D], device: &Device) -> Tensor<D, Int> {
    Tensor::from_data(TensorData::new(v.to_vec(), shape), device)
}

/// Every sampled-token case (k1, k3, discount, importance ratio and clip, each reduction) with
/// `kernel`, on `device` with autodiff.
pub fn assert_sampled_golden(device: &Device, kernel: Kernel) {
    let device = &device.clone().autodiff();
    let what = format!("sampled-token ({kernel:?})");
    assert_all(&what, &file().sampled, |case| {
        let c = &case.config;
        let loss = SampledTokenLossConfig::new()
            .with_estimator(match c.estimator.as_str() {
                "k1" => KlEstimator::K1,
                "k3" => KlEstimator::K3,
                other => panic!("unknown estimator {other}"),
            })
            .with_discount(c.discount)
            .with_clip(c.clip)
            .with_reduction(reduction(&c.reduction, c.items))
            .with_kernel(kernel)
            .init();
        let [b, t, v] = case.shape;
        let logits = float::<3>(&case.logits, [b, t, v], device).require_grad();
        let sampled = SampledTokens {
            tokens: int::<2>(&case.tokens, [b, t], device),
            teacher_log_probs: float::<2>(&case.teacher, [b, t], device),
            mask: Tensor::<2, Bool>::from_data(TensorData::new(case.mask.clone(), [b, t]), device),
            sampler_log_probs: case.sampler.as_ref().map(|s| float::<2>(s, [b, t], device)),
        };
        let out = loss
            .try_forward_parts(logits.clone(), sampled)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        (case.expected).compare(&case.name, out.loss, &logits, case.upstream)
    });
}

/// Runs `check` on every case (it gives the case's mismatches) and fails with all of them.
fn assert_all<C>(what: &str, cases: &[C], check: impl Fn(&C) -> Vec<String>) {
    let failures: Vec<String> = cases.iter().flat_map(check).collect();
    assert!(
        failures.is_empty(),
        "{what} golden mismatches:\n{}",
        failures.join("\n")
    );
}

/// Every cross-tokenizer case (ULD, GOLD's hybrid, both merge strategies, span alignment,
/// temperatures, the cross-entropy term, each reduction) on `device` with autodiff.
pub fn assert_cross_golden(device: &Device) {
    let device = &device.clone().autodiff();
    assert_all("cross-tokenizer", &file().cross, |case| {
        let c = &case.config;
        let loss = CrossTokenizerLossConfig::new()
            .with_student_temperature(c.student_temperature)
            .with_teacher_temperature(c.teacher_temperature)
            .with_distillation_weight(c.distillation_weight)
            .with_crossentropy_weight(c.crossentropy_weight)
            .with_matched_beta(c.matched_beta)
            .with_matched_weight(c.matched_weight)
            .with_reduction(reduction(&c.reduction, None))
            .init();
        let strategy = match c.merge.as_str() {
            "observed" => MergeStrategy::Observed,
            "bayesian" => MergeStrategy::Bayesian,
            other => panic!("unknown merge {other}"),
        };
        let sequences: Vec<_> = case
            .sequences
            .iter()
            .map(|(s, t)| (s.as_slice(), t.as_slice()))
            .collect();
        let alignment = SpanAlignment::new(strategy, &sequences)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let logits = float::<2>(&case.student, case.student_shape, device).require_grad();
        let student = TokenRows {
            logits: logits.clone(),
            tokens: int::<1>(&case.student_tokens, [case.student_shape[0]], device),
        };
        let teacher = TokenRows {
            logits: float::<2>(&case.teacher, case.teacher_shape, device),
            tokens: int::<1>(&case.teacher_tokens, [case.teacher_shape[0]], device),
        };
        let vocab = case.vocab.as_ref().map(|pairs| {
            // Token strings that match exactly on the given (student, teacher) pairs.
            let [_, vs] = case.student_shape;
            let [_, vt] = case.teacher_shape;
            let mut s: Vec<String> = (0..vs).map(|i| format!("s{i}")).collect();
            let mut t: Vec<String> = (0..vt).map(|j| format!("t{j}")).collect();
            for (k, &(i, j)) in pairs.iter().enumerate() {
                s[i] = format!("m{k}");
                t[j] = format!("m{k}");
            }
            let m = VocabMatch::new(&s, &t).expect("a valid match");
            let mut expected = pairs.clone();
            expected.sort_by_key(|p| p.1);
            assert_eq!(
                m.pairs(),
                expected.as_slice(),
                "{}: matched pairs",
                case.name
            );
            m
        });
        let out = loss
            .try_forward_parts(student, teacher, &alignment, vocab.as_ref())
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        (case.expected).compare(&case.name, out.loss, &logits, case.upstream)
    });
}
