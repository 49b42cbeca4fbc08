//! What to do when the student's and the teacher's vocabularies differ in size.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::{DistillError, Divergence};

/// The one rule for masked logits, the same on every backend and kernel: a logit `x` with
/// `!(x > MASKED_LOGIT)` is *padding*, not a class. That is `−∞`, and also the large negative
/// values that mask logits in practice: PyTorch's `torch.finfo(dtype).min` idiom (`f32::MIN`,
/// bf16's `−3.39e38`) and anything below `−3·10³⁸` in f64. Padding has zero probability (as
/// any logit that far below the maximum has) and, in the hard term's label smoothing, is left
/// out of the mean over the classes. (f16 cannot reach this value: mask f16 logits with `−∞`.)
pub const MASKED_LOGIT: f64 = -3.0e38;

/// Policy for student and teacher logits whose last dimension (the vocabulary) differs, as
/// with padded embedding tables (e.g. 151,936 vs 152,064 columns).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum VocabMismatch {
    /// A clear error naming both sizes (the default: a mismatch is usually a bug).
    #[default]
    Error,
    /// Keep the common prefix `min(V_s, V_t)` of both; targets must lie in it.
    Truncate,
    /// Pad the smaller side with `−inf` logits up to `max(V_s, V_t)`: zero probability, never
    /// `0` logits (which would silently add probability mass).
    ///
    /// A padded **student** has no mass on the extra columns: where the teacher has mass
    /// there, forward KL is `+∞`, as it mathematically is (the other divergences stay finite).
    /// A padded **teacher** has no mass on columns where the student's softmax always has
    /// some, so reverse KL (and `Jsd { beta: 1 }`) would be `+∞` on every row: that
    /// combination is refused with an error (use `Truncate`, or another divergence; JSD with
    /// `β < 1`, the skew divergences and TVD are finite there).
    PadNegInf,
}

impl VocabMismatch {
    /// The common vocabulary width of `V_s` and `V_t` columns under this policy, or the error
    /// [`VocabMismatch::align`] gives.
    pub(crate) fn aligned_width(
        self,
        vs: usize,
        vt: usize,
        divergence: Divergence,
    ) -> Result<usize, DistillError> {
        if self == VocabMismatch::PadNegInf
            && vt < vs
            && divergence.resolved().ok() == Some(Divergence::ReverseKl)
        {
            return Err(DistillError::invalid(
                "vocab_mismatch",
                format!(
                    "PadNegInf with a teacher vocabulary of {vt} below the student's {vs} and \
                     divergence {divergence:?}"
                ),
                "a divergence that is finite where the teacher has no mass (reverse KL is +inf \
                 on every row there: the student's softmax is positive on the padded columns), \
                 or VocabMismatch::Truncate",
            ));
        }
        match self {
            _ if vs == vt => Ok(vs),
            VocabMismatch::Error => Err(DistillError::invalid(
                "teacher_head",
                format!("vocabulary {vt}"),
                format!(
                    "the student's vocabulary {vs}; set with_vocab_mismatch(VocabMismatch::\
                     Truncate or PadNegInf) if the difference is padding"
                ),
            )),
            VocabMismatch::Truncate => Ok(vs.min(vt)),
            VocabMismatch::PadNegInf => Ok(vs.max(vt)),
        }
    }

    /// Brings `[N, V_s]` and `[N, V_t]` logits to one vocabulary, or says why not.
    pub(crate) fn align<const D: usize>(
        self,
        student: Tensor<D>,
        teacher: Tensor<D>,
        divergence: Divergence,
    ) -> Result<(Tensor<D>, Tensor<D>), DistillError> {
        let (vs, vt) = (student.dims()[D - 1], teacher.dims()[D - 1]);
        if vs == vt {
            return Ok((student, teacher));
        }
        if self == VocabMismatch::PadNegInf {
            self.aligned_width(vs, vt, divergence)?;
        }
        match self {
            VocabMismatch::Error => Err(DistillError::invalid(
                "teacher_logits",
                format!("vocabulary {vt} (shape {:?})", teacher.dims()),
                format!(
                    "the student's vocabulary {vs} (shape {:?}); set \
                     with_vocab_mismatch(VocabMismatch::Truncate or PadNegInf) if the difference \
                     is padding",
                    student.dims()
                ),
            )),
            VocabMismatch::Truncate => {
                let v = vs.min(vt);
                Ok((student.narrow(D - 1, 0, v), teacher.narrow(D - 1, 0, v)))
            }
            VocabMismatch::PadNegInf => {
                let pad = |t: Tensor<D>, to: usize| {
                    let mut dims = t.dims();
                    let extra = to - dims[D - 1];
                    if extra == 0 {
                        return t;
                    }
                    dims[D - 1] = extra;
                    let fill = Tensor::full(dims, f64::NEG_INFINITY, (&t.device(), t.dtype()));
                    Tensor::cat(vec![t, fill], D - 1)
                };
                let v = vs.max(vt);
                Ok((pad(student, v), pad(teacher, v)))
            }
        }
    }
}
