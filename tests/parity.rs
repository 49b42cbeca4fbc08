//! The fused kernels against the reference implementation: odd vocabularies, one row and many,
//! `−inf` padding, huge logits, ignored rows, every divergence and reduction (f32).
#![cfg(feature = "ndarray")]

mod common;

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn_distill::{DistillBackend, DistillLossConfig, Divergence, Kernel, Reduction};
use common::{ints, mismatches, tensor2, values};

/// A deterministic pseudo-random stream (SplitMix64) in [-1, 1).
struct Stream(u64);

impl Stream {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
}

struct Problem {
    shape: [usize; 2],
    student: Vec<f64>,
    teacher: Vec<f64>,
    targets: Vec<i64>,
}

fn problem(n: usize, v: usize, scale: f64, pad: usize, seed: u64) -> Problem {
    let mut r = Stream(seed);
    let mut logit = |j: usize| {
        if j >= v - pad {
            f64::NEG_INFINITY
        } else {
            (scale * r.next() as f32 as f64) as f32 as f64
        }
    };
    let student = (0..n * v).map(|i| logit(i % v)).collect();
    let teacher = (0..n * v).map(|i| logit(i % v)).collect();
    let targets = (0..n)
        .map(|i| {
            if i % 5 == 3 {
                -100
            } else {
                ((i * 7919) % (v - pad)) as i64
            }
        })
        .collect();
    Problem {
        shape: [n, v],
        student,
        teacher,
        targets,
    }
}

const DIVERGENCES: [Divergence; Divergence::ALL.len()] = Divergence::ALL;

fn run<B: AutodiffBackend + DistillBackend>(
    config: &DistillLossConfig,
    p: &Problem,
    labels: bool,
) -> (Vec<f64>, Vec<f64>) {
    let device = Default::default();
    let loss = config.init();
    let student = tensor2::<B>(&p.student, p.shape, &device).require_grad();
    let teacher = tensor2::<B>(&p.teacher, p.shape, &device);
    let value = if labels {
        loss.forward(student.clone(), teacher, ints(&p.targets, &device))
    } else {
        loss.forward_soft(student.clone(), teacher)
    };
    let grad = student.grad(&value.clone().sum().backward()).unwrap();
    (values(value), values(grad))
}

/// Fused == reference for loss and gradient, on backend `B`.
fn assert_parity<B: AutodiffBackend + DistillBackend>(
    p: &Problem,
    config: DistillLossConfig,
    labels: bool,
) {
    let (rl, rg) = run::<B>(&config.clone().with_kernel(Kernel::Reference), p, labels);
    let (fl, fg) = run::<B>(&config.clone().with_kernel(Kernel::Fused), p, labels);
    let mut failures = mismatches("loss", &fl, &rl, 1e-5, 2e-4);
    failures.extend(mismatches("grad", &fg, &rg, 1e-6, 2e-3));
    assert!(
        fg.iter().all(|g| g.is_finite()),
        "non-finite fused gradient"
    );
    assert!(
        failures.is_empty(),
        "{:?} {config:?} labels={labels}:\n{}",
        p.shape,
        failures.join("\n")
    );
}

fn sweep<B: AutodiffBackend + DistillBackend>(vocabularies: &[usize]) {
    for &v in vocabularies {
        for n in [1, 7] {
            let pad = if v >= 8 { 3 } else { 0 };
            let p = problem(n, v, 6.0, pad, (n * 1000 + v) as u64);
            for (k, d) in DIVERGENCES.into_iter().enumerate() {
                let reduction = [Reduction::Mean, Reduction::Sum, Reduction::PerRow][k % 3];
                let temperature = [1.0, 2.0, 4.0, 2.5][k % 4];
                let config = DistillLossConfig::new()
                    .with_divergence(d)
                    .with_temperature(temperature)
                    .with_alpha(0.7)
                    .with_label_smoothing(if k % 2 == 0 { 0.1 } else { 0.0 })
                    .with_reduction(reduction);
                assert_parity::<B>(&p, config.clone(), true);
                assert_parity::<B>(&p, config, false);
            }
        }
    }
}

const VOCABULARIES: [usize; 7] = [1, 2, 3, 17, 1031, 4099, 32001];

#[test]
fn ndarray_fused_matches_reference() {
    sweep::<Autodiff<burn::backend::NdArray>>(&VOCABULARIES);
}

#[cfg(feature = "flex")]
#[test]
fn flex_fused_matches_reference() {
    sweep::<Autodiff<burn::backend::Flex>>(&VOCABULARIES);
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_fused_matches_reference() {
    sweep::<Autodiff<burn::backend::Wgpu>>(&[1, 2, 3, 17, 300, 1031]);
}

#[test]
fn huge_logits_and_large_vocabularies() {
    type B = Autodiff<burn::backend::NdArray>;
    for (n, v) in [(2, 50257), (1, 131072)] {
        let p = problem(n, v, 1e4, 0, 99);
        assert_parity::<B>(
            &p,
            DistillLossConfig::new()
                .with_temperature(3.0)
                .with_alpha(0.5),
            true,
        );
    }
}

#[test]
fn all_rows_ignored_fused() {
    type B = Autodiff<burn::backend::NdArray>;
    let mut p = problem(3, 11, 2.0, 0, 5);
    p.targets = vec![-100; 3];
    let config = DistillLossConfig::new().with_kernel(Kernel::Fused);
    let (loss, grad) = run::<B>(&config, &p, true);
    assert_eq!(loss, vec![0.0]);
    assert!(grad.iter().all(|g| *g == 0.0));
}

/// Every instruction set the CPU kernel is compiled for gives the reference's values.
#[test]
fn every_cpu_instruction_set_matches_reference() {
    use burn_distill::internals::{Isa, force_isa};
    type B = Autodiff<burn::backend::NdArray>;
    let isas = Isa::available();
    assert!(isas.contains(&Isa::Baseline));
    for isa in isas {
        force_isa(Some(isa));
        for v in [5, 1031] {
            let p = problem(4, v, 6.0, 2, v as u64);
            for d in DIVERGENCES {
                let config = DistillLossConfig::new()
                    .with_divergence(d)
                    .with_temperature(4.0)
                    .with_alpha(0.8)
                    .with_label_smoothing(0.05);
                assert_parity::<B>(&p, config, true);
            }
        }
    }
    force_isa(None);
}

/// Half-precision logits: the fused kernel accumulates in f32 and matches the f32 reference on
/// the same (rounded) values within 1%.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn half_precision_logits<W: DistillBackend>(dtypes: &[burn::tensor::DType]) {
    use burn::tensor::{DType, Tensor};
    let device = Default::default();
    let p = problem(6, 1031, 4.0, 3, 42);
    let loss = DistillLossConfig::new()
        .with_temperature(2.0)
        .with_alpha(0.7);
    for &dtype in dtypes {
        let half = |x: &[f64]| tensor2::<W>(x, p.shape, &device).cast(dtype);
        let back = |t: Tensor<W, 2>| t.cast(DType::F32);
        let (s, t) = (half(&p.student), half(&p.teacher));
        let targets = ints::<W>(&p.targets, &device);
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
        assert!(
            (f - r).abs() <= 1e-2 * r.abs(),
            "{dtype:?}: fused {f} vs reference {r}"
        );
    }
}

/// f16 on wgpu (WGSL has no bf16).
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_half_precision_logits() {
    half_precision_logits::<burn::backend::Wgpu>(&[burn::tensor::DType::F16]);
}

/// CUDA (needs an NVIDIA GPU; CI only compiles it): the fused CubeCL kernel against the
/// reference, every divergence, vocabularies up to 32001.
#[cfg(feature = "cuda")]
#[test]
fn cuda_fused_matches_reference() {
    sweep::<Autodiff<burn::backend::Cuda>>(&VOCABULARIES);
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_half_precision_logits() {
    use burn::tensor::DType;
    half_precision_logits::<burn::backend::Cuda>(&[DType::F16, DType::BF16]);
}
