//! The divergences between the teacher's and the student's tempered distributions.

use serde::{Deserialize, Serialize};

use crate::DistillError;

/// The divergence used for the soft (teacher-matching) term.
///
/// Notation, per row: `p = softmax(z_t / T)` is the teacher, `q = softmax(z_s / T)` the
/// student, `j` runs over the vocabulary, and `0 · log(0 / x) = 0`. Columns where both
/// distributions are zero (`−inf` vocabulary padding) contribute nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum Divergence {
    /// Forward KL, Hinton's distillation loss (mean-seeking):
    /// `KL(p‖q) = Σ_j p_j (log p_j − log q_j)`.
    #[default]
    ForwardKl,
    /// Reverse KL (mode-seeking, used by MiniLLM and GKD):
    /// `KL(q‖p) = Σ_j q_j (log q_j − log p_j)`.
    ReverseKl,
    /// Generalised Jensen–Shannon divergence, `β ∈ (0, 1)`:
    /// `m = β p + (1 − β) q`, `JSD_β = β KL(p‖m) + (1 − β) KL(q‖m)`.
    /// Bounded by `ln 2` at `β = ½`.
    Jsd {
        /// Weight of the teacher in the mixture, in `(0, 1)`.
        beta: f64,
    },
    /// Skew KL (DistiLLM), `λ ∈ (0, 1)`: `KL(p ‖ λ p + (1 − λ) q)`.
    SkewKl {
        /// Weight of the teacher in the mixture, in `(0, 1)`.
        lambda: f64,
    },
    /// Skew reverse KL (DistiLLM), `λ ∈ (0, 1)`: `KL(q ‖ (1 − λ) p + λ q)`.
    SkewReverseKl {
        /// Weight of the student in the mixture, in `(0, 1)`.
        lambda: f64,
    },
    /// Total variation distance: `TVD(p, q) = ½ Σ_j |p_j − q_j|`, in `[0, 1]`.
    Tvd,
}

impl Divergence {
    /// Checks that the mixture weight, if any, lies in the open interval `(0, 1)`.
    pub fn validate(&self) -> Result<(), DistillError> {
        let (name, value) = match *self {
            Self::Jsd { beta } => ("divergence Jsd { beta }", beta),
            Self::SkewKl { lambda } => ("divergence SkewKl { lambda }", lambda),
            Self::SkewReverseKl { lambda } => ("divergence SkewReverseKl { lambda }", lambda),
            Self::ForwardKl | Self::ReverseKl | Self::Tvd => return Ok(()),
        };
        if value > 0.0 && value < 1.0 {
            Ok(())
        } else {
            Err(DistillError::invalid(
                name,
                value,
                "a number in the open interval (0, 1)",
            ))
        }
    }

    /// A short, stable name (`forward_kl`, `jsd`, …), as used in `losses.json` and benchmarks.
    pub fn name(&self) -> &'static str {
        match self {
            Self::ForwardKl => "forward_kl",
            Self::ReverseKl => "reverse_kl",
            Self::Jsd { .. } => "jsd",
            Self::SkewKl { .. } => "skew_kl",
            Self::SkewReverseKl { .. } => "skew_reverse_kl",
            Self::Tvd => "tvd",
        }
    }
}
