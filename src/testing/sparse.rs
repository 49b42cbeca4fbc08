//! The golden cases of the sparse-teacher losses (`tests/golden/topk.json`, written by
//! `scripts/topk_golden.py` in float64 with PyTorch) and their runner.

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use serde::Deserialize;
use serde_json::Value;

use super::{compare, ints, loss_and_grad, numbers, tensor2};
use crate::error::or_panic;
use crate::{
    Kernel, SparseDistillLoss, SparseDistillLossConfig, SparseTeacher, StudentSupport, TailPolicy,
};

#[derive(Deserialize)]
struct RawCase {
    name: String,
    shape: [usize; 2],
    k: usize,
    student: Vec<Value>,
    indices: Vec<i64>,
    log_probs: Vec<Value>,
    mask: Option<Vec<bool>>,
    targets: Option<Vec<i64>>,
    config: RawConfig,
    expected: super::RawExpected,
}

/// The sparse settings: the dense ones plus the tail policy and `T_gen`.
#[derive(Deserialize)]
struct RawConfig {
    #[serde(flatten)]
    dense: super::RawConfig,
    generation_temperature: f64,
    tail: String,
    /// The student's logit soft-cap, if any.
    #[serde(default)]
    softcap: Option<f64>,
}

/// One sparse golden case, decoded.
#[derive(Clone, Debug)]
#[allow(missing_docs)]
pub struct SparseCase {
    pub name: String,
    pub shape: [usize; 2],
    pub k: usize,
    pub student: Vec<f64>,
    pub indices: Vec<i64>,
    pub log_probs: Vec<f64>,
    pub mask: Option<Vec<bool>>,
    pub targets: Option<Vec<i64>>,
    pub config: SparseDistillLossConfig,
    pub loss: Vec<f64>,
    pub grad: Vec<f64>,
}

impl SparseCase {
    /// The case's teacher on `device`.
    pub fn teacher(&self, device: &Device) -> SparseTeacher {
        let [n, k] = [self.shape[0], self.k];
        let indices =
            Tensor::<2, Int>::from_data(TensorData::new(self.indices.clone(), [n, k]), device);
        let teacher = SparseTeacher::new(indices, tensor2(&self.log_probs, [n, k], device));
        match &self.mask {
            Some(mask) => teacher.with_mask(Tensor::<2, Bool>::from_data(
                TensorData::new(mask.clone(), [n, k]),
                device,
            )),
            None => teacher,
        }
    }

    /// Runs the case with `loss` on an autodiff `device`; returns (loss values, student
    /// gradient).
    pub fn run(&self, loss: &SparseDistillLoss, device: &Device) -> (Vec<f64>, Vec<f64>) {
        let teacher = self.teacher(device);
        let targets = self.targets.as_ref().map(|t| ints(t, device));
        let forward = |s| or_panic(loss.try_forward_parts(s, teacher, targets)).loss;
        loss_and_grad(tensor2(&self.student, self.shape, device), forward)
    }
}

/// All sparse golden cases (`tests/golden/topk.json`).
pub fn sparse_cases() -> Vec<SparseCase> {
    super::load_cases::<RawCase>("topk.json")
        .into_iter()
        .map(|c| {
            let tail = match c.config.tail.as_str() {
                "renormalize_full_vocab" => TailPolicy::Renormalize {
                    student: StudentSupport::FullVocab,
                },
                "renormalize_top_k" => TailPolicy::Renormalize {
                    student: StudentSupport::TopK,
                },
                "tail_bucket" => TailPolicy::TailBucket,
                other => panic!("unknown tail policy {other}"),
            };
            let dense = c.config.dense.dense().with_logit_softcap(c.config.softcap);
            SparseCase {
                name: c.name,
                shape: c.shape,
                k: c.k,
                student: numbers(&c.student),
                indices: c.indices,
                log_probs: numbers(&c.log_probs),
                mask: c.mask,
                targets: c.targets,
                config: SparseDistillLossConfig::new(dense)
                    .with_tail(tail)
                    .with_generation_temperature(c.config.generation_temperature),
                loss: numbers(&c.expected.loss),
                grad: numbers(&c.expected.grad_student),
            }
        })
        .collect()
}

/// Every sparse golden case, loss and gradient, on `device` (with autodiff) at tolerances
/// `(abs, rel)` for the loss and the gradient, with the reference and (where the device has
/// one) the fused kernel.
pub fn assert_sparse_golden(device: &Device, loss_tol: (f64, f64), grad_tol: (f64, f64)) {
    let device = &device.clone().autodiff();
    let cases = sparse_cases();
    assert_eq!(cases.len(), 24, "the full sparse golden set");
    let mut failures = Vec::new();
    for case in &cases {
        for kernel in [Kernel::Reference, Kernel::Auto] {
            let mut config = case.config.clone();
            config.loss = config.loss.with_kernel(kernel);
            let (value, grad) = case.run(&config.init(), device);
            failures.extend(compare(
                &format!("{} ({kernel:?})", case.name),
                [(&value, &case.loss), (&grad, &case.grad)],
                [loss_tol, grad_tol],
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "sparse golden mismatches:\n{}",
        failures.join("\n")
    );
}
