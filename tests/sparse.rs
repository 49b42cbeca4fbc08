//! The sparse-teacher (top-k) losses in float64: PyTorch golden values to rounding, the
//! reduction to the dense loss when k = V, the generation-temperature correction, masking,
//! and every bad input. Float64 on Flex (0.1 ran these on `Autodiff<NdArray<f64>>`).
#![cfg(feature = "flex")]

mod common;

use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};
use burn_distill::{
    DistillError, DistillLossConfig, Divergence, Kernel, Reduction, SparseDistillLossConfig,
    SparseTeacher, StudentSupport, TailPolicy, Validation, backend::has_sparse_fused_kernel,
};
use common::sparse::{SparseCase, sparse_cases};
use common::{flex_autodiff, ints, mismatches, tensor2_f64, tensor3_f64, values_f64 as values};

const FULL_VOCAB: TailPolicy = TailPolicy::Renormalize {
    student: StudentSupport::FullVocab,
};
const TOP_K: TailPolicy = TailPolicy::Renormalize {
    student: StudentSupport::TopK,
};

/// Flex with autodiff: every tensor of these tests is float64 (created with `DType::F64`).
fn device() -> Device {
    flex_autodiff()
}

/// `[N, k]` int tensor from row-major values.
fn ints2(values: &[i64], shape: [usize; 2], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

#[test]
fn golden_file_covers_every_policy_and_divergence() {
    let cases = sparse_cases();
    assert_eq!(cases.len(), 24);
    for tail in [FULL_VOCAB, TOP_K, TailPolicy::TailBucket] {
        assert!(cases.iter().any(|c| c.config.tail == tail));
        // A soft-capped student under every tail policy.
        assert!(
            cases
                .iter()
                .any(|c| c.config.tail == tail && c.config.loss.logit_softcap.is_some())
        );
    }
    assert!(cases.iter().any(|c| c.mask.is_some()));
    assert!(
        cases
            .iter()
            .any(|c| c.log_probs.contains(&f64::NEG_INFINITY))
    );
    assert!(
        cases
            .iter()
            .any(|c| c.config.generation_temperature != c.config.loss.temperature)
    );
}

/// A golden case in float64 with `loss` on an autodiff `device`: (loss values, student
/// gradient). (`SparseCase::run` creates its tensors in the device's default float dtype, f32.)
fn run_f64(
    case: &SparseCase,
    loss: &burn_distill::SparseDistillLoss,
    device: &Device,
) -> [Vec<f64>; 2] {
    let [n, v] = case.shape;
    let k = case.k;
    let teacher = SparseTeacher::new(
        ints2(&case.indices, [n, k], device),
        tensor2_f64(&case.log_probs, [n, k], device),
    );
    let teacher = match &case.mask {
        Some(mask) => teacher.with_mask(Tensor::<2, Bool>::from_data(
            TensorData::new(mask.clone(), [n, k]),
            device,
        )),
        None => teacher,
    };
    let targets = case.targets.as_ref().map(|t| ints(t, device));
    let student = tensor2_f64(&case.student, [n, v], device).require_grad();
    let value = loss
        .try_forward_parts(student.clone(), teacher, targets)
        .unwrap_or_else(|e| panic!("{}: {e}", case.name))
        .loss;
    let grads = value.clone().sum().backward();
    let grad = student.grad(&grads).expect("student gradient");
    [values(value), values(grad)]
}

/// In float64 the crate's tensor formulation (and Flex's fused sparse kernel, which has an f64
/// path) must agree with the row-by-row PyTorch reference to rounding. (0.1:
/// `golden_ndarray_f64`, the composed path on `NdArray<f64>`.)
#[test]
fn golden_flex_f64() {
    let device = device();
    let cases = sparse_cases();
    assert_eq!(cases.len(), 24, "the full sparse golden set");
    let mut failures = Vec::new();
    for case in &cases {
        // `Auto` must be the fused kernel here, or the two runs would be the same.
        assert!(has_sparse_fused_kernel(&device, DType::F64, case.k));
        for kernel in [Kernel::Reference, Kernel::Auto] {
            let mut config = case.config.clone();
            config.loss = config.loss.with_kernel(kernel);
            let [value, grad] = run_f64(case, &config.init(), &device);
            let name = format!("{} ({kernel:?})", case.name);
            assert!(
                grad.iter().all(|g| g.is_finite()),
                "{name}: non-finite gradient"
            );
            failures.extend(
                mismatches("loss", &value, &case.loss, 1e-12, 1e-10)
                    .into_iter()
                    .chain(mismatches("grad", &grad, &case.grad, 1e-12, 1e-10))
                    .map(|m| format!("{name}: {m}")),
            );
        }
    }
    assert!(
        failures.is_empty(),
        "sparse golden mismatches:\n{}",
        failures.join("\n")
    );
}

fn dense_and_sparse(
    divergence: Divergence,
    tail: TailPolicy,
    k: usize,
    temperature: f64,
    generation_temperature: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let device = device();
    let (n, v) = (5, 12);
    let student: Vec<f64> = (0..n * v)
        .map(|i| ((i * 37 % 23) as f64 - 11.0) / 4.0)
        .collect();
    let teacher: Vec<f64> = (0..n * v)
        .map(|i| ((i * 53 % 29) as f64 - 14.0) / 3.0)
        .collect();
    let config = DistillLossConfig::new()
        .with_temperature(temperature)
        .with_divergence(divergence);
    let dense = config.init();
    let sparse = SparseDistillLossConfig::new(config)
        .with_tail(tail)
        .with_generation_temperature(generation_temperature)
        .init();

    let s = tensor2_f64(&student, [n, v], &device).require_grad();
    let dense_value = dense.forward_soft(s.clone(), tensor2_f64(&teacher, [n, v], &device));
    let dense_grad = values(s.grad(&dense_value.backward()).unwrap());

    let s = tensor2_f64(&student, [n, v], &device).require_grad();
    let top = SparseTeacher::from_logits(
        tensor2_f64(&teacher, [n, v], &device),
        k,
        generation_temperature,
    );
    let sparse_value = sparse.forward_soft(s.clone(), top);
    let sparse_grad = values(s.grad(&sparse_value.backward()).unwrap());
    (
        values(dense_value),
        dense_grad,
        values(sparse_value),
        sparse_grad,
    )
}

fn assert_all_close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol, "{what}[{i}]: {x} vs {y}");
    }
}

/// With every token kept (k = V) both renormalised forms are the dense loss, for every
/// divergence they support, value and gradient; so is the tail bucket with k = V − 1 at
/// T = T_gen (the bucket is then exactly the one missing token).
#[test]
fn full_top_k_equals_the_dense_loss() {
    let all = Divergence::ALL;
    let mut checks = vec![(Divergence::ForwardKl, FULL_VOCAB, 12)];
    for d in all {
        checks.push((d, TOP_K, 12));
        checks.push((d, TailPolicy::TailBucket, 11));
    }
    for (d, tail, k) in checks {
        let (dv, dg, sv, sg) = dense_and_sparse(d, tail, k, 2.0, 2.0);
        let what = format!("{d:?} {tail:?} k={k}");
        assert_all_close(&sv, &dv, 1e-10, &format!("{what} loss"));
        assert_all_close(&sg, &dg, 1e-10, &format!("{what} grad"));
    }
}

/// Log-probabilities produced at T_gen = 1 are re-tempered to T = 3 exactly: with k = V the
/// renormalised loss equals the dense loss at T = 3.
#[test]
fn generation_temperature_is_corrected() {
    for tail in [FULL_VOCAB, TOP_K] {
        let (dv, dg, sv, sg) = dense_and_sparse(Divergence::ForwardKl, tail, 12, 3.0, 1.0);
        assert_all_close(&sv, &dv, 1e-10, "loss");
        assert_all_close(&sg, &dg, 1e-10, "grad");
    }
    // Without the correction (T_gen taken as T) the loss would differ.
    let (dv, _, sv, _) = dense_and_sparse(Divergence::ForwardKl, TOP_K, 12, 3.0, 3.0);
    let wrong = {
        // log-probs at T_gen = 1, but told T_gen = 3
        let device = device();
        let teacher: Vec<f64> = (0..60)
            .map(|i| ((i * 53 % 29) as f64 - 14.0) / 3.0)
            .collect();
        let student: Vec<f64> = (0..60)
            .map(|i| ((i * 37 % 23) as f64 - 11.0) / 4.0)
            .collect();
        let loss = SparseDistillLossConfig::new(DistillLossConfig::new().with_temperature(3.0))
            .with_tail(TOP_K)
            .with_generation_temperature(3.0)
            .init();
        let top = SparseTeacher::from_logits(tensor2_f64(&teacher, [5, 12], &device), 12, 1.0);
        values(loss.forward_soft(tensor2_f64(&student, [5, 12], &device), top))
    };
    assert_all_close(&sv, &dv, 1e-10, "T_gen = T");
    assert!(
        (wrong[0] - dv[0]).abs() > 1e-3,
        "an uncorrected T_gen must change the loss"
    );
}

/// `−inf` entries and `false` mask entries are the same as leaving the entry out; their
/// indices are never read.
#[test]
fn missing_entries_equal_a_shorter_top_k() {
    let device = device();
    let student = tensor2_f64(
        &[0.5, -1.0, 2.0, 0.0, 1.0, -0.5, 0.3, 1.2, -2.0, 0.8],
        [2, 5],
        &device,
    );
    for tail in [FULL_VOCAB, TOP_K, TailPolicy::TailBucket] {
        let loss = SparseDistillLossConfig::new(DistillLossConfig::new().with_temperature(2.0))
            .with_tail(tail)
            .init();
        let short = SparseTeacher::new(
            Tensor::<2, Int>::from_ints([[2, 4], [1, 0]], &device),
            tensor2_f64(&[-0.3, -1.9, -0.7, -1.1], [2, 2], &device),
        );
        let ninf = f64::NEG_INFINITY;
        let padded = SparseTeacher::new(
            Tensor::<2, Int>::from_ints([[2, 4, 0, -5], [1, 0, 99, 3]], &device),
            tensor2_f64(
                &[-0.3, -1.9, ninf, 7.0, -0.7, -1.1, ninf, 9.0],
                [2, 4],
                &device,
            ),
        )
        .with_mask(Tensor::<2, Bool>::from_bool(
            TensorData::from([[true, true, true, false], [true, true, true, false]]),
            &device,
        ));
        let a = values(loss.forward_soft(student.clone(), short));
        let b = values(loss.forward_soft(student.clone(), padded));
        assert_all_close(&a, &b, 1e-12, &format!("{tail:?}"));
    }
}

/// The tail bucket with every token in the top-k (an empty tail) and an ignored row with no
/// valid entry: finite values and gradients.
#[test]
fn empty_tail_and_empty_ignored_rows_stay_finite() {
    let device = device();
    let student = tensor2_f64(&[0.5, -1.0, 2.0, 0.0, 1.0, -0.5], [2, 3], &device).require_grad();
    let teacher = SparseTeacher::from_logits(
        tensor2_f64(&[1.0, 0.0, -1.0, 0.0, 0.0, 0.0], [2, 3], &device),
        3,
        1.0,
    );
    let neg_inf = f64::NEG_INFINITY;
    let no_entries = SparseTeacher::new(
        Tensor::<2, Int>::from_ints([[0, 1], [0, 1]], &device),
        tensor2_f64(&[-0.5, -1.0, neg_inf, neg_inf], [2, 2], &device),
    );
    let loss = SparseDistillLossConfig::new(DistillLossConfig::new().with_alpha(0.5)).init();
    for (teacher, targets) in [(teacher, [0, 2]), (no_entries, [1, -100])] {
        let value = loss.forward(student.clone(), teacher, ints(&targets, &device));
        let grads = value.backward();
        let v = values(value);
        let g = values(student.grad(&grads).unwrap());
        assert!(v[0].is_finite() && v[0] > 0.0, "loss {v:?}");
        assert!(g.iter().all(|x| x.is_finite()), "gradient {g:?}");
        assert!(g.iter().any(|x| *x != 0.0));
    }
}

/// Unchecked, a row without any valid teacher entry makes the loss NaN, never a plausible value.
#[test]
fn unchecked_empty_row_is_nan() {
    let device = device();
    let loss =
        SparseDistillLossConfig::new(DistillLossConfig::new().with_validation(Validation::Off))
            .init();
    let teacher = SparseTeacher::new(
        Tensor::<2, Int>::from_ints([[0, 1], [0, 1]], &device),
        tensor2_f64(
            &[-0.5, -1.0, f64::NEG_INFINITY, f64::NEG_INFINITY],
            [2, 2],
            &device,
        ),
    );
    let student = tensor2_f64(&[0.5, -1.0, 2.0, 0.0, 1.0, -0.5], [2, 3], &device);
    let value = loss.forward(student, teacher, ints(&[0, 1], &device));
    assert!(values(value)[0].is_nan());
}

/// The sequence form is the flattened row form; ignored (prompt) tokens drop out of the mean.
/// (0.1 built the sequence teacher with `SparseTeacher::from_seq`, which flattened it; 0.2's
/// `SparseTeacher::new` takes the `[B, T, k]` tensors as they are.)
#[test]
fn forward_seq_equals_flattened_rows() {
    let device = device();
    let (b, t, v, k) = (2, 3, 6, 2);
    let logits: Vec<f64> = (0..b * t * v)
        .map(|i| ((i * 7 % 11) as f64 - 5.0) / 2.0)
        .collect();
    let student = tensor3_f64(&logits, [b, t, v], &device);
    // Distinct indices within each row.
    let idx: Vec<i64> = (0..b * t)
        .flat_map(|row| [(row * 5 % v) as i64, ((row * 5 + 1) % v) as i64])
        .collect();
    let lp: Vec<f64> = (0..b * t * k).map(|i| -0.5 - (i % 3) as f64).collect();
    let indices3 = Tensor::<3, Int>::from_data(TensorData::new(idx.clone(), [b, t, k]), &device);
    let lp3 = tensor3_f64(&lp, [b, t, k], &device);
    let targets = [1i64, -100, 2, -100, -100, 5];
    let loss = SparseDistillLossConfig::new(DistillLossConfig::new().with_alpha(0.7))
        .with_tail(TailPolicy::TailBucket)
        .init();
    let seq = loss.forward_seq(
        student,
        SparseTeacher::new(indices3, lp3),
        Tensor::<2, Int>::from_data(TensorData::new(targets.to_vec(), [b, t]), &device),
    );
    let flat_teacher = || {
        SparseTeacher::new(
            ints2(&idx, [b * t, k], &device),
            tensor2_f64(&lp, [b * t, k], &device),
        )
    };
    let flat = loss.forward(
        tensor2_f64(&logits, [b * t, v], &device),
        flat_teacher(),
        ints(&targets, &device),
    );
    let rows = SparseDistillLossConfig::new(
        DistillLossConfig::new()
            .with_alpha(0.7)
            .with_reduction(Reduction::PerRow),
    )
    .with_tail(TailPolicy::TailBucket)
    .init()
    .forward(
        tensor2_f64(&logits, [b * t, v], &device),
        flat_teacher(),
        ints(&targets, &device),
    );
    let rows = values(rows);
    let kept: Vec<f64> = rows
        .iter()
        .zip(targets)
        .filter(|(_, t)| *t != -100)
        .map(|(r, _)| *r)
        .collect();
    let mean = kept.iter().sum::<f64>() / kept.len() as f64;
    assert_all_close(&values(seq.clone()), &values(flat), 1e-12, "seq vs flat");
    assert_all_close(&values(seq), &[mean], 1e-12, "mean over kept tokens");
    assert!(rows[1] == 0.0 && rows[3] == 0.0 && rows[4] == 0.0);
}

mod errors {
    use super::*;

    fn message(result: Result<impl std::fmt::Debug, DistillError>) -> String {
        result.expect_err("expected an error").to_string()
    }

    fn teacher(idx: [[i64; 2]; 2], lp: [[f32; 2]; 2]) -> SparseTeacher {
        let device = device();
        let lp: Vec<f64> = lp.iter().flatten().map(|&x| x as f64).collect();
        SparseTeacher::new(
            Tensor::<2, Int>::from_ints(idx, &device),
            tensor2_f64(&lp, [2, 2], &device),
        )
    }

    fn run(tail: TailPolicy, t: SparseTeacher) -> String {
        let device = device();
        let student = tensor2_f64(&[0.0; 8], [2, 4], &device);
        let loss = SparseDistillLossConfig::new(DistillLossConfig::new())
            .with_tail(tail)
            .init();
        message(loss.try_forward_parts(student, t, Some(ints(&[0, 1], &device))))
    }

    #[test]
    fn index_out_of_range() {
        let m = run(
            TOP_K,
            teacher([[0, 1], [4, 2]], [[-1.0, -2.0], [-1.0, -2.0]]),
        );
        assert!(
            m.contains("teacher indices") && m.contains("indices[1, 0] = 4"),
            "{m}"
        );
        assert!(m.contains("[0, 4)"), "{m}");
        let m = run(
            TOP_K,
            teacher([[0, -1], [3, 2]], [[-1.0, -2.0], [-1.0, -2.0]]),
        );
        assert!(m.contains("indices[0, 1] = -1"), "{m}");
    }

    #[test]
    fn duplicate_index() {
        let m = run(
            FULL_VOCAB,
            teacher([[0, 1], [2, 2]], [[-1.0, -2.0], [-1.0, -2.0]]),
        );
        assert!(m.contains("indices[1, 1] = 2, already at [1, 0]"), "{m}");
        assert!(m.contains("distinct"), "{m}");
    }

    #[test]
    fn logits_instead_of_log_probs() {
        let m = run(
            TOP_K,
            teacher([[0, 1], [2, 3]], [[-1.0, -2.0], [3.5, -2.0]]),
        );
        assert!(
            m.contains("log_probs[1, 0] = 3.5") && m.contains("not logits"),
            "{m}"
        );
        let m = run(
            TOP_K,
            teacher([[0, 1], [2, 3]], [[f32::NAN, -2.0], [-1.0, -2.0]]),
        );
        assert!(m.contains("log_probs[0, 0] = NaN"), "{m}");
        let m = run(
            TOP_K,
            teacher([[0, 1], [2, 3]], [[f32::INFINITY, -2.0], [-1.0, -2.0]]),
        );
        assert!(m.contains("log_probs[0, 0] = inf"), "{m}");
    }

    #[test]
    fn tail_bucket_mass_above_one() {
        let bad = [[-0.1, -0.2], [-1.0, -2.0]];
        let m = run(TailPolicy::TailBucket, teacher([[0, 1], [2, 3]], bad));
        assert!(m.contains("row 0 with total probability 1.7"), "{m}");
        // Renormalising policies accept any top-k scale.
        let device = device();
        let loss = SparseDistillLossConfig::new(DistillLossConfig::new())
            .with_tail(TOP_K)
            .init();
        let student = tensor2_f64(&[0.0; 8], [2, 4], &device);
        let v = loss.forward(
            student,
            teacher([[0, 1], [2, 3]], bad),
            ints(&[0, 1], &device),
        );
        assert!(values(v)[0].is_finite());
    }

    #[test]
    fn row_without_entries() {
        let ninf = f32::NEG_INFINITY;
        let m = run(
            TOP_K,
            teacher([[0, 1], [2, 3]], [[-1.0, -2.0], [ninf, ninf]]),
        );
        assert!(m.contains("row 1 with no valid entry"), "{m}");
    }

    #[test]
    fn shapes() {
        let device = device();
        let loss = SparseDistillLossConfig::new(DistillLossConfig::new()).init();
        let student = tensor2_f64(&[0.0; 12], [3, 4], &device);
        let t = teacher([[0, 1], [2, 3]], [[-1.0, -2.0], [-1.0, -2.0]]);
        let m = message(loss.try_forward_parts(student.clone(), t, None));
        assert!(
            m.contains("teacher indices") && m.contains("shape [2, 2]"),
            "{m}"
        );
        assert!(m.contains("[3, k]"), "{m}");

        let t = SparseTeacher::new(
            Tensor::<2, Int>::from_ints([[0, 1], [2, 3], [1, 2]], &device),
            tensor2_f64(&[-1.0, -1.0, -1.0], [3, 1], &device),
        );
        let m = message(loss.try_forward_parts(student.clone(), t.clone(), None));
        assert!(
            m.contains("teacher log_probs") && m.contains("shape [3, 1]"),
            "{m}"
        );

        let t = SparseTeacher::new(
            Tensor::<2, Int>::from_ints([[0, 1], [2, 3], [1, 2]], &device),
            tensor2_f64(&[-1.0, -2.0, -1.0, -2.0, -1.0, -2.0], [3, 2], &device),
        );
        let masked = t.clone().with_mask(Tensor::<2, Bool>::from_bool(
            TensorData::from([[true], [true], [false]]),
            &device,
        ));
        let m = message(loss.try_forward_parts(student.clone(), masked, None));
        assert!(
            m.contains("teacher mask") && m.contains("shape [3, 1]"),
            "{m}"
        );

        let m = message(loss.try_forward_parts(
            student.clone(),
            t.clone(),
            Some(ints(&[0, 1], &device)),
        ));
        assert!(m.contains("targets") && m.contains("shape [2]"), "{m}");

        // A sequence's `[B, T]` targets are checked against the student's batch and sequence.
        // (0.1 passed the `[N, k]` teacher; 0.2's sequence form takes a `[B, T, k]` one.)
        let seq = student.reshape([1, 3, 4]);
        let t = SparseTeacher::new(
            t.indices().clone().reshape([1, 3, 2]),
            t.log_probs().clone().reshape([1, 3, 2]),
        );
        let targets = Tensor::<2, Int>::from_ints([[0], [1], [2]], &device);
        let m = message(loss.try_forward_seq_parts(seq, t, Some(targets)));
        assert!(
            m.contains("targets") && m.contains("[3, 1]") && m.contains("[1, 3]"),
            "{m}"
        );
    }

    #[test]
    fn target_out_of_range() {
        let device = device();
        let loss = SparseDistillLossConfig::new(DistillLossConfig::new()).init();
        let student = tensor2_f64(&[0.0; 8], [2, 4], &device);
        let t = teacher([[0, 1], [2, 3]], [[-1.0, -2.0], [-1.0, -2.0]]);
        let err = loss
            .try_forward_parts(student, t, Some(ints(&[0, 9], &device)))
            .unwrap_err();
        let m = err.to_string();
        assert!(m.contains("targets[1] = 9"), "{m}");
        assert_eq!(
            err,
            DistillError::TargetOutOfRange {
                row: 1,
                at: vec![1],
                value: 9,
                classes: 4,
                ignore_index: Some(-100)
            }
        );
    }

    /// New in 0.2: a sequence teacher's bad entries and a sequence's bad target are named at
    /// their positions in the caller's `[B, T, k]` and `[B, T]` tensors (0.1 named the
    /// flattened rows).
    #[test]
    fn seq_errors_are_named_at_their_positions() {
        let device = device();
        let (b, t, v, k) = (2, 3, 4, 2);
        let student = tensor3_f64(&[0.0; 24], [b, t, v], &device);
        let good_idx: Vec<i64> = (0..b * t)
            .flat_map(|r| [(r % v) as i64, ((r + 1) % v) as i64])
            .collect();
        let good_lp: Vec<f64> = (0..b * t).flat_map(|_| [-1.0, -2.0]).collect();
        // Entry `[bi, ti, j]` is `(bi · T + ti) · k + j` in row-major order.
        let at = |bi: usize, ti: usize, j: usize| (bi * t + ti) * k + j;
        // Edits `(entry, new index, new log-probability)` of the valid teacher.
        type Edits = [(usize, Option<i64>, Option<f64>)];
        let run = |tail: TailPolicy, edits: &Edits, y: &[i64]| {
            let (mut idx, mut lp) = (good_idx.clone(), good_lp.clone());
            for &(entry, index, log_prob) in edits {
                if let Some(index) = index {
                    idx[entry] = index;
                }
                if let Some(log_prob) = log_prob {
                    lp[entry] = log_prob;
                }
            }
            let teacher = SparseTeacher::new(
                Tensor::<3, Int>::from_data(TensorData::new(idx, [b, t, k]), &device),
                tensor3_f64(&lp, [b, t, k], &device),
            );
            let targets = Tensor::<2, Int>::from_data(TensorData::new(y.to_vec(), [b, t]), &device);
            SparseDistillLossConfig::new(DistillLossConfig::new())
                .with_tail(tail)
                .init()
                .try_forward_seq_parts(student.clone(), teacher, Some(targets))
        };
        let y = [0, 1, 2, 3, 0, 1];
        assert!(run(TOP_K, &[], &y).is_ok());
        let ninf = f64::NEG_INFINITY;
        // Token [1, 0] holds indices [3, 0]: its second entry made a 3 is a duplicate.
        assert_eq!(good_idx[at(1, 0, 0)], 3);
        let cases: [(TailPolicy, &Edits, &str); 5] = [
            (
                TOP_K,
                &[(at(1, 2, 1), None, Some(0.5))],
                "log_probs[1, 2, 1] = 0.5",
            ),
            (
                TOP_K,
                &[
                    (at(1, 2, 0), None, Some(ninf)),
                    (at(1, 2, 1), None, Some(ninf)),
                ],
                "token [1, 2] with no valid entry",
            ),
            (
                TOP_K,
                &[(at(0, 1, 0), Some(4), None)],
                "indices[0, 1, 0] = 4",
            ),
            (
                TOP_K,
                &[(at(1, 0, 1), Some(3), None)],
                "indices[1, 0, 1] = 3, already at [1, 0, 0]",
            ),
            (
                TailPolicy::TailBucket,
                &[
                    (at(0, 2, 0), None, Some(-0.1)),
                    (at(0, 2, 1), None, Some(-0.2)),
                ],
                "token [0, 2] with total probability 1.7",
            ),
        ];
        for (tail, edits, expected) in cases {
            let m = message(run(tail, edits, &y));
            assert!(m.contains(expected), "{expected}: {m}");
        }
        let err = run(TOP_K, &[], &[0, 1, 2, 3, 0, 9]).unwrap_err();
        assert!(err.to_string().contains("targets[1, 2] = 9"), "{err}");
        assert_eq!(
            err,
            DistillError::TargetOutOfRange {
                row: 5,
                at: vec![1, 2],
                value: 9,
                classes: 4,
                ignore_index: Some(-100)
            }
        );
    }

    #[test]
    fn config() {
        let dense = DistillLossConfig::new();
        let m = message(
            SparseDistillLossConfig::new(dense.clone())
                .with_generation_temperature(0.0)
                .try_init(),
        );
        assert!(
            m.contains("generation_temperature") && m.contains("got 0"),
            "{m}"
        );
        let m = message(
            SparseDistillLossConfig::new(dense.clone().with_divergence(Divergence::ReverseKl))
                .with_tail(FULL_VOCAB)
                .try_init(),
        );
        assert!(m.contains("ReverseKl") && m.contains("FullVocab"), "{m}");
        // The fused sparse kernel exists (Flex): `Kernel::Fused` is a valid choice.
        assert!(
            SparseDistillLossConfig::new(dense.clone().with_kernel(Kernel::Fused))
                .try_init()
                .is_ok()
        );
        let m = message(SparseDistillLossConfig::new(dense.with_temperature(-1.0)).try_init());
        assert!(m.contains("temperature") && m.contains("-1"), "{m}");
    }

    #[test]
    #[should_panic(expected = "invalid k: got 5, expected a number of tokens in [1, 4]")]
    fn from_logits_k_too_large() {
        let device = device();
        SparseTeacher::from_logits(tensor2_f64(&[0.0; 8], [2, 4], &device), 5, 1.0);
    }
}

/// The student-top-k recipe: the sparse loss with the student's support, `TailBucket` and
/// reverse KL is the reverse KL of the two distributions bucketed on that support (float64
/// by hand here), and with `k = V` the dense reverse KL. (0.1: on `NdArray<f64>` without
/// autodiff; here on Flex in float64, without autodiff.)
#[test]
fn student_top_k_recipe_is_the_exact_bucketed_reverse_kl() {
    use burn::tensor::{Distribution, activation};
    use burn_distill::onpolicy::{student_top_k, try_student_top_k};
    let device = Device::flex();
    let (n, v) = (5, 9);
    let normal = || {
        Tensor::<2>::random(
            [n, v],
            Distribution::Normal(0.0, 2.0),
            (&device, DType::F64),
        )
    };
    let (student, teacher) = (normal(), normal());
    let teacher_lp = activation::log_softmax(teacher.clone(), 1);
    let loss = SparseDistillLossConfig::new(
        DistillLossConfig::new()
            .with_alpha(1.0)
            .with_divergence(Divergence::ReverseKl)
            .with_scale_by_t2(false),
    )
    .with_tail(TailPolicy::TailBucket)
    .init();
    for k in [3, v] {
        let idx = student_top_k(student.clone(), k);
        let lp = teacher_lp.clone().gather(1, idx.clone());
        let value =
            values(loss.forward_soft(student.clone(), SparseTeacher::new(idx.clone(), lp)))[0];
        let s = values(activation::softmax(student.clone(), 1));
        let t = values(teacher_lp.clone().exp());
        let idx: Vec<i64> = idx.into_data().iter::<i64>().collect();
        let mut expected = 0.0;
        for r in 0..n {
            let row = &idx[r * k..(r + 1) * k];
            let (mut ps, mut pt): (Vec<f64>, Vec<f64>) = row
                .iter()
                .map(|&j| (s[r * v + j as usize], t[r * v + j as usize]))
                .unzip();
            if k < v {
                ps.push(1.0 - ps.iter().sum::<f64>());
                pt.push(1.0 - pt.iter().sum::<f64>());
            }
            expected += ps
                .iter()
                .zip(&pt)
                .map(|(a, b)| a * (a / b).ln())
                .sum::<f64>();
        }
        expected /= n as f64;
        assert!(
            (value - expected).abs() < 1e-9,
            "k = {k}: {value} vs {expected}"
        );
    }
    let msg = try_student_top_k(student, 0).unwrap_err().to_string();
    assert!(
        msg.contains("invalid k: got 0") && msg.contains("[1, 9]"),
        "{msg}"
    );
}
