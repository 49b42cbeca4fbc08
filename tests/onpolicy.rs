//! On-policy and cross-tokenizer losses: bad input gets a clear error, deferred checks name
//! the bad value, the student-top-k recipe is the exact reverse KL of the bucketed
//! distributions (in tests/sparse.rs, a float64 binary), and the sampled-token loss runs
//! the fused kernel. (The float64 references
//! run through the conformance suites of tests/golden.rs.) 0.1 ran these on NdArray; here on
//! Flex.
#![cfg(feature = "flex")]

use burn::tensor::{Bool, DType, Device, Distribution, Int, Tensor, TensorData, activation};
use burn_distill::cross::{
    CrossTokenizerLossConfig, MergeStrategy, SpanAlignment, TokenRows, VocabMatch, align_spans,
};
use burn_distill::onpolicy::{KlEstimator, SampledTokenLossConfig, SampledTokens, token_log_probs};
use burn_distill::{Kernel, Validation, backend::has_sparse_fused_kernel};

/// Flex with autodiff (0.1: `Autodiff<NdArray>`).
fn device() -> Device {
    Device::flex().autodiff()
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            message.contains(part),
            "{message:?} should mention {part:?}"
        );
    }
}

struct Inputs {
    logits: Tensor<3>,
    sampled: SampledTokens,
}

/// Two sequences of 3 over V = 4; the last position of the second is padding.
fn inputs() -> Inputs {
    let device = device();
    let logits = Tensor::<3>::random([2, 3, 4], Distribution::Normal(0.0, 1.0), &device);
    Inputs {
        logits,
        sampled: SampledTokens {
            tokens: Tensor::from_ints([[0, 1, 2], [3, 2, 99]], &device),
            teacher_log_probs: Tensor::from_floats(
                [[-0.5, -1.0, -2.0], [-0.1, -3.0, 7.0]],
                &device,
            ),
            mask: Tensor::<2, Bool>::from_bool(
                TensorData::from([[true, true, true], [true, true, false]]),
                &device,
            ),
            sampler_log_probs: None,
        },
    }
}

fn sampled_error(edit: impl FnOnce(&mut Inputs), config: SampledTokenLossConfig) -> String {
    let mut i = inputs();
    edit(&mut i);
    config
        .init()
        .try_forward_parts(i.logits, i.sampled)
        .expect_err("input must be rejected")
        .to_string()
}

#[test]
fn valid_inputs_pass_and_padding_is_not_checked() {
    let i = inputs();
    let out = SampledTokenLossConfig::new()
        .init()
        .try_forward_parts(i.logits, i.sampled)
        .unwrap();
    assert!(out.loss.into_scalar::<f32>().is_finite());
}

#[test]
fn sampled_token_out_of_range_is_named() {
    let msg = sampled_error(
        |i| i.sampled.tokens = Tensor::from_ints([[0, 1, 4], [3, 2, 99]], &device()),
        SampledTokenLossConfig::new(),
    );
    assert_mentions(&msg, &["tokens", "tokens[2] = 4", "[0, 4)"]);
}

#[test]
fn teacher_log_prob_above_zero_or_nan_is_named() {
    let device = device();
    let msg = sampled_error(
        |i| {
            i.sampled.teacher_log_probs =
                Tensor::from_floats([[-0.5, 0.25, -2.0], [-0.1, -3.0, 7.0]], &device)
        },
        SampledTokenLossConfig::new(),
    );
    assert_mentions(&msg, &["teacher_log_probs", "[0, 1] = 0.25", "<= 0"]);
    let msg = sampled_error(
        |i| {
            i.sampled.teacher_log_probs =
                Tensor::from_floats([[-0.5, -1.0, -2.0], [f32::NAN, -3.0, 7.0]], &device)
        },
        SampledTokenLossConfig::new(),
    );
    assert_mentions(&msg, &["teacher_log_probs", "[1, 0] = NaN"]);
    let msg = sampled_error(
        |i| {
            i.sampled.sampler_log_probs = Some(Tensor::from_floats(
                [[-0.5, -1.0, f32::NEG_INFINITY], [-0.1, -3.0, 0.0]],
                &device,
            ))
        },
        SampledTokenLossConfig::new(),
    );
    assert_mentions(&msg, &["sampler_log_probs", "[0, 2] = -inf", "finite"]);
}

#[test]
fn deferred_checks_are_named_by_validate() {
    let mut i = inputs();
    i.sampled.tokens = Tensor::from_ints([[0, -3, 2], [3, 2, 99]], &device());
    let out = SampledTokenLossConfig::new()
        .with_validation(Validation::Deferred)
        .init()
        .try_forward_parts(i.logits, i.sampled)
        .expect("deferred: no read-back in forward");
    assert!(out.loss.clone().into_scalar::<f32>().is_nan());
    let msg = out.validate().expect_err("validate names it").to_string();
    assert_mentions(&msg, &["tokens[1] = -3"]);
}

#[test]
fn shapes_and_configurations_are_checked() {
    let device = device();
    let msg = sampled_error(
        |i| {
            i.sampled.mask = Tensor::<2, Bool>::from_bool(TensorData::from([[true, true]]), &device)
        },
        SampledTokenLossConfig::new(),
    );
    assert_mentions(&msg, &["mask", "[1, 2]", "[2, 3]"]);
    let msg = sampled_error(
        |i| i.sampled.sampler_log_probs = Some(i.sampled.teacher_log_probs.clone()),
        SampledTokenLossConfig::new().with_estimator(KlEstimator::K3),
    );
    assert_mentions(&msg, &["sampler_log_probs", "K3"]);
    for (config, parts) in [
        (
            SampledTokenLossConfig::new().with_discount(1.5),
            ["discount", "1.5"],
        ),
        (
            SampledTokenLossConfig::new().with_clip(Some(0.0)),
            ["clip", "0"],
        ),
        (
            SampledTokenLossConfig::new()
                .with_estimator(KlEstimator::K3)
                .with_discount(0.5),
            ["estimator", "K3"],
        ),
    ] {
        assert_mentions(&config.try_init().unwrap_err().to_string(), &parts);
    }
}

#[test]
fn sampled_token_loss_runs_the_fused_kernel_here() {
    // Flex has the fused sparse kernel that computes the log-probabilities; Kernel::Fused
    // is an error where there is none.
    assert!(has_sparse_fused_kernel(&device(), DType::F32, 1));
    let i = inputs();
    let out = SampledTokenLossConfig::new()
        .with_kernel(Kernel::Fused)
        .init()
        .try_forward_parts(i.logits, i.sampled);
    assert!(out.is_ok());
}

#[test]
fn token_log_probs_equal_log_softmax_at_the_tokens() {
    let device = device();
    let logits = Tensor::<2>::random([64, 37], Distribution::Normal(0.0, 3.0), &device);
    let tokens = Tensor::<1, Int>::random([64], Distribution::Uniform(0.0, 37.0), &device);
    let fused = token_log_probs(logits.clone(), tokens.clone());
    let dense = activation::log_softmax(logits, 1)
        .gather(1, tokens.reshape([64, 1]))
        .reshape([64]);
    let (a, b): (Vec<f32>, Vec<f32>) = (
        fused.into_data().try_to_vec().unwrap(),
        dense.into_data().try_to_vec().unwrap(),
    );
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5 + 1e-5 * y.abs(), "{x} vs {y}");
    }
}

#[test]
fn spans_that_do_not_tile_the_text_are_named() {
    let msg = align_spans(&[(0, 2), (3, 5)], &[(0, 5)])
        .unwrap_err()
        .to_string();
    assert_mentions(&msg, &["student", "student[1] = (3, 5)", "starting at 2"]);
    let msg = align_spans(&[(0, 5)], &[(0, 2), (2, 2), (2, 5)])
        .unwrap_err()
        .to_string();
    assert_mentions(&msg, &["teacher[1] = (2, 2)", "non-empty"]);
    let msg = align_spans(&[(0, 5)], &[(0, 4)]).unwrap_err().to_string();
    assert_mentions(&msg, &["ending at byte 4", "5 bytes"]);
    let msg = SpanAlignment::new(
        MergeStrategy::Observed,
        &[
            (&[(0, 1)][..], &[(0, 1)][..]),
            (&[(1, 2)][..], &[(0, 2)][..]),
        ],
    )
    .unwrap_err()
    .to_string();
    assert_mentions(&msg, &["sequences[1].student", "(1, 2)"]);
}

#[test]
fn vocabularies_that_cannot_be_matched_are_named() {
    let msg = VocabMatch::new(&["a", "b"], &["c", "d"])
        .unwrap_err()
        .to_string();
    assert_mentions(&msg, &["teacher_vocab", "none equal", "common token"]);
    let msg = VocabMatch::new(&["a", "b", "a"], &["a"])
        .unwrap_err()
        .to_string();
    assert_mentions(&msg, &["student_vocab", "\"a\" at ids 0 and 2"]);
}

#[test]
fn cross_tokenizer_inputs_are_checked() {
    let device = device();
    let alignment = SpanAlignment::new(
        MergeStrategy::Observed,
        &[(&[(0, 1), (1, 2)][..], &[(0, 2)][..])],
    )
    .unwrap();
    let rows = |n: usize, v: usize, tokens: &[i64]| TokenRows {
        logits: Tensor::<2>::zeros([n, v], &device),
        tokens: Tensor::<1, Int>::from_data(TensorData::new(tokens.to_vec(), [n]), &device),
    };
    let loss = CrossTokenizerLossConfig::new().init();
    let msg = loss
        .try_forward_parts(rows(3, 4, &[0, 1, 2]), rows(1, 5, &[0]), &alignment, None)
        .unwrap_err()
        .to_string();
    assert_mentions(&msg, &["student.logits", "[3, 4]", "[2, V]"]);
    let msg = loss
        .try_forward_parts(rows(2, 4, &[0, 1]), rows(1, 5, &[5]), &alignment, None)
        .unwrap_err()
        .to_string();
    assert_mentions(&msg, &["teacher.tokens", "teacher.tokens[0] = 5", "[0, 5)"]);
    let vocab = VocabMatch::new(&["a", "b", "c", "d", "e", "f"], &["a"]).unwrap();
    let msg = loss
        .try_forward_parts(
            rows(2, 4, &[0, 1]),
            rows(1, 5, &[0]),
            &alignment,
            Some(&vocab),
        )
        .unwrap_err()
        .to_string();
    assert_mentions(&msg, &["vocab", "6 student tokens", "4 columns"]);
    assert_mentions(
        &CrossTokenizerLossConfig::new()
            .with_matched_beta(2.0)
            .try_init()
            .unwrap_err()
            .to_string(),
        &["matched_beta", "2"],
    );
}

#[test]
fn sampled_shapes_and_positions_are_named_as_passed() {
    // New in 0.2: the logits' batch and sequence are checked against the tokens' before
    // flattening (0.1 compared only B·T, so that transposed logits passed).
    let msg = sampled_error(
        |i| i.logits = Tensor::zeros([3, 2, 4], &device()),
        SampledTokenLossConfig::new(),
    );
    assert_mentions(&msg, &["student_logits", "[3, 2, 4]", "[2, 3, V]"]);
    // A bad token is named at its flattened position and at its position in the [B, T] tokens.
    let msg = sampled_error(
        |i| i.sampled.tokens = Tensor::from_ints([[0, 1, 2], [3, 7, 99]], &device()),
        SampledTokenLossConfig::new(),
    );
    assert_mentions(&msg, &["tokens[4] = 7", "tokens[1, 1]", "[0, 4)"]);
}
