//! Hidden-state losses: values, masking, projection, gradients, bad input (float64 on Flex;
//! 0.1 ran these on `Autodiff<NdArray<f64>>`).
#![cfg(feature = "flex")]

mod common;

use std::sync::OnceLock;

use burn::module::Module;
use burn::tensor::{Bool, DType, Device, FloatDType, Tensor, TensorData};
use burn_distill::{HiddenLossKind, HiddenStateLossConfig};
use common::{close, tensor2_f64 as tensor2, values_f64 as values};

/// Flex with autodiff and float64 as its default float dtype, so that the projection's
/// parameters are float64 too (configured once, before this binary creates any tensor: every
/// test gets its device here).
fn flex_autodiff() -> Device {
    static CONFIGURED: OnceLock<()> = OnceLock::new();
    CONFIGURED.get_or_init(|| {
        Device::flex()
            .configure(FloatDType::F64)
            .expect("Flex configured before its first tensor");
    });
    Device::flex().autodiff()
}

fn rows(n: usize, h: usize, seed: f64) -> Vec<f64> {
    (0..n * h)
        .map(|i| ((i as f64 + 1.0) * seed).sin())
        .collect()
}

fn mask(keep: &[bool], device: &Device) -> Tensor<1, Bool> {
    Tensor::from_data(TensorData::new(keep.to_vec(), [keep.len()]), device)
}

#[test]
fn mse_and_cosine_match_their_definitions_with_a_mask() {
    let device = flex_autodiff();
    let (s, t) = (rows(3, 4, 0.7), rows(3, 4, 1.3));
    let keep = [true, false, true];
    let per_row = |f: &dyn Fn(&[f64], &[f64]) -> f64| -> f64 {
        let kept: Vec<f64> = (0..3)
            .filter(|&i| keep[i])
            .map(|i| f(&s[i * 4..i * 4 + 4], &t[i * 4..i * 4 + 4]))
            .collect();
        kept.iter().sum::<f64>() / kept.len() as f64
    };
    let mse = per_row(&|a, b| a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>() / 4.0);
    let cosine = per_row(&|a, b| {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
        let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
        1.0 - dot / (na * nb)
    });
    for (kind, expected) in [(HiddenLossKind::Mse, mse), (HiddenLossKind::Cosine, cosine)] {
        let loss = HiddenStateLossConfig::new(4, 4)
            .with_kind(kind)
            .init(&device);
        let value = loss.forward(
            tensor2(&s, [3, 4], &device),
            tensor2(&t, [3, 4], &device),
            Some(mask(&keep, &device)),
        );
        assert!(close(values(value)[0], expected, 1e-12, 1e-10), "{kind:?}");
    }
}

#[test]
fn projection_is_learned_when_widths_differ_and_the_teacher_gets_no_gradient() {
    let device = flex_autodiff();
    let loss = HiddenStateLossConfig::new(3, 5).init(&device);
    assert_eq!(loss.num_params(), 3 * 5 + 5, "a 3 → 5 linear projection");
    let same = HiddenStateLossConfig::new(5, 5).init(&device);
    assert_eq!(same.num_params(), 0, "no projection for equal widths");

    let student = tensor2(&rows(2, 3, 0.4), [2, 3], &device).require_grad();
    let teacher = tensor2(&rows(2, 5, 0.9), [2, 5], &device).require_grad();
    let grads = loss
        .forward(student.clone(), teacher.clone(), None)
        .backward();
    assert!(student.grad(&grads).is_some());
    assert!(teacher.grad(&grads).is_none());
}

#[test]
fn zero_vectors_and_all_masked_rows_give_no_nan() {
    let device = flex_autodiff();
    let loss = HiddenStateLossConfig::new(3, 3)
        .with_kind(HiddenLossKind::Cosine)
        .init(&device);
    let student = Tensor::<2>::zeros([2, 3], (&device, DType::F64)).require_grad();
    let value = loss.forward(
        student.clone(),
        tensor2(&rows(2, 3, 0.5), [2, 3], &device),
        None,
    );
    let grad = values(student.grad(&value.backward()).unwrap());
    assert_eq!(values(value), vec![1.0]);
    assert!(grad.iter().all(|g| g.is_finite()));
    let none = loss.forward(
        tensor2(&rows(2, 3, 0.2), [2, 3], &device),
        tensor2(&rows(2, 3, 0.5), [2, 3], &device),
        Some(mask(&[false, false], &device)),
    );
    assert_eq!(values(none), vec![0.0]);
}

#[test]
fn bad_shapes_name_the_argument() {
    let device = flex_autodiff();
    let loss = HiddenStateLossConfig::new(3, 5).init(&device);
    let err = |s: [usize; 2], t: [usize; 2], m: Option<usize>| {
        loss.try_forward(
            Tensor::zeros(s, (&device, DType::F64)),
            Tensor::zeros(t, (&device, DType::F64)),
            m.map(|n| mask(&vec![true; n], &device)),
        )
        .unwrap_err()
        .to_string()
    };
    let e = err([2, 4], [2, 5], None);
    assert!(
        e.contains("student_hidden") && e.contains("[2, 4]") && e.contains("[N, 3]"),
        "{e}"
    );
    let e = err([2, 3], [3, 5], None);
    assert!(
        e.contains("teacher_hidden") && e.contains("[3, 5]") && e.contains("[2, 5]"),
        "{e}"
    );
    let e = err([2, 3], [2, 5], Some(4));
    assert!(
        e.contains("mask") && e.contains("[4]") && e.contains("[2]"),
        "{e}"
    );
}

#[test]
fn hidden_states_of_another_dtype_than_the_projection_are_named() {
    let device = flex_autodiff();
    let loss = HiddenStateLossConfig::new(3, 5).init(&device);
    let e = loss
        .try_forward(
            Tensor::zeros([2, 3], (&device, DType::F32)),
            Tensor::zeros([2, 5], (&device, DType::F32)),
            None,
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("student_hidden") && e.contains("dtype F32") && e.contains("F64"),
        "{e}"
    );
}
