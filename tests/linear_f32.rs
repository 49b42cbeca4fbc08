//! The fused-linear loss against the materialised path in f32 on every enabled backend
//! (NdArray, Flex, wgpu through burn's fusion wrapper).
#![cfg(feature = "ndarray")]

mod common;

use burn::backend::Autodiff;
use common::linear::sweep;

/// f32: per entry `1e-5 + 1e-3·|x|` (the chunked sums of `∂W = Σ h g` are reordered).
const TOL: (f64, f64) = (1e-5, 1e-3);

#[test]
fn ndarray() {
    sweep::<Autodiff<burn::backend::NdArray>>(TOL, &Default::default());
}

#[cfg(feature = "flex")]
#[test]
fn flex() {
    sweep::<Autodiff<burn::backend::Flex>>(TOL, &Default::default());
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu() {
    sweep::<Autodiff<burn::backend::Wgpu>>(TOL, &burn_distill::testing::wgpu_device());
}
