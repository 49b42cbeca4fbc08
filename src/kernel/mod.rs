//! The math of the row losses, one module per kernel language; the backend glue that feeds
//! them tensors lives in `crate::backend`.
//!
//! - `reference`: composed burn tensor ops, backend-generic, differentiable through burn's
//!   autodiff. It is the oracle every other path is tested against.
//! - `cpu`: the fused CPU row kernel (rayon across rows, runtime-dispatched SIMD), used by
//!   Flex for f32 and f64 logits.
//! - `cube`: the fused CubeCL kernel (vector loads, one or several rows per cube, shared-memory
//!   reductions), used by the CubeCL backends (wgpu, CUDA) for f32, f16 and bf16 logits
//!   (accumulating in f32); `cube_row` holds the `#[cube]` pieces of a row.
//! - `linear_cpu`: the fused-linear loss on the host (the LM heads by in-place GEMMs around
//!   the `cpu` row kernel against a dense teacher or the `sparse_cpu` one against a sparse
//!   teacher, chunk by chunk of rows), Flex.
//! - `sparse_cpu`, `sparse_cube`: the fused sparse-teacher kernels (the student row beside the
//!   `k` teacher entries), Flex and CubeCL.

use serde::{Deserialize, Serialize};

#[cfg(feature = "flex")]
pub(crate) mod cpu;
#[cfg(feature = "cube")]
pub(crate) mod cube;
#[cfg(feature = "cube")]
pub(crate) mod cube_row;
#[cfg(feature = "flex")]
pub(crate) mod linear_cpu;
#[cfg(feature = "flex")]
pub(crate) mod real;
pub(crate) mod reference;
#[cfg(feature = "flex")]
pub(crate) mod simd;
#[cfg(feature = "flex")]
pub(crate) mod sparse_cpu;
#[cfg(feature = "cube")]
pub(crate) mod sparse_cube;

/// Which implementation computes the loss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Kernel {
    /// The fused kernel where the backend has one for these inputs, else the reference.
    #[default]
    Auto,
    /// Always the reference implementation (burn tensor ops): the oracle.
    Reference,
    /// Always the fused kernel; a clear error where the backend has none.
    Fused,
}
