//! What input validation costs a training step: `K` forward+backward steps of the loss queued
//! back to back (one wait at the end, as a training loop runs), with `Validation::Eager` (a
//! read-back in every forward, so the queue drains every step), `Deferred` (the checks queued
//! on the device, all read once after the `K` steps) and `Off`; the dense fused loss, and the
//! sparse-teacher loss (top-k, tail bucket) whose checks are larger.
//!
//! ```sh
//! cargo run --release --example bench_validation --features wgpu -- --backend wgpu
//! cargo run --release --example bench_validation -- --backend ndarray --shapes 2048x32768
//! ```
//! Options: `--backend ndarray|flex|wgpu|cuda`, `--shapes NxV,...`, `--steps K`, `--top-k k`.
use std::time::{Duration, Instant};

use burn::tensor::{
    Distribution, Int, Tensor, activation,
    backend::{AutodiffBackend, Backend},
};
use burn_distill::{
    DistillBackend, DistillLossConfig, DistillOutput, SparseDistillLossConfig, SparseTeacher,
    TailPolicy, Validation,
};

struct Args {
    backend: String,
    shapes: Vec<[usize; 2]>,
    steps: usize,
    top_k: usize,
}

fn args() -> Args {
    let mut a = Args {
        backend: "ndarray".into(),
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
fn per_step<B: AutodiffBackend>(
    steps: usize,
    student: &Tensor<B, 2>,
    mut step: impl FnMut(Tensor<B, 2>) -> DistillOutput<B>,
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
        B::InnerBackend::sync(&student.device()).expect("sync");
        drop(last);
        for out in &outputs {
            out.validate().expect("valid inputs");
        }
        start.elapsed() / steps as u32
    };
    run();
    run()
}

fn bench<B>(name: &str, args: &Args, device: B::Device)
where
    B: AutodiffBackend + DistillBackend,
{
    println!("\n### {name}, {} queued steps\n", args.steps);
    println!("| shape | loss | Eager | Deferred | Off | Eager − Off | Deferred − Off |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for &[n, v] in &args.shapes {
        B::seed(&device, 3);
        let student = Tensor::<B, 2>::random([n, v], Distribution::Normal(0.0, 3.0), &device);
        let teacher = Tensor::<B, 2>::random([n, v], Distribution::Normal(0.0, 3.0), &device);
        let targets =
            Tensor::<B, 1, Int>::random([n], Distribution::Uniform(0.0, v as f64), &device);
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
    use burn::backend::Autodiff;
    let args = args();
    match args.backend.as_str() {
        #[cfg(feature = "ndarray")]
        "ndarray" => {
            bench::<Autodiff<burn::backend::NdArray>>("NdArray", &args, Default::default())
        }
        #[cfg(feature = "flex")]
        "flex" => bench::<Autodiff<burn::backend::Flex>>("Flex", &args, Default::default()),
        #[cfg(feature = "wgpu")]
        "wgpu" => bench::<Autodiff<burn::backend::Wgpu>>("wgpu", &args, Default::default()),
        #[cfg(feature = "cuda")]
        "cuda" => bench::<Autodiff<burn::backend::Cuda>>("CUDA", &args, Default::default()),
        other => panic!("backend {other} is not enabled (build with --features {other})"),
    }
}
