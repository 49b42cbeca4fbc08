//! Prints a markdown table of the distillation loss per device: fused vs reference vs burn-nn's
//! `KLDivLoss` composition vs the sparse (top-20) loss, forward and forward+backward, beside a
//! streaming pass over the same bytes, measured in the same run; with effective bandwidth and
//! (on Flex, the CPU) peak memory.
//!
//! ```sh
//! cargo run --release --example bench_table -- --backend flex
//! cargo run --release --example bench_table -- --shapes 2048x32768 --reps 5
//! cargo run --release --example bench_table --features wgpu -- --backend wgpu
//! ```
//! Options: `--backend flex|wgpu|vulkan|cuda` (default `flex`; 0.1's `ndarray` is gone with
//! burn 0.22's NdArray backend), `--shapes NxV,...`, `--reps K` (median of K), `--fused-only`
//! (skip the slow composed paths).
use std::time::Duration;

use burn::tensor::Device;

#[path = "../benches/workload.rs"]
mod workload;
use workload::{Inputs, Variant};

#[path = "../benches/measure.rs"]
mod measure;
use measure::measure;

struct Args {
    backend: String,
    shapes: Vec<[usize; 2]>,
    reps: usize,
    fused_only: bool,
}

fn args() -> Args {
    let mut a = Args {
        backend: "flex".into(),
        shapes: vec![[512, 32000], [2048, 32768], [4096, 50257]],
        reps: 5,
        fused_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--backend" => a.backend = it.next().expect("--backend NAME"),
            "--reps" => a.reps = it.next().and_then(|r| r.parse().ok()).expect("--reps K"),
            "--fused-only" => a.fused_only = true,
            "--shapes" => {
                a.shapes = it
                    .next()
                    .expect("--shapes NxV,...")
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

fn gbps(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

/// The table of one device: `device` without autodiff (the forward rows), the forward+backward
/// rows on the inputs lifted to its autodiff form.
fn run(name: &str, args: &Args, device: Device, cpu: bool) {
    println!("\n### {name}\n");
    println!(
        "| shape | variant | forward | fwd+bwd | fwd+bwd GB/s | fwd+bwd ÷ stream | peak extra memory |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for &[n, v] in &args.shapes {
        let inner = Inputs::new([n, v], &device);
        let tracked = inner.lift();
        let bytes = inner.input_bytes();
        let (stream, _) = if cpu {
            let s = inner.student.to_data().try_to_vec::<f32>().unwrap();
            let t = inner.teacher.to_data().try_to_vec::<f32>().unwrap();
            measure(args.reps, || {
                std::hint::black_box(workload::cpu_stream(&s, &t, v));
            })
        } else {
            measure(args.reps, || {
                let out = inner.student.clone() - inner.teacher.clone();
                out.device().sync().unwrap();
            })
        };
        let io = bytes * 3 / 2;
        println!(
            "| {n}×{v} | stream (read 2, write 1) | | {:.1} ms | {:.1} | 1.0 | |",
            stream.as_secs_f64() * 1e3,
            gbps(io, stream)
        );
        for variant in Variant::ALL {
            if args.fused_only && variant != Variant::Fused {
                continue;
            }
            let (fwd, _) = measure(args.reps, || workload::forward(variant, &inner));
            let (both, peak) = measure(args.reps, || workload::forward_backward(variant, &tracked));
            let memory = if cpu {
                format!(
                    "{:.2} GB ({:.2}× inputs)",
                    peak as f64 / 1e9,
                    peak as f64 / bytes as f64
                )
            } else {
                "n/a".into()
            };
            println!(
                "| {n}×{v} | {} | {:.1} ms | {:.1} ms | {:.1} | {:.2} | {memory} |",
                variant.name(),
                fwd.as_secs_f64() * 1e3,
                both.as_secs_f64() * 1e3,
                gbps(io, both),
                both.as_secs_f64() / stream.as_secs_f64(),
            );
        }
    }
}

fn main() {
    let args = args();
    let (device, name, cpu) = measure::backend_device(&args.backend);
    run(name, &args, device, cpu);
}
