//! The teacher's missing mass in sparse (top-k) distillation: what to do with it, and the
//! limits every kernel applies to it. Plain values, read by the sparse loss and its kernels.

use serde::{Deserialize, Serialize};

/// How far above 0 a teacher log-probability may lie (f32 rounding of a dominant token), and
/// how far above 1 the top-k mass may lie with [`TailPolicy::TailBucket`].
pub(crate) const ROUNDING: f64 = 1e-3;

/// The smallest teacher tail of [`TailPolicy::TailBucket`]: `m = max(1 − Σ_{j∈K} exp(ℓ_j),
/// TAIL_FLOOR)`.
///
/// APIs return a log-probability of exactly `0.0` for a near-certain token, and a top-k whose
/// mass rounds to 1 would leave the teacher no tail: every divergence that divides by the
/// teacher's tail (reverse KL, `Jsd { beta: 1 }`) would then be `+∞` on that row, with a NaN
/// gradient, and under `Mean` one such token would poison the batch. With the floor such a row
/// has a finite loss and gradient (the student's tail mass `q_tail` is pushed toward `1e-6`).
/// It is far below any tail a teacher reports (a top-k of an f16 or bf16 store is rounded by
/// more than this) and the same on every kernel; a row whose top-k covers the whole vocabulary
/// still has no bucket at all.
pub const TAIL_FLOOR: f64 = 1e-6;

/// Which student distribution a renormalised sparse teacher is compared with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum StudentSupport {
    /// The student's full-vocabulary log-probabilities `log softmax(z_s / T)[j]` at the
    /// teacher's top-k indices (DistillKit's convention). They sum to less than one over the
    /// k tokens, so only [`Divergence::ForwardKl`](crate::Divergence::ForwardKl) is defined; the
    /// loss still pulls the student's mass outside the top-k towards zero.
    FullVocab,
    /// The student renormalised over the same k tokens, `softmax_K(z_s / T)` (Megatron-LM's
    /// convention): a proper distribution on K, so every [`Divergence`](crate::Divergence) applies;
    /// the student's mass outside K gets no gradient.
    TopK,
}

/// What to do with the probability mass the teacher's top-k leaves out.
///
/// `ℓ_j` are the teacher's log-probabilities on its valid top-k set `K` (at the generation
/// temperature `T_gen`), `z` the student's logits, `r = T_gen / T`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum TailPolicy {
    /// Drop the tail and renormalise the teacher over its top-k:
    /// `p_j = exp(r·ℓ_j) / Σ_{i∈K} exp(r·ℓ_i)` for `j ∈ K`, against the student on the
    /// [`StudentSupport`] given.
    Renormalize {
        /// Full-vocabulary student log-probabilities (DistillKit) or the student renormalised
        /// over K (Megatron-LM).
        student: StudentSupport,
    },
    /// Keep the tail as a `(k+1)`-th bucket: the teacher's missing mass
    /// `m = 1 − Σ_{j∈K} exp(ℓ_j)` against the student's mass outside K,
    /// `q_tail = Σ_{v∉K} softmax(z / T)_v`. At `T ≠ T_gen` the bucket is tempered like one
    /// token (`p_tail ∝ m^r`), which is exact only at `T = T_gen`: the teacher's tail tokens
    /// are unknown. The teacher's tail is at least [`TAIL_FLOOR`] (a certain teacher, with a
    /// log-probability of `0.0`, gives a finite loss). A row whose top-k covers the whole
    /// vocabulary has no bucket. Every [`Divergence`](crate::Divergence) applies.
    TailBucket,
}
