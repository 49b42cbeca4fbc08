//! The offline teacher store: bytes per token against dense f32 logits, and write and read
//! throughput in tokens per second (host rows; the teacher's forward pass is not counted).
//!
//! ```sh
//! cargo run --release --example bench_store -- --tokens 262144 --vocab 128256
//! ```
//! Options: `--tokens`, `--vocab`, `--k` (comma separated), `--dir`.
use std::time::Instant;

use burn_distill::store::{StoreValues, TeacherStore, TeacherStoreConfig, TeacherStoreWriter};

fn main() {
    let mut tokens = 262_144usize;
    let mut vocab = 128_256usize;
    let mut ks = vec![20usize, 50, 64];
    let mut dir = std::env::temp_dir();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--tokens" => tokens = value().parse().expect("--tokens"),
            "--vocab" => vocab = value().parse().expect("--vocab"),
            "--k" => {
                ks = value()
                    .split(',')
                    .map(|k| k.parse().expect("--k"))
                    .collect()
            }
            "--dir" => dir = value().into(),
            "--bench" => {}
            other => panic!("unknown option {other}"),
        }
    }
    println!(
        "{tokens} tokens, V = {vocab}; dense f32 logits: {} B/token\n",
        4 * vocab
    );
    println!(
        "| k | values | B/token | ÷ dense f32 | write (tokens/s) | sequential read (tokens/s) | \
         random-row read (tokens/s) |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for &k in &ks {
        for values in [StoreValues::F16, StoreValues::Bf16] {
            // Distinct pseudo-random indices and log-probabilities, as a teacher's top-k.
            let mut state = 0x9E37_79B9_7F4A_7C15u64;
            let mut next = || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            let batch = 4096;
            let indices: Vec<i64> = (0..batch * k)
                .map(|i| ((next() as usize % (vocab / k)) * k + i % k) as i64)
                .collect();
            let log_probs: Vec<f32> = (0..batch * k)
                .map(|_| -((next() % 20_000) as f32) / 1000.0)
                .collect();
            let path = dir.join(format!("bench-store-{k}.safetensors"));
            let config = TeacherStoreConfig::new(vocab, k).with_values(values);
            let t0 = Instant::now();
            let mut writer = TeacherStoreWriter::create(&path, config).expect("store");
            let mut written = 0;
            while written < tokens {
                let rows = batch.min(tokens - written);
                writer
                    .append_rows(&indices[..rows * k], &log_probs[..rows * k])
                    .expect("rows");
                written += rows;
            }
            let info = writer.finish().expect("finish");
            let write = tokens as f64 / t0.elapsed().as_secs_f64();

            let store = TeacherStore::open(&path).expect("open");
            let t0 = Instant::now();
            let mut checksum = 0i64;
            for start in (0..tokens).step_by(batch) {
                let (i, _) = store
                    .read_rows(start..(start + batch).min(tokens))
                    .expect("read");
                checksum += i[0];
            }
            let read = tokens as f64 / t0.elapsed().as_secs_f64();
            let picks = 20_000.min(tokens);
            let t0 = Instant::now();
            for _ in 0..picks {
                let r = next() as usize % tokens;
                let (i, _) = store.read_rows(r..r + 1).expect("row");
                checksum += i[0];
            }
            let random = picks as f64 / t0.elapsed().as_secs_f64();
            std::hint::black_box(checksum);
            let per_token = info.file_bytes as f64 / tokens as f64;
            println!(
                "| {k} | {values:?} | {per_token:.1} | {:.5} | {:.2e} | {:.2e} | {:.2e} |",
                per_token / (4 * vocab) as f64,
                write,
                read,
                random
            );
            drop(store);
            std::fs::remove_file(&path).expect("remove");
        }
    }
}
