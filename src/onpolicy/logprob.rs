//! The student's log-probability of given tokens, `log softmax(z_i)[y_i]`, fused: the sparse
//! kernel's hard term, whose backward `g_i · (onehot(y_i) − softmax(z_i))` is computed in the
//! forward pass, so that the `[N, V]` logits are read once and no `[N, V]` tensor but the
//! gradient is kept.

use burn::tensor::{Int, Tensor};

use super::checks::token_check;
use crate::{
    DistillError, DistillLossConfig, Kernel, Reduction, SparseDistillLossConfig, SparseTeacher,
    Validation, error::or_panic, validation::DeviceCheck,
};

/// The token value that marks a position that does not count (its log-probability is 0).
pub const IGNORE_TOKEN: i64 = -100;

/// `log softmax(z_i)[y_i]` for each row of `[N, V]` logits and `[N]` tokens (TRL's
/// `selective_log_softmax`): `[N]`, `0` (with no gradient) where the token is
/// [`IGNORE_TOKEN`].
///
/// Differentiable, fused where the device has the sparse kernel (Flex, wgpu, CUDA): the logits
/// are read once and the gradient `∂/∂z_i = g_i · (onehot(y_i) − softmax(z_i))` is formed in
/// the same pass, so no `[N, V]` tensor is kept but that gradient.
///
/// # Shapes
/// - `logits`: `[N, V]`
/// - `tokens`: `[N]`, in `[0, V)` or [`IGNORE_TOKEN`]
/// - output: `[N]`
///
/// ```
/// use burn::tensor::{Device, Int, Tensor};
/// use burn_distill::onpolicy::token_log_probs;
///
/// let device = Device::default();
/// let logits = Tensor::<2>::from_floats([[0.0, 0.0], [2.0, 0.0]], &device);
/// let tokens = Tensor::<1, Int>::from_ints([1, -100], &device);
/// let lp = token_log_probs(logits, tokens).into_data().to_vec::<f32>().unwrap();
/// assert!((lp[0] - 0.5f32.ln()).abs() < 1e-6 && lp[1] == 0.0);
/// ```
///
/// # Panics
/// On a token out of range, or logits of no row or no column, with the message of
/// [`try_token_log_probs`], at the caller's line.
#[track_caller]
pub fn token_log_probs(logits: Tensor<2>, tokens: Tensor<1, Int>) -> Tensor<1> {
    or_panic(try_token_log_probs(logits, tokens))
}

/// [`token_log_probs`] that returns an error instead of panicking.
pub fn try_token_log_probs(
    logits: Tensor<2>,
    tokens: Tensor<1, Int>,
) -> Result<Tensor<1>, DistillError> {
    let lead = [logits.dims()[0]];
    let (lp, check) = log_probs_parts(logits, tokens, Kernel::Auto, Validation::Eager, &lead)?;
    debug_assert!(check.is_none());
    Ok(lp)
}

/// [`token_log_probs`] with a kernel and a validation mode; the check of the tokens is
/// returned with [`Validation::Deferred`]. `lead` is the tokens' shape as the caller passed
/// them (`[N]`, or the `[B, T]` of flattened samples), for the messages.
pub(crate) fn log_probs_parts(
    logits: Tensor<2>,
    tokens: Tensor<1, Int>,
    kernel: Kernel,
    validation: Validation,
    lead: &[usize],
) -> Result<(Tensor<1>, Option<DeviceCheck>), DistillError> {
    let [n, v] = logits.dims();
    crate::rank::non_empty("student_logits", [n, v])?;
    if tokens.dims() != [n] {
        return Err(DistillError::invalid(
            "tokens",
            format!("shape {:?}", tokens.dims()),
            format!("shape [{n}] (one token per row of the logits)"),
        ));
    }
    let check = match validation {
        Validation::Off => None,
        mode => token_check("tokens", &tokens, v, Some(IGNORE_TOKEN), lead).apply(mode)?,
    };
    // The sparse loss with α = 0 is the hard term alone, −log softmax(z)[y], per row; its
    // one-entry teacher (index 0, probability 1) is read but weighs nothing.
    let loss = SparseDistillLossConfig::new(
        DistillLossConfig::new()
            .with_alpha(0.0)
            .with_reduction(Reduction::PerRow)
            .with_ignore_index(Some(IGNORE_TOKEN))
            .with_validation(Validation::Off)
            .with_kernel(kernel),
    )
    .try_init()?;
    let device = logits.device();
    let teacher = SparseTeacher::new(
        Tensor::zeros([n, 1], &device),
        Tensor::zeros([n, 1], (&device, logits.dtype())),
    );
    let out = loss.try_forward_parts(logits, teacher, Some(tokens))?;
    Ok((out.loss.neg(), check))
}
