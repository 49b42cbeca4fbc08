//! The fused kernel against the reference implementation on random problems: odd
//! vocabularies, one row and several, `−inf` padding, ignored rows, every divergence and
//! reduction, with and without labels (f32 tolerances, per entry).

use burn::tensor::{DType, Device};

use super::{ints, mismatches, tensor2, values};
use crate::{DistillLossConfig, Divergence, Kernel, Reduction, backend::has_fused_kernel};

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

/// `[N, V]` student and teacher logits (f32-representable) and `[N]` targets.
#[derive(Clone, Debug)]
#[allow(missing_docs)]
pub struct Problem {
    pub shape: [usize; 2],
    pub student: Vec<f64>,
    pub teacher: Vec<f64>,
    pub targets: Vec<i64>,
}

/// A random problem: logits uniform in `[−scale, scale)`, the last `pad` columns `−inf`,
/// every fifth row (from the fourth) ignored (`−100`).
pub fn problem(n: usize, v: usize, scale: f64, pad: usize, seed: u64) -> Problem {
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

/// The loss values and the student gradient of `problem`, backpropagating `Σ_i w_i · loss_i`
/// with per-row upstream weights `w_i = 0.5 + 0.25 · (i mod 3)` (not 1, and not the same for
/// every row of a `PerRow` loss), on an autodiff `device`.
pub fn run(
    config: &DistillLossConfig,
    p: &Problem,
    labels: bool,
    device: &Device,
) -> (Vec<f64>, Vec<f64>) {
    let loss = config.init();
    let student = tensor2(&p.student, p.shape, device).require_grad();
    let teacher = tensor2(&p.teacher, p.shape, device);
    let value = if labels {
        loss.forward(student.clone(), teacher, ints(&p.targets, device))
    } else {
        loss.forward_soft(student.clone(), teacher)
    };
    let rows = value.dims()[0];
    let w: Vec<f64> = (0..rows).map(|i| 0.5 + 0.25 * (i % 3) as f64).collect();
    // In the loss's dtype (f32 from the fused CubeCL kernel even for half-precision logits).
    let w = burn::tensor::Tensor::<1>::from_data(burn::tensor::TensorData::new(w, [rows]), device)
        .cast(value.dtype());
    let grad = student
        .grad(&(value.clone() * w).sum().backward())
        .expect("student gradient");
    (values(value), values(grad))
}

/// The fused kernel == `Kernel::Reference`, loss and gradient, on `device` (with autodiff).
///
/// # Panics
/// If the device has no fused kernel for f32 logits (a suite that compared the reference with
/// itself would prove nothing), or on a mismatch.
pub fn assert_parity(p: &Problem, config: DistillLossConfig, labels: bool, device: &Device) {
    assert_claims_fused_kernel(device);
    let device = &device.clone().autodiff();
    let reference = config.clone().with_kernel(Kernel::Reference);
    let (rl, rg) = run(&reference, p, labels, device);
    let fused = config.clone().with_kernel(Kernel::Fused);
    let (fl, fg) = run(&fused, p, labels, device);
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

/// A backend run through the parity suite must have a fused kernel for f32 logits: otherwise
/// both sides would be the reference and the suite would pass without testing anything.
fn assert_claims_fused_kernel(device: &Device) {
    assert!(
        has_fused_kernel(device, DType::F32),
        "burn-distill conformance: {device:?} has no fused kernel for f32 logits; the parity \
         suite needs one (it would compare the reference with itself)"
    );
}

/// [`assert_parity`] over `vocabularies` (with 3 padding columns from `V = 8`), 1 and 7 rows,
/// every divergence of [`Divergence::ALL`], rotating reductions, temperatures and label
/// smoothing, with and without labels.
pub fn sweep(device: &Device, vocabularies: &[usize]) {
    assert_claims_fused_kernel(device);
    for &v in vocabularies {
        for n in [1, 7] {
            let pad = if v >= 8 { 3 } else { 0 };
            let p = problem(n, v, 6.0, pad, (n * 1000 + v) as u64);
            for (k, d) in Divergence::ALL.into_iter().enumerate() {
                let reduction = [
                    Reduction::Mean,
                    Reduction::Sum,
                    Reduction::PerRow,
                    Reduction::Normalized { items: 5 },
                ][k % 4];
                let temperature = [1.0, 2.0, 4.0, 2.5][k % 4];
                let config = DistillLossConfig::new()
                    .with_divergence(d)
                    .with_temperature(temperature)
                    .with_alpha(0.7)
                    .with_label_smoothing(if k % 2 == 0 { 0.1 } else { 0.0 })
                    .with_reduction(reduction);
                assert_parity(&p, config.clone(), true, device);
                assert_parity(&p, config, false, device);
            }
        }
    }
}
