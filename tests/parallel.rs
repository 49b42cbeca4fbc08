//! The vocabulary-parallel loss against the unsharded loss: P = 1, 2, 4 local peers (threads
//! exchanging through `LocalExchange`) on Flex f32, every divergence, uneven shards, ignored
//! rows, `−∞` padding at the end of the last shard (a whole shard of it too), label smoothing,
//! every reduction and a per-row upstream gradient that is not 1. (0.1 ran the same checks on
//! burn-collective's local peers on `NdArray<f32>`.)
#![cfg(feature = "flex")]

use std::ops::Range;

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_distill::{
    DistillError, DistillLoss, DistillLossConfig, Divergence, LocalExchange, Reduction,
    RowExchange, Validation, VocabShard,
};

fn device() -> Device {
    Device::flex().autodiff()
}

/// A batch: `[N, V]` logits as rows of f32, `[N]` targets, per-row upstream weights.
#[derive(Clone)]
struct Batch {
    rows: usize,
    vocab: usize,
    student: Vec<f32>,
    teacher: Vec<f32>,
    targets: Vec<i64>,
    weights: Vec<f32>,
}

/// Deterministic pseudo-random logits (a small LCG; values in about [−6, 6]), with the last
/// `padding` columns `−∞` in both models and targets in `[0, vocab − padding)`, every 5th row
/// ignored (`−100`).
fn batch(rows: usize, vocab: usize, padding: usize, seed: u64) -> Batch {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f64 / (1u64 << 31) as f64) as f32
    };
    let mut logits = |spread: f32| {
        (0..rows * vocab)
            .map(|i| {
                let x = (next() - 0.5) * spread;
                if i % vocab >= vocab - padding {
                    f32::NEG_INFINITY
                } else {
                    x
                }
            })
            .collect::<Vec<_>>()
    };
    let student = logits(8.0);
    let teacher = logits(12.0);
    let real = (vocab - padding) as f32;
    let targets = (0..rows)
        .map(|i| {
            if i % 5 == 3 {
                -100
            } else {
                ((next() * real) as i64).min(real as i64 - 1)
            }
        })
        .collect();
    let weights = (0..rows).map(|i| 0.5 + 0.25 * (i % 4) as f32).collect();
    Batch {
        rows,
        vocab,
        student,
        teacher,
        targets,
        weights,
    }
}

/// Columns `cols` of row-major `[rows, vocab]` data.
fn columns(data: &[f32], rows: usize, vocab: usize, cols: &Range<usize>) -> Vec<f32> {
    (0..rows)
        .flat_map(|r| {
            data[r * vocab + cols.start..r * vocab + cols.end]
                .iter()
                .copied()
        })
        .collect()
}

fn ints(values: &[i64], device: &Device) -> Tensor<1, Int> {
    Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), device)
}

fn floats<const D: usize>(values: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn read<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.try_into_vec_as::<f32>().expect("f32 values")
}

/// The loss to backpropagate: `Σ_i w_i row_i` for `PerRow`, the value itself otherwise.
fn objective(loss: Tensor<1>, weights: &[f32], per_row: bool) -> Tensor<1> {
    if per_row {
        let w = floats(weights.to_vec(), [weights.len()], &loss.device());
        (loss * w).sum()
    } else {
        loss
    }
}

/// The unsharded loss value and student gradient.
fn unsharded(loss: &DistillLoss, b: &Batch, soft_only: bool) -> (Vec<f32>, Vec<f32>) {
    unsharded_on(&device(), loss, b, soft_only)
}

fn unsharded_on(
    device: &Device,
    loss: &DistillLoss,
    b: &Batch,
    soft_only: bool,
) -> (Vec<f32>, Vec<f32>) {
    let device = device.clone();
    let shape = [b.rows, b.vocab];
    let student = floats(b.student.clone(), shape, &device).require_grad();
    let teacher = floats(b.teacher.clone(), shape, &device);
    let value = if soft_only {
        loss.forward_soft(student.clone(), teacher)
    } else {
        loss.forward(student.clone(), teacher, ints(&b.targets, &device))
    };
    let per_row = loss.params().reduction() == Reduction::PerRow;
    let grads = objective(value.clone(), &b.weights, per_row).backward();
    let grad = student.grad(&grads).expect("the student has a gradient");
    (read(value), read(grad))
}

/// The loss on each of `shards.len()` peers (threads), and the peers' gradients put side by
/// side into one `[N, V]` gradient.
fn sharded(
    loss: &DistillLoss,
    b: &Batch,
    shards: &[Range<usize>],
    soft_only: bool,
) -> (Vec<Vec<f32>>, Vec<f32>) {
    sharded_on(&device(), loss, b, shards, soft_only)
}

fn sharded_on(
    device: &Device,
    loss: &DistillLoss,
    b: &Batch,
    shards: &[Range<usize>],
    soft_only: bool,
) -> (Vec<Vec<f32>>, Vec<f32>) {
    let peers = shards.len();
    let handles: Vec<_> = shards
        .iter()
        .cloned()
        .zip(LocalExchange::group(peers))
        .enumerate()
        .map(|(rank, (cols, exchange))| {
            let (loss, b, device) = (loss.clone(), b.clone(), device.clone());
            std::thread::spawn(move || {
                let shard = VocabShard::new(rank, peers, cols.start, b.vocab).unwrap();
                let shape = [b.rows, cols.len()];
                let cut =
                    |data: &[f32]| floats(columns(data, b.rows, b.vocab, &cols), shape, &device);
                let student = cut(&b.student).require_grad();
                let teacher = cut(&b.teacher);
                let value = if soft_only {
                    loss.forward_vocab_parallel_soft(student.clone(), teacher, &shard, &exchange)
                } else {
                    let targets = ints(&b.targets, &device);
                    loss.forward_vocab_parallel(
                        student.clone(),
                        teacher,
                        targets,
                        &shard,
                        &exchange,
                    )
                };
                let per_row = loss.params().reduction() == Reduction::PerRow;
                let grads = objective(value.clone(), &b.weights, per_row).backward();
                let grad = read(student.grad(&grads).unwrap());
                (read(value), grad)
            })
        })
        .collect();
    let outputs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut grad = vec![0.0; b.rows * b.vocab];
    for ((_, g), cols) in outputs.iter().zip(shards) {
        let width = cols.len();
        for r in 0..b.rows {
            grad[r * b.vocab + cols.start..r * b.vocab + cols.end]
                .copy_from_slice(&g[r * width..(r + 1) * width]);
        }
    }
    (outputs.into_iter().map(|(v, _)| v).collect(), grad)
}

/// `|a − b| ≤ atol + rtol·|b|`, element-wise (infinities must match exactly).
fn assert_close(what: &str, got: &[f32], want: &[f32], rtol: f32, atol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_finite() {
            (g - w).abs() <= atol + rtol * w.abs()
        } else {
            g == w || (g.is_nan() && w.is_nan())
        };
        assert!(ok, "{what}[{i}]: got {g}, expected {w}");
    }
}

/// Every peer's loss equals the unsharded loss, and the peers' gradients are its gradient.
fn check(loss: &DistillLoss, b: &Batch, shards: &[Range<usize>], soft_only: bool, what: &str) {
    check_on(&device(), loss, b, shards, soft_only, what)
}

fn check_on(
    device: &Device,
    loss: &DistillLoss,
    b: &Batch,
    shards: &[Range<usize>],
    soft_only: bool,
    what: &str,
) {
    let (want_value, want_grad) = unsharded_on(device, loss, b, soft_only);
    let (values, grad) = sharded_on(device, loss, b, shards, soft_only);
    for (rank, value) in values.iter().enumerate() {
        assert_close(
            &format!("{what}: loss of peer {rank}"),
            value,
            &want_value,
            2e-5,
            1e-6,
        );
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(value),
            bits(&values[0]),
            "{what}: every peer returns the same loss, bit for bit"
        );
    }
    assert_close(&format!("{what}: gradient"), &grad, &want_grad, 1e-4, 2e-7);
    assert!(
        want_grad.iter().any(|g| g.abs() > 1e-3),
        "{what}: a gradient to compare"
    );
}

fn balanced(vocab: usize, peers: usize) -> Vec<Range<usize>> {
    (0..peers)
        .map(|rank| VocabShard::balanced_range(vocab, peers, rank).unwrap())
        .collect()
}

fn config() -> DistillLossConfig {
    DistillLossConfig::new()
        .with_temperature(2.0)
        .with_alpha(0.7)
        .with_ignore_index(Some(-100))
}

#[test]
fn every_divergence_on_one_two_and_four_peers_with_uneven_shards() {
    let b = batch(13, 37, 0, 1);
    for divergence in Divergence::ALL {
        let loss = config().with_divergence(divergence).init();
        for peers in [1, 2, 4] {
            check(
                &loss,
                &b,
                &balanced(b.vocab, peers),
                false,
                &format!("{divergence:?}, P = {peers}"),
            );
        }
    }
}

#[test]
fn padding_at_the_end_of_the_last_shard_and_a_shard_of_padding_only() {
    // V = 16 over 4 peers: the last shard (12..16) is all −∞ padding; over 3 peers (6, 5, 5)
    // the last shard ends in it.
    let b = batch(11, 16, 4, 2);
    for divergence in Divergence::ALL {
        for smoothing in [0.0, 0.1] {
            let loss = config()
                .with_divergence(divergence)
                .with_label_smoothing(smoothing)
                .init();
            for peers in [3, 4] {
                check(
                    &loss,
                    &b,
                    &balanced(b.vocab, peers),
                    false,
                    &format!("{divergence:?}, ε = {smoothing}, P = {peers}, padded"),
                );
            }
        }
    }
}

#[test]
fn every_reduction_soft_only_and_alpha_zero_and_one() {
    let b = batch(9, 23, 0, 3);
    let shards = [0..5, 5..17, 17..23];
    for reduction in [
        Reduction::Mean,
        Reduction::Sum,
        Reduction::Normalized { items: 20 },
        Reduction::PerRow,
    ] {
        let loss = config()
            .with_divergence(Divergence::Jsd { beta: 0.3 })
            .with_reduction(reduction)
            .init();
        check(&loss, &b, &shards, false, &format!("{reduction:?}"));
        check(
            &loss,
            &b,
            &shards,
            true,
            &format!("{reduction:?}, soft only"),
        );
    }
    for alpha in [0.0, 1.0] {
        let loss = config().with_alpha(alpha).with_scale_by_t2(false).init();
        check(&loss, &b, &shards, false, &format!("alpha = {alpha}"));
    }
}

#[test]
fn logit_softcap_is_applied_to_each_shard() {
    let b = batch(6, 20, 0, 4);
    let loss = config().with_logit_softcap(Some(3.0)).init();
    check(&loss, &b, &balanced(20, 2), false, "soft-capped");
}

#[test]
fn shard_errors_name_the_argument() {
    let bad = VocabShard::new(2, 2, 0, 10);
    assert!(
        matches!(bad, Err(DistillError::InvalidArgument { ref argument, .. }) if argument == "rank")
    );
    let bad = VocabShard::new(0, 1, 10, 10);
    assert!(
        matches!(bad, Err(DistillError::InvalidArgument { ref argument, .. }) if argument == "offset")
    );
    assert_eq!(VocabShard::balanced_range(10, 4, 0), Ok(0..3));
    assert_eq!(VocabShard::balanced_range(10, 4, 1), Ok(3..6));
    assert_eq!(VocabShard::balanced_range(10, 4, 3), Ok(8..10));
    for (vocab, peers, rank, argument) in
        [(10, 4, 4, "rank"), (10, 0, 0, "peers"), (3, 4, 0, "vocab")]
    {
        let err = VocabShard::balanced_range(vocab, peers, rank).unwrap_err();
        assert!(
            matches!(err, DistillError::InvalidArgument { argument: ref a, .. } if a == argument),
            "{err}"
        );
    }

    // Checked before any communication: the other peer of the group is gone (its handle
    // dropped), so a call that reached the exchange would fail with a collective error.
    let exchange = LocalExchange::group(2).into_iter().nth(1).unwrap();
    let device = device();
    let loss = config().init();
    let shard = VocabShard::new(1, 2, 8, 10).unwrap();
    let student = Tensor::<2>::zeros([2, 3], &device);
    let err = loss
        .try_forward_vocab_parallel_parts(student.clone(), student.clone(), None, &shard, &exchange)
        .unwrap_err();
    assert!(err.to_string().contains("student_shard"), "{err}");
    let teacher = Tensor::<2>::zeros([2, 2], &device);
    let err = loss
        .try_forward_vocab_parallel_parts(
            student.slice([0..2, 0..2]),
            teacher.clone().slice([0..1, 0..2]),
            None,
            &shard,
            &exchange,
        )
        .unwrap_err();
    assert!(err.to_string().contains("teacher_shard"), "{err}");
    let targets = ints(&[1, 10], &device);
    let err = loss
        .try_forward_vocab_parallel_parts(
            teacher.clone(),
            teacher,
            Some(targets),
            &shard,
            &exchange,
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            DistillError::TargetOutOfRange {
                row: 1,
                value: 10,
                classes: 10,
                ..
            }
        ),
        "{err}"
    );

    // The fused-linear form: heads of different widths; PerRow when the student is trained.
    let (w, b) = (vec![0.5; 3 * 10], vec![0.0; 10]);
    let (h1, h2) = (head(&w, &b, 3, 10, &(8..10)), head(&w, &b, 3, 10, &(7..10)));
    let x = Tensor::<2>::ones([2, 3], &device).require_grad();
    let err = loss
        .try_forward_linear_vocab_parallel_parts(
            x.clone(),
            &h1,
            x.clone(),
            &h2,
            None,
            &shard,
            &exchange,
        )
        .unwrap_err();
    assert!(err.to_string().contains("teacher_head"), "{err}");
    let per_row = config().with_reduction(Reduction::PerRow).init();
    let err = per_row
        .try_forward_linear_vocab_parallel_parts(x.clone(), &h1, x, &h1, None, &shard, &exchange)
        .unwrap_err();
    assert!(err.to_string().contains("PerRow"), "{err}");
}

/// A `Linear` layer `[h → cols]` cut from row-major `[h, vocab]` weights and a `[vocab]` bias.
fn head(weight: &[f32], bias: &[f32], h: usize, vocab: usize, cols: &Range<usize>) -> Linear {
    head_on(&device(), weight, bias, h, vocab, cols)
}

fn head_on(
    device: &Device,
    weight: &[f32],
    bias: &[f32],
    h: usize,
    vocab: usize,
    cols: &Range<usize>,
) -> Linear {
    let device = device.clone();
    Linear {
        weight: Param::from_tensor(floats(
            columns(weight, h, vocab, cols),
            [h, cols.len()],
            &device,
        )),
        bias: Some(Param::from_tensor(floats(
            bias[cols.clone()].to_vec(),
            [cols.len()],
            &device,
        ))),
    }
}

/// The fused-linear loss with heads sliced over the peers equals `forward_linear` on the whole
/// heads: loss, the hidden states' (full) gradient on every peer, and each peer's columns of
/// the weight and bias gradients.
#[test]
fn fused_linear_with_vocabulary_parallel_heads() {
    let cases = [
        (Divergence::ForwardKl, None),
        (Divergence::Jsd { beta: 0.5 }, None),
        (Divergence::ReverseKl, Some(3.0)),
        (Divergence::Tvd, Some(3.0)),
    ];
    fused_linear_on(&device(), &cases, &[2, 3]);
}

fn fused_linear_on(device: &Device, cases: &[(Divergence, Option<f64>)], peer_counts: &[usize]) {
    let (n, hs, ht, vocab) = (11, 5, 7, 29);
    let values = |len: usize, seed: u64, spread: f32| {
        batch(1, len, 0, seed)
            .student
            .iter()
            .map(|x| x * spread / 8.0)
            .collect::<Vec<f32>>()
    };
    let (h_s, h_t) = (values(n * hs, 5, 2.0), values(n * ht, 6, 2.0));
    let (w_s, w_t) = (values(hs * vocab, 7, 1.5), values(ht * vocab, 8, 2.5));
    let (b_s, b_t) = (values(vocab, 9, 1.0), values(vocab, 10, 1.0));
    let targets = batch(n, vocab, 0, 11).targets;
    let head = |weight: &[f32], bias: &[f32], h: usize, vocab: usize, cols: &Range<usize>| {
        head_on(device, weight, bias, h, vocab, cols)
    };
    for &(divergence, softcap) in cases {
        // Chunks of 4 rows: several per call, the last one short.
        let loss = config()
            .with_divergence(divergence)
            .with_logit_softcap(softcap)
            .with_linear_chunk_rows(Some(4))
            .init();
        let hidden = |data: &[f32], width: usize| floats(data.to_vec(), [n, width], device);
        let whole = 0..vocab;
        let (student_head, teacher_head) = (
            head(&w_s, &b_s, hs, vocab, &whole),
            head(&w_t, &b_t, ht, vocab, &whole),
        );
        let x = hidden(&h_s, hs).require_grad();
        let y = ints(&targets, device);
        let want =
            loss.forward_linear(x.clone(), &student_head, hidden(&h_t, ht), &teacher_head, y);
        let grads = want.backward();
        let want = want.into_scalar::<f32>();
        let want_x = read(x.grad(&grads).unwrap());
        let want_w = read(student_head.weight.val().grad(&grads).unwrap());
        let want_b = read(
            student_head
                .bias
                .as_ref()
                .unwrap()
                .val()
                .grad(&grads)
                .unwrap(),
        );

        for &peers in peer_counts {
            let handles: Vec<_> = LocalExchange::group(peers)
                .into_iter()
                .enumerate()
                .map(|(rank, exchange)| {
                    let (loss, targets, device) = (loss.clone(), targets.clone(), device.clone());
                    let (h_s, h_t, w_s, w_t, b_s, b_t) = (
                        h_s.clone(),
                        h_t.clone(),
                        w_s.clone(),
                        w_t.clone(),
                        b_s.clone(),
                        b_t.clone(),
                    );
                    std::thread::spawn(move || {
                        let cols = VocabShard::balanced_range(vocab, peers, rank).unwrap();
                        let shard = VocabShard::balanced(rank, peers, vocab).unwrap();
                        let (student_head, teacher_head) = (
                            head_on(&device, &w_s, &b_s, hs, vocab, &cols),
                            head_on(&device, &w_t, &b_t, ht, vocab, &cols),
                        );
                        let x = floats(h_s, [n, hs], &device).require_grad();
                        let t = floats(h_t, [n, ht], &device);
                        let y = ints(&targets, &device);
                        let value = loss.forward_linear_vocab_parallel(
                            x.clone(),
                            &student_head,
                            t,
                            &teacher_head,
                            y,
                            &shard,
                            &exchange,
                        );
                        let grads = value.backward();
                        let gx = read(x.grad(&grads).unwrap());
                        let gw = read(student_head.weight.val().grad(&grads).unwrap());
                        let gb = read(
                            student_head
                                .bias
                                .as_ref()
                                .unwrap()
                                .val()
                                .grad(&grads)
                                .unwrap(),
                        );
                        (cols, value.into_scalar::<f32>(), gx, gw, gb)
                    })
                })
                .collect();
            for handle in handles {
                let (cols, value, gx, gw, gb) = handle.join().unwrap();
                let what =
                    format!("{divergence:?}, cap {softcap:?}, P = {peers}, columns {cols:?}");
                assert_close(&format!("{what}: loss"), &[value], &[want], 2e-5, 1e-6);
                assert_close(
                    &format!("{what}: hidden gradient"),
                    &gx,
                    &want_x,
                    1e-4,
                    1e-6,
                );
                assert_close(
                    &format!("{what}: weight gradient"),
                    &gw,
                    &columns(&want_w, hs, vocab, &cols),
                    1e-4,
                    1e-6,
                );
                assert_close(
                    &format!("{what}: bias gradient"),
                    &gb,
                    &want_b[cols.clone()],
                    1e-4,
                    1e-6,
                );
            }
        }
    }
}

/// A teacher shifted by +200 (softmax ignores it; the one-exchange KLs must not lose
/// precision to it), padding in the teacher only (the student is finite there), and unchecked
/// out-of-range targets (NaN rows with zero gradient, as the unsharded loss).
#[test]
fn shifted_teacher_teacher_only_padding_and_unchecked_bad_targets() {
    let mut b = batch(9, 31, 0, 12);
    b.teacher.iter_mut().for_each(|x| *x += 200.0);
    for divergence in Divergence::ALL {
        let loss = config().with_divergence(divergence).init();
        check(
            &loss,
            &b,
            &balanced(31, 3),
            false,
            &format!("{divergence:?}, teacher + 200"),
        );
    }

    let mut b = batch(9, 31, 0, 13);
    for (i, x) in b.teacher.iter_mut().enumerate() {
        if i % 31 >= 27 {
            *x = f32::NEG_INFINITY;
        }
    }
    for divergence in Divergence::ALL {
        // Reverse KL is infinite where the teacher is 0 and the student is not.
        if divergence == Divergence::ReverseKl {
            continue;
        }
        let loss = config().with_divergence(divergence).init();
        check(
            &loss,
            &b,
            &balanced(31, 3),
            false,
            &format!("{divergence:?}, teacher padding"),
        );
    }

    let mut b = batch(9, 31, 0, 14);
    b.targets[2] = 31;
    b.targets[6] = -7;
    let loss = config()
        .with_reduction(Reduction::PerRow)
        .with_validation(Validation::Off)
        .init();
    let (values, _) = sharded(&loss, &b, &balanced(31, 2), false);
    assert!(
        values[0][2].is_nan() && values[0][6].is_nan(),
        "{:?}",
        values[0]
    );
    check(
        &loss,
        &b,
        &balanced(31, 2),
        false,
        "unchecked out-of-range targets",
    );
}

/// Shards that overlap or leave a gap: every peer fails with the same error (none is left
/// waiting in an exchange), naming the shards.
#[test]
fn shards_that_do_not_tile_the_vocabulary_fail_on_every_peer() {
    let b = batch(4, 20, 0, 15);
    for shards in [vec![0..12, 10..20], vec![0..9, 10..20], vec![0..10, 10..19]] {
        let handles: Vec<_> = shards
            .iter()
            .cloned()
            .zip(LocalExchange::group(2))
            .enumerate()
            .map(|(rank, (cols, exchange))| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let device = device();
                    let shard = VocabShard::new(rank, 2, cols.start, 20).unwrap();
                    let cut = |data: &[f32]| {
                        floats(
                            columns(data, b.rows, 20, &cols),
                            [b.rows, cols.len()],
                            &device,
                        )
                    };
                    let out = self::config().init().try_forward_vocab_parallel_parts(
                        cut(&b.student),
                        cut(&b.teacher),
                        None,
                        &shard,
                        &exchange,
                    );
                    out.map(|o| o.loss.into_scalar::<f32>())
                        .map_err(|e| e.to_string())
                })
            })
            .collect();
        for (rank, handle) in handles.into_iter().enumerate() {
            let err = handle.join().unwrap().unwrap_err();
            assert!(
                err.contains("vocabulary shards") && err.contains("rank 1: columns"),
                "{shards:?}, peer {rank}: {err}"
            );
        }
    }
}

// New in 0.2: the exchange itself.

/// `LocalExchange` over many rounds: every peer gets the same sum (added in rank order, in
/// f64), in its input's dtype; different lengths fail on every peer alike; a peer whose handle
/// is gone fails the others' calls instead of leaving them waiting.
#[test]
fn local_exchange_sums_every_round_and_fails_alike() {
    for peers in [1, 2, 4] {
        let handles: Vec<_> = LocalExchange::group(peers)
            .into_iter()
            .map(|exchange| {
                std::thread::spawn(move || {
                    let device = Device::flex();
                    let r = exchange.rank() as f32;
                    assert_eq!(exchange.peers(), peers);
                    (0..50)
                        .map(|round| {
                            let values = floats(vec![1.0, r, round as f32 * r], [3], &device);
                            read(exchange.sum(values).unwrap())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let ranks = (0..peers).map(|r| r as f32).sum::<f32>();
        for handle in handles {
            for (round, sum) in handle.join().unwrap().into_iter().enumerate() {
                assert_eq!(
                    sum,
                    [peers as f32, ranks, round as f32 * ranks],
                    "P = {peers}"
                );
            }
        }
    }

    // f64 stays f64: 1 + 2⁻⁴⁰ survives the sum.
    let exchange = LocalExchange::group(1).pop().unwrap();
    let x = Tensor::<1>::from_data(
        TensorData::new(vec![1.0f64 + 2f64.powi(-40)], [1]),
        (&Device::flex(), burn::tensor::DType::F64),
    );
    let sum = exchange.sum(x).unwrap();
    assert_eq!(sum.dtype(), burn::tensor::DType::F64);
    assert_eq!(
        sum.try_into_vec_as::<f64>().unwrap(),
        [1.0 + 2f64.powi(-40)]
    );

    let handles: Vec<_> = LocalExchange::group(2)
        .into_iter()
        .map(|exchange| {
            std::thread::spawn(move || {
                let len = 2 + exchange.rank();
                let values = Tensor::<1>::zeros([len], &Device::flex());
                exchange.sum(values).unwrap_err().to_string()
            })
        })
        .collect();
    for handle in handles {
        let err = handle.join().unwrap();
        assert!(err.contains("different lengths (by rank: [2, 3])"), "{err}");
    }

    let mut group = LocalExchange::group(3);
    let last = group.pop().unwrap();
    let waiting: Vec<_> = group
        .into_iter()
        .map(|exchange| {
            std::thread::spawn(move || {
                let values = Tensor::<1>::ones([2], &Device::flex());
                exchange.sum(values).unwrap_err().to_string()
            })
        })
        .collect();
    drop(last);
    for handle in waiting {
        let err = handle.join().unwrap();
        assert!(err.contains("peer 2 of the local group left"), "{err}");
    }
}

/// An exchange that fails: the loss returns `DistillError::Collective` naming its step and the
/// exchange's own operation.
#[test]
fn a_failing_exchange_is_a_collective_error_naming_the_step() {
    struct Broken;
    impl RowExchange for Broken {
        fn sum(&self, _: Tensor<1>) -> Result<Tensor<1>, DistillError> {
            Err(DistillError::Collective {
                operation: "ring all-reduce".into(),
                message: "connection reset".into(),
            })
        }
    }
    let device = device();
    let b = batch(3, 8, 0, 16);
    let shard = VocabShard::balanced(0, 2, 8).unwrap();
    let cut = |data: &[f32]| floats(columns(data, 3, 8, &(0..4)), [3, 4], &device);
    let err = config()
        .init()
        .try_forward_vocab_parallel(
            cut(&b.student),
            cut(&b.teacher),
            ints(&b.targets, &device),
            &shard,
            &Broken,
        )
        .unwrap_err();
    assert_eq!(
        err,
        DistillError::Collective {
            operation: "all-gather of the row statistics (ring all-reduce)".into(),
            message: "connection reset".into(),
        }
    );
    assert_eq!(
        err.to_string(),
        "collective all-gather of the row statistics (ring all-reduce) failed: connection reset"
    );
}

/// Without autodiff (a device without it, or logits that are not tracked), the loss is the
/// same value and nothing is attached; soft and hard parts mix to the loss.
#[test]
fn untracked_logits_and_parts() {
    let b = batch(7, 19, 0, 17);
    let loss = config().with_divergence(Divergence::Tvd).init();
    let (want, _) = unsharded(&loss, &b, false);
    for device in [Device::flex(), device()] {
        let handles: Vec<_> = LocalExchange::group(2)
            .into_iter()
            .enumerate()
            .map(|(rank, exchange)| {
                let (b, loss, device) = (b.clone(), loss.clone(), device.clone());
                std::thread::spawn(move || {
                    let cols = VocabShard::balanced_range(19, 2, rank).unwrap();
                    let shard = VocabShard::balanced(rank, 2, 19).unwrap();
                    let cut = |data: &[f32]| {
                        floats(columns(data, 7, 19, &cols), [7, cols.len()], &device)
                    };
                    let out = loss.forward_vocab_parallel_parts(
                        cut(&b.student),
                        cut(&b.teacher),
                        Some(ints(&b.targets, &device)),
                        &shard,
                        &exchange,
                    );
                    assert!(!out.loss.is_tracked());
                    assert_eq!(out.loss.is_autodiff(), device.is_autodiff());
                    let (soft, hard) = (read(out.soft), read(out.hard.unwrap()));
                    (read(out.loss), soft, hard)
                })
            })
            .collect();
        for handle in handles {
            let (value, soft, hard) = handle.join().unwrap();
            assert_close("untracked loss", &value, &want, 2e-5, 1e-6);
            let mixed = 0.7 * soft[0] + 0.3 * hard[0];
            assert_close("parts mix to the loss", &[mixed], &value, 2e-6, 1e-7);
        }
    }
}

/// The same on wgpu (the shard math as CubeCL tensor ops; the unsharded loss by wgpu's fused
/// kernel): every divergence on 2 peers, with label smoothing and a `PerRow` upstream.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_peers_equal_the_unsharded_loss() {
    let device = burn_distill::testing::wgpu_device().autodiff();
    let b = batch(13, 37, 0, 18);
    for divergence in Divergence::ALL {
        let loss = config()
            .with_divergence(divergence)
            .with_label_smoothing(0.1)
            .init();
        let what = format!("wgpu, {divergence:?}, P = 2");
        check_on(&device, &loss, &b, &balanced(37, 2), false, &what);
    }
    let loss = config().with_reduction(Reduction::PerRow).init();
    check_on(
        &device,
        &loss,
        &b,
        &balanced(37, 3),
        false,
        "wgpu, PerRow, P = 3",
    );
    // The fused-linear form, against wgpu's own fused-linear loss.
    fused_linear_on(&device, &[(Divergence::Jsd { beta: 0.5 }, Some(3.0))], &[2]);
}
