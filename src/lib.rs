//! # burn-distill
//!
//! Knowledge distillation for the [burn](https://burn.dev) deep-learning framework: train a
//! small *student* to match a large *teacher*'s output distribution.
//!
//! - [`DistillLossConfig`] / [`DistillLoss`]: the soft loss (teacher and student at
//!   temperature `T`, scaled by `T²`) in every common [`Divergence`] (forward/reverse KL,
//!   JSD(β), skew KL, skew reverse KL, TVD), the hard cross-entropy with label smoothing, their
//!   `α`-mix, `ignore_index` masking for sequences, and [`Reduction`]s;
//! - [`temperature_softmax`] and [`temperature_log_softmax`];
//! - [`DistillBackend`]: the backend extension trait the loss dispatches through, implemented
//!   for NdArray, Flex, wgpu, CUDA (with burn's fusion wrapper) and `Autodiff<B>`;
//! - fused kernels: a CPU row kernel for NdArray and Flex and a CubeCL kernel for wgpu and
//!   CUDA, wrapped in a custom autodiff node; [`Kernel`] selects them (`Auto`, `Reference`,
//!   `Fused`).
//! - for language models: [`SparseDistillLoss`] against a [`SparseTeacher`] (top-k
//!   log-probabilities from an API, with the [`TailPolicy`] conventions of DistillKit and
//!   Megatron-LM or a tail bucket), an offline [`store`] of top-k teachers,
//!   [`DistillLoss::forward_linear`] (the loss from hidden states and LM heads without the
//!   `[N, V]` logits), logit soft-capping, [`VocabMismatch`] policies, and [`HiddenStateLoss`].
//!
//! ```
//! use burn::backend::{Autodiff, NdArray};
//! use burn::tensor::{Int, Tensor};
//! use burn_distill::{DistillLossConfig, Divergence, Reduction};
//!
//! type B = Autodiff<NdArray>;
//! let device = Default::default();
//! let student = Tensor::<B, 2>::from_floats([[2.0, 0.5, -1.0]], &device).require_grad();
//! let teacher = Tensor::<B, 2>::from_floats([[3.0, 1.0, -2.0]], &device);
//! let targets = Tensor::<B, 1, Int>::from_ints([0], &device);
//!
//! let loss = DistillLossConfig::new()
//!     .with_temperature(4.0)
//!     .with_alpha(0.9)
//!     .with_divergence(Divergence::ForwardKl)
//!     .with_reduction(Reduction::Mean)
//!     .init();
//! let value = loss.forward(student.clone(), teacher, targets);
//! let grads = value.backward();
//! let grad = student.grad(&grads).unwrap();
//! # assert_eq!(grad.dims(), [1, 3]);
//! ```
#![warn(missing_docs)]

mod backend;
pub mod cross;
mod divergence;
mod error;
mod hidden;
mod kernel;
mod linear;
mod loss;
pub mod onpolicy;
#[cfg(feature = "collective")]
mod parallel;
mod params;
mod rank;
mod reduction;
mod softmax;
mod sparse;
mod sparse_linear;
pub mod store;
mod tail;
pub mod testing;
mod validation;
mod vocab;

pub use backend::{
    DenseCall, DistillBackend, DistillParts, FusedOutput, KernelCall, LinearCall, LinearGrads,
    LinearOutput, LinearRun, LinearSetup, LinearSide, LogitsRun, SparseCall, SparseInputs,
    SparseLinearCall, SparseLinearRun, SparseSetup, reference_loss,
};
pub use divergence::Divergence;
pub use error::DistillError;
pub use hidden::{HiddenLossKind, HiddenStateLoss, HiddenStateLossConfig};
pub use kernel::Kernel;
#[doc(hidden)]
#[cfg(any(feature = "ndarray", feature = "flex"))]
pub use kernel::internals;
pub use loss::{DistillLoss, DistillLossConfig, DistillOutput};
#[cfg(feature = "collective")]
pub use parallel::{VocabShard, vocab_parallel};
pub use params::DistillParams;
pub use rank::{Rank, RankTargets, TokenRank};
pub use reduction::Reduction;
pub use softmax::{
    temperature_log_softmax, temperature_softmax, try_temperature_log_softmax,
    try_temperature_softmax,
};
pub use sparse::{SparseDistillLoss, SparseDistillLossConfig, SparseTeacher};
pub use tail::{StudentSupport, TAIL_FLOOR, TailPolicy};
pub use validation::Validation;
pub use vocab::{MASKED_LOGIT, VocabMismatch};
