//! The entries of two vocabularies whose token strings are identical (GOLD's hybrid loss).

use std::collections::HashMap;

use crate::DistillError;

/// The token ids of two vocabularies whose strings are identical, computed once from the two
/// token lists (TRL GOLD: exact equality of the raw token strings, no normalisation of
/// space markers such as `Ġ` or `▁`).
///
/// ```
/// use burn_distill::cross::VocabMatch;
///
/// let student = ["a", "b", "ab"];
/// let teacher = ["b", "c", "a", "abc"];
/// let m = VocabMatch::new(&student, &teacher).unwrap();
/// // Sorted by teacher id: "b" (teacher 0, student 1), "a" (teacher 2, student 0).
/// assert_eq!(m.pairs(), &[(1, 0), (0, 2)]);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VocabMatch {
    /// `(student id, teacher id)`, by teacher id.
    pairs: Vec<(usize, usize)>,
    student_len: usize,
    teacher_len: usize,
}

impl VocabMatch {
    /// Matches token `i` of `student` (the string of student id `i`) with the teacher token of
    /// the same string. Errors on a string that appears twice in one vocabulary and on
    /// vocabularies without a common string (use the plain sorted-L1 loss then).
    pub fn new<S: AsRef<str>, T: AsRef<str>>(
        student: &[S],
        teacher: &[T],
    ) -> Result<Self, DistillError> {
        let mut ids = HashMap::with_capacity(student.len());
        for (i, s) in student.iter().enumerate() {
            if let Some(first) = ids.insert(s.as_ref(), i) {
                return Err(duplicate("student_vocab", s.as_ref(), first, i));
            }
        }
        let mut seen = HashMap::with_capacity(teacher.len());
        let mut pairs = Vec::new();
        for (j, t) in teacher.iter().enumerate() {
            if let Some(first) = seen.insert(t.as_ref(), j) {
                return Err(duplicate("teacher_vocab", t.as_ref(), first, j));
            }
            if let Some(&i) = ids.get(t.as_ref()) {
                pairs.push((i, j));
            }
        }
        if pairs.is_empty() {
            return Err(DistillError::invalid(
                "teacher_vocab",
                format!(
                    "{} tokens, none equal to one of the student's {}",
                    teacher.len(),
                    student.len()
                ),
                "vocabularies with at least one common token string (or the plain ULD loss)",
            ));
        }
        Ok(Self {
            pairs,
            student_len: student.len(),
            teacher_len: teacher.len(),
        })
    }

    /// The matched `(student id, teacher id)` pairs, by teacher id.
    pub fn pairs(&self) -> &[(usize, usize)] {
        &self.pairs
    }

    /// The number of student and teacher tokens the match was built from.
    pub fn vocab_sizes(&self) -> (usize, usize) {
        (self.student_len, self.teacher_len)
    }

    /// Ids in `0..width` that are not in `matched` (sorted), for one side.
    pub(crate) fn unmatched(matched: impl Iterator<Item = usize>, width: usize) -> Vec<i64> {
        let mut is_matched = vec![false; width];
        for i in matched {
            is_matched[i] = true;
        }
        (0..width)
            .filter(|&i| !is_matched[i])
            .map(|i| i as i64)
            .collect()
    }
}

fn duplicate(argument: &str, token: &str, first: usize, second: usize) -> DistillError {
    DistillError::invalid(
        argument,
        format!("the token string {token:?} at ids {first} and {second}"),
        "distinct token strings (one id per string)",
    )
}
