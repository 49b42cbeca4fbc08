//! The store in a training loop: the step time of the sparse loss (forward and backward of the
//! student) with its teacher batches decoded from a `TeacherStore` by `read_ahead` on a
//! background thread, against the same batches already in memory, side by side in one run, on
//! Flex (f32; 0.1 ran on NdArray, gone with burn 0.22).
//!
//! ```sh
//! cargo run --release --example bench_store_step -- --steps 12 --reps 3
//! ```
//! Options: `--tokens` (per step, default 2048), `--vocab` (32768), `--k` (64), `--seq` (tokens
//! per sequence, 128), `--steps` (per pass, 12), `--reps` (passes of each mode, alternated, 3).
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_distill::store::{HostTeacher, TeacherStore, TeacherStoreConfig, TeacherStoreWriter};
use burn_distill::{DistillLossConfig, SparseDistillLossConfig};

fn main() {
    let (mut tokens, mut vocab, mut k, mut seq, mut steps, mut reps) =
        (2048usize, 32_768usize, 64usize, 128usize, 12usize, 3usize);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or_else(|| panic!("{flag} needs a number"))
        };
        match flag.as_str() {
            "--tokens" => tokens = value(),
            "--vocab" => vocab = value(),
            "--k" => k = value(),
            "--seq" => seq = value(),
            "--steps" => steps = value(),
            "--reps" => reps = value(),
            "--bench" => {}
            other => panic!("unknown option {other}"),
        }
    }
    assert!(
        tokens.is_multiple_of(seq),
        "--tokens must be a multiple of --seq"
    );
    let rows = tokens * steps;
    let path = std::env::temp_dir().join(format!(
        "bench-store-step-{}.safetensors",
        std::process::id()
    ));
    // A teacher's top-k per token: distinct indices, decreasing log-probabilities.
    let mut writer = TeacherStoreWriter::create(&path, TeacherStoreConfig::new(vocab, k)).unwrap();
    let mut state = 7u64;
    let mut next = || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        (state >> 33) as usize
    };
    for _ in 0..rows / 1024 {
        let mut indices = Vec::with_capacity(1024 * k);
        let mut log_probs = Vec::with_capacity(1024 * k);
        for _ in 0..1024 {
            let base = next() % (vocab / k);
            for j in 0..k {
                indices.push((base * k + j) as i64 % vocab as i64);
                log_probs.push(-4.5 - j as f32 * 0.05);
            }
        }
        writer.append_rows(&indices, &log_probs).unwrap();
    }
    writer.finish().unwrap();
    let store = Arc::new(TeacherStore::open(&path).unwrap());
    // Shuffled sequences, `tokens / seq` per step.
    let mut sequences: Vec<usize> = (0..rows / seq).collect();
    for i in (1..sequences.len()).rev() {
        sequences.swap(i, next() % (i + 1));
    }
    let batches: Vec<Vec<usize>> = sequences
        .chunks(tokens / seq)
        .map(|s| s.iter().flat_map(|&q| q * seq..(q + 1) * seq).collect())
        .collect();
    let in_memory: Vec<HostTeacher> = batches
        .iter()
        .map(|b| store.gather_host(b).unwrap())
        .collect();

    let device = Device::flex().autodiff();
    let loss = SparseDistillLossConfig::new(
        DistillLossConfig::new()
            .with_temperature(2.0)
            .with_alpha(0.5),
    )
    .init();
    let logits: Vec<f32> = (0..tokens * vocab)
        .map(|i| ((i * 2_654_435_761) % 1000) as f32 / 250.0 - 2.0)
        .collect();
    let student = Tensor::<2>::from_data(TensorData::new(logits, [tokens, vocab]), &device);
    let targets = Tensor::<1, Int>::from_data(
        TensorData::new(
            (0..tokens as i64).map(|i| i * 31 % vocab as i64).collect(),
            [tokens],
        ),
        &device,
    );
    let step = |teacher: HostTeacher| {
        let s = student.clone().require_grad();
        let value = loss.forward(s.clone(), teacher.to_teacher(&device), targets.clone());
        let grads = value.backward();
        std::hint::black_box(s.grad(&grads));
    };
    let run_memory = || {
        let start = Instant::now();
        for teacher in &in_memory {
            step(teacher.clone());
        }
        start.elapsed()
    };
    let run_store = || {
        let start = Instant::now();
        for teacher in store.clone().read_ahead(batches.clone(), 2) {
            step(teacher.unwrap());
        }
        start.elapsed()
    };
    run_memory(); // warm-up
    let (mut memory, mut from_store): (Vec<Duration>, Vec<Duration>) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        memory.push(run_memory());
        from_store.push(run_store());
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() / steps as f64 * 1e3
    };
    let (m, s) = (median(memory), median(from_store));
    println!(
        "Flex f32, [{tokens}, {vocab}] student logits, k = {k}, {steps} steps of {} shuffled \
         sequences of {seq} tokens, sparse loss fwd+bwd, median of {reps} passes:\n",
        tokens / seq
    );
    println!("| teacher batches | step | ÷ in memory |");
    println!("|---|---:|---:|");
    println!("| in memory (decoded before) | {m:.1} ms | 1.00 |");
    println!(
        "| from the store, `read_ahead` (depth 2) | {s:.1} ms | {:.3} |",
        s / m
    );
    std::fs::remove_file(&path).unwrap();
}
