//! Token rows at either rank: the losses take `[N, …]` rows or `[B, T, …]` sequences through
//! one method each, and flatten a sequence to its `B·T` rows here, once.

use burn::tensor::{Int, Tensor, backend::Backend};

use crate::DistillError;

/// The rank `D` of a loss's float inputs: `Rank<2>` for `[N, …]` rows, `Rank<3>` for
/// `[B, T, …]` sequences. Its [`TokenRank`] implementation names the targets of that rank.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rank<const D: usize>;

/// What a rank of float inputs implies for the targets: `[N]` class indices for `[N, …]`
/// rows, `[B, T]` for `[B, T, …]` sequences. Implemented for [`Rank<2>`] and [`Rank<3>`] only
/// (sealed).
pub trait TokenRank<B: Backend>: sealed::Sealed {
    /// The targets of this rank.
    type Targets;

    /// The targets flattened to `[N]` rows: a sequence's after checking that their shape is
    /// `lead` (the student's batch and sequence); rows as they are (the loss checks them with
    /// their values).
    #[doc(hidden)]
    fn flat_targets(
        targets: Self::Targets,
        lead: &[usize],
    ) -> Result<Tensor<B, 1, Int>, DistillError>;
}

mod sealed {
    /// Only the ranks this crate implements [`super::TokenRank`] for.
    pub trait Sealed {}
    impl Sealed for super::Rank<2> {}
    impl Sealed for super::Rank<3> {}
}

/// The targets that go with `D`-rank float inputs: `Tensor<B, 1, Int>` for `D = 2`,
/// `Tensor<B, 2, Int>` for `D = 3`.
pub type RankTargets<B, const D: usize> = <Rank<D> as TokenRank<B>>::Targets;

/// `Rank<D>` takes `Tensor<B, D − 1, Int>` targets. A sequence's are checked against the
/// student's batch and sequence here; rows are left to the loss's own target check.
macro_rules! token_ranks {
    ($($rank:literal => $targets:literal),*) => {$(
        impl<B: Backend> TokenRank<B> for Rank<$rank> {
            type Targets = Tensor<B, $targets, Int>;

            fn flat_targets(
                targets: Self::Targets,
                lead: &[usize],
            ) -> Result<Tensor<B, 1, Int>, DistillError> {
                if $targets == 1 {
                    // Already flat (a `reshape` would copy a shared NdArray tensor).
                    return Ok(Tensor::from_primitive(targets.into_primitive()));
                }
                let dims = targets.dims();
                if dims[..] != *lead {
                    return Err(DistillError::invalid(
                        "targets",
                        format!("shape {dims:?}"),
                        format!("shape {lead:?} (the batch and sequence of the student's input)"),
                    ));
                }
                Ok(targets.reshape([dims.iter().product::<usize>()]))
            }
        }
    )*};
}

token_ranks!(2 => 1, 3 => 2);

/// `[d₀, …, d_{D−2}, H]` as `[d₀ ⋯ d_{D−2}, H]` rows. Rows (`D = 2`) pass through untouched:
/// a `reshape`, even to the same shape, copies a shared NdArray tensor (and so would cost a
/// copy of the logits and the fused kernel's in-place gradient).
pub(crate) fn flat_rows<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, 2> {
    if D == 2 {
        return Tensor::from_primitive(x.into_primitive());
    }
    let dims = x.dims();
    x.reshape([dims[..D - 1].iter().product(), dims[D - 1]])
}

/// `[N, H]` rows and their optional `[N]` targets.
pub(crate) type Rows<B> = (Tensor<B, 2>, Option<Tensor<B, 1, Int>>);

/// The student's input flattened to rows, with its targets flattened the same way: a
/// sequence's tokens become rows, rows stay as they are.
pub(crate) fn flatten<B: Backend, const D: usize>(
    student: Tensor<B, D>,
    targets: Option<RankTargets<B, D>>,
) -> Result<Rows<B>, DistillError>
where
    Rank<D>: TokenRank<B>,
{
    let dims = student.dims();
    let targets = targets
        .map(|y| <Rank<D> as TokenRank<B>>::flat_targets(y, &dims[..D - 1]))
        .transpose()?;
    Ok((flat_rows(student), targets))
}

/// The teacher's input `argument` (logits or hidden states, whose last dimension may differ
/// from the student's) flattened to rows, after checking that a sequence's leading dimensions
/// are the student's `student_dims` (flattening would hide a transposed batch). Rows are
/// checked by the loss.
pub(crate) fn flatten_like<B: Backend, const D: usize>(
    argument: &str,
    teacher: Tensor<B, D>,
    student_dims: [usize; D],
) -> Result<Tensor<B, 2>, DistillError> {
    let dims = teacher.dims();
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
    Ok(flat_rows(teacher))
}
