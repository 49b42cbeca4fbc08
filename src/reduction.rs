//! How per-row losses are reduced to the value that is returned.

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
