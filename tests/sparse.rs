//! The sparse-teacher (top-k) losses in float64: PyTorch golden values to rounding, the
//! reduction to the dense loss when k = V, the generation-temperature correction, masking,
//! and every bad input.

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{Bool, Int, Tensor, TensorData};
use burn_distill::{
    DistillLossConfig, Divergence, Kernel, Reduction, SparseDistillLossConfig, SparseTeacher,
    StudentSupport, TailPolicy, Validation,
};
use common::sparse::{assert_sparse_golden, sparse_cases};
use common::{ints, tensor2, values};

// Float64 throughout: burn 0.21's NdArray keeps one default float dtype per device and
// process, so f32 and f64 NdArray tests must live in different test binaries (the f32 golden
// runs are in tests/golden.rs).
type B = Autodiff<NdArray<f64>>;
type B64 = B;

const FULL_VOCAB: TailPolicy = TailPolicy::Renormalize {
    student: StudentSupport::FullVocab,
};
const TOP_K: TailPolicy = TailPolicy::Renormalize {
    student: StudentSupport::TopK,
};

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

/// In float64 the crate's tensor formulation must agree with the row-by-row PyTorch reference
/// to rounding.
#[test]
fn golden_ndarray_f64() {
    assert_sparse_golden::<B64>(&Default::default(), (1e-12, 1e-10), (1e-12, 1e-10));
}

fn dense_and_sparse(
    divergence: Divergence,
    tail: TailPolicy,
    k: usize,
    temperature: f64,
    generation_temperature: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let device = Default::default();
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

    let s = tensor2::<B64>(&student, [n, v], &device).require_grad();
    let dense_value = dense.forward_soft(s.clone(), tensor2::<B64>(&teacher, [n, v], &device));
    let dense_grad = values(s.grad(&dense_value.backward()).unwrap());

    let s = tensor2::<B64>(&student, [n, v], &device).require_grad();
    let top = SparseTeacher::from_logits(
        tensor2::<B64>(&teacher, [n, v], &device),
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
    let (_, _, wrong, _) = {
        // log-probs at T_gen = 1, but told T_gen = 3
        let device = Default::default();
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
        let top = SparseTeacher::from_logits(tensor2::<B64>(&teacher, [5, 12], &device), 12, 1.0);
        let v = loss.forward_soft(tensor2::<B64>(&student, [5, 12], &device), top);
        (0, 0, values(v), 0)
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
    let device = Default::default();
    let student = tensor2::<B64>(
        &[0.5, -1.0, 2.0, 0.0, 1.0, -0.5, 0.3, 1.2, -2.0, 0.8],
        [2, 5],
        &device,
    );
    for tail in [FULL_VOCAB, TOP_K, TailPolicy::TailBucket] {
        let loss = SparseDistillLossConfig::new(DistillLossConfig::new().with_temperature(2.0))
            .with_tail(tail)
            .init();
        let short = SparseTeacher::new(
            Tensor::<B64, 2, Int>::from_ints([[2, 4], [1, 0]], &device),
            Tensor::<B64, 2>::from_floats([[-0.3, -1.9], [-0.7, -1.1]], &device),
        );
        let padded = SparseTeacher::new(
            Tensor::<B64, 2, Int>::from_ints([[2, 4, 0, -5], [1, 0, 99, 3]], &device),
            Tensor::<B64, 2>::from_floats(
                [
                    [-0.3, -1.9, f64::NEG_INFINITY, 7.0],
                    [-0.7, -1.1, f64::NEG_INFINITY, 9.0],
                ],
                &device,
            ),
        )
        .with_mask(Tensor::<B64, 2, Bool>::from_bool(
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
    let device = Default::default();
    let student = tensor2::<B>(&[0.5, -1.0, 2.0, 0.0, 1.0, -0.5], [2, 3], &device).require_grad();
    let teacher = SparseTeacher::from_logits(
        Tensor::<B, 2>::from_floats([[1.0, 0.0, -1.0], [0.0, 0.0, 0.0]], &device),
        3,
        1.0,
    );
    let neg_inf = f32::NEG_INFINITY;
    let no_entries = SparseTeacher::new(
        Tensor::<B, 2, Int>::from_ints([[0, 1], [0, 1]], &device),
        Tensor::<B, 2>::from_floats([[-0.5, -1.0], [neg_inf, neg_inf]], &device),
    );
    let loss = SparseDistillLossConfig::new(DistillLossConfig::new().with_alpha(0.5)).init();
    for (teacher, targets) in [(teacher, [0, 2]), (no_entries, [1, -100])] {
        let value = loss.forward(student.clone(), teacher, ints::<B>(&targets, &device));
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
    let device = Default::default();
    let loss =
        SparseDistillLossConfig::new(DistillLossConfig::new().with_validation(Validation::Off))
            .init();
    let teacher = SparseTeacher::new(
        Tensor::<B, 2, Int>::from_ints([[0, 1], [0, 1]], &device),
        Tensor::<B, 2>::from_floats(
            [[-0.5, -1.0], [f32::NEG_INFINITY, f32::NEG_INFINITY]],
            &device,
        ),
    );
    let student = tensor2::<B>(&[0.5, -1.0, 2.0, 0.0, 1.0, -0.5], [2, 3], &device);
    let value = loss.forward(student, teacher, ints::<B>(&[0, 1], &device));
    assert!(values(value)[0].is_nan());
}

/// The sequence form is the flattened row form; ignored (prompt) tokens drop out of the mean.
#[test]
fn forward_seq_equals_flattened_rows() {
    let device = Default::default();
    let (b, t, v, k) = (2, 3, 6, 2);
    let logits: Vec<f64> = (0..b * t * v)
        .map(|i| ((i * 7 % 11) as f64 - 5.0) / 2.0)
        .collect();
    let student = Tensor::<B64, 3>::from_data(TensorData::new(logits.clone(), [b, t, v]), &device);
    // Distinct indices within each row.
    let idx: Vec<i64> = (0..b * t)
        .flat_map(|row| [(row * 5 % v) as i64, ((row * 5 + 1) % v) as i64])
        .collect();
    let lp: Vec<f64> = (0..b * t * k).map(|i| -0.5 - (i % 3) as f64).collect();
    let indices3 =
        Tensor::<B64, 3, Int>::from_data(TensorData::new(idx.clone(), [b, t, k]), &device);
    let lp3 = Tensor::<B64, 3>::from_data(TensorData::new(lp.clone(), [b, t, k]), &device);
    let targets = [1i64, -100, 2, -100, -100, 5];
    let loss = SparseDistillLossConfig::new(DistillLossConfig::new().with_alpha(0.7))
        .with_tail(TailPolicy::TailBucket)
        .init();
    let seq = loss.forward_seq(
        student,
        SparseTeacher::from_seq(indices3, lp3),
        Tensor::<B64, 2, Int>::from_data(TensorData::new(targets.to_vec(), [b, t]), &device),
    );
    let flat = loss.forward(
        tensor2::<B64>(&logits, [b * t, v], &device),
        SparseTeacher::new(
            Tensor::<B64, 2, Int>::from_data(TensorData::new(idx.clone(), [b * t, k]), &device),
            tensor2::<B64>(&lp, [b * t, k], &device),
        ),
        ints::<B64>(&targets, &device),
    );
    let rows = SparseDistillLossConfig::new(
        DistillLossConfig::new()
            .with_alpha(0.7)
            .with_reduction(Reduction::PerRow),
    )
    .with_tail(TailPolicy::TailBucket)
    .init()
    .forward(
        tensor2::<B64>(&logits, [b * t, v], &device),
        SparseTeacher::new(
            Tensor::<B64, 2, Int>::from_data(TensorData::new(idx.clone(), [b * t, k]), &device),
            tensor2::<B64>(&lp, [b * t, k], &device),
        ),
        ints::<B64>(&targets, &device),
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

    fn message(result: Result<impl std::fmt::Debug, burn_distill::DistillError>) -> String {
        result.expect_err("expected an error").to_string()
    }

    fn teacher(idx: [[i64; 2]; 2], lp: [[f32; 2]; 2]) -> SparseTeacher<B> {
        let device = Default::default();
        SparseTeacher::new(
            Tensor::<B, 2, Int>::from_ints(idx, &device),
            Tensor::<B, 2>::from_floats(lp, &device),
        )
    }

    fn run(tail: TailPolicy, t: SparseTeacher<B>) -> String {
        let device = Default::default();
        let student = tensor2::<B>(&[0.0; 8], [2, 4], &device);
        let loss = SparseDistillLossConfig::new(DistillLossConfig::new())
            .with_tail(tail)
            .init();
        message(loss.try_forward_parts(student, t, Some(ints::<B>(&[0, 1], &device))))
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
        let device = Default::default();
        let loss = SparseDistillLossConfig::new(DistillLossConfig::new())
            .with_tail(TOP_K)
            .init();
        let student = tensor2::<B>(&[0.0; 8], [2, 4], &device);
        let v = loss.forward(
            student,
            teacher([[0, 1], [2, 3]], bad),
            ints::<B>(&[0, 1], &device),
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
        let device = Default::default();
        let loss = SparseDistillLossConfig::new(DistillLossConfig::new()).init();
        let student = tensor2::<B>(&[0.0; 12], [3, 4], &device);
        let t = teacher([[0, 1], [2, 3]], [[-1.0, -2.0], [-1.0, -2.0]]);
        let m = message(loss.try_forward_parts(student.clone(), t, None));
        assert!(
            m.contains("teacher indices") && m.contains("shape [2, 2]"),
            "{m}"
        );
        assert!(m.contains("[3, k]"), "{m}");

        let t = SparseTeacher::new(
            Tensor::<B, 2, Int>::from_ints([[0, 1], [2, 3], [1, 2]], &device),
            Tensor::<B, 2>::from_floats([[-1.0], [-1.0], [-1.0]], &device),
        );
        let m = message(loss.try_forward_parts(student.clone(), t.clone(), None));
        assert!(
            m.contains("teacher log_probs") && m.contains("shape [3, 1]"),
            "{m}"
        );

        let t = SparseTeacher::new(
            Tensor::<B, 2, Int>::from_ints([[0, 1], [2, 3], [1, 2]], &device),
            Tensor::<B, 2>::from_floats([[-1.0, -2.0], [-1.0, -2.0], [-1.0, -2.0]], &device),
        );
        let masked = t.clone().with_mask(Tensor::<B, 2, Bool>::from_bool(
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
            Some(ints::<B>(&[0, 1], &device)),
        ));
        assert!(m.contains("targets") && m.contains("shape [2]"), "{m}");

        // A sequence's `[B, T]` targets are checked against the student's batch and sequence.
        let seq = student.reshape([1, 3, 4]);
        let targets = Tensor::<B, 2, Int>::from_ints([[0], [1], [2]], &device);
        let m = message(loss.try_forward_parts(seq, t, Some(targets)));
        assert!(
            m.contains("targets") && m.contains("[3, 1]") && m.contains("[1, 3]"),
            "{m}"
        );
    }

    #[test]
    fn target_out_of_range() {
        let device = Default::default();
        let loss = SparseDistillLossConfig::new(DistillLossConfig::new()).init();
        let student = tensor2::<B>(&[0.0; 8], [2, 4], &device);
        let t = teacher([[0, 1], [2, 3]], [[-1.0, -2.0], [-1.0, -2.0]]);
        let m = message(loss.try_forward_parts(student, t, Some(ints::<B>(&[0, 9], &device))));
        assert!(m.contains("targets[1] = 9"), "{m}");
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
        // The fused sparse kernel exists (NdArray, Flex): `Kernel::Fused` is a valid choice.
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
        let device = Default::default();
        SparseTeacher::from_logits(tensor2::<B>(&[0.0; 8], [2, 4], &device), 5, 1.0);
    }
}

/// The student-top-k recipe: the sparse loss with the student's support, `TailBucket` and
/// reverse KL is the reverse KL of the two distributions bucketed on that support (float64
/// by hand here), and with `k = V` the dense reverse KL.
#[test]
fn student_top_k_recipe_is_the_exact_bucketed_reverse_kl() {
    type F = NdArray<f64>;
    use burn::tensor::{Distribution, activation};
    use burn_distill::onpolicy::{student_top_k, try_student_top_k};
    let device = Default::default();
    let (n, v) = (5, 9);
    let student = Tensor::<F, 2>::random([n, v], Distribution::Normal(0.0, 2.0), &device);
    let teacher = Tensor::<F, 2>::random([n, v], Distribution::Normal(0.0, 2.0), &device);
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
        let value = loss
            .forward_soft(student.clone(), SparseTeacher::new(idx.clone(), lp))
            .into_scalar();
        let s = activation::softmax(student.clone(), 1)
            .into_data()
            .to_vec::<f64>()
            .unwrap();
        let t = teacher_lp
            .clone()
            .exp()
            .into_data()
            .to_vec::<f64>()
            .unwrap();
        let idx = idx.into_data().to_vec::<i64>().unwrap();
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
