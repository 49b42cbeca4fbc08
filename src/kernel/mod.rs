//! Implementations of the row losses behind [`DistillBackend`](crate::DistillBackend).
//!
//! - [`reference`](mod@reference): composed burn tensor ops, backend-generic, differentiable
//!   through burn's autodiff. It is the oracle every other path is tested against.
//! - [`cpu`]: the fused CPU row kernel (rayon across rows, runtime-dispatched SIMD), used by
//!   NdArray and Flex for f32 and f64 logits.
//! - `cube`: the fused CubeCL kernel (one cube per row, shared-memory reductions), used by the
//!   wgpu and CUDA backends for f32, f16 and bf16 logits (accumulating in f32).

use serde::{Deserialize, Serialize};

#[cfg(any(feature = "ndarray", feature = "flex"))]
pub mod cpu;
#[cfg(any(feature = "ndarray", feature = "flex"))]
mod cpu_backends;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod cube;
#[cfg(any(feature = "ndarray", feature = "flex"))]
pub mod real;
pub mod reference;

/// Which implementation computes the loss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kernel {
    /// The fused kernel where the backend has one for these inputs, else the reference.
    #[default]
    Auto,
    /// Always the reference implementation (burn tensor ops): the oracle.
    Reference,
    /// Always the fused kernel; a clear error where the backend has none.
    Fused,
}
