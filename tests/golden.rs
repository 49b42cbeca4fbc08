//! Every case of the golden files (float64 PyTorch references), forward and gradient, on each
//! enabled device: one line per device through the crate's exported conformance suites
//! (`burn_distill::conformance_tests!`).

use burn::tensor::Device;

#[test]
fn golden_files_are_complete() {
    let cases = burn_distill::testing::golden_cases();
    assert_eq!(cases.len(), 38);
    assert!(cases.iter().any(|c| c.student.contains(&f64::NEG_INFINITY)));
    let sparse = burn_distill::testing::sparse::sparse_cases();
    assert_eq!(sparse.len(), 24);
    assert_eq!(
        sparse
            .iter()
            .filter(|c| c.config.loss.logit_softcap.is_some())
            .count(),
        3
    );
    // tests/golden/onpolicy.json: sampled-token and cross-tokenizer cases.
    assert_eq!(burn_distill::testing::onpolicy::case_counts(), (14, 10));
}

#[cfg(feature = "flex")]
burn_distill::conformance_tests!(flex, Device::flex(), fused);

// wgpu (on CI: Mesa's lavapipe). Without an adapter the tests fail with one line saying how
// to get one.
#[cfg(feature = "wgpu")]
burn_distill::conformance_tests!(wgpu, burn_distill::testing::wgpu_device(), fused);
