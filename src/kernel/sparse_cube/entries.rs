//! Step 1 of the sparse kernel: a row's teacher entries into shared memory, checked and
//! ranked, and the merge that tells a column's membership in them.

use cubecl::prelude::*;

use super::TailKind;
use crate::kernel::cube_row::row_sum;

/// Advances `at` to the first of the `count` sorted valid indices that is `≥ column` and says
/// whether it is `column`. A unit visits its columns in increasing order, so its cursor moves
/// at most `count` times over a whole pass: a merge, not a search per column.
#[cube]
pub(super) fn member(sorted: &Shared<[u32]>, count: u32, at: u32, column: u32) -> (bool, u32) {
    // The cursor comes back (a `&mut` argument cannot be advanced in a loop in CubeCL 0.11).
    let mut at = at;
    while at < count && sorted[at as usize] < column {
        at += 1;
    }
    let mut found = false;
    if at < count {
        found = sorted[at as usize] == column;
    }
    (found, at)
}

/// A missing entry's index: `2³¹ − 1`, above any column.
#[cube]
pub(super) fn no_entry() -> u32 {
    u32::new(2_147_483_647)
}

/// A row's teacher entries in shared memory. In their order: `index` (or [`no_entry`]),
/// `w = r·ℓ`, and `u` and `∂D/∂u` of the virtual row (entry `k`: the tail bucket); the valid
/// indices `sorted`, with the entry each came from.
#[derive(CubeType)]
pub(super) struct Entries {
    pub index: Shared<[u32]>,
    pub w: Shared<[f32]>,
    pub u: Shared<[f32]>,
    pub g: Shared<[f32]>,
    pub sorted: Shared<[u32]>,
    pub sorted_entry: Shared<[u32]>,
}

#[cube]
impl Entries {
    pub(super) fn new(#[comptime] k: usize) -> Entries {
        Entries {
            index: Shared::<[u32]>::new_slice(k),
            w: Shared::<[f32]>::new_slice(k + 1),
            u: Shared::<[f32]>::new_slice(k + 1),
            g: Shared::<[f32]>::new_slice(k + 1),
            sorted: Shared::<[u32]>::new_slice(k),
            sorted_entry: Shared::<[u32]>::new_slice(k),
        }
    }
}

/// Step 1: the row's entries into `entries`, checked. This unit's entries go into shared
/// memory: `entry_index` (the index, or `none` for a missing entry) and `entry_w = r·ℓ`; then
/// they are ranked ([`rank_entries`]). Returns the count of valid entries; `mass` gets their
/// `Σ e^ℓ` and `bad` whether the teacher row is not a distribution: an index outside `[0, v)`
/// or seen twice, a log-probability above 1e-3 or, with the tail bucket, a mass above
/// 1 + 1e-3 (the checks' rounding allowance, `crate::tail::ROUNDING`). Every unit of the cube
/// must call it.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn check_entries<I: Numeric>(
    indices: &Tensor<I>,
    log_probs: &Tensor<f32>,
    row: usize,
    ratio: f32,
    v: usize,
    entries: &mut Entries,
    smem: &mut Shared<[f32]>,
    mass: &mut f32,
    bad: &mut bool,
    #[comptime] tail: TailKind,
    #[comptime] k: usize,
) -> u32 {
    let mut valid = f32::new(0.0);
    let mut unit_bad = f32::new(0.0);
    let mut unit_mass = f32::new(0.0);
    let mut e = UNIT_POS_X as usize;
    while e < k {
        let lp = log_probs[row * log_probs.stride(0) + e * log_probs.stride(1)];
        let raw = i32::cast_from(indices[row * indices.stride(0) + e * indices.stride(1)]);
        let mut index = no_entry();
        if lp > -3.0e38f32 {
            if raw < 0 || raw >= v as i32 {
                unit_bad += 1.0;
            } else {
                index = u32::cast_from(raw);
                valid += 1.0;
                unit_mass += lp.exp();
                if lp > 1.0e-3f32 {
                    unit_bad += 1.0;
                }
            }
        }
        entries.index[e] = index;
        entries.w[e] = ratio * lp;
        e += CUBE_DIM_X as usize;
    }
    let bad_entries = row_sum(smem, unit_bad);
    *mass = row_sum(smem, unit_mass);
    let count = u32::cast_from(row_sum(smem, valid));
    let duplicates = rank_entries(entries, count, smem, k);
    *bad = bad_entries > 0.0 || duplicates > 0.0;
    if comptime!(tail == TailKind::Bucket) {
        *bad = *bad || *mass > 1.001f32;
    }
    count
}

/// The valid indices sorted (`sorted`, with the entry each came from in
/// `sorted_entry`): a valid entry's rank is its position among the `count` valid indices, the
/// missing ones come after them. Returns the row's count of indices seen twice (duplicates
/// share a rank; their row is NaN, whatever the sorted copy holds). Every unit must call it.
#[cube]
#[allow(clippy::too_many_arguments)]
fn rank_entries(
    entries: &mut Entries,
    count: u32,
    smem: &mut Shared<[f32]>,
    #[comptime] k: usize,
) -> f32 {
    let none = no_entry();
    let mut duplicates = f32::new(0.0);
    let mut e = UNIT_POS_X as usize;
    while e < k {
        let index = entries.index[e];
        let mut rank = u32::new(0);
        if index != none {
            for other in 0..k {
                let o = entries.index[other];
                if o < index {
                    rank += 1;
                }
                if o == index && other != e {
                    duplicates += 1.0;
                }
            }
        } else {
            rank = count;
            for other in 0..e {
                if entries.index[other] == none {
                    rank += 1;
                }
            }
        }
        entries.sorted[rank as usize] = index;
        entries.sorted_entry[rank as usize] = e as u32;
        e += CUBE_DIM_X as usize;
    }
    row_sum(smem, duplicates)
}
