//! [`Validation`] on one device: the same bad inputs caught eagerly in `forward`, on the device
//! and named by [`DistillOutput::validate`](crate::DistillOutput::validate), or left as NaN
//! rows, with both kernels; and a valid input giving the same loss in every mode.

use burn::tensor::{Device, Int, Tensor, TensorData};

use super::{ints, tensor2, values};
use crate::{
    DistillError, DistillLossConfig, Kernel, SparseDistillLossConfig, SparseTeacher, TailPolicy,
    Validation,
};

fn config(validation: Validation, kernel: Kernel) -> DistillLossConfig {
    DistillLossConfig::new()
        .with_temperature(2.0)
        .with_alpha(0.7)
        .with_validation(validation)
        .with_kernel(kernel)
}

/// Dense loss: targets out of range on row 2 of 4 (value 9 with V = 5), on `device` (with
/// autodiff for the gradient).
pub fn assert_dense(device: &Device) {
    let device = &device.clone().autodiff();
    let (n, v) = (4, 5);
    let logits: Vec<f64> = (0..n * v)
        .map(|i| ((i * 7 % 11) as f64 - 5.0) / 3.0)
        .collect();
    let student = tensor2(&logits, [n, v], device);
    let teacher = student.clone().flip([1]);
    let good = ints(&[1, -100, 4, 0], device);
    let bad = ints(&[1, -100, 9, 0], device);
    for kernel in [Kernel::Auto, Kernel::Reference] {
        let forward = |mode, targets: &Tensor<1, Int>| {
            config(mode, kernel).init().try_forward_parts(
                student.clone(),
                teacher.clone(),
                Some(targets.clone()),
            )
        };
        // A valid batch: one value in every mode, nothing to report.
        let eager = values(forward(Validation::Eager, &good).unwrap().loss)[0];
        for mode in [Validation::Deferred, Validation::Off] {
            let out = forward(mode, &good).unwrap();
            assert!(out.validate().is_ok(), "{kernel:?} {mode:?}");
            let value = values(out.loss)[0];
            assert!(value.is_finite() && (value - eager).abs() <= 1e-6 * eager.abs());
        }
        // A bad target: an error in forward (eager), NaN then a named error (deferred).
        let named = |err: DistillError| {
            assert!(
                matches!(
                    &err,
                    DistillError::TargetOutOfRange {
                        row: 2,
                        at,
                        value: 9,
                        classes: 5,
                        ..
                    } if at == &[2]
                ),
                "{kernel:?}: {err}"
            )
        };
        named(forward(Validation::Eager, &bad).unwrap_err());
        let out = forward(Validation::Deferred, &bad).unwrap();
        assert!(values(out.loss.clone())[0].is_nan(), "{kernel:?}");
        named(out.validate().unwrap_err());
        let out = forward(Validation::Off, &bad).unwrap();
        assert!(values(out.loss.clone())[0].is_nan(), "{kernel:?}");
        assert!(out.validate().is_ok(), "{kernel:?}: Off queues nothing");
        // The gradient of a NaN loss stays finite on the good rows and 0 on the bad one.
        let tracked = student.clone().require_grad();
        let per_row = config(Validation::Deferred, kernel)
            .with_reduction(crate::Reduction::PerRow)
            .init()
            .forward(tracked.clone(), teacher.clone(), bad.clone());
        let rows = values(per_row.clone());
        assert!(rows[2].is_nan() && rows[0].is_finite() && rows[3].is_finite());
        let weights = Tensor::<1>::from_floats([0.5, 0.5, 0.0, 0.75], device);
        let nan = per_row.clone().is_nan();
        let grads = (per_row.mask_fill(nan, 0.0) * weights).sum().backward();
        let grad = values(tracked.grad(&grads).unwrap());
        assert!(grad.iter().all(|g| g.is_finite()), "{kernel:?}: {grad:?}");
        assert!(grad[2 * v..3 * v].iter().all(|&g| g == 0.0), "{kernel:?}");
    }
}

/// Sparse teacher: each kind of bad entry, caught in `forward` (eager) and by `validate`
/// (deferred) with the same message; an index out of range is a NaN row when unchecked. On
/// `device` with autodiff (as 0.1 ran it) and without.
pub fn assert_sparse(device: &Device) {
    for device in [device.clone().autodiff(), device.clone().inner()] {
        sparse_on(&device);
    }
}

fn sparse_on(device: &Device) {
    let (n, v, k) = (3, 6, 3);
    let logits: Vec<f64> = (0..n * v)
        .map(|i| ((i * 5 % 13) as f64 - 6.0) / 4.0)
        .collect();
    let student = tensor2(&logits, [n, v], device);
    let targets = ints(&[0, 2, 5], device);
    let good_idx = [0i64, 1, 2, 3, 4, 5, 5, 2, 0];
    let good_lp = [-0.5, -1.5, -2.5, -0.3, -2.0, -3.0, -1.0, -1.2, -2.0];
    let teacher = |idx: &[i64], lp: &[f64]| {
        SparseTeacher::new(
            Tensor::<2, Int>::from_data(TensorData::new(idx.to_vec(), [n, k]), device),
            tensor2(lp, [n, k], device),
        )
    };
    let with = |at: usize, index: Option<i64>, lp: Option<f64>| {
        let (mut i, mut l) = (good_idx, good_lp);
        if let Some(index) = index {
            i[at] = index;
        }
        if let Some(lp) = lp {
            l[at] = lp;
        }
        teacher(&i, &l)
    };
    let cases = [
        ("indices[1, 1] = 6", with(4, Some(6), None)),
        (
            "indices[2, 2] = 5, already at [2, 0]",
            with(8, Some(5), None),
        ),
        ("log_probs[0, 2] = 0.5", with(2, None, Some(0.5))),
        ("log_probs[0, 1] = NaN", with(1, None, Some(f64::NAN))),
        ("row 1 with total probability", with(3, None, Some(-0.01))),
        (
            "row 2 with no valid entry",
            teacher(
                &good_idx,
                &[-0.5, -1.5, -2.5, -0.3, -2.0, -3.0]
                    .into_iter()
                    .chain([f64::NEG_INFINITY; 3])
                    .collect::<Vec<_>>(),
            ),
        ),
    ];
    for kernel in [Kernel::Auto, Kernel::Reference] {
        let loss = |mode| {
            SparseDistillLossConfig::new(config(mode, kernel))
                .with_tail(TailPolicy::TailBucket)
                .init()
        };
        let good = teacher(&good_idx, &good_lp);
        let eager = loss(Validation::Eager)
            .try_forward_parts(student.clone(), good.clone(), Some(targets.clone()))
            .unwrap();
        let deferred = loss(Validation::Deferred)
            .try_forward_parts(student.clone(), good, Some(targets.clone()))
            .unwrap();
        assert!(deferred.validate().is_ok(), "{device:?} {kernel:?}");
        assert_eq!(
            values(eager.loss),
            values(deferred.loss),
            "{device:?} {kernel:?}"
        );
        for (message, bad) in &cases {
            let err = loss(Validation::Eager)
                .try_forward_parts(student.clone(), bad.clone(), Some(targets.clone()))
                .unwrap_err()
                .to_string();
            assert!(err.contains(message), "{device:?} {kernel:?} eager: {err}");
            let err = loss(Validation::Deferred)
                .try_forward_parts(student.clone(), bad.clone(), Some(targets.clone()))
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(message),
                "{device:?} {kernel:?} deferred: {err}"
            );
        }
        // With α = 0 (the hard term only) an empty row leaves the loss finite: still reported.
        let hard_only =
            SparseDistillLossConfig::new(config(Validation::Deferred, kernel).with_alpha(0.0))
                .with_tail(TailPolicy::TailBucket)
                .init();
        let (message, empty) = &cases[cases.len() - 1];
        let out = hard_only
            .try_forward_parts(student.clone(), empty.clone(), Some(targets.clone()))
            .unwrap();
        assert!(
            values(out.loss.clone())[0].is_finite(),
            "{device:?} {kernel:?}"
        );
        let err = out.validate().unwrap_err().to_string();
        assert!(err.contains(message), "{device:?} {kernel:?} α = 0: {err}");
        // A NaN student logit (an overflowing step under loss scaling) is not an input error:
        // a NaN loss, no error, in every mode.
        let mut poisoned = logits.clone();
        poisoned[1] = f64::NAN;
        let poisoned = tensor2(&poisoned, [n, v], device);
        for mode in [Validation::Eager, Validation::Deferred] {
            let out = loss(mode)
                .try_forward_parts(poisoned.clone(), teacher(&good_idx, &good_lp), None)
                .unwrap();
            assert!(
                values(out.loss.clone())[0].is_nan(),
                "{device:?} {kernel:?} {mode:?}"
            );
            assert!(out.validate().is_ok(), "{device:?} {kernel:?} {mode:?}");
        }
        // Unchecked, an index outside the vocabulary is a NaN row, never a read out of bounds.
        let out = loss(Validation::Off)
            .try_forward_parts(student.clone(), cases[0].1.clone(), Some(targets.clone()))
            .unwrap();
        assert!(values(out.loss)[0].is_nan(), "{device:?} {kernel:?}");
    }
}
