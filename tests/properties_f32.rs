//! The divergences' mathematical properties in f32, as training runs them, on Flex, fused and
//! reference (the f64 versions with tight tolerances are in properties.rs). 0.1 ran these on
//! NdArray and Flex; NdArray is gone in 0.2.
#![cfg(feature = "flex")]

mod common;

use burn::tensor::{DType, Device};
use burn_distill::{DistillLossConfig, Divergence, Kernel, Reduction};
use common::{close, tensor2, values};
use proptest::prelude::*;

/// Per-row divergence (no T²) on `device`; fused and reference must agree to f32 accuracy.
fn rows_on(
    device: &Device,
    divergence: Divergence,
    s: &[f64],
    t: &[f64],
    shape: [usize; 2],
    temp: f64,
) -> Vec<f64> {
    let run = |kernel| {
        let loss = DistillLossConfig::new()
            .with_kernel(kernel)
            .with_divergence(divergence)
            .with_temperature(temp)
            .with_scale_by_t2(false)
            .with_reduction(Reduction::PerRow)
            .init();
        let rows = loss.forward_soft(tensor2(s, shape, device), tensor2(t, shape, device));
        assert_eq!(
            rows.dtype(),
            DType::F32,
            "an f32 test computed in {:?}",
            rows.dtype()
        );
        values(rows)
    };
    let (reference, fused) = (run(Kernel::Reference), run(Kernel::Fused));
    for (r, f) in reference.iter().zip(&fused) {
        assert!(
            close(*f, *r, f32_rounding(temp, shape[1]), 1e-4),
            "{divergence:?}: reference {r} vs fused {f} (T = {temp})"
        );
    }
    fused
}

/// The f32 rounding of a divergence row: its terms (`p log p`, `p log m`, …) are each off by a
/// few ulps of the log-probabilities, whose magnitude reaches the logits' range over T plus
/// log V (22 / T + ln V for the logits here, shifted by up to 3), and the paths round
/// differently (fixed bounds of 2e-6 flaked: a JSD row 3e-6 apart, a KL of equal distributions
/// at −2.9e-6).
fn f32_rounding(temp: f64, v: usize) -> f64 {
    4.0 * f64::from(f32::EPSILON) * (22.0 / temp + (v as f64).ln())
}

/// The f32 rows on every CPU device (Flex; 0.1 also ran NdArray).
fn rows(
    divergence: Divergence,
    s: &[f64],
    t: &[f64],
    shape: [usize; 2],
    temp: f64,
) -> Vec<Vec<f64>> {
    vec![rows_on(&Device::flex(), divergence, s, t, shape, temp)]
}

/// f32-representable logits of `[n, v]` rows.
fn logit_pair() -> impl Strategy<Value = (usize, usize, Vec<f64>, Vec<f64>)> {
    (1usize..4, 2usize..40).prop_flat_map(|(n, v)| {
        let f32s = proptest::collection::vec((-8.0f32..8.0).prop_map(f64::from), n * v);
        (Just(n), Just(v), f32s.clone(), f32s)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn nonnegative_zero_for_equal_and_bounded((n, v, s, t) in logit_pair(), temp in 0.5f64..5.0) {
        for d in Divergence::ALL {
            for backend in rows(d, &s, &t, [n, v], temp) {
                for r in backend {
                    // f32 rounding of Σ p (log p − log q) can dip a few ulps below 0.
                    prop_assert!(r >= -f32_rounding(temp, v), "{d:?}: {r}");
                }
            }
            // Same distribution: the teacher is the student shifted by a constant.
            let shifted: Vec<f64> = s.iter().map(|x| x + 3.0).collect();
            for backend in rows(d, &s, &shifted, [n, v], temp) {
                for r in backend {
                    prop_assert!(
                        r.abs() < f32_rounding(temp, v),
                        "{d:?} of equal distributions: {r} (T = {temp})"
                    );
                }
            }
        }
        for backend in rows(Divergence::Jsd { beta: 0.5 }, &s, &t, [n, v], 0.1) {
            for r in backend {
                // A sum of V f32 terms: a few ulps each near disjoint one-hots.
                prop_assert!(r <= std::f64::consts::LN_2 + 5e-6, "JSD {r} > ln 2");
            }
        }
        for backend in rows(Divergence::Tvd, &s, &t, [n, v], 0.1) {
            for r in backend {
                prop_assert!(r <= 1.0 + 1e-6, "TVD {r} > 1");
            }
        }
    }
}
