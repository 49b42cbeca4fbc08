//! The cross-tokenizer losses: ULD's sorted L1 and GOLD's hybrid, on aligned spans.

use burn::{
    config::Config,
    module::Module,
    tensor::{Int, Tensor, TensorData, activation},
};

use super::{MergePlan, SpanAlignment, VocabMatch, align::MERGE_FLOOR};
use crate::{
    DistillError, Reduction, Validation,
    error::or_panic,
    kernel::reference::gather_columns,
    reduction::pairwise_sum,
    softmax::check_temperature,
    validation::{DeviceCheck, validate},
};

/// Configuration of a [`CrossTokenizerLoss`] (TRL GOLD's `uld_*` settings; the defaults are
/// GOLD's).
///
/// ```
/// use burn_distill::cross::CrossTokenizerLossConfig;
///
/// let loss = CrossTokenizerLossConfig::new()
///     .with_crossentropy_weight(1.0)
///     .with_teacher_temperature(2.0)
///     .init();
/// assert_eq!(loss.config().teacher_temperature, 2.0);
/// ```
#[derive(Config, Debug)]
pub struct CrossTokenizerLossConfig {
    /// Temperature of the student's distributions (`uld_student_temperature`).
    #[config(default = 1.0)]
    pub student_temperature: f64,
    /// Temperature of the teacher's distributions (`uld_teacher_temperature`).
    #[config(default = 1.0)]
    pub teacher_temperature: f64,
    /// Weight of the distillation term (`uld_distillation_weight`).
    #[config(default = 1.0)]
    pub distillation_weight: f64,
    /// Weight of the student's cross-entropy on its own tokens (`uld_crossentropy_weight`).
    #[config(default = 0.0)]
    pub crossentropy_weight: f64,
    /// The hybrid loss's generalized JSD `β` on the matched vocabulary (GOLD's `beta`: `0`
    /// forward KL, `1` reverse KL).
    #[config(default = 0.5)]
    pub matched_beta: f64,
    /// The hybrid loss's weight of the matched part; the unmatched part gets `1 −` it. `None`
    /// (GOLD's default): the share of the teacher's logit columns that are matched.
    #[config(default = "None")]
    pub matched_weight: Option<f64>,
    /// How the aligned spans' distillation terms are reduced: `Mean` (GOLD's: the mean over
    /// the span's sequences of the mean over the sequence's spans), `Sum`, `Normalized`, or
    /// `PerRow` (`[G]`, one per span). The cross-entropy is a mean over the student's tokens.
    #[config(default = "Reduction::Mean")]
    pub reduction: Reduction,
    /// When the tokens are checked (in `[0, V)` on each side).
    #[config(default = "Validation::Eager")]
    pub validation: Validation,
}

impl CrossTokenizerLossConfig {
    /// Validates the configuration and builds the loss.
    ///
    /// # Panics
    /// With the message of [`CrossTokenizerLossConfig::try_init`]'s error, at the caller's
    /// line.
    #[track_caller]
    pub fn init(&self) -> CrossTokenizerLoss {
        or_panic(self.try_init())
    }

    /// Validates the configuration and builds the loss, or says which value is wrong.
    pub fn try_init(&self) -> Result<CrossTokenizerLoss, DistillError> {
        check_temperature("student_temperature", self.student_temperature)?;
        check_temperature("teacher_temperature", self.teacher_temperature)?;
        for (name, w) in [
            ("distillation_weight", self.distillation_weight),
            ("crossentropy_weight", self.crossentropy_weight),
        ] {
            if !(w.is_finite() && w >= 0.0) {
                return Err(DistillError::invalid(name, w, "a finite number >= 0"));
            }
        }
        if !(0.0..=1.0).contains(&self.matched_beta) {
            return Err(DistillError::invalid(
                "matched_beta",
                self.matched_beta,
                "a number in [0, 1]",
            ));
        }
        if let Some(w) = self.matched_weight
            && !(0.0..=1.0).contains(&w)
        {
            return Err(DistillError::invalid(
                "matched_weight",
                w,
                "a number in [0, 1], or None",
            ));
        }
        self.reduction.validate()?;
        Ok(CrossTokenizerLoss {
            config: self.clone(),
        })
    }
}

/// One side of a cross-tokenizer loss: `[N, V]` logits whose row `r` is the distribution of
/// token `tokens[r]` (the logits that predict it: shift by one from the model's output), and
/// those `[N]` tokens.
#[derive(Clone, Debug)]
pub struct TokenRows {
    /// `[N, V]` logits, row `r` predicting `tokens[r]`.
    pub logits: Tensor<2>,
    /// `[N]` the tokens, in `[0, V)`.
    pub tokens: Tensor<1, Int>,
}

/// The loss, with its two terms for logging.
#[derive(Clone, Debug)]
pub struct CrossTokenizerOutput {
    /// `distillation_weight · distillation + crossentropy_weight · crossentropy`
    /// (differentiable).
    pub loss: Tensor<1>,
    /// The distillation term, reduced (detached).
    pub distillation: Tensor<1>,
    /// The student's cross-entropy on its tokens (detached; `0` when its weight is 0).
    pub crossentropy: Tensor<1>,
    checks: Vec<DeviceCheck>,
}

impl CrossTokenizerOutput {
    /// Reads the checks that a forward with [`Validation::Deferred`] queued (one read-back)
    /// and names the first bad value.
    pub fn validate(&self) -> Result<(), DistillError> {
        validate(&self.checks)
    }
}

/// Distillation between models with different tokenizers (ULD, Boizard et al. 2024; GOLD's
/// hybrid, TRL).
///
/// Both sides' rows are tempered, `p = softmax(z / T)`, and each aligned span's rows merged
/// into one row `P_s[g]` (`[G, V_s]`) and `P_t[g]` (`[G, V_t]`) by the alignment's
/// [`MergeStrategy`](super::MergeStrategy) (unnormalised, as GOLD). Then, per span `g`:
///
/// ```text
/// ULD:     d_g = Σ_i | sort↓(P_s[g])_i − sort↓(P_t[g])_i |        (the shorter one zero-padded)
/// hybrid:  d_g = w · JSD_β(P_s[g, M_s], P_t[g, M_t]) + (1 − w) · ULD(P_s[g, U_s], P_t[g, U_t])
///          JSD_β(s, t) = β Σ t' (log t' − log m) + (1 − β) Σ s' (log s' − log m),
///          m = (1 − β) s' + β t',  x' = max(x, 1e-8);  β = 0: Σ t'(log t' − log s'),  β = 1: Σ s'(log s' − log t')
/// loss  = λ_d · reduce_g(d_g) + λ_ce · mean_r(−log softmax(z_s[r])[y_r])
/// ```
///
/// `M_s, M_t` are the matched vocabulary entries ([`VocabMatch`]), `U_s, U_t` the rest of each
/// side's logit columns, `w` the configured matched weight or `|M| / V_t`. The teacher gets no
/// gradient. `Mean` is GOLD's reduction: the mean over sequences of the mean over their spans.
///
/// ```
/// use burn::tensor::{Device, Int, Tensor};
/// use burn_distill::cross::{CrossTokenizerLossConfig, MergeStrategy, SpanAlignment, TokenRows};
///
/// let device = Device::default().autodiff();
/// // The same one-byte text, one token on each side; vocabularies of 2 and 3.
/// let alignment = SpanAlignment::new(MergeStrategy::Observed, &[(&[(0, 1)][..], &[(0, 1)][..])]).unwrap();
/// let student = TokenRows {
///     logits: Tensor::<2>::from_floats([[0.0, 0.0]], &device).require_grad(),
///     tokens: Tensor::<1, Int>::from_ints([0], &device),
/// };
/// let teacher = TokenRows {
///     logits: Tensor::<2>::from_floats([[0.0, 0.0, 0.0]], &device),
///     tokens: Tensor::<1, Int>::from_ints([2], &device),
/// };
/// let loss = CrossTokenizerLossConfig::new().init();
/// let value = loss.forward(student, teacher, &alignment).into_scalar::<f32>();
/// // sorted: (½, ½, 0) against (⅓, ⅓, ⅓): |⅙| + |⅙| + |⅓| = ⅔
/// assert!((value - 2.0 / 3.0).abs() < 1e-6);
/// ```
///
/// # Shapes
/// - `student.logits`: `[N_s, V_s]`, `student.tokens`: `[N_s]` (`N_s` = the alignment's
///   student rows); the teacher's likewise with `N_t`, `V_t`
/// - output: `[1]`, or `[G]` with [`Reduction::PerRow`]
#[derive(Module, Debug)]
pub struct CrossTokenizerLoss {
    #[module(skip)]
    config: CrossTokenizerLossConfig,
}

impl CrossTokenizerLoss {
    /// The configuration.
    pub fn config(&self) -> &CrossTokenizerLossConfig {
        &self.config
    }

    /// The ULD loss (sorted L1).
    ///
    /// # Panics
    /// On bad input, with the message of [`CrossTokenizerLoss::try_forward`], at the caller's
    /// line.
    #[track_caller]
    pub fn forward(
        &self,
        student: TokenRows,
        teacher: TokenRows,
        alignment: &SpanAlignment,
    ) -> Tensor<1> {
        or_panic(self.try_forward(student, teacher, alignment))
    }

    /// [`CrossTokenizerLoss::forward`] that returns an error naming the bad argument.
    pub fn try_forward(
        &self,
        student: TokenRows,
        teacher: TokenRows,
        alignment: &SpanAlignment,
    ) -> Result<Tensor<1>, DistillError> {
        self.try_forward_parts(student, teacher, alignment, None)
            .map(|out| out.loss)
    }

    /// GOLD's hybrid loss: the matched vocabulary compared directly, the rest by sorted L1.
    ///
    /// # Panics
    /// On bad input, with the message of [`CrossTokenizerLoss::try_forward_hybrid`], at the
    /// caller's line.
    #[track_caller]
    pub fn forward_hybrid(
        &self,
        student: TokenRows,
        teacher: TokenRows,
        alignment: &SpanAlignment,
        vocab: &VocabMatch,
    ) -> Tensor<1> {
        or_panic(self.try_forward_hybrid(student, teacher, alignment, vocab))
    }

    /// [`CrossTokenizerLoss::forward_hybrid`] that returns an error naming the bad argument.
    pub fn try_forward_hybrid(
        &self,
        student: TokenRows,
        teacher: TokenRows,
        alignment: &SpanAlignment,
        vocab: &VocabMatch,
    ) -> Result<Tensor<1>, DistillError> {
        self.try_forward_parts(student, teacher, alignment, Some(vocab))
            .map(|out| out.loss)
    }

    /// The loss (hybrid with a `vocab` match, ULD without), its terms and queued checks, or an
    /// error naming the bad argument.
    pub fn try_forward_parts(
        &self,
        student: TokenRows,
        teacher: TokenRows,
        alignment: &SpanAlignment,
        vocab: Option<&VocabMatch>,
    ) -> Result<CrossTokenizerOutput, DistillError> {
        let c = &self.config;
        let vs = check_side("student", &student, &alignment.student)?;
        let vt = check_side("teacher", &teacher, &alignment.teacher)?;
        let mut checks = Vec::new();
        if c.validation != Validation::Off {
            for (name, side, v) in [
                ("student.tokens", &student, vs),
                ("teacher.tokens", &teacher, vt),
            ] {
                let lead = side.tokens.dims();
                let check = crate::onpolicy::token_check(name, &side.tokens, v, None, &lead);
                checks.extend(check.apply(c.validation)?);
            }
        }
        let p_s = activation::softmax(student.logits.clone() / c.student_temperature, 1);
        let p_t = activation::softmax(teacher.logits.detach() / c.teacher_temperature, 1);
        let merged_s = alignment.student.merge(p_s, student.tokens.clone());
        let merged_t = alignment.teacher.merge(p_t, teacher.tokens);
        let rows = match vocab {
            None => sorted_l1(merged_s, merged_t),
            Some(vocab) => self.hybrid_rows(merged_s, merged_t, vocab, [vs, vt])?,
        };
        let distillation = self.reduce(rows, alignment);
        let mut loss = distillation.clone() * c.distillation_weight;
        let crossentropy = if c.crossentropy_weight > 0.0 {
            let [n, _] = student.logits.dims();
            let log_p = activation::log_softmax(student.logits, 1);
            let log_p = gather_columns(log_p, student.tokens.reshape([n, 1])).reshape([n]);
            let ce = pairwise_sum(log_p.neg()) / n as f64;
            loss = loss + ce.clone() * c.crossentropy_weight;
            ce.detach()
        } else {
            Tensor::zeros([1], (&distillation.device(), distillation.dtype()))
        };
        Ok(CrossTokenizerOutput {
            loss,
            distillation: distillation.detach(),
            crossentropy,
            checks,
        })
    }

    /// The hybrid loss's `[G]` rows.
    fn hybrid_rows(
        &self,
        merged_s: Tensor<2>,
        merged_t: Tensor<2>,
        vocab: &VocabMatch,
        [vs, vt]: [usize; 2],
    ) -> Result<Tensor<1>, DistillError> {
        let (s_len, t_len) = vocab.vocab_sizes();
        for (name, len, width) in [("student", s_len, vs), ("teacher", t_len, vt)] {
            if len > width {
                return Err(DistillError::invalid(
                    "vocab",
                    format!("a match built from {len} {name} tokens"),
                    format!("at most the {name} logits' {width} columns"),
                ));
            }
        }
        let device = merged_s.device();
        let ids = |v: Vec<i64>| {
            Tensor::<1, Int>::from_data(TensorData::new(v.clone(), [v.len()]), &device)
        };
        let m_s: Vec<i64> = vocab.pairs().iter().map(|&(s, _)| s as i64).collect();
        let m_t: Vec<i64> = vocab.pairs().iter().map(|&(_, t)| t as i64).collect();
        let u_s = VocabMatch::unmatched(vocab.pairs().iter().map(|p| p.0), vs);
        let u_t = VocabMatch::unmatched(vocab.pairs().iter().map(|p| p.1), vt);
        let w = self
            .config
            .matched_weight
            .unwrap_or(m_t.len() as f64 / vt as f64);
        let matched = generalized_jsd(
            merged_s.clone().select(1, ids(m_s)),
            merged_t.clone().select(1, ids(m_t)),
            self.config.matched_beta,
        );
        let mut rows = matched * w;
        if !u_s.is_empty() && !u_t.is_empty() {
            let unmatched = sorted_l1(merged_s.select(1, ids(u_s)), merged_t.select(1, ids(u_t)));
            rows = rows + unmatched * (1.0 - w);
        }
        Ok(rows)
    }

    /// `[G]` span terms → the configured reduction.
    fn reduce(&self, rows: Tensor<1>, alignment: &SpanAlignment) -> Tensor<1> {
        let device = rows.device();
        match self.config.reduction {
            Reduction::PerRow => rows,
            Reduction::Sum => pairwise_sum(rows),
            Reduction::Normalized { items } => pairwise_sum(rows) / items as f64,
            Reduction::Mean => {
                let w = &alignment.mean_weights;
                let weights = Tensor::<1>::from_data(
                    TensorData::new(w.clone(), [w.len()]),
                    (&device, rows.dtype()),
                );
                pairwise_sum(rows * weights)
            }
        }
    }
}

/// The logits' width, after checking that the side has the rows the alignment expects.
fn check_side(
    name: &'static str,
    side: &TokenRows,
    plan: &MergePlan,
) -> Result<usize, DistillError> {
    let [n, v] = side.logits.dims();
    if n != plan.rows || v == 0 {
        return Err(DistillError::invalid(
            format!("{name}.logits"),
            format!("shape [{n}, {v}]"),
            format!(
                "[{}, V] with V >= 1 (one row per token of the alignment)",
                plan.rows
            ),
        ));
    }
    if side.tokens.dims() != [n] {
        return Err(DistillError::invalid(
            format!("{name}.tokens"),
            format!("shape {:?}", side.tokens.dims()),
            format!("shape [{n}] (one token per row)"),
        ));
    }
    Ok(v)
}

/// `Σ_i |sort↓(a)_i − sort↓(b)_i|` per row, the narrower side zero-padded: `[G]`.
fn sorted_l1(a: Tensor<2>, b: Tensor<2>) -> Tensor<1> {
    let [g, va] = a.dims();
    let [_, vb] = b.dims();
    let pad = |x: Tensor<2>, v: usize| {
        let x = x.sort_descending(1);
        if v < va.max(vb) {
            let zeros = Tensor::zeros([g, va.max(vb) - v], (&x.device(), x.dtype()));
            Tensor::cat(vec![x, zeros], 1)
        } else {
            x
        }
    };
    (pad(a, va) - pad(b, vb)).abs().sum_dim(1).reshape([g])
}

/// GOLD's generalized JSD of probabilities (`logits_are_probs`), summed per row: `[G]`.
fn generalized_jsd(s: Tensor<2>, t: Tensor<2>, beta: f64) -> Tensor<1> {
    let [g, _] = s.dims();
    let ls = s.clamp_min(MERGE_FLOOR).log();
    let lt = t.clamp_min(MERGE_FLOOR).log();
    // KL(a ‖ b) per entry from log a and log b, as `F.kl_div(log b, log a, log_target=True)`.
    let kl = |la: Tensor<2>, lb: Tensor<2>| la.clone().exp() * (la - lb);
    let per_entry = if beta == 0.0 {
        kl(lt, ls)
    } else if beta == 1.0 {
        kl(ls, lt)
    } else {
        let m = (ls.clone().exp() * (1.0 - beta) + lt.clone().exp() * beta).log();
        kl(lt, m.clone()) * beta + kl(ls, m) * (1.0 - beta)
    };
    per_entry.sum_dim(1).reshape([g])
}
