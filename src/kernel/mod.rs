//! Implementations of the row losses behind [`DistillBackend`](crate::DistillBackend).
//!
//! - [`reference`](mod@reference): composed burn tensor ops, backend-generic, differentiable through burn's
//!   autodiff. It is the oracle every other path is tested against.

pub mod reference;
