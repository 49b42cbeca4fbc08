//! Student and teacher vocabularies of different sizes (float64 on Flex; 0.1 ran these on
//! `Autodiff<NdArray<f64>>`).
#![cfg(feature = "flex")]

mod common;

use burn_distill::{DistillLossConfig, Divergence, Kernel, VocabMismatch};
use common::{
    close, flex_autodiff, ints, tensor2_f64 as tensor2, tensor3_f64, values_f64 as values,
};

fn logits(n: usize, v: usize, seed: f64) -> Vec<f64> {
    (0..n * v)
        .map(|i| 3.0 * ((i as f64 + 1.0) * seed).sin())
        .collect()
}

fn cut(x: &[f64], v: usize, keep: usize) -> Vec<f64> {
    x.chunks(v).flat_map(|r| r[..keep].to_vec()).collect()
}

#[test]
fn mismatch_is_an_error_by_default_naming_both_sizes() {
    let device = flex_autodiff();
    let err = DistillLossConfig::new()
        .init()
        .try_forward_parts(
            tensor2(&logits(2, 6, 0.3), [2, 6], &device),
            tensor2(&logits(2, 8, 0.7), [2, 8], &device),
            None,
        )
        .unwrap_err()
        .to_string();
    for part in [
        "teacher_logits",
        "vocabulary 8",
        "vocabulary 6",
        "Truncate",
        "PadNegInf",
    ] {
        assert!(err.contains(part), "{err:?} should mention {part:?}");
    }
}

#[test]
fn truncate_keeps_the_common_prefix() {
    let device = flex_autodiff();
    let (s, t) = (logits(3, 6, 0.3), logits(3, 8, 0.7));
    for kernel in [Kernel::Reference, Kernel::Fused] {
        let config = DistillLossConfig::new()
            .with_temperature(2.0)
            .with_kernel(kernel);
        let student = tensor2(&s, [3, 6], &device).require_grad();
        let truncated = config
            .clone()
            .with_vocab_mismatch(VocabMismatch::Truncate)
            .init()
            .forward(
                student.clone(),
                tensor2(&t, [3, 8], &device),
                ints(&[0, 5, 2], &device),
            );
        let grad = values(student.grad(&truncated.backward()).unwrap());
        assert_eq!(grad.len(), 18, "the gradient keeps the student's shape");
        let manual = config.init().forward(
            tensor2(&s, [3, 6], &device),
            tensor2(&cut(&t, 8, 6), [3, 6], &device),
            ints(&[0, 5, 2], &device),
        );
        assert!(close(values(truncated)[0], values(manual)[0], 1e-12, 1e-12));
    }
}

#[test]
fn pad_neg_inf_adds_no_probability_mass() {
    let device = flex_autodiff();
    // The teacher has the smaller vocabulary: padding it with −inf gives it zero mass there.
    // JSD(β = 0.5) stays finite there (the mixture has the student's mass).
    let (s, t) = (logits(2, 8, 0.3), logits(2, 6, 0.7));
    let loss = DistillLossConfig::new()
        .with_divergence(Divergence::Jsd { beta: 0.5 })
        .with_vocab_mismatch(VocabMismatch::PadNegInf);
    for kernel in [Kernel::Reference, Kernel::Fused] {
        let value = loss
            .clone()
            .with_kernel(kernel)
            .init()
            .forward_soft(tensor2(&s, [2, 8], &device), tensor2(&t, [2, 6], &device));
        let mut padded = Vec::new();
        for row in t.chunks(6) {
            padded.extend(row);
            padded.extend([f64::NEG_INFINITY; 2]);
        }
        let manual = loss.clone().with_kernel(kernel).init().forward_soft(
            tensor2(&s, [2, 8], &device),
            tensor2(&padded, [2, 8], &device),
        );
        let (value, manual) = (values(value), values(manual));
        assert!(value[0].is_finite() && value[0] > 0.0, "{value:?}");
        assert_eq!(value, manual);
    }
}

/// Reverse KL against a teacher padded with `−∞` is `+∞` on every row (the student's softmax
/// is positive on the padded columns): refused with an error naming the policy, both
/// vocabularies and the divergence, in every form (logits, sequences, fused-linear).
#[test]
fn pad_neg_inf_refuses_reverse_kl_against_a_padded_teacher() {
    let device = flex_autodiff();
    for divergence in [Divergence::ReverseKl, Divergence::Jsd { beta: 1.0 }] {
        let loss = DistillLossConfig::new()
            .with_divergence(divergence)
            .with_vocab_mismatch(VocabMismatch::PadNegInf)
            .init();
        let err = loss
            .try_forward_parts(
                tensor2(&logits(2, 8, 0.3), [2, 8], &device),
                tensor2(&logits(2, 6, 0.7), [2, 6], &device),
                None,
            )
            .unwrap_err()
            .to_string();
        for part in ["vocab_mismatch", "PadNegInf", "6", "8", "Truncate"] {
            assert!(err.contains(part), "{part:?} missing from: {err}");
        }
        let seq = tensor3_f64(&logits(2, 8, 0.3), [1, 2, 8], &device);
        let seq_t = tensor3_f64(&logits(2, 6, 0.7), [1, 2, 6], &device);
        let err = loss
            .try_forward_seq_parts(seq, seq_t, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("vocab_mismatch") && err.contains("PadNegInf"),
            "{err}"
        );
        // The fused-linear form: a student head of 8 columns, a teacher head of 6.
        let hs = tensor2(&logits(2, 3, 0.2), [2, 3], &device);
        let head = |v: usize| burn::nn::Linear {
            weight: burn::module::Param::from_tensor(tensor2(&logits(3, v, 0.5), [3, v], &device)),
            bias: None,
        };
        let err = loss
            .try_forward_linear_parts(hs.clone(), &head(8), hs, &head(6), None)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("vocab_mismatch") && err.contains("PadNegInf"),
            "{err}"
        );
        // The student padded instead: reverse KL is finite.
        let value = loss.forward_soft(
            tensor2(&logits(2, 6, 0.3), [2, 6], &device),
            tensor2(&logits(2, 8, 0.7), [2, 8], &device),
        );
        assert!(values(value)[0].is_finite());
    }
}

#[test]
fn pad_neg_inf_forward_kl_against_a_padded_student_is_infinite() {
    let device = flex_autodiff();
    // Student smaller: forward KL where the teacher has mass the student cannot have is +∞.
    let kl = DistillLossConfig::new()
        .with_vocab_mismatch(VocabMismatch::PadNegInf)
        .init()
        .forward_soft(
            tensor2(&logits(1, 4, 0.3), [1, 4], &device),
            tensor2(&logits(1, 6, 0.7), [1, 6], &device),
        );
    assert_eq!(values(kl)[0], f64::INFINITY);
}
