//! Softmax and log-softmax at a temperature.

use burn::tensor::{Tensor, activation};

use crate::{DistillError, error::or_panic};

/// Checks that a temperature is finite and strictly positive.
pub(crate) fn check_temperature(argument: &str, temperature: f64) -> Result<(), DistillError> {
    if temperature.is_finite() && temperature > 0.0 {
        Ok(())
    } else {
        Err(DistillError::invalid(
            argument,
            temperature,
            "a finite number > 0",
        ))
    }
}

/// `softmax(logits / T)` along `dim`.
///
/// A higher temperature `T` flattens the distribution and exposes the teacher's "dark
/// knowledge" (the relative probabilities of the wrong classes); `T = 1` is the plain softmax.
///
/// # Panics
/// If `temperature` is not a finite number `> 0` or `dim` is not an axis of the logits, with
/// the message of [`try_temperature_softmax`]'s error, at the caller's line.
///
/// # Example
/// ```
/// use burn::tensor::{Device, Tensor};
/// use burn_distill::temperature_softmax;
///
/// let logits = Tensor::<2>::from_floats([[2.0, 0.0, -2.0]], &Device::default());
/// let sharp = temperature_softmax(logits.clone(), 1.0, 1).into_data().to_vec::<f32>().unwrap();
/// let soft = temperature_softmax(logits, 4.0, 1).into_data().to_vec::<f32>().unwrap();
/// assert!((sharp[0] - 0.86681).abs() < 1e-5);
/// assert!((soft[0] - 0.50648).abs() < 1e-5); // flatter at T = 4
/// ```
#[track_caller]
pub fn temperature_softmax<const D: usize>(
    logits: Tensor<D>,
    temperature: f64,
    dim: usize,
) -> Tensor<D> {
    or_panic(try_temperature_softmax(logits, temperature, dim))
}

/// [`temperature_softmax`] that returns an error (for a bad temperature or `dim`) instead of
/// panicking.
///
/// ```
/// use burn::tensor::{Device, Tensor};
/// use burn_distill::try_temperature_softmax;
///
/// let logits = Tensor::<2>::from_floats([[1.0, 0.0]], &Device::default());
/// let err = try_temperature_softmax(logits, 0.0, 1).unwrap_err();
/// assert_eq!(err.to_string(), "invalid temperature: got 0, expected a finite number > 0");
/// ```
pub fn try_temperature_softmax<const D: usize>(
    logits: Tensor<D>,
    temperature: f64,
    dim: usize,
) -> Result<Tensor<D>, DistillError> {
    check_temperature("temperature", temperature)?;
    check_dim(dim, D)?;
    Ok(activation::softmax(scale(logits, temperature), dim))
}

/// `log_softmax(logits / T)` along `dim`, computed stably (max-shifted log-sum-exp).
///
/// `−inf` logits (vocabulary padding) give `−inf` log-probabilities, not NaN.
///
/// # Panics
/// If `temperature` is not a finite number `> 0` or `dim` is not an axis of the logits, with
/// the message of [`try_temperature_log_softmax`]'s error, at the caller's line.
///
/// # Example
/// ```
/// use burn::tensor::{Device, Tensor};
/// use burn_distill::temperature_log_softmax;
///
/// let logits = Tensor::<2>::from_floats([[1.0, 1.0]], &Device::default());
/// let lp = temperature_log_softmax(logits, 2.0, 1).into_data().to_vec::<f32>().unwrap();
/// assert!((lp[0] - (0.5f32).ln()).abs() < 1e-6);
/// ```
#[track_caller]
pub fn temperature_log_softmax<const D: usize>(
    logits: Tensor<D>,
    temperature: f64,
    dim: usize,
) -> Tensor<D> {
    or_panic(try_temperature_log_softmax(logits, temperature, dim))
}

/// [`temperature_log_softmax`] that returns an error (for a bad temperature or `dim`) instead
/// of panicking.
///
/// ```
/// use burn::tensor::{Device, Tensor};
/// use burn_distill::try_temperature_log_softmax;
///
/// let logits = Tensor::<2>::from_floats([[1.0, 0.0]], &Device::default());
/// let err = try_temperature_log_softmax(logits, 1.0, 2).unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "invalid dim: got 2, expected an axis of the rank-2 logits, in [0, 2)"
/// );
/// ```
pub fn try_temperature_log_softmax<const D: usize>(
    logits: Tensor<D>,
    temperature: f64,
    dim: usize,
) -> Result<Tensor<D>, DistillError> {
    check_temperature("temperature", temperature)?;
    check_dim(dim, D)?;
    Ok(activation::log_softmax(scale(logits, temperature), dim))
}

/// `dim` must be an axis of a rank-`rank` tensor.
fn check_dim(dim: usize, rank: usize) -> Result<(), DistillError> {
    if dim < rank {
        Ok(())
    } else {
        Err(DistillError::invalid(
            "dim",
            dim,
            format!("an axis of the rank-{rank} logits, in [0, {rank})"),
        ))
    }
}

/// `logits / T`, as a product: burn's autodiff (0.21; kept for 0.22) differentiates `div_scalar` with an f32
/// reciprocal, which would cap f64 gradients at f32 accuracy.
fn scale<const D: usize>(logits: Tensor<D>, temperature: f64) -> Tensor<D> {
    if temperature == 1.0 {
        logits
    } else {
        logits.mul_scalar(temperature.recip())
    }
}
