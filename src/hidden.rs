//! Losses between hidden states (FitNets, DistilBERT's cosine loss).

use burn::{
    config::Config,
    module::Module,
    nn::{Linear, LinearConfig},
    tensor::{Bool, DType, Device, FloatDType, Tensor},
};
use serde::{Deserialize, Serialize};

use crate::{DistillError, error::or_panic, reduction::pairwise_sum};

/// The distance between a student's and a teacher's hidden state, per row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum HiddenLossKind {
    /// Mean squared error over the hidden dimension: `mean_j (h_s′ − h_t)_j²` (FitNets).
    #[default]
    Mse,
    /// Cosine distance `1 − cos(h_s′, h_t) = 1 − h_s′·h_t / (‖h_s′‖ ‖h_t‖)` (DistilBERT's
    /// cosine embedding loss with target 1); a zero vector counts as distance 1.
    Cosine,
}

/// Configuration of a [`HiddenStateLoss`].
///
/// ```
/// use burn::tensor::{Device, Tensor};
/// use burn_distill::{HiddenLossKind, HiddenStateLossConfig};
///
/// let device = Device::default().autodiff();
/// // Student width 4, teacher width 6: a learned 4 → 6 projection is created.
/// let loss = HiddenStateLossConfig::new(4, 6)
///     .with_kind(HiddenLossKind::Cosine)
///     .init(&device);
/// let student = Tensor::<2>::ones([3, 4], &device).require_grad();
/// let teacher = Tensor::<2>::ones([3, 6], &device);
/// let value = loss.forward(student.clone(), teacher, None);
/// let grads = value.backward();
/// assert!(student.grad(&grads).is_some());
/// ```
#[derive(Config, Debug)]
pub struct HiddenStateLossConfig {
    /// Width `H_s` of the student's hidden states.
    pub student_dim: usize,
    /// Width `H_t` of the teacher's hidden states.
    pub teacher_dim: usize,
    /// The distance.
    #[config(default = "HiddenLossKind::Mse")]
    pub kind: HiddenLossKind,
    /// Learn a linear projection `H_s → H_t` even when the widths are equal (it is always
    /// learned when they differ).
    #[config(default = false)]
    pub force_projection: bool,
}

impl HiddenStateLossConfig {
    /// Builds the loss (with its projection, a trainable `Linear` on `device`, when needed).
    ///
    /// # Panics
    /// If a width is 0, with the message of [`HiddenStateLossConfig::try_init`], at the
    /// caller's line.
    #[track_caller]
    pub fn init(&self, device: &Device) -> HiddenStateLoss {
        or_panic(self.try_init(device))
    }

    /// [`HiddenStateLossConfig::init`] that returns an error instead of panicking.
    ///
    /// ```
    /// use burn::tensor::Device;
    /// use burn_distill::HiddenStateLossConfig;
    ///
    /// let err = HiddenStateLossConfig::new(0, 4).try_init(&Device::default()).unwrap_err();
    /// assert_eq!(err.to_string(), "invalid student_dim: got 0, expected a width >= 1");
    /// ```
    pub fn try_init(&self, device: &Device) -> Result<HiddenStateLoss, DistillError> {
        for (name, dim) in [
            ("student_dim", self.student_dim),
            ("teacher_dim", self.teacher_dim),
        ] {
            if dim == 0 {
                return Err(DistillError::invalid(name, dim, "a width >= 1"));
            }
        }
        let projection = (self.force_projection || self.student_dim != self.teacher_dim)
            .then(|| LinearConfig::new(self.student_dim, self.teacher_dim).init(device));
        Ok(HiddenStateLoss {
            projection,
            kind: self.kind,
            student_dim: self.student_dim,
            teacher_dim: self.teacher_dim,
        })
    }
}

/// Hidden-state distillation loss: `mean over kept rows of d(P h_s, h_t)`, where `P` is the
/// learned projection (identity when the widths match), `d` a [`HiddenLossKind`], and rows
/// (tokens) are kept where `mask` is true (all rows without a mask). `0` when no row is kept.
/// The teacher gets no gradient; the student and the projection do.
///
/// ```text
/// h_s′ = P h_s                  (h_s itself without a projection)
/// Mse:     d_i = mean_j (h_s′ − h_t)_ij²
/// Cosine:  d_i = 1 − h_s′_i·h_t_i / (‖h_s′_i‖ ‖h_t_i‖)      (1 if either vector is 0)
/// loss = Σ_i m_i d_i / max(Σ_i m_i, 1)                       (m_i = 1 without a mask)
/// ```
///
/// ```
/// use burn::tensor::{Bool, Device, Tensor};
/// use burn_distill::{HiddenLossKind, HiddenStateLossConfig};
///
/// let device = Device::default();
/// let student = Tensor::<2>::from_floats([[1.0, 2.0], [3.0, 4.0]], &device);
/// let teacher = Tensor::<2>::from_floats([[1.0, 0.0], [0.0, 4.0]], &device);
/// // Equal widths: no projection. MSE rows (0² + 2²) / 2 = 2 and (3² + 0²) / 2 = 4.5.
/// let mse = HiddenStateLossConfig::new(2, 2).init(&device);
/// let value = mse.forward(student.clone(), teacher.clone(), None).into_scalar::<f32>();
/// assert!((value - 3.25).abs() < 1e-6);
/// // Cosine, the second row masked out: 1 − 1/√5 (by hand in f64).
/// let cosine = HiddenStateLossConfig::new(2, 2)
///     .with_kind(HiddenLossKind::Cosine)
///     .init(&device);
/// let mask = Tensor::<1, Bool>::from_bool([true, false], &device);
/// let value = cosine.forward(student, teacher, Some(mask)).into_scalar::<f32>();
/// assert!((value - 0.552_786).abs() < 1e-6);
/// ```
///
/// Combine it with [`DistillLoss`](crate::DistillLoss) by a weighted sum of the scalar losses;
/// DistilBERT used `5 · KD + 2 · MLM + 1 · cosine`:
/// `kd.mul_scalar(5.0) + mlm.mul_scalar(2.0) + cosine.mul_scalar(1.0)`. Keep the loss (and so
/// its projection) inside the student's module so that the optimiser trains the projection.
///
/// # Shapes
/// - `student`: `[N, H_s]`, `teacher`: `[N, H_t]`, `mask`: `[N]`
/// - output: `[1]`
#[derive(Module, Debug)]
pub struct HiddenStateLoss {
    projection: Option<Linear>,
    #[module(skip)]
    kind: HiddenLossKind,
    student_dim: usize,
    teacher_dim: usize,
}

impl HiddenStateLoss {
    /// `[1]` loss of `[N, H_s]` student and `[N, H_t]` teacher hidden states.
    ///
    /// # Panics
    /// On bad shapes, with the message of [`HiddenStateLoss::try_forward`], at the caller's
    /// line.
    #[track_caller]
    pub fn forward(
        &self,
        student: Tensor<2>,
        teacher: Tensor<2>,
        mask: Option<Tensor<1, Bool>>,
    ) -> Tensor<1> {
        or_panic(self.try_forward(student, teacher, mask))
    }

    /// [`HiddenStateLoss::forward`] that returns an error naming the bad argument (a shape,
    /// or student hidden states of another float dtype than the projection's parameters).
    pub fn try_forward(
        &self,
        student: Tensor<2>,
        teacher: Tensor<2>,
        mask: Option<Tensor<1, Bool>>,
    ) -> Result<Tensor<1>, DistillError> {
        let [n, hs] = student.dims();
        if hs != self.student_dim {
            return Err(DistillError::invalid(
                "student_hidden",
                format!("shape {:?}", student.dims()),
                format!("[N, {}] (the configured student_dim)", self.student_dim),
            ));
        }
        if teacher.dims() != [n, self.teacher_dim] {
            return Err(DistillError::invalid(
                "teacher_hidden",
                format!("shape {:?}", teacher.dims()),
                format!(
                    "[{n}, {}] (the student's rows, the configured teacher_dim)",
                    self.teacher_dim
                ),
            ));
        }
        if let Some(mask) = &mask
            && mask.dims() != [n]
        {
            return Err(DistillError::invalid(
                "mask",
                format!("shape {:?}", mask.dims()),
                format!("[{n}] (one flag per row)"),
            ));
        }
        let student = match &self.projection {
            Some(projection) => {
                // The projection's parameters have the float dtype of the device they were
                // created on; a matmul of two dtypes would panic inside the backend.
                let weights = projection.weight.val().dtype();
                if student.dtype() != weights {
                    return Err(DistillError::invalid(
                        "student_hidden",
                        format!("dtype {:?}", student.dtype()),
                        format!(
                            "{weights:?}, the dtype of the projection's parameters (the float \
                             dtype of the device passed to init)"
                        ),
                    ));
                }
                projection.forward(student)
            }
            None => student,
        };
        let teacher = teacher.detach();
        let rows: Tensor<1> = match self.kind {
            HiddenLossKind::Mse => (student - teacher)
                .powi_scalar(2)
                .mean_dim(1)
                .squeeze_dim(1),
            HiddenLossKind::Cosine => {
                let dot = (student.clone() * teacher.clone()).sum_dim(1);
                let squared = student.powi_scalar(2).sum_dim(1) * teacher.powi_scalar(2).sum_dim(1);
                // A zero vector gives cos = 0 (distance 1) instead of 0/0; masking before the
                // square root keeps its gradient finite too.
                let zero = squared.clone().equal_elem(0.0);
                let norms = squared.mask_fill(zero.clone(), 1.0).sqrt();
                let cos = dot.mask_fill(zero, 0.0) / norms;
                cos.neg().add_scalar(1.0).squeeze_dim(1)
            }
        };
        // The mean in f32 for half-precision rows (an f16 count overflows at 65,504), summed
        // pairwise (see `pairwise_sum`: a backend's `sum` on wgpu dropped elements past about
        // 65,532 in burn 0.21).
        let dtype = rows.dtype();
        let rows = match dtype {
            DType::F16 | DType::BF16 => rows.cast(FloatDType::F32),
            _ => rows,
        };
        let mean = match mask {
            None => {
                let n = rows.dims()[0];
                pairwise_sum(rows) / n as f64
            }
            Some(mask) => {
                let dropped = mask.bool_not();
                let kept = pairwise_sum(rows.ones_like().mask_fill(dropped.clone(), 0.0));
                pairwise_sum(rows.mask_fill(dropped, 0.0)) / kept.clamp_min(1.0)
            }
        };
        Ok(mean.cast(dtype))
    }
}
