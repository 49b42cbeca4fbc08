//! Every case of the golden file (float64 PyTorch references), forward and gradient, on each
//! enabled backend.

mod common;

use burn_distill::Kernel;

#[test]
fn golden_file_is_found_and_complete() {
    let cases = common::golden_cases();
    assert_eq!(cases.len(), 38);
    assert!(cases.iter().any(|c| c.student.contains(&f64::NEG_INFINITY)));
}

/// The sparse-teacher (top-k) golden cases at f32 tolerances on each backend (float64 runs
/// are in tests/sparse.rs).
#[cfg(feature = "ndarray")]
#[test]
fn sparse_golden_ndarray() {
    use burn::backend::{Autodiff, NdArray};
    use common::{GRAD_TOL, LOSS_TOL};
    common::sparse::assert_sparse_golden::<Autodiff<NdArray>>(
        &Default::default(),
        LOSS_TOL,
        GRAD_TOL,
    );
}

#[cfg(feature = "flex")]
#[test]
fn sparse_golden_flex() {
    use burn::backend::{Autodiff, Flex};
    use common::{GRAD_TOL, LOSS_TOL};
    common::sparse::assert_sparse_golden::<Autodiff<Flex>>(&Default::default(), LOSS_TOL, GRAD_TOL);
}

#[cfg(feature = "wgpu")]
#[test]
fn sparse_golden_wgpu() {
    use burn::backend::{Autodiff, Wgpu};
    use common::{GRAD_TOL, LOSS_TOL};
    common::sparse::assert_sparse_golden::<Autodiff<Wgpu>>(&Default::default(), LOSS_TOL, GRAD_TOL);
}

#[cfg(feature = "ndarray")]
#[test]
fn golden_ndarray() {
    use burn::backend::{Autodiff, NdArray};
    common::assert_golden::<Autodiff<NdArray>>(&Default::default(), Kernel::Reference);
}

#[cfg(feature = "ndarray")]
#[test]
fn golden_ndarray_fused() {
    use burn::backend::{Autodiff, NdArray};
    common::assert_golden::<Autodiff<NdArray>>(&Default::default(), Kernel::Fused);
}

#[cfg(feature = "flex")]
#[test]
fn golden_flex() {
    use burn::backend::{Autodiff, Flex};
    common::assert_golden::<Autodiff<Flex>>(&Default::default(), Kernel::Reference);
}

#[cfg(feature = "flex")]
#[test]
fn golden_flex_fused() {
    use burn::backend::{Autodiff, Flex};
    common::assert_golden::<Autodiff<Flex>>(&Default::default(), Kernel::Fused);
}

/// burn's default `Wgpu` (the fusion wrapper): `Auto` runs the fused CubeCL kernel as a custom
/// fusion operation.
#[cfg(feature = "wgpu")]
#[test]
fn golden_wgpu_fused() {
    use burn::backend::{Autodiff, Wgpu};
    common::assert_golden::<Autodiff<Wgpu>>(&Default::default(), Kernel::Auto);
}

#[cfg(feature = "wgpu")]
#[test]
fn golden_wgpu_reference() {
    use burn::backend::{Autodiff, Wgpu};
    common::assert_golden::<Autodiff<Wgpu>>(&Default::default(), Kernel::Reference);
}

/// burn's CubeCL backend on wgpu without the fusion wrapper: the fused CubeCL kernel.
#[cfg(feature = "wgpu")]
type WgpuCube = burn::backend::wgpu::CubeBackend<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>;

#[cfg(feature = "wgpu")]
#[test]
fn golden_wgpu_cube_fused() {
    use burn::backend::Autodiff;
    common::assert_golden::<Autodiff<WgpuCube>>(&Default::default(), Kernel::Fused);
}

/// CUDA (needs an NVIDIA GPU; CI only compiles these): the fused CubeCL kernel through the
/// fusion wrapper, the reference, and the sparse-teacher losses.
#[cfg(feature = "cuda")]
#[test]
fn golden_cuda_fused() {
    use burn::backend::{Autodiff, Cuda};
    common::assert_golden::<Autodiff<Cuda>>(&Default::default(), Kernel::Auto);
}

#[cfg(feature = "cuda")]
#[test]
fn golden_cuda_reference() {
    use burn::backend::{Autodiff, Cuda};
    common::assert_golden::<Autodiff<Cuda>>(&Default::default(), Kernel::Reference);
}

#[cfg(feature = "cuda")]
#[test]
fn sparse_golden_cuda() {
    use burn::backend::{Autodiff, Cuda};
    use common::{GRAD_TOL, LOSS_TOL};
    common::sparse::assert_sparse_golden::<Autodiff<Cuda>>(&Default::default(), LOSS_TOL, GRAD_TOL);
}
