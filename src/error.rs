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
        "invalid targets: targets[{row}] = {value} is out of range, expected a class index in \
         [0, {classes}){}",
        ignore_index.map(|i| format!(" or the ignore_index {i}")).unwrap_or_default()
    )]
    TargetOutOfRange {
        /// The (flattened) row of the first offending target.
        row: usize,
        /// The offending target value.
        value: i64,
        /// The vocabulary size `V`.
        classes: usize,
        /// The configured ignore index, if any.
        ignore_index: Option<i64>,
    },
    /// A collective operation between peers failed (burn-collective's error, with the step of
    /// the loss that issued it).
    #[error("collective {operation} failed: {message}")]
    Collective {
        /// The step of the loss, e.g. `all-reduce of the row statistics`.
        operation: String,
        /// burn-collective's error.
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

/// `dims` of `[N, V]` logits named `argument` (`columns` names `V`), or an error where a side
/// is empty.
pub(crate) fn non_empty(
    argument: &str,
    [n, v]: [usize; 2],
    columns: &str,
) -> Result<[usize; 2], DistillError> {
    if n == 0 || v == 0 {
        return Err(DistillError::invalid(
            argument,
            format!("shape [{n}, {v}]"),
            format!("a non-empty [N, {columns}] tensor (N >= 1 rows, {columns} >= 1 columns)"),
        ));
    }
    Ok([n, v])
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
pub(crate) fn or_panic<T>(result: Result<T, DistillError>) -> T {
    result.unwrap_or_else(|e| panic!("burn-distill: {e}"))
}

/// The panicking forms of a loss's methods (burn's convention for bad input), each declared
/// as the fallible call it unwraps: an entry
///
/// ```text
/// /// Docs.
/// pub fn forward<B: DistillBackend>(&self, x: Tensor<B, 2>) -> Tensor<B, 1> {
///     self.try_forward_parts(x, None).loss
/// }
/// ```
///
/// becomes that method with the body `or_panic(self.try_forward_parts(x, None)).loss`: the
/// error's message is the panic's. The `try_` method holds the logic and the checks. An entry
/// is a `pub fn` of `&self` with at most one generic parameter of one bound, no `where`
/// clause, and a body of one `self.` call with at most one field read after it. rustfmt does
/// not format inside the macro: entries are wrapped by hand at 100 columns.
macro_rules! panicking {
    ($(
        $(#[$attr:meta])*
        pub fn $name:ident $(<$b:ident: $bound:path>)? (&self $(, $arg:ident: $ty:ty)* $(,)?)
            -> $ret:ty {
            self.$try:ident($($call:expr),* $(,)?) $(.$field:ident)?
        }
    )*) => {
        $(
            $(#[$attr])*
            pub fn $name $(<$b: $bound>)? (&self $(, $arg: $ty)*) -> $ret {
                $crate::error::or_panic(self.$try($($call),*)) $(.$field)?
            }
        )*
    };
}
pub(crate) use panicking;
