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

use crate::linear::{self, LinearGrads, LinearOutput, LinearSetup, LinearSide, linear_sides};
use crate::{
    DistillBackend, DistillError, DistillLoss, DistillOutput, DistillParams, DistillParts,
    Divergence, FusedOutput, Validation,
    error::or_panic,
    kernel::reference::divergence_rows,
    loss::check_row_targets,
    reduction::{ignored_rows, reduce_rows},
    validation::DeviceCheck,
};

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
    /// `P·(rows + 1)·9` for the row statistics (and one row of layout per peer), plus `rows·2` for the row sums of the divergences
    /// that need a second exchange (JSD, skew KLs, TVD): `O(N)`, independent of the
    /// vocabulary. Multiply by the size of the dtype (4 for f32, 8 for f64) for bytes; a ring
    /// all-reduce moves about twice that per peer.
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
    /// (the default), the shards' layout is checked after the first exchange on every peer alike
    /// (shards that overlap, leave a gap, or disagree on the vocabulary or the peer count fail
    /// on every peer, naming the shards): one read of `5·P` numbers back to the host.
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
    /// On bad shapes, out-of-range targets or a failed collective operation, with the message of
    /// [`DistillLoss::try_forward_vocab_parallel_parts`].
    pub fn forward_vocab_parallel<B: DistillBackend>(
        &self,
        student_shard: Tensor<B, 2>,
        teacher_shard: Tensor<B, 2>,
        targets: Tensor<B, 1, Int>,
        shard: &VocabShard,
    ) -> Tensor<B, 1> {
        or_panic(self.try_forward_vocab_parallel_parts(
            student_shard,
            teacher_shard,
            Some(targets),
            shard,
        ))
        .loss
    }

    /// [`DistillLoss::forward_vocab_parallel`] without labels: the soft term only.
    ///
    /// # Panics
    /// As [`DistillLoss::forward_vocab_parallel`].
    pub fn forward_vocab_parallel_soft<B: DistillBackend>(
        &self,
        student_shard: Tensor<B, 2>,
        teacher_shard: Tensor<B, 2>,
        shard: &VocabShard,
    ) -> Tensor<B, 1> {
        or_panic(self.try_forward_vocab_parallel_parts(student_shard, teacher_shard, None, shard))
            .loss
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
        if n == 0 || v == 0 {
            return Err(DistillError::invalid(
                "student_shard",
                format!("shape [{n}, {v}]"),
                "a non-empty [N, V_p] tensor",
            ));
        }
        if teacher_shard.dims() != [n, v] {
            return Err(DistillError::invalid(
                "teacher_shard",
                format!("shape {:?}", teacher_shard.dims()),
                format!("the student_shard shape [{n}, {v}] (both models sharded alike)"),
            ));
        }
        let check = self.check_shard("student_shard", v, n, targets.as_ref(), shard)?;
        let out = B::distill_vocab_parallel(
            self.soft_cap(student_shard).into_primitive().tensor(),
            self.soft_cap(teacher_shard).into_primitive().tensor(),
            targets.map(Tensor::into_primitive),
            &self.params,
            shard,
            self.validation == Validation::Eager,
            false,
        )?;
        Ok(DistillOutput::from(out.parts).with_check(check))
    }
}

impl DistillLoss {
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
    /// As [`DistillLoss::forward_vocab_parallel`]; also for `Reduction::PerRow` when the student
    /// is trained.
    pub fn forward_linear_vocab_parallel<B: DistillBackend>(
        &self,
        student_hidden: Tensor<B, 2>,
        student_head: &Linear<B>,
        teacher_hidden: Tensor<B, 2>,
        teacher_head: &Linear<B>,
        targets: Tensor<B, 1, Int>,
        shard: &VocabShard,
    ) -> Tensor<B, 1> {
        or_panic(self.try_forward_linear_vocab_parallel_parts(
            student_hidden,
            student_head,
            teacher_hidden,
            teacher_head,
            Some(targets),
            shard,
        ))
        .loss
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
        let setup = LinearSetup {
            params: self.params,
            kernel: self.kernel,
            vocab_mismatch: self.vocab_mismatch,
            chunk_rows: self.linear_chunk_rows_with::<B>(shard.vocab.div_ceil(shard.peers), 12),
            logit_softcap: self.logit_softcap,
            weight_grad: self.linear_head_grad,
            bias_grad: self.linear_head_grad,
        };
        let parts = B::distill_linear_vocab_parallel(
            student,
            teacher,
            targets.map(Tensor::into_primitive),
            &setup,
            shard,
            self.validation == Validation::Eager,
        )?;
        Ok(DistillOutput::from(parts).with_check(check))
    }
}

/// The vocabulary-parallel fused-linear loss on `B`: chunks of rows through
/// [`vocab_parallel`], then the hidden-state gradient summed across the peers. `Ok(None)` as
/// for [`linear::chunked`] (a gradient with `Reduction::PerRow`).
pub(crate) fn linear_vocab_parallel<B: DistillBackend>(
    student: LinearSide<B>,
    teacher: LinearSide<B>,
    targets: Option<IntTensor<B>>,
    setup: &LinearSetup,
    shard: &VocabShard,
    check: bool,
    with_grad: bool,
) -> Result<Option<LinearOutput<B>>, DistillError> {
    // The shards' layout is checked with the first chunk.
    let mut check = check;
    let out = linear::chunked_with(
        student,
        linear::DenseChunks::new(teacher, setup),
        targets,
        setup,
        with_grad,
        |zs, zt, y, params| {
            let first = std::mem::replace(&mut check, false);
            vocab_parallel::<B>(zs, zt, y, params, shard, first, with_grad).map(Some)
        },
    )?;
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
        match targets {
            Some(targets) => check_row_targets(
                targets,
                [rows, shard.vocab],
                self.validation,
                self.params.ignore_index,
            ),
            None => Ok(None),
        }
    }
}

/// Sums `tensor` across the peers.
fn sum_across<B: Backend, const D: usize>(
    peer: PeerId,
    tensor: Tensor<B, D>,
    step: &str,
) -> Result<Tensor<B, D>, DistillError> {
    // Flat: burn-collective 0.21's global (multi-node) all-reduce hangs on tensors of more
    // than one dimension.
    let shape = tensor.shape();
    let flat = tensor.reshape([shape.num_elements()]);
    all_reduce::<B>(peer, flat.into_primitive().tensor(), ReduceOperation::Sum)
        .map(|t| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(t)).reshape(shape))
        .map_err(|e| DistillError::Collective {
            operation: step.to_string(),
            message: format!("{e:?}"),
        })
}

/// `x` where finite, `0` elsewhere (a shard whose row is all `−∞` padding has no maximum to
/// shift by; its sums are `0` whatever the shift).
fn finite_or_zero<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let infinite = x.clone().is_finite().bool_not();
    x.mask_fill(infinite, 0.0)
}

/// Merges `[P, N, 1]` per-peer maxima `m_p` and sums `S_p = Σ_{j∈p} e^{(x_j − m_p)/T}`
/// (`m = max_p m_p`, `S = Σ_p S_p e^{(m_p − m)/T}`).
struct Merged<B: Backend> {
    /// `[N, 1]` log-normaliser `m/T + log S`.
    lse: Tensor<B, 2>,
    /// `[N, 1]` `log S`.
    log_sum: Tensor<B, 2>,
    /// `[N, 1]` global maximum `m` (`0` where every logit of the row is `−∞`).
    max: Tensor<B, 2>,
    /// `[P, N, 1]` `e^{(m_p − m)/T} / S`: turns a per-peer sum weighted by `e^{(x_j − m_p)/T}`
    /// into its share of the global softmax expectation.
    share: Tensor<B, 3>,
}

fn merge<B: Backend>(maxima: Tensor<B, 3>, sums: Tensor<B, 3>, t: f64) -> Merged<B> {
    let n = maxima.dims()[1];
    let m = finite_or_zero(maxima.clone().max_dim(0));
    let rescale = (maxima - m.clone()).mul_scalar(t.recip()).exp();
    let total = (sums * rescale.clone()).sum_dim(0);
    let log_sum = total.clone().log().reshape([n, 1]);
    Merged {
        lse: log_sum.clone() + m.clone().reshape([n, 1]).mul_scalar(t.recip()),
        log_sum,
        max: m.clone().reshape([n, 1]),
        share: rescale / total,
    }
}

/// `h_j = q_j ∂φ/∂q_j` for each column of the divergence `D = Σ_j φ(p_j, q_j)` (see
/// [`Divergence`]), with `0` where `q_j = 0`: the student gradient is then
/// `(h_j − q_j Σ_k h_k) / T`.
///
/// ```text
/// forward KL         h = −p
/// reverse KL         h = q (log q − log p + 1)
/// JSD(β)             h = (1 − β) q (log q − log m),          m = β p + (1 − β) q
/// skew KL(λ)         h = −(1 − λ) p q / m,                    m = λ p + (1 − λ) q
/// skew reverse KL(λ) h = q (log q − log m + 1 − λ q / m),     m = (1 − λ) p + λ q
/// TVD                h = ½ q sign(q − p)
/// ```
fn sensitivity<B: Backend>(
    divergence: Divergence,
    log_p: Tensor<B, 2>,
    log_q: Tensor<B, 2>,
) -> Tensor<B, 2> {
    let p = log_p.clone().exp();
    let q = log_q.clone().exp();
    let absent = q.clone().lower_equal_elem(0.0);
    // `log m` and `1/m` where the mixture `m > 0` (wherever `q > 0`).
    let mixture = |m: Tensor<B, 2>| {
        let zero = m.clone().lower_equal_elem(0.0);
        let m = m.mask_fill(zero, 1.0);
        (m.clone().log(), m.recip())
    };
    let h = match divergence {
        Divergence::ForwardKl => return p.neg(),
        Divergence::ReverseKl => q.clone() * (log_q - log_p).add_scalar(1.0),
        Divergence::Jsd { beta } => {
            let (log_m, _) = mixture(p.mul_scalar(beta) + q.clone().mul_scalar(1.0 - beta));
            (q * (log_q - log_m)).mul_scalar(1.0 - beta)
        }
        Divergence::SkewKl { lambda } => {
            let (_, inv_m) =
                mixture(p.clone().mul_scalar(lambda) + q.clone().mul_scalar(1.0 - lambda));
            return (p * q * inv_m).mul_scalar(lambda - 1.0);
        }
        Divergence::SkewReverseKl { lambda } => {
            let (log_m, inv_m) = mixture(p.mul_scalar(1.0 - lambda) + q.clone().mul_scalar(lambda));
            let ratio = q.clone() * inv_m;
            q * (log_q - log_m + ratio.mul_scalar(-lambda)).add_scalar(1.0)
        }
        Divergence::Tvd => return (q.clone() - p).sign().mul(q).mul_scalar(0.5),
    };
    h.mask_fill(absent, 0.0)
}

/// The vocabulary-parallel loss on one peer's shard (see the module documentation): the
/// reduced loss and parts (equal on every peer) and, when `with_grad`, the gradient of the
/// loss with respect to this shard's student logits. With `check`, the shards' layout is
/// verified after the first exchange (one read of `5·P` numbers back to the host): every
/// peer then fails alike when the shards overlap, leave a gap or disagree on the vocabulary,
/// the peer count or the rows.
///
/// The default body of [`DistillBackend::distill_vocab_parallel`]; runs on any backend with
/// burn tensor ops, exchanging through burn-collective on `B`.
pub fn vocab_parallel<B: DistillBackend>(
    student: FloatTensor<B>,
    teacher: FloatTensor<B>,
    targets: Option<IntTensor<B>>,
    params: &DistillParams,
    shard: &VocabShard,
    check: bool,
    with_grad: bool,
) -> Result<FusedOutput<B>, DistillError> {
    let z = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(student));
    let u = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(teacher));
    let logits_dtype = z.dtype();
    // Half-precision shards are computed in f32 (sums over a shard overflow f16).
    let compute = match logits_dtype {
        DType::F16 | DType::BF16 => DType::F32,
        dtype => dtype,
    };
    let (z, u) = (z.cast(compute), u.cast(compute).detach());
    let [n, v] = z.dims();
    let device = z.device();
    let t = params.temperature;
    let targets = targets.map(Tensor::<B, 1, Int>::from_primitive);
    let hard_needed = targets.is_some();
    let smoothing = params.label_smoothing;
    let zeros = || Tensor::<B, 2>::zeros([n, 1], (&device, compute));

    // Which rows this peer's shard holds the target of, and where.
    let owned_target = targets.as_ref().map(|y| {
        let local = y.clone().sub_scalar(shard.offset as i64);
        let owned = local
            .clone()
            .greater_equal_elem(0)
            .bool_and(local.clone().lower_elem(v as i64))
            .unsqueeze_dim::<2>(1);
        (owned, local.clamp(0, v as i64 - 1).unsqueeze_dim::<2>(1))
    });

    // 1. This shard's online-softmax statistics, gathered from every peer.
    let inv_t = t.recip();
    // The padding mask (the rule of `MASKED_LOGIT`), only needed for label smoothing.
    let padding = (hard_needed && smoothing > 0.0).then(|| {
        z.clone()
            .greater_elem(crate::vocab::MASKED_LOGIT)
            .bool_not()
    });
    let z_max = z.clone().max_dim(1);
    let z_shift = z.clone() - finite_or_zero(z_max.clone());
    let u_max = u.clone().max_dim(1);
    let u_shift = u.clone() - finite_or_zero(u_max.clone());
    let z_exp = z_shift.clone().mul_scalar(inv_t).exp();
    let u_exp = u_shift.clone().mul_scalar(inv_t).exp();
    // Forward and reverse KL need no second exchange: the shard's
    // `Σ_j e^{(u_j − m^u_p)/T} ((u_j − m^u_p) − (z_j − m^z_p))/T` (forward KL; the student's
    // weights and `z − u` for reverse KL), corrected by the shard's maxima and rescaled after
    // the merge, is its part of `Σ_j p_j ((u_j − m^u) − (z_j − m^z))/T`, and then
    // `KL(p‖q) = that − log S_t + log S_s` (max-shifted throughout, as the unsharded loss).
    let weighted_gap = |weight: Tensor<B, 2>, a: Tensor<B, 2>, b: Tensor<B, 2>| {
        let zero = weight.clone().lower_equal_elem(0.0);
        (weight * (a - b).mul_scalar(inv_t).mask_fill(zero, 0.0)).sum_dim(1)
    };
    let gap = match params.divergence {
        Divergence::ForwardKl => weighted_gap(u_exp.clone(), u_shift, z_shift.clone()),
        Divergence::ReverseKl => weighted_gap(z_exp.clone(), z_shift.clone(), u_shift),
        _ => zeros(),
    };
    let target_logit = match &owned_target {
        Some((owned, index)) => z
            .clone()
            .gather(1, index.clone())
            .mask_fill(owned.clone().bool_not(), 0.0),
        None => zeros(),
    };
    let (finite_sum, finite_count) = match &padding {
        Some(padding) => (
            z.clone().mask_fill(padding.clone(), 0.0).sum_dim(1),
            z.ones_like().mask_fill(padding.clone(), 0.0).sum_dim(1),
        ),
        None => (zeros(), zeros()),
    };
    let stats = Tensor::cat(
        vec![
            z_max,
            z_exp.sum_dim(1),
            if hard_needed {
                z_shift.exp().sum_dim(1)
            } else {
                zeros()
            },
            u_max,
            u_exp.sum_dim(1),
            target_logit,
            finite_sum,
            finite_count,
            gap,
        ],
        1,
    );
    // One more row per peer: its layout, checked by every peer after the exchange.
    let mut layout = [0.0; STATS];
    layout[..5].copy_from_slice(&[
        shard.offset as f64,
        v as f64,
        shard.vocab as f64,
        shard.peers as f64,
        n as f64,
    ]);
    let layout = Tensor::<B, 1>::from_floats(layout, &device)
        .cast(compute)
        .reshape([1, STATS]);
    let slots = Tensor::<B, 3>::zeros([shard.peers, n + 1, STATS], (&device, compute))
        .slice_assign(
            [shard.rank..shard.rank + 1, 0..n + 1, 0..STATS],
            Tensor::cat(vec![stats, layout], 0).unsqueeze_dim(0),
        );
    let all = sum_across(shard.peer, slots, "all-gather of the row statistics")?;
    if check {
        check_layout(
            all.clone().slice([0..shard.peers, n..n + 1, 0..5]),
            shard,
            n,
        )?;
    }
    let column = |c: usize| all.clone().slice([0..shard.peers, 0..n, c..c + 1]);
    let student_t = merge(column(0), column(1), t);
    let teacher_t = merge(column(3), column(4), t);
    let log_q = z.clone().mul_scalar(inv_t) - student_t.lse.clone();
    let log_p = u.mul_scalar(inv_t) - teacher_t.lse.clone();

    // 2. The divergence `D` per row and `H = Σ_k h_k` over the whole vocabulary: from the
    // statistics for the KLs, otherwise from a second exchange of this shard's part of both
    // row sums.
    // `Σ_p (gap_p + ((m^w_p − m^w) − (m^o_p − m^o))/T · S^w_p) · share^w_p` for the weighting
    // model `w` (the teacher for forward KL) and the other `o`; a shard of `−∞` only has
    // `S_p = 0` and contributes nothing.
    let kl_part =
        |weights: &Merged<B>, w_max: usize, w_sum: usize, other: &Merged<B>, o_max: usize| {
            let local = |c: usize, global: &Tensor<B, 2>| {
                let maxima = column(c);
                let finite = maxima.clone().is_finite();
                (maxima - global.clone().unsqueeze_dim::<3>(0)).mask_fill(finite.bool_not(), 0.0)
            };
            let shift = (local(w_max, &weights.max) - local(o_max, &other.max)).mul_scalar(inv_t);
            ((column(8) + shift * column(w_sum)) * weights.share.clone())
                .sum_dim(0)
                .reshape([n, 1])
        };
    let h = || sensitivity(params.divergence, log_p.clone(), log_q.clone());
    let (divergence, h_total, h) = match params.divergence {
        Divergence::ForwardKl => (
            kl_part(&teacher_t, 3, 4, &student_t, 0) - teacher_t.log_sum.clone()
                + student_t.log_sum.clone(),
            Tensor::full([n, 1], -1.0, (&device, compute)),
            with_grad.then(h),
        ),
        Divergence::ReverseKl => {
            let kl = kl_part(&student_t, 0, 1, &teacher_t, 3) - student_t.log_sum.clone()
                + teacher_t.log_sum.clone();
            (kl.clone(), kl.add_scalar(1.0), with_grad.then(h))
        }
        _ => {
            let h = h();
            let partial = Tensor::cat(
                vec![
                    divergence_rows(params.divergence, log_p.clone(), log_q.clone())
                        .unsqueeze_dim(1),
                    h.clone().sum_dim(1),
                ],
                1,
            );
            let sums = sum_across(shard.peer, partial, "all-reduce of the row sums")?;
            let (d, total) = (sums.clone().slice([0..n, 0..1]), sums.slice([0..n, 1..2]));
            (d, total, with_grad.then_some(h))
        }
    };
    let factor = params.soft_factor();
    let soft = divergence.mul_scalar(factor);
    let soft_grad = h.map(|h| (h - log_q.clone().exp() * h_total).mul_scalar(factor / t));

    // Returned in the dtype of the backend's fused losses for these logits (f32 for half
    // precision on the CubeCL backends, as `forward`).
    let loss_dtype = B::fused_loss_dtype(logits_dtype);
    let reduce = |rows: Tensor<B, 2>, ignored: Option<Tensor<B, 1, Bool>>| {
        reduce_rows(rows.reshape([n]), ignored, params.reduction)
            .cast(loss_dtype)
            .into_primitive()
            .tensor()
    };
    let Some(targets) = targets else {
        let grad = soft_grad.map(|g| scale_rows(g, None, params, n, logits_dtype));
        return Ok(FusedOutput {
            parts: DistillParts {
                loss: reduce(soft.clone(), None),
                soft: reduce(soft, None),
                hard: None,
            },
            grad,
        });
    };

    // The hard term from the merged statistics at temperature 1.
    let (owned, index) = owned_target.expect("targets were given");
    let lse_one = merge(column(0), column(2), 1.0).lse;
    let target_logit = column(5).sum_dim(0).reshape([n, 1]);
    let mut hard = lse_one.clone() - target_logit.mul_scalar(1.0 - smoothing);
    if smoothing > 0.0 {
        let mean = column(6).sum_dim(0).reshape([n, 1]) / column(7).sum_dim(0).reshape([n, 1]);
        hard = hard - mean.mul_scalar(smoothing);
    }
    let hard_grad = (with_grad && params.alpha < 1.0).then(|| {
        let weight = Tensor::<B, 2>::full([n, 1], smoothing - 1.0, (&device, compute))
            .mask_fill(owned.bool_not(), 0.0);
        let mut g = (z.clone() - lse_one)
            .exp()
            .scatter(1, index, weight, IndexingUpdateOp::Add);
        if let Some(padding) = padding {
            let count = column(7).sum_dim(0).reshape([n, 1]);
            let uniform = z.ones_like().mask_fill(padding, 0.0) / count;
            g = g - uniform.mul_scalar(smoothing);
        }
        g
    });

    // α-mix (a term of weight 0 is skipped, so that an infinite term cannot give NaN), then the
    // ignored rows (0) and the rows whose target is outside the vocabulary (NaN).
    let alpha = params.alpha;
    let mix = |s: Tensor<B, 2>, h: Tensor<B, 2>| match alpha {
        1.0 => s,
        0.0 => h,
        _ => s.mul_scalar(alpha) + h.mul_scalar(1.0 - alpha),
    };
    let ignored = ignored_rows(Some(&targets), params.ignore_index);
    let out_of_range = targets
        .clone()
        .lower_elem(0)
        .bool_or(targets.clone().greater_equal_elem(shard.vocab as i64));
    let bad = match ignored.clone() {
        Some(ignored) => out_of_range.bool_and(ignored.bool_not()),
        None => out_of_range,
    };
    let skipped = match ignored.clone() {
        Some(ignored) => ignored.bool_or(bad.clone()),
        None => bad.clone(),
    }
    .unsqueeze_dim::<2>(1);
    let mask = |rows: Tensor<B, 2>| {
        let rows = match ignored.clone() {
            Some(ignored) => rows.mask_fill(ignored.unsqueeze_dim(1), 0.0),
            None => rows,
        };
        rows.mask_fill(bad.clone().unsqueeze_dim(1), f64::NAN)
    };
    let loss = mask(mix(soft.clone(), hard.clone()));
    let grad = soft_grad.map(|sg| {
        let g = match hard_grad {
            Some(hg) => mix(sg, hg),
            None => sg,
        };
        let g = g.mask_fill(skipped.expand([n, v]), 0.0);
        scale_rows(g, ignored.clone(), params, n, logits_dtype)
    });
    Ok(FusedOutput {
        parts: DistillParts {
            loss: reduce(loss, ignored.clone()),
            soft: reduce(mask(soft), ignored.clone()),
            hard: Some(reduce(mask(hard), ignored)),
        },
        grad,
    })
}

/// Every peer's `[offset, width, vocab, peers, rows]` (a `[P, 1, 5]` slice of the gathered
/// statistics, read back to the host) agrees with this peer's and tiles `[0, vocab)` in rank
/// order; computed identically on every peer, so all fail alike.
fn check_layout<B: Backend>(
    layout: Tensor<B, 3>,
    shard: &VocabShard,
    rows: usize,
) -> Result<(), DistillError> {
    let values: Vec<f64> =
        layout
            .into_data()
            .convert::<f64>()
            .to_vec()
            .map_err(|e| DistillError::Collective {
                operation: "read of the shard layout".into(),
                message: format!("{e:?}"),
            })?;
    let mut next = 0.0;
    let mut described = Vec::new();
    let mut consistent = true;
    for (rank, peer) in values.chunks_exact(5).enumerate() {
        let (offset, width, vocab, peers, n) = (peer[0], peer[1], peer[2], peer[3], peer[4]);
        described.push(format!("rank {rank}: columns {offset}..{}", offset + width));
        consistent &= offset == next
            && vocab == shard.vocab as f64
            && peers == shard.peers as f64
            && n == rows as f64;
        next = offset + width;
    }
    if consistent && next == shard.vocab as f64 {
        return Ok(());
    }
    Err(DistillError::invalid(
        "vocabulary shards",
        format!(
            "{} (vocab {}, {} peers, {rows} rows here)",
            described.join(", "),
            shard.vocab,
            shard.peers
        ),
        "shards that tile [0, vocab) in rank order, with one vocab, peer count and row count on every peer",
    ))
}

/// The per-row gradients times the reduction's factor, in the logits' dtype.
fn scale_rows<B: Backend>(
    grad: Tensor<B, 2>,
    ignored: Option<Tensor<B, 1, Bool>>,
    params: &DistillParams,
    rows: usize,
    dtype: DType,
) -> FloatTensor<B> {
    let device = grad.device();
    let grad = match params
        .reduction
        .factor_tensor::<B>(ignored, rows, &device, grad.dtype())
    {
        Some(factor) => grad * factor.reshape([1, 1]),
        None => grad,
    };
    grad.cast(dtype).into_primitive().tensor()
}
