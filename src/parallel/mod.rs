//! Vocabulary-parallel distillation on burn-collective: the exact loss of logits sharded along
//! the vocabulary across peers (tensor-parallel LM heads), each peer getting the gradient of
//! its own shard. See `docs/parallel.md` for the design.
//!
//! # What is exchanged
//!
//! One or two all-reduces per call, both `O(N)` (never `O(N·V)`), issued by every peer in the
//! same order:
//!
//! 1. **Row statistics**, `P·(N + 1)·9` floats (the extra row: each peer's layout, offset,
//!    width, vocabulary, peer count and rows, checked on every peer): each peer's online-softmax state of its shard — the
//!    student's row maximum and its sums of exponentials at `T` and at 1, the teacher's maximum
//!    and sum at `T`, the target logit if it owns the target, (for label smoothing) the sum and
//!    count of its finite logits, and for the KLs the shard's softmax-weighted logit gap
//!    `Σ_{j∈p} e^{(u_j − m_p)/T}(u_j − z_j)/T` (forward; student-weighted `z − u` for reverse).
//!    burn-collective 0.21 reduces by `Sum` and `Mean` only (no `Max`), so each peer writes its
//!    statistics into its own slot of a `[P, N, 9]` tensor of zeros and the sum is an
//!    all-gather (adding zeros is exact). Every peer then merges the `P` states itself —
//!    `m = max_p m_p`, `S = Σ_p S_p · e^{(m_p − m)/T}` — and holds the global log-normalisers of
//!    both models, bit-identical across peers. For forward and reverse KL that is all:
//!    `KL(p‖q) = Σ_p gap_p e^{(m_p − m)/T} / S − LSE_t + LSE_s`.
//! 2. Only for JSD, the skew KLs and TVD, **row sums**, `N·2` floats: the shard's part of the
//!    divergence `Σ_{j∈shard} φ(p_j, q_j)` and of its sensitivity `Σ_{j∈shard} h_j` with
//!    `h_j = q_j ∂φ/∂q_j`, summed across peers. Their `φ` depends on the mixture
//!    `m_j = β p_j + (1 − β) q_j` (or `|p_j − q_j|`), which needs both global normalisers
//!    first: their statistics do not combine in one exchange.
//!
//! Then each peer has the exact row losses and writes its shard's gradient in closed form,
//! `∂D/∂z_j = (h_j − q_j Σ_k h_k) / T` (the softmax Jacobian applied to `h`; `Σ_k h_k` is `−1`
//! for forward KL and `KL + 1` for reverse KL), and for the hard term
//! `softmax(z)_j − (1 − ε)[j = y] − ε [z_j finite] / n_finite`. The backward pass then only
//! scales it by the upstream gradient: no communication in the backward.

use std::ops::Range;

use burn::collective::{PeerId, ReduceOperation, all_reduce};
use burn::tensor::{
    Bool, DType, IndexingUpdateOp, Int, Tensor, TensorPrimitive,
    backend::Backend,
    ops::{FloatTensor, IntTensor},
};

use burn::nn::Linear;

use crate::linear::{self, LinearGrads, LinearOutput, linear_sides};
use crate::{
    DenseCall, DistillBackend, DistillError, DistillLoss, DistillOutput, DistillParams,
    DistillParts, Divergence, FusedOutput, LinearCall, Validation,
    error::{non_empty, panicking, same_dims},
    kernel::reference::{Probs, divergence_rows},
    reduction::{ignored_rows, reduce_rows},
    validation::DeviceCheck,
};

mod exchange;
use exchange::sum_across;
pub use exchange::vocab_parallel;

/// Where this peer's slice of the vocabulary lies, and who its peers are.
///
/// Every peer holds the logits of columns `offset .. offset + V_p` of a vocabulary of `vocab`
/// columns; together the `peers` shards partition it (uneven widths are fine; the last shard
/// may end in `−∞` padding columns). `rank` (in `0..peers`) orders the peers and `peer` is the
/// id this peer registered with burn-collective (`burn::collective::register`, on the inner
/// backend for `Autodiff<B>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VocabShard {
    peer: PeerId,
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
    /// rank `rank` (of `peers`) registered as `peer`.
    pub fn new(
        peer: PeerId,
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
            peer,
            rank,
            peers,
            offset,
            vocab,
        })
    }

    /// The shard of rank `rank` in [`VocabShard::balanced_range`]'s split.
    pub fn balanced(
        peer: PeerId,
        rank: usize,
        peers: usize,
        vocab: usize,
    ) -> Result<Self, DistillError> {
        let columns = Self::balanced_range(vocab, peers, rank)?;
        Self::new(peer, rank, peers, columns.start, vocab)
    }

    /// The columns of rank `rank` when `vocab` columns are split over `peers`: widths differ by
    /// at most one, the first `vocab % peers` shards being the wider.
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

    /// The id this peer registered with burn-collective.
    pub fn peer(&self) -> PeerId {
        self.peer
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

    /// The floats each peer contributes to the all-reduces of one call over `rows` rows:
    /// `P·(rows + 1)·9` for the row statistics (and one row of layout per peer), plus `rows·2` for
    /// the row sums of the divergences that need a second exchange (JSD, skew KLs, TVD): `O(N)`,
    /// independent of the vocabulary. Multiply by the size of the dtype (4 for f32, 8 for f64) for
    /// bytes; a ring all-reduce moves about twice that per peer.
    pub fn exchanged_floats(&self, rows: usize, divergence: Divergence) -> usize {
        let second = match divergence {
            Divergence::ForwardKl | Divergence::ReverseKl => 0,
            _ => rows * 2,
        };
        self.peers * (rows + 1) * STATS + second
    }
}

impl DistillLoss {
    panicking! {
        /// The full loss (soft and hard terms) of logits sharded along the vocabulary: this peer's
        /// `[N, V_p]` student and teacher columns `shard.offset() .. shard.offset() + V_p`, and the
        /// `[N]` targets (global class indices, the same on every peer).
        ///
        /// Every peer calls it with its own shard and gets the loss of the whole vocabulary (equal
        /// on every peer, and to [`DistillLoss::forward`] on the unsharded logits within float
        /// rounding); `backward` gives each peer the gradient of its own shard, without
        /// communicating. Settings as for `forward`, except the vocabulary alignment (the shards
        /// have one width) and [`Kernel`](crate::Kernel) (composed tensor ops on each shard).
        ///
        /// Peers must have registered with `burn::collective::register` (the inner backend for
        /// `Autodiff<B>`) and call this in the same order, with the same targets, configuration
        /// and number of rows.
        ///
        /// # Errors
        /// Checks of this peer's own inputs (shapes, targets) fail before anything is exchanged;
        /// as with any collective, a peer that fails alone leaves the others waiting in the
        /// all-reduce, so validate the setup before the training loop. With [`Validation::Eager`]
        /// (the default), the shards' layout is checked after the first exchange on every peer
        /// alike (shards that overlap, leave a gap, or disagree on the vocabulary or the peer count
        /// fail on every peer, naming the shards): one read of `5·P` numbers back to the host.
        ///
        /// ```
        /// use burn::backend::{Autodiff, NdArray};
        /// use burn::collective::{CollectiveConfig, PeerId, finish_collective, register};
        /// use burn::tensor::{Int, Tensor};
        /// use burn_distill::{DistillLossConfig, VocabShard};
        ///
        /// type B = Autodiff<NdArray>;
        /// let device = Default::default();
        /// // One peer holding the whole vocabulary (every peer of a real run does the same with
        /// // its own shard, after registering with `with_num_devices(P)`).
        /// let peer = PeerId::from(0);
        /// register::<NdArray>(peer, device, CollectiveConfig::default().with_num_devices(1))
        ///     .unwrap();
        /// let shard = VocabShard::balanced(peer, 0, 1, 3).unwrap();
        /// let student = Tensor::<B, 2>::from_floats([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], &device)
        ///     .require_grad();
        /// let teacher = Tensor::<B, 2>::from_floats([[0.5, 3.0, 0.0], [0.2, -2.0, 4.0]], &device);
        /// let targets = Tensor::<B, 1, Int>::from_ints([1, 2], &device);
        ///
        /// let loss = DistillLossConfig::new().with_temperature(2.0).with_alpha(0.9).init();
        /// let value = loss.forward_vocab_parallel(student.clone(), teacher, targets, &shard);
        /// let grads = value.backward();
        /// finish_collective::<NdArray>(peer).unwrap();
        /// // α·T²·KL(p‖q) + (1 − α)·CE averaged over the rows, as `forward` (computed in f64).
        /// assert!((value.into_scalar() - 0.206_432).abs() < 1e-5);
        /// assert_eq!(student.grad(&grads).unwrap().dims(), [2, 3]);
        /// ```
        ///
        /// # Shapes
        /// - `student_shard`, `teacher_shard`: `[N, V_p]`
        /// - `targets`: `[N]` class indices in `[0, vocab)` or the ignore index
        /// - output: `[1]` (`Mean`, `Sum`, `Normalized`) or `[N]` (`PerRow`)
        ///
        /// # Panics
        /// On bad shapes, out-of-range targets or a failed collective operation, with the message
        /// of [`DistillLoss::try_forward_vocab_parallel_parts`].
        pub fn forward_vocab_parallel<B: DistillBackend>(&self, student_shard: Tensor<B, 2>,
            teacher_shard: Tensor<B, 2>, targets: Tensor<B, 1, Int>, shard: &VocabShard
        ) -> Tensor<B, 1> {
            self.try_forward_vocab_parallel_parts(student_shard, teacher_shard, Some(targets), shard
            ).loss
        }

        /// [`DistillLoss::forward_vocab_parallel`] without labels: the soft term only.
        ///
        /// # Panics
        /// As [`DistillLoss::forward_vocab_parallel`].
        pub fn forward_vocab_parallel_soft<B: DistillBackend>(&self, student_shard: Tensor<B, 2>,
            teacher_shard: Tensor<B, 2>, shard: &VocabShard) -> Tensor<B, 1> {
            self.try_forward_vocab_parallel_parts(student_shard, teacher_shard, None, shard).loss
        }
    }

    /// The vocabulary-parallel loss and its parts, or an error naming the bad argument (or the
    /// collective step that failed).
    pub fn try_forward_vocab_parallel_parts<B: DistillBackend>(
        &self,
        student_shard: Tensor<B, 2>,
        teacher_shard: Tensor<B, 2>,
        targets: Option<Tensor<B, 1, Int>>,
        shard: &VocabShard,
    ) -> Result<DistillOutput<B>, DistillError> {
        let [n, v] = student_shard.dims();
        non_empty("student_shard", [n, v], "V_p")?;
        let note = " (both models sharded alike)";
        same_dims(
            "teacher_shard",
            teacher_shard.dims(),
            "student_shard",
            [n, v],
            note,
        )?;
        let check = self.check_shard("student_shard", v, n, targets.as_ref(), shard)?;
        let run = VocabParallel {
            shard,
            check: self.validation == Validation::Eager,
        };
        let call = DenseCall::new(
            self.soft_cap(student_shard).into_primitive().tensor(),
            self.soft_cap(teacher_shard).into_primitive().tensor(),
            targets.map(Tensor::into_primitive),
            self.params,
        );
        let out = B::distill_logits_tracked(&run, call)?;
        Ok(DistillOutput::from(out.parts).with_check(check))
    }
}

impl DistillLoss {
    panicking! {
        /// The fused-linear loss of a vocabulary-parallel LM head: this peer's slice of both heads
        /// (`Linear` layers `H → V_p` for columns `shard.offset() .. + V_p`), the `[N, H]` hidden
        /// states (the same on every peer) and `[N]` targets; the loss of the whole vocabulary, as
        /// [`DistillLoss::forward_linear`] on the unsharded heads, with logits computed
        /// `chunk_rows × V_p` at a time (never `[N, V]`; the chunk size comes from
        /// `linear_chunk_rows` or from `linear_chunk_bytes` for the widest shard, counting the
        /// dozen `[c, V_p]` buffers of the composed shard loss). The chunks follow the kept rows,
        /// so the targets must be the same on every peer, and every peer must agree on whether the
        /// student is trained (that adds the hidden-state all-reduce). The loss runs as composed
        /// burn ops on each shard whatever the [`Kernel`](crate::Kernel) setting.
        ///
        /// Gradients: the student head's weight and bias get their columns' gradient; the student's
        /// hidden states get the full `∂loss/∂h`, summed over the peers' head slices by one more
        /// all-reduce of `N·H` floats (what Megatron's column-parallel input operator does in its
        /// backward), so a trunk replicated on every peer receives the exact gradient.
        ///
        /// # Shapes
        /// - `student_hidden`: `[N, H_s]`, `student_head`: `Linear` `H_s → V_p`
        /// - `teacher_hidden`: `[N, H_t]`, `teacher_head`: `Linear` `H_t → V_p`
        /// - `targets`: `[N]` global class indices; output as [`DistillLoss::forward`]
        ///
        /// # Panics
        /// As [`DistillLoss::forward_vocab_parallel`]; also for `Reduction::PerRow` when the
        /// student is trained.
        pub fn forward_linear_vocab_parallel<B: DistillBackend>(&self, student_hidden: Tensor<B, 2>,
            student_head: &Linear<B>, teacher_hidden: Tensor<B, 2>, teacher_head: &Linear<B>,
            targets: Tensor<B, 1, Int>, shard: &VocabShard) -> Tensor<B, 1> {
            self.try_forward_linear_vocab_parallel_parts(student_hidden, student_head,
                teacher_hidden, teacher_head, Some(targets), shard).loss
        }
    }

    /// [`DistillLoss::forward_linear_vocab_parallel`]'s loss and parts (soft only without
    /// targets), or an error naming the bad argument or the collective step that failed.
    pub fn try_forward_linear_vocab_parallel_parts<B: DistillBackend>(
        &self,
        student_hidden: Tensor<B, 2>,
        student_head: &Linear<B>,
        teacher_hidden: Tensor<B, 2>,
        teacher_head: &Linear<B>,
        targets: Option<Tensor<B, 1, Int>>,
        shard: &VocabShard,
    ) -> Result<DistillOutput<B>, DistillError> {
        let n = student_hidden.dims()[0];
        let (student, teacher) =
            linear_sides(student_hidden, student_head, teacher_hidden, teacher_head)?;
        let (vs, vt) = (student_head.weight.dims()[1], teacher_head.weight.dims()[1]);
        if vt != vs {
            return Err(DistillError::invalid(
                "teacher_head",
                format!("{vt} output columns"),
                format!("the student head's {vs} (both heads sliced alike)"),
            ));
        }
        let check = self.check_shard("student_head", vs, n, targets.as_ref(), shard)?;
        let rows = self.linear_chunk_rows_with::<B>(shard.vocab.div_ceil(shard.peers), 12);
        let run = LinearVocabParallel {
            shard,
            check: self.validation == Validation::Eager,
        };
        let targets = targets.map(Tensor::into_primitive);
        let call = LinearCall::new(student, teacher, targets, self.linear_setup(rows));
        let parts = B::distill_linear_tracked(&run, call)?.ok_or_else(|| {
            DistillError::invalid(
                "reduction",
                "PerRow",
                "Mean, Sum or Normalized for a trained vocabulary-parallel fused-linear \
                     loss (per-row upstream weights are only known in the backward pass)",
            )
        })?;
        Ok(DistillOutput::from(parts).with_check(check))
    }
}

/// The vocabulary-parallel loss of one peer's shards, run by the backend as a tracked op.
struct VocabParallel<'a> {
    shard: &'a VocabShard,
    check: bool,
}

impl crate::LogitsRun for VocabParallel<'_> {
    fn run<B: DistillBackend>(&self, call: DenseCall<B>) -> Result<FusedOutput<B>, DistillError> {
        vocab_parallel::<B>(call, self.shard, self.check)
    }
}

/// The vocabulary-parallel fused-linear loss of one peer's head slices, run by the backend as
/// a tracked op.
struct LinearVocabParallel<'a> {
    shard: &'a VocabShard,
    check: bool,
}

impl crate::LinearRun for LinearVocabParallel<'_> {
    fn run<B: DistillBackend>(
        &self,
        call: LinearCall<B>,
    ) -> Result<Option<LinearOutput<B>>, DistillError> {
        linear_vocab_parallel::<B>(call, self.shard, self.check)
    }
}

/// The vocabulary-parallel fused-linear loss on `B`: chunks of rows through
/// [`vocab_parallel`], then the hidden-state gradient summed across the peers. `Ok(None)` as
/// for the fused-linear chunks (a gradient with `Reduction::PerRow`).
pub(crate) fn linear_vocab_parallel<B: DistillBackend>(
    call: LinearCall<B>,
    shard: &VocabShard,
    check: bool,
) -> Result<Option<LinearOutput<B>>, DistillError> {
    // The shards' layout is checked with the first chunk.
    let mut check = check;
    let setup = call.settings;
    let call = call.map(|s, t, y| (s, linear::DenseChunks::new(t, &setup), y));
    let out = linear::chunked_with(call, |chunk| {
        let first = std::mem::replace(&mut check, false);
        vocab_parallel::<B>(chunk, shard, first).map(Some)
    })?;
    let Some((parts, grads)) = out else {
        return Ok(None);
    };
    let grads = match grads {
        Some(g) => {
            let hidden = sum_across(
                shard.peer,
                linear::float::<B, 2>(g.hidden),
                "all-reduce of the hidden-state gradient",
            )?;
            Some(LinearGrads {
                hidden: hidden.into_primitive().tensor(),
                ..g
            })
        }
        None => None,
    };
    Ok(Some((parts, grads)))
}

impl DistillLoss {
    /// `width` columns from the shard's offset lie inside the vocabulary, and the `[rows]`
    /// targets are global class indices (or the ignore index).
    fn check_shard<B: Backend>(
        &self,
        argument: &str,
        width: usize,
        rows: usize,
        targets: Option<&Tensor<B, 1, Int>>,
        shard: &VocabShard,
    ) -> Result<Option<DeviceCheck<B>>, DistillError> {
        if shard.offset + width > shard.vocab {
            return Err(DistillError::invalid(
                argument,
                format!("{width} columns from offset {}", shard.offset),
                format!("columns inside the vocabulary of {} columns", shard.vocab),
            ));
        }
        self.check_targets(targets, [rows, shard.vocab])
    }
}
