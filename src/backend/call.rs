//! The inputs of one kernel call: the student's and the teacher's tensors, the targets, the
//! validated settings and whether the student's gradient is wanted. One generic type serves
//! the dense, sparse and fused-linear kernels and the runs of the tracked hooks.

use burn::tensor::{
    DType, Tensor, TensorPrimitive,
    backend::Backend,
    ops::{BoolTensor, FloatTensor, IntTensor},
};

use super::{LinearSetup, LinearSide};
use crate::DistillParams;

/// One call of a kernel (or of a run, see [`LinearRun`](super::LinearRun)).
///
/// `S` and `T` are the student's and the teacher's inputs (`[N, V]` logits, a sparse teacher's
/// entries, or hidden states and a head), `P` the settings ([`DistillParams`] for logits,
/// [`LinearSetup`] for hidden states). The aliases below name the four kinds.
#[derive(Clone, Debug)]
pub struct KernelCall<B: Backend, S, T, P> {
    /// The student's inputs.
    pub student: S,
    /// The teacher's inputs.
    pub teacher: T,
    /// `[N]` class indices; `None` for the soft term alone.
    pub targets: Option<IntTensor<B>>,
    /// The settings, validated by the loss.
    pub settings: P,
    /// Is the gradient of the student's inputs wanted? (The tracked hooks set it themselves.)
    pub with_grad: bool,
}

impl<B: Backend, S, T, P> KernelCall<B, S, T, P> {
    /// A call without the gradient.
    pub fn new(student: S, teacher: T, targets: Option<IntTensor<B>>, settings: P) -> Self {
        Self {
            student,
            teacher,
            targets,
            settings,
            with_grad: false,
        }
    }

    /// The same call, asking for the gradient or not.
    pub fn with_grad(self, with_grad: bool) -> Self {
        Self { with_grad, ..self }
    }

    /// The same settings on other inputs: `inputs(student, teacher, targets)` (the inner
    /// backend's view of a wrapper's tensors, a chunk of rows).
    pub fn map<B2: Backend, S2, T2>(
        self,
        inputs: impl FnOnce(S, T, Option<IntTensor<B>>) -> (S2, T2, Option<IntTensor<B2>>),
    ) -> KernelCall<B2, S2, T2, P> {
        let (student, teacher, targets) = inputs(self.student, self.teacher, self.targets);
        KernelCall {
            student,
            teacher,
            targets,
            settings: self.settings,
            with_grad: self.with_grad,
        }
    }
}

impl<B: Backend, S, T, P: Copy> KernelCall<B, S, T, P> {
    /// The same call with the student borrowed and `teacher` in the teacher's place (a host
    /// view of it, say).
    pub fn with_teacher<T2>(&self, teacher: T2) -> KernelCall<B, &S, T2, P> {
        KernelCall {
            student: &self.student,
            teacher,
            targets: self.targets.clone(),
            settings: self.settings,
            with_grad: self.with_grad,
        }
    }
}

/// `[N, V]` student and teacher logits.
pub type DenseCall<B> = KernelCall<B, FloatTensor<B>, FloatTensor<B>, DistillParams>;
/// `[N, V]` student logits against a sparse teacher.
pub type SparseCall<B> = KernelCall<B, FloatTensor<B>, SparseInputs<B>, DistillParams>;
/// Hidden states and heads on both sides (the fused-linear loss).
pub type LinearCall<B> = KernelCall<B, LinearSide<B>, LinearSide<B>, LinearSetup>;
/// The student's hidden states and head against a sparse teacher.
pub type SparseLinearCall<B> = KernelCall<B, LinearSide<B>, SparseInputs<B>, LinearSetup>;

/// A sparse teacher as backend primitives: `[N, k]` indices, log-probabilities at `T_gen` and
/// an optional validity mask (`−∞` log-probabilities are missing entries too), and how the
/// entries are read (the tail policy, `T_gen`).
#[derive(Clone, Debug)]
pub struct SparseInputs<B: Backend> {
    /// `[N, k]` token indices.
    pub indices: IntTensor<B>,
    /// `[N, k]` log-probabilities.
    pub log_probs: FloatTensor<B>,
    /// `[N, k]` validity.
    pub mask: Option<BoolTensor<B>>,
    /// The tail policy and the generation temperature.
    pub setup: SparseSetup,
}

impl<B: Backend> SparseInputs<B> {
    /// The log-probabilities in f32 with the mask folded in (a `false` entry as `−∞`): one
    /// float input for a kernel instead of a float and a bool one.
    pub fn folded_log_probs(self) -> Tensor<B, 2> {
        let log_probs =
            Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(self.log_probs)).cast(DType::F32);
        match self.mask {
            Some(mask) => log_probs.mask_fill(
                Tensor::<B, 2, burn::tensor::Bool>::from_primitive(mask).bool_not(),
                f32::NEG_INFINITY,
            ),
            None => log_probs,
        }
    }
}

/// How a sparse teacher's entries are read, beyond [`DistillParams`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparseSetup {
    pub(crate) tail: crate::TailPolicy,
    pub(crate) generation_temperature: f64,
}

impl SparseSetup {
    /// The settings of a sparse-teacher loss (for backends implementing
    /// [`DistillBackend::distill_sparse_fused`](super::DistillBackend::distill_sparse_fused)
    /// and their tests).
    pub fn new(tail: crate::TailPolicy, generation_temperature: f64) -> Self {
        Self {
            tail,
            generation_temperature,
        }
    }
    /// The tail policy.
    pub fn tail(&self) -> crate::TailPolicy {
        self.tail
    }
    /// The generation temperature `T_gen` of the log-probabilities.
    pub fn generation_temperature(&self) -> f64 {
        self.generation_temperature
    }
}
