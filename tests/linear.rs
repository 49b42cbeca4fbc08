//! The fused-linear loss (`forward_linear*`) equals `forward` on materialised logits, in f64 on
//! NdArray (fused and reference kernels): loss and the gradients of the student's hidden
//! states, head weight and bias; sequence form; bad input. f32 backends: tests/linear_f32.rs.
#![cfg(feature = "ndarray")]

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{Int, Tensor, TensorData};
use burn_distill::{DistillLossConfig, Kernel};
use common::linear::{LinearCase, assert_linear_golden, check_linear, head, sweep, wave};
use common::values;

type B = Autodiff<NdArray<f64>>;
const TOL: (f64, f64) = (1e-12, 1e-9);

#[test]
fn equals_the_materialised_loss_in_f64() {
    sweep::<B>(TOL, &Default::default());
}

#[test]
fn equals_float64_pytorch() {
    assert_linear_golden::<B>(TOL, &Default::default(), true);
}

/// The sequence form caps before the vocabulary alignment: `−∞` padding stays `−∞` (a cap
/// applied after it would give the padded columns `−c` and so probability mass).
#[test]
fn softcap_in_sequence_form_keeps_the_padding() {
    use burn_distill::VocabMismatch;
    let device = Default::default();
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
        Tensor::<B, 3>::from_data(TensorData::new(s.clone(), [b, t, 9]), &device),
        Tensor::<B, 3>::from_data(TensorData::new(te.clone(), [b, t, 7]), &device),
        Tensor::<B, 2, Int>::from_data(TensorData::new(y.clone(), [b, t]), &device),
    );
    let capped = |v: &[f64]| v.iter().map(|x| 2.0 * (x / 2.0).tanh()).collect::<Vec<_>>();
    let (sc, mut tc) = (capped(&s), Vec::new());
    for row in capped(&te).chunks(7) {
        tc.extend_from_slice(row);
        tc.extend_from_slice(&[f64::NEG_INFINITY; 2]);
    }
    let plain = DistillLossConfig::new().init().forward(
        Tensor::<B, 2>::from_data(TensorData::new(sc, [b * t, 9]), &device),
        Tensor::<B, 2>::from_data(TensorData::new(tc, [b * t, 9]), &device),
        Tensor::<B, 1, Int>::from_data(TensorData::new(y, [b * t]), &device),
    );
    let (a, e) = (values(seq)[0], values(plain)[0]);
    assert!((a - e).abs() < 1e-12 && a.is_finite(), "{a} vs {e}");
}

/// NdArray runs its host loop for the fused kernel (once per call), and the tensor-op chunks
/// for `Kernel::Reference`; the values agree either way, so only this count tells them apart.
#[test]
fn ndarray_runs_the_host_loop() {
    let device = Default::default();
    let case = LinearCase::new(7, 5, 8, 13);
    let (sh, th) = (
        head::<B>(case.hs, case.vs, 0.7, true, &device),
        head::<B>(case.ht, case.vt, 1.3, true, &device),
    );
    let hidden = |h: usize, seed: f64| {
        Tensor::<B, 2>::from_data(
            TensorData::new(wave(case.n * h, seed), [case.n, h]),
            &device,
        )
    };
    let targets = case.targets.clone().expect("targets");
    let y = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [case.n]), &device);
    let calls = burn_distill::internals::host_linear_calls;
    for (kernel, runs) in [
        (Kernel::Auto, 1),
        (Kernel::Fused, 1),
        (Kernel::Reference, 0),
    ] {
        let loss = DistillLossConfig::new()
            .with_kernel(kernel)
            .with_linear_chunk_rows(Some(3))
            .init();
        let before = calls();
        let value = loss.forward_linear(
            hidden(case.hs, 0.4).require_grad(),
            &sh,
            hidden(case.ht, 0.6),
            &th,
            y.clone(),
        );
        assert!(values(value)[0].is_finite());
        assert_eq!(calls() - before, runs, "{kernel:?}");
    }
}

/// `Kernel::Reference`: the chunks run the reference loss forward-only (the inner-backend
/// check of `check_linear`), and with gradients the logits are materialised.
#[test]
fn reference_kernel_chunks_equal_the_materialised_loss() {
    let config = DistillLossConfig::new()
        .with_temperature(2.0)
        .with_alpha(0.6)
        .with_kernel(Kernel::Reference)
        .with_linear_chunk_rows(Some(2));
    check_linear::<B>(
        &config,
        &LinearCase::new(7, 5, 8, 13),
        TOL,
        &Default::default(),
    );
}

#[test]
fn automatic_chunk_rows_come_from_the_memory_budget() {
    let config = DistillLossConfig::new();
    let loss = config.init();
    // Three f32 [c, V] chunks within 64 MiB by default on NdArray.
    assert_eq!(
        loss.linear_chunk_rows::<B>(128_256),
        (64 << 20) / (3 * 4 * 128_256)
    );
    assert_eq!(loss.linear_chunk_rows::<B>(1 << 30), 1);
    let budget = config.clone().with_linear_chunk_bytes(Some(1 << 30)).init();
    assert_eq!(
        budget.linear_chunk_rows::<B>(128_256),
        (1 << 30) / (3 * 4 * 128_256)
    );
    let fixed = config.with_linear_chunk_rows(Some(7)).init();
    assert_eq!(fixed.linear_chunk_rows::<B>(128_256), 7);
    // A tiny budget still computes (one row at a time).
    let tiny = DistillLossConfig::new()
        .with_linear_chunk_bytes(Some(1))
        .with_linear_chunk_rows(None);
    check_linear::<B>(
        &tiny,
        &LinearCase::new(5, 4, 6, 11),
        TOL,
        &Default::default(),
    );
}

#[test]
fn sequence_form_equals_flattened_rows() {
    let device = Default::default();
    let (b, t, hs, ht, v) = (2, 3, 4, 6, 9);
    let loss = DistillLossConfig::new()
        .with_temperature(2.0)
        .with_linear_chunk_rows(Some(2))
        .init();
    let (sh, th) = (
        head::<B>(hs, v, 0.3, true, &device),
        head::<B>(ht, v, 0.7, true, &device),
    );
    let hid = |h: usize, seed: f64| wave(b * t * h, seed);
    let (s, te) = (hid(hs, 0.11), hid(ht, 0.23));
    let y = vec![1, -100, 3, 8, 0, -100];
    let seq = loss.forward_linear_seq(
        Tensor::<B, 3>::from_data(TensorData::new(s.clone(), [b, t, hs]), &device),
        &sh,
        Tensor::<B, 3>::from_data(TensorData::new(te.clone(), [b, t, ht]), &device),
        &th,
        Tensor::<B, 2, Int>::from_data(TensorData::new(y.clone(), [b, t]), &device),
    );
    let flat = loss.forward_linear(
        Tensor::<B, 2>::from_data(TensorData::new(s, [b * t, hs]), &device),
        &sh,
        Tensor::<B, 2>::from_data(TensorData::new(te, [b * t, ht]), &device),
        &th,
        Tensor::<B, 1, Int>::from_data(TensorData::new(y, [b * t]), &device),
    );
    assert_eq!(values(seq), values(flat));
}

#[test]
fn bad_shapes_and_targets_are_named() {
    let device = Default::default();
    let loss = DistillLossConfig::new().init();
    let (sh, th) = (
        head::<B>(4, 9, 0.3, true, &device),
        head::<B>(6, 9, 0.7, true, &device),
    );
    let hidden = |n: usize, h: usize| Tensor::<B, 2>::zeros([n, h], &device);
    let y = |v: Vec<i64>| {
        Tensor::<B, 1, Int>::from_data(TensorData::new(v.clone(), [v.len()]), &device)
    };
    let err = |r: Result<_, burn_distill::DistillError>| {
        r.map(|_: burn_distill::DistillOutput<B>| ())
            .unwrap_err()
            .to_string()
    };
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
    let other = head::<B>(6, 11, 0.7, true, &device);
    let e = err(loss.try_forward_linear_parts(
        hidden(3, 4),
        &sh,
        hidden(3, 6),
        &other,
        Some(y(vec![0, 1, 2])),
    ));
    assert!(e.contains("teacher_head") && e.contains("11"), "{e}");
    // Sequences: a transposed teacher batch (same B·T rows) and `[B, T]` targets of
    // another shape are caught before the tokens are flattened.
    let e = err(loss.try_forward_linear_parts(
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
    let targets = Tensor::<B, 2, Int>::from_ints([[0, 1], [2, 0], [1, 2]], &device);
    let e = err(loss.try_forward_linear_parts(
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
