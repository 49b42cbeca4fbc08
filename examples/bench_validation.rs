//! What input validation costs a training step: `K` forward+backward steps of the loss queued
//! back to back (one wait at the end, as a training loop runs), with `Validation::Eager` (a
//! read-back in every forward, so the queue drains every step), `Deferred` (the checks queued
//! on the device, all read once after the `K` steps) and `Off`; the dense fused loss, and the
//! sparse-teacher loss (top-k, tail bucket) whose checks are larger.
//!
//! ```sh
//! cargo run --release --example bench_validation --features wgpu -- --backend wgpu
//! cargo run --release --example bench_validation -- --backend flex --shapes 2048x32768
//! ```
//! Options: `--backend flex|wgpu|vulkan|cuda` (default `flex`; 0.1's `ndarray` is gone with
//! burn 0.22's NdArray backend), `--shapes NxV,...`, `--steps K`, `--top-k k`.
use std::time::{Duration, Instant};

#[path = "../benches/measure.rs"]
mod measure;

use burn::tensor::{Device, Distribution, Int, Tensor, activation};
use burn_distill::{
    DistillLossConfig, DistillOutput, SparseDistillLossConfig, SparseTeacher, TailPolicy,
    Validation,
};

struct Args {
    backend: String,
    shapes: Vec<[usize; 2]>,
    steps: usize,
    top_k: usize,
}

fn args() -> Args {
    let mut a = Args {
        backend: "flex".into(),
        shapes: vec![[8, 1024], [512, 32000]],
        steps: 20,
        top_k: 64,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--backend" => a.backend = value(),
            "--steps" => a.steps = value().parse().expect("--steps K"),
            "--top-k" => a.top_k = value().parse().expect("--top-k k"),
            "--shapes" => {
                a.shapes = value()
                    .split(',')
                    .map(|s| {
                        let (n, v) = s.split_once('x').expect("shape NxV");
                        [n.parse().unwrap(), v.parse().unwrap()]
                    })
                    .collect()
            }
            other => panic!("unknown option {other}"),
        }
    }
    a
}

const MODES: [Validation; 3] = [Validation::Eager, Validation::Deferred, Validation::Off];

/// Time per step of `steps` queued steps (after one warm-up run of the same loop), the
/// deferred checks validated after the last.
fn per_step(
    steps: usize,
    student: &Tensor<2>,
    mut step: impl FnMut(Tensor<2>) -> DistillOutput,
) -> Duration {
    let mut run = || {
        let start = Instant::now();
        let mut outputs = Vec::with_capacity(steps);
        let mut last = None;
        for _ in 0..steps {
            let tracked = student.clone().require_grad();
            let out = step(tracked.clone());
            let grads = out.loss.backward();
            last = tracked.grad(&grads);
            outputs.push(out);
        }
        student.device().sync().expect("sync");
        drop(last);
        for out in &outputs {
            out.validate().expect("valid inputs");
        }
        start.elapsed() / steps as u32
    };
    run();
    run()
}

/// The table on `device`, the autodiff form of a device.
fn bench(name: &str, args: &Args, device: Device) {
    println!("\n### {name}, {} queued steps\n", args.steps);
    println!("| shape | loss | Eager | Deferred | Off | Eager − Off | Deferred − Off |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for &[n, v] in &args.shapes {
        device.seed(3);
        let student = Tensor::<2>::random([n, v], Distribution::Normal(0.0, 3.0), &device);
        let teacher = Tensor::<2>::random([n, v], Distribution::Normal(0.0, 3.0), &device);
        let targets = Tensor::<1, Int>::random([n], Distribution::Uniform(0.0, v as f64), &device);
        let k = args.top_k.min(v);
        let (top_lp, top_idx) = activation::log_softmax(teacher.clone(), 1).topk_with_indices(k, 1);
        let row = |label: &str, times: Vec<Duration>| {
            println!(
                "| {n}×{v} | {label} | {:.2} ms | {:.2} ms | {:.2} ms | {:+.2} ms | {:+.2} ms |",
                ms(times[0]),
                ms(times[1]),
                ms(times[2]),
                ms(times[0]) - ms(times[2]),
                ms(times[1]) - ms(times[2]),
            );
        };
        let dense = MODES
            .iter()
            .map(|&mode| {
                let loss = DistillLossConfig::new()
                    .with_temperature(4.0)
                    .with_alpha(0.9)
                    .with_validation(mode)
                    .init();
                per_step(args.steps, &student, |s| {
                    loss.try_forward_parts(s, teacher.clone(), Some(targets.clone()))
                        .unwrap()
                })
            })
            .collect();
        row("dense fused", dense);
        let sparse = MODES
            .iter()
            .map(|&mode| {
                let loss = SparseDistillLossConfig::new(
                    DistillLossConfig::new()
                        .with_temperature(4.0)
                        .with_alpha(0.9)
                        .with_validation(mode),
                )
                .with_tail(TailPolicy::TailBucket)
                .init();
                per_step(args.steps, &student, |s| {
                    let teacher = SparseTeacher::new(top_idx.clone(), top_lp.clone());
                    loss.try_forward_parts(s, teacher, Some(targets.clone()))
                        .unwrap()
                })
            })
            .collect();
        row(&format!("sparse top-{k}"), sparse);
    }
}

fn main() {
    let args = args();
    let (device, name, _) = measure::backend_device(&args.backend);
    bench(name, &args, device.autodiff());
}
