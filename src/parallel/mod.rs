//! Vocabulary-parallel distillation: the exact loss of logits sharded along the vocabulary
//! across peers (tensor-parallel LM heads), each peer getting the gradient of its own shard.
//! The peers exchange per-row statistics through a [`RowExchange`], which the user implements
//! over their collective ([`LocalExchange`]: threads of one process). See
//! `docs/guide/multi-device.md` for the design.
//!
//! # What is exchanged
//!
//! One or two sums across the peers per call, both `O(N)` (never `O(N·V)`), issued by every
//! peer in the same order:
//!
//! 1. **Row statistics**, `P·(N + 1)·9` floats (the extra row: each peer's layout, offset,
//!    width, vocabulary, peer count and rows, checked on every peer): each peer's
//!    online-softmax state of its shard — the student's row maximum and its sums of
//!    exponentials at `T` and at 1, the teacher's maximum and sum at `T`, the target logit if
//!    it owns the target, (for label smoothing) the sum and count of its finite logits, and for
//!    the KLs the shard's softmax-weighted logit gap `Σ_{j∈p} e^{(u_j − m_p)/T}(u_j − z_j)/T`
//!    (forward; student-weighted `z − u` for reverse). A sum is all the exchange offers (no
//!    `Max`), so each peer writes its statistics into its own slot of a `[P, N, 9]` tensor of
//!    zeros and the sum is an all-gather (adding zeros is exact). Every peer then merges the
//!    `P` states itself — `m = max_p m_p`, `S = Σ_p S_p · e^{(m_p − m)/T}` — and holds the
//!    global log-normalisers of both models, bit-identical across peers. For forward and
//!    reverse KL that is all: `KL(p‖q) = Σ_p gap_p e^{(m_p − m)/T} / S − LSE_t + LSE_s`.
//! 2. Only for JSD, the skew KLs and TVD, **row sums**, `N·2` floats: the shard's part of the
//!    divergence `Σ_{j∈shard} φ(p_j, q_j)` and of its sensitivity `Σ_{j∈shard} h_j` with
//!    `h_j = q_j ∂φ/∂q_j`, summed across peers. Their `φ` depends on the mixture
//!    `m_j = β p_j + (1 − β) q_j` (or `|p_j − q_j|`), which needs both global normalisers
//!    first: their statistics do not combine in one exchange.
//!
//! Then each peer has the exact row losses and writes its shard's gradient in closed form,
//! `∂D/∂z_j = (h_j − q_j Σ_k h_k) / T` (the softmax Jacobian applied to `h`; `Σ_k h_k` is `−1`
//! for forward KL and `KL + 1` for reverse KL), and for the hard term
//! `softmax(z)_j − (1 − ε)[j = y] − ε [z_j finite] / n_finite`. All of it runs on tensors
//! without autodiff; the gradient is attached to the tracked student logits as one backward
//! node, and the backward pass only scales it by the upstream gradient: no communication in
//! the backward.

use std::cell::{Cell, RefCell};
use std::ops::Range;

use burn::nn::Linear;
use burn::tensor::{Int, Tensor};

use crate::{
    DistillError, DistillLoss, DistillOutput, DistillParams, Divergence, Validation,
    backend::{self, DistillParts},
    error::{or_panic, same_dims},
    linear::{self, ChunkTeacher, Side},
    validation::DeviceCheck,
};

mod exchange;
mod linear_heads;
mod shard;

use exchange::sum_across;
pub use exchange::{LocalExchange, RowExchange};
use shard::{ShardRun, vocab_parallel};

/// Where this peer's slice of the vocabulary lies, and how many peers share it.
///
/// Every peer holds the logits of columns `offset .. offset + V_p` of a vocabulary of `vocab`
/// columns; together the `peers` shards partition it (uneven widths are fine; the last shard
/// may end in `−∞` padding columns). `rank` (in `0..peers`) orders the peers: the position of
/// this peer's shard, and of its statistics in the exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VocabShard {
    rank: usize,
    peers: usize,
    offset: usize,
    vocab: usize,
}

/// `peers ≥ 1` and `rank < peers`.
fn check_rank(rank: usize, peers: usize) -> Result<(), DistillError> {
    if peers == 0 {
        return Err(DistillError::invalid("peers", 0, "at least 1 peer"));
    }
    if rank >= peers {
        return Err(DistillError::invalid(
            "rank",
            rank,
            format!("a rank in [0, {peers}) (peers = {peers})"),
        ));
    }
    Ok(())
}

/// Columns of the first exchange (see the module documentation).
const STATS: usize = 9;

impl VocabShard {
    /// A shard starting at column `offset` of a `vocab`-column vocabulary, held by the peer of
    /// rank `rank` (of `peers`).
    ///
    /// ```
    /// use burn_distill::VocabShard;
    ///
    /// let shard = VocabShard::new(1, 2, 5, 10).unwrap();
    /// assert_eq!((shard.rank(), shard.peers(), shard.offset(), shard.vocab()), (1, 2, 5, 10));
    /// let err = VocabShard::new(2, 2, 0, 10).unwrap_err();
    /// assert_eq!(err.to_string(), "invalid rank: got 2, expected a rank in [0, 2) (peers = 2)");
    /// ```
    pub fn new(
        rank: usize,
        peers: usize,
        offset: usize,
        vocab: usize,
    ) -> Result<Self, DistillError> {
        check_rank(rank, peers)?;
        if offset >= vocab {
            return Err(DistillError::invalid(
                "offset",
                offset,
                format!("a first column in [0, {vocab}) (vocab = {vocab})"),
            ));
        }
        Ok(Self {
            rank,
            peers,
            offset,
            vocab,
        })
    }

    /// The shard of rank `rank` in [`VocabShard::balanced_range`]'s split.
    pub fn balanced(rank: usize, peers: usize, vocab: usize) -> Result<Self, DistillError> {
        let columns = Self::balanced_range(vocab, peers, rank)?;
        Self::new(rank, peers, columns.start, vocab)
    }

    /// The columns of rank `rank` when `vocab` columns are split over `peers`: widths differ by
    /// at most one, the first `vocab % peers` shards being the wider.
    ///
    /// ```
    /// use burn_distill::VocabShard;
    ///
    /// let split: Vec<_> = (0..4).map(|rank| VocabShard::balanced_range(10, 4, rank).unwrap()).collect();
    /// assert_eq!(split, [0..3, 3..6, 6..8, 8..10]);
    /// ```
    pub fn balanced_range(
        vocab: usize,
        peers: usize,
        rank: usize,
    ) -> Result<Range<usize>, DistillError> {
        check_rank(rank, peers)?;
        if vocab < peers {
            return Err(DistillError::invalid(
                "vocab",
                vocab,
                format!("at least one column per peer ({peers} peers)"),
            ));
        }
        let (base, extra) = (vocab / peers, vocab % peers);
        let start = rank * base + rank.min(extra);
        Ok(start..start + base + usize::from(rank < extra))
    }

    /// This peer's rank, in `0..peers`.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// The number of peers the vocabulary is split over.
    pub fn peers(&self) -> usize {
        self.peers
    }
    /// The first vocabulary column of this shard.
    pub fn offset(&self) -> usize {
        self.offset
    }
    /// The size of the whole vocabulary.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// The floats each peer contributes to the exchanges of one call over `rows` rows:
    /// `P·(rows + 1)·9` for the row statistics (and one row of layout per peer), plus `rows·2` for
    /// the row sums of the divergences that need a second exchange (JSD, skew KLs, TVD): `O(N)`,
    /// independent of the vocabulary. Multiply by the size of the dtype (4 for f32, 8 for f64) for
    /// bytes; a ring all-reduce moves about twice that per peer.
    ///
    /// ```
    /// use burn_distill::{Divergence, VocabShard};
    ///
    /// let shard = VocabShard::balanced(0, 4, 32768).unwrap();
    /// assert_eq!(shard.exchanged_floats(2048, Divergence::ForwardKl), 4 * 2049 * 9);
    /// assert_eq!(shard.exchanged_floats(2048, Divergence::Tvd), 4 * 2049 * 9 + 2 * 2048);
    /// ```
    pub fn exchanged_floats(&self, rows: usize, divergence: Divergence) -> usize {
        let second = match divergence {
            Divergence::ForwardKl | Divergence::ReverseKl => 0,
            _ => rows * 2,
        };
        self.peers * (rows + 1) * STATS + second
    }
}

impl DistillLoss {
    /// The full loss (soft and hard terms) of logits sharded along the vocabulary: this peer's
    /// `[N, V_p]` student and teacher columns `shard.offset() .. shard.offset() + V_p`, and the
    /// `[N]` targets (global class indices, the same on every peer), the peers' statistics
    /// summed through `exchange`.
    ///
    /// Every peer calls it with its own shard and gets the loss of the whole vocabulary (equal
    /// on every peer, and to [`DistillLoss::forward`] on the unsharded logits within float
    /// rounding); `backward` gives each peer the gradient of its own shard, without
    /// communicating. Settings as for `forward`, except the vocabulary alignment (the shards
    /// have one width) and [`Kernel`](crate::Kernel) (composed tensor ops on each shard).
    ///
    /// Peers call this in the same order, with the same targets, configuration and number of
    /// rows; `exchange` is this peer's handle of their collective (one or two
    /// [`RowExchange::sum`] calls per call).
    ///
    /// # Errors
    /// Checks of this peer's own inputs (shapes, targets) fail before anything is exchanged;
    /// as with any collective, a peer that fails alone leaves the others waiting in the
    /// exchange (a [`LocalExchange`] peer's error once the failed peer's handle is dropped),
    /// so validate the setup before the training loop. With [`Validation::Eager`] (the
    /// default), the shards' layout is checked after the first exchange on every peer alike
    /// (shards that overlap, leave a gap, or disagree on the vocabulary or the peer count fail
    /// on every peer, naming the shards): one read of `5·P` numbers back to the host.
    ///
    /// ```
    /// use burn::tensor::{Device, Int, Tensor};
    /// use burn_distill::{DistillLossConfig, LocalExchange, VocabShard};
    ///
    /// let student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]];
    /// let teacher = [[0.5, 3.0, 0.0], [0.2, -2.0, 4.0]];
    /// // Two peers (threads): columns 0..2 and 2..3 of the three.
    /// let peers: Vec<_> = LocalExchange::group(2)
    ///     .into_iter()
    ///     .map(|exchange| {
    ///         std::thread::spawn(move || {
    ///             let device = Device::flex().autodiff();
    ///             let rank = exchange.rank();
    ///             let shard = VocabShard::balanced(rank, 2, 3).unwrap();
    ///             let cols = VocabShard::balanced_range(3, 2, rank).unwrap();
    ///             let cut = |rows: [[f32; 3]; 2]| {
    ///                 let t = Tensor::<2>::from_floats(rows, &device);
    ///                 t.slice([0..2, cols.clone()])
    ///             };
    ///             let s = cut(student).require_grad();
    ///             let targets = Tensor::<1, Int>::from_ints([1, 2], &device);
    ///
    ///             let loss = DistillLossConfig::new().with_temperature(2.0).with_alpha(0.9).init();
    ///             let value =
    ///                 loss.forward_vocab_parallel(s.clone(), cut(teacher), targets, &shard, &exchange);
    ///             let grad = s.grad(&value.backward()).unwrap();
    ///             (value.into_scalar::<f32>(), grad.try_into_vec_as::<f32>().unwrap())
    ///         })
    ///     })
    ///     .collect();
    /// let out: Vec<_> = peers.into_iter().map(|p| p.join().unwrap()).collect();
    /// // On both peers α·T²·KL(p‖q) + (1 − α)·CE averaged over the rows, as `forward` (by
    /// // hand in f64),
    /// assert!(out.iter().all(|(loss, _)| (loss - 0.206_432).abs() < 1e-5));
    /// // and each peer's columns of the gradient (by hand in f64): row 0's target logit
    /// // (column 1, peer 0's) is pulled up.
    /// let close = |g: &[f32], want: &[f32]| g.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-5);
    /// assert!(close(&out[0].1, &[0.103_336, -0.181_822, 0.037_920, 0.053_158]), "{out:?}");
    /// assert!(close(&out[1].1, &[0.078_486, -0.091_079]), "{out:?}");
    /// ```
    ///
    /// # Shapes
    /// - `student_shard`, `teacher_shard`: `[N, V_p]`
    /// - `targets`: `[N]` class indices in `[0, vocab)` or the ignore index
    /// - output: `[1]` (`Mean`, `Sum`, `Normalized`) or `[N]` (`PerRow`)
    ///
    /// # Panics
    /// On bad shapes, out-of-range targets or a failed exchange, with the message of
    /// [`DistillLoss::try_forward_vocab_parallel`], at the caller's line.
    #[track_caller]
    pub fn forward_vocab_parallel(
        &self,
        student_shard: Tensor<2>,
        teacher_shard: Tensor<2>,
        targets: Tensor<1, Int>,
        shard: &VocabShard,
        exchange: &dyn RowExchange,
    ) -> Tensor<1> {
        or_panic(self.try_forward_vocab_parallel(
            student_shard,
            teacher_shard,
            targets,
            shard,
            exchange,
        ))
    }

    /// [`DistillLoss::forward_vocab_parallel`] that returns an error instead of panicking.
    pub fn try_forward_vocab_parallel(
        &self,
        student_shard: Tensor<2>,
        teacher_shard: Tensor<2>,
        targets: Tensor<1, Int>,
        shard: &VocabShard,
        exchange: &dyn RowExchange,
    ) -> Result<Tensor<1>, DistillError> {
        self.vocab_parallel_parts(student_shard, teacher_shard, Some(targets), shard, exchange)
            .map(|out| out.loss)
    }

    /// [`DistillLoss::forward_vocab_parallel`] without labels: the soft term only.
    ///
    /// # Panics
    /// As [`DistillLoss::forward_vocab_parallel`].
    #[track_caller]
    pub fn forward_vocab_parallel_soft(
        &self,
        student_shard: Tensor<2>,
        teacher_shard: Tensor<2>,
        shard: &VocabShard,
        exchange: &dyn RowExchange,
    ) -> Tensor<1> {
        or_panic(self.try_forward_vocab_parallel_soft(
            student_shard,
            teacher_shard,
            shard,
            exchange,
        ))
    }

    /// [`DistillLoss::forward_vocab_parallel_soft`] that returns an error instead of panicking.
    pub fn try_forward_vocab_parallel_soft(
        &self,
        student_shard: Tensor<2>,
        teacher_shard: Tensor<2>,
        shard: &VocabShard,
        exchange: &dyn RowExchange,
    ) -> Result<Tensor<1>, DistillError> {
        self.vocab_parallel_parts(student_shard, teacher_shard, None, shard, exchange)
            .map(|out| out.loss)
    }

    /// The vocabulary-parallel loss and its soft and hard parts; `targets` `None` for the soft
    /// term alone.
    ///
    /// # Panics
    /// As [`DistillLoss::forward_vocab_parallel`].
    #[track_caller]
    pub fn forward_vocab_parallel_parts(
        &self,
        student_shard: Tensor<2>,
        teacher_shard: Tensor<2>,
        targets: Option<Tensor<1, Int>>,
        shard: &VocabShard,
        exchange: &dyn RowExchange,
    ) -> DistillOutput {
        or_panic(self.try_forward_vocab_parallel_parts(
            student_shard,
            teacher_shard,
            targets,
            shard,
            exchange,
        ))
    }

    /// The vocabulary-parallel loss and its parts, or an error naming the bad argument (or the
    /// exchange step that failed).
    pub fn try_forward_vocab_parallel_parts(
        &self,
        student_shard: Tensor<2>,
        teacher_shard: Tensor<2>,
        targets: Option<Tensor<1, Int>>,
        shard: &VocabShard,
        exchange: &dyn RowExchange,
    ) -> Result<DistillOutput, DistillError> {
        self.vocab_parallel_parts(student_shard, teacher_shard, targets, shard, exchange)
    }

    /// Every dense form: the checks, then the shard's loss on tensors without autodiff, its
    /// gradient attached to the (soft-capped) tracked student logits.
    fn vocab_parallel_parts(
        &self,
        student_shard: Tensor<2>,
        teacher_shard: Tensor<2>,
        targets: Option<Tensor<1, Int>>,
        shard: &VocabShard,
        exchange: &dyn RowExchange,
    ) -> Result<DistillOutput, DistillError> {
        let [n, v] = student_shard.dims();
        if n == 0 || v == 0 {
            return Err(DistillError::invalid(
                "student_shard",
                format!("shape [{n}, {v}]"),
                "a non-empty [N, V_p] tensor (N >= 1 rows, V_p >= 1 columns)",
            ));
        }
        let note = " (both models sharded alike)";
        same_dims(
            "teacher_shard",
            teacher_shard.dims(),
            "student_shard",
            [n, v],
            note,
        )?;
        let targets = targets.map(Tensor::inner);
        let check = self.check_shard("student_shard", v, n, targets.as_ref(), shard)?;
        // The cap through autodiff: the shard's gradient is attached to the capped logits.
        let student = self.soft_cap(student_shard);
        let teacher = self.soft_cap(teacher_shard.inner());
        let autodiff = student.is_autodiff();
        let run = ShardRun {
            shard,
            exchange,
            check: self.validation == Validation::Eager,
            with_grad: student.is_tracked(),
        };
        let (parts, grad) = vocab_parallel(
            student.clone().inner(),
            teacher,
            targets,
            &self.params,
            &run,
        )?;
        let lift = |t: Tensor<1>| if autodiff { t.autodiff() } else { t };
        let loss = match grad {
            Some(grad) => backend::attach_one(parts.loss, student, grad),
            None => lift(parts.loss),
        };
        let parts = DistillParts {
            loss,
            soft: lift(parts.soft),
            hard: parts.hard.map(lift),
        };
        Ok(DistillOutput::from(parts).with_check(check))
    }

    /// `width` columns from the shard's offset lie inside the vocabulary, and the `[rows]`
    /// targets are global class indices (or the ignore index).
    fn check_shard(
        &self,
        argument: &str,
        width: usize,
        rows: usize,
        targets: Option<&Tensor<1, Int>>,
        shard: &VocabShard,
    ) -> Result<Option<DeviceCheck>, DistillError> {
        if shard.offset + width > shard.vocab {
            return Err(DistillError::invalid(
                argument,
                format!("{width} columns from offset {}", shard.offset),
                format!("columns inside the vocabulary of {} columns", shard.vocab),
            ));
        }
        self.check_targets(targets, shard.vocab, &[rows])
    }
}
