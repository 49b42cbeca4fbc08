//! How per-row losses are reduced to the value that is returned: the one place that says what
//! each reduction divides by.

use burn::tensor::{Bool, DType, Device, Int, Tensor, kind::Numeric};
use serde::{Deserialize, Serialize};

use crate::DistillError;

/// Reduction over the rows (tokens) of a batch.
///
/// Conventions of other tools: PyTorch's `KLDivLoss(reduction="batchmean")` is [`Mean`] (for
/// `[N, V]` rows), its `reduction="mean"` divides by `N·V` and has no equivalent here (it is
/// not a divergence per row); TRL's `generalized_jsd_loss(reduction="batchmean")` with labels
/// is [`Mean`] over the kept tokens, and transformers' `num_items_in_batch` is
/// [`Normalized`]. See the README's "Coming from PyTorch, Liger, TRL, torchtune".
///
/// [`Mean`]: Reduction::Mean
/// [`Normalized`]: Reduction::Normalized
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Reduction {
    /// Sum of the row losses divided by the number of rows that are not ignored
    /// (`0`, with zero gradient, when every row is ignored): PyTorch's `batchmean` over rows.
    #[default]
    Mean,
    /// Sum of the row losses.
    Sum,
    /// Sum of the row losses divided by a count given by the caller, `items ≥ 1`: for gradient
    /// accumulation, pass the number of non-ignored tokens of the whole accumulated batch
    /// (transformers' and TRL's `num_items_in_batch`) and the summed gradients of the
    /// micro-batches equal the gradient of one [`Reduction::Mean`] over the whole batch.
    Normalized {
        /// The divisor: the number of kept rows (tokens) across every micro-batch of the step.
        items: u64,
    },
    /// The `N` row losses, `0` for ignored rows.
    #[serde(alias = "None")]
    PerRow,
}

impl Reduction {
    /// Checks the divisor of [`Reduction::Normalized`].
    pub fn validate(&self) -> Result<(), DistillError> {
        match *self {
            Self::Normalized { items: 0 } => Err(DistillError::invalid(
                "reduction Normalized { items }",
                0,
                "a count >= 1 (the number of kept tokens across the accumulated batch)",
            )),
            _ => Ok(()),
        }
    }

    /// The factor that multiplies the sum of the row losses, given the number of kept rows;
    /// `None` for [`Reduction::PerRow`].
    pub(crate) fn factor(self, kept: usize) -> Option<f64> {
        match self {
            Self::Mean => Some(1.0 / kept.max(1) as f64),
            Self::Sum => Some(1.0),
            Self::Normalized { items } => Some(1.0 / items as f64),
            Self::PerRow => None,
        }
    }

    /// [`Reduction::factor`] as a `[1]` tensor of `dtype`, computed on the device from the
    /// ignored-row mask (no host read-back); `None` for [`Reduction::PerRow`].
    pub(crate) fn factor_tensor(
        self,
        ignored: Option<Tensor<1, Bool>>,
        rows: usize,
        device: &Device,
        dtype: DType,
    ) -> Option<Tensor<1>> {
        match (self, ignored) {
            (Self::Mean, Some(ignored)) => {
                // Counted in the int dtype, then cast once to `dtype` (never through the
                // backend's default float, which may be f16): exact in f32 up to 2^24 rows.
                let kept: Tensor<1> =
                    count(ignored.bool_not()).cast(burn::tensor::FloatDType::from(dtype));
                Some(kept.clamp_min(1.0).recip())
            }
            (Self::Mean, None) => Some(Tensor::full([1], 1.0 / rows as f64, (device, dtype))),
            (reduction, _) => reduction
                .factor(rows)
                .map(|f| Tensor::full([1], f, (device, dtype))),
        }
    }
}

/// Rows whose target is the ignore index, if there are targets and an ignore index.
pub(crate) fn ignored_rows(
    targets: Option<&Tensor<1, Int>>,
    ignore_index: Option<i64>,
) -> Option<Tensor<1, Bool>> {
    Some(targets?.clone().equal_elem(ignore_index?))
}

/// Reduces `[N]` row losses; `ignored` rows (already 0) do not count in the mean.
pub(crate) fn reduce_rows(
    rows: Tensor<1>,
    ignored: Option<Tensor<1, Bool>>,
    reduction: Reduction,
) -> Tensor<1> {
    let n = rows.dims()[0];
    match reduction {
        Reduction::PerRow => rows,
        Reduction::Sum => pairwise_sum(rows),
        _ => {
            let factor = reduction.factor_tensor(ignored, n, &rows.device(), rows.dtype());
            pairwise_sum(rows) * factor.expect("a reduction to one value has a factor")
        }
    }
}

/// `Σ rows` as a `[1]` tensor, summed pairwise: the rows (zero-padded to a power of two) are
/// halved `log₂ N` times by adding the second half to the first. Runs on the device, without a
/// host read, for float and int tensors alike; differentiable.
///
/// Two reasons not to call the backend's own `sum`: the rounding error grows with `log₂ N`, not
/// `N`, whatever order the backend takes; and burn 0.21's reduce kernels on wgpu drop elements
/// past about 65,532 in a full reduction (measured on lavapipe: the sum of 10⁶ ones is 262,132,
/// and which result comes back depends on the strategy autotuning picked), so that a mean over
/// a long batch would divide by a wrong count. Only element-wise additions run here.
pub(crate) fn pairwise_sum<K>(rows: Tensor<1, K>) -> Tensor<1, K>
where
    K: Numeric,
{
    if rows.dims()[0] <= 2 {
        return rows.sum();
    }
    pairwise_sum_rows(rows)
}

/// The sum over the first dimension, keeping it (`[N, …]` → `[1, …]`), pairwise as in
/// [`pairwise_sum`]: a column sum of burn 0.21's reduce kernels on wgpu drops rows past about
/// 65,532 (measured: `sum_dim(0)` of `[100000, 3]` ones gives 65,532 per column).
pub(crate) fn pairwise_sum_rows<const D: usize, K>(rows: Tensor<D, K>) -> Tensor<D, K>
where
    K: Numeric,
{
    let mut dims = rows.dims();
    let n = dims[0];
    let p = n.next_power_of_two();
    let mut t = if p > n {
        dims[0] = p - n;
        let zeros = Tensor::zeros(dims, (&rows.device(), rows.dtype()));
        Tensor::cat(vec![rows, zeros], 0)
    } else {
        rows
    };
    // Element-wise additions of two halves (no reduction kernel: nothing to autotune per
    // length on the CubeCL backends, and burn's fusion fuses them).
    let mut len = p;
    while len > 1 {
        len /= 2;
        t = t.clone().narrow(0, 0, len) + t.narrow(0, len, len);
    }
    t
}

/// The number of `true` entries of a mask of any rank, as a `[1]` int tensor on the device
/// (through [`pairwise_sum`], exact at any size).
pub(crate) fn count<const D: usize>(mask: Tensor<D, Bool>) -> Tensor<1, Int> {
    pairwise_sum(mask.int().flatten::<1>(0, D - 1))
}
