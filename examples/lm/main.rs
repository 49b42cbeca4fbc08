//! Distils a language model on real text, end to end, with every recipe of the crate:
//! a decoder-only transformer teacher trained here on the King James Bible (or `--data FILE`),
//! and students several times smaller, each from the same initialisation, data order and
//! number of steps, differing only in the loss:
//!
//! - `hard`: cross-entropy on the next token;
//! - `dense`: `DistillLoss::forward_linear` from both models' hidden states and heads (never the
//!   `[N, V]` logits), forward KL at `T` with `α`;
//! - `store`: the teacher's top-k written once to a `TeacherStore`, the student distilled from
//!   the store alone (`SparseDistillLoss`);
//! - `on_policy`: every other step the student continues training prompts, the teacher scores
//!   the samples, JSD(0.5) on the student's own tokens (TRL GKD, λ = 0.5); data steps use the
//!   same loss on the data;
//! - `sampled_token`: on-policy with a teacher that returns only the log-probability of each
//!   sampled token (`SampledTokenLoss`, k1), data steps on cross-entropy;
//! - `cross_tokenizer`: a student with its own, smaller tokenizer, distilled across tokenizers
//!   (GOLD's hybrid loss on byte-aligned spans, plus its cross-entropy), beside
//!   `cross_tokenizer_hard`, the same student on cross-entropy alone.
//!
//! ```text
//! cargo run --release --example lm -- --quick            # ≤ 10 minutes on 2 cores
//! cargo run --release --example lm -- --seeds 3 --json target/lm.json --plot target/lm.svg
//! cargo run --release --features wgpu --example lm -- --quick --device wgpu
//! ```
//!
//! Metrics: held-out bits per byte on the test split (tokenizer-independent), teacher-scored
//! bits per byte of each student's samples after test prompts, wall time, and the loss step's
//! peak memory (`forward_linear` against materialised logits; host heap, so meaningful on the
//! CPU device only).
//!
//! burn 0.22: on Flex by default (0.1: NdArray), on wgpu with `--features wgpu --device wgpu`.

mod data;
mod model;
mod train;

#[path = "../../benches/measure.rs"]
mod measure;

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::prelude::*;
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use model::LmConfig;
use train::{STUDENTS, Settings, World};

/// Where the models train.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DeviceChoice {
    /// burn's Flex CPU backend.
    Flex,
    /// wgpu (needs `--features wgpu`).
    Wgpu,
}

impl DeviceChoice {
    fn device(self) -> Device {
        match self {
            #[cfg(feature = "flex")]
            DeviceChoice::Flex => Device::flex(),
            #[cfg(not(feature = "flex"))]
            DeviceChoice::Flex => {
                eprintln!("--device flex needs a build with the `flex` feature (the default)");
                std::process::exit(2)
            }
            #[cfg(feature = "wgpu")]
            DeviceChoice::Wgpu => Device::wgpu(Default::default()),
            #[cfg(not(feature = "wgpu"))]
            DeviceChoice::Wgpu => {
                eprintln!("--device wgpu needs a build with `--features wgpu`");
                std::process::exit(2)
            }
        }
    }
}

#[derive(Parser, Debug)]
#[command(about = "Distil a language model on real text with every recipe of burn-distill")]
struct Args {
    /// Seeds (each: every student from the same initialisation and data order); default 3, 1
    /// with `--quick`.
    #[arg(long)]
    seeds: Option<u64>,
    /// A UTF-8 text instead of the bundled King James Bible (blocks separated by empty lines).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the validation curves as SVG.
    #[arg(long, default_value = "target/lm_distill.svg")]
    plot: PathBuf,
    /// Students to train (default: all).
    #[arg(long, value_delimiter = ',')]
    students: Option<Vec<String>>,
    /// Teacher training steps.
    #[arg(long, default_value_t = 1500)]
    teacher_steps: usize,
    /// Student training steps.
    #[arg(long, default_value_t = 600)]
    student_steps: usize,
    /// Teacher width and layers.
    #[arg(long, default_value_t = 192)]
    teacher_width: usize,
    #[arg(long, default_value_t = 4)]
    teacher_layers: usize,
    /// Student width and layers.
    #[arg(long, default_value_t = 64)]
    student_width: usize,
    #[arg(long, default_value_t = 2)]
    student_layers: usize,
    /// Tokens per window.
    #[arg(long, default_value_t = 64)]
    context: usize,
    /// The teacher's (and same-tokenizer students') vocabulary, and the cross-tokenizer
    /// student's.
    #[arg(long, default_value_t = 4096)]
    vocab: usize,
    #[arg(long, default_value_t = 1024)]
    small_vocab: usize,
    /// A configuration that finishes in about 10 minutes on 2 cores (one seed).
    #[arg(long)]
    quick: bool,
    /// Where the teacher is cached (keyed by its configuration).
    #[arg(long, default_value = "target/lm_cache")]
    cache: PathBuf,
    /// The device the models train on.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Flex)]
    device: DeviceChoice,
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len().max(2) - 1) as f64;
    (m, var.sqrt())
}

fn main() {
    let mut args = Args::parse();
    if args.quick {
        args.seeds.get_or_insert(1);
        args.teacher_steps = args.teacher_steps.min(300);
        args.student_steps = args.student_steps.min(120);
        args.teacher_width = args.teacher_width.min(128);
        args.teacher_layers = args.teacher_layers.min(3);
    }
    let seeds = args.seeds.unwrap_or(3);
    let s = Settings {
        context: args.context,
        batch: 16,
        teacher: LmConfig::new(
            args.vocab,
            args.teacher_width,
            args.teacher_layers,
            4,
            args.context,
        ),
        teacher_steps: args.teacher_steps,
        teacher_lr: 3e-3,
        student: LmConfig::new(
            args.vocab,
            args.student_width,
            args.student_layers,
            4,
            args.context,
        ),
        student_steps: args.student_steps,
        student_lr: 3e-3,
        temperature: 1.0,
        alpha: 0.5,
        top_k: 32,
        onpolicy_batch: 8,
        prompt: args.context / 2,
        generate: if args.quick {
            args.context / 4
        } else {
            args.context / 2
        },
        eval_every: (args.student_steps / if args.quick { 4 } else { 10 }).max(1),
        valid_bytes: if args.quick { 15_000 } else { 60_000 },
        test_bytes: if args.quick { 40_000 } else { 400_000 },
        samples: if args.quick { 4 } else { 8 },
    };
    let students: Vec<String> = args
        .students
        .clone()
        .unwrap_or_else(|| STUDENTS.iter().map(|s| s.to_string()).collect());
    for name in &students {
        assert!(
            STUDENTS.contains(&name.as_str()),
            "unknown student {name}; known: {STUDENTS:?}"
        );
    }

    let device = args.device.device();
    let started = std::time::Instant::now();
    let corpus = data::corpus(args.data.as_deref()).expect("read the text");
    println!(
        "text: {} training blocks, {} validation bytes, {} test bytes",
        corpus.train.len(),
        corpus.valid.len(),
        corpus.test.len()
    );
    let tok = data::Tok::train(&corpus.train, args.vocab);
    let tok_small = data::Tok::train(&corpus.train, args.small_vocab);
    let train_text = corpus.train.join("\n\n");
    let stream = tok.encode(&train_text);
    let stream_small = tok_small.encode(&train_text);
    println!(
        "tokenizers: {} and {} entries ({:.2} and {:.2} bytes per token); {:.1} s",
        tok.vocab(),
        tok_small.vocab(),
        train_text.len() as f64 / stream.len() as f64,
        train_text.len() as f64 / stream_small.len() as f64,
        started.elapsed().as_secs_f64()
    );
    let steps = s.teacher_steps as u64 + students.len() as u64 * seeds * s.student_steps as u64;
    let progress = ProgressBar::new(steps).with_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} steps {msg}")
            .unwrap(),
    );
    let data_key = train_text.len() ^ stream.len() << 20;
    let cache = args.cache.join(format!(
        "teacher_{}x{}_v{}_c{}_s{}_{data_key:x}.bpk",
        s.teacher.d_model,
        s.teacher.layers,
        tok.vocab(),
        s.context,
        s.teacher_steps
    ));
    progress.set_message("teacher");
    let (teacher, teacher_curve) =
        train::teacher(&s, &tok, &stream, &corpus.valid, &cache, &device, &progress);
    let teacher_i = teacher.valid();
    let teacher_test =
        train::bits_per_byte(&teacher_i, &tok, &corpus.test, s.test_bytes, s.context);
    // Test prompts: the first words of test blocks.
    let prompts: Vec<String> = corpus
        .test
        .split("\n\n")
        .take(s.samples)
        .map(|b| b.lines().nth(1).unwrap_or(b).chars().take(40).collect())
        .collect();
    let store_path = args.cache.join("stores");
    std::fs::create_dir_all(&store_path).ok();
    let world = World {
        s: &s,
        teacher: &teacher,
        tok: &tok,
        tok_small: &tok_small,
        stream: &stream,
        stream_small: &stream_small,
        valid: &corpus.valid,
        test: &corpus.test,
        prompts: &prompts,
        store_path,
    };
    let teacher_sample = train::sample_score(&world, &teacher_i, &tok, 0).0;
    let mut runs: BTreeMap<String, Vec<train::StudentRun>> = BTreeMap::new();
    for seed in 0..seeds {
        for name in &students {
            progress.set_message(format!("{name}, seed {seed}"));
            let run = train::student(&world, name, seed, &progress);
            runs.entry(name.clone()).or_default().push(run);
        }
    }
    progress.finish_and_clear();
    let memory = loss_step_memory(&s, &teacher, &stream);

    println!(
        "\nLanguage-model distillation: teacher {}×{} ({:.2} M parameters, vocabulary {}), students {}×{} ({:.2} M; {:.2} M with the {}-token vocabulary), {} steps of {}×{} tokens, {} seed(s); {:.0} s in all\n",
        s.teacher.d_model,
        s.teacher.layers,
        LmConfig {
            vocab: tok.vocab(),
            ..s.teacher.clone()
        }
        .params() as f64
            / 1e6,
        tok.vocab(),
        s.student.d_model,
        s.student.layers,
        LmConfig {
            vocab: tok.vocab(),
            ..s.student.clone()
        }
        .params() as f64
            / 1e6,
        LmConfig {
            vocab: tok_small.vocab(),
            ..s.student.clone()
        }
        .params() as f64
            / 1e6,
        tok_small.vocab(),
        s.student_steps,
        s.batch,
        s.context,
        seeds,
        started.elapsed().as_secs_f64()
    );
    println!("| model | test bits/byte | teacher-scored bits/byte of samples | time per run |");
    println!("|---|---:|---:|---:|");
    println!("| teacher | {teacher_test:.4} | {teacher_sample:.3} | |");
    for name in &students {
        let r = &runs[name];
        let (t, ts) = mean_std(&r.iter().map(|x| x.test_bpb).collect::<Vec<_>>());
        let (p, ps) = mean_std(&r.iter().map(|x| x.sample_bpb).collect::<Vec<_>>());
        let secs = r.iter().map(|x| x.seconds).sum::<f64>() / r.len() as f64;
        println!("| {name} | {t:.4} ± {ts:.4} | {p:.3} ± {ps:.3} | {secs:.0} s |");
    }
    println!(
        "\nPeak memory of one dense loss step (both forwards, the student's backward; batch {}×{}): forward_linear {:.1} MB (automatic chunks), {:.1} MB (128-row chunks); materialised logits {:.1} MB",
        s.batch,
        s.context,
        memory.0 as f64 / 1e6,
        memory.1 as f64 / 1e6,
        memory.2 as f64 / 1e6
    );
    println!("\nSamples (first test prompt: {:?}):", prompts[0]);
    for name in &students {
        println!(
            "- {name}: {:?}",
            runs[name][0]
                .sample_text
                .chars()
                .take(160)
                .collect::<String>()
        );
    }
    if let Some(path) = &args.json {
        let students_json: serde_json::Map<String, serde_json::Value> = runs
            .iter()
            .map(|(k, r)| {
                (
                    k.clone(),
                    json!({
                        "test_bpb": r.iter().map(|x| x.test_bpb).collect::<Vec<_>>(),
                        "sample_bpb": r.iter().map(|x| x.sample_bpb).collect::<Vec<_>>(),
                        "seconds": r.iter().map(|x| x.seconds).collect::<Vec<_>>(),
                        "valid_curve": r.iter().map(|x| x.curve.clone()).collect::<Vec<_>>(),
                    }),
                )
            })
            .collect();
        let out = json!({
            "teacher": {"test_bpb": [teacher_test], "sample_bpb": [teacher_sample], "valid_curve": teacher_curve},
            "students": students_json,
            "memory_bytes": {"forward_linear": memory.0, "forward_linear_128_rows": memory.1, "materialised": memory.2},
        });
        std::fs::write(path, serde_json::to_string_pretty(&out).unwrap()).expect("write the JSON");
    }
    if let Err(e) = plot(&runs, &args.plot) {
        eprintln!("no plot: {e}");
    } else {
        println!("\nplot: {}", args.plot.display());
    }
}

/// Peak heap growth of one dense loss step (both models' forward, the student's backward) with
/// `forward_linear` (the automatic chunk size, and 128-row chunks) and with materialised logits.
fn loss_step_memory(s: &Settings, teacher: &model::Lm, stream: &[u32]) -> (usize, usize, usize) {
    let device = teacher.device().autodiff();
    let student = LmConfig {
        vocab: teacher.head.weight.dims()[1],
        ..s.student.clone()
    }
    .init(&device);
    let teacher = teacher.clone().no_grad();
    let (inputs, targets) = train::split(&train::Windows::new(stream, s.context, 1).next(s.batch));
    let x = train::ints2(&inputs, &device);
    let n = s.batch * s.context;
    let y = Tensor::<1, Int>::from_data(TensorData::new(targets.concat(), [n]), &device);
    let config = burn_distill::DistillLossConfig::new();
    let mut peaks = Vec::new();
    for rows in [None, Some(128)] {
        let loss = config.clone().with_linear_chunk_rows(rows).init();
        peaks.push(
            measure::measure(1, || {
                let v = loss.forward_linear(
                    student.hidden(x.clone()),
                    &student.head,
                    teacher.hidden(x.clone()),
                    &teacher.head,
                    y.clone(),
                );
                let _ = v.backward();
            })
            .1,
        );
    }
    let loss = config.init();
    let (_, materialised) = measure::measure(1, || {
        let v = loss.forward(
            student.logits(x.clone()),
            teacher.logits(x.clone()),
            y.clone(),
        );
        let _ = v.backward();
    });
    (peaks[0], peaks[1], materialised)
}

fn plot(
    runs: &BTreeMap<String, Vec<train::StudentRun>>,
    path: &PathBuf,
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let curves: Vec<(String, Vec<(f64, f64)>)> = runs
        .iter()
        .map(|(name, r)| {
            let points = r[0]
                .curve
                .iter()
                .enumerate()
                .map(|(i, &(step, _))| {
                    let mean = r.iter().map(|x| x.curve[i].1).sum::<f64>() / r.len() as f64;
                    (step as f64, mean)
                })
                .collect();
            (name.clone(), points)
        })
        .collect();
    let max_step = curves
        .iter()
        .flat_map(|c| c.1.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let ys: Vec<f64> = curves
        .iter()
        .flat_map(|c| c.1.iter().skip(1).map(|p| p.1))
        .collect();
    let (lo, hi) = ys
        .iter()
        .fold((f64::INFINITY, 0.0f64), |(a, b), &y| (a.min(y), b.max(y)));
    let root = SVGBackend::new(path, (760, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Validation bits per byte during training (mean over seeds)",
            ("sans-serif", 18),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..max_step, (lo * 0.97)..(hi * 1.03))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("bits per byte")
        .draw()?;
    for (i, (name, points)) in curves.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                points.iter().skip(1).copied(),
                color.stroke_width(2),
            ))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
