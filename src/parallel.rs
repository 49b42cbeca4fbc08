//! Vocabulary-parallel distillation on burn-collective: the exact loss of logits sharded along
//! the vocabulary across peers (tensor-parallel LM heads), each peer getting the gradient of
//! its own shard. See `docs/parallel.md` for the design.
//!
//! # What is exchanged
//!
//! One or two all-reduces per call, both `O(N)` (never `O(N·V)`), issued by every peer in the
//! same order:
//!
//! 1. **Row statistics**, `P·N·9` floats: each peer's online-softmax state of its shard — the
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
    Divergence, FusedOutput,
    error::or_panic,
    kernel::reference::divergence_rows,
    loss::check_row_targets,
    reduction::{ignored_rows, reduce_rows},
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
        if peers == 0 || rank >= peers || vocab < peers {
            return Err(DistillError::invalid(
                "balanced shard",
                format!("rank {rank} of {peers} peers over {vocab} columns"),
                "peers >= 1, rank < peers and vocab >= peers",
            ));
        }
        Self::new(
            peer,
            rank,
            peers,
            Self::balanced_range(vocab, peers, rank).start,
            vocab,
        )
    }

    /// The columns of rank `rank` when `vocab` columns are split over `peers`: widths differ by
    /// at most one, the first `vocab % peers` shards being the wider.
    pub fn balanced_range(vocab: usize, peers: usize, rank: usize) -> Range<usize> {
        let (base, extra) = (vocab / peers.max(1), vocab % peers.max(1));
        let start = rank * base + rank.min(extra);
        start..start + base + usize::from(rank < extra)
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
    /// `P·rows·9` for the row statistics, plus `rows·2` for the row sums of the divergences
    /// that need a second exchange (JSD, skew KLs, TVD): `O(N)`, independent of the
    /// vocabulary. Multiply by the size of the dtype (4 for f32, 8 for f64) for bytes; a ring
    /// all-reduce moves about twice that per peer.
    pub fn exchanged_floats(&self, rows: usize, divergence: Divergence) -> usize {
        let second = match divergence {
            Divergence::ForwardKl | Divergence::ReverseKl => 0,
            _ => rows * 2,
        };
        self.peers * rows * STATS + second
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
    /// `Autodiff<B>`) and call this in the same order.
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
        self.check_shard("student_shard", v, n, targets.as_ref(), shard)?;
        let out = B::distill_vocab_parallel(
            self.soft_cap(student_shard).into_primitive().tensor(),
            self.soft_cap(teacher_shard).into_primitive().tensor(),
            targets.map(Tensor::into_primitive),
            &self.params,
            shard,
            false,
        )?;
        Ok(out.parts.into())
    }
}

impl DistillLoss {
    /// The fused-linear loss of a vocabulary-parallel LM head: this peer's slice of both heads
    /// (`Linear` layers `H → V_p` for columns `shard.offset() .. + V_p`), the `[N, H]` hidden
    /// states (the same on every peer) and `[N]` targets; the loss of the whole vocabulary, as
    /// [`DistillLoss::forward_linear`] on the unsharded heads, without any peer holding `[N, V]`
    /// or even `[N, V_p]` logits (chunks of rows, as `forward_linear`; the chunk size depends
    /// on the vocabulary and the peer count only, so every peer runs the same chunks).
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
        self.check_shard("student_head", vs, n, targets.as_ref(), shard)?;
        let setup = LinearSetup {
            params: self.params,
            kernel: self.kernel,
            vocab_mismatch: self.vocab_mismatch,
            chunk_rows: self.linear_chunk_rows(shard.vocab.div_ceil(shard.peers)),
            logit_softcap: self.logit_softcap,
        };
        let parts = B::distill_linear_vocab_parallel(
            student,
            teacher,
            targets.map(Tensor::into_primitive),
            &setup,
            shard,
        )?;
        Ok(parts.into())
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
    with_grad: bool,
) -> Result<Option<LinearOutput<B>>, DistillError> {
    let out = linear::chunked_with(
        student,
        teacher,
        targets,
        setup,
        with_grad,
        |zs, zt, y, params| vocab_parallel::<B>(zs, zt, y, params, shard, with_grad).map(Some),
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
    ) -> Result<(), DistillError> {
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
                self.check_targets,
                self.params.ignore_index,
            ),
            None => Ok(()),
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

/// Merges `[P, N, 1]` per-peer maxima `m_p` and sums `S_p = Σ_{j∈p} e^{(x_j − m_p)/T}`: the
/// `[N, 1]` log-normaliser `log S + m/T` with `m = max_p m_p` and `S = Σ_p S_p e^{(m_p − m)/T}`,
/// and the `[P, N, 1]` rescaling factors `e^{(m_p − m)/T} / S` that turn any other per-peer
/// sum weighted by `e^{(x_j − m_p)/T}` into its share of the global softmax expectation.
fn merge<B: Backend>(
    maxima: Tensor<B, 3>,
    sums: Tensor<B, 3>,
    t: f64,
) -> (Tensor<B, 2>, Tensor<B, 3>) {
    let n = maxima.dims()[1];
    let m = finite_or_zero(maxima.clone().max_dim(0));
    let rescale = (maxima - m.clone()).mul_scalar(t.recip()).exp();
    let total = (sums * rescale.clone()).sum_dim(0);
    let lse = total.clone().log() + m.mul_scalar(t.recip());
    (lse.reshape([n, 1]), rescale / total)
}

/// `h_j = q_j ∂φ/∂q_j` for each column of the divergence `D = Σ_j φ(p_j, q_j)` (see
/// [`Divergence`]), with `0` where `q_j = 0`: the student gradient is then
/// `(h_j − q_j Σ_k h_k) / T`.
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
/// loss with respect to this shard's student logits.
///
/// The default body of [`DistillBackend::distill_vocab_parallel`]; runs on any backend with
/// burn tensor ops, exchanging through burn-collective on `B`.
pub fn vocab_parallel<B: Backend>(
    student: FloatTensor<B>,
    teacher: FloatTensor<B>,
    targets: Option<IntTensor<B>>,
    params: &DistillParams,
    shard: &VocabShard,
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
    let finite = z.clone().is_finite();
    let z_max = z.clone().max_dim(1);
    let z_shift = z.clone() - finite_or_zero(z_max.clone());
    let u_max = u.clone().max_dim(1);
    let z_exp = z_shift.clone().mul_scalar(inv_t).exp();
    let u_exp = (u.clone() - finite_or_zero(u_max.clone()))
        .mul_scalar(inv_t)
        .exp();
    // Forward and reverse KL need no second exchange: the shard's `Σ_j e^{(x_j − m_p)/T} ·
    // (a_j − b_j)/T` (teacher-weighted `t − s` for forward KL, student-weighted `s − t` for
    // reverse KL), rescaled after the merge, is its part of `Σ_j p_j (t_j − s_j)` (resp.
    // `Σ_j q_j (s_j − t_j)`), and `KL = that − LSE_t + LSE_s` (resp. `− LSE_s + LSE_t`).
    let weighted_gap = |weight: Tensor<B, 2>, a: Tensor<B, 2>, b: Tensor<B, 2>| {
        let zero = weight.clone().lower_equal_elem(0.0);
        (weight * (a - b).mul_scalar(inv_t).mask_fill(zero, 0.0)).sum_dim(1)
    };
    let gap = match params.divergence {
        Divergence::ForwardKl => weighted_gap(u_exp.clone(), u.clone(), z.clone()),
        Divergence::ReverseKl => weighted_gap(z_exp.clone(), z.clone(), u.clone()),
        _ => zeros(),
    };
    let target_logit = match &owned_target {
        Some((owned, index)) => z
            .clone()
            .gather(1, index.clone())
            .mask_fill(owned.clone().bool_not(), 0.0),
        None => zeros(),
    };
    let (finite_sum, finite_count) = if hard_needed && smoothing > 0.0 {
        (
            z.clone()
                .mask_fill(finite.clone().bool_not(), 0.0)
                .sum_dim(1),
            z.ones_like()
                .mask_fill(finite.clone().bool_not(), 0.0)
                .sum_dim(1),
        )
    } else {
        (zeros(), zeros())
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
    let slots = Tensor::<B, 3>::zeros([shard.peers, n, STATS], (&device, compute)).slice_assign(
        [shard.rank..shard.rank + 1, 0..n, 0..STATS],
        stats.unsqueeze_dim(0),
    );
    let all = sum_across(shard.peer, slots, "all-gather of the row statistics")?;
    let column = |c: usize| all.clone().slice([0..shard.peers, 0..n, c..c + 1]);
    let (lse_student, student_rescale) = merge(column(0), column(1), t);
    let (lse_teacher, teacher_rescale) = merge(column(3), column(4), t);
    let log_q = z.clone().mul_scalar(inv_t) - lse_student.clone();
    let log_p = u.mul_scalar(inv_t) - lse_teacher.clone();

    // 2. The divergence `D` per row and `H = Σ_k h_k` over the whole vocabulary: from the
    // statistics for the KLs, otherwise from a second exchange of this shard's part of both
    // row sums.
    let h = sensitivity(params.divergence, log_p.clone(), log_q.clone());
    let rescaled_gap = |rescale: Tensor<B, 3>| (column(8) * rescale).sum_dim(0).reshape([n, 1]);
    let (divergence, h_total) = match params.divergence {
        Divergence::ForwardKl => (
            rescaled_gap(teacher_rescale) - lse_teacher + lse_student,
            Tensor::full([n, 1], -1.0, (&device, compute)),
        ),
        Divergence::ReverseKl => {
            let kl = rescaled_gap(student_rescale) - lse_student + lse_teacher;
            (kl.clone(), kl.add_scalar(1.0))
        }
        _ => {
            let partial = Tensor::cat(
                vec![
                    divergence_rows(params.divergence, log_p, log_q.clone()).unsqueeze_dim(1),
                    h.clone().sum_dim(1),
                ],
                1,
            );
            let sums = sum_across(shard.peer, partial, "all-reduce of the row sums")?;
            (sums.clone().slice([0..n, 0..1]), sums.slice([0..n, 1..2]))
        }
    };
    let factor = params.soft_factor();
    let soft = divergence.mul_scalar(factor);
    let soft_grad = with_grad.then(|| (h - log_q.exp() * h_total).mul_scalar(factor / t));

    let reduce = |rows: Tensor<B, 2>, ignored: Option<Tensor<B, 1, Bool>>| {
        reduce_rows(rows.reshape([n]), ignored, params.reduction)
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
    let (lse_one, _) = merge(column(0), column(2), 1.0);
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
        if smoothing > 0.0 {
            let count = column(7).sum_dim(0).reshape([n, 1]);
            let uniform = z.ones_like().mask_fill(finite.bool_not(), 0.0) / count;
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
