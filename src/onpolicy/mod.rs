//! On-policy distillation: the student samples, the teacher scores the student's own tokens,
//! and the loss is a per-token divergence there (the recipe of Qwen3, GKD, MiniLLM, Tinker).
//!
//! Three recipes, by what the teacher returns:
//!
//! 1. **Full distributions** (TRL's GKD with `lmbda = 1`): the teacher's logits at every
//!    position of the student's samples. This is [`DistillLoss::forward_seq`](crate::DistillLoss::forward_seq)
//!    (or `forward_linear_seq`) on the sampled sequences with `α = 1`, a divergence that
//!    weighs the student's mistakes ([`Divergence::ReverseKl`](crate::Divergence::ReverseKl),
//!    or [`Divergence::Jsd`](crate::Divergence::Jsd) as GKD's default `β = 0.5`), the prompt
//!    and padding positions set to the ignore index, and [`Reduction::Normalized`](crate::Reduction::Normalized) with the
//!    number of generated tokens of the whole step on every rank (TRL's normaliser).
//! 2. **The sampled token's log-probability only** (an API teacher; Tinker, verl's k1/k3):
//!    [`SampledTokenLoss`], a weighted cross-entropy at the sampled tokens, fused.
//! 3. **Log-probabilities on the student's top-k** (NeMo-RL): [`student_top_k`] picks the
//!    student's `k` likeliest tokens per position, the teacher scores exactly those, and the
//!    [`SparseDistillLoss`](crate::SparseDistillLoss) with
//!    [`TailPolicy::TailBucket`](crate::TailPolicy::TailBucket) and reverse KL compares the two
//!    distributions on that support plus one bucket for the rest: the exact reverse KL of the
//!    bucketed distributions (with `k = V`, the full reverse KL).
//!
//! A step of recipe 2 in a custom loop (the sampler, the teacher API and the optimizer are
//! the caller's):
//!
//! ```text
//! let (tokens, mask) = sample(&student, prompts, max_new);          // [B, T], [B, T]
//! let teacher_lp = teacher_api.log_probs(&tokens);                   // [B, T]
//! let logits = student.forward(inputs_of(&tokens));                  // [B, T, V]
//! let out = loss.try_forward_parts(logits, SampledTokens {
//!     tokens, teacher_log_probs: teacher_lp, mask, sampler_log_probs: None })?;
//! let grads = out.loss.backward();                                   // log out.reverse_kl
//! ```

mod checks;
mod logprob;
mod sampled;

use burn::tensor::{Int, Tensor};

pub use logprob::{IGNORE_TOKEN, token_log_probs, try_token_log_probs};
pub use sampled::{
    KlEstimator, SampledTokenLoss, SampledTokenLossConfig, SampledTokenOutput, SampledTokens,
};

use crate::{DistillError, error::or_panic};
pub(crate) use checks::token_check;

/// The student's `k` likeliest tokens at each position (recipe 3): `[N, V]` logits → `[N, k]`
/// indices, likeliest first, for the teacher to score. Detached (no gradient).
///
/// ```
/// use burn::tensor::{Device, Tensor};
/// use burn_distill::onpolicy::student_top_k;
///
/// let logits = Tensor::<2>::from_floats([[0.1, 3.0, -1.0, 2.0]], &Device::default());
/// let top: Vec<i64> = student_top_k(logits, 2).into_data().iter::<i64>().collect();
/// assert_eq!(top, vec![1, 3]);
/// ```
///
/// # Panics
/// If `k` is 0 or above `V`, with the message of [`try_student_top_k`], at the caller's line.
#[track_caller]
pub fn student_top_k(logits: Tensor<2>, k: usize) -> Tensor<2, Int> {
    or_panic(try_student_top_k(logits, k))
}

/// [`student_top_k`] that returns an error instead of panicking.
pub fn try_student_top_k(logits: Tensor<2>, k: usize) -> Result<Tensor<2, Int>, DistillError> {
    let [n, v] = logits.dims();
    if k == 0 || k > v {
        return Err(DistillError::invalid(
            "k",
            k,
            format!("a count in [1, {v}] (the vocabulary of the [{n}, {v}] logits)"),
        ));
    }
    let order = logits.detach().argsort_descending(1);
    Ok(order.slice([0..n, 0..k]))
}
