//! Softmax and log-softmax at a temperature.

use burn::tensor::{Tensor, activation, backend::Backend};

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

/// A temperature form of `$activation` (a burn activation along a dimension): `$name`, which
/// panics on a bad temperature or `dim`, and `$try`, which returns the error.
macro_rules! tempered {
    (
        $(#[$doc:meta])* $name:ident,
        $(#[$try_doc:meta])* $try:ident,
        $activation:path
    ) => {
        $(#[$doc])*
        pub fn $name<B: Backend, const D: usize>(
            logits: Tensor<B, D>,
            temperature: f64,
            dim: usize,
        ) -> Tensor<B, D> {
            or_panic($try(logits, temperature, dim))
        }

        $(#[$try_doc])*
        pub fn $try<B: Backend, const D: usize>(
            logits: Tensor<B, D>,
            temperature: f64,
            dim: usize,
        ) -> Result<Tensor<B, D>, DistillError> {
            check_temperature("temperature", temperature)?;
            check_dim(dim, D)?;
            Ok($activation(scale(logits, temperature), dim))
        }
    };
}

tempered!(
    /// `softmax(logits / T)` along `dim`.
    ///
    /// A higher temperature `T` flattens the distribution and exposes the teacher's "dark
    /// knowledge" (the relative probabilities of the wrong classes); `T = 1` is the plain
    /// softmax.
    ///
    /// # Panics
    /// If `temperature` is not a finite number `> 0` or `dim` is not an axis of the logits.
    ///
    /// # Example
    /// ```
    /// use burn::backend::NdArray;
    /// use burn::tensor::Tensor;
    /// use burn_distill::temperature_softmax;
    ///
    /// let logits = Tensor::<NdArray, 2>::from_floats([[2.0, 0.0, -2.0]], &Default::default());
    /// let sharp = temperature_softmax(logits.clone(), 1.0, 1).into_data().to_vec::<f32>().unwrap();
    /// let soft = temperature_softmax(logits, 4.0, 1).into_data().to_vec::<f32>().unwrap();
    /// assert!(soft[0] < sharp[0] && soft[2] > sharp[2]); // flatter at T = 4
    /// ```
    temperature_softmax,
    /// [`temperature_softmax`] that returns an error (for a bad temperature or `dim`) instead
    /// of panicking.
    try_temperature_softmax,
    activation::softmax
);

tempered!(
    /// `log_softmax(logits / T)` along `dim`, computed stably (max-shifted log-sum-exp).
    ///
    /// `−inf` logits (vocabulary padding) give `−inf` log-probabilities, not NaN.
    ///
    /// # Panics
    /// If `temperature` is not a finite number `> 0` or `dim` is not an axis of the logits.
    ///
    /// # Example
    /// ```
    /// use burn::backend::NdArray;
    /// use burn::tensor::Tensor;
    /// use burn_distill::temperature_log_softmax;
    ///
    /// let logits = Tensor::<NdArray, 2>::from_floats([[1.0, 1.0]], &Default::default());
    /// let lp = temperature_log_softmax(logits, 2.0, 1).into_data().to_vec::<f32>().unwrap();
    /// assert!((lp[0] - (0.5f32).ln()).abs() < 1e-6);
    /// ```
    temperature_log_softmax,
    /// [`temperature_log_softmax`] that returns an error (for a bad temperature or `dim`)
    /// instead of panicking.
    try_temperature_log_softmax,
    activation::log_softmax
);

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

/// `logits / T`, as a product: burn 0.21's autodiff differentiates `div_scalar` with an f32
/// reciprocal, which would cap f64 gradients at f32 accuracy.
fn scale<B: Backend, const D: usize>(logits: Tensor<B, D>, temperature: f64) -> Tensor<B, D> {
    if temperature == 1.0 {
        logits
    } else {
        logits.mul_scalar(temperature.recip())
    }
}
