//! The inputs and outputs of the fused-linear kernels: each side's hidden states and head,
//! how the chunks run, and the student's gradients.

use burn::tensor::{backend::Backend, ops::FloatTensor};

use super::DistillParts;
use crate::{DistillParams, Kernel, VocabMismatch};

/// One side of a fused-linear loss (student or teacher), as backend primitives: `[N, H]`
/// hidden states and an `[H, V]` head (burn's `Linear` layout) with an optional `[V]` bias.
#[derive(Clone, Debug)]
pub struct LinearSide<B: Backend> {
    /// `[N, H]` hidden states.
    pub hidden: FloatTensor<B>,
    /// `[H, V]` weight.
    pub weight: FloatTensor<B>,
    /// `[V]` bias.
    pub bias: Option<FloatTensor<B>>,
}

/// How a fused-linear loss runs: the loss parameters, the kernel choice, the vocabulary policy
/// and the number of rows per chunk (all validated by [`DistillLoss`](crate::DistillLoss)).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinearSetup {
    pub(crate) params: DistillParams,
    pub(crate) kernel: Kernel,
    pub(crate) vocab_mismatch: VocabMismatch,
    pub(crate) chunk_rows: usize,
    pub(crate) logit_softcap: Option<f64>,
    pub(crate) weight_grad: bool,
    pub(crate) bias_grad: bool,
}

impl LinearSetup {
    /// The loss parameters.
    pub fn params(&self) -> &DistillParams {
        &self.params
    }
    /// Rows of logits computed at a time.
    pub fn chunk_rows(&self) -> usize {
        self.chunk_rows
    }
    /// The logit soft-cap `c`, if any: applied to the student's logits, and to a dense
    /// teacher's (a sparse teacher's log-probabilities are taken as given).
    pub fn logit_softcap(&self) -> Option<f64> {
        self.logit_softcap
    }
    /// The kernel choice (`Kernel::Reference` runs the reference loss on every chunk).
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }
    /// How the two heads' vocabularies are brought to one.
    pub fn vocab_mismatch(&self) -> VocabMismatch {
        self.vocab_mismatch
    }
    /// Is the gradient of the student head's weight computed (the `[H, V]` product)?
    pub fn weight_grad(&self) -> bool {
        self.weight_grad
    }
    /// Is the gradient of the student head's bias computed (when it has one)?
    pub fn bias_grad(&self) -> bool {
        self.bias_grad
    }
}

/// The loss parts and, when asked, the student's gradients, of a chunked fused-linear loss
/// (see [`DistillBackend::distill_linear_chunked`](crate::DistillBackend::distill_linear_chunked)).
pub type LinearOutput<B> = (DistillParts<B>, Option<LinearGrads<B>>);

/// The student's gradients of a chunked fused-linear loss, computed in the forward pass.
#[derive(Clone, Debug)]
pub struct LinearGrads<B: Backend> {
    /// `[N, H_s]` gradient of the hidden states (zero on ignored rows).
    pub hidden: FloatTensor<B>,
    /// `[H_s, V_s]` gradient of the head's weight, unless [`LinearSetup::weight_grad`] is
    /// false (a frozen or tied head: no `[H, V]` product is formed).
    pub weight: Option<FloatTensor<B>>,
    /// `[V_s]` gradient of the head's bias, if it has one and [`LinearSetup::bias_grad`].
    pub bias: Option<FloatTensor<B>>,
}

impl<B: Backend> LinearGrads<B> {
    /// The gradients in the order of the op's inputs: hidden, weight and bias (those computed).
    pub(crate) fn into_vec(self) -> Vec<FloatTensor<B>> {
        [Some(self.hidden), self.weight, self.bias]
            .into_iter()
            .flatten()
            .collect()
    }
}
