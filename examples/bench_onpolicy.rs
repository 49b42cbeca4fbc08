//! The sampled-token (on-policy) loss against the dense fused kernel, side by side in one run:
//! forward and backward of `[N, V]` student logits on Flex (f32; 0.1 ran on NdArray, gone with
//! burn 0.22), median time and peak heap growth (a counting allocator), the latter also in units
//! of one `[N, V]` f32 tensor.
//!
//! ```text
//! cargo run --release --example bench_onpolicy -- [--n 2048] [--v 32768] [--reps 5]
//! ```
//!
//! The dense rows are `DistillLoss` (forward KL at T = 1) with a live `[N, V]` teacher, at
//! `α = 0.5` and at `α = 0` (in this crate `α` weighs the soft term: the hard term alone,
//! which still reads the teacher); the sampled-token rows are `SampledTokenLoss` (k1) with the
//! fused log-probabilities and with the composed reference, from `[B·T, V]` rows and from
//! `[B, T, V]` logits (burn 0.21's NdArray copied a tensor it reshaped, one `[N, V]` copy
//! forward and one backward; Flex's reshape of a contiguous tensor does not copy).

use burn::tensor::{Bool, Device, Distribution, Int, Tensor};
use burn_distill::onpolicy::{SampledTokenLossConfig, SampledTokens};
use burn_distill::{DistillLossConfig, Kernel};

#[path = "../benches/measure.rs"]
mod measure;
use measure::measure;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

fn main() {
    let (n, v, reps) = (arg("--n", 2048), arg("--v", 32768), arg("--reps", 5));
    let (b, t) = (8, n / 8);
    assert_eq!(b * t, n, "--n must be a multiple of 8");
    let device = Device::flex().autodiff();
    let student = Tensor::<2>::random([n, v], Distribution::Normal(0.0, 2.0), &device);
    let teacher = Tensor::<2>::random([n, v], Distribution::Normal(0.0, 2.0), &device);
    let targets = Tensor::<1, Int>::random([n], Distribution::Uniform(0.0, v as f64), &device);
    let sampled = SampledTokens {
        tokens: targets.clone().reshape([b, t]),
        teacher_log_probs: Tensor::<2>::random([b, t], Distribution::Uniform(-8.0, -0.01), &device),
        mask: Tensor::<2, Bool>::ones([b, t], &device),
        sampler_log_probs: None,
    };
    let nv_bytes = (n * v * 4) as f64;
    println!(
        "Flex f32, N = {n}, V = {v}, fwd+bwd of the student logits (median of {reps}; peak heap growth):\n"
    );
    println!("| loss | fwd+bwd | ÷ dense α = 0.5 | peak extra memory | in [N, V] tensors |");
    println!("|---|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for alpha in [0.5, 0.0] {
        let loss = DistillLossConfig::new().with_alpha(alpha).init();
        let (time, peak) = measure(reps, || {
            let s = student.clone().require_grad();
            let value = loss.forward(s.clone(), teacher.clone(), targets.clone());
            let grads = value.backward();
            s.grad(&grads).expect("gradient");
        });
        rows.push((format!("dense fused, α = {alpha}"), time, peak));
    }
    for (name, kernel, flat) in [
        ("sampled-token k1, fused, [B·T, V] rows", Kernel::Auto, true),
        (
            "sampled-token k1, fused, [B, T, V] (one reshape)",
            Kernel::Auto,
            false,
        ),
        (
            "sampled-token k1, reference, [B·T, V] rows",
            Kernel::Reference,
            true,
        ),
    ] {
        let loss = SampledTokenLossConfig::new().with_kernel(kernel).init();
        let (time, peak) = measure(reps, || {
            let s = student.clone().require_grad();
            let out = if flat {
                loss.try_forward_rows(s.clone(), sampled.clone())
            } else {
                loss.try_forward_parts(s.clone().reshape([b, t, v]), sampled.clone())
            };
            let value = out.expect("valid input").loss;
            let grads = value.backward();
            s.grad(&grads).expect("gradient");
        });
        rows.push((name.to_string(), time, peak));
    }
    let base = rows[0].1.as_secs_f64();
    for (name, time, peak) in rows {
        println!(
            "| {name} | {:.0} ms | {:.2} | {:.3} GB | {:.2} |",
            time.as_secs_f64() * 1e3,
            time.as_secs_f64() / base,
            peak as f64 / 1e9,
            peak as f64 / nv_bytes
        );
    }
}
