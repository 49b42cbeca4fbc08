//! Criterion benchmarks of the distillation loss on each device the build enables (chosen by
//! cargo feature): fused vs reference vs burn-nn's `KLDivLoss` composition vs the sparse
//! (top-20) loss, forward and forward+backward, and a streaming pass over the same bytes, with
//! throughput in bytes.
//!
//! ```sh
//! cargo bench --bench distill                      # Flex (the default; 0.1's NdArray is gone)
//! cargo bench --bench distill --features wgpu      # wgpu (and Flex)
//! cargo bench --bench distill --features vulkan    # wgpu's Vulkan device (and Flex)
//! cargo bench --bench distill --features cuda      # CUDA (and Flex)
//! ```
//! `BURN_DISTILL_SHAPES=2048x32768,...` overrides the shapes; composed paths (reference, burn-nn,
//! sparse) are skipped above 2²⁸ elements unless `BURN_DISTILL_ALL=1`.
use std::time::Duration;

use burn::tensor::Device;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

mod workload;
use workload::{Inputs, Variant};

fn shapes(gpu: bool) -> Vec<[usize; 2]> {
    match std::env::var("BURN_DISTILL_SHAPES") {
        Ok(list) => list
            .split(',')
            .map(|s| {
                let (n, v) = s.split_once('x').expect("shape NxV");
                [n.parse().unwrap(), v.parse().unwrap()]
            })
            .collect(),
        Err(_) if gpu => vec![[8192, 128256], [16384, 131072]],
        Err(_) => vec![[512, 32000], [2048, 32768], [4096, 50257]],
    }
}

/// The benchmarks of one device (`device` without autodiff; the forward+backward runs lift
/// the inputs to its autodiff form). `gpu`: the GPU shapes and a streaming pass of tensor ops;
/// otherwise (Flex) the CPU shapes and a streaming pass on raw slices.
fn bench_device(c: &mut Criterion, name: &str, device: Device, gpu: bool) {
    let all = std::env::var("BURN_DISTILL_ALL").is_ok();
    for [n, v] in shapes(gpu) {
        let inner = Inputs::new([n, v], &device);
        let tracked = inner.lift();
        let mut group = c.benchmark_group(format!("{name}/{n}x{v}"));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(5));
        // Bytes that must move: two inputs (forward) plus the gradient (backward).
        let read = inner.input_bytes() as u64;
        group.throughput(Throughput::Bytes(read * 3 / 2));
        if gpu {
            group.bench_function("stream", |b| {
                b.iter(|| {
                    let out = inner.student.clone() - inner.teacher.clone();
                    out.device().sync().unwrap();
                })
            });
        } else {
            #[cfg(feature = "flex")]
            {
                let s = inner.student.to_data().try_to_vec::<f32>().unwrap();
                let t = inner.teacher.to_data().try_to_vec::<f32>().unwrap();
                group.bench_function("stream", |b| b.iter(|| workload::cpu_stream(&s, &t, v)));
            }
        }
        for variant in Variant::ALL {
            if variant != Variant::Fused && n * v > 1 << 28 && !all {
                continue;
            }
            group.bench_function(BenchmarkId::new("forward+backward", variant.name()), |b| {
                b.iter(|| workload::forward_backward(variant, &tracked))
            });
            group.bench_function(BenchmarkId::new("forward", variant.name()), |b| {
                b.iter(|| workload::forward(variant, &inner))
            });
        }
        group.finish();
    }
}

fn benches(c: &mut Criterion) {
    #[cfg(feature = "wgpu")]
    bench_device(c, "wgpu", Device::wgpu(Default::default()), true);
    #[cfg(feature = "vulkan")]
    bench_device(c, "vulkan", Device::vulkan(Default::default()), true);
    #[cfg(feature = "cuda")]
    bench_device(c, "cuda", Device::cuda(0), true);
    #[cfg(feature = "flex")]
    bench_device(c, "flex", Device::flex(), false);
}

criterion_group!(distill, benches);
criterion_main!(distill);
