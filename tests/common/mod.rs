//! Shared test helpers: the crate's exported conformance suites (`burn_distill::testing`) and
//! their data, under the names the tests use, plus float64 tensors on Flex (the 0.1 tests ran
//! on `NdArray<f64>`; in 0.2 a tensor's dtype is chosen where it is created).
#![allow(dead_code, unused_imports)]

use burn::tensor::{DType, Device, Tensor, TensorData};

pub use burn_distill::testing::{
    Case, GRAD_TOL, LOSS_TOL, assert_golden, close, compare, golden_cases, ints, load_cases,
    mismatches, number, numbers, parse_divergence, parse_reduction, run_case, tensor2, values,
};

/// Flex's device with autodiff, for the float64 tests that take gradients.
pub fn flex_autodiff() -> Device {
    Device::flex().autodiff()
}

/// `[N, V]` float64 tensor from row-major values (whatever the device's default float dtype).
pub fn tensor2_f64(values: &[f64], shape: [usize; 2], device: &Device) -> Tensor<2> {
    Tensor::from_data(
        TensorData::new(values.to_vec(), shape),
        (device, DType::F64),
    )
}

/// `[B, T, V]` float64 tensor from row-major values.
pub fn tensor3_f64(values: &[f64], shape: [usize; 3], device: &Device) -> Tensor<3> {
    Tensor::from_data(
        TensorData::new(values.to_vec(), shape),
        (device, DType::F64),
    )
}

/// The values of a float64 tensor; panics if the tensor is not float64 (a float64 test whose
/// values came back in f32 would compare f32 roundings against float64 tolerances).
pub fn values_f64<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    assert_eq!(
        t.dtype(),
        DType::F64,
        "a float64 test computed in {:?}",
        t.dtype()
    );
    values(t)
}

/// The fused-linear checks (0.1's tests/common/linear.rs).
pub mod linear;

/// The sparse-teacher golden cases and their runner (`burn_distill::testing::sparse`).
pub mod sparse {
    pub use burn_distill::testing::sparse::*;
}
