//! The fused-linear loss against the materialised path in f32 on every enabled backend
//! (NdArray, Flex, wgpu through burn's fusion wrapper).
#![cfg(feature = "ndarray")]

mod common;

use burn::backend::Autodiff;
use common::linear::{assert_linear_golden, check_frozen_head, check_sparse_linear, sweep};

/// f32: per entry `1e-5 + 1e-3·|x|` (the chunked sums of `∂W = Σ h g` are reordered).
const TOL: (f64, f64) = (1e-5, 1e-3);

#[test]
fn ndarray() {
    sweep::<Autodiff<burn::backend::NdArray>>(TOL, &Default::default());
    assert_linear_golden::<Autodiff<burn::backend::NdArray>>(TOL, &Default::default(), true);
    check_frozen_head::<Autodiff<burn::backend::NdArray>>(TOL, &Default::default());
    check_sparse_linear::<Autodiff<burn::backend::NdArray>>(TOL, &Default::default());
}

#[cfg(feature = "flex")]
#[test]
fn flex() {
    let before = burn_distill::internals::host_linear_calls();
    sweep::<Autodiff<burn::backend::Flex>>(TOL, &Default::default());
    // Flex ran its host loop (the sweep's calls with the fused kernel).
    assert!(burn_distill::internals::host_linear_calls() > before);
    assert_linear_golden::<Autodiff<burn::backend::Flex>>(TOL, &Default::default(), true);
    check_frozen_head::<Autodiff<burn::backend::Flex>>(TOL, &Default::default());
    check_sparse_linear::<Autodiff<burn::backend::Flex>>(TOL, &Default::default());
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu() {
    let device = burn_distill::testing::wgpu_device();
    sweep::<Autodiff<burn::backend::Wgpu>>(TOL, &device);
    assert_linear_golden::<Autodiff<burn::backend::Wgpu>>(TOL, &device, false);
    check_frozen_head::<Autodiff<burn::backend::Wgpu>>(TOL, &device);
    check_sparse_linear::<Autodiff<burn::backend::Wgpu>>(TOL, &device);
}
