//! Bad input gets a clear error naming the argument, its value and what was expected.
//! (0.1 ran these on NdArray; here on Flex.)
#![cfg(feature = "flex")]

mod common;

use burn::tensor::{Device, Tensor};
use burn_distill::{DistillError, DistillLossConfig, Divergence, Validation, temperature_softmax};
use common::{ints, tensor2};

fn init_error(config: DistillLossConfig) -> String {
    config
        .try_init()
        .expect_err("config must be rejected")
        .to_string()
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "{message:?} should mention {part:?}"
        );
    }
}

#[test]
fn temperature_zero_is_rejected() {
    let msg = init_error(DistillLossConfig::new().with_temperature(0.0));
    assert_mentions(&msg, &["temperature", "got 0", "> 0"]);
}

#[test]
fn temperature_negative_is_rejected() {
    let msg = init_error(DistillLossConfig::new().with_temperature(-2.0));
    assert_mentions(&msg, &["temperature", "-2", "> 0"]);
}

#[test]
fn temperature_not_finite_is_rejected() {
    for t in [f64::NAN, f64::INFINITY] {
        let msg = init_error(DistillLossConfig::new().with_temperature(t));
        assert_mentions(&msg, &["temperature", &t.to_string(), "finite"]);
    }
}

#[test]
#[should_panic(expected = "invalid temperature: got 0, expected a finite number > 0")]
fn init_panics_with_the_message() {
    DistillLossConfig::new().with_temperature(0.0).init();
}

#[test]
fn alpha_outside_unit_interval_is_rejected() {
    for a in [-0.1, 1.5, f64::NAN] {
        let msg = init_error(DistillLossConfig::new().with_alpha(a));
        assert_mentions(&msg, &["alpha", &a.to_string(), "[0, 1]"]);
    }
}

/// (0.1 also checked the sparse-teacher loss's cap here: todo with `SparseDistillLossConfig`.)
#[test]
fn logit_softcap_must_be_finite_and_positive() {
    for c in [0.0, -30.0, f64::NAN, f64::INFINITY] {
        let msg = init_error(DistillLossConfig::new().with_logit_softcap(Some(c)));
        assert_mentions(&msg, &["logit_softcap", &c.to_string(), "finite and > 0"]);
    }
    DistillLossConfig::new()
        .with_logit_softcap(Some(30.0))
        .init();
    // The sparse-teacher loss checks the cap the same way.
    let sparse = burn_distill::SparseDistillLossConfig::new(
        DistillLossConfig::new().with_logit_softcap(Some(-1.0)),
    )
    .try_init()
    .unwrap_err()
    .to_string();
    assert_mentions(&sparse, &["logit_softcap", "-1", "finite and > 0"]);
}

#[test]
fn mixture_weights_outside_their_interval_are_rejected() {
    for (d, name, v, expected) in [
        (
            Divergence::Jsd { beta: -0.1 },
            "Jsd { beta }",
            "-0.1",
            "[0, 1]",
        ),
        (
            Divergence::Jsd { beta: 1.5 },
            "Jsd { beta }",
            "1.5",
            "[0, 1]",
        ),
        (
            Divergence::SkewKl { lambda: 0.0 },
            "SkewKl { lambda }",
            "0",
            "(0, 1)",
        ),
        (
            Divergence::SkewKl { lambda: 1.2 },
            "SkewKl { lambda }",
            "1.2",
            "(0, 1)",
        ),
        (
            Divergence::SkewReverseKl { lambda: -0.5 },
            "SkewReverseKl { lambda }",
            "-0.5",
            "(0, 1)",
        ),
    ] {
        let msg = init_error(DistillLossConfig::new().with_divergence(d));
        assert_mentions(&msg, &[name, &format!("got {v}"), expected]);
    }
}

/// (0.1 also checked that the sparse loss accepts the resolved `Jsd { beta: 0 }` under
/// DistillKit's full-vocabulary convention: todo with `SparseDistillLossConfig`.)
#[test]
fn jsd_endpoints_are_trl_forward_and_reverse_kl() {
    for (beta, same) in [(0.0, Divergence::ForwardKl), (1.0, Divergence::ReverseKl)] {
        let loss = DistillLossConfig::new()
            .with_divergence(Divergence::Jsd { beta })
            .init();
        assert_eq!(loss.params().divergence(), same, "beta = {beta}");
    }
    // The sparse loss sees the resolved divergence: DistillKit's full-vocabulary convention
    // (forward KL only) accepts `Jsd { beta: 0 }`, and refuses `Jsd { beta: 1 }` (reverse KL).
    use burn_distill::{SparseDistillLossConfig, StudentSupport, TailPolicy};
    let full_vocab = |beta| {
        SparseDistillLossConfig::new(
            DistillLossConfig::new().with_divergence(Divergence::Jsd { beta }),
        )
        .with_tail(TailPolicy::Renormalize {
            student: StudentSupport::FullVocab,
        })
    };
    assert!(full_vocab(0.0).try_init().is_ok());
    assert!(full_vocab(1.0).try_init().is_err());
}

#[test]
fn normalized_by_zero_items_is_rejected() {
    let msg = init_error(
        DistillLossConfig::new().with_reduction(burn_distill::Reduction::Normalized { items: 0 }),
    );
    assert_mentions(&msg, &["Normalized { items }", "got 0", ">= 1"]);
}

#[test]
fn label_smoothing_outside_half_open_interval_is_rejected() {
    for e in [1.0, -0.01] {
        let msg = init_error(DistillLossConfig::new().with_label_smoothing(e));
        assert_mentions(&msg, &["label_smoothing", &e.to_string(), "[0, 1)"]);
    }
}

#[test]
fn valid_edges_are_accepted() {
    DistillLossConfig::new().with_alpha(0.0).init();
    DistillLossConfig::new().with_alpha(1.0).init();
    DistillLossConfig::new().with_label_smoothing(0.0).init();
    DistillLossConfig::new().with_temperature(1e-3).init();
}

fn device() -> Device {
    Device::flex()
}

fn logits(n: usize, v: usize) -> Tensor<2> {
    let values: Vec<f64> = (0..n * v).map(|i| (i as f64 * 0.37).sin()).collect();
    tensor2(&values, [n, v], &device())
}

#[test]
fn teacher_shape_mismatch_is_rejected() {
    let loss = DistillLossConfig::new().init();
    let err = loss
        .try_forward(logits(4, 10), logits(4, 12), ints(&[0, 1, 2, 3], &device()))
        .unwrap_err();
    assert_mentions(&err.to_string(), &["teacher_logits", "[4, 12]", "[4, 10]"]);
}

#[test]
fn targets_length_mismatch_is_rejected() {
    let loss = DistillLossConfig::new().init();
    let err = loss
        .try_forward(logits(4, 10), logits(4, 10), ints(&[0, 1, 2], &device()))
        .unwrap_err();
    assert_mentions(&err.to_string(), &["targets", "[3]", "[4]"]);
}

#[test]
fn empty_logits_are_rejected() {
    let loss = DistillLossConfig::new().init();
    let err = loss
        .try_forward_parts(logits(3, 0), logits(3, 0), None)
        .unwrap_err();
    assert_mentions(&err.to_string(), &["student_logits", "[3, 0]", "non-empty"]);
}

#[test]
#[should_panic(expected = "invalid teacher_logits")]
fn forward_soft_panics_on_shape_mismatch() {
    DistillLossConfig::new()
        .init()
        .forward_soft(logits(2, 5), logits(3, 5));
}

#[test]
fn target_out_of_range_is_rejected_with_row_and_value() {
    let loss = DistillLossConfig::new().init();
    let err = loss
        .try_forward(
            logits(4, 10),
            logits(4, 10),
            ints(&[0, -100, 10, 3], &device()),
        )
        .unwrap_err();
    assert_eq!(
        err,
        DistillError::TargetOutOfRange {
            row: 2,
            at: vec![2],
            value: 10,
            classes: 10,
            ignore_index: Some(-100)
        }
    );
    assert_mentions(
        &err.to_string(),
        &["targets[2] = 10", "[0, 10)", "ignore_index -100"],
    );
}

#[test]
fn negative_target_that_is_not_the_ignore_index_is_rejected() {
    let loss = DistillLossConfig::new().with_ignore_index(None).init();
    let err = loss
        .try_forward(logits(2, 10), logits(2, 10), ints(&[1, -100], &device()))
        .unwrap_err();
    assert_mentions(&err.to_string(), &["targets[1] = -100", "[0, 10)"]);
}

#[test]
fn unchecked_out_of_range_target_gives_nan_not_a_wrong_loss() {
    let loss = DistillLossConfig::new()
        .with_validation(Validation::Off)
        .init();
    let value = loss.forward(logits(3, 10), logits(3, 10), ints(&[1, 12, 2], &device()));
    assert!(value.into_scalar::<f32>().is_nan());
}

#[test]
fn seq_shape_mismatches_are_rejected() {
    let loss = DistillLossConfig::new().init();
    let device = device();
    let s = Tensor::<3>::zeros([2, 3, 5], &device);
    let err = loss
        .try_forward_seq_parts(s.clone(), Tensor::zeros([2, 4, 5], &device), None)
        .unwrap_err();
    assert_mentions(
        &err.to_string(),
        &["teacher_logits", "[2, 4, 5]", "[2, 3, 5]"],
    );
    // A transposed batch has the same B·T rows: caught before the tokens are flattened (the
    // 0.1 wording, naming the student's `[2, 3]` batch and sequence, is checked in
    // `seq_transposed_teacher_names_the_students_batch_and_sequence`).
    let err = loss
        .try_forward_seq_parts(s.clone(), Tensor::zeros([3, 2, 5], &device), None)
        .unwrap_err();
    assert_mentions(
        &err.to_string(),
        &["teacher_logits", "[3, 2, 5]", "[2, 3, 5]"],
    );
    let err = loss
        .try_forward_seq_parts(s.clone(), s, Some(Tensor::zeros([3, 2], &device)))
        .unwrap_err();
    assert_mentions(&err.to_string(), &["targets", "[3, 2]", "[2, 3]"]);
}

/// A transposed teacher is named with the student's batch and sequence `[2, 3]` ("[2, 3]
/// leading dimensions (the batch and sequence of the student's shape [2, 3, 5])").
#[test]
fn seq_transposed_teacher_names_the_students_batch_and_sequence() {
    let loss = DistillLossConfig::new().init();
    let device = device();
    let s = Tensor::<3>::zeros([2, 3, 5], &device);
    let err = loss
        .try_forward_seq_parts(s, Tensor::zeros([3, 2, 5], &device), None)
        .unwrap_err();
    assert_mentions(&err.to_string(), &["teacher_logits", "[3, 2, 5]", "[2, 3]"]);
}

/// A sequence's out-of-range target is named at its position in the caller's `[B, T]`
/// targets (0.1 named the flattened row, `targets[5]`).
#[test]
fn seq_target_out_of_range_is_named_at_its_position() {
    let loss = DistillLossConfig::new().init();
    let device = device();
    let s = Tensor::<3>::zeros([2, 3, 5], &device);
    let targets = ints(&[0, 1, 2, -100, 4, 7], &device).reshape([2, 3]);
    let err = loss
        .try_forward_seq_parts(s.clone(), s, Some(targets))
        .unwrap_err();
    assert_eq!(
        err,
        DistillError::TargetOutOfRange {
            row: 5,
            at: vec![1, 2],
            value: 7,
            classes: 5,
            ignore_index: Some(-100)
        }
    );
    assert_mentions(
        &err.to_string(),
        &["targets[1, 2] = 7", "[0, 5)", "ignore_index -100"],
    );
}

#[test]
fn rows_report_the_teacher_before_the_targets() {
    // Rows keep their checks' order: the teacher's shape first, then the targets'.
    let loss = DistillLossConfig::new().init();
    let err = loss
        .try_forward_parts(
            logits(2, 5),
            logits(3, 5),
            Some(ints(&[0, 1, 2], &device())),
        )
        .unwrap_err();
    assert_mentions(&err.to_string(), &["teacher_logits", "[3, 5]", "[2, 5]"]);
    let err = loss
        .try_forward_parts(
            logits(2, 5),
            logits(2, 5),
            Some(ints(&[0, 1, 2], &device())),
        )
        .unwrap_err();
    assert_mentions(
        &err.to_string(),
        &["targets", "[3]", "one class index per row"],
    );
}

#[test]
#[should_panic(expected = "invalid temperature: got -1")]
fn temperature_softmax_rejects_bad_temperature() {
    temperature_softmax(logits(1, 3), -1.0, 1);
}

#[test]
fn fused_kernel_where_none_exists_is_a_clear_error() {
    use burn::tensor::DType;
    use burn_distill::Kernel;
    let device = device();
    let half = |t: Tensor<2>| t.cast(DType::F16);
    let logits = Tensor::<2>::zeros([2, 4], &device);
    let loss = DistillLossConfig::new().with_kernel(Kernel::Fused).init();
    let err = loss
        .try_forward_parts(half(logits.clone()), half(logits.clone()), None)
        .unwrap_err();
    assert_mentions(
        &err.to_string(),
        &[
            "invalid kernel",
            "Kernel::Fused",
            "no fused distillation kernel",
            "F16",
        ],
    );
    // Auto falls back to the reference on the same input.
    let value = DistillLossConfig::new()
        .init()
        .forward_soft(half(logits.clone()), half(logits));
    assert_eq!(value.into_data().iter::<f32>().next(), Some(0.0));
}

/// The fused-linear loss defers its target check like the logits loss: no error in forward,
/// a NaN loss, and `validate` naming the target.
#[test]
fn linear_loss_defers_the_target_check() {
    use burn::nn::LinearConfig;
    let device = device();
    let head = LinearConfig::new(4, 6).init(&device);
    let hidden = Tensor::<2>::ones([3, 4], &device);
    let loss = DistillLossConfig::new()
        .with_validation(Validation::Deferred)
        .init();
    let out = loss
        .try_forward_linear_parts(
            hidden.clone(),
            &head,
            hidden,
            &head,
            Some(ints(&[0, 6, 1], &device)),
        )
        .unwrap();
    assert!(out.loss.clone().into_scalar::<f32>().is_nan());
    assert!(matches!(
        out.validate(),
        Err(DistillError::TargetOutOfRange {
            row: 1,
            value: 6,
            classes: 6,
            ..
        })
    ));
}
