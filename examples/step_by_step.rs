//! Step-by-step distillation, shown: does a student learn multi-digit addition better from a
//! teacher's worked traces than from final answers?
//!
//! The task: `a + b` for `D`-digit numbers, the answer written most-significant digit first, so
//! that its first digit already depends on every carry. A worked trace spells the computation
//! out from the least-significant digit: per position the two operand digits, the sum digit
//! and the carry out, then the answer:
//!
//! ```text
//! prompt              trace (per digit: a, b, sum, carry)      answer
//! 0 4 7 5 + 0 6 8 9 =  5 9 4 1  7 8 6 1  4 6 1 1  0 0 1 0  >  0 1 1 6 4 <eos>   (475 + 689)
//! ```
//!
//! 1. A teacher transformer is trained on ground-truth traces.
//! 2. The teacher writes traces for the students' training problems (greedy decoding).
//! 3. Three students of one architecture, initialisation, data order and number of steps:
//!    - (a) **answers only**: the prompt, then the ground-truth answer (cross-entropy);
//!    - (b) **teacher traces, distilled**: `DistillLoss::forward_seq` on the teacher's traces,
//!      soft targets from the teacher's logits at every trace token, prompt tokens masked with
//!      the ignore index;
//!    - (c) **teacher traces, hard labels**: the same traces, cross-entropy on the teacher's
//!      tokens only (`α = 0`), to separate the effect of the trace from that of the soft term.
//! 4. Exact-match answer accuracy on held-out problems, decoded greedily.
//!
//! ```sh
//! cargo run --release --example step_by_step [--features wgpu]
//! cargo run --release --example step_by_step -- --digits 5 --json target/step_by_step.json
//! ```
//!
//! burn 0.22: no backend generic. [`run`] takes a [`Device`]; the models train on its autodiff
//! form (`device.autodiff()`), the frozen teacher (`model.valid()`) runs on the device without
//! autodiff (`device.inner()`), so its logits build no graph.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Instant;

use burn::module::Module;
use burn::nn::attention::generate_autoregressive_mask;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::transformer::{
    TransformerEncoder, TransformerEncoderConfig, TransformerEncoderInput,
};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_distill::DistillLossConfig;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// Tokens: digits are their own ids.
pub const PLUS: i64 = 10;
pub const EQ: i64 = 11;
pub const THEN: i64 = 12;
pub const EOS: i64 = 13;
pub const VOCAB: usize = 14;
/// Target of the positions that are not trained (prompt tokens, after the end).
pub const IGNORE: i64 = -100;

/// The task and the training budget.
#[derive(Parser, Debug, Clone, Serialize)]
#[command(about = "Step-by-step distillation on multi-digit addition")]
pub struct Settings {
    /// Digits per operand.
    #[arg(long, default_value_t = 4)]
    pub digits: usize,
    /// Teacher training steps (fresh ground-truth traces every batch).
    #[arg(long, default_value_t = 1000)]
    pub teacher_steps: usize,
    /// Training steps of each student.
    #[arg(long, default_value_t = 1000)]
    pub student_steps: usize,
    /// Problems the students learn from (the teacher writes a trace for each).
    #[arg(long, default_value_t = 3000)]
    pub train_problems: usize,
    /// Held-out problems the students are scored on.
    #[arg(long, default_value_t = 1000)]
    pub test_problems: usize,
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Teacher width and depth.
    #[arg(long, default_value_t = 64)]
    pub teacher_width: usize,
    #[arg(long, default_value_t = 3)]
    pub teacher_layers: usize,
    /// Student width and depth.
    #[arg(long, default_value_t = 48)]
    pub student_width: usize,
    #[arg(long, default_value_t = 2)]
    pub student_layers: usize,
    /// Distillation temperature and soft weight of student (b).
    #[arg(long, default_value_t = 2.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    /// Learning rate (Adam).
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Seed of the problems, initialisations and data order.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write the results as JSON.
    #[arg(long)]
    #[serde(skip)]
    pub json: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

// ---------------------------------------------------------------------------------------------
// The task

/// A small deterministic random generator (splitmix64).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5851_F42D_4C95_7F2D)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// An addition problem `a + b`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Problem {
    pub a: u64,
    pub b: u64,
}

/// `n` problems with operands below `10^digits`, none of them in `avoid`; all distinct if
/// `distinct`.
pub fn problems(
    n: usize,
    digits: usize,
    rng: &mut Rng,
    avoid: &[Problem],
    distinct: bool,
) -> Vec<Problem> {
    let limit = 10u64.pow(digits as u32);
    let mut seen: std::collections::HashSet<(u64, u64)> =
        avoid.iter().map(|p| (p.a, p.b)).collect();
    assert!(
        n + seen.len() <= (limit * limit) as usize || !distinct,
        "{n} distinct problems asked of {} possible",
        limit * limit
    );
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let p = Problem {
            a: rng.below(limit),
            b: rng.below(limit),
        };
        let new = if distinct {
            seen.insert((p.a, p.b))
        } else {
            !seen.contains(&(p.a, p.b))
        };
        if new {
            out.push(p);
        }
    }
    out
}

/// The `width` decimal digits of `x`, most significant first.
fn digits_of(x: u64, width: usize) -> Vec<i64> {
    (0..width)
        .rev()
        .map(|i| ((x / 10u64.pow(i as u32)) % 10) as i64)
        .collect()
}

/// `a + b =` as tokens.
pub fn prompt(p: Problem, d: usize) -> Vec<i64> {
    let mut t = digits_of(p.a, d);
    t.push(PLUS);
    t.extend(digits_of(p.b, d));
    t.push(EQ);
    t
}

/// The answer's `d + 1` digits, most significant first, then the end.
pub fn answer(p: Problem, d: usize) -> Vec<i64> {
    let mut t = digits_of(p.a + p.b, d + 1);
    t.push(EOS);
    t
}

/// The worked trace: per digit from the least significant, the two operand digits, the sum
/// digit and the carry out (each token one simple step: a copy or a one-digit addition); then
/// `>` and the answer.
pub fn trace(p: Problem, d: usize) -> Vec<i64> {
    let (a, b) = (digits_of(p.a, d), digits_of(p.b, d));
    let mut carry = 0;
    let mut t = Vec::with_capacity(5 * d + 3);
    for i in (0..d).rev() {
        let s = a[i] + b[i] + carry;
        carry = s / 10;
        t.extend([a[i], b[i], s % 10, carry]);
    }
    t.push(THEN);
    t.extend(answer(p, d));
    t
}

/// The answer a generated continuation states: the `d + 1` digits after `>` (trace format) or
/// at the start (answer format); `None` if malformed.
pub fn stated_answer(continuation: &[i64], d: usize, traced: bool) -> Option<u64> {
    let start = if traced {
        continuation.iter().position(|&t| t == THEN)? + 1
    } else {
        0
    };
    let digits = continuation.get(start..start + d + 1)?;
    digits.iter().try_fold(0u64, |acc, &t| {
        (0..10).contains(&t).then(|| acc * 10 + t as u64)
    })
}

// ---------------------------------------------------------------------------------------------
// The model

/// A small causal transformer over tokens.
#[derive(Module, Debug)]
pub struct Seq {
    tokens: Embedding,
    positions: Embedding,
    encoder: TransformerEncoder,
    head: Linear,
}

impl Seq {
    pub fn new(width: usize, layers: usize, max_len: usize, device: &Device) -> Self {
        Self {
            tokens: EmbeddingConfig::new(VOCAB, width).init(device),
            positions: EmbeddingConfig::new(max_len, width).init(device),
            encoder: TransformerEncoderConfig::new(width, 4 * width, 4, layers)
                .with_dropout(0.0)
                .with_norm_first(true)
                .init(device),
            head: LinearConfig::new(width, VOCAB).init(device),
        }
    }

    /// `[B, L]` tokens → `[B, L, VOCAB]` next-token logits.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let [batch, len] = tokens.dims();
        let device = tokens.device();
        let positions = Tensor::<1, Int>::arange(0..len as i64, &device)
            .unsqueeze_dim::<2>(0)
            .expand([batch, len]);
        let x = self.tokens.forward(tokens) + self.positions.forward(positions);
        let mask = generate_autoregressive_mask(batch, len, &device);
        let h = self
            .encoder
            .forward(TransformerEncoderInput::new(x).mask_attn(mask));
        self.head.forward(h)
    }
}

/// Greedy continuations of the prompts, `steps` tokens each.
pub fn generate(model: &Seq, prompts: &[Vec<i64>], steps: usize) -> Vec<Vec<i64>> {
    let device = model.devices()[0].clone();
    let (n, p) = (prompts.len(), prompts[0].len());
    let mut tokens =
        Tensor::<2, Int>::from_data(TensorData::new(prompts.concat(), [n, p]), &device);
    for _ in 0..steps {
        let len = tokens.dims()[1];
        let last = model.forward(tokens.clone()).narrow(1, len - 1, 1);
        let next = last.argmax(2).reshape([n, 1]);
        tokens = Tensor::cat(vec![tokens, next], 1);
    }
    let all: Vec<i64> = tokens.into_data().try_into_vec_as::<i64>().unwrap();
    all.chunks(p + steps).map(|row| row[p..].to_vec()).collect()
}

// ---------------------------------------------------------------------------------------------
// Training

/// Token sequences (prompt + continuation) with next-token targets, the prompt masked.
#[derive(Clone, Debug)]
pub struct Examples {
    pub inputs: Vec<Vec<i64>>,
    pub targets: Vec<Vec<i64>>,
}

impl Examples {
    /// From full sequences whose first `prompt_len` tokens are the prompt. Targets after the
    /// first end token are ignored too.
    pub fn new(sequences: &[Vec<i64>], prompt_len: usize) -> Self {
        let mut inputs = Vec::with_capacity(sequences.len());
        let mut targets = Vec::with_capacity(sequences.len());
        for s in sequences {
            inputs.push(s[..s.len() - 1].to_vec());
            let mut ended = false;
            targets.push(
                s[1..]
                    .iter()
                    .enumerate()
                    .map(|(i, &t)| {
                        let keep = i + 1 >= prompt_len && !ended;
                        ended |= keep && t == EOS;
                        if keep { t } else { IGNORE }
                    })
                    .collect(),
            );
        }
        Self { inputs, targets }
    }

    /// Inputs `[B, L]`, targets `[B, L]` and the flat indices of the trained positions.
    fn batch(
        &self,
        rows: &[usize],
        device: &Device,
    ) -> (Tensor<2, Int>, Tensor<2, Int>, Tensor<1, Int>) {
        let len = self.inputs[0].len();
        let gather =
            |v: &[Vec<i64>]| -> Vec<i64> { rows.iter().flat_map(|&r| v[r].clone()).collect() };
        let (inputs, targets) = (gather(&self.inputs), gather(&self.targets));
        let kept: Vec<i64> = (0..targets.len() as i64)
            .filter(|&i| targets[i as usize] != IGNORE)
            .collect();
        let shape = [rows.len(), len];
        (
            Tensor::from_data(TensorData::new(inputs, shape), device),
            Tensor::from_data(TensorData::new(targets, shape), device),
            Tensor::from_data(TensorData::new(kept.clone(), [kept.len()]), device),
        )
    }
}

/// How a model is trained.
pub enum Objective<'a> {
    /// Cross-entropy on the targets.
    Hard,
    /// `DistillLoss::forward_seq` against the teacher's logits on the same sequences (the
    /// teacher on the device without autodiff: no graph).
    Distill {
        teacher: &'a Seq,
        temperature: f64,
        alpha: f64,
    },
}

fn bar(quiet: bool, len: u64, label: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len).with_message(label.to_string());
    bar.set_style(
        ProgressStyle::with_template("{msg:<34} {bar:30} {pos}/{len} {elapsed} loss {prefix}")
            .unwrap(),
    );
    bar
}

/// Trains `model` (on the device with autodiff) for `steps` batches; `next_rows` picks each
/// batch's rows of `data`.
pub fn train(
    mut model: Seq,
    data: &Examples,
    objective: Objective<'_>,
    (steps, settings): (usize, &Settings),
    mut next_rows: impl FnMut(usize) -> Vec<usize>,
    label: &str,
) -> (Seq, LossCurve) {
    let device = model.devices()[0].clone();
    let mut curve = LossCurve {
        label: label.to_string(),
        every: 50,
        values: Vec::new(),
    };
    let mut optim = AdamConfig::new().init();
    let bar = bar(settings.quiet, steps as u64, label);
    let ce = CrossEntropyLossConfig::new().init(&device);
    let distill = match objective {
        Objective::Distill {
            teacher,
            temperature,
            alpha,
        } => Some((
            teacher,
            DistillLossConfig::new()
                .with_temperature(temperature)
                .with_alpha(alpha)
                .with_ignore_index(Some(IGNORE))
                .init(),
        )),
        Objective::Hard => None,
    };
    for step in 0..steps {
        let (inputs, targets, kept) = data.batch(&next_rows(step), &device);
        let logits = model.forward(inputs.clone());
        let loss = match &distill {
            // Token-level distillation: the prompt positions carry the ignore index.
            Some((teacher, distill)) => {
                let teacher_logits = teacher.forward(inputs.inner()).autodiff();
                distill.forward_seq(logits, teacher_logits, targets)
            }
            // Cross-entropy on the trained positions only.
            None => {
                let [b, l, v] = logits.dims();
                ce.forward(
                    logits.reshape([b * l, v]).select(0, kept.clone()),
                    targets.reshape([b * l]).select(0, kept),
                )
            }
        };
        if step % curve.every == 0 || step + 1 == steps {
            let value = loss.clone().into_scalar::<f64>();
            curve.values.push(value);
            bar.set_prefix(format!("{value:.4}"));
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(settings.lr, model, grads);
        bar.inc(1);
    }
    bar.finish();
    (model, curve)
}

/// Training losses, logged every `every` steps and at the last step.
#[derive(Debug, Clone, Serialize)]
pub struct LossCurve {
    pub label: String,
    pub every: usize,
    pub values: Vec<f64>,
}

/// Exact-match answer accuracy of `model` on `problems`.
pub fn accuracy(model: &Seq, problems: &[Problem], d: usize, traced: bool) -> f64 {
    let steps = if traced { 5 * d + 3 } else { d + 2 };
    let mut correct = 0;
    for chunk in problems.chunks(500) {
        let prompts: Vec<Vec<i64>> = chunk.iter().map(|&p| prompt(p, d)).collect();
        for (p, out) in chunk.iter().zip(generate(model, &prompts, steps)) {
            if stated_answer(&out, d, traced) == Some(p.a + p.b) {
                correct += 1;
            }
        }
    }
    correct as f64 / problems.len() as f64
}

/// What the experiment measured.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub settings: Settings,
    /// Held-out answer accuracy of the teacher.
    pub teacher: f64,
    /// Share of the students' training problems the teacher's traces answer correctly.
    pub teacher_trace_accuracy: f64,
    /// (a) answers only, (b) teacher traces with distillation, (c) teacher traces, hard labels.
    pub answers_only: f64,
    pub traces_distilled: f64,
    pub traces_hard: f64,
    /// Training losses of the teacher and the three students.
    pub losses: Vec<LossCurve>,
    pub seconds: f64,
}

/// The whole experiment on `device` (with or without autodiff: the models train on
/// `device.autodiff()`, the frozen teacher and the evaluation run without).
pub fn run(settings: &Settings, device: &Device) -> Results {
    let start = Instant::now();
    let device = &device.clone().autodiff();
    let d = settings.digits;
    let prompt_len = 2 * d + 2;
    let max_len = prompt_len + 5 * d + 3;
    let mut rng = Rng::new(settings.seed);
    let test = problems(settings.test_problems, d, &mut rng, &[], true);
    let train_set = problems(settings.train_problems, d, &mut rng, &test, true);
    let full = |p: Problem, continuation: Vec<i64>| [prompt(p, d), continuation].concat();

    // 1. The teacher, on fresh ground-truth traces every batch (never the held-out problems).
    device.seed(settings.seed);
    let batch = settings.batch;
    let fresh = problems(settings.teacher_steps * batch, d, &mut rng, &test, false);
    let teacher_data = Examples::new(
        &fresh
            .iter()
            .map(|&p| full(p, trace(p, d)))
            .collect::<Vec<_>>(),
        prompt_len,
    );
    let (teacher, teacher_curve) = train(
        Seq::new(
            settings.teacher_width,
            settings.teacher_layers,
            max_len,
            device,
        ),
        &teacher_data,
        Objective::Hard,
        (settings.teacher_steps, settings),
        |step| (step * batch..(step + 1) * batch).collect(),
        "teacher (ground-truth traces)",
    );
    let teacher = teacher.valid();
    let teacher_accuracy = accuracy(&teacher, &test, d, true);

    // 2. The teacher writes the students' traces.
    let prompts: Vec<Vec<i64>> = train_set.iter().map(|&p| prompt(p, d)).collect();
    let written: Vec<Vec<i64>> = prompts
        .chunks(500)
        .flat_map(|c| generate(&teacher, c, 5 * d + 3))
        .collect();
    let trace_correct = train_set
        .iter()
        .zip(&written)
        .filter(|(p, w)| stated_answer(w, d, true) == Some(p.a + p.b))
        .count() as f64
        / train_set.len() as f64;
    let traces = Examples::new(
        &train_set
            .iter()
            .zip(written)
            .map(|(&p, w)| full(p, w))
            .collect::<Vec<_>>(),
        prompt_len,
    );
    let answers = Examples::new(
        &train_set
            .iter()
            .map(|&p| full(p, answer(p, d)))
            .collect::<Vec<_>>(),
        prompt_len,
    );

    // 3. Three students: one initialisation, one data order, one number of steps.
    device.seed(settings.seed + 1);
    let init = Seq::new(
        settings.student_width,
        settings.student_layers,
        max_len,
        device,
    );
    let n = train_set.len();
    let order = |seed: u64| {
        let mut rng = Rng::new(seed);
        move |_: usize| -> Vec<usize> {
            (0..settings.batch)
                .map(|_| rng.below(n as u64) as usize)
                .collect()
        }
    };
    let student = |data: &Examples, objective: Objective<'_>, label: &str| {
        train(
            init.clone(),
            data,
            objective,
            (settings.student_steps, settings),
            order(settings.seed + 7),
            label,
        )
    };
    let (a, a_curve) = student(&answers, Objective::Hard, "(a) answers only");
    let (b, b_curve) = student(
        &traces,
        Objective::Distill {
            teacher: &teacher,
            temperature: settings.temperature,
            alpha: settings.alpha,
        },
        "(b) teacher traces, distilled",
    );
    let (c, c_curve) = student(&traces, Objective::Hard, "(c) teacher traces, hard labels");

    Results {
        settings: settings.clone(),
        teacher: teacher_accuracy,
        teacher_trace_accuracy: trace_correct,
        answers_only: accuracy(&a.valid(), &test, d, false),
        traces_distilled: accuracy(&b.valid(), &test, d, true),
        traces_hard: accuracy(&c.valid(), &test, d, true),
        losses: vec![teacher_curve, a_curve, b_curve, c_curve],
        seconds: start.elapsed().as_secs_f64(),
    }
}

fn main() {
    let settings = Settings::parse();
    #[cfg(feature = "wgpu")]
    let device = Device::wgpu(Default::default());
    #[cfg(not(feature = "wgpu"))]
    let device = Device::flex();
    let r = run(&settings, &device);
    let d = settings.digits;
    println!(
        "\n{d}-digit addition, answer most-significant digit first; {} training problems, {} \
         held-out; students {}×{} (width × layers), {} steps each\n",
        settings.train_problems,
        settings.test_problems,
        settings.student_width,
        settings.student_layers,
        settings.student_steps
    );
    println!("| model | trained on | held-out answer accuracy |");
    println!("|---|---|---:|");
    println!(
        "| teacher {}×{} | ground-truth traces, {} steps | {:.1}% |",
        settings.teacher_width,
        settings.teacher_layers,
        settings.teacher_steps,
        100.0 * r.teacher
    );
    println!(
        "| student (a) | ground-truth answers only | {:.1}% |",
        100.0 * r.answers_only
    );
    println!(
        "| student (b) | teacher traces, DistillLoss (T = {}, α = {}) | {:.1}% |",
        settings.temperature,
        settings.alpha,
        100.0 * r.traces_distilled
    );
    println!(
        "| student (c) | teacher traces, hard labels only | {:.1}% |",
        100.0 * r.traces_hard
    );
    println!(
        "\nThe teacher's traces answered {:.1}% of the training problems correctly. {:.0} s.",
        100.0 * r.teacher_trace_accuracy,
        r.seconds
    );
    if let Some(path) = &settings.json {
        std::fs::write(path, serde_json::to_string_pretty(&r).unwrap()).unwrap();
        println!("wrote {}", path.display());
    }
}
