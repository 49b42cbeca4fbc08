//! Every case of the golden files (float64 PyTorch references), forward and gradient, and the
//! fused kernels against the reference, on each enabled backend: one line per backend through
//! the crate's exported conformance suites (`burn_distill::conformance_tests!`).

mod common;

#[allow(unused_imports)]
use burn::backend::Autodiff;

#[test]
fn golden_files_are_complete() {
    let cases = common::golden_cases();
    assert_eq!(cases.len(), 38);
    assert!(cases.iter().any(|c| c.student.contains(&f64::NEG_INFINITY)));
    let sparse = common::sparse::sparse_cases();
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

#[cfg(feature = "ndarray")]
burn_distill::conformance_tests!(
    ndarray,
    Autodiff<burn::backend::NdArray>,
    Default::default()
);

#[cfg(feature = "flex")]
burn_distill::conformance_tests!(flex, Autodiff<burn::backend::Flex>, Default::default());

// burn's default `Wgpu` (the fusion wrapper): `Auto` runs the fused CubeCL kernel as a custom
// operation of the fusion stream. Without an adapter the tests fail with one line saying how
// to get one.
#[cfg(feature = "wgpu")]
burn_distill::conformance_tests!(
    wgpu,
    Autodiff<burn::backend::Wgpu>,
    burn_distill::testing::wgpu_device()
);

/// burn's CubeCL backend on wgpu without the fusion wrapper.
#[cfg(feature = "wgpu")]
type WgpuCube = burn::backend::wgpu::CubeBackend<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>;

#[cfg(feature = "wgpu")]
burn_distill::conformance_tests!(
    wgpu_cube,
    Autodiff<WgpuCube>,
    burn_distill::testing::wgpu_device()
);

// CUDA (needs an NVIDIA GPU; CI only compiles these).
#[cfg(feature = "cuda")]
burn_distill::conformance_tests!(cuda, Autodiff<burn::backend::Cuda>, Default::default());
