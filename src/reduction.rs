//! How per-row losses are reduced to the value that is returned.

use burn::tensor::{Bool, Int, Tensor, backend::Backend};
use serde::{Deserialize, Serialize};

/// Reduction over the rows (tokens) of a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reduction {
    /// Sum of the row losses divided by the number of rows that are not ignored
    /// (`0`, with zero gradient, when every row is ignored).
    #[default]
    Mean,
    /// Sum of the row losses. Use it for gradient accumulation over micro-batches: divide the
    /// sum of each micro-batch by the global count of non-ignored rows and the accumulated
    /// gradient equals the full-batch [`Reduction::Mean`] gradient.
    Sum,
    /// The `N` row losses, `0` for ignored rows.
    None,
}

/// Rows whose target is the ignore index, if there are targets and an ignore index.
pub(crate) fn ignored_rows<B: Backend>(
    targets: Option<&Tensor<B, 1, Int>>,
    ignore_index: Option<i64>,
) -> Option<Tensor<B, 1, Bool>> {
    Some(targets?.clone().equal_elem(ignore_index?))
}

/// Reduces `[N]` row losses; `ignored` rows (already 0) do not count in the mean.
pub(crate) fn reduce_rows<B: Backend>(
    rows: Tensor<B, 1>,
    ignored: Option<Tensor<B, 1, Bool>>,
    reduction: Reduction,
) -> Tensor<B, 1> {
    match reduction {
        Reduction::None => rows,
        Reduction::Sum => rows.sum(),
        Reduction::Mean => match ignored {
            // Count in the dtype of the loss (`ones_like`, not `Bool::float()`); max(count, 1):
            // an all-ignored batch gives 0 / 1 = 0 with zero gradient.
            Some(ignored) => {
                let kept = rows.ones_like().mask_fill(ignored, 0.0).sum();
                rows.sum() / kept.clamp_min(1.0)
            }
            None => {
                let n = rows.dims()[0] as f64;
                rows.sum().mul_scalar(n.recip())
            }
        },
    }
}
