//! Finite-difference gradient checks (f64 on Flex; 0.1 ran these on `Autodiff<NdArray<f64>>`)
//! of every divergence and of the full loss.
#![cfg(feature = "flex")]

mod common;

use burn_distill::{DistillLossConfig, Divergence, Kernel, Reduction};
use common::{flex_autodiff, ints, tensor2_f64 as tensor2, values_f64 as values};

fn logits(n: usize, v: usize, seed: f64) -> Vec<f64> {
    (0..n * v)
        .map(|i| 2.5 * ((i as f64 + 1.0) * seed).sin() + 0.5 * ((i as f64) * 0.37).cos())
        .collect()
}

/// Compares autodiff's student gradient with central differences of the scalar loss.
fn check(config: DistillLossConfig, targets: Option<&[i64]>) {
    for kernel in [Kernel::Reference, Kernel::Fused] {
        check_kernel(config.clone().with_kernel(kernel), targets);
    }
}

fn check_kernel(config: DistillLossConfig, targets: Option<&[i64]>) {
    let (n, v) = (3, 7);
    let device = flex_autodiff();
    let s = logits(n, v, 0.91);
    let t = logits(n, v, 1.37);
    let loss = config.clone().with_reduction(Reduction::Sum).init();
    let eval = |s: &[f64]| -> (f64, Vec<f64>) {
        let student = tensor2(s, [n, v], &device).require_grad();
        let teacher = tensor2(&t, [n, v], &device);
        let value = match targets {
            Some(y) => loss.forward(student.clone(), teacher, ints(y, &device)),
            None => loss.forward_soft(student.clone(), teacher),
        };
        let grad = values(student.grad(&value.backward()).unwrap());
        (values(value)[0], grad)
    };
    let (_, grad) = eval(&s);
    let h = 1e-6;
    for k in 0..n * v {
        let mut plus = s.clone();
        let mut minus = s.clone();
        plus[k] += h;
        minus[k] -= h;
        let fd = (eval(&plus).0 - eval(&minus).0) / (2.0 * h);
        assert!(
            (fd - grad[k]).abs() <= 1e-7 + 1e-6 * fd.abs(),
            "{config:?} element {k}: autodiff {} vs finite difference {fd}",
            grad[k]
        );
    }
}

/// Every divergence, and two more mixture weights.
fn all() -> impl Iterator<Item = Divergence> {
    Divergence::ALL.into_iter().chain([
        Divergence::Jsd { beta: 0.2 },
        Divergence::SkewReverseKl { lambda: 0.4 },
    ])
}

#[test]
fn soft_term_of_every_divergence() {
    for d in all() {
        check(
            DistillLossConfig::new()
                .with_divergence(d)
                .with_temperature(2.0),
            None,
        );
    }
}

#[test]
fn full_loss_of_every_divergence_with_ignored_row_and_smoothing() {
    for d in all() {
        check(
            DistillLossConfig::new()
                .with_divergence(d)
                .with_temperature(3.0)
                .with_alpha(0.6)
                .with_label_smoothing(0.15),
            Some(&[2, -100, 6]),
        );
    }
}

#[test]
fn hard_term_alone() {
    check(
        DistillLossConfig::new()
            .with_alpha(0.0)
            .with_label_smoothing(0.2),
        Some(&[0, 3, 6]),
    );
}

#[test]
fn non_integer_temperature_with_labels() {
    for d in all() {
        check(
            DistillLossConfig::new()
                .with_divergence(d)
                .with_temperature(2.5)
                .with_alpha(0.3),
            Some(&[1, 4, 0]),
        );
    }
}
