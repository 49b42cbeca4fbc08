//! Reductions, masking, sequence form, parts, and the teacher's lack of gradient (float64 on
//! Flex; 0.1 ran these on `Autodiff<NdArray<f64>>`).
#![cfg(feature = "flex")]

mod common;

use burn::tensor::Device;
use burn_distill::{DistillLossConfig, Divergence, Kernel, Reduction};
use common::{close, flex_autodiff, ints, tensor2_f64, values_f64 as values};

fn random(n: usize, v: usize, seed: f64) -> Vec<f64> {
    (0..n * v)
        .map(|i| 3.0 * ((i as f64 + seed) * 0.7311).sin() + ((i as f64) * seed).cos())
        .collect()
}

fn config() -> DistillLossConfig {
    DistillLossConfig::new()
        .with_temperature(3.0)
        .with_alpha(0.7)
        .with_divergence(Divergence::Jsd { beta: 0.3 })
        .with_label_smoothing(0.1)
}

/// Gradient accumulation: micro-batch losses `Normalized` by the global count of kept rows
/// (`num_items_in_batch`), or `Sum` divided by it, add up to the full-batch `Mean`, in value
/// and in gradient, on the fused kernel and on the reference.
#[test]
fn normalized_micro_batches_equal_full_batch_mean() {
    for kernel in [Kernel::Fused, Kernel::Reference] {
        for normalized in [true, false] {
            micro_batches_equal_full_batch_mean(kernel, normalized);
        }
    }
}

fn micro_batches_equal_full_batch_mean(kernel: Kernel, normalized: bool) {
    let device = flex_autodiff();
    let (n, v) = (8, 13);
    let s = random(n, v, 1.0);
    let t = random(n, v, 2.0);
    let targets = [3, -100, 0, 12, -100, 7, 7, 1];
    let kept = targets.iter().filter(|&&t| t != -100).count() as f64;

    let mean_loss = config()
        .with_reduction(Reduction::Mean)
        .with_kernel(kernel)
        .init();
    let student = tensor2_f64(&s, [n, v], &device).require_grad();
    let full = mean_loss.forward(
        student.clone(),
        tensor2_f64(&t, [n, v], &device),
        ints(&targets, &device),
    );
    let full_grad = values(student.grad(&full.backward()).unwrap());
    let full = values(full)[0];

    let (reduction, factor) = if normalized {
        let items = kept as u64;
        (Reduction::Normalized { items }, 1.0)
    } else {
        (Reduction::Sum, kept.recip())
    };
    let part_loss = mean_loss.with_reduction(reduction);
    let mut accumulated = 0.0;
    let mut grad = Vec::new();
    // Uneven micro-batches: 3 rows (one ignored) and 5 rows (one ignored).
    for rows in [0..3, 3..8] {
        let len = rows.len();
        let s_part = &s[rows.start * v..rows.end * v];
        let t_part = &t[rows.start * v..rows.end * v];
        let student = tensor2_f64(s_part, [len, v], &device).require_grad();
        let part = part_loss
            .forward(
                student.clone(),
                tensor2_f64(t_part, [len, v], &device),
                ints(&targets[rows], &device),
            )
            .mul_scalar(factor);
        grad.extend(values(student.grad(&part.backward()).unwrap()));
        accumulated += values(part)[0];
    }
    assert!(
        close(accumulated, full, 1e-12, 1e-10),
        "{kernel:?}, normalized {normalized}: {accumulated} vs {full}"
    );
    assert_eq!(grad.len(), full_grad.len());
    for (a, e) in grad.iter().zip(&full_grad) {
        assert!(
            close(*a, *e, 1e-14, 1e-10),
            "{kernel:?}, normalized {normalized}: {a} vs {e}"
        );
    }
}

#[test]
fn none_reduction_rows_average_to_mean() {
    let device = flex_autodiff();
    let (n, v) = (5, 6);
    let (s, t) = (random(n, v, 3.0), random(n, v, 4.0));
    let targets = [1, -100, 5, 0, 2];
    let rows = config().with_reduction(Reduction::PerRow).init().forward(
        tensor2_f64(&s, [n, v], &device),
        tensor2_f64(&t, [n, v], &device),
        ints(&targets, &device),
    );
    let rows = values(rows);
    assert_eq!(rows.len(), n);
    assert_eq!(rows[1], 0.0, "ignored row is 0");
    let mean = values(config().init().forward(
        tensor2_f64(&s, [n, v], &device),
        tensor2_f64(&t, [n, v], &device),
        ints(&targets, &device),
    ))[0];
    assert!(close(rows.iter().sum::<f64>() / 4.0, mean, 1e-12, 1e-12));
}

#[test]
fn all_ignored_batch_gives_zero_and_zero_gradient() {
    let device = flex_autodiff();
    let student = tensor2_f64(&random(3, 4, 5.0), [3, 4], &device).require_grad();
    let loss = config().init().forward(
        student.clone(),
        tensor2_f64(&random(3, 4, 6.0), [3, 4], &device),
        ints(&[-100, -100, -100], &device),
    );
    let grad = values(student.grad(&loss.backward()).unwrap());
    assert_eq!(values(loss), vec![0.0]);
    assert!(grad.iter().all(|g| *g == 0.0));
}

#[test]
fn parts_mix_to_the_loss() {
    let device = flex_autodiff();
    let (n, v) = (6, 9);
    let out = config().init().forward_parts(
        tensor2_f64(&random(n, v, 7.0), [n, v], &device),
        tensor2_f64(&random(n, v, 8.0), [n, v], &device),
        Some(ints(&[0, 8, -100, 4, 4, 2], &device)),
    );
    let (loss, soft, hard) = (
        values(out.loss)[0],
        values(out.soft)[0],
        values(out.hard.unwrap())[0],
    );
    assert!(soft > 0.0 && hard > 0.0);
    assert!(close(loss, 0.7 * soft + 0.3 * hard, 1e-12, 1e-12));
}

#[test]
fn sequence_form_equals_flattened_rows() {
    let device = flex_autodiff();
    let (b, t, v) = (2, 3, 7);
    let (s, te) = (random(b * t, v, 9.0), random(b * t, v, 10.0));
    let targets = [1, 2, -100, 6, 0, -100];
    let loss = config().init();
    let flat = values(loss.forward(
        tensor2_f64(&s, [b * t, v], &device),
        tensor2_f64(&te, [b * t, v], &device),
        ints(&targets, &device),
    ));
    let seq = values(loss.forward_seq(
        tensor2_f64(&s, [b * t, v], &device).reshape([b, t, v]),
        tensor2_f64(&te, [b * t, v], &device).reshape([b, t, v]),
        ints(&targets, &device).reshape([b, t]),
    ));
    assert_eq!(flat, seq);
    let soft_seq = values(loss.forward_seq_soft(
        tensor2_f64(&s, [b * t, v], &device).reshape([b, t, v]),
        tensor2_f64(&te, [b * t, v], &device).reshape([b, t, v]),
    ));
    let soft_flat = values(loss.forward_soft(
        tensor2_f64(&s, [b * t, v], &device),
        tensor2_f64(&te, [b * t, v], &device),
    ));
    assert_eq!(soft_seq, soft_flat);
}

#[test]
fn teacher_gets_no_gradient() {
    let device = flex_autodiff();
    let student = tensor2_f64(&random(2, 5, 1.5), [2, 5], &device).require_grad();
    let teacher = tensor2_f64(&random(2, 5, 2.5), [2, 5], &device).require_grad();
    let loss = config()
        .init()
        .forward(student.clone(), teacher.clone(), ints(&[1, 3], &device));
    let grads = loss.backward();
    assert!(student.grad(&grads).is_some());
    assert!(
        teacher.grad(&grads).is_none(),
        "the teacher must not receive a gradient"
    );
}

#[test]
fn ignore_index_none_keeps_every_row() {
    let device = flex_autodiff();
    let (n, v) = (3, 4);
    let (s, t) = (random(n, v, 11.0), random(n, v, 12.0));
    // Class 3 is a real class without an ignore index, an ignored row with `Some(3)`.
    let targets = [0, 3, 2];
    let forward = |config: DistillLossConfig| {
        values(config.init().forward(
            tensor2_f64(&s, [n, v], &device),
            tensor2_f64(&t, [n, v], &device),
            ints(&targets, &device),
        ))
    };
    let rows = forward(
        config()
            .with_ignore_index(None)
            .with_reduction(Reduction::PerRow),
    );
    assert!(rows.iter().all(|r| *r > 0.0), "every row counts: {rows:?}");
    let with_none = forward(config().with_ignore_index(None))[0];
    let mean_of_all = rows.iter().sum::<f64>() / 3.0;
    assert!(
        close(with_none, mean_of_all, 1e-14, 1e-12),
        "{with_none} vs {mean_of_all}"
    );
    let with_three = forward(config().with_ignore_index(Some(3)))[0];
    let mean_of_kept = (rows[0] + rows[2]) / 2.0;
    assert!(
        close(with_three, mean_of_kept, 1e-14, 1e-12),
        "{with_three} vs {mean_of_kept}"
    );
    assert!(
        (with_none - with_three).abs() > 1e-3,
        "the two settings must differ"
    );
}

/// `DistillLoss` sits in a burn `Module` as a plain field, like burn-nn's losses. (0.1 also
/// put the sparse and hidden-state losses there: todo with `SparseDistillLoss` and
/// `HiddenStateLoss`.)
#[test]
fn losses_are_module_fields() {
    use burn::module::Module;
    use burn_distill::{
        DistillLoss, HiddenStateLoss, HiddenStateLossConfig, SparseDistillLoss,
        SparseDistillLossConfig,
    };

    #[derive(Module, Debug)]
    struct Student {
        head: burn::nn::Linear,
        distill: DistillLoss,
        sparse: SparseDistillLoss,
        hidden: HiddenStateLoss,
    }

    let device = flex_autodiff();
    let model = Student {
        head: burn::nn::LinearConfig::new(4, 3).init(&device),
        distill: config().init(),
        sparse: SparseDistillLossConfig::new(config()).init(),
        hidden: HiddenStateLossConfig::new(4, 6).init(&device),
    };
    // The losses hold no parameters but the hidden-state projection's `[4, 6]` and bias.
    assert_eq!(model.num_params(), 4 * 3 + 3 + 4 * 6 + 6);
    let (s, t) = (random(2, 3, 1.0), random(2, 3, 2.0));
    let value = model.distill.forward(
        tensor2_f64(&s, [2, 3], &device),
        tensor2_f64(&t, [2, 3], &device),
        ints(&[0, 2], &device),
    );
    assert!(values(value)[0] > 0.0);
}

#[test]
fn padding_with_label_smoothing_stays_finite() {
    let device = flex_autodiff();
    let mut s = random(2, 6, 13.0);
    let mut t = random(2, 6, 14.0);
    for row in 0..2 {
        for col in 4..6 {
            s[row * 6 + col] = f64::NEG_INFINITY;
            t[row * 6 + col] = f64::NEG_INFINITY;
        }
    }
    for divergence in Divergence::ALL {
        let student = tensor2_f64(&s, [2, 6], &device).require_grad();
        let loss = config().with_divergence(divergence).init().forward(
            student.clone(),
            tensor2_f64(&t, [2, 6], &device),
            ints(&[0, 3], &device),
        );
        let grad = values(student.grad(&loss.backward()).unwrap());
        assert!(values(loss)[0].is_finite(), "{divergence:?}");
        assert!(
            grad.iter().all(|g| g.is_finite()),
            "{divergence:?}: {grad:?}"
        );
        assert!(
            grad.iter()
                .enumerate()
                .filter(|(i, _)| i % 6 >= 4)
                .all(|(_, g)| *g == 0.0)
        );

        // Padding changes nothing: same as the unpadded 4-column problem.
        let cut = |x: &[f64]| -> Vec<f64> { x.chunks(6).flat_map(|r| r[..4].to_vec()).collect() };
        let small = config().with_divergence(divergence).init().forward(
            tensor2_f64(&cut(&s), [2, 4], &device),
            tensor2_f64(&cut(&t), [2, 4], &device),
            ints(&[0, 3], &device),
        );
        let padded = config().with_divergence(divergence).init().forward(
            tensor2_f64(&s, [2, 6], &device),
            tensor2_f64(&t, [2, 6], &device),
            ints(&[0, 3], &device),
        );
        assert!(close(values(small)[0], values(padded)[0], 1e-12, 1e-12));
    }
}

#[test]
fn temperature_softmax_matches_definition() {
    let device = Device::flex();
    let x = tensor2_f64(&[1.0, 2.0, 4.0], [1, 3], &device);
    let p = values(burn_distill::temperature_softmax(x.clone(), 2.0, 1));
    let e: Vec<f64> = [0.5f64, 1.0, 2.0].iter().map(|z| z.exp()).collect();
    let z: f64 = e.iter().sum();
    for (a, b) in p.iter().zip(e.iter().map(|x| x / z)) {
        assert!(close(*a, b, 1e-15, 1e-12));
    }
    let lp = values(burn_distill::temperature_log_softmax(x, 2.0, 1));
    for (a, b) in lp.iter().zip(p.iter()) {
        assert!(close(*a, b.ln(), 1e-15, 1e-12));
    }
}
