//! Token rows at either rank: the losses take `[N, …]` rows or `[B, T, …]` sequences, check
//! their shapes as the caller passed them, and flatten a sequence to its `B·T` rows here, once.

use burn::tensor::{Int, Tensor};

use crate::DistillError;

/// The rank `D` of a loss's float inputs: `Rank<2>` for `[N, …]` rows, `Rank<3>` for
/// `[B, T, …]` sequences. Its [`TokenRank`] implementation names the targets of that rank.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Rank<const D: usize>;

/// What a rank of float inputs implies for the targets: `[N]` class indices for `[N, …]`
/// rows, `[B, T]` for `[B, T, …]` sequences. Implemented for `Rank<2>` and `Rank<3>` only.
pub(crate) trait TokenRank {
    /// The targets of this rank.
    type Targets;

    /// The targets flattened to `[N]` rows, after checking that their shape is `lead` (the
    /// student's rows, or its batch and sequence).
    fn flat_targets(targets: Self::Targets, lead: &[usize])
    -> Result<Tensor<1, Int>, DistillError>;
}

/// The targets that go with `D`-rank float inputs: `Tensor<1, Int>` for `D = 2`,
/// `Tensor<2, Int>` for `D = 3`.
pub(crate) type RankTargets<const D: usize> = <Rank<D> as TokenRank>::Targets;

impl TokenRank for Rank<2> {
    type Targets = Tensor<1, Int>;

    fn flat_targets(
        targets: Tensor<1, Int>,
        lead: &[usize],
    ) -> Result<Tensor<1, Int>, DistillError> {
        check_lead(
            &targets.dims(),
            lead,
            "one class index per row of the logits",
        )?;
        Ok(targets)
    }
}

impl TokenRank for Rank<3> {
    type Targets = Tensor<2, Int>;

    fn flat_targets(
        targets: Tensor<2, Int>,
        lead: &[usize],
    ) -> Result<Tensor<1, Int>, DistillError> {
        let dims = targets.dims();
        check_lead(&dims, lead, "the batch and sequence of the student's input")?;
        Ok(targets.reshape([dims[0] * dims[1]]))
    }
}

/// The targets' shape `dims` must be the student's leading dimensions `lead` (`why` says
/// what they are).
fn check_lead(dims: &[usize], lead: &[usize], why: &str) -> Result<(), DistillError> {
    if dims == lead {
        return Ok(());
    }
    Err(DistillError::invalid(
        "targets",
        format!("shape {dims:?}"),
        format!("shape {lead:?} ({why})"),
    ))
}

/// `[d₀, …, d_{D−2}, H]` as `[d₀ ⋯ d_{D−2}, H]` rows (a view of a contiguous tensor on Flex
/// and the CubeCL backends). Rows (`D = 2`) pass through untouched.
pub(crate) fn flat_rows<const D: usize>(x: Tensor<D>) -> Tensor<2> {
    let dims = x.dims();
    x.reshape([dims[..D - 1].iter().product(), dims[D - 1]])
}

/// The named input's shape, if no side is empty.
pub(crate) fn non_empty<const D: usize>(
    argument: &str,
    dims: [usize; D],
) -> Result<(), DistillError> {
    if dims.contains(&0) {
        let layout = if D == 2 { "[N, V]" } else { "[B, T, V]" };
        return Err(DistillError::invalid(
            argument,
            format!("shape {dims:?}"),
            format!("a non-empty {layout} tensor (no side of length 0)"),
        ));
    }
    Ok(())
}

/// `dims` of `argument` must equal `expected`, the shape of `reference`.
pub(crate) fn same_shape<const D: usize>(
    argument: &str,
    dims: [usize; D],
    reference: &str,
    expected: [usize; D],
) -> Result<(), DistillError> {
    crate::error::same_dims(argument, dims, reference, expected, "")
}

/// A sequence's teacher input `argument` (logits or hidden states, whose last dimension may
/// differ from the student's) must have the student's batch and sequence: flattening would
/// hide a transposed batch. Rows are checked with their whole shape by the loss.
pub(crate) fn same_lead<const D: usize>(
    argument: &str,
    dims: [usize; D],
    student_dims: [usize; D],
) -> Result<(), DistillError> {
    if D > 2 && dims[..D - 1] != student_dims[..D - 1] {
        return Err(DistillError::invalid(
            argument,
            format!("shape {dims:?}"),
            format!(
                "{:?} leading dimensions (the batch and sequence of the student's shape \
                 {student_dims:?})",
                &student_dims[..D - 1]
            ),
        ));
    }
    Ok(())
}
