//! The loss parameters every layer reads: resolved once from a validated configuration.

use crate::{Divergence, Reduction};

/// Everything a loss implementation needs to know, resolved from a validated
/// [`DistillLossConfig`](crate::DistillLossConfig) (the only way to build one, so a kernel never
/// sees an unchecked value). Read it through its accessors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DistillParams {
    pub(crate) temperature: f64,
    pub(crate) alpha: f64,
    pub(crate) divergence: Divergence,
    pub(crate) scale_by_t2: bool,
    pub(crate) ignore_index: Option<i64>,
    pub(crate) label_smoothing: f64,
    pub(crate) reduction: Reduction,
}

impl DistillParams {
    /// Temperature `T > 0` (finite) of both distributions in the soft term.
    pub fn temperature(&self) -> f64 {
        self.temperature
    }
    /// Weight `α ∈ [0, 1]` of the soft term (`1 − α` for the hard term).
    pub fn alpha(&self) -> f64 {
        self.alpha
    }
    /// The divergence of the soft term (validated; `Jsd` with `β ∈ {0, 1}` already resolved to
    /// forward or reverse KL).
    pub fn divergence(&self) -> Divergence {
        self.divergence
    }
    /// Is the soft term multiplied by `T²`?
    pub fn scale_by_t2(&self) -> bool {
        self.scale_by_t2
    }
    /// The factor of the soft term: `T²` or `1`.
    pub fn soft_factor(&self) -> f64 {
        if self.scale_by_t2 {
            self.temperature * self.temperature
        } else {
            1.0
        }
    }
    /// Rows whose target equals this value are left out of both terms.
    pub fn ignore_index(&self) -> Option<i64> {
        self.ignore_index
    }
    /// Label smoothing `ε ∈ [0, 1)` of the hard term.
    pub fn label_smoothing(&self) -> f64 {
        self.label_smoothing
    }
    /// How row losses are reduced.
    pub fn reduction(&self) -> Reduction {
        self.reduction
    }
    /// The same parameters with another reduction (validated like the configuration's).
    pub(crate) fn with_reduction(mut self, reduction: Reduction) -> Self {
        self.reduction = reduction;
        self
    }
}

/// The parameters of every chunk of `m` kept rows: `Mean` becomes `Normalized { items: m }`
/// (`Sum` when no row is kept), so that each chunk's gradient carries the reduction's factor
/// (exact: `m` is known on the host).
pub(crate) fn chunk_params(params: &DistillParams, m: usize) -> DistillParams {
    match params.reduction {
        Reduction::Mean if m > 0 => {
            params.with_reduction(Reduction::Normalized { items: m as u64 })
        }
        Reduction::Mean => params.with_reduction(Reduction::Sum),
        _ => *params,
    }
}
