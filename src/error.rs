//! The crate's error type.

use thiserror::Error;

/// Why a configuration or an input was rejected.
///
/// Every message names the argument, the value that was given and what was expected, so a
/// failing training run says exactly which knob or tensor to fix.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum DistillError {
    /// A configuration value or an input tensor does not meet its contract.
    #[error("invalid {argument}: got {value}, expected {expected}")]
    InvalidArgument {
        /// The argument at fault, e.g. `temperature` or `targets`.
        argument: String,
        /// The value (or shape) that was given.
        value: String,
        /// What the argument must be.
        expected: String,
    },
    /// A target class index lies outside `[0, V)` and is not the ignore index.
    #[error(
        "invalid targets: targets[{}] = {value} is out of range, expected a class index in \
         [0, {classes}){}",
        position(at),
        ignore_index.map(|i| format!(" or the ignore_index {i}")).unwrap_or_default()
    )]
    TargetOutOfRange {
        /// The row of the first offending target among the loss's token rows (`b·T + t` for
        /// position `[b, t]` of a sequence's targets).
        row: usize,
        /// Its position in the targets tensor the caller passed: `[row]` for rows, `[b, t]`
        /// for a sequence's `[B, T]` targets.
        at: Vec<usize>,
        /// The offending target value.
        value: i64,
        /// The vocabulary size `V`.
        classes: usize,
        /// The configured ignore index, if any.
        ignore_index: Option<i64>,
    },
    /// A collective operation between peers failed (the exchange's error, with the step of
    /// the loss that issued it).
    #[error("collective {operation} failed: {message}")]
    Collective {
        /// The step of the loss, e.g. `all-reduce of the row statistics`.
        operation: String,
        /// The exchange's error.
        message: String,
    },
}

impl DistillError {
    /// Shorthand for [`DistillError::InvalidArgument`].
    pub(crate) fn invalid(
        argument: impl Into<String>,
        value: impl ToString,
        expected: impl Into<String>,
    ) -> Self {
        Self::InvalidArgument {
            argument: argument.into(),
            value: value.to_string(),
            expected: expected.into(),
        }
    }
}

/// `dims` of `argument` must equal `expected`, the shape of `reference` (`note` adds why).
pub(crate) fn same_dims<const D: usize>(
    argument: &str,
    dims: [usize; D],
    reference: &str,
    expected: [usize; D],
    note: &str,
) -> Result<(), DistillError> {
    if dims == expected {
        return Ok(());
    }
    Err(DistillError::invalid(
        argument,
        format!("shape {dims:?}"),
        format!("the {reference} shape {expected:?}{note}"),
    ))
}

/// Unwraps a result, panicking with the error's message (burn's convention for bad input).
///
/// `#[track_caller]` here and on every panicking method of the crate: the panic names the
/// caller's file and line, not this one.
#[track_caller]
pub(crate) fn or_panic<T>(result: Result<T, DistillError>) -> T {
    match result {
        Ok(value) => value,
        Err(e) => panic!("burn-distill: {e}"),
    }
}

/// `[d₀, …]` as `d₀, …`: a position in a tensor, for messages (`targets[1, 5]`).
pub(crate) fn position(at: &[usize]) -> String {
    at.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The position of the `row`-th element (row-major) of a tensor of shape `dims`.
pub(crate) fn unravel(mut row: usize, dims: &[usize]) -> Vec<usize> {
    let mut at = vec![0; dims.len()];
    for (a, &d) in at.iter_mut().zip(dims).rev() {
        let d = d.max(1);
        *a = row % d;
        row /= d;
    }
    at
}
