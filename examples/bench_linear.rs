//! Fused-linear distillation against the materialised path, side by side in one run: the
//! student's and the teacher's LM heads and the loss, forward and backward of the student
//! (hidden states, head weight and bias), median time and peak extra memory.
//!
//! ```sh
//! cargo run --release --example bench_linear -- --backend flex
//! cargo run --release --example bench_linear -- --n 2048 --hs 512 --ht 1024 --v 32768 --reps 3
//! ```
//! Options: `--backend flex|wgpu|vulkan|cuda` (default `flex`; 0.1's `ndarray` is gone with
//! burn 0.22's NdArray backend), `--dtype f32|f16|bf16` (hidden states and
//! heads), `--n`, `--hs`, `--ht`, `--v`, `--reps`, `--chunk-rows` (default: from the 64 MiB
//! budget), `--jsd` (Liger-Kernel's `LigerFusedLinearJSDLoss` defaults: JSD β = 0.5, T = 1,
//! hard and soft weights 0.5; otherwise forward KL, T = 2, α = 0.5), `--fused-only`,
//! `--sparse K` (a top-K sparse teacher instead of a teacher head: `SparseDistillLoss::
//! forward_linear` against the sparse loss on materialised logits, and a frozen head).
//!
//! Memory: on Flex (the CPU) the peak heap growth (a counting allocator); on wgpu, Vulkan and
//! CUDA the growth of the device memory pool that CubeCL reserves over the runs
//! (`Device::memory_pool_usage`), after freeing its unused pages (an upper bound of the peak in
//! use: pools grow in pages).
//!
//! The H200 run of issue 10 (against `scripts/torch_baseline.py --linear`):
//! ```sh
//! cargo run --release --features cuda --example bench_linear -- --backend cuda --dtype bf16 \
//!     --n 8192 --hs 2048 --ht 4096 --v 128256 --jsd --reps 10
//! ```
use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use burn_distill::{DistillLossConfig, Divergence};

#[path = "../benches/measure.rs"]
mod measure;
use measure::measure;

struct Args {
    backend: String,
    n: usize,
    hs: usize,
    ht: usize,
    v: usize,
    reps: usize,
    chunk_rows: Option<usize>,
    /// Time only the fused-linear path (for profilers).
    fused_only: bool,
    /// dtype of the hidden states and heads.
    dtype: DType,
    /// Liger-Kernel's fused-linear JSD setting.
    jsd: bool,
    /// A sparse teacher of this many entries per row instead of a teacher head.
    sparse: Option<usize>,
}

fn args() -> Args {
    let mut a = Args {
        backend: "flex".into(),
        n: 2048,
        hs: 512,
        ht: 1024,
        v: 32768,
        reps: 3,
        chunk_rows: None,
        fused_only: false,
        dtype: DType::F32,
        jsd: false,
        sparse: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--backend" => a.backend = value(),
            "--n" => a.n = value().parse().expect("--n"),
            "--hs" => a.hs = value().parse().expect("--hs"),
            "--ht" => a.ht = value().parse().expect("--ht"),
            "--v" => a.v = value().parse().expect("--v"),
            "--reps" => a.reps = value().parse().expect("--reps"),
            "--chunk-rows" => a.chunk_rows = Some(value().parse().expect("--chunk-rows")),
            "--fused-only" => a.fused_only = true,
            "--jsd" => a.jsd = true,
            "--sparse" => a.sparse = Some(value().parse().expect("--sparse K")),
            "--dtype" => {
                a.dtype = match value().as_str() {
                    "f32" => DType::F32,
                    "f16" => DType::F16,
                    "bf16" => DType::BF16,
                    other => panic!("--dtype {other}: expected f32, f16 or bf16"),
                }
            }
            "--bench" => {}
            other => panic!("unknown option {other}"),
        }
    }
    a
}

/// A deterministic `[rows, cols]` tensor with entries in about `[-scale, scale]`.
fn filled(rows: usize, cols: usize, scale: f32, seed: u32, device: &Device) -> Tensor<2> {
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| {
            let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
            (x >> 8) as f32 / (1u32 << 24) as f32 * 2.0 * scale - scale
        })
        .collect();
    Tensor::from_data(TensorData::new(values, [rows, cols]), device)
}

fn head(h: usize, v: usize, seed: u32, dtype: DType, device: &Device) -> Linear {
    let scale = 1.0 / (h as f32).sqrt();
    Linear {
        weight: Param::from_tensor(filled(h, v, scale, seed, device).cast(dtype)),
        bias: Some(Param::from_tensor(
            filled(1, v, scale, seed + 1, device)
                .reshape([v])
                .cast(dtype),
        )),
    }
}

/// Growth of the device's memory pool (bytes reserved) over `f`, after freeing its unused
/// pages; `None` on a device that reports no pool (Flex).
fn pool_growth(device: &Device, f: &mut dyn FnMut()) -> Option<u64> {
    device.memory_cleanup();
    let before = device.memory_pool_usage()?.bytes_reserved;
    f();
    let after = device.memory_pool_usage()?.bytes_reserved;
    Some(after.saturating_sub(before))
}

/// The tables on `device`, the autodiff form of a device (every tensor and head is created
/// on it, so tracked).
fn run(name: &str, a: &Args, device: Device) {
    if let Some(k) = a.sparse {
        return run_sparse(name, a, k, device);
    }
    // Device memory from its pool where it reports one, else host memory.
    let pool = device.memory_pool_usage().is_some();
    let (sh, th) = (
        head(a.hs, a.v, 1, a.dtype, &device),
        head(a.ht, a.v, 7, a.dtype, &device),
    );
    let hs = filled(a.n, a.hs, 1.0, 3, &device)
        .cast(a.dtype)
        .require_grad();
    let ht = filled(a.n, a.ht, 1.0, 5, &device).cast(a.dtype);
    // One token in ten is ignored (prompt or padding).
    let targets: Vec<i64> = (0..a.n)
        .map(|i| {
            if i % 10 == 9 {
                -100
            } else {
                ((i * 7919) % a.v) as i64
            }
        })
        .collect();
    let y = Tensor::<1, Int>::from_data(TensorData::new(targets, [a.n]), &device);
    let config = if a.jsd {
        DistillLossConfig::new()
            .with_divergence(Divergence::Jsd { beta: 0.5 })
            .with_temperature(1.0)
    } else {
        DistillLossConfig::new().with_temperature(2.0)
    };
    let config = config.with_alpha(0.5).with_linear_chunk_rows(a.chunk_rows);
    let loss = config.init();
    // The same loss for a frozen (or tied) head: no weight or bias gradient, no `[H, V]` GEMM.
    let frozen_loss = config.with_linear_head_grad(false).init();
    let sync = || device.sync().expect("sync");

    let materialised = || {
        let zs = sh.forward(hs.clone());
        let zt = th.forward(ht.clone()).detach();
        let grads = loss.forward(zs, zt, y.clone()).backward();
        drop(grads);
        sync();
    };
    let fused = || {
        let value = loss.forward_linear(hs.clone(), &sh, ht.clone(), &th, y.clone());
        let grads = value.backward();
        drop(grads);
        sync();
    };
    let frozen = || {
        let value = frozen_loss.forward_linear(hs.clone(), &sh, ht.clone(), &th, y.clone());
        let grads = value.backward();
        drop(grads);
        sync();
    };
    // Time (and host memory), then the device pool's growth where there is one.
    let timed = |f: &dyn Fn()| {
        let (t, host) = measure(a.reps, f);
        let memory = if pool {
            pool_growth(&device, &mut || f()).expect("memory pool usage")
        } else {
            host as u64
        };
        (t, memory as usize)
    };
    let (tf, pf) = timed(&fused);
    if a.fused_only {
        println!(
            "fused-linear: {:.1} ms, {:.3} GB",
            tf.as_secs_f64() * 1e3,
            pf as f64 / 1e9
        );
        return;
    }
    let (tm, pm) = timed(&materialised);
    let (tz, pz) = timed(&frozen);
    // Both values agree (a check that the benchmark measures the same loss).
    let value = |v: Tensor<1>| v.into_data().iter::<f64>().next().unwrap();
    let vm = value(loss.forward(
        sh.forward(hs.clone()),
        th.forward(ht.clone()).detach(),
        y.clone(),
    ));
    let vf = value(loss.forward_linear(hs.clone(), &sh, ht.clone(), &th, y.clone()));
    // f32 agrees to rounding; f16 and bf16 logits are rounded before the materialised loss
    // (not inside the fused-linear chunks), so they agree to about their precision.
    let tolerance = if a.dtype == DType::F32 { 1e-4 } else { 2e-2 };
    assert!(
        (vm - vf).abs() <= tolerance * vm.abs(),
        "losses differ: {vm} vs {vf}"
    );

    let gb = |b: usize| b as f64 / 1e9;
    println!(
        "{name}, {:?}, {}, N = {}, H_s = {}, H_t = {}, V = {}, chunk = {} rows, fwd+bwd of the \
         student (median of {}; memory: {}):\n",
        a.dtype,
        if a.jsd {
            "JSD β = 0.5, T = 1, α = 0.5"
        } else {
            "forward KL, T = 2, α = 0.5"
        },
        a.n,
        a.hs,
        a.ht,
        a.v,
        loss.linear_chunk_rows(a.v, &device),
        a.reps,
        if pool {
            "device pool growth"
        } else {
            "peak heap growth"
        }
    );
    println!("| path | fwd+bwd | ÷ materialised | peak extra memory | ÷ materialised |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| materialised logits + fused loss | {:.1} ms | 1.00 | {:.3} GB | 1.00 |",
        tm.as_secs_f64() * 1e3,
        gb(pm)
    );
    println!(
        "| fused-linear | {:.1} ms | {:.2} | {:.3} GB | {:.3} |",
        tf.as_secs_f64() * 1e3,
        tf.as_secs_f64() / tm.as_secs_f64(),
        gb(pf),
        pf as f64 / pm.max(1) as f64
    );
    println!(
        "| fused-linear, frozen head (`linear_head_grad(false)`; {:.2}× the trained head's \
         time) | {:.1} ms | {:.2} | {:.3} GB | {:.3} |",
        tz.as_secs_f64() / tf.as_secs_f64(),
        tz.as_secs_f64() * 1e3,
        tz.as_secs_f64() / tm.as_secs_f64(),
        gb(pz),
        pz as f64 / pm.max(1) as f64
    );
}

fn main() {
    let a = args();
    let (device, name, _) = measure::backend_device(&a.backend);
    run(name, &a, device.autodiff());
}

/// `--sparse K`: the sparse loss from the student's hidden states and head against a top-K
/// teacher (as from a store), against the same loss on materialised logits, and with a frozen
/// head; CPU memory from the counting allocator.
fn run_sparse(name: &str, a: &Args, k: usize, device: Device) {
    use burn_distill::{SparseDistillLossConfig, SparseTeacher};
    let sh = head(a.hs, a.v, 1, a.dtype, &device);
    let hs = filled(a.n, a.hs, 1.0, 3, &device)
        .cast(a.dtype)
        .require_grad();
    let targets: Vec<i64> = (0..a.n)
        .map(|i| {
            if i % 10 == 9 {
                -100
            } else {
                ((i * 7919) % a.v) as i64
            }
        })
        .collect();
    let y = Tensor::<1, Int>::from_data(TensorData::new(targets, [a.n]), &device);
    let indices: Vec<i64> = (0..a.n * k)
        .map(|e| (((e / k) * 131 + (e % k) * 17) % a.v) as i64)
        .collect();
    let log_probs: Vec<f32> = (0..a.n * k).map(|e| -4.5 - 0.05 * (e % k) as f32).collect();
    let teacher = || {
        SparseTeacher::new(
            Tensor::<2, Int>::from_data(TensorData::new(indices.clone(), [a.n, k]), &device),
            Tensor::<2>::from_data(TensorData::new(log_probs.clone(), [a.n, k]), &device),
        )
    };
    let config = DistillLossConfig::new()
        .with_temperature(2.0)
        .with_alpha(0.5)
        .with_linear_chunk_rows(a.chunk_rows);
    let loss = SparseDistillLossConfig::new(config.clone()).init();
    let frozen_loss = SparseDistillLossConfig::new(config.with_linear_head_grad(false)).init();
    let sync = || device.sync().expect("sync");
    let materialised = || {
        drop(
            loss.forward(sh.forward(hs.clone()), teacher(), y.clone())
                .backward(),
        );
        sync();
    };
    let fused = || {
        drop(
            loss.forward_linear(hs.clone(), &sh, teacher(), y.clone())
                .backward(),
        );
        sync();
    };
    let frozen = || {
        drop(
            frozen_loss
                .forward_linear(hs.clone(), &sh, teacher(), y.clone())
                .backward(),
        );
        sync();
    };
    let value = |v: Tensor<1>| v.into_data().iter::<f64>().next().unwrap();
    let (vm, vf) = (
        value(loss.forward(sh.forward(hs.clone()), teacher(), y.clone())),
        value(loss.forward_linear(hs.clone(), &sh, teacher(), y.clone())),
    );
    assert!(
        (vm - vf).abs() <= 1e-4 * vm.abs(),
        "losses differ: {vm} vs {vf}"
    );
    let (tf, pf) = measure(a.reps, &fused);
    let (tm, pm) = measure(a.reps, &materialised);
    let (tz, pz) = measure(a.reps, &frozen);
    let gb = |b: usize| b as f64 / 1e9;
    println!(
        "{name}, {:?}, sparse teacher k = {k} (tail bucket), forward KL, T = 2, α = 0.5, N = {}, \
         H_s = {}, V = {}, fwd+bwd of the student (median of {}; peak heap growth):\n",
        a.dtype, a.n, a.hs, a.v, a.reps
    );
    println!("| path | fwd+bwd | ÷ materialised | peak extra memory | ÷ materialised |");
    println!("|---|---:|---:|---:|---:|");
    for (what, t, p) in [
        ("materialised logits + fused sparse loss", tm, pm),
        ("sparse fused-linear", tf, pf),
        ("sparse fused-linear, frozen head", tz, pz),
    ] {
        println!(
            "| {what} | {:.1} ms | {:.2} | {:.3} GB | {:.3} |",
            t.as_secs_f64() * 1e3,
            t.as_secs_f64() / tm.as_secs_f64(),
            gb(p),
            p as f64 / pm.max(1) as f64
        );
    }
    println!(
        "\nfrozen head ÷ trained head: {:.2}",
        tz.as_secs_f64() / tf.as_secs_f64()
    );
}
