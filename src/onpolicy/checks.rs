//! The value checks of the on-policy inputs: sampled tokens in range, log-probabilities that
//! are finite and `≤ 0`, each as a [`DeviceCheck`] (a `[1]` count on the device, the host scan
//! only when it is not 0).

use burn::tensor::{Bool, Int, Tensor};

use crate::{
    DistillError,
    reduction::count,
    validation::{DeviceCheck, index_check},
};

/// Tokens outside `[0, classes)` among the positions that count (tokens equal to `ignore`, if
/// any, do not). `tokens` are the caller's flattened row-major: `lead` is their shape as the
/// caller passed them, which the message names too when it has more than one dimension.
pub(crate) fn token_check(
    argument: &'static str,
    tokens: &Tensor<1, Int>,
    classes: usize,
    ignore: Option<i64>,
    lead: &[usize],
) -> DeviceCheck {
    let lead = lead.to_vec();
    index_check(tokens, classes, ignore, move |row, value| {
        let at = if lead.len() > 1 {
            format!(
                "; {argument}[{}] of the {lead:?} tokens",
                crate::error::position(&crate::error::unravel(row, &lead))
            )
        } else {
            String::new()
        };
        DistillError::invalid(
            argument,
            format!("{argument}[{row}] = {value} (flattened position{at})"),
            format!("a token index in [0, {classes}) at every position that counts"),
        )
    })
}

/// Log-probabilities that are NaN, infinite or above 0 at the positions where `kept` is true.
pub(crate) fn log_prob_check(
    argument: &'static str,
    log_probs: &Tensor<2>,
    kept: &Tensor<2, Bool>,
) -> DeviceCheck {
    let [_, t] = log_probs.dims();
    // `!(x ≤ 0)` is true for NaN and positive values; −∞ is caught separately.
    let bad = log_probs
        .clone()
        .lower_equal_elem(0.0)
        .bool_not()
        .bool_or(log_probs.clone().is_inf())
        .bool_and(kept.clone());
    let (log_probs, kept) = (log_probs.clone(), kept.clone());
    DeviceCheck::new(count(bad), move |_| {
        let values = log_probs.to_data().convert::<f64>();
        let kept = kept.to_data();
        values
            .iter::<f64>()
            .zip(kept.iter::<bool>())
            .position(|(x, k)| k && !(x <= 0.0 && x.is_finite()))
            .map(|i| {
                let x = values.iter::<f64>().nth(i).unwrap_or(f64::NAN);
                DistillError::invalid(
                    argument,
                    format!("{argument}[{}, {}] = {x}", i / t, i % t),
                    "a finite log-probability <= 0 at every position that counts",
                )
            })
    })
}
