//! Mathematical properties of the divergences, checked on random logits (f64 on Flex; 0.1
//! ran these on `NdArray<f64>`).
#![cfg(feature = "flex")]

mod common;

use burn::tensor::Device;
use burn_distill::{DistillLossConfig, Divergence, Kernel, Reduction};
use common::{tensor2_f64, values_f64 as values};
use proptest::prelude::*;

/// Per-row divergence (no T² factor) of teacher `t` against student `s`, at temperature `temp`.
/// Both kernels are run and must agree to 1e-12; the reference's values are returned.
fn rows(divergence: Divergence, s: &[f64], t: &[f64], shape: [usize; 2], temp: f64) -> Vec<f64> {
    let reference = rows_with(Kernel::Reference, divergence, s, t, shape, temp);
    let fused = rows_with(Kernel::Fused, divergence, s, t, shape, temp);
    for (r, f) in reference.iter().zip(&fused) {
        assert!(
            (r - f).abs() <= 1e-12 + 1e-9 * r.abs(),
            "{divergence:?}: reference {r} vs fused {f}"
        );
    }
    reference
}

fn rows_with(
    kernel: Kernel,
    divergence: Divergence,
    s: &[f64],
    t: &[f64],
    shape: [usize; 2],
    temp: f64,
) -> Vec<f64> {
    let device = Device::flex();
    let loss = DistillLossConfig::new()
        .with_kernel(kernel)
        .with_divergence(divergence)
        .with_temperature(temp)
        .with_scale_by_t2(false)
        .with_reduction(Reduction::PerRow)
        .init();
    values(loss.forward_soft(
        tensor2_f64(s, shape, &device),
        tensor2_f64(t, shape, &device),
    ))
}

/// Every divergence (so a new one is tested here by adding it to the enum's list).
const ALL: [Divergence; Divergence::ALL.len()] = Divergence::ALL;

/// Two `[n, v]` logit matrices whose rows differ by more than a constant shift.
fn logit_pair() -> impl Strategy<Value = (usize, usize, Vec<f64>, Vec<f64>)> {
    (1usize..4, 2usize..40).prop_flat_map(|(n, v)| {
        (
            Just(n),
            Just(v),
            proptest::collection::vec(-8.0f64..8.0, n * v),
            proptest::collection::vec(-8.0f64..8.0, n * v),
        )
    })
}

/// Largest spread of `s − t` within a row around its mean: 0 iff the distributions are equal.
fn spread(s: &[f64], t: &[f64], v: usize) -> f64 {
    s.chunks(v)
        .zip(t.chunks(v))
        .map(|(a, b)| {
            let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
            let mean = d.iter().sum::<f64>() / v as f64;
            d.iter().map(|x| (x - mean).abs()).fold(0.0, f64::max)
        })
        .fold(f64::INFINITY, f64::min)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn divergences_are_nonnegative_and_positive_when_distributions_differ(
        (n, v, s, t) in logit_pair(), temp in 0.5f64..5.0,
    ) {
        let distinct = spread(&s, &t, v) > 0.5;
        for d in ALL {
            for r in rows(d, &s, &t, [n, v], temp) {
                prop_assert!(r >= -1e-12, "{d:?}: {r}");
                if distinct {
                    prop_assert!(r > 0.0, "{d:?}: {r} should be > 0");
                }
            }
        }
    }

    #[test]
    fn divergences_vanish_for_equal_distributions((n, v, s, _t) in logit_pair(), shift in -50.0f64..50.0) {
        // Same distribution: teacher logits are the student's plus a constant.
        let t: Vec<f64> = s.iter().map(|x| x + shift).collect();
        for d in ALL {
            for r in rows(d, &s, &t, [n, v], 2.0) {
                prop_assert!(r.abs() < 1e-12, "{d:?}: {r}");
            }
        }
    }

    #[test]
    fn invariant_to_a_constant_added_to_a_row(
        (n, v, s, t) in logit_pair(), cs in -30.0f64..30.0, ct in -30.0f64..30.0,
    ) {
        let s2: Vec<f64> = s.iter().map(|x| x + cs).collect();
        let t2: Vec<f64> = t.iter().map(|x| x + ct).collect();
        for d in ALL {
            let a = rows(d, &s, &t, [n, v], 1.5);
            let b = rows(d, &s2, &t2, [n, v], 1.5);
            for (x, y) in a.iter().zip(&b) {
                prop_assert!((x - y).abs() <= 1e-10 + 1e-9 * x.abs(), "{d:?}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn jsd_and_tvd_are_bounded((n, v, s, t) in logit_pair(), scale in 1.0f64..20.0) {
        // Scaled-up logits push the distributions towards disjoint one-hots.
        let s: Vec<f64> = s.iter().map(|x| x * scale).collect();
        let t: Vec<f64> = t.iter().map(|x| x * scale).collect();
        for r in rows(Divergence::Jsd { beta: 0.5 }, &s, &t, [n, v], 1.0) {
            prop_assert!(r <= std::f64::consts::LN_2 + 1e-12, "JSD {r} > ln 2");
        }
        for r in rows(Divergence::Tvd, &s, &t, [n, v], 1.0) {
            prop_assert!(r <= 1.0 + 1e-12, "TVD {r} > 1");
        }
    }

    /// Hinton et al. (2015): at high temperature, T²·KL(p‖q) → Σ_j (z_s − z_t)² / (2V) for
    /// zero-mean logits.
    #[test]
    fn high_temperature_limit_is_hintons_logit_matching((n, v, s, t) in logit_pair()) {
        let center = |x: &[f64]| -> Vec<f64> {
            x.chunks(v).flat_map(|r| {
                let m = r.iter().sum::<f64>() / v as f64;
                r.iter().map(move |z| z - m).collect::<Vec<_>>()
            }).collect()
        };
        let (s, t) = (center(&s), center(&t));
        let temp = 1000.0;
        let kl = rows(Divergence::ForwardKl, &s, &t, [n, v], temp);
        for (i, k) in kl.iter().enumerate() {
            let limit: f64 = s[i * v..(i + 1) * v].iter().zip(&t[i * v..(i + 1) * v])
                .map(|(a, b)| (a - b).powi(2)).sum::<f64>() / (2.0 * v as f64);
            let scaled = k * temp * temp;
            prop_assume!(limit > 1e-6);
            prop_assert!((scaled - limit).abs() <= 0.01 * limit, "T²KL {scaled} vs {limit}");
        }
    }
}
