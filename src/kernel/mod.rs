//! The math of the row losses, one module per kernel language; the backend glue that feeds
//! them tensors lives in `crate::backend`.
//!
//! - `reference`: composed burn tensor ops, backend-generic, differentiable through burn's
//!   autodiff. It is the oracle every other path is tested against.
//! - `cpu`: the fused CPU row kernel (rayon across rows, runtime-dispatched SIMD), used by
//!   NdArray and Flex for f32 and f64 logits.
//! - `sparse_cpu`: the fused sparse-teacher CPU kernel (the student row in cache, the `k`
//!   teacher entries beside it), NdArray and Flex.
//! - `linear_cpu`: the fused-linear loss on the host (the LM heads by in-place GEMMs around
//!   the `cpu` row kernel against a dense teacher or the `sparse_cpu` one against a sparse
//!   teacher, chunk by chunk of rows), NdArray and Flex.
//! - `cube`: the fused CubeCL kernel (vector loads, one or several rows per cube, shared-memory
//!   reductions), used by the wgpu and CUDA backends for f32, f16 and bf16 logits
//!   (accumulating in f32).
//! - `sparse_cube`: the fused sparse-teacher CubeCL kernel (one cube per row, the `k` entries
//!   in shared memory), wgpu and CUDA.

use serde::{Deserialize, Serialize};

#[cfg(any(feature = "ndarray", feature = "flex"))]
pub(crate) mod cpu;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub(crate) mod cube;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub(crate) mod cube_row;
#[cfg(any(feature = "ndarray", feature = "flex"))]
pub(crate) mod linear_cpu;
#[cfg(any(feature = "ndarray", feature = "flex"))]
pub(crate) mod real;
pub(crate) mod reference;
#[cfg(any(feature = "ndarray", feature = "flex"))]
pub(crate) mod simd;
#[cfg(any(feature = "ndarray", feature = "flex"))]
pub(crate) mod sparse_cpu;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
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

/// Hooks for this crate's own tests and benchmarks; not part of the API (no semver promise).
#[doc(hidden)]
#[cfg(any(feature = "ndarray", feature = "flex"))]
pub mod internals {
    pub use super::cpu::{Isa, force_isa, zeroed_grad};
    /// Calls of the fused-linear host loop of NdArray and Flex on this thread so far.
    pub fn host_linear_calls() -> usize {
        super::linear_cpu::HOST_LINEAR_CALLS.with(|calls| calls.get())
    }
}
