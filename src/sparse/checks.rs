//! The sparse teacher's value checks: counted on the device for the composed path, and the
//! first bad entry named on the host.

use super::*;

impl SparseDistillLoss {
    /// The composed path's teacher check (see [`Validation`]): `[1]` number of bad entries of
    /// the rows that are not ignored, counted on the device: a log-probability above 0
    /// (beyond rounding) or NaN, an index outside `[0, V)`, an index seen twice in a row, a
    /// row without a valid entry and, with the tail bucket, a top-k mass above 1 (beyond
    /// rounding).
    pub(super) fn bad_entries(
        &self,
        teacher: &SparseTeacher,
        ignored: Option<Tensor<1, Bool>>,
        classes: usize,
    ) -> Tensor<1, Int> {
        let [n, k] = teacher.dims();
        let log_probs = teacher.log_probs.clone().detach();
        let indices = teacher.indices.clone();
        let device = log_probs.device();
        let keep = match &ignored {
            Some(ignored) => ignored.clone().bool_not().unsqueeze_dim::<2>(1),
            None => Tensor::<2, Bool>::full([n, 1], true, &device),
        };
        let mut valid = log_probs
            .clone()
            .equal_elem(f64::NEG_INFINITY)
            .bool_not()
            .bool_and(keep.clone().expand([n, k]));
        if let Some(mask) = &teacher.mask {
            valid = valid.bool_and(mask.clone());
        }
        let bad_values = log_probs
            .clone()
            .greater_elem(ROUNDING)
            .bool_or(log_probs.clone().is_nan())
            .bool_and(valid.clone());
        let bad_indices = indices
            .clone()
            .lower_elem(0)
            .bool_or(indices.clone().greater_equal_elem(classes as i64))
            .bool_and(valid.clone());
        let empty = valid
            .clone()
            .int()
            .sum_dim(1)
            .equal_elem(0)
            .bool_and(keep.clone());
        let mut bad = count(bad_values) + count(bad_indices) + count(empty);
        if self.tail == TailPolicy::TailBucket {
            let mass = log_probs
                .exp()
                .mask_fill(valid.clone().bool_not(), 0.0)
                .sum_dim(1)
                .greater_elem(1.0 + ROUNDING);
            bad = bad + count(mass);
        }
        if k > 1 {
            bad = bad + pairwise_sum(duplicate_pairs(&indices, &valid));
        }
        bad
    }
}

/// Reads the teacher back and names its first bad entry among the rows that are not ignored
/// (the host side of [`SparseDistillLoss::teacher_check`]).
///
/// `lead` is the caller's shape of the rows (`[N]`, or a sequence's `[B, T]`): the messages
/// name entries by their position in the caller's tensors (`indices[1, 5, 3]`).
pub(crate) fn first_bad_entry(
    teacher: &SparseTeacher,
    ignored: Option<Tensor<1, Bool>>,
    classes: usize,
    tail: TailPolicy,
    lead: &[usize],
) -> Option<DistillError> {
    let [n, k] = teacher.dims();
    let pos = |row: usize| crate::error::position(&crate::error::unravel(row, lead));
    let row_name = |row: usize| match lead.len() {
        1 => format!("row {row}"),
        _ => format!("token [{}]", pos(row)),
    };
    let indices = teacher.indices.to_data().convert::<i64>();
    let log_probs = teacher.log_probs.to_data().convert::<f64>();
    let mask = teacher.mask.as_ref().map(Tensor::to_data);
    let ignored = ignored.map(|t| t.to_data());
    let flags =
        |data: &Option<TensorData>| data.as_ref().map(|d| d.iter::<bool>().collect::<Vec<_>>());
    let (mask, ignored) = (flags(&mask), flags(&ignored));
    let indices = indices.as_slice::<i64>().expect("i64 indices");
    let log_probs = log_probs.as_slice::<f64>().expect("f64 log-probabilities");
    for row in 0..n {
        if ignored.as_ref().is_some_and(|ignored| ignored[row]) {
            continue;
        }
        let mut seen: Vec<(usize, i64)> = Vec::with_capacity(k);
        let mut mass = 0.0;
        for col in 0..k {
            let at = row * k + col;
            let lp = log_probs[at];
            if mask.as_ref().is_some_and(|mask| !mask[at]) || lp == f64::NEG_INFINITY {
                continue;
            }
            if lp.is_nan() || lp > ROUNDING {
                return Some(DistillError::invalid(
                    "teacher log_probs",
                    format!("log_probs[{}, {col}] = {lp}", pos(row)),
                    "a log-probability <= 0 (or -inf / a false mask entry for a missing \
                     token); pass log_softmax(logits / T_gen), not logits",
                ));
            }
            let index = indices[at];
            if index < 0 || index >= classes as i64 {
                return Some(DistillError::invalid(
                    "teacher indices",
                    format!("indices[{}, {col}] = {index}", pos(row)),
                    format!("a token index in [0, {classes}) (the student's vocabulary)"),
                ));
            }
            if let Some(&(first, _)) = seen.iter().find(|&&(_, i)| i == index) {
                return Some(DistillError::invalid(
                    "teacher indices",
                    format!(
                        "indices[{}, {col}] = {index}, already at [{}, {first}]",
                        pos(row),
                        pos(row)
                    ),
                    "distinct token indices within a row",
                ));
            }
            seen.push((col, index));
            mass += lp.exp();
        }
        if seen.is_empty() {
            return Some(DistillError::invalid(
                "teacher log_probs",
                format!("{} with no valid entry", row_name(row)),
                "at least one finite log-probability in every row whose target is not the \
                 ignore index",
            ));
        }
        if tail == TailPolicy::TailBucket && mass > 1.0 + ROUNDING {
            return Some(DistillError::invalid(
                "teacher log_probs",
                format!("{} with total probability {mass}", row_name(row)),
                "at most 1 with TailPolicy::TailBucket (log-probabilities of the teacher's \
                 full distribution)",
            ));
        }
    }
    None
}

/// `[N]`: per row, the pairs `j < j'` of valid entries with the same index, compared on the
/// device in chunks of rows (at most 2²² comparisons each).
pub(super) fn duplicate_pairs(indices: &Tensor<2, Int>, valid: &Tensor<2, Bool>) -> Tensor<1, Int> {
    let [n, k] = indices.dims();
    let device = indices.device();
    let columns = Tensor::<1, Int>::arange(0..k as i64, &device);
    let before = columns
        .clone()
        .reshape([1, k, 1])
        .lower(columns.reshape([1, 1, k]));
    let rows = ((1usize << 22) / (k * k)).max(1);
    let mut per_row = Vec::new();
    for start in (0..n).step_by(rows) {
        let c = rows.min(n - start);
        let pairs = |t: Tensor<2, Int>| {
            (
                t.clone().unsqueeze_dim::<3>(2).expand([c, k, k]),
                t.unsqueeze_dim::<3>(1).expand([c, k, k]),
            )
        };
        let (a, b) = pairs(indices.clone().narrow(0, start, c));
        let (va, vb) = pairs(valid.clone().narrow(0, start, c).int());
        let same = a
            .equal(b)
            .bool_and(va.equal_elem(1))
            .bool_and(vb.equal_elem(1))
            .bool_and(before.clone().expand([c, k, k]));
        per_row.push(same.int().sum_dim(2).sum_dim(1).reshape([c]));
    }
    Tensor::cat(per_row, 0)
}
