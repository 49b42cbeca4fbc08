//! The closed-form loss and gradient of one peer's shard: row statistics all-gathered and
//! merged (online softmax across peers), the row sums of the mixture divergences, the shard's
//! gradient. Tensor code on tensors without autodiff.

use burn::tensor::{Bool, DType, IndexingUpdateOp, Int, Tensor};

use crate::{
    DistillError, DistillParams, Divergence,
    backend::{self, DistillParts},
    kernel::reference::{Probs, divergence_rows, gather_columns},
    reduction::{ignored_rows, reduce_rows},
};

use super::exchange::{RowExchange, sum_across};
use super::{STATS, VocabShard};

/// How one shard's loss runs: the shard, the exchange, whether the shards' layout is checked
/// after the first exchange and whether the gradient is formed.
pub(crate) struct ShardRun<'a> {
    pub(crate) shard: &'a VocabShard,
    pub(crate) exchange: &'a dyn RowExchange,
    pub(crate) check: bool,
    pub(crate) with_grad: bool,
}

/// `x` where finite, `0` elsewhere (a shard whose row is all `−∞` padding has no maximum to
/// shift by; its sums are `0` whatever the shift).
fn finite_or_zero<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let infinite = x.clone().is_finite().bool_not();
    x.mask_fill(infinite, 0.0)
}

/// Merges `[P, N, 1]` per-peer maxima `m_p` and sums `S_p = Σ_{j∈p} e^{(x_j − m_p)/T}`
/// (`m = max_p m_p`, `S = Σ_p S_p e^{(m_p − m)/T}`).
struct Merged {
    /// `[N, 1]` log-normaliser `m/T + log S`.
    lse: Tensor<2>,
    /// `[N, 1]` `log S`.
    log_sum: Tensor<2>,
    /// `[N, 1]` global maximum `m` (`0` where every logit of the row is `−∞`).
    max: Tensor<2>,
    /// `[P, N, 1]` `e^{(m_p − m)/T} / S`: turns a per-peer sum weighted by `e^{(x_j − m_p)/T}`
    /// into its share of the global softmax expectation.
    share: Tensor<3>,
}

fn merge(maxima: Tensor<3>, sums: Tensor<3>, t: f64) -> Merged {
    let n = maxima.dims()[1];
    let m = finite_or_zero(maxima.clone().max_dim(0));
    let rescale = (maxima - m.clone()).mul_scalar(t.recip()).exp();
    let total = (sums * rescale.clone()).sum_dim(0);
    let log_sum = total.clone().log().reshape([n, 1]);
    Merged {
        lse: log_sum.clone() + m.clone().reshape([n, 1]).mul_scalar(t.recip()),
        log_sum,
        max: m.reshape([n, 1]),
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
fn sensitivity(divergence: Divergence, probs: Probs) -> Tensor<2> {
    let Probs { log_p, log_q, p, q } = probs;
    let absent = q.clone().lower_equal_elem(0.0);
    // `log m` and `1/m` where the mixture `m > 0` (wherever `q > 0`).
    let mixture = |m: Tensor<2>| {
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

/// The vocabulary-parallel loss on one peer's shard (see the module documentation of
/// `parallel`), on tensors without autodiff: the reduced loss and parts (equal on every peer)
/// and, when `run.with_grad`, the gradient of the loss with respect to this shard's student
/// logits (for an upstream gradient of 1; per row for `PerRow`), in the logits' dtype (f32 for
/// f16 logits). With `run.check`, the shards' layout is verified after the first exchange (one
/// read of `5·P` numbers back to the host): every peer then fails alike when the shards
/// overlap, leave a gap or disagree on the vocabulary, the peer count or the rows.
pub(crate) fn vocab_parallel(
    student: Tensor<2>,
    teacher: Tensor<2>,
    targets: Option<Tensor<1, Int>>,
    params: &DistillParams,
    run: &ShardRun<'_>,
) -> Result<(DistillParts, Option<Tensor<2>>), DistillError> {
    let rows = ShardRows::new(student, teacher, targets, params, run.shard);
    // 1. This shard's online-softmax statistics, gathered from every peer.
    let stats = rows.statistics(params);
    let all = rows.gather(stats, run)?;
    // 2. The soft term, 3. the hard term, 4. the α-mix, masks and reduction.
    let soft = rows.soft_term(&all, params, run)?;
    let hard = rows.hard_term(&all, params, run.with_grad);
    Ok(rows.finish(soft, hard, params, run.shard))
}

/// One peer's shard, prepared: the logits in the compute dtype (f32 for half precision: sums
/// over a shard overflow f16), which rows' targets this shard holds and where, and the padding
/// mask (the rule of `MASKED_LOGIT`, only needed for label smoothing).
struct ShardRows {
    z: Tensor<2>,
    u: Tensor<2>,
    logits_dtype: DType,
    /// The dtype of the reduced loss: that of the device's fused kernels for these logits.
    loss_dtype: DType,
    targets: Option<Tensor<1, Int>>,
    owned_target: Option<(Tensor<2, Bool>, Tensor<2, Int>)>,
    padding: Option<Tensor<2, Bool>>,
}

/// The gathered `[P, N + 1, STATS]` statistics of every peer.
struct Gathered {
    all: Tensor<3>,
    peers: usize,
    n: usize,
}

impl Gathered {
    /// `[P, N, 1]`: column `c` of every peer's statistics.
    fn column(&self, c: usize) -> Tensor<3> {
        self.all.clone().slice([0..self.peers, 0..self.n, c..c + 1])
    }
}

/// A term's `[N, 1]` row values and, if asked, its `[N, V_p]` gradient.
type Term = (Tensor<2>, Option<Tensor<2>>);

impl ShardRows {
    fn new(
        z: Tensor<2>,
        u: Tensor<2>,
        targets: Option<Tensor<1, Int>>,
        params: &DistillParams,
        shard: &VocabShard,
    ) -> Self {
        let logits_dtype = z.dtype();
        let loss_dtype = backend::fused_loss_dtype(&z.device(), logits_dtype);
        let compute = match logits_dtype {
            DType::F16 | DType::BF16 => DType::F32,
            dtype => dtype,
        };
        let (z, u) = (z.cast(compute), u.cast(compute));
        let v = z.dims()[1];
        let owned_target = targets.as_ref().map(|y| {
            let local = y.clone().sub_scalar(shard.offset as i64);
            let owned = local
                .clone()
                .greater_equal_elem(0)
                .bool_and(local.clone().lower_elem(v as i64))
                .unsqueeze_dim::<2>(1);
            (owned, local.clamp(0, v as i64 - 1).unsqueeze_dim::<2>(1))
        });
        let padding = (targets.is_some() && params.label_smoothing > 0.0).then(|| {
            z.clone()
                .greater_elem(crate::vocab::MASKED_LOGIT)
                .bool_not()
        });
        Self {
            z,
            u,
            logits_dtype,
            loss_dtype,
            targets,
            owned_target,
            padding,
        }
    }

    fn zeros(&self) -> Tensor<2> {
        let n = self.z.dims()[0];
        Tensor::zeros([n, 1], (&self.z.device(), self.z.dtype()))
    }

    /// The `[N, STATS]` statistics of this shard: maxima and sums of the tempered
    /// exponentials of both models (and the student's at T = 1 for the hard term), the target
    /// logit where this shard holds it, the finite logits' sum and count, and the KLs' gap.
    fn statistics(&self, params: &DistillParams) -> Tensor<2> {
        let (z, u) = (&self.z, &self.u);
        let inv_t = params.temperature.recip();
        let z_max = z.clone().max_dim(1);
        let z_shift = z.clone() - finite_or_zero(z_max.clone());
        let u_max = u.clone().max_dim(1);
        let u_shift = u.clone() - finite_or_zero(u_max.clone());
        let z_exp = z_shift.clone().mul_scalar(inv_t).exp();
        let u_exp = u_shift.clone().mul_scalar(inv_t).exp();
        // Forward and reverse KL need no second exchange: the shard's
        // `Σ_j e^{(u_j − m^u_p)/T} ((u_j − m^u_p) − (z_j − m^z_p))/T` (forward KL; the
        // student's weights and `z − u` for reverse KL), corrected by the shard's maxima and
        // rescaled after the merge, is its part of `Σ_j p_j ((u_j − m^u) − (z_j − m^z))/T`,
        // and then `KL(p‖q) = that − log S_t + log S_s` (max-shifted throughout, as the
        // unsharded loss).
        let weighted_gap = |weight: Tensor<2>, a: Tensor<2>, b: Tensor<2>| {
            let zero = weight.clone().lower_equal_elem(0.0);
            (weight * (a - b).mul_scalar(inv_t).mask_fill(zero, 0.0)).sum_dim(1)
        };
        let gap = match params.divergence {
            Divergence::ForwardKl => weighted_gap(u_exp.clone(), u_shift, z_shift.clone()),
            Divergence::ReverseKl => weighted_gap(z_exp.clone(), z_shift.clone(), u_shift),
            _ => self.zeros(),
        };
        // `gather_columns`, not `gather`: burn-fusion's gather after a row reduction is wrong
        // for some shapes (0.22.1 on wgpu: the target logits of a second shard).
        let target_logit = match &self.owned_target {
            Some((owned, index)) => {
                gather_columns(z.clone(), index.clone()).mask_fill(owned.clone().bool_not(), 0.0)
            }
            None => self.zeros(),
        };
        let (finite_sum, finite_count) = match &self.padding {
            Some(padding) => (
                z.clone().mask_fill(padding.clone(), 0.0).sum_dim(1),
                z.ones_like().mask_fill(padding.clone(), 0.0).sum_dim(1),
            ),
            None => (self.zeros(), self.zeros()),
        };
        let sum_1 = match self.targets {
            Some(_) => z_shift.exp().sum_dim(1),
            None => self.zeros(),
        };
        Tensor::cat(
            vec![
                z_max,
                z_exp.sum_dim(1),
                sum_1,
                u_max,
                u_exp.sum_dim(1),
                target_logit,
                finite_sum,
                finite_count,
                gap,
            ],
            1,
        )
    }

    /// Every peer's statistics, with one more row per peer: its layout, checked by every peer
    /// after the exchange when `run.check`.
    fn gather(&self, stats: Tensor<2>, run: &ShardRun<'_>) -> Result<Gathered, DistillError> {
        let shard = run.shard;
        let [n, v] = self.z.dims();
        let (device, compute) = (self.z.device(), self.z.dtype());
        let mut layout = [0.0; STATS];
        layout[..5].copy_from_slice(&[
            shard.offset as f64,
            v as f64,
            shard.vocab as f64,
            shard.peers as f64,
            n as f64,
        ]);
        let layout = Tensor::<1>::from_data(layout, (&device, compute)).reshape([1, STATS]);
        let slots = Tensor::<3>::zeros([shard.peers, n + 1, STATS], (&device, compute))
            .slice_assign(
                [shard.rank..shard.rank + 1, 0..n + 1, 0..STATS],
                Tensor::cat(vec![stats, layout], 0).unsqueeze_dim(0),
            );
        let all = sum_across(run.exchange, slots, "all-gather of the row statistics")?;
        if run.check {
            check_layout(
                all.clone().slice([0..shard.peers, n..n + 1, 0..5]),
                shard,
                n,
            )?;
        }
        Ok(Gathered {
            all,
            peers: shard.peers,
            n,
        })
    }

    /// The soft term (`T²`-scaled if configured) per row and its gradient: the divergence `D`
    /// and `H = Σ_k h_k` over the whole vocabulary from the statistics for the KLs, otherwise
    /// from a second exchange of this shard's part of both row sums.
    fn soft_term(
        &self,
        all: &Gathered,
        params: &DistillParams,
        run: &ShardRun<'_>,
    ) -> Result<Term, DistillError> {
        let with_grad = run.with_grad;
        let [n, _] = self.z.dims();
        let (t, inv_t) = (params.temperature, params.temperature.recip());
        let student_t = merge(all.column(0), all.column(1), t);
        let teacher_t = merge(all.column(3), all.column(4), t);
        let log_q = self.z.clone().mul_scalar(inv_t) - student_t.lse.clone();
        let log_p = self.u.clone().mul_scalar(inv_t) - teacher_t.lse.clone();
        // `Σ_p (gap_p + ((m^w_p − m^w) − (m^o_p − m^o))/T · S^w_p) · share^w_p` for the
        // weighting model `w` (the teacher for forward KL) and the other `o`; a shard of `−∞`
        // only has `S_p = 0` and contributes nothing.
        let kl_part =
            |weights: &Merged, w_max: usize, w_sum: usize, other: &Merged, o_max: usize| {
                let local = |c: usize, global: &Tensor<2>| {
                    let maxima = all.column(c);
                    let finite = maxima.clone().is_finite();
                    (maxima - global.clone().unsqueeze_dim::<3>(0))
                        .mask_fill(finite.bool_not(), 0.0)
                };
                let shift =
                    (local(w_max, &weights.max) - local(o_max, &other.max)).mul_scalar(inv_t);
                ((all.column(8) + shift * all.column(w_sum)) * weights.share.clone())
                    .sum_dim(0)
                    .reshape([n, 1])
            };
        let probs = || Probs::new(log_p.clone(), log_q.clone());
        let h = || sensitivity(params.divergence, probs());
        let (divergence, h_total, h) = match params.divergence {
            Divergence::ForwardKl => (
                kl_part(&teacher_t, 3, 4, &student_t, 0) - teacher_t.log_sum.clone()
                    + student_t.log_sum.clone(),
                Tensor::full([n, 1], -1.0, (&self.z.device(), self.z.dtype())),
                with_grad.then(h),
            ),
            Divergence::ReverseKl => {
                let kl = kl_part(&student_t, 0, 1, &teacher_t, 3) - student_t.log_sum.clone()
                    + teacher_t.log_sum.clone();
                (kl.clone(), kl.add_scalar(1.0), with_grad.then(h))
            }
            _ => {
                // One pair of exponentials for the divergence and its sensitivity.
                let probs = probs();
                let h = sensitivity(params.divergence, probs.clone());
                let partial = Tensor::cat(
                    vec![
                        divergence_rows(params.divergence, probs).unsqueeze_dim(1),
                        h.clone().sum_dim(1),
                    ],
                    1,
                );
                let sums = sum_across(run.exchange, partial, "all-reduce of the row sums")?;
                let (d, total) = (sums.clone().slice([0..n, 0..1]), sums.slice([0..n, 1..2]));
                (d, total, with_grad.then_some(h))
            }
        };
        let factor = params.soft_factor();
        let soft_grad = h.map(|h| (h - log_q.exp() * h_total).mul_scalar(factor / t));
        Ok((divergence.mul_scalar(factor), soft_grad))
    }

    /// The hard term per row from the merged statistics at temperature 1, and its gradient
    /// where it is asked and weighs (`α < 1`); `None` without targets.
    fn hard_term(&self, all: &Gathered, params: &DistillParams, with_grad: bool) -> Option<Term> {
        let (owned, index) = self.owned_target.clone()?;
        let [n, _] = self.z.dims();
        let smoothing = params.label_smoothing;
        let lse_one = merge(all.column(0), all.column(2), 1.0).lse;
        let target_logit = all.column(5).sum_dim(0).reshape([n, 1]);
        let mut hard = lse_one.clone() - target_logit.mul_scalar(1.0 - smoothing);
        let count = || all.column(7).sum_dim(0).reshape([n, 1]);
        if smoothing > 0.0 {
            let mean = all.column(6).sum_dim(0).reshape([n, 1]) / count();
            hard = hard - mean.mul_scalar(smoothing);
        }
        let hard_grad = (with_grad && params.alpha < 1.0).then(|| {
            let weight =
                Tensor::<2>::full([n, 1], smoothing - 1.0, (&self.z.device(), self.z.dtype()))
                    .mask_fill(owned.bool_not(), 0.0);
            let mut g =
                (self.z.clone() - lse_one)
                    .exp()
                    .scatter(1, index, weight, IndexingUpdateOp::Add);
            if let Some(padding) = self.padding.clone() {
                let uniform = self.z.ones_like().mask_fill(padding, 0.0) / count();
                g = g - uniform.mul_scalar(smoothing);
            }
            g
        });
        Some((hard, hard_grad))
    }

    /// The α-mix (a term of weight 0 is skipped, so that an infinite term cannot give NaN),
    /// the ignored rows (0) and the rows whose target is outside the vocabulary (NaN), the
    /// reduction, in the dtype of the device's fused losses for these logits (f32 for half
    /// precision on the CubeCL backends, as `forward`).
    fn finish(
        self,
        (soft, soft_grad): Term,
        hard: Option<Term>,
        params: &DistillParams,
        shard: &VocabShard,
    ) -> (DistillParts, Option<Tensor<2>>) {
        let [n, v] = self.z.dims();
        let loss_dtype = self.loss_dtype;
        let reduce = |rows: Tensor<2>, ignored: Option<Tensor<1, Bool>>| {
            reduce_rows(rows.reshape([n]), ignored, params.reduction).cast(loss_dtype)
        };
        let (Some(targets), Some((hard, hard_grad))) = (self.targets, hard) else {
            let grad = soft_grad.map(|g| scale_rows(g, None, params, n, self.logits_dtype));
            let parts = DistillParts {
                loss: reduce(soft.clone(), None),
                soft: reduce(soft, None),
                hard: None,
            };
            return (parts, grad);
        };
        let alpha = params.alpha;
        let mix = |s: Tensor<2>, h: Tensor<2>| match alpha {
            1.0 => s,
            0.0 => h,
            _ => s.mul_scalar(alpha) + h.mul_scalar(1.0 - alpha),
        };
        let ignored = ignored_rows(Some(&targets), params.ignore_index);
        let out_of_range = targets
            .clone()
            .lower_elem(0)
            .bool_or(targets.greater_equal_elem(shard.vocab as i64));
        let bad = match ignored.clone() {
            Some(ignored) => out_of_range.bool_and(ignored.bool_not()),
            None => out_of_range,
        };
        let skipped = match ignored.clone() {
            Some(ignored) => ignored.bool_or(bad.clone()),
            None => bad.clone(),
        }
        .unsqueeze_dim::<2>(1);
        let mask = |rows: Tensor<2>| {
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
            scale_rows(g, ignored.clone(), params, n, self.logits_dtype)
        });
        let parts = DistillParts {
            loss: reduce(loss, ignored.clone()),
            soft: reduce(mask(soft), ignored.clone()),
            hard: Some(reduce(mask(hard), ignored)),
        };
        (parts, grad)
    }
}

/// Every peer's `[offset, width, vocab, peers, rows]` (a `[P, 1, 5]` slice of the gathered
/// statistics, read back to the host) agrees with this peer's and tiles `[0, vocab)` in rank
/// order; computed identically on every peer, so all fail alike.
fn check_layout(layout: Tensor<3>, shard: &VocabShard, rows: usize) -> Result<(), DistillError> {
    let values: Vec<f64> =
        layout
            .try_into_vec_as::<f64>()
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

/// The per-row gradients times the reduction's factor, in the fused kernels' gradient dtype
/// for the logits' `dtype` (f32 for f16, so that a loss scale meets it unrounded; the
/// backward rounds once to the logits' dtype).
fn scale_rows(
    grad: Tensor<2>,
    ignored: Option<Tensor<1, Bool>>,
    params: &DistillParams,
    rows: usize,
    dtype: DType,
) -> Tensor<2> {
    let device = grad.device();
    let grad = match params
        .reduction
        .factor_tensor(ignored, rows, &device, grad.dtype())
    {
        Some(factor) => grad * factor.reshape([1, 1]),
        None => grad,
    };
    let grad_dtype = if dtype == DType::F16 {
        DType::F32
    } else {
        dtype
    };
    grad.cast(grad_dtype)
}
