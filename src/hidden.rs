//! Losses between hidden states (FitNets, DistilBERT's cosine loss).

use burn::{
    config::Config,
    module::Module,
    nn::{Linear, LinearConfig},
    tensor::{Bool, DType, FloatDType, Tensor, backend::Backend},
};
use serde::{Deserialize, Serialize};

use crate::{DistillError, error::panicking, reduction::pairwise_sum};

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
/// use burn::backend::{Autodiff, NdArray};
/// use burn::tensor::Tensor;
/// use burn_distill::{HiddenLossKind, HiddenStateLossConfig};
///
/// type B = Autodiff<NdArray>;
/// let device = Default::default();
/// // Student width 4, teacher width 6: a learned 4 → 6 projection is created.
/// let loss = HiddenStateLossConfig::new(4, 6)
///     .with_kind(HiddenLossKind::Cosine)
///     .init::<B>(&device);
/// let student = Tensor::<B, 2>::ones([3, 4], &device).require_grad();
/// let teacher = Tensor::<B, 2>::ones([3, 6], &device);
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
    panicking! {
        /// Builds the loss (with its projection, a trainable `Linear`, when needed).
        ///
        /// # Panics
        /// If a width is 0, with the message of [`HiddenStateLossConfig::try_init`].
        pub fn init<B: Backend>(&self, device: &B::Device) -> HiddenStateLoss<B> {
            self.try_init(device)
        }
    }

    /// [`HiddenStateLossConfig::init`] that returns an error instead of panicking.
    pub fn try_init<B: Backend>(
        &self,
        device: &B::Device,
    ) -> Result<HiddenStateLoss<B>, DistillError> {
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
/// Combine it with [`DistillLoss`](crate::DistillLoss) by a weighted sum of the scalar losses;
/// DistilBERT used `5 · KD + 2 · MLM + 1 · cosine`:
/// `kd.mul_scalar(5.0) + mlm.mul_scalar(2.0) + cosine.mul_scalar(1.0)`. Keep the loss (and so
/// its projection) inside the student's module so that the optimiser trains the projection.
#[derive(Module, Debug)]
pub struct HiddenStateLoss<B: Backend> {
    projection: Option<Linear<B>>,
    #[module(skip)]
    kind: HiddenLossKind,
    student_dim: usize,
    teacher_dim: usize,
}

impl<B: Backend> HiddenStateLoss<B> {
    panicking! {
        /// `[1]` loss of `[N, H_s]` student and `[N, H_t]` teacher hidden states.
        ///
        /// # Panics
        /// On bad shapes, with the message of [`HiddenStateLoss::try_forward`].
        pub fn forward(&self, student: Tensor<B, 2>, teacher: Tensor<B, 2>,
            mask: Option<Tensor<B, 1, Bool>>) -> Tensor<B, 1> {
            self.try_forward(student, teacher, mask)
        }
    }

    /// [`HiddenStateLoss::forward`] that returns an error naming the bad argument.
    pub fn try_forward(
        &self,
        student: Tensor<B, 2>,
        teacher: Tensor<B, 2>,
        mask: Option<Tensor<B, 1, Bool>>,
    ) -> Result<Tensor<B, 1>, DistillError> {
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
            Some(projection) => projection.forward(student),
            None => student,
        };
        let teacher = teacher.detach();
        let rows: Tensor<B, 1> = match self.kind {
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
        // pairwise (burn 0.21's `sum` on wgpu drops elements past about 65,532).
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
        Ok(mean.cast(FloatDType::from(dtype)))
    }
}
