//! What to do when the student's and the teacher's vocabularies differ in size.

use burn::tensor::{Tensor, backend::Backend};
use serde::{Deserialize, Serialize};

use crate::DistillError;

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
    /// `0` logits (which would silently add probability mass). If the teacher keeps mass on
    /// columns the student lacks, forward KL is then `+∞`, as it mathematically is; reverse KL
    /// and the hard term are unaffected.
    PadNegInf,
}

impl VocabMismatch {
    /// The common vocabulary width of `V_s` and `V_t` columns under this policy, or the error
    /// [`VocabMismatch::align`] gives.
    pub(crate) fn aligned_width(self, vs: usize, vt: usize) -> Result<usize, DistillError> {
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
    pub(crate) fn align<B: Backend, const D: usize>(
        self,
        student: Tensor<B, D>,
        teacher: Tensor<B, D>,
    ) -> Result<(Tensor<B, D>, Tensor<B, D>), DistillError> {
        let (vs, vt) = (student.dims()[D - 1], teacher.dims()[D - 1]);
        if vs == vt {
            return Ok((student, teacher));
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
                let pad = |t: Tensor<B, D>, to: usize| {
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
