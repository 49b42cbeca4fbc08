//! The fused-linear loss (`forward_linear*`) equals `forward` on materialised logits, in
//! float64 on Flex (fused and reference kernels; 0.1 ran these on `NdArray<f64>`): loss and
//! the gradients of the student's hidden states, head weight and bias; sequence form; bad
//! input. f32 devices: tests/linear_f32.rs.
#![cfg(feature = "flex")]

mod common;

use burn::tensor::Device;
use burn_distill::{DistillError, DistillLossConfig, DistillOutput, Kernel};
use common::linear::{
    Dev, LinearCase, assert_linear_golden, check_linear, counted, head, sweep, wave,
};
use common::{tensor2_f64, tensor3_f64, values_f64};

const TOL: (f64, f64) = (1e-12, 1e-9);

#[test]
fn equals_the_materialised_loss_in_f64() {
    sweep(TOL, &Dev::flex_f64());
}

#[test]
fn equals_float64_pytorch() {
    assert_linear_golden(TOL, &Dev::flex_f64(), true);
}

/// The sequence form caps before the vocabulary alignment: `−∞` padding stays `−∞` (a cap
/// applied after it would give the padded columns `−c` and so probability mass).
#[test]
fn softcap_in_sequence_form_keeps_the_padding() {
    use burn_distill::VocabMismatch;
    let dev = Dev::flex_f64();
    let device = &dev.device;
    let (b, t) = (2, 3);
    let s = wave(b * t * 9, 0.31)
        .iter()
        .map(|x| x * 4.0)
        .collect::<Vec<_>>();
    let te = wave(b * t * 7, 0.47)
        .iter()
        .map(|x| x * 4.0)
        .collect::<Vec<_>>();
    let y = vec![1, -100, 8, 3, 0, 5];
    let loss = DistillLossConfig::new()
        .with_logit_softcap(Some(2.0))
        .with_vocab_mismatch(VocabMismatch::PadNegInf)
        .init();
    let seq = loss.forward_seq(
        tensor3_f64(&s, [b, t, 9], device),
        tensor3_f64(&te, [b, t, 7], device),
        dev.ints(y.clone(), [b, t]),
    );
    let capped = |v: &[f64]| v.iter().map(|x| 2.0 * (x / 2.0).tanh()).collect::<Vec<_>>();
    let (sc, mut tc) = (capped(&s), Vec::new());
    for row in capped(&te).chunks(7) {
        tc.extend_from_slice(row);
        tc.extend_from_slice(&[f64::NEG_INFINITY; 2]);
    }
    let plain = DistillLossConfig::new().init().forward(
        tensor2_f64(&sc, [b * t, 9], device),
        tensor2_f64(&tc, [b * t, 9], device),
        dev.ints(y, [b * t]),
    );
    let (a, e) = (values_f64(seq)[0], values_f64(plain)[0]);
    assert!((a - e).abs() < 1e-12 && a.is_finite(), "{a} vs {e}");
}

/// Flex runs its host loop for the fused kernel (once per call; 0.1's NdArray did), and the
/// materialised logits for `Kernel::Reference` with a gradient; the values agree either way,
/// so only these counts tell them apart.
#[test]
fn flex_runs_the_host_loop() {
    let dev = Dev::flex_f64();
    let case = LinearCase::new(7, 5, 8, 13);
    let (sh, th) = (
        head(case.hs, case.vs, 0.7, true, &dev),
        head(case.ht, case.vt, 1.3, true, &dev),
    );
    let hidden = |h: usize, seed: f64| dev.float(wave(case.n * h, seed), [case.n, h]);
    let targets = case.targets.clone().expect("targets");
    let y = dev.ints(targets, [case.n]);
    for (kernel, runs) in [
        (Kernel::Auto, 1),
        (Kernel::Fused, 1),
        (Kernel::Reference, 0),
    ] {
        let loss = DistillLossConfig::new()
            .with_kernel(kernel)
            .with_linear_chunk_rows(Some(3))
            .init();
        let (value, [host, chunks]) = counted(|| {
            loss.forward_linear(
                hidden(case.hs, 0.4).require_grad(),
                &sh,
                hidden(case.ht, 0.6),
                &th,
                y.clone(),
            )
        });
        assert!(values_f64(value)[0].is_finite());
        assert_eq!(host, runs, "{kernel:?}");
        if runs == 1 {
            assert_eq!(chunks, 0, "{kernel:?}: the host loop, not the chunk loop");
        }
    }
}

/// `Kernel::Reference`: the chunks run the reference loss forward-only (the check without
/// autodiff of `check_linear`, which asserts that the chunk loop ran), and with gradients the
/// logits are materialised.
#[test]
fn reference_kernel_chunks_equal_the_materialised_loss() {
    let config = DistillLossConfig::new()
        .with_temperature(2.0)
        .with_alpha(0.6)
        .with_kernel(Kernel::Reference)
        .with_linear_chunk_rows(Some(2));
    check_linear(
        &config,
        &LinearCase::new(7, 5, 8, 13),
        TOL,
        &Dev::flex_f64(),
    );
}

#[test]
fn automatic_chunk_rows_come_from_the_memory_budget() {
    let device = Device::flex();
    let config = DistillLossConfig::new();
    let loss = config.init();
    // Three f32 [c, V] chunks within 64 MiB by default on Flex (0.1: on NdArray).
    assert_eq!(
        loss.linear_chunk_rows(128_256, &device),
        (64 << 20) / (3 * 4 * 128_256)
    );
    assert_eq!(loss.linear_chunk_rows(1 << 30, &device), 1);
    let budget = config.clone().with_linear_chunk_bytes(Some(1 << 30)).init();
    assert_eq!(
        budget.linear_chunk_rows(128_256, &device),
        (1 << 30) / (3 * 4 * 128_256)
    );
    let fixed = config.with_linear_chunk_rows(Some(7)).init();
    assert_eq!(fixed.linear_chunk_rows(128_256, &device), 7);
    // A tiny budget still computes (one row at a time).
    let tiny = DistillLossConfig::new()
        .with_linear_chunk_bytes(Some(1))
        .with_linear_chunk_rows(None);
    check_linear(&tiny, &LinearCase::new(5, 4, 6, 11), TOL, &Dev::flex_f64());
}

#[test]
fn sequence_form_equals_flattened_rows() {
    let dev = Dev::flex_f64();
    let (b, t, hs, ht, v) = (2, 3, 4, 6, 9);
    let loss = DistillLossConfig::new()
        .with_temperature(2.0)
        .with_linear_chunk_rows(Some(2))
        .init();
    let (sh, th) = (head(hs, v, 0.3, true, &dev), head(ht, v, 0.7, true, &dev));
    let hid = |h: usize, seed: f64| wave(b * t * h, seed);
    let (s, te) = (hid(hs, 0.11), hid(ht, 0.23));
    let y = vec![1, -100, 3, 8, 0, -100];
    let ((seq, flat), [host, _]) = counted(|| {
        let seq = loss.forward_linear_seq(
            dev.float(s.clone(), [b, t, hs]),
            &sh,
            dev.float(te.clone(), [b, t, ht]),
            &th,
            dev.ints(y.clone(), [b, t]),
        );
        let flat = loss.forward_linear(
            dev.float(s, [b * t, hs]),
            &sh,
            dev.float(te, [b * t, ht]),
            &th,
            dev.ints(y, [b * t]),
        );
        (seq, flat)
    });
    assert_eq!(host, 2, "both forms ran the host loop");
    assert_eq!(values_f64(seq), values_f64(flat));
}

#[test]
fn bad_shapes_and_targets_are_named() {
    let dev = Dev::flex_f64();
    let loss = DistillLossConfig::new().init();
    let (sh, th) = (head(4, 9, 0.3, true, &dev), head(6, 9, 0.7, true, &dev));
    let hidden = |n: usize, h: usize| dev.float(vec![0.0; n * h], [n, h]);
    let y = |v: Vec<i64>| dev.ints(v.clone(), [v.len()]);
    let err = |r: Result<DistillOutput, DistillError>| r.map(|_| ()).unwrap_err().to_string();
    let e = err(loss.try_forward_linear_parts(
        hidden(3, 5),
        &sh,
        hidden(3, 6),
        &th,
        Some(y(vec![0, 1, 2])),
    ));
    assert!(e.contains("student_hidden") && e.contains("[3, 5]"), "{e}");
    let e = err(loss.try_forward_linear_parts(
        hidden(3, 4),
        &sh,
        hidden(2, 6),
        &th,
        Some(y(vec![0, 1, 2])),
    ));
    assert!(e.contains("teacher_hidden") && e.contains("3 rows"), "{e}");
    let e = err(loss.try_forward_linear_parts(
        hidden(3, 4),
        &sh,
        hidden(3, 6),
        &th,
        Some(y(vec![0, 9, 2])),
    ));
    assert!(e.contains("targets[1] = 9"), "{e}");
    let other = head(6, 11, 0.7, true, &dev);
    let e = err(loss.try_forward_linear_parts(
        hidden(3, 4),
        &sh,
        hidden(3, 6),
        &other,
        Some(y(vec![0, 1, 2])),
    ));
    assert!(e.contains("teacher_head") && e.contains("11"), "{e}");
    // Sequences (0.2: `try_forward_linear_seq_parts`): a transposed teacher batch (same B·T
    // rows) and `[B, T]` targets of another shape are caught before the tokens are flattened.
    let e = err(loss.try_forward_linear_seq_parts(
        hidden(6, 4).reshape([2, 3, 4]),
        &sh,
        hidden(6, 6).reshape([3, 2, 6]),
        &th,
        None,
    ));
    assert!(
        e.contains("teacher_hidden") && e.contains("[3, 2, 6]"),
        "{e}"
    );
    let targets = dev.ints(vec![0, 1, 2, 0, 1, 2], [3, 2]);
    let e = err(loss.try_forward_linear_seq_parts(
        hidden(6, 4).reshape([2, 3, 4]),
        &sh,
        hidden(6, 6).reshape([2, 3, 6]),
        &th,
        Some(targets),
    ));
    assert!(
        e.contains("targets") && e.contains("[3, 2]") && e.contains("[2, 3]"),
        "{e}"
    );
}
