//! Training the teacher and the students, and measuring them.
//!
//! burn 0.22: no backend generic. The teacher and the students train on a device with autodiff
//! (the one the caller initialised the teacher on); evaluation, sampling, the store's teacher
//! and the API teacher of `sampled_token` run on `model.valid()`, on that device without
//! autodiff.

use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::activation;
use burn_distill::cross::{
    CrossTokenizerLossConfig, MergeStrategy, SpanAlignment, TokenRows, VocabMatch,
};
use burn_distill::onpolicy::{SampledTokenLossConfig, SampledTokens, token_log_probs};
use burn_distill::store::{TeacherStore, TeacherStoreConfig, TeacherStoreWriter};
use burn_distill::{DistillLossConfig, Divergence, SparseDistillLossConfig};

use crate::data::Tok;
use crate::model::{Lm, LmConfig};

const IGNORE: i64 = -100;

/// SplitMix64: the example's only randomness (data order, sampling), seeded.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What every run shares.
#[derive(Clone, Debug)]
pub struct Settings {
    pub context: usize,
    pub batch: usize,
    pub teacher: LmConfig,
    pub teacher_steps: usize,
    pub teacher_lr: f64,
    pub student: LmConfig,
    pub student_steps: usize,
    pub student_lr: f64,
    pub temperature: f64,
    pub alpha: f64,
    pub top_k: usize,
    pub onpolicy_batch: usize,
    pub prompt: usize,
    pub generate: usize,
    pub eval_every: usize,
    pub valid_bytes: usize,
    pub test_bytes: usize,
    pub samples: usize,
}

/// Random windows of `context + 1` tokens of a token stream, in a seeded order.
pub struct Windows<'a> {
    stream: &'a [u32],
    context: usize,
    rng: Rng,
}

impl<'a> Windows<'a> {
    pub fn new(stream: &'a [u32], context: usize, seed: u64) -> Self {
        Windows {
            stream,
            context,
            rng: Rng::new(seed),
        }
    }
    /// `batch` windows as rows of `context + 1` tokens.
    pub fn next(&mut self, batch: usize) -> Vec<Vec<u32>> {
        (0..batch)
            .map(|_| {
                let at = self.rng.below(self.stream.len() - self.context - 1);
                self.stream[at..at + self.context + 1].to_vec()
            })
            .collect()
    }
}

pub fn ints2(rows: &[Vec<i64>], device: &Device) -> Tensor<2, Int> {
    let (b, t) = (rows.len(), rows[0].len());
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(flat, [b, t]), device)
}

/// Inputs `w[..T]` and targets `w[1..]` of windows.
pub fn split(windows: &[Vec<u32>]) -> (Vec<Vec<i64>>, Vec<Vec<i64>>) {
    let t = windows[0].len() - 1;
    windows
        .iter()
        .map(|w| {
            (
                w[..t].iter().map(|&x| x as i64).collect(),
                w[1..].iter().map(|&x| x as i64).collect(),
            )
        })
        .unzip()
}

/// Linear warm-up over the first 10% of the steps, then cosine to 10% of `lr`.
fn lr_at(step: usize, steps: usize, lr: f64) -> f64 {
    let warm = (steps / 10).max(1);
    if step < warm {
        return lr * (step + 1) as f64 / warm as f64;
    }
    let p = (step - warm) as f64 / (steps - warm).max(1) as f64;
    lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
}

/// Adam over `steps` steps of `loss(model, step)` (`model` on a device with autodiff);
/// validation bits per byte every `eval_every` steps (and at the end) through `eval`, given
/// `model.valid()`.
pub fn fit(
    mut model: Lm,
    steps: usize,
    lr: f64,
    eval_every: usize,
    mut loss: impl FnMut(&Lm, usize) -> Tensor<1>,
    mut eval: impl FnMut(&Lm) -> f64,
    progress: &indicatif::ProgressBar,
) -> (Lm, Vec<(usize, f64)>) {
    let mut optim = AdamConfig::new().init();
    let mut curve = Vec::new();
    for step in 0..steps {
        if step % eval_every == 0 {
            curve.push((step, eval(&model.valid())));
        }
        let value = loss(&model, step);
        let grads = GradientsParams::from_grads(value.backward(), &model);
        model = optim.step(lr_at(step, steps, lr), model, grads);
        progress.inc(1);
    }
    curve.push((steps, eval(&model.valid())));
    (model, curve)
}

/// Held-out bits per byte of `text` (its first `max_bytes` bytes, cut at a char boundary):
/// windows of `context + 1` tokens overlapping by one, every token after the first predicted
/// once; `−Σ log₂ p(token) / Σ bytes(token)` over the predicted tokens. `model`: without
/// autodiff (`model.valid()`).
pub fn bits_per_byte(model: &Lm, tok: &Tok, text: &str, max_bytes: usize, context: usize) -> f64 {
    let mut end = max_bytes.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let ids = tok.encode(&text[..end]);
    let device = model.device();
    let (mut nats, mut bytes) = (0.0, 0usize);
    let windows: Vec<Vec<u32>> = ids
        .windows(context + 1)
        .step_by(context)
        .map(|w| w.to_vec())
        .collect();
    for chunk in windows.chunks(16) {
        let (inputs, targets) = split(chunk);
        let logits = model.logits(ints2(&inputs, &device));
        let n = chunk.len() * context;
        let flat: Vec<i64> = targets.iter().flatten().copied().collect();
        let lp = token_log_probs(
            logits,
            Tensor::from_data(TensorData::new(flat.clone(), [n]), &device),
        );
        nats -= lp.sum().into_scalar::<f64>();
        bytes += flat.iter().map(|&t| tok.bytes(t as u32)).sum::<usize>();
    }
    nats / std::f64::consts::LN_2 / bytes.max(1) as f64
}

/// `new` tokens sampled at temperature 1 after each prompt (`[b, p]`), by `model` without
/// autodiff (`model.valid()`).
pub fn sample(
    model: &Lm,
    prompts: &[Vec<u32>],
    new: usize,
    context: usize,
    rng: &mut Rng,
) -> Vec<Vec<u32>> {
    let device = model.device();
    let mut seqs: Vec<Vec<u32>> = prompts.to_vec();
    for _ in 0..new {
        let rows: Vec<Vec<i64>> = seqs
            .iter()
            .map(|s| {
                s[s.len().saturating_sub(context)..]
                    .iter()
                    .map(|&x| x as i64)
                    .collect()
            })
            .collect();
        let t = rows[0].len();
        let logits = model.logits(ints2(&rows, &device));
        let v = logits.dims()[1];
        let last = logits
            .reshape([rows.len(), t, v])
            .slice([0..rows.len(), t - 1..t, 0..v])
            .reshape([rows.len(), v]);
        let p: Vec<f32> = activation::softmax(last, 1)
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap();
        for (i, s) in seqs.iter_mut().enumerate() {
            let row = &p[i * v..(i + 1) * v];
            let mut u = rng.unit() as f32;
            let mut pick = v - 1;
            for (j, &q) in row.iter().enumerate() {
                u -= q;
                if u <= 0.0 {
                    pick = j;
                    break;
                }
            }
            s.push(pick as u32);
        }
    }
    seqs
}

/// Teacher-scored bits per byte of continuations (text) after prompts (text): the teacher
/// reads `prompt ++ continuation` (tokenized piece by piece), and only the continuation's
/// tokens count. `teacher`: without autodiff (`teacher.valid()`).
pub fn teacher_bpb(teacher: &Lm, tok: &Tok, pairs: &[(String, String)], context: usize) -> f64 {
    let device = teacher.device();
    let (mut nats, mut bytes) = (0.0, 0usize);
    for (prompt, cont) in pairs {
        let (c, u) = (tok.encode(prompt), tok.encode(cont));
        if u.is_empty() {
            continue;
        }
        let mut seq: Vec<u32> = c.iter().chain(&u).copied().collect();
        let keep = seq.len().min(context + 1);
        seq.drain(..seq.len() - keep);
        let counted = u.len().min(keep - 1);
        let (inputs, targets) = split(&[seq]);
        let logits = teacher.logits(ints2(&inputs, &device));
        let n = targets[0].len();
        let mut t = targets[0].clone();
        for x in t.iter_mut().take(n - counted) {
            *x = IGNORE;
        }
        let lp = token_log_probs(logits, Tensor::from_data(TensorData::new(t, [n]), &device));
        nats -= lp.sum().into_scalar::<f64>();
        bytes += u[u.len() - counted..]
            .iter()
            .map(|&x| tok.bytes(x))
            .sum::<usize>();
    }
    nats / std::f64::consts::LN_2 / bytes.max(1) as f64
}

/// The students of the comparison.
pub const STUDENTS: [&str; 7] = [
    "hard",
    "dense",
    "store",
    "on_policy",
    "sampled_token",
    "cross_tokenizer",
    "cross_tokenizer_hard",
];

/// One student's results.
pub struct StudentRun {
    pub test_bpb: f64,
    pub sample_bpb: f64,
    pub seconds: f64,
    pub curve: Vec<(usize, f64)>,
    pub sample_text: String,
}

pub struct World<'a> {
    pub s: &'a Settings,
    /// The trained teacher, on the device with autodiff that the students train on.
    pub teacher: &'a Lm,
    pub tok: &'a Tok,
    pub tok_small: &'a Tok,
    pub stream: &'a [u32],
    pub stream_small: &'a [u32],
    pub valid: &'a str,
    pub test: &'a str,
    pub prompts: &'a [String],
    pub store_path: std::path::PathBuf,
}

/// Trains student `name` from the seed's initialisation on the seed's data order, on the
/// teacher's device (with autodiff).
pub fn student(w: &World, name: &str, seed: u64, progress: &indicatif::ProgressBar) -> StudentRun {
    let s = w.s;
    let device = w.teacher.device().autodiff();
    let plain = device.clone().inner();
    let cross = name.starts_with("cross");
    let tok = if cross { w.tok_small } else { w.tok };
    let stream = if cross { w.stream_small } else { w.stream };
    let config = LmConfig {
        vocab: tok.vocab(),
        ..s.student.clone()
    };
    device.seed(seed);
    let model = config.init(&device);
    let teacher = w.teacher.clone().no_grad();
    let teacher_i = w.teacher.valid();
    let mut windows = Windows::new(stream, s.context, seed);
    let mut rng = Rng::new(seed + 17);
    let ce = CrossEntropyLossConfig::new().init(&device);
    let flat = |rows: &[Vec<i64>]| {
        let n = rows.len() * rows[0].len();
        Tensor::<1, Int>::from_data(
            TensorData::new(rows.iter().flatten().copied().collect::<Vec<_>>(), [n]),
            &device,
        )
    };
    let kd = DistillLossConfig::new()
        .with_temperature(s.temperature)
        .with_alpha(s.alpha)
        .init();
    let gkd = DistillLossConfig::new()
        .with_alpha(1.0)
        .with_divergence(Divergence::Jsd { beta: 0.5 })
        .with_scale_by_t2(false)
        .init();
    let sampled_loss = SampledTokenLossConfig::new().init();
    let sparse = SparseDistillLossConfig::new(
        DistillLossConfig::new()
            .with_temperature(s.temperature)
            .with_alpha(s.alpha),
    )
    .init();
    let cross_loss = CrossTokenizerLossConfig::new()
        .with_crossentropy_weight(1.0)
        .init();
    let vocab_match =
        VocabMatch::new(w.tok_small.strings(), w.tok.strings()).expect("common tokens");
    let store = (name == "store").then(|| write_store(w, seed));
    let batch_rows = s.batch * s.context;
    let start = Instant::now();
    // On-policy students: every other step on the student's own samples (GKD's λ = 0.5).
    let on_policy_step = |step: usize| step % 2 == 1;
    let loss = |model: &Lm, step: usize| -> Tensor<1> {
        let batch = windows.next(s.batch);
        let (inputs, targets) = split(&batch);
        let x = ints2(&inputs, &device);
        let y = flat(&targets);
        match name {
            "hard" | "cross_tokenizer_hard" => ce.forward(model.logits(x), y),
            "dense" => kd.forward_linear(
                model.hidden(x.clone()),
                &model.head,
                teacher.hidden(x),
                &teacher.head,
                y,
            ),
            "dense_materialised" => kd.forward(model.logits(x.clone()), teacher.logits(x), y),
            "store" => {
                let st = store.as_ref().unwrap();
                let t = st
                    .batch(step * batch_rows..(step + 1) * batch_rows, &device)
                    .expect("store rows");
                sparse.forward(model.logits(x), t, y)
            }
            "on_policy" | "sampled_token" if on_policy_step(step) => {
                let prompts: Vec<Vec<u32>> = batch[..s.onpolicy_batch]
                    .iter()
                    .map(|w| w[..s.prompt].to_vec())
                    .collect();
                let seqs = sample(&model.valid(), &prompts, s.generate, s.context, &mut rng);
                let (inp, mut tgt) = split(&seqs);
                let completion: Vec<Vec<bool>> = tgt
                    .iter()
                    .map(|r| (0..r.len()).map(|t| t + 1 >= s.prompt).collect())
                    .collect();
                let x = ints2(&inp, &device);
                if name == "on_policy" {
                    for (r, m) in tgt.iter_mut().zip(&completion) {
                        for (t, keep) in r.iter_mut().zip(m) {
                            if !keep {
                                *t = IGNORE;
                            }
                        }
                    }
                    gkd.forward(model.logits(x.clone()), teacher.logits(x), flat(&tgt))
                } else {
                    // The API teacher: one log-probability per sampled token.
                    let xi = ints2(&inp, &plain);
                    let n = tgt.len() * tgt[0].len();
                    let ti: Vec<i64> = tgt.iter().flatten().copied().collect();
                    let lp_t = token_log_probs(
                        teacher_i.logits(xi),
                        Tensor::from_data(TensorData::new(ti, [n]), &plain),
                    );
                    let [b, t] = [tgt.len(), tgt[0].len()];
                    let mask = Tensor::<2, Bool>::from_data(
                        TensorData::new(
                            completion.into_iter().flatten().collect::<Vec<bool>>(),
                            [b, t],
                        ),
                        &device,
                    );
                    let sampled = SampledTokens {
                        tokens: ints2(&tgt, &device),
                        teacher_log_probs: lp_t.reshape([b, t]).autodiff(),
                        mask,
                        sampler_log_probs: None,
                    };
                    sampled_loss
                        .try_forward_rows(model.logits(x), sampled)
                        .expect("valid samples")
                        .loss
                }
            }
            "on_policy" => gkd.forward(model.logits(x.clone()), teacher.logits(x), y),
            "sampled_token" => ce.forward(model.logits(x), y),
            "cross_tokenizer" => cross_step(
                w,
                model,
                &teacher,
                &batch,
                &cross_loss,
                &vocab_match,
                &device,
            ),
            other => panic!("unknown student {other}"),
        }
    };
    let eval = |m: &Lm| bits_per_byte(m, tok, w.valid, s.valid_bytes, s.context);
    let (model, curve) = fit(
        model,
        s.student_steps,
        s.student_lr,
        s.eval_every,
        loss,
        eval,
        progress,
    );
    let seconds = start.elapsed().as_secs_f64();
    let model = model.valid();
    let test_bpb = bits_per_byte(&model, tok, w.test, s.test_bytes, s.context);
    let (sample_bpb, sample_text) = sample_score(w, &model, tok, seed);
    StudentRun {
        test_bpb,
        sample_bpb,
        seconds,
        curve,
        sample_text,
    }
}

/// Teacher-scored bits per byte of the model's continuations of the test prompts, and the
/// first continuation. `model`: without autodiff (`model.valid()`).
pub fn sample_score(w: &World, model: &Lm, tok: &Tok, seed: u64) -> (f64, String) {
    let s = w.s;
    let mut rng = Rng::new(seed + 99);
    let prompts: Vec<Vec<u32>> = w.prompts.iter().map(|p| tok.encode(p)).collect();
    let mut pairs = Vec::new();
    for p in &prompts {
        let out = sample(
            model,
            std::slice::from_ref(p),
            s.generate * 2,
            s.context,
            &mut rng,
        );
        let cont = tok.decode(&out[0][p.len()..]);
        pairs.push((tok.decode(p), cont));
    }
    let bpb = teacher_bpb(&w.teacher.valid(), w.tok, &pairs, s.context);
    (bpb, pairs[0].1.clone())
}

/// The cross-tokenizer step: the student's windows are re-tokenized for the teacher (the
/// first token as context, the rest piece by piece), both sides' rows aligned on byte spans,
/// and the hybrid loss (matched vocabulary by JSD, the rest by sorted L1) plus the student's
/// cross-entropy.
fn cross_step(
    w: &World,
    model: &Lm,
    teacher: &Lm,
    batch: &[Vec<u32>],
    loss: &burn_distill::cross::CrossTokenizerLoss,
    vocab: &VocabMatch,
    device: &Device,
) -> Tensor<1> {
    let (inputs, targets) = split(batch);
    let t = inputs[0].len();
    let student_logits = model.logits(ints2(&inputs, device));
    // Teacher tokens per window: context c (from the first student token) and continuation u.
    let mut t_inputs = Vec::new();
    let mut pieces = Vec::new();
    for win in batch {
        let head = w.tok_small.decode(&win[..1]);
        let rest = w.tok_small.decode(&win[1..]);
        let (c, u) = (w.tok.encode(&head), w.tok.encode(&rest));
        let seq: Vec<i64> = c.iter().chain(&u).map(|&x| x as i64).collect();
        let seq = seq[..seq.len() - 1].to_vec();
        pieces.push((c.len(), u, rest));
        t_inputs.push(seq);
    }
    let lt = t_inputs
        .iter()
        .map(Vec::len)
        .max()
        .unwrap()
        .min(w.s.context);
    let padded: Vec<Vec<i64>> = t_inputs
        .iter()
        .map(|s| {
            s.iter()
                .copied()
                .chain(std::iter::repeat(0))
                .take(lt)
                .collect()
        })
        .collect();
    let teacher_logits = teacher.logits(ints2(&padded, device));
    let (mut rows, mut t_tokens, mut spans) = (Vec::new(), Vec::new(), Vec::new());
    let (mut s_rows, mut s_tokens) = (Vec::new(), Vec::new());
    for (i, ((p, u, rest), tgt)) in pieces.iter().zip(&targets).enumerate() {
        // The teacher must see every continuation token within its context.
        let ids: Vec<u32> = tgt.iter().map(|&x| x as u32).collect();
        if p + u.len() - 1 > lt
            || rest.len() != ids.iter().map(|&x| w.tok_small.bytes(x)).sum::<usize>()
        {
            continue;
        }
        for (j, &token) in u.iter().enumerate() {
            rows.push((i * lt + p - 1 + j) as i64);
            t_tokens.push(token as i64);
        }
        for (r, &token) in tgt.iter().enumerate().take(t) {
            s_rows.push((i * t + r) as i64);
            s_tokens.push(token);
        }
        spans.push((w.tok_small.spans(&ids), w.tok.spans(u)));
    }
    if spans.is_empty() {
        let n = batch.len() * t;
        let y = targets.into_iter().flatten().collect::<Vec<_>>();
        return CrossEntropyLossConfig::new().init(device).forward(
            student_logits,
            Tensor::from_data(TensorData::new(y, [n]), device),
        );
    }
    let seqs: Vec<_> = spans
        .iter()
        .map(|(a, b)| (a.as_slice(), b.as_slice()))
        .collect();
    let alignment =
        SpanAlignment::new(MergeStrategy::Observed, &seqs).expect("spans tile the text");
    let idx = |v: Vec<i64>| {
        let n = v.len();
        Tensor::<1, Int>::from_data(TensorData::new(v, [n]), device)
    };
    let student = TokenRows {
        logits: student_logits.select(0, idx(s_rows)),
        tokens: idx(s_tokens),
    };
    let teacher = TokenRows {
        logits: teacher_logits.select(0, idx(rows)),
        tokens: idx(t_tokens),
    };
    // The loss carries the student's cross-entropy on the same tokens (weight 1).
    loss.try_forward_parts(student, teacher, &alignment, Some(vocab))
        .expect("valid cross-tokenizer input")
        .loss
}

/// Writes the teacher's top-k for every row of the store student's data order, once per seed.
fn write_store(w: &World, seed: u64) -> TeacherStore {
    let s = w.s;
    let path = w
        .store_path
        .join(format!("teacher_top{}_seed{seed}.bdts", s.top_k));
    let teacher = w.teacher.valid();
    let device = teacher.device();
    let mut windows = Windows::new(w.stream, s.context, seed);
    let mut writer =
        TeacherStoreWriter::create(&path, TeacherStoreConfig::new(w.tok.vocab(), s.top_k))
            .expect("store");
    for _ in 0..s.student_steps {
        let (inputs, _) = split(&windows.next(s.batch));
        writer
            .append_logits(teacher.logits(ints2(&inputs, &device)))
            .expect("append");
    }
    writer.finish().expect("finish");
    TeacherStore::open(&path).expect("open store")
}

/// Trains (or loads from `cache`, a burnpack file) the teacher on `device` with autodiff.
pub fn teacher(
    s: &Settings,
    tok: &Tok,
    stream: &[u32],
    valid: &str,
    cache: &std::path::Path,
    device: &Device,
    progress: &indicatif::ProgressBar,
) -> (Lm, Vec<(usize, f64)>) {
    let device = device.clone().autodiff();
    let config = LmConfig {
        vocab: tok.vocab(),
        ..s.teacher.clone()
    };
    let model = config.init(&device);
    if let Ok(model) = model.clone().try_load_file(cache) {
        progress.inc(s.teacher_steps as u64);
        return (model, Vec::new());
    }
    device.seed(7);
    let model = config.init(&device);
    let mut windows = Windows::new(stream, s.context, 7);
    let ce = CrossEntropyLossConfig::new().init(&device);
    let loss = |m: &Lm, _| {
        let (inputs, targets) = split(&windows.next(s.batch));
        let n = targets.len() * targets[0].len();
        let y = Tensor::from_data(
            TensorData::new(targets.into_iter().flatten().collect::<Vec<_>>(), [n]),
            &device,
        );
        ce.forward(m.logits(ints2(&inputs, &device)), y)
    };
    let eval = |m: &Lm| bits_per_byte(m, tok, valid, s.valid_bytes, s.context);
    let (model, curve) = fit(
        model,
        s.teacher_steps,
        s.teacher_lr,
        s.eval_every * 2,
        loss,
        eval,
        progress,
    );
    if let Some(dir) = cache.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    model.clone().save_file(cache).expect("save the teacher");
    (model, curve)
}
