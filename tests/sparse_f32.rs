//! The fused sparse-teacher kernels against the composed reference in f32, on Flex (the CPU
//! kernel) and wgpu (the CubeCL kernel; lavapipe on CI). 0.1 also ran them on NdArray, gone in
//! 0.2: the Flex tests are their counterparts.
//!
//! 0.1's `fused_matches_reference_wgpu` ran on burn's fusion wrapper (`Wgpu`) and on the bare
//! `CubeBackend`; in 0.2 the wrapper is chosen at build time (the `fusion` feature), so one
//! build runs one of them.
#![cfg(any(feature = "flex", feature = "wgpu"))]

mod common;

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use burn_distill::{
    DistillLossConfig, Divergence, Kernel, SparseDistillLossConfig, SparseTeacher, StudentSupport,
    TailPolicy,
};
use common::values;

const FULL_VOCAB: TailPolicy = TailPolicy::Renormalize {
    student: StudentSupport::FullVocab,
};
const TOP_K: TailPolicy = TailPolicy::Renormalize {
    student: StudentSupport::TopK,
};

/// `[N, k]` (or `[N, V]`) f32 tensor on `device` (its default float dtype).
fn floats(values: &[f32], shape: [usize; 2], device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

/// `[N, k]` int tensor.
fn ints2(values: &[i64], shape: [usize; 2], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

/// `[N]` int tensor.
fn ints1(values: &[i64], device: &Device) -> Tensor<1, Int> {
    Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), device)
}

/// The fused sparse kernel (Flex, wgpu) against the composed reference in f32: every
/// divergence with every tail policy that defines it, `k` = 1, 3 and `V`, missing and masked
/// entries, ignored rows, `T ≠ T_gen`, label smoothing, every reduction, per-row upstream
/// weights, vocabularies up to 4099. On `device` with autodiff.
fn sparse_fused_matches_reference(device: &Device, vocabularies: &[usize]) {
    use burn_distill::Reduction;
    use burn_distill::testing::mismatches;
    let device = &device.clone().autodiff();
    let n = 9;
    let mut checked = 0;
    for &v in vocabularies {
        for k in [1, 3, v] {
            if k > v || (k == v && v > 17) {
                continue;
            }
            let wave = |seed: f64| -> Vec<f64> {
                (0..n * v)
                    .map(|i| (((i as f64 + 1.0) * seed).sin() * 5.0) as f32 as f64)
                    .collect()
            };
            let student = wave(0.73);
            let teacher_logits =
                Tensor::<2>::from_data(TensorData::new(wave(0.31), [n, v]), device);
            let top = SparseTeacher::from_logits(teacher_logits, k, 1.3);
            let mut indices: Vec<i64> = top.indices().to_data().iter::<i64>().collect();
            let mut log_probs: Vec<f32> = top.log_probs().to_data().iter::<f32>().collect();
            let mut mask = vec![true; n * k];
            if k > 1 {
                log_probs[k] = f32::NEG_INFINITY; // row 1 misses its first entry
                indices[k] = 0;
                mask[4 * k + k - 1] = false; // row 4 its last
            }
            let targets: Vec<i64> = (0..n as i64)
                .map(|i| if i % 4 == 2 { -100 } else { (i * 7) % v as i64 })
                .collect();
            for (c, divergence) in Divergence::ALL.into_iter().enumerate() {
                for tail in [FULL_VOCAB, TOP_K, TailPolicy::TailBucket] {
                    if tail == FULL_VOCAB && divergence != Divergence::ForwardKl {
                        continue;
                    }
                    let reduction = [
                        Reduction::Mean,
                        Reduction::Sum,
                        Reduction::PerRow,
                        Reduction::Normalized { items: 5 },
                    ][c % 4];
                    let dense = DistillLossConfig::new()
                        .with_divergence(divergence)
                        .with_temperature([1.0, 2.5][c % 2])
                        .with_alpha(0.7)
                        .with_label_smoothing([0.0, 0.1][(c / 2) % 2])
                        .with_reduction(reduction);
                    let run = |kernel: Kernel, labels: bool| {
                        let loss = SparseDistillLossConfig::new(dense.clone().with_kernel(kernel))
                            .with_tail(tail)
                            .with_generation_temperature(1.3)
                            .init();
                        let s = Tensor::<2>::from_data(
                            TensorData::new(student.clone(), [n, v]),
                            device,
                        )
                        .require_grad();
                        let teacher = SparseTeacher::new(
                            ints2(&indices, [n, k], device),
                            floats(&log_probs, [n, k], device),
                        )
                        .with_mask(Tensor::<2, Bool>::from_data(
                            TensorData::new(mask.clone(), [n, k]),
                            device,
                        ));
                        let value = if labels {
                            loss.forward(s.clone(), teacher, ints1(&targets, device))
                        } else {
                            loss.forward_soft(s.clone(), teacher)
                        };
                        let rows = value.dims()[0];
                        let w: Vec<f64> = (0..rows).map(|i| 0.5 + 0.25 * (i % 3) as f64).collect();
                        let w = Tensor::<1>::from_data(TensorData::new(w, [rows]), device);
                        let grad = s.grad(&(value.clone() * w).sum().backward()).unwrap();
                        (values(value), values(grad))
                    };
                    for labels in [true, false] {
                        let (rl, rg) = run(Kernel::Reference, labels);
                        let (fl, fg) = run(Kernel::Fused, labels);
                        let mut failures = mismatches("loss", &fl, &rl, 1e-5, 2e-4);
                        failures.extend(mismatches("grad", &fg, &rg, 1e-6, 2e-3));
                        assert!(
                            failures.is_empty(),
                            "V = {v}, k = {k}, {divergence:?}, {tail:?}, {reduction:?}, labels = {labels}:\n{}",
                            failures.join("\n")
                        );
                        // (A renormalised top-1 is certain on both sides: no soft gradient.)
                        let trivial = tail == TOP_K && k == 1 && !labels;
                        assert_eq!(
                            fg.iter().any(|g| *g != 0.0),
                            !trivial,
                            "V = {v}, k = {k}, {divergence:?}, {tail:?}, labels = {labels}"
                        );
                        checked += 1;
                    }
                }
            }
        }
    }
    assert!(checked > 100, "{checked} comparisons");
}

#[cfg(feature = "flex")]
#[test]
fn fused_matches_reference_flex_f32() {
    sparse_fused_matches_reference(&Device::flex(), &[3, 17, 4099]);
}

/// The CubeCL sparse kernel on wgpu (lavapipe in CI), through burn's fusion wrapper where the
/// build has the `fusion` feature (0.1 also ran the bare `CubeBackend` with vocabularies 3, 16,
/// 17, 1024 and 4099: the same set).
#[cfg(feature = "wgpu")]
#[test]
fn fused_matches_reference_wgpu() {
    // Odd vocabularies load scalars; 16 and 1024 vectors of 4 (16 with k = V: no tail). V = 16
    // and 1024 under fusion also hold the composed path (the oracle) to the work-around of a
    // burn-fusion 0.21 bug (its `gather` after a row reduction: V = 16, k = 1 gave 1.0896 for
    // 0.6423); see `soft_rows` in src/sparse/composed.rs.
    sparse_fused_matches_reference(
        &burn_distill::testing::wgpu_device(),
        &[16, 1024, 3, 17, 4099],
    );
}

/// Rows that stress the fused sparse kernel against the composed path: a confident student
/// (tail mass ~1e-8), one so confident that its tail underflows f32 at `T = 1` (logits ±60),
/// `−inf` padding with label smoothing, `α` = 0 and 1, integer and fractional `T`, every tail
/// policy. On `device` with autodiff.
fn sparse_edge_cases(device: &Device) {
    use burn_distill::testing::mismatches;
    let device = &device.clone().autodiff();
    let (n, v, k) = (4, 1000, 3);
    let mut student = Vec::with_capacity(n * v);
    for r in 0..n {
        for j in 0..v {
            let wiggle = ((j as f64 * 0.37 + r as f64).sin() * 0.5) as f32 as f64;
            student.push(match r {
                0 => {
                    if j == 5 {
                        10.0
                    } else {
                        -12.0 + wiggle
                    }
                }
                1 => {
                    if j == 5 {
                        60.0
                    } else {
                        -60.0 + wiggle
                    }
                }
                2 if j >= v - 5 => f64::NEG_INFINITY,
                _ => 3.0 * wiggle,
            });
        }
    }
    let indices: Vec<i64> = (0..n).flat_map(|_| [5i64, 17, 300]).collect();
    let log_probs: Vec<f32> = (0..n).flat_map(|_| [-0.02f32, -4.5, -6.0]).collect();
    let targets: Vec<i64> = vec![5, 17, 2, 300];
    let cases = [
        (0.7, 0.0, 1.0, TailPolicy::TailBucket, Divergence::ForwardKl),
        (0.7, 0.1, 1.0, TailPolicy::TailBucket, Divergence::ReverseKl),
        (
            0.0,
            0.1,
            2.0,
            TailPolicy::TailBucket,
            Divergence::Jsd { beta: 0.5 },
        ),
        (1.0, 0.0, 3.0, TailPolicy::TailBucket, Divergence::ForwardKl),
        (0.5, 0.1, 1.5, TailPolicy::TailBucket, Divergence::Tvd),
        (0.5, 0.1, 1.0, FULL_VOCAB, Divergence::ForwardKl),
        (0.5, 0.1, 2.0, TOP_K, Divergence::ReverseKl),
    ];
    for (alpha, eps, t, tail, divergence) in cases {
        let run = |kernel: Kernel| {
            let loss = SparseDistillLossConfig::new(
                DistillLossConfig::new()
                    .with_alpha(alpha)
                    .with_label_smoothing(eps)
                    .with_temperature(t)
                    .with_divergence(divergence)
                    .with_reduction(burn_distill::Reduction::PerRow)
                    .with_kernel(kernel),
            )
            .with_tail(tail)
            .init();
            let s = Tensor::<2>::from_data(TensorData::new(student.clone(), [n, v]), device)
                .require_grad();
            let teacher = SparseTeacher::new(
                ints2(&indices, [n, k], device),
                floats(&log_probs, [n, k], device),
            );
            let value = loss.forward(s.clone(), teacher, ints1(&targets, device));
            let w =
                Tensor::<1>::from_data(TensorData::new(vec![1.0f32, 0.5, 0.75, 1.0], [n]), device);
            let grad = s.grad(&(value.clone() * w).sum().backward()).unwrap();
            (values(value), values(grad))
        };
        let (rl, rg) = run(Kernel::Reference);
        let (fl, fg) = run(Kernel::Fused);
        let what = format!("α {alpha}, ε {eps}, T {t}, {tail:?}, {divergence:?}");
        assert!(rl.iter().all(|x| x.is_finite()), "{what}: reference {rl:?}");
        let mut failures = mismatches("loss", &fl, &rl, 1e-5, 2e-4);
        failures.extend(mismatches("grad", &fg, &rg, 1e-6, 2e-3));
        assert!(failures.is_empty(), "{what}:\n{}", failures.join("\n"));
    }
}

#[cfg(feature = "flex")]
#[test]
fn fused_edge_cases_flex_f32() {
    sparse_edge_cases(&Device::flex());
}

#[cfg(feature = "wgpu")]
#[test]
fn fused_edge_cases_wgpu() {
    sparse_edge_cases(&burn_distill::testing::wgpu_device());
}

/// A teacher whose top-k holds all of its mass (an entry of log-probability exactly 0, as APIs
/// return for a near-certain token) keeps a tail of `TAIL_FLOOR`: reverse KL is finite there,
/// equal to the float64 value of the floored bucket, with a finite gradient, on both kernels;
/// the other row is untouched, and a `Mean` over both rows is finite. On `device` with
/// autodiff.
fn empty_tail_bucket(device: &Device) {
    use burn_distill::{Reduction, TAIL_FLOOR};
    let device = &device.clone().autodiff();
    let (n, v, k) = (2, 7, 2);
    let student: Vec<f32> = (0..n * v).map(|i| (i as f32 * 0.61).sin()).collect();
    let indices: Vec<i64> = vec![1, 3, 1, 3];
    // Row 0: token 1 with probability 1 (the other entry missing); row 1: mass 0.83 in K.
    let log_probs: Vec<f32> = vec![0.0, f32::NEG_INFINITY, -0.5, -1.5];
    // Row 0 in float64: q = softmax(z_0), p = (1, TAIL_FLOOR) / (1 + TAIL_FLOOR).
    let row0: Vec<f64> = student[..v].iter().map(|&x| x as f64).collect();
    let max = row0.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = row0.iter().map(|x| (x - max).exp()).sum();
    let q1 = (row0[1] - max).exp() / sum;
    let q_tail = 1.0 - q1;
    let (p1, p_tail) = (1.0 / (1.0 + TAIL_FLOOR), TAIL_FLOOR / (1.0 + TAIL_FLOOR));
    let reverse = q1 * (q1 / p1).ln() + q_tail * (q_tail / p_tail).ln();
    let forward = p1 * (p1 / q1).ln() + p_tail * (p_tail / q_tail).ln();
    for (divergence, expected) in [
        (Divergence::ReverseKl, reverse),
        (Divergence::ForwardKl, forward),
    ] {
        let run = |kernel: Kernel, reduction: Reduction| {
            let loss = SparseDistillLossConfig::new(
                DistillLossConfig::new()
                    .with_divergence(divergence)
                    .with_reduction(reduction)
                    .with_kernel(kernel),
            )
            .with_tail(TailPolicy::TailBucket)
            .init();
            let teacher = SparseTeacher::new(
                ints2(&indices, [n, k], device),
                floats(&log_probs, [n, k], device),
            );
            let s = floats(&student, [n, v], device).require_grad();
            let value = loss.forward_soft(s.clone(), teacher);
            let grad = s.grad(&value.clone().sum().backward()).unwrap();
            (values(value), values(grad))
        };
        for kernel in [Kernel::Fused, Kernel::Reference] {
            let (rows, grad) = run(kernel, Reduction::PerRow);
            let what = format!("{divergence:?}, {kernel:?}: {rows:?}");
            assert!(
                (rows[0] - expected).abs() <= 1e-5 * expected.abs(),
                "{what}, expected {expected}"
            );
            assert!(rows[1].is_finite() && rows[1] > 0.0, "{what}");
            assert!(grad.iter().all(|g| g.is_finite()), "{what}: {grad:?}");
            assert!(grad[..v].iter().any(|g| *g != 0.0), "{what}: {grad:?}");
            let (mean, mean_grad) = run(kernel, Reduction::Mean);
            assert!(
                (mean[0] - (rows[0] + rows[1]) / 2.0).abs() <= 1e-5 * mean[0].abs(),
                "{what}: mean {mean:?}"
            );
            assert!(mean_grad.iter().all(|g| g.is_finite()), "{what}");
        }
        let ((fused, fg), (reference, rg)) = (
            run(Kernel::Fused, Reduction::PerRow),
            run(Kernel::Reference, Reduction::PerRow),
        );
        let mut failures =
            burn_distill::testing::mismatches("loss", &fused, &reference, 1e-6, 1e-5);
        failures.extend(burn_distill::testing::mismatches(
            "grad", &fg, &rg, 1e-6, 1e-4,
        ));
        assert!(
            failures.is_empty(),
            "{divergence:?}:\n{}",
            failures.join("\n")
        );
    }
}

#[cfg(feature = "flex")]
#[test]
fn empty_tail_bucket_flex() {
    empty_tail_bucket(&Device::flex());
}

#[cfg(feature = "wgpu")]
#[test]
fn empty_tail_bucket_wgpu() {
    empty_tail_bucket(&burn_distill::testing::wgpu_device());
}

/// Every instruction set the CPU kernels are compiled for gives the composed path's values on
/// the edge rows (the sparse kernel dispatches as the dense one). On Flex (0.1: NdArray).
#[cfg(feature = "flex")]
#[test]
fn fused_edge_cases_on_every_cpu_instruction_set() {
    use burn_distill::internals::{Isa, force_isa};
    let isas = Isa::available();
    assert!(isas.contains(&Isa::Baseline));
    for isa in isas {
        force_isa(Some(isa));
        sparse_edge_cases(&Device::flex());
    }
    force_isa(None);
}

/// Unchecked (`Validation::Off`), a row with an index seen twice or outside the vocabulary, a
/// log-probability above 0 or a tail-bucket mass above 1 is NaN (loss, soft and hard, for any
/// `α`) with a zero gradient, on both kernels alike (row by row), and the other rows keep
/// their values. On `device` with autodiff.
fn bad_rows_are_nan(device: &Device) {
    use burn_distill::{Reduction, Validation};
    let device = &device.clone().autodiff();
    let (n, v, k) = (5, 5, 2);
    let student: Vec<f32> = (0..n * v)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0)
        .collect();
    let run = |indices: Vec<i64>, kernel: Kernel, alpha: f64| {
        let loss = SparseDistillLossConfig::new(
            DistillLossConfig::new()
                .with_alpha(alpha)
                .with_reduction(Reduction::PerRow)
                .with_validation(Validation::Off)
                .with_kernel(kernel),
        )
        .init();
        let s = floats(&student, [n, v], device).require_grad();
        // Row 3: a log-probability above 0; row 4: a top-k mass of 1.72.
        let teacher = SparseTeacher::new(
            ints2(&indices, [n, k], device),
            floats(
                &[-0.4f32, -1.5, -0.4, -1.5, -0.4, -1.5, 0.5, -1.5, -0.1, -0.2],
                [n, k],
                device,
            ),
        );
        let targets = ints1(&[1, 2, 3, 0, 4], device);
        let out = loss
            .try_forward_parts(s.clone(), teacher, Some(targets))
            .unwrap();
        let nan = out.loss.clone().is_nan();
        let grad = s
            .grad(&out.loss.clone().mask_fill(nan, 0.0).sum().backward())
            .unwrap();
        (
            values(out.loss),
            values(out.soft),
            values(out.hard.unwrap()),
            values(grad),
        )
    };
    // Row 1: index 2 twice; row 2: index 7 outside V = 5.
    let bad = vec![0, 3, 2, 2, 4, 7, 1, 2, 0, 3];
    let (good, _, _, good_grad) = run(vec![0, 3, 1, 2, 4, 0, 1, 2, 0, 3], Kernel::Reference, 0.6);
    for alpha in [0.6, 0.0, 1.0] {
        let fused = run(bad.clone(), Kernel::Fused, alpha);
        let reference = run(bad.clone(), Kernel::Reference, alpha);
        for (kernel, (rows, soft, hard, grad)) in [("fused", &fused), ("reference", &reference)] {
            let what = format!("{kernel}, alpha {alpha}: {rows:?} {soft:?} {hard:?}");
            assert!(rows[0].is_finite(), "{what}");
            for r in 1..n {
                assert!(
                    rows[r].is_nan() && soft[r].is_nan() && hard[r].is_nan(),
                    "row {r}: {what}"
                );
            }
            assert!(grad[v..].iter().all(|&g| g == 0.0), "{what}: {grad:?}");
            if alpha == 0.6 {
                assert!(
                    (rows[0] - good[0]).abs() <= 1e-5 * good[0].abs(),
                    "{what} vs {good:?}"
                );
                let first = |g: &[f64]| g[..v].to_vec();
                let failures = burn_distill::testing::mismatches(
                    "grad",
                    &first(grad),
                    &first(&good_grad),
                    1e-6,
                    1e-4,
                );
                assert!(failures.is_empty(), "{}", failures.join("\n"));
            }
        }
        let (f, r) = (fused.0[0], reference.0[0]);
        assert!((f - r).abs() <= 1e-5 * r.abs(), "alpha {alpha}: {f} vs {r}");
    }
}

#[cfg(feature = "flex")]
#[test]
fn bad_rows_are_nan_flex() {
    bad_rows_are_nan(&Device::flex());
}

#[cfg(feature = "wgpu")]
#[test]
fn bad_rows_are_nan_wgpu() {
    bad_rows_are_nan(&burn_distill::testing::wgpu_device());
}

/// The sparse kernel runs one row per cube: 65,537 rows need more cubes than one wgpu dispatch
/// dimension holds (65,535). Loss and gradient against the reference on Flex (0.1: NdArray).
#[cfg(all(feature = "wgpu", feature = "flex"))]
#[test]
fn wgpu_more_rows_than_one_dispatch_dimension() {
    use burn_distill::testing::mismatches;
    let (n, v, k) = (65_537, 6, 2);
    let student: Vec<f32> = (0..n * v)
        .map(|i| ((i * 7 % 13) as f32 - 6.0) / 2.0)
        .collect();
    let indices: Vec<i64> = (0..n)
        .flat_map(|r| [(r % v) as i64, ((r + 2) % v) as i64])
        .collect();
    let log_probs: Vec<f32> = (0..n)
        .flat_map(|r| [-0.3 - (r % 5) as f32 * 0.1, -2.0])
        .collect();
    let targets: Vec<i64> = (0..n).map(|r| ((r * 5) % v) as i64).collect();
    let run = |device: &Device, kernel: Kernel| {
        let device = &device.clone().autodiff();
        let loss = SparseDistillLossConfig::new(
            DistillLossConfig::new()
                .with_temperature(2.0)
                .with_alpha(0.7)
                .with_kernel(kernel),
        )
        .init();
        let s = floats(&student, [n, v], device).require_grad();
        let teacher = SparseTeacher::new(
            ints2(&indices, [n, k], device),
            floats(&log_probs, [n, k], device),
        );
        let value = loss.forward(s.clone(), teacher, ints1(&targets, device));
        let grad = s.grad(&value.backward()).unwrap();
        (values(value), values(grad))
    };
    let (fl, fg) = run(&burn_distill::testing::wgpu_device(), Kernel::Fused);
    let (rl, rg) = run(&Device::flex(), Kernel::Reference);
    let mut failures = mismatches("loss", &fl, &rl, 1e-6, 1e-4);
    failures.extend(mismatches("grad", &fg, &rg, 1e-10, 1e-3));
    assert!(fg.iter().any(|g| *g != 0.0));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// k = 300 entries per row (more than the 256 units of the GPU kernel's cube: each unit ranks
/// several) against the composed path; k = 513, past the kernel's shared memory
/// (`MAX_SPARSE_K`), runs the composed path under `Kernel::Auto` and is refused by name under
/// `Kernel::Fused`.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_many_entries_per_row() {
    use burn::tensor::DType;
    use burn_distill::backend::{MAX_SPARSE_K, has_sparse_fused_kernel};
    use burn_distill::testing::mismatches;
    let device = burn_distill::testing::wgpu_device().autodiff();
    assert_eq!(MAX_SPARSE_K, 512);
    let (n, v) = (5, 700);
    let student: Vec<f32> = (0..n * v)
        .map(|i| (((i as f64 + 1.0) * 0.37).sin() * 4.0) as f32)
        .collect();
    let teacher_logits: Vec<f32> = (0..n * v)
        .map(|i| (((i as f64 + 1.0) * 0.11).sin() * 4.0) as f32)
        .collect();
    for k in [300, 513] {
        assert_eq!(
            has_sparse_fused_kernel(&device, DType::F32, k),
            k <= MAX_SPARSE_K
        );
        let top = SparseTeacher::from_logits(floats(&teacher_logits, [n, v], &device), k, 1.0);
        let run = |kernel: Kernel| {
            let loss = SparseDistillLossConfig::new(
                DistillLossConfig::new()
                    .with_temperature(2.0)
                    .with_alpha(0.8)
                    .with_divergence(Divergence::Jsd { beta: 0.4 })
                    .with_kernel(kernel),
            )
            .init();
            let s = floats(&student, [n, v], &device).require_grad();
            let y = ints1(&[3, 9, 0, 699, 5], &device);
            loss.try_forward_parts(s.clone(), top.clone(), Some(y))
                .map(|out| {
                    let grad = s.grad(&out.loss.backward()).unwrap();
                    (values(out.loss), values(grad))
                })
        };
        let (rl, rg) = run(Kernel::Reference).unwrap();
        let (al, ag) = run(Kernel::Auto).unwrap();
        let mut failures = mismatches("loss", &al, &rl, 1e-5, 2e-4);
        failures.extend(mismatches("grad", &ag, &rg, 1e-7, 2e-3));
        assert!(failures.is_empty(), "k = {k}:\n{}", failures.join("\n"));
        match run(Kernel::Fused) {
            Ok((fl, _)) => assert!(k <= 512 && (fl[0] - al[0]).abs() <= 1e-6 * al[0].abs()),
            Err(e) => assert!(
                k > 512 && e.to_string().contains("no fused sparse-teacher kernel"),
                "k = {k}: {e}"
            ),
        }
    }
}
