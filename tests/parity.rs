//! The fused kernels against the reference implementation: odd vocabularies, one row and many,
//! `−inf` padding, huge logits, ignored rows, every divergence and reduction (f32).
//!
//! 0.1 ran these on NdArray, Flex and wgpu (and CUDA); NdArray is gone in 0.2: its tests run on
//! Flex. f16 runs on wgpu (lavapipe has the f16 extension; WGSL has no bf16). Not here: the
//! CUDA tests (`cuda_fused_matches_reference`, `cuda_half_precision_logits`), which need an
//! NVIDIA GPU and the LLVM that burn 0.22's CUDA backend downloads at build time
//! (`docs/bench/run_vulkan.sh` runs the kernels on an NVIDIA GPU through Vulkan instead).

mod common;

use burn::tensor::Device;
#[allow(unused_imports)]
use burn_distill::testing::parity::{assert_parity, problem, sweep};
#[allow(unused_imports)]
use burn_distill::{DistillLossConfig, Divergence, Kernel};
#[allow(unused_imports)]
use common::{ints, tensor2, values};

#[cfg(feature = "flex")]
const VOCABULARIES: [usize; 7] = [1, 2, 3, 17, 1031, 4099, 32001];

#[cfg(feature = "flex")]
#[test]
fn flex_fused_matches_reference() {
    sweep(&Device::flex(), &VOCABULARIES);
}

#[cfg(feature = "flex")]
#[test]
fn huge_logits_and_large_vocabularies() {
    for (n, v) in [(2, 50257), (1, 131072)] {
        let p = problem(n, v, 1e4, 0, 99);
        assert_parity(
            &p,
            DistillLossConfig::new()
                .with_temperature(3.0)
                .with_alpha(0.5),
            true,
            &Device::flex(),
        );
    }
}

#[cfg(feature = "flex")]
#[test]
fn all_rows_ignored_fused() {
    let mut p = problem(3, 11, 2.0, 0, 5);
    p.targets = vec![-100; 3];
    let config = DistillLossConfig::new().with_kernel(Kernel::Fused);
    let (loss, grad) =
        burn_distill::testing::parity::run(&config, &p, true, &Device::flex().autodiff());
    assert_eq!(loss, vec![0.0]);
    assert!(grad.iter().all(|g| *g == 0.0));
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_fused_matches_reference() {
    sweep(
        &burn_distill::testing::wgpu_device(),
        &[1, 2, 3, 17, 300, 1031, 4099],
    );
}

/// Every instruction set the CPU kernel is compiled for gives the reference's values.
#[cfg(feature = "flex")]
#[test]
fn every_cpu_instruction_set_matches_reference() {
    use burn_distill::internals::{Isa, force_isa};
    let isas = Isa::available();
    assert!(isas.contains(&Isa::Baseline));
    for isa in isas {
        force_isa(Some(isa));
        for v in [5, 1031] {
            let p = problem(4, v, 6.0, 2, v as u64);
            for d in Divergence::ALL {
                let config = DistillLossConfig::new()
                    .with_divergence(d)
                    .with_temperature(4.0)
                    .with_alpha(0.8)
                    .with_label_smoothing(0.05);
                assert_parity(&p, config, true, &Device::flex());
            }
        }
    }
    force_isa(None);
}

/// More rows than one dispatch dimension holds (wgpu: 65,535 workgroups): the fused CubeCL
/// kernel on `[65_537, 5]` logits (loss and gradient), and the sequence form with
/// `B·T = 2 × 32_769`, against the reference on Flex (0.1: on NdArray).
#[cfg(all(feature = "wgpu", feature = "flex"))]
#[test]
fn wgpu_more_rows_than_one_dispatch_dimension() {
    use burn::tensor::{Int, Tensor, TensorData};
    use burn_distill::Reduction;
    use burn_distill::testing::{GRAD_TOL, LOSS_TOL, mismatches, parity::run};
    let device = burn_distill::testing::wgpu_device();
    let config = DistillLossConfig::new()
        .with_temperature(2.0)
        .with_alpha(0.6)
        .with_divergence(Divergence::Jsd { beta: 0.3 });
    let fused = config.clone().with_kernel(Kernel::Fused);
    let reference = config.clone().with_kernel(Kernel::Reference);
    // V = 5 and V = 257: cubes of several rows (few units per row), the last one partly
    // live. (0.1 also ran the sparse kernel, one row per cube, in tests/sparse_f32.rs.)
    for v in [5, 257] {
        let p = problem(65_537, v, 4.0, 0, 7);
        let (wl, wg) = run(&fused, &p, true, &device.clone().autodiff());
        let (cl, cg) = run(&reference, &p, true, &Device::flex().autodiff());
        let mut failures = mismatches("loss", &wl, &cl, LOSS_TOL.0, LOSS_TOL.1);
        failures.extend(mismatches("grad", &wg, &cg, 1e-9, GRAD_TOL.1));
        assert!(wg.iter().any(|g| *g != 0.0), "the gradient is not zero");
        assert!(
            failures.is_empty(),
            "N = 65,537, V = {v}:\n{}",
            failures.join("\n")
        );
    }

    // Sequence form, per-token losses: [2, 32_769, 5].
    let per_row = config.with_reduction(Reduction::PerRow);
    let p = problem(2 * 32_769, 5, 4.0, 0, 8);
    let seq = |kernel: Kernel, device: &Device| -> Vec<f64> {
        let loss = per_row.clone().with_kernel(kernel).init();
        let shape = [2, 32_769, 5];
        let s = Tensor::<3>::from_data(TensorData::new(p.student.clone(), shape), device);
        let t = Tensor::<3>::from_data(TensorData::new(p.teacher.clone(), shape), device);
        let y = Tensor::<2, Int>::from_data(
            TensorData::new(p.targets[..2 * 32_769].to_vec(), [2, 32_769]),
            device,
        );
        values(loss.forward_seq(s, t, y))
    };
    let (w, c) = (
        seq(Kernel::Fused, &device),
        seq(Kernel::Reference, &Device::flex()),
    );
    assert_eq!(w.len(), 65_538);
    let failures = mismatches("row", &w, &c, LOSS_TOL.0, LOSS_TOL.1);
    assert!(
        failures.is_empty(),
        "B·T = 65,538:\n{}",
        failures.join("\n")
    );
}

/// Logits masked with `f32::MIN` (PyTorch's `torch.finfo(dtype).min` idiom) are padding by the
/// one rule of `MASKED_LOGIT`, exactly as `−∞` is: with label smoothing (where padding is left
/// out of the mean over classes) the dense loss and its gradient are the same for both
/// maskings, on each of `kernels`; and the sparse loss (tail bucket and full-vocabulary
/// renormalisation) over `f32::MIN`-masked students equals its reference over `−∞`.
#[cfg(any(feature = "flex", feature = "wgpu"))]
fn masked_logits_are_padding(device: &Device, kernels: &[Kernel]) {
    use burn::tensor::{Int, Tensor, TensorData};
    use burn_distill::{
        Reduction, SparseDistillLossConfig, SparseTeacher, StudentSupport, TailPolicy,
    };
    let device = &device.clone().autodiff();
    let p = problem(5, 11, 3.0, 3, 21);
    let masked = |x: &[f64]| -> Vec<f64> {
        x.iter()
            .map(|&v| {
                if v == f64::NEG_INFINITY {
                    f32::MIN as f64
                } else {
                    v
                }
            })
            .collect()
    };
    let config = DistillLossConfig::new()
        .with_temperature(2.0)
        .with_alpha(0.5)
        .with_label_smoothing(0.1)
        .with_reduction(Reduction::PerRow);
    let dense = |student: &[f64], teacher: &[f64], kernel: Kernel| {
        let s = tensor2(student, p.shape, device).require_grad();
        let rows = config.clone().with_kernel(kernel).init().forward(
            s.clone(),
            tensor2(teacher, p.shape, device),
            ints(&p.targets, device),
        );
        let grad = s.grad(&rows.clone().sum().backward()).unwrap();
        (values(rows), values(grad))
    };
    let sparse = |student: &[f64], kernel: Kernel, tail: TailPolicy| {
        let s = tensor2(student, p.shape, device).require_grad();
        let teacher = SparseTeacher::new(
            Tensor::<2, Int>::from_data(TensorData::new([0i64, 4].repeat(5), [5, 2]), device),
            tensor2(&[-0.4, -1.7].repeat(5), [5, 2], device),
        );
        let rows = SparseDistillLossConfig::new(config.clone().with_kernel(kernel))
            .with_tail(tail)
            .init()
            .forward(s.clone(), teacher, ints(&p.targets, device));
        let grad = s.grad(&rows.clone().sum().backward()).unwrap();
        (values(rows), values(grad))
    };
    let (ms, mt) = (masked(&p.student), masked(&p.teacher));
    let expected = dense(&p.student, &p.teacher, Kernel::Reference);
    assert!(expected.0.iter().all(|x| x.is_finite()));
    let mut failures = Vec::new();
    for &kernel in kernels {
        for (what, got) in [
            ("-inf", dense(&p.student, &p.teacher, kernel)),
            ("f32::MIN", dense(&ms, &mt, kernel)),
        ] {
            let label = format!("dense {kernel:?} {what}");
            failures.extend(common::mismatches(&label, &got.0, &expected.0, 1e-5, 1e-5));
            failures.extend(common::mismatches(&label, &got.1, &expected.1, 1e-6, 1e-4));
        }
    }
    for tail in [
        TailPolicy::TailBucket,
        TailPolicy::Renormalize {
            student: StudentSupport::FullVocab,
        },
    ] {
        let expected = sparse(&p.student, Kernel::Reference, tail);
        assert!(expected.0.iter().all(|x| x.is_finite()));
        for &kernel in kernels {
            let got = sparse(&ms, kernel, tail);
            let label = format!("sparse {tail:?} {kernel:?} f32::MIN");
            failures.extend(common::mismatches(&label, &got.0, &expected.0, 1e-5, 1e-5));
            failures.extend(common::mismatches(&label, &got.1, &expected.1, 1e-6, 1e-4));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[cfg(feature = "flex")]
#[test]
fn masked_logits_are_padding_flex() {
    masked_logits_are_padding(&Device::flex(), &[Kernel::Reference, Kernel::Fused]);
}

#[cfg(feature = "wgpu")]
#[test]
fn masked_logits_are_padding_wgpu() {
    masked_logits_are_padding(
        &burn_distill::testing::wgpu_device(),
        &[Kernel::Reference, Kernel::Fused],
    );
}

/// A mean over 300,001 rows on wgpu: the f32 row losses and the count of kept rows are reduced
/// pairwise, so that `Mean` and `Sum` stay within a few f32 roundings of the float64 sum of the
/// same row values (the `PerRow` output). burn 0.21's own `sum` on wgpu dropped elements past
/// about 65,532, so a count through it failed here. Both kernels, the dense loss at 300,001
/// rows and the sparse loss at 70,001 (past the same 65,532: the sparse CubeCL kernel runs one
/// 256-unit cube per row, which lavapipe takes ~0.3 ms each to run at this V = 6, so 300,001
/// rows would cost CI minutes per call).
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_mean_over_many_rows_is_accurate() {
    use burn::tensor::{Int, Tensor, TensorData};
    use burn_distill::{Reduction, SparseDistillLossConfig, SparseTeacher};
    let device = burn_distill::testing::wgpu_device();
    for (n, sparse) in [(300_001, false), (70_001, true)] {
        let p = problem(n, 6, 3.0, 0, 31);
        let (s, t) = (
            tensor2(&p.student, p.shape, &device),
            tensor2(&p.teacher, p.shape, &device),
        );
        let y = ints(&p.targets, &device);
        let indices: Vec<i64> = (0..n)
            .flat_map(|i| [(i % 6) as i64, ((i + 2) % 6) as i64])
            .collect();
        let log_probs: Vec<f32> = (0..n).flat_map(|_| [-0.7f32, -1.9]).collect();
        let teacher = || {
            SparseTeacher::new(
                Tensor::<2, Int>::from_data(TensorData::new(indices.clone(), [n, 2]), &device),
                Tensor::<2>::from_data(TensorData::new(log_probs.clone(), [n, 2]), &device),
            )
        };
        for kernel in [Kernel::Fused, Kernel::Reference] {
            let run = |reduction: Reduction| {
                let config = DistillLossConfig::new()
                    .with_alpha(0.5)
                    .with_reduction(reduction)
                    .with_kernel(kernel);
                values(if sparse {
                    SparseDistillLossConfig::new(config).init().forward(
                        s.clone(),
                        teacher(),
                        y.clone(),
                    )
                } else {
                    config.init().forward(s.clone(), t.clone(), y.clone())
                })
            };
            let rows = run(Reduction::PerRow);
            let kept = p.targets.iter().filter(|&&y| y != -100).count() as f64;
            let sum: f64 = rows.iter().sum();
            for (reduction, expected) in [(Reduction::Sum, sum), (Reduction::Mean, sum / kept)] {
                let got = run(reduction)[0];
                let rel = (got - expected).abs() / expected.abs();
                // log₂ N f32 roundings at most (2^-24 each), not the 1.2e-4 of a sequential sum.
                assert!(
                    rel <= 16.0 * 2f64.powi(-24),
                    "{kernel:?} sparse={sparse} {reduction:?}: {got} vs {expected} ({rel:e})"
                );
            }
        }
    }
}

/// The eager target check of a batch of 10⁶ rows on wgpu sees its last row: the count of bad
/// targets is summed pairwise (burn 0.21's `sum` on wgpu would drop the row and return the NaN
/// loss instead of the error).
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_checks_see_every_row_of_a_long_batch() {
    use burn_distill::DistillError;
    let device = burn_distill::testing::wgpu_device();
    let n = 1_000_001;
    let mut p = problem(n, 6, 3.0, 0, 37);
    p.targets[n - 1] = 6;
    let (s, t) = (
        tensor2(&p.student, p.shape, &device),
        tensor2(&p.teacher, p.shape, &device),
    );
    let error = DistillLossConfig::new()
        .init()
        .try_forward(s, t, ints(&p.targets, &device))
        .expect_err("the target 6 of the last row is out of range");
    assert!(
        matches!(
            error,
            DistillError::TargetOutOfRange { row, value: 6, classes: 6, .. } if row == n - 1
        ),
        "{error}"
    );
}

/// f16 logits on wgpu (WGSL has no bf16): the fused CubeCL kernel against the reference on
/// the same f16-rounded values in f32; an odd vocabulary (scalar loads) and one of 8·129
/// (vector loads).
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_half_precision_logits() {
    use burn::tensor::{DType, Tensor};
    let device = burn_distill::testing::wgpu_device();
    let loss = DistillLossConfig::new()
        .with_temperature(2.0)
        .with_alpha(0.7);
    for v in [1031, 1032] {
        let p = problem(6, v, 4.0, 3, 42);
        let half = |x: &[f64]| tensor2(x, p.shape, &device).cast(DType::F16);
        let back = |t: Tensor<2>| t.cast(DType::F32);
        let (s, t) = (half(&p.student), half(&p.teacher));
        let targets = ints(&p.targets, &device);
        let fused = loss.clone().with_kernel(Kernel::Fused).init().forward(
            s.clone(),
            t.clone(),
            targets.clone(),
        );
        let reference =
            loss.clone()
                .with_kernel(Kernel::Reference)
                .init()
                .forward(back(s), back(t), targets);
        let (f, r) = (values(fused.cast(DType::F32))[0], values(reference)[0]);
        // Both sides read the same (rounded) values and accumulate in f32: f32 rounding of
        // the row sums (V ≤ 1032 terms), not the inputs' f16 rounding.
        assert!(
            (f - r).abs() <= 1e-5 * r.abs(),
            "V = {v}: fused {f} vs reference {r}"
        );
    }
}

/// A `Mean` and a `Sum` of f16 logits over 65,537 rows (past f16's 65,504: a count or a sum
/// in f16 would overflow): the fused loss is f32, within f32 rounding of the reference on the
/// same f16-rounded values, and its gradient is the f32 one rounded once to f16.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_f16_reduction_past_the_f16_range() {
    use burn::tensor::{DType, Tensor};
    use burn_distill::Reduction;
    use burn_distill::testing::mismatches;
    let device = burn_distill::testing::wgpu_device().autodiff();
    let p = problem(65_537, 5, 4.0, 0, 11);
    for reduction in [Reduction::Mean, Reduction::Sum] {
        let config = DistillLossConfig::new()
            .with_temperature(1.0)
            .with_alpha(0.5)
            .with_reduction(reduction);
        // Both runs see the same f16-rounded logits (the reference in f32).
        let run_on = |dtype: DType, kernel: Kernel| {
            let rounded = |x: &[f64]| tensor2(x, p.shape, &device).cast(DType::F16).cast(dtype);
            let student = rounded(&p.student).require_grad();
            let teacher = rounded(&p.teacher);
            let loss = config.clone().with_kernel(kernel).init().forward(
                student.clone(),
                teacher,
                ints(&p.targets, &device),
            );
            let grad: Tensor<2> = student.grad(&loss.backward()).unwrap();
            assert_eq!(grad.dtype(), dtype, "the gradient has the logits' dtype");
            (
                loss.dtype(),
                values(loss.cast(DType::F32))[0],
                values(grad.cast(DType::F32)),
            )
        };
        let (dtype, f, fg) = run_on(DType::F16, Kernel::Fused);
        let (_, r, rg) = run_on(DType::F32, Kernel::Reference);
        assert_eq!(dtype, DType::F32, "the fused loss of f16 logits is f32");
        // The same f16-rounded values on both sides, accumulated in f32 (pairwise over rows).
        assert!(
            f.is_finite() && (f - r).abs() <= 1e-5 * r.abs(),
            "{reduction:?}: {f} vs {r}"
        );
        // One rounding of the f32 gradient to f16, entry by entry: half an ulp (2^-11
        // relative; 2^-25 among the subnormals, 2^-24 apart, where Mean's entries all lie at
        // 1/65,537), and for Sum the f32 cancellation in `q − p` (≈ 1e-7 absolute for entries
        // near 0.1). A flushed or doubly rounded entry fails.
        let abs = if reduction == Reduction::Mean {
            2f64.powi(-25) * 1.01
        } else {
            2e-7
        };
        let failures = mismatches("grad", &fg, &rg, abs, 2f64.powi(-11) * 1.01);
        assert!(
            failures.is_empty(),
            "{reduction:?}:\n{}",
            failures.join("\n")
        );
        assert!(fg.iter().any(|g| *g != 0.0), "{reduction:?}: zero gradient");
    }
}

/// f16 logits under a loss scale of 65,536 (mixed-precision training): softmax entries down to
/// ~1e-12, far below f16's smallest subnormal, must survive until the scale meets them (the
/// kernel's gradient is f32 for f16 logits, rounded once in the backward), so the f16
/// gradient is the f32 one of the same kernel on the same values, rounded once.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_f16_gradient_under_a_loss_scale() {
    use burn::tensor::{DType, Tensor};
    use burn_distill::Reduction;
    use burn_distill::testing::mismatches;
    let device = burn_distill::testing::wgpu_device().autodiff();
    // Logits in ±16: softmax entries down to ~1e-12, far below f16's smallest subnormal.
    let p = problem(64, 1031, 16.0, 0, 13);
    const SCALE: f64 = 65_536.0;
    for (reduction, divergence) in [
        (Reduction::Mean, Divergence::ForwardKl),
        (Reduction::Sum, Divergence::Jsd { beta: 0.5 }),
        (Reduction::PerRow, Divergence::ReverseKl),
    ] {
        let config = DistillLossConfig::new()
            .with_temperature(1.5)
            .with_alpha(0.7)
            .with_divergence(divergence)
            .with_reduction(reduction);
        let run = |dtype: DType, kernel: Kernel| {
            let rounded = |x: &[f64]| tensor2(x, p.shape, &device).cast(DType::F16).cast(dtype);
            let student = rounded(&p.student).require_grad();
            let loss = config.clone().with_kernel(kernel).init().forward(
                student.clone(),
                rounded(&p.teacher),
                ints(&p.targets, &device),
            );
            let scaled = loss.sum().mul_scalar(SCALE);
            let grad: Tensor<2> = student.grad(&scaled.backward()).unwrap();
            assert_eq!(grad.dtype(), dtype, "the gradient has the logits' dtype");
            values(grad.cast(DType::F32))
        };
        let fused = run(DType::F16, Kernel::Fused);
        // The same kernel on the same (f16-rounded) logits in f32: identical f32 arithmetic,
        // and the scale is a power of two, so the f16 gradient must be this one rounded once.
        let reference = run(DType::F32, Kernel::Fused);
        let tiny = reference
            .iter()
            .filter(|g| g.abs() * 1.0 / SCALE < 2f64.powi(-25) && **g != 0.0)
            .count();
        assert!(
            tiny > 1000,
            "{reduction:?}: the case must have entries below f16's range ({tiny})"
        );
        // Half an f16 ulp: 2^-11 relative, 2^-25 in the subnormal range.
        let failures = mismatches("grad", &fused, &reference, 2f64.powi(-25), 2f64.powi(-11));
        assert!(
            failures.is_empty(),
            "{reduction:?} {divergence:?}: {} of {} entries off, e.g.\n{}",
            failures.len(),
            fused.len(),
            failures[..failures.len().min(10)].join("\n")
        );
    }
}
