//! The divergences between the teacher's and the student's tempered distributions.

use serde::{Deserialize, Serialize};

use crate::DistillError;

/// The divergence used for the soft (teacher-matching) term.
///
/// Notation, per row: `p = softmax(z_t / T)` is the teacher, `q = softmax(z_s / T)` the
/// student, `j` runs over the vocabulary, and `0 · log(0 / x) = 0`. Columns where both
/// distributions are zero (`−inf` vocabulary padding) contribute nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Divergence {
    /// Forward KL, Hinton's distillation loss (mean-seeking):
    /// `KL(p‖q) = Σ_j p_j (log p_j − log q_j)`.
    #[default]
    ForwardKl,
    /// Reverse KL (mode-seeking, used by MiniLLM and GKD):
    /// `KL(q‖p) = Σ_j q_j (log q_j − log p_j)`.
    ReverseKl,
    /// Generalised Jensen–Shannon divergence, `β ∈ [0, 1]`:
    /// `m = β p + (1 − β) q`, `JSD_β = β KL(p‖m) + (1 − β) KL(q‖m)`.
    /// Bounded by `ln 2` at `β = ½`.
    ///
    /// As in TRL's `generalized_jsd_loss` and Liger-Kernel's JSD, `β = 0` means forward KL
    /// `KL(p‖q)` and `β = 1` reverse KL `KL(q‖p)` (the formula itself would be 0 there; these
    /// are the limits of `JSD_β / β` and `JSD_β / (1 − β)`): the configuration resolves them to
    /// [`Divergence::ForwardKl`] and [`Divergence::ReverseKl`].
    Jsd {
        /// Weight of the teacher in the mixture, in `[0, 1]`.
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
    /// One value of every divergence (mixture weights at representative values), for tests,
    /// benchmarks and sweeps. Every test suite of the crate iterates this list, so a new
    /// divergence is tested everywhere once it is added here (and [`Divergence::name`], whose
    /// exhaustive `match` will not compile without it, is the reminder).
    pub const ALL: [Divergence; 6] = [
        Self::ForwardKl,
        Self::ReverseKl,
        Self::Jsd { beta: 0.5 },
        Self::SkewKl { lambda: 0.1 },
        Self::SkewReverseKl { lambda: 0.1 },
        Self::Tvd,
    ];

    /// Checks the mixture weight: `β ∈ [0, 1]` for `Jsd`, `λ ∈ (0, 1)` for the skew KLs.
    pub fn validate(&self) -> Result<(), DistillError> {
        self.resolved().map(|_| ())
    }

    /// The validated divergence, with `Jsd { beta: 0 }` as [`Divergence::ForwardKl`] and
    /// `Jsd { beta: 1 }` as [`Divergence::ReverseKl`] (TRL's and Liger's convention).
    pub fn resolved(&self) -> Result<Divergence, DistillError> {
        let (name, value, closed) = match *self {
            Self::Jsd { beta: 0.0 } => return Ok(Self::ForwardKl),
            Self::Jsd { beta: 1.0 } => return Ok(Self::ReverseKl),
            Self::Jsd { beta } => ("divergence Jsd { beta }", beta, true),
            Self::SkewKl { lambda } => ("divergence SkewKl { lambda }", lambda, false),
            Self::SkewReverseKl { lambda } => {
                ("divergence SkewReverseKl { lambda }", lambda, false)
            }
            Self::ForwardKl | Self::ReverseKl | Self::Tvd => return Ok(*self),
        };
        if value > 0.0 && value < 1.0 {
            Ok(*self)
        } else {
            Err(DistillError::invalid(
                name,
                value,
                if closed {
                    "a number in [0, 1] (0: forward KL, 1: reverse KL)"
                } else {
                    "a number in the open interval (0, 1)"
                },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_each_divergence_once() {
        let names: std::collections::BTreeSet<_> =
            Divergence::ALL.iter().map(|d| d.name()).collect();
        assert_eq!(names.len(), Divergence::ALL.len());
        for d in Divergence::ALL {
            assert_eq!(d.resolved(), Ok(d), "{d:?} is valid and resolves to itself");
        }
    }

    #[test]
    fn jsd_endpoints_are_forward_and_reverse_kl() {
        assert_eq!(
            Divergence::Jsd { beta: 0.0 }.resolved(),
            Ok(Divergence::ForwardKl)
        );
        assert_eq!(
            Divergence::Jsd { beta: 1.0 }.resolved(),
            Ok(Divergence::ReverseKl)
        );
        for bad in [-0.1, 1.5, f64::NAN] {
            assert!(
                Divergence::Jsd { beta: bad }.resolved().is_err(),
                "beta = {bad}"
            );
        }
        assert!(Divergence::SkewKl { lambda: 0.0 }.resolved().is_err());
    }
}
