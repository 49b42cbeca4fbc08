//! Hinton et al.'s MNIST distillation experiment, as a library for `examples/mnist/main.rs` and
//! its pipeline test: a teacher MLP with dropout, then the same student trained twice from the
//! same initialisation, data order and optimiser: on hard labels, and with `DistillLoss`.
//!
//! burn 0.22: no backend generic. Every function takes a [`Device`]; the models train on its
//! autodiff form (`device.autodiff()`), the frozen teacher's logits and the test set live on the
//! device without autodiff (`device.inner()`), so they build no graph.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig, Relu};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_distill::DistillLossConfig;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// Images (`n × 784`, grey levels scaled to `[0, 1]`) and labels.
#[derive(Clone, Debug)]
pub struct Digits {
    pub images: Vec<f32>,
    pub labels: Vec<u8>,
}

impl Digits {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// The first `n` digits.
    pub fn take(&self, n: usize) -> Digits {
        let n = n.min(self.len());
        Digits {
            images: self.images[..n * 784].to_vec(),
            labels: self.labels[..n].to_vec(),
        }
    }

    fn range(&self, start: usize, end: usize) -> Digits {
        Digits {
            images: self.images[start * 784..end * 784].to_vec(),
            labels: self.labels[start..end].to_vec(),
        }
    }
}

/// The bundled 10,000 digits (`examples/data/mnist-10k`).
pub fn default_data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data/mnist-10k")
}

/// Reads a file, gunzipping it if its name ends in `.gz`.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, String> {
    let raw = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| format!("cannot gunzip {}: {e}", path.display()))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn be_u32(bytes: &[u8], at: usize) -> usize {
    u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize
}

/// Parses an IDX image file (magic 2051) and label file (magic 2049).
pub fn parse_idx(images: &[u8], labels: &[u8]) -> Result<Digits, String> {
    if images.len() < 16 || be_u32(images, 0) != 2051 {
        return Err("images: not an IDX3 file (magic 2051)".into());
    }
    if labels.len() < 8 || be_u32(labels, 0) != 2049 {
        return Err("labels: not an IDX1 file (magic 2049)".into());
    }
    let (n, rows, cols) = (be_u32(images, 4), be_u32(images, 8), be_u32(images, 12));
    if rows * cols != 784 {
        return Err(format!("images are {rows}×{cols}, expected 28×28"));
    }
    if be_u32(labels, 4) != n {
        return Err(format!("{n} images but {} labels", be_u32(labels, 4)));
    }
    if images.len() < 16 + n * 784 || labels.len() < 8 + n {
        return Err("IDX file shorter than its header says".into());
    }
    Ok(Digits {
        images: images[16..16 + n * 784]
            .iter()
            .map(|&p| p as f32 / 255.0)
            .collect(),
        labels: labels[8..8 + n].to_vec(),
    })
}

fn find(dir: &Path, stem: &str) -> Option<PathBuf> {
    [stem.to_string(), format!("{stem}.gz")]
        .into_iter()
        .map(|name| dir.join(name))
        .find(|p| p.exists())
}

/// Loads `(train, test)` from a directory holding either the full MNIST files
/// (`train-images-idx3-ubyte[.gz]`, `t10k-images-idx3-ubyte[.gz]` and their labels) or one
/// image/label pair (`images-idx3-ubyte[.gz]`, `labels-idx1-ubyte[.gz]`), split 80/20 in order
/// (8,000 / 2,000 for the bundled 10,000 digits).
pub fn load(dir: &Path) -> Result<(Digits, Digits), String> {
    let pair = |images: &str, labels: &str| -> Option<Result<Digits, String>> {
        let (i, l) = (find(dir, images)?, find(dir, labels)?);
        Some(read_maybe_gz(&i).and_then(|i| read_maybe_gz(&l).and_then(|l| parse_idx(&i, &l))))
    };
    if let (Some(train), Some(test)) = (
        pair("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        pair("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    ) {
        return Ok((train?, test?));
    }
    let all = pair("images-idx3-ubyte", "labels-idx1-ubyte").ok_or_else(|| {
        format!(
            "{}: no MNIST IDX files (expected images-idx3-ubyte[.gz] and labels-idx1-ubyte[.gz], \
             or the train-/t10k- files of the full MNIST)",
            dir.display()
        )
    })??;
    let split = all.len() * 4 / 5;
    Ok((all.range(0, split), all.range(split, all.len())))
}

/// An MLP: `784 → hidden… → 10`, ReLU, dropout on the input and after each hidden layer.
#[derive(Module, Debug)]
pub struct Mlp {
    layers: Vec<Linear>,
    input_dropout: Dropout,
    dropout: Dropout,
    act: Relu,
}

impl Mlp {
    pub fn new(hidden: &[usize], input_dropout: f64, dropout: f64, device: &Device) -> Self {
        let widths: Vec<usize> = std::iter::once(784)
            .chain(hidden.iter().copied())
            .chain([10])
            .collect();
        Self {
            layers: widths
                .windows(2)
                .map(|w| LinearConfig::new(w[0], w[1]).init(device))
                .collect(),
            input_dropout: DropoutConfig::new(input_dropout).init(),
            dropout: DropoutConfig::new(dropout).init(),
            act: Relu::new(),
        }
    }

    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let mut x = self.input_dropout.forward(x);
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x);
            if i < last {
                x = self.dropout.forward(self.act.forward(x));
            }
        }
        x
    }
}

/// Settings of one experiment.
#[derive(Clone, Debug)]
pub struct Settings {
    pub seeds: usize,
    /// The distillation temperature reported in the main table and JSON.
    pub temperature: f64,
    /// Extra temperatures for the sweep (the main one is always included).
    pub sweep: Vec<f64>,
    pub alpha: f64,
    pub teacher_hidden: Vec<usize>,
    pub teacher_epochs: usize,
    pub student_hidden: Vec<usize>,
    pub student_epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub progress: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            seeds: 3,
            temperature: 4.0,
            sweep: Vec::new(),
            alpha: 0.9,
            teacher_hidden: vec![1200, 1200],
            teacher_epochs: 15,
            student_hidden: vec![128],
            student_epochs: 40,
            batch_size: 128,
            learning_rate: 1e-3,
            progress: true,
        }
    }
}

/// Test errors of one temperature, per seed.
#[derive(Clone, Debug, Serialize)]
pub struct SweepPoint {
    pub temperature: f64,
    pub student_kd_test_errors: Vec<usize>,
}

/// The results, in the JSON layout of the example's `--json`.
#[derive(Clone, Debug, Serialize)]
pub struct Results {
    pub test_size: usize,
    pub train_size: usize,
    pub teacher_test_errors: Vec<usize>,
    pub student_hard_test_errors: Vec<usize>,
    pub student_kd_test_errors: Vec<usize>,
    pub temperature: f64,
    pub alpha: f64,
    pub student_hidden: Vec<usize>,
    pub teacher_hidden: Vec<usize>,
    pub sweep: Vec<SweepPoint>,
}

/// A seeded permutation stream (SplitMix64 + Fisher–Yates): the data order, which depends only
/// on the seed and the epoch, never on the loss.
fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<i64> {
    let mut state =
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut order: Vec<i64> = (0..n as i64).collect();
    for i in (1..n).rev() {
        order.swap(i, (next() % (i as u64 + 1)) as usize);
    }
    order
}

/// The data on a device.
struct DeviceData {
    images: Tensor<2>,
    labels: Tensor<1, Int>,
    len: usize,
}

impl DeviceData {
    fn new(d: &Digits, device: &Device) -> Self {
        Self {
            images: Tensor::from_data(TensorData::new(d.images.clone(), [d.len(), 784]), device),
            labels: Tensor::from_data(
                TensorData::new(
                    d.labels.iter().map(|&l| l as i64).collect::<Vec<_>>(),
                    [d.len()],
                ),
                device,
            ),
            len: d.len(),
        }
    }
}

/// What a training run minimises.
enum Objective<'a> {
    /// Cross-entropy on the hard labels.
    Hard,
    /// `DistillLoss` against precomputed teacher logits (on the device without autodiff: no
    /// graph).
    Distill {
        loss: burn_distill::DistillLoss,
        teacher_logits: &'a Tensor<2>,
    },
    /// `SparseDistillLoss` against the top-k teacher of an offline store, read by row.
    Store {
        loss: burn_distill::SparseDistillLoss,
        store: &'a burn_distill::store::TeacherStore,
    },
}

fn bar(settings: &Settings, len: u64, label: String) -> ProgressBar {
    if !settings.progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len).with_message(label);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:<28} {bar:30} {pos}/{len} batches {elapsed_precise} loss {prefix}",
        )
        .unwrap(),
    );
    bar
}

/// Trains `model` on `data` (both on the device with autodiff).
fn train(
    mut model: Mlp,
    data: &DeviceData,
    objective: Objective<'_>,
    epochs: usize,
    seed: u64,
    settings: &Settings,
    label: String,
) -> Mlp {
    let device = data.images.device();
    let mut optim = AdamConfig::new().init();
    let batches = data.len.div_ceil(settings.batch_size);
    let progress = bar(settings, (epochs * batches) as u64, label);
    let ce = CrossEntropyLossConfig::new().init(&device);
    for epoch in 0..epochs {
        let order = permutation(data.len, seed, epoch as u64);
        for chunk in order.chunks(settings.batch_size) {
            let idx = Tensor::<1, Int>::from_data(
                TensorData::new(chunk.to_vec(), [chunk.len()]),
                &device,
            );
            let x = data.images.clone().select(0, idx.clone());
            let y = data.labels.clone().select(0, idx.clone());
            let logits = model.forward(x);
            let loss = match &objective {
                Objective::Hard => ce.forward(logits, y),
                Objective::Distill {
                    loss,
                    teacher_logits,
                } => {
                    let teacher = (*teacher_logits).clone().select(0, idx.clone().inner());
                    loss.forward(logits, teacher.autodiff(), y)
                }
                Objective::Store { loss, store } => {
                    let rows: Vec<usize> = chunk.iter().map(|&r| r as usize).collect();
                    let teacher = store.gather(&rows, &device).expect("the store's rows");
                    loss.forward(logits, teacher, y)
                }
            };
            if progress.position().is_multiple_of(20) {
                progress.set_prefix(format!("{:.4}", loss.clone().into_scalar::<f64>()));
            }
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(settings.learning_rate, model, grads);
            progress.inc(1);
        }
    }
    progress.finish();
    model
}

/// Logits of a frozen model (`model.valid()`, on the device without autodiff), in batches.
fn logits(model: &Mlp, images: &Tensor<2>) -> Tensor<2> {
    let n = images.dims()[0];
    let parts: Vec<Tensor<2>> = (0..n)
        .step_by(1000)
        .map(|start| model.forward(images.clone().narrow(0, start, 1000.min(n - start))))
        .collect();
    Tensor::cat(parts, 0)
}

/// Test errors of a trained model; `test` is on the device without autodiff.
fn test_errors(model: &Mlp, test: &DeviceData) -> usize {
    let predictions = logits(&model.valid(), &test.images)
        .argmax(1)
        .squeeze_dim::<1>(1);
    let wrong = predictions.not_equal(test.labels.clone()).int().sum();
    wrong.into_scalar::<i64>() as usize
}

/// Runs the experiment on `device` (with or without autodiff: the models train on
/// `device.autodiff()`).
pub fn run(train_set: &Digits, test_set: &Digits, settings: &Settings, device: &Device) -> Results {
    let (plain, device) = (device.clone().inner(), &device.clone().autodiff());
    let data = DeviceData::new(train_set, device);
    let test = DeviceData::new(test_set, &plain);
    let mut temperatures = vec![settings.temperature];
    temperatures.extend(
        settings
            .sweep
            .iter()
            .filter(|&&t| t != settings.temperature),
    );
    let mut results = Results {
        test_size: test.len,
        train_size: data.len,
        teacher_test_errors: Vec::new(),
        student_hard_test_errors: Vec::new(),
        student_kd_test_errors: Vec::new(),
        temperature: settings.temperature,
        alpha: settings.alpha,
        student_hidden: settings.student_hidden.clone(),
        teacher_hidden: settings.teacher_hidden.clone(),
        sweep: temperatures
            .iter()
            .map(|&t| SweepPoint {
                temperature: t,
                student_kd_test_errors: Vec::new(),
            })
            .collect(),
    };
    for seed in 0..settings.seeds as u64 {
        device.seed(1000 + seed);
        let teacher = Mlp::new(&settings.teacher_hidden, 0.2, 0.5, device);
        let teacher = train(
            teacher,
            &data,
            Objective::Hard,
            settings.teacher_epochs,
            seed,
            settings,
            format!("seed {seed} teacher"),
        );
        results
            .teacher_test_errors
            .push(test_errors(&teacher, &test));
        // The frozen teacher's logits on the training set, computed once without a graph.
        let teacher_logits = logits(&teacher.valid(), &data.images.clone().inner());

        device.seed(2000 + seed);
        let init = Mlp::new(&settings.student_hidden, 0.0, 0.0, device);
        let hard = train(
            init.clone(),
            &data,
            Objective::Hard,
            settings.student_epochs,
            seed,
            settings,
            format!("seed {seed} student, hard"),
        );
        results
            .student_hard_test_errors
            .push(test_errors(&hard, &test));
        for point in &mut results.sweep {
            let loss = DistillLossConfig::new()
                .with_temperature(point.temperature)
                .with_alpha(settings.alpha)
                .init();
            let kd = train(
                init.clone(),
                &data,
                Objective::Distill {
                    loss,
                    teacher_logits: &teacher_logits,
                },
                settings.student_epochs,
                seed,
                settings,
                format!("seed {seed} student, KD T={}", point.temperature),
            );
            point.student_kd_test_errors.push(test_errors(&kd, &test));
        }
        results.student_kd_test_errors = results.sweep[0].student_kd_test_errors.clone();
    }
    results
}

/// Mean and (sample) standard deviation.
pub fn mean_std(values: &[usize]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<usize>() as f64 / n;
    let var = values
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

/// Trains a model on hard labels (cross-entropy), e.g. a teacher, on the device of its
/// parameters (with autodiff).
pub fn train_hard(
    model: Mlp,
    digits: &Digits,
    epochs: usize,
    seed: u64,
    settings: &Settings,
) -> Mlp {
    let device = model.devices()[0].clone().autodiff();
    let model = model.fork(&device);
    let data = DeviceData::new(digits, &device);
    train(
        model,
        &data,
        Objective::Hard,
        epochs,
        seed,
        settings,
        "teacher".into(),
    )
}

/// A teacher trained on hard labels, its test errors, and its logits on `digits` (on the
/// device without autodiff, no graph), for writing an offline store.
pub fn teacher_logits(
    digits: &Digits,
    test_set: &Digits,
    seed: u64,
    settings: &Settings,
    device: &Device,
) -> (usize, Tensor<2>) {
    let (plain, device) = (device.clone().inner(), &device.clone().autodiff());
    let data = DeviceData::new(digits, device);
    let test = DeviceData::new(test_set, &plain);
    device.seed(1000 + seed);
    let teacher = Mlp::new(&settings.teacher_hidden, 0.2, 0.5, device);
    let teacher = train(
        teacher,
        &data,
        Objective::Hard,
        settings.teacher_epochs,
        seed,
        settings,
        "teacher".into(),
    );
    let errors = test_errors(&teacher, &test);
    (
        errors,
        logits(&teacher.valid(), &data.images.clone().inner()),
    )
}

/// What a student is trained against in [`student_errors`].
pub enum Teacher<'a> {
    /// Hard labels only.
    HardLabels,
    /// The dense teacher's logits (on the device without autodiff).
    Dense(burn_distill::DistillLoss, &'a Tensor<2>),
    /// The offline store alone.
    Store(
        burn_distill::SparseDistillLoss,
        &'a burn_distill::store::TeacherStore,
    ),
}

/// Test errors of a student trained from the same initialisation and data order (per `seed`)
/// against `teacher`.
pub fn student_errors(
    digits: &Digits,
    test_set: &Digits,
    teacher: Teacher<'_>,
    seed: u64,
    settings: &Settings,
    device: &Device,
) -> usize {
    let (plain, device) = (device.clone().inner(), &device.clone().autodiff());
    let data = DeviceData::new(digits, device);
    let test = DeviceData::new(test_set, &plain);
    device.seed(2000 + seed);
    let init = Mlp::new(&settings.student_hidden, 0.0, 0.0, device);
    let (objective, label) = match teacher {
        Teacher::HardLabels => (Objective::Hard, "student, hard"),
        Teacher::Dense(loss, teacher_logits) => (
            Objective::Distill {
                loss,
                teacher_logits,
            },
            "student, dense teacher",
        ),
        Teacher::Store(loss, store) => (Objective::Store { loss, store }, "student, store"),
    };
    let model = train(
        init,
        &data,
        objective,
        settings.student_epochs,
        seed,
        settings,
        label.into(),
    );
    test_errors(&model, &test)
}
