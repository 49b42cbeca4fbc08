//! Alignment of two tokenizations of the same text: token byte spans → groups of tokens that
//! end where the other tokenization also cuts, and the plan that merges each group's rows into
//! one distribution.

use std::ops::Range;

use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::{DistillError, kernel::reference::gather_columns};

/// Tokens of both sequences that cover the same bytes: `student` and `teacher` are ranges of
/// token positions within the span lists given to [`align_spans`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlignedSpan {
    /// The student's tokens of this span.
    pub student: Range<usize>,
    /// The teacher's tokens of this span.
    pub teacher: Range<usize>,
}

/// Groups the tokens of two tokenizations of one text into aligned spans: a span closes where
/// both tokenizations cut (TRL GOLD's `_align_by_byte_offsets`, a two-pointer walk on the
/// tokens' end offsets).
///
/// Each list holds the `[start, end)` byte span of every token, in order; both must tile the
/// same text: the first starts at 0, each starts where the previous ended, none is empty, and
/// both end at the same byte. (Give the completion's tokens, without zero-width special
/// tokens such as EOS.)
///
/// ```
/// use burn_distill::cross::{AlignedSpan, align_spans};
///
/// // "hello world": the student cut "hel|lo| world", the teacher "hello| wor|ld".
/// let student = [(0, 3), (3, 5), (5, 11)];
/// let teacher = [(0, 5), (5, 9), (9, 11)];
/// let spans = align_spans(&student, &teacher).unwrap();
/// assert_eq!(spans, vec![
///     AlignedSpan { student: 0..2, teacher: 0..1 },
///     AlignedSpan { student: 2..3, teacher: 1..3 },
/// ]);
/// ```
pub fn align_spans(
    student: &[(usize, usize)],
    teacher: &[(usize, usize)],
) -> Result<Vec<AlignedSpan>, DistillError> {
    let s_len = check_tiling("student", student)?;
    let t_len = check_tiling("teacher", teacher)?;
    if s_len != t_len {
        return Err(DistillError::invalid(
            "teacher",
            format!("spans ending at byte {t_len}"),
            format!("the student's text length, {s_len} bytes (both tokenize the same text)"),
        ));
    }
    let (mut s, mut t, mut s0, mut t0) = (0, 0, 0, 0);
    let mut spans = Vec::new();
    while s < student.len() && t < teacher.len() {
        let (s_end, t_end) = (student[s].1, teacher[t].1);
        if s_end < t_end {
            s += 1;
        } else if s_end > t_end {
            t += 1;
        } else {
            s += 1;
            t += 1;
            spans.push(AlignedSpan {
                student: s0..s,
                teacher: t0..t,
            });
            (s0, t0) = (s, t);
        }
    }
    Ok(spans)
}

/// The length of the text that `spans` tile, or the first span that breaks the tiling.
fn check_tiling(side: &'static str, spans: &[(usize, usize)]) -> Result<usize, DistillError> {
    let mut end = 0;
    for (j, &(a, b)) in spans.iter().enumerate() {
        if a != end || b <= a {
            return Err(DistillError::invalid(
                side,
                format!("{side}[{j}] = ({a}, {b})"),
                format!(
                    "a non-empty byte span starting at {end} (spans tile the text: the first \
                     starts at 0, each where the previous ended)"
                ),
            ));
        }
        end = b;
    }
    Ok(end)
}

/// How the several tokens of one side of an aligned span become one distribution (TRL GOLD's
/// `uld_token_merge_strategy`). Row `r` of a side is the distribution of its token `r` (the
/// logits that predict it); for a span of tokens `y_a … y_b`:
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MergeStrategy {
    /// `p_a(·) · Π_{j=a+1..b} p_j(y_j)`: the first token's distribution times the probability
    /// of the actual continuation (GOLD's default, `observed`).
    #[default]
    Observed,
    /// `p_b(·) · Π_{j=a..b−1} p_j(y_j)`: the last token's distribution times the probability of
    /// the actual prefix (the chain rule; GOLD's `bayesian`).
    Bayesian,
}

/// Each token probability in a product is clamped below at this value (GOLD's `1e-8`).
pub const MERGE_FLOOR: f64 = 1e-8;

/// The rows of one side that make each group: `base[g]` gives the distribution, and the
/// tokens at `extra[g·width .. (g+1)·width]` multiply it by their probability (the entry
/// `rows` pads: a probability of 1).
#[derive(Clone, Debug, Default)]
pub(crate) struct MergePlan {
    pub(crate) rows: usize,
    pub(crate) base: Vec<i64>,
    extra: Vec<Vec<i64>>,
}

impl MergePlan {
    fn push(&mut self, first_row: usize, tokens: Range<usize>, strategy: MergeStrategy) {
        let rows = tokens.start + first_row..tokens.end + first_row;
        let base = match strategy {
            MergeStrategy::Observed => rows.start,
            MergeStrategy::Bayesian => rows.end - 1,
        };
        self.base.push(base as i64);
        self.extra
            .push(rows.filter(|&r| r != base).map(|r| r as i64).collect());
    }

    /// The `[G, V]` merged rows of `[rows, V]` probabilities `p` with tokens `[rows]`.
    ///
    /// The products are sums of logarithms gathered through a `[G, width]` index matrix (no
    /// scatter: burn-fusion 0.21 (`Wgpu`) miscomputed a `select_assign` into fresh zeros here).
    pub(crate) fn merge(&self, p: Tensor<2>, tokens: Tensor<1, Int>) -> Tensor<2> {
        let device = p.device();
        let groups = self.base.len();
        let base = p.clone().select(0, ints(&self.base, &device));
        let width = self.extra.iter().map(Vec::len).max().unwrap_or(0);
        if width == 0 {
            return base;
        }
        let pad = self.rows as i64;
        let index: Vec<i64> = self
            .extra
            .iter()
            .flat_map(|e| e.iter().copied().chain(std::iter::repeat(pad)).take(width))
            .collect();
        let token_p = gather_columns(p, tokens.reshape([self.rows, 1])).reshape([self.rows]);
        let logs = token_p.clamp_min(MERGE_FLOOR).log();
        let logs = Tensor::cat(vec![logs.clone(), logs.zeros_like().slice(0..1)], 0);
        let sums = logs
            .select(0, ints(&index, &device))
            .reshape([groups, width])
            .sum_dim(1);
        base * sums.exp()
    }
}

fn ints(values: &[i64], device: &Device) -> Tensor<1, Int> {
    Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), device)
}

/// One sequence's `(student, teacher)` token byte spans (see [`align_spans`]).
pub type SequenceSpans<'a> = (&'a [(usize, usize)], &'a [(usize, usize)]);

/// The aligned spans of a batch of sequences, ready to merge the rows of both sides.
///
/// Rows are flattened: sequence `i`'s student rows follow those of sequences `0 … i−1` (one
/// row per token of its span list), and so do the teacher's. Built once per batch on the
/// host, from byte spans only (no tokenizer).
#[derive(Clone, Debug)]
pub struct SpanAlignment {
    pub(crate) student: MergePlan,
    pub(crate) teacher: MergePlan,
    /// Per group, the weight of the `Mean` reduction: `1 / (sequences · groups of its sequence)`.
    pub(crate) mean_weights: Vec<f64>,
}

impl SpanAlignment {
    /// Aligns each `(student spans, teacher spans)` pair (see [`align_spans`]).
    ///
    /// ```
    /// use burn_distill::cross::{MergeStrategy, SpanAlignment};
    ///
    /// let a = SpanAlignment::new(
    ///     MergeStrategy::Observed,
    ///     &[(&[(0, 3), (3, 5)][..], &[(0, 5)][..]), (&[(0, 2)][..], &[(0, 1), (1, 2)][..])],
    /// )
    /// .unwrap();
    /// assert_eq!((a.groups(), a.student_rows(), a.teacher_rows()), (2, 3, 3));
    /// ```
    pub fn new(
        strategy: MergeStrategy,
        sequences: &[SequenceSpans<'_>],
    ) -> Result<Self, DistillError> {
        let mut student = MergePlan::default();
        let mut teacher = MergePlan::default();
        let mut mean_weights = Vec::new();
        for (i, (s, t)) in sequences.iter().enumerate() {
            let spans = align_spans(s, t).map_err(|e| match e {
                DistillError::InvalidArgument {
                    argument,
                    value,
                    expected,
                } => DistillError::InvalidArgument {
                    argument: format!("sequences[{i}].{argument}"),
                    value,
                    expected,
                },
                other => other,
            })?;
            if spans.is_empty() {
                return Err(DistillError::invalid(
                    format!("sequences[{i}]"),
                    "no tokens",
                    "at least one token on each side",
                ));
            }
            for span in &spans {
                student.push(student.rows, span.student.clone(), strategy);
                teacher.push(teacher.rows, span.teacher.clone(), strategy);
                mean_weights.push(1.0 / (sequences.len() * spans.len()) as f64);
            }
            student.rows += s.len();
            teacher.rows += t.len();
        }
        if sequences.is_empty() {
            return Err(DistillError::invalid(
                "sequences",
                "an empty list",
                "at least one sequence",
            ));
        }
        Ok(Self {
            student,
            teacher,
            mean_weights,
        })
    }

    /// The number of aligned spans (merged rows of each side).
    pub fn groups(&self) -> usize {
        self.mean_weights.len()
    }

    /// The number of student rows (tokens) the alignment expects.
    pub fn student_rows(&self) -> usize {
        self.student.rows
    }

    /// The number of teacher rows (tokens) the alignment expects.
    pub fn teacher_rows(&self) -> usize {
        self.teacher.rows
    }
}
