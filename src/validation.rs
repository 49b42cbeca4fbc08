//! When the losses check the values of their inputs: in `forward` (one read-back per call), on
//! the device with the result read only when asked ([`DistillOutput::validate`]), or never.
//!
//! Shapes and configurations are always checked on the host (they cost nothing). Values
//! (targets, a sparse teacher's indices and log-probabilities) live on the device: each check
//! is a `[1]` count of bad values computed there with a few `O(N)` (sparse: `O(N·k²)`) tensor
//! ops queued beside the loss, and the host code that names the first bad value runs only
//! when that count is not 0.

use std::sync::Arc;

use burn::tensor::{Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::DistillError;

/// When a loss checks the values of its inputs: targets in `[0, V)` or the ignore index, and a
/// sparse teacher's indices (in range, distinct within a row), log-probabilities (`≤ 0`, a mass
/// `≤ 1` with the tail bucket) and rows with at least one entry.
///
/// Unchecked, an out-of-range target or teacher index (or a row without a valid teacher entry)
/// makes its row loss NaN, and so a `Mean` or `Sum`, never a wrong finite value; so do
/// duplicate indices, log-probabilities above 0 and a tail mass above 1 in the fused sparse
/// kernels (the composed reference catches those only through the checks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Validation {
    /// In `forward`: a bad value is an error naming it before any loss is returned. Costs one
    /// read-back from the device per call, a pipeline stall on a GPU (the default: the safest
    /// while data pipelines are being written).
    #[default]
    Eager,
    /// On the device: `forward` queues the checks beside the loss and reads nothing back;
    /// [`DistillOutput::validate`](crate::DistillOutput::validate) reads their result (one
    /// read-back) and names the first bad value. For GPU training loops: validate every few
    /// steps, or when the loss you log is not finite.
    Deferred,
    /// Never (bad rows still give NaN, never a wrong finite value).
    Off,
}

/// One check queued on the device by a forward with [`Validation::Deferred`].
#[derive(Clone)]
pub(crate) struct DeviceCheck {
    /// `[1]`: the number of bad values (0 when the input is valid).
    bad: Tensor<1, Int>,
    /// Reads the input back and names its first bad value (run only when `bad` is not 0);
    /// `None` if the input is valid after all (a count that also sees other causes, such as a
    /// NaN loss from non-finite logits, which is not an input error).
    explain: Arc<dyn Fn(i64) -> Option<DistillError> + Send + Sync>,
}

impl std::fmt::Debug for DeviceCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCheck").finish_non_exhaustive()
    }
}

impl DeviceCheck {
    /// A check from the `[1]` count of bad values and the function that names the first.
    pub(crate) fn new(
        bad: Tensor<1, Int>,
        explain: impl Fn(i64) -> Option<DistillError> + Send + Sync + 'static,
    ) -> Self {
        Self {
            bad,
            explain: Arc::new(explain),
        }
    }

    /// Runs the check now ([`Validation::Eager`]): one read-back, and the host scan only if it
    /// found something.
    pub(crate) fn run(self) -> Result<(), DistillError> {
        validate(std::slice::from_ref(&self))
    }

    /// The check as `mode` wants it: run now (`Eager`), kept for later (`Deferred`), dropped.
    pub(crate) fn apply(self, mode: Validation) -> Result<Option<Self>, DistillError> {
        match mode {
            Validation::Eager => self.run().map(|()| None),
            Validation::Deferred => Ok(Some(self)),
            Validation::Off => Ok(None),
        }
    }
}

/// Reads the counts of `checks` in one read-back and names the first bad value.
pub(crate) fn validate(checks: &[DeviceCheck]) -> Result<(), DistillError> {
    if checks.is_empty() {
        return Ok(());
    }
    let counts = Tensor::cat(checks.iter().map(|c| c.bad.clone()).collect(), 0)
        .into_data()
        .convert::<i64>();
    let counts = counts.as_slice::<i64>().expect("i64 counts");
    for (check, &n) in checks.iter().zip(counts) {
        if n != 0
            && let Some(error) = (check.explain)(n)
        {
            return Err(error);
        }
    }
    Ok(())
}

/// Class (or token) indices outside `[0, classes)`, other than `ignore`: counted on the device;
/// the host scan for the first one runs only when the count is not 0, and `error(position,
/// value)` names it.
pub(crate) fn index_check(
    indices: &Tensor<1, Int>,
    classes: usize,
    ignore: Option<i64>,
    error: impl Fn(usize, i64) -> DistillError + Send + Sync + 'static,
) -> DeviceCheck {
    let mut bad = indices
        .clone()
        .lower_elem(0)
        .bool_or(indices.clone().greater_equal_elem(classes as i64));
    if let Some(ignore) = ignore {
        bad = bad.bool_and(indices.clone().not_equal_elem(ignore));
    }
    let indices = indices.clone();
    DeviceCheck::new(crate::reduction::count(bad), move |_| {
        let data = indices.to_data();
        data.iter::<i64>()
            .enumerate()
            .find(|&(_, t)| (t < 0 || t >= classes as i64) && Some(t) != ignore)
            .map(|(position, value)| error(position, value))
    })
}
