//! # burn-distill
//!
//! Knowledge distillation for the [burn](https://burn.dev) deep-learning framework (0.22):
//! train a small *student* to match a large *teacher*'s output distribution.
//!
//! - [`DistillLossConfig`] / [`DistillLoss`]: the soft loss (teacher and student at
//!   temperature `T`, scaled by `T²`) in every common [`Divergence`] (forward/reverse KL,
//!   JSD(β), skew KL, skew reverse KL, TVD), the hard cross-entropy with label smoothing, their
//!   `α`-mix, `ignore_index` masking for sequences, and [`Reduction`]s, for `[N, V]` rows and
//!   `[B, T, V]` sequences;
//! - [`temperature_softmax`] and [`temperature_log_softmax`];
//! - [`backend`]: what a backend implementer needs (the extension trait of the fused kernels).
//!
//! ```
//! use burn::tensor::{Device, Int, Tensor};
//! use burn_distill::{DistillLossConfig, Divergence, Reduction};
//!
//! let device = Device::default().autodiff();
//! let student = Tensor::<2>::from_floats([[2.0, 0.5, -1.0]], &device).require_grad();
//! let teacher = Tensor::<2>::from_floats([[3.0, 1.0, -2.0]], &device);
//! let targets = Tensor::<1, Int>::from_ints([0], &device);
//!
//! let loss = DistillLossConfig::new()
//!     .with_temperature(4.0)
//!     .with_alpha(0.9)
//!     .with_divergence(Divergence::ForwardKl)
//!     .with_reduction(Reduction::Mean)
//!     .init();
//! let value = loss.forward(student.clone(), teacher, targets);
//! let grads = value.backward();
//! let grad = student.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
//! // The student's first logit is pulled up (the teacher and the target both favour it).
//! assert!(grad[0] < 0.0 && grad.iter().sum::<f32>().abs() < 1e-6);
//! ```
#![warn(missing_docs)]

pub mod backend;
pub mod cross;
mod divergence;
mod error;
mod hidden;
mod kernel;
mod linear;
mod loss;
pub mod onpolicy;
mod parallel;
mod params;
mod rank;
mod reduction;
mod softmax;
mod sparse;
pub mod store;
mod tail;
pub mod testing;
mod validation;
mod vocab;

pub use divergence::Divergence;
pub use error::DistillError;
pub use hidden::{HiddenLossKind, HiddenStateLoss, HiddenStateLossConfig};
pub use kernel::Kernel;
pub use loss::{DistillLoss, DistillLossConfig, DistillOutput};
pub use parallel::{LocalExchange, RowExchange, VocabShard};
pub use params::DistillParams;
pub use reduction::Reduction;
pub use softmax::{
    temperature_log_softmax, temperature_softmax, try_temperature_log_softmax,
    try_temperature_softmax,
};
pub use sparse::{SparseDistillLoss, SparseDistillLossConfig, SparseTeacher};
pub use tail::{StudentSupport, TAIL_FLOOR, TailPolicy};
pub use validation::Validation;
pub use vocab::{MASKED_LOGIT, VocabMismatch};

/// Hooks for this crate's own tests and benchmarks; not part of the API (no semver promise).
#[doc(hidden)]
pub mod internals {
    #[cfg(feature = "flex")]
    pub use crate::kernel::cpu::{Isa, force_isa, zeroed_grad};

    /// Runs of the fused-linear host loop of Flex on this thread so far.
    #[cfg(feature = "flex")]
    pub fn host_linear_calls() -> usize {
        crate::kernel::linear_cpu::HOST_LINEAR_CALLS.with(|calls| calls.get())
    }

    /// Runs of the fused-linear chunk loop (tensor code) on this thread so far.
    pub fn chunked_linear_calls() -> usize {
        crate::linear::CHUNKED_CALLS.with(|calls| calls.get())
    }
}

/// The README's examples, compiled and run as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// The guide's examples (`docs/guide/*.md`), compiled and run as doc tests: one item per
/// chapter.
#[cfg(doctest)]
pub mod guide {
    #[doc = include_str!("../docs/guide/losses.md")]
    pub struct Losses;
    #[doc = include_str!("../docs/guide/language-models.md")]
    pub struct LanguageModels;
    #[doc = include_str!("../docs/guide/on-policy.md")]
    pub struct OnPolicy;
    #[doc = include_str!("../docs/guide/cross-tokenizer.md")]
    pub struct CrossTokenizer;
    #[doc = include_str!("../docs/guide/coming-from-pytorch.md")]
    pub struct ComingFromPytorch;
    #[doc = include_str!("../docs/guide/bad-input.md")]
    pub struct BadInput;
    #[doc = include_str!("../docs/guide/backends-and-kernels.md")]
    pub struct BackendsAndKernels;
    #[doc = include_str!("../docs/guide/benchmarks.md")]
    pub struct Benchmarks;
    #[doc = include_str!("../docs/guide/experiments.md")]
    pub struct Experiments;
    #[doc = include_str!("../docs/guide/multi-device.md")]
    pub struct MultiDevice;
    #[doc = include_str!("../docs/guide/architecture.md")]
    pub struct Architecture;
}
