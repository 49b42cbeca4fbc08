//! The vocabulary-parallel loss on P = 1, 2, 4 local peers (threads exchanging through
//! `LocalExchange`, on Flex f32) against the unsharded loss, measured in one run: forward +
//! backward wall time (median of K; the peers' time is from the first peer's start to the
//! last peer's end), and the floats each peer contributes to the exchanges per call.
//!
//! ```sh
//! cargo run --release --example bench_parallel -- --shape 2048x32768 --reps 3
//! ```
#[cfg(feature = "flex")]
use std::sync::{Arc, Barrier};
#[cfg(feature = "flex")]
use std::time::{Duration, Instant};

#[cfg(feature = "flex")]
use burn::tensor::{Device, Distribution, Int, Tensor};
#[cfg(feature = "flex")]
use burn_distill::{DistillLoss, DistillLossConfig, Divergence, Kernel, LocalExchange, VocabShard};

#[cfg(feature = "flex")]
fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// Forward + backward of the unsharded loss.
#[cfg(feature = "flex")]
fn unsharded(
    loss: &DistillLoss,
    student: &Tensor<2>,
    teacher: &Tensor<2>,
    y: &Tensor<1, Int>,
) -> Duration {
    let s = student.clone().autodiff().require_grad();
    let start = Instant::now();
    let value = loss.forward(s.clone(), teacher.clone().autodiff(), y.clone().autodiff());
    let grad = s.grad(&value.backward()).unwrap();
    let _ = grad.into_data();
    start.elapsed()
}

/// Forward + backward on `peers` threads, each with its balanced shard.
#[cfg(feature = "flex")]
fn sharded(
    loss: &DistillLoss,
    student: &Tensor<2>,
    teacher: &Tensor<2>,
    y: &Tensor<1, Int>,
    peers: usize,
) -> Duration {
    let [n, v] = student.dims();
    let barrier = Arc::new(Barrier::new(peers));
    let handles: Vec<_> = LocalExchange::group(peers)
        .into_iter()
        .enumerate()
        .map(|(rank, exchange)| {
            let cols = VocabShard::balanced_range(v, peers, rank).unwrap();
            let s = student.clone().slice([0..n, cols.clone()]);
            let t = teacher.clone().slice([0..n, cols]);
            let (loss, y, barrier) = (loss.clone(), y.clone(), barrier.clone());
            std::thread::spawn(move || {
                let shard = VocabShard::balanced(rank, peers, v).unwrap();
                let s = s.autodiff().require_grad();
                barrier.wait();
                let start = Instant::now();
                let value = loss.forward_vocab_parallel(
                    s.clone(),
                    t.autodiff(),
                    y.autodiff(),
                    &shard,
                    &exchange,
                );
                let grad = s.grad(&value.backward()).unwrap();
                let _ = grad.into_data();
                (start, Instant::now())
            })
        })
        .collect();
    let spans: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let start = spans.iter().map(|s| s.0).min().unwrap();
    let end = spans.iter().map(|s| s.1).max().unwrap();
    end - start
}

#[cfg(feature = "flex")]
fn main() {
    let mut shape = [2048, 32768];
    let mut reps = 3;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--shape" => {
                let s = it.next().expect("--shape NxV");
                let (n, v) = s.split_once('x').expect("NxV");
                shape = [n.parse().unwrap(), v.parse().unwrap()];
            }
            "--reps" => reps = it.next().and_then(|r| r.parse().ok()).expect("--reps K"),
            other => panic!("unknown option {other}"),
        }
    }
    let [n, v] = shape;
    let device = Device::flex();
    let student = Tensor::<2>::random(shape, Distribution::Normal(0.0, 2.0), &device);
    let teacher = Tensor::<2>::random(shape, Distribution::Normal(0.0, 3.0), &device);
    let y = Tensor::<1, Int>::random([n], Distribution::Uniform(0.0, v as f64), &device);

    println!(
        "Flex f32 [{n}, {v}], T = 2, α = 0.5, fwd+bwd, median of {reps}; this machine: {} cores\n",
        std::thread::available_parallelism()
            .map(|p| p.get())
            .unwrap_or(1)
    );
    println!(
        "| divergence | unsharded fused | unsharded composed | P = 1 | P = 2 | P = 4 | floats per peer per call (P = 2 / 4) | bytes (f32, P = 4) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for divergence in [Divergence::ForwardKl, Divergence::Jsd { beta: 0.5 }] {
        let config = DistillLossConfig::new()
            .with_temperature(2.0)
            .with_alpha(0.5)
            .with_divergence(divergence);
        let fused = config.clone().init();
        let composed = config.with_kernel(Kernel::Reference).init();
        let mut times = vec![Vec::new(); 5];
        for _ in 0..reps {
            times[0].push(unsharded(&fused, &student, &teacher, &y));
            times[1].push(unsharded(&composed, &student, &teacher, &y));
            for (i, peers) in [1, 2, 4].into_iter().enumerate() {
                times[2 + i].push(sharded(&fused, &student, &teacher, &y, peers));
            }
        }
        let ms: Vec<f64> = times
            .into_iter()
            .map(|t| median(t).as_secs_f64() * 1e3)
            .collect();
        let floats = |p: usize| {
            VocabShard::balanced(0, p, v)
                .unwrap()
                .exchanged_floats(n, divergence)
        };
        println!(
            "| {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {} / {} | {:.0} KB (logits: {:.0} MB) |",
            divergence.name(),
            ms[0],
            ms[1],
            ms[2],
            ms[3],
            ms[4],
            floats(2),
            floats(4),
            floats(4) as f64 * 4.0 / 1e3,
            (n * v) as f64 * 4.0 / 1e6
        );
    }
}

#[cfg(not(feature = "flex"))]
fn main() {
    eprintln!("bench_parallel runs on Flex: build with the `flex` feature (a default)");
}
