//! The sampled-token loss: on-policy distillation from a teacher that returns one
//! log-probability per sampled token (Tinker's on-policy distillation, MiniLLM, verl's k1/k3).

use burn::{
    config::Config,
    module::Module,
    tensor::{Bool, Int, Tensor},
};
use serde::{Deserialize, Serialize};

use super::{
    checks::log_prob_check,
    logprob::{IGNORE_TOKEN, log_probs_parts},
};
use crate::{
    DistillError, Kernel, Reduction, Validation,
    error::or_panic,
    reduction::reduce_rows,
    validation::{DeviceCheck, validate},
};

/// The per-token estimate of the reverse KL `KL(π_s ‖ π_t)` at a token `y ~ π_s`, with
/// `d = log π_t(y) − log π_s(y)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum KlEstimator {
    /// `k1 = −d`, used as a policy-gradient advantage `A = d` (measured at sampling time, on the
    /// sampler's log-probabilities where given, and detached; Tinker, MiniLLM): the loss is
    /// `−A · ρ` with the importance ratio `ρ = exp(log π_s − log π_sampler)` (`1`, with
    /// gradient `∇ log π_s`, when the student itself sampled), so its value is the k1 estimate
    /// of the reverse KL and its gradient `−A ∇ log π_s`. The only estimator that takes a
    /// discount `γ` and an importance ratio.
    #[default]
    K1,
    /// `k3 = exp(d) − d − 1` (Schulman's low-variance estimator, verl's `low_var_kl`),
    /// differentiated directly: `∂k3/∂ log π_s = 1 − exp(d)`. Always `≥ 0`; `d` is clamped to
    /// `[−20, 20]` and `k3` to `[−10, 10]`, as verl does.
    K3,
}

/// Configuration of a [`SampledTokenLoss`].
///
/// ```
/// use burn_distill::onpolicy::{KlEstimator, SampledTokenLossConfig};
///
/// let loss = SampledTokenLossConfig::new()
///     .with_estimator(KlEstimator::K1)
///     .with_discount(0.9)
///     .with_clip(Some(0.2))
///     .init();
/// assert_eq!(loss.discount(), 0.9);
/// ```
#[derive(Config, Debug)]
pub struct SampledTokenLossConfig {
    /// The per-token reverse-KL estimate.
    #[config(default = "KlEstimator::K1")]
    pub estimator: KlEstimator,
    /// `γ ∈ [0, 1]`: [`KlEstimator::K1`]'s advantage at `t` is the discounted sum of the
    /// per-token advantages from `t` to the end of the sequence, `A_t = Σ_{t' ≥ t} γ^{t'−t} d_t'`
    /// over the positions that count (Tinker's `kl_discount_factor`); `0` (the default) uses
    /// each token's own.
    #[config(default = 0.0)]
    pub discount: f64,
    /// PPO clipping `ε > 0` of the importance ratio (K1 with sampler log-probabilities):
    /// `−min(ρ A, clip(ρ, 1 − ε, 1 + ε) A)`; `None` (the default) leaves the ratio unclipped
    /// (Tinker's `importance_sampling` loss).
    #[config(default = "None")]
    pub clip: Option<f64>,
    /// How the per-token losses are reduced: [`Reduction::Mean`] over the positions that count,
    /// `Sum`, `Normalized { items }` (TRL's normaliser: the generated tokens of the whole step
    /// on every rank), or `PerRow` (`[B·T]`, `0` where the mask is false).
    #[config(default = "Reduction::Mean")]
    pub reduction: Reduction,
    /// When the inputs' values are checked (tokens in range, log-probabilities finite and
    /// `≤ 0` where the mask is true).
    #[config(default = "Validation::Eager")]
    pub validation: Validation,
    /// The kernel of the student's log-probabilities ([`token_log_probs`](super::token_log_probs)).
    #[config(default = "Kernel::Auto")]
    pub kernel: Kernel,
}

impl SampledTokenLossConfig {
    /// Validates the configuration and builds the loss.
    ///
    /// # Panics
    /// With the message of [`SampledTokenLossConfig::try_init`]'s error, at the caller's line.
    #[track_caller]
    pub fn init(&self) -> SampledTokenLoss {
        or_panic(self.try_init())
    }

    /// Validates the configuration and builds the loss, or says which value is wrong.
    pub fn try_init(&self) -> Result<SampledTokenLoss, DistillError> {
        if !(0.0..=1.0).contains(&self.discount) {
            return Err(DistillError::invalid(
                "discount",
                self.discount,
                "a number in [0, 1]",
            ));
        }
        if let Some(eps) = self.clip
            && !(eps.is_finite() && eps > 0.0)
        {
            return Err(DistillError::invalid(
                "clip",
                eps,
                "a finite number > 0, or None",
            ));
        }
        if self.estimator == KlEstimator::K3 && (self.discount != 0.0 || self.clip.is_some()) {
            return Err(DistillError::invalid(
                "estimator",
                format!(
                    "K3 with discount {} and clip {:?}",
                    self.discount, self.clip
                ),
                "KlEstimator::K1 for a discount or a clip (K3 is a direct loss on the \
                 student's log-probabilities, not an advantage)",
            ));
        }
        self.reduction.validate()?;
        Ok(SampledTokenLoss {
            estimator: self.estimator,
            discount: self.discount,
            clip: self.clip,
            reduction: self.reduction,
            validation: self.validation,
            kernel: self.kernel,
        })
    }
}

/// The sampled-token (on-policy) distillation loss.
///
/// The student sampled token `y_t` at position `t`; the teacher returned `log π_t(y_t)` only.
/// With `log π_s(y_t) = log softmax(z_t)[y_t]` (fused:
/// [`token_log_probs`](super::token_log_probs)), `d_t = log π_t(y_t) − log π_s(y_t)`, `m_t` the
/// mask and `⌊·⌋` a detached value:
///
/// ```text
/// K1:  a_t = log π_t(y_t) − log π_old(y_t)                       (π_old: the sampler; ⌊π_s⌋ if none)
///      A_t = Σ_{t' ≥ t} γ^{t'−t} m_t' a_t'                        (γ = 0: A_t = a_t)
///      ρ_t = exp(log π_s(y_t) − log π_old(y_t))
///      ℓ_t = −ρ_t A_t,  or with clip ε:  −min(ρ_t A_t, clip(ρ_t, 1 − ε, 1 + ε) A_t)
/// K3:  ℓ_t = clamp(exp(d_t) − d_t − 1, −10, 10),  d_t clamped to [−20, 20]
/// loss = Σ_t m_t ℓ_t / Σ_t m_t                                   (Mean; Sum, Normalized, PerRow)
/// ```
///
/// The gradient reaches the student's logits only through `log π_s(y_t)`: a weighted
/// cross-entropy at the sampled tokens, formed in one pass over `[B, T, V]`.
///
/// ```
/// use burn::tensor::{Bool, Device, Int, Tensor};
/// use burn_distill::onpolicy::SampledTokenLossConfig;
///
/// let device = Device::default().autodiff();
/// // One sequence of two positions over a vocabulary of 2; uniform student.
/// let logits = Tensor::<3>::zeros([1, 2, 2], &device).require_grad();
/// let tokens = Tensor::<2, Int>::from_ints([[0, 1]], &device);
/// let teacher = Tensor::<2>::from_floats([[-0.1, -2.0]], &device);
/// let mask = Tensor::<2, Bool>::from_bool([[true, true]], &device);
///
/// let loss = SampledTokenLossConfig::new().init();
/// let value = loss.forward(logits.clone(), tokens, teacher, mask);
/// // k1: the mean of log π_s − log π_t = ((ln ½ + 0.1) + (ln ½ + 2.0)) / 2
/// let expected = 0.5f32.ln() + 1.05;
/// assert!((value.clone().into_scalar::<f32>() - expected).abs() < 1e-6);
/// let grad = logits.grad(&value.backward()).unwrap();
/// // −A_t ∇ log π_s with A = (−0.1 − ln ½, −2 − ln ½), divided by the 2 tokens:
/// // ∂/∂z[t, j] = A_t (softmax_j − onehot_j) / 2 (by hand in f64).
/// let grad: Vec<f32> = grad.into_data().try_to_vec().unwrap();
/// let a = [-0.1 - 0.5f32.ln(), -2.0 - 0.5f32.ln()];
/// let expected = [-a[0] / 4.0, a[0] / 4.0, a[1] / 4.0, -a[1] / 4.0];
/// for (g, e) in grad.iter().zip(expected) {
///     assert!((g - e).abs() < 1e-6, "{grad:?}");
/// }
/// ```
///
/// # Shapes
/// - `student_logits`: `[B, T, V]`
/// - `tokens`: `[B, T]`, in `[0, V)` where the mask is true (anything elsewhere)
/// - `teacher_log_probs`, `sampler_log_probs`: `[B, T]`, finite and `≤ 0` where the mask is
///   true
/// - `mask`: `[B, T]`, true for the generated tokens that count (not the prompt, not padding)
/// - output: `[1]`, or `[B·T]` with [`Reduction::PerRow`]
#[derive(Module, Debug)]
pub struct SampledTokenLoss {
    #[module(skip)]
    estimator: KlEstimator,
    #[module(skip)]
    discount: f64,
    #[module(skip)]
    clip: Option<f64>,
    #[module(skip)]
    reduction: Reduction,
    #[module(skip)]
    validation: Validation,
    #[module(skip)]
    kernel: Kernel,
}

/// The sampled tokens and what was measured of them: the input of [`SampledTokenLoss`].
#[derive(Clone, Debug)]
pub struct SampledTokens {
    /// `[B, T]` the sampled tokens.
    pub tokens: Tensor<2, Int>,
    /// `[B, T]` the teacher's log-probability of each sampled token.
    pub teacher_log_probs: Tensor<2>,
    /// `[B, T]` true where the token counts.
    pub mask: Tensor<2, Bool>,
    /// `[B, T]` the sampler's log-probability of each token, when sampling ran on another copy
    /// of the student (an older one, or another engine): the importance ratio. `None`: the
    /// student itself sampled.
    pub sampler_log_probs: Option<Tensor<2>>,
}

/// The loss, with what an on-policy run logs.
#[derive(Clone, Debug)]
pub struct SampledTokenOutput {
    /// The loss (differentiable), reduced as configured.
    pub loss: Tensor<1>,
    /// `[1]` the k1 estimate of the reverse KL, `mean_t (log π_s − log π_t)` over the positions
    /// that count (detached; `0` when none counts).
    pub reverse_kl: Tensor<1>,
    /// `[B, T]` the student's log-probabilities of the sampled tokens (detached; `0` where the
    /// mask is false).
    pub student_log_probs: Tensor<2>,
    checks: Vec<DeviceCheck>,
}

impl SampledTokenOutput {
    /// Reads the checks that a forward with [`Validation::Deferred`] queued (one read-back)
    /// and names the first bad value.
    pub fn validate(&self) -> Result<(), DistillError> {
        validate(&self.checks)
    }
}

impl SampledTokenLoss {
    /// The discount `γ`.
    pub fn discount(&self) -> f64 {
        self.discount
    }

    /// The estimator.
    pub fn estimator(&self) -> KlEstimator {
        self.estimator
    }

    /// The loss of tokens the student itself sampled.
    ///
    /// # Panics
    /// On bad input, with the message of [`SampledTokenLoss::try_forward`], at the caller's
    /// line.
    #[track_caller]
    pub fn forward(
        &self,
        student_logits: Tensor<3>,
        tokens: Tensor<2, Int>,
        teacher_log_probs: Tensor<2>,
        mask: Tensor<2, Bool>,
    ) -> Tensor<1> {
        or_panic(self.try_forward(student_logits, tokens, teacher_log_probs, mask))
    }

    /// [`SampledTokenLoss::forward`] that returns an error naming the bad argument.
    pub fn try_forward(
        &self,
        student_logits: Tensor<3>,
        tokens: Tensor<2, Int>,
        teacher_log_probs: Tensor<2>,
        mask: Tensor<2, Bool>,
    ) -> Result<Tensor<1>, DistillError> {
        let sampled = SampledTokens {
            tokens,
            teacher_log_probs,
            mask,
            sampler_log_probs: None,
        };
        self.try_forward_parts(student_logits, sampled)
            .map(|out| out.loss)
    }

    /// The loss, its logs and the queued checks of `[B, T, V]` logits, or an error naming the
    /// bad argument (shapes as the caller passed them).
    pub fn try_forward_parts(
        &self,
        student_logits: Tensor<3>,
        sampled: SampledTokens,
    ) -> Result<SampledTokenOutput, DistillError> {
        let dims = student_logits.dims();
        crate::rank::non_empty("student_logits", dims)?;
        let [b, t, _] = dims;
        if sampled.tokens.dims() != [b, t] {
            let [tb, tt] = sampled.tokens.dims();
            return Err(DistillError::invalid(
                "student_logits",
                format!("shape {dims:?}"),
                format!(
                    "shape [{tb}, {tt}, V] (the batch and sequence of the [{tb}, {tt}] sampled tokens)"
                ),
            ));
        }
        self.rows(crate::rank::flat_rows(student_logits), sampled)
    }

    /// [`SampledTokenLoss::try_forward_parts`] with the logits already flattened to
    /// `[B·T, V]` (row `b·T + t`), as a language model's head computes them from `[B·T, H]`
    /// hidden states.
    pub fn try_forward_rows(
        &self,
        student_logits: Tensor<2>,
        sampled: SampledTokens,
    ) -> Result<SampledTokenOutput, DistillError> {
        let [b, t] = sampled.tokens.dims();
        let [n, v] = student_logits.dims();
        if n != b * t {
            return Err(DistillError::invalid(
                "student_logits",
                format!("shape [{n}, {v}]"),
                format!(
                    "[{}, V] (one row per token of the [{b}, {t}] samples)",
                    b * t
                ),
            ));
        }
        crate::rank::non_empty("student_logits", [n, v])?;
        self.rows(student_logits, sampled)
    }

    /// The loss of `[B·T, V]` rows whose count has been checked against the `[B, T]` tokens.
    fn rows(
        &self,
        student_logits: Tensor<2>,
        sampled: SampledTokens,
    ) -> Result<SampledTokenOutput, DistillError> {
        let [b, t] = sampled.tokens.dims();
        let n = b * t;
        let SampledTokens {
            tokens,
            teacher_log_probs,
            mask,
            sampler_log_probs,
        } = sampled;
        for (name, dims) in [
            ("teacher_log_probs", teacher_log_probs.dims()),
            ("mask", mask.dims()),
        ]
        .into_iter()
        .chain(
            sampler_log_probs
                .as_ref()
                .map(|s| ("sampler_log_probs", s.dims())),
        ) {
            if dims != [b, t] {
                return Err(DistillError::invalid(
                    name,
                    format!("shape {dims:?}"),
                    format!("shape [{b}, {t}] (the sampled tokens' shape)"),
                ));
            }
        }
        if sampler_log_probs.is_some() && self.estimator == KlEstimator::K3 {
            return Err(DistillError::invalid(
                "sampler_log_probs",
                "Some(..) with KlEstimator::K3",
                "None (importance ratios weigh K1's advantages)",
            ));
        }
        let mut checks = Vec::new();
        if self.validation != Validation::Off {
            let mut queue = |check: DeviceCheck| -> Result<(), DistillError> {
                checks.extend(check.apply(self.validation)?);
                Ok(())
            };
            queue(log_prob_check(
                "teacher_log_probs",
                &teacher_log_probs,
                &mask,
            ))?;
            if let Some(sampler) = &sampler_log_probs {
                queue(log_prob_check("sampler_log_probs", sampler, &mask))?;
            }
        }
        // In the logits' dtype (a mask's `float()` is the device's default float dtype).
        let kept = mask.clone().float().cast(student_logits.dtype()).detach();
        let tokens = tokens.mask_fill(mask.clone().bool_not(), IGNORE_TOKEN);
        let (lp, token_check) = log_probs_parts(
            student_logits,
            tokens.reshape([n]),
            self.kernel,
            self.validation,
            &[b, t],
        )?;
        checks.extend(token_check);
        let lp = lp.reshape([b, t]);
        // Positions that do not count hold 0 in every per-token tensor below.
        let teacher = teacher_log_probs
            .detach()
            .mask_fill(mask.clone().bool_not(), 0.0);
        let d = (teacher.clone() - lp.clone()) * kept.clone();
        let per_token = match self.estimator {
            KlEstimator::K1 => {
                // The advantage is measured at sampling time (Tinker): on the sampler's
                // log-probabilities where there are some.
                let old = match sampler_log_probs {
                    Some(s) => s.detach().mask_fill(mask.clone().bool_not(), 0.0),
                    None => lp.clone().detach(),
                };
                let sampled_d = (teacher - old.clone()) * kept.clone();
                let advantage = discounted_sum(sampled_d, self.discount) * kept.clone();
                let ratio = (lp.clone() - old).exp();
                let gain = ratio.clone() * advantage.clone();
                let gain = match self.clip {
                    Some(eps) => gain.min_pair(ratio.clamp(1.0 - eps, 1.0 + eps) * advantage),
                    None => gain,
                };
                gain.neg()
            }
            KlEstimator::K3 => {
                let d = d.clone().clamp(-20.0, 20.0);
                (d.clone().exp() - d - 1.0).clamp(-10.0, 10.0)
            }
        } * kept.clone();
        let ignored = Some(mask.clone().bool_not().reshape([n]));
        let loss = reduce_rows(per_token.reshape([n]), ignored.clone(), self.reduction);
        let reverse_kl = reduce_rows(d.detach().neg().reshape([n]), ignored, Reduction::Mean);
        Ok(SampledTokenOutput {
            loss,
            reverse_kl,
            student_log_probs: lp.detach(),
            checks,
        })
    }
}

/// `A_t = Σ_{t' ≥ t} γ^{t'−t} x_t'` along each row of `[B, T]`: a log₂ T-step scan of shifted
/// additions (`A ← A + γ^s · shift_s(A)`, `s = 1, 2, 4, …`), on the device, exact up to
/// rounding for any `γ ∈ [0, 1]` (no `γ^{−t}` rescaling that would overflow).
pub(crate) fn discounted_sum(x: Tensor<2>, gamma: f64) -> Tensor<2> {
    let [b, t] = x.dims();
    if gamma == 0.0 || t < 2 {
        return x;
    }
    let mut acc = x;
    let mut shift = 1;
    let mut factor = gamma;
    while shift < t {
        let zeros = Tensor::zeros([b, shift], (&acc.device(), acc.dtype()));
        let later = Tensor::cat(vec![acc.clone().slice([0..b, shift..t]), zeros], 1);
        acc = acc + later * factor;
        factor *= factor;
        shift *= 2;
    }
    acc
}
