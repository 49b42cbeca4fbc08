//! The speed and memory bars of the port, measured side by side in one run of one binary
//! (Flex, f32, `[N, V] = [2048, 32768]` unless given): the dense fused loss with its gradient
//! against the reference and a streaming pass over the same bytes; the sparse fused loss
//! (k = 20, 64); the fused-linear losses (dense and sparse) and their peak memory against the
//! materialised path; `forward_seq` on `[8, 256, V]` against `forward` on the same rows.
//!
//! ```sh
//! cargo run --release --example bench_bars -- --reps 5
//! cargo run --release --example bench_bars --features wgpu -- --device wgpu --reps 5
//! ```
//! Options: `--device flex|wgpu|vulkan`, `--n`, `--v`, `--hs`, `--ht`, `--reps`, `--skip-reference`.
use std::time::Duration;

use burn::module::Param;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Distribution, Int, Tensor};
use burn_distill::{DistillLossConfig, Kernel, SparseDistillLossConfig, SparseTeacher};

#[path = "../benches/measure.rs"]
mod measure;
use measure::measure;

struct Args {
    device: String,
    n: usize,
    v: usize,
    hs: usize,
    ht: usize,
    reps: usize,
    skip_reference: bool,
}

fn args() -> Args {
    let mut a = Args {
        device: "flex".into(),
        n: 2048,
        v: 32768,
        hs: 512,
        ht: 1024,
        reps: 5,
        skip_reference: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--device" => a.device = value(),
            "--n" => a.n = value().parse().expect("--n N"),
            "--v" => a.v = value().parse().expect("--v V"),
            "--hs" => a.hs = value().parse().expect("--hs H"),
            "--ht" => a.ht = value().parse().expect("--ht H"),
            "--reps" => a.reps = value().parse().expect("--reps K"),
            "--skip-reference" => a.skip_reference = true,
            other => panic!("unknown option {other}"),
        }
    }
    a
}

fn ms(t: Duration) -> f64 {
    t.as_secs_f64() * 1e3
}

/// Waits for the device (a read of one value).
fn sync(t: Tensor<1>) {
    std::hint::black_box(t.into_data());
}

fn head(h: usize, v: usize, device: &Device) -> Linear {
    let mut l = LinearConfig::new(h, v).init(device);
    l.weight = Param::from_tensor(Tensor::random(
        [h, v],
        Distribution::Normal(0.0, 0.05),
        device,
    ));
    l
}

fn main() {
    let a = args();
    let inner = measure::backend_device(&a.device).0;
    let tracked = inner.clone().autodiff();
    let (n, v, reps) = (a.n, a.v, a.reps);
    println!(
        "device {}, f32, [N, V] = [{n}, {v}], median of {reps}\n",
        a.device
    );
    println!("| measurement | time | peak extra memory |");
    println!("|---|---:|---:|");
    let row = |name: &str, (t, peak): (Duration, usize)| {
        println!("| {name} | {:.1} ms | {:.3} GB |", ms(t), peak as f64 / 1e9);
        t
    };

    let student = Tensor::<2>::random([n, v], Distribution::Normal(0.0, 2.0), &inner);
    let teacher = Tensor::<2>::random([n, v], Distribution::Normal(0.0, 2.0), &inner);
    let targets = Tensor::<1, Int>::random([n], Distribution::Uniform(0.0, v as f64), &inner);
    let lifted = |t: &Tensor<2>| t.clone().autodiff();
    let (s_t, t_t, y_t) = (
        lifted(&student),
        lifted(&teacher),
        targets.clone().autodiff(),
    );

    // A streaming pass over the same bytes: read both inputs, write one [N, V] output.
    let stream = row(
        "stream (read 2, write 1)",
        measure(reps, || {
            sync(
                (student.clone() - teacher.clone())
                    .slice([0..1, 0..1])
                    .reshape([1]),
            )
        }),
    );
    let fused_loss = DistillLossConfig::new().with_temperature(2.0).init();
    let fwd_bwd = |loss: &burn_distill::DistillLoss| {
        let s = s_t.clone().require_grad();
        let value = loss.forward(s.clone(), t_t.clone(), y_t.clone());
        let grads = value.backward();
        sync(s.grad(&grads).unwrap().slice([0..1, 0..1]).reshape([1]));
    };
    let fused = row(
        "dense fused, fwd+bwd",
        measure(reps, || fwd_bwd(&fused_loss)),
    );
    println!(
        "| dense fused ÷ stream | {:.2}× | |",
        fused.as_secs_f64() / stream.as_secs_f64()
    );
    if !a.skip_reference {
        let reference = DistillLossConfig::new()
            .with_temperature(2.0)
            .with_kernel(Kernel::Reference)
            .init();
        let r = row(
            "dense reference, fwd+bwd",
            measure(reps.min(3), || fwd_bwd(&reference)),
        );
        println!(
            "| reference ÷ fused | {:.1}× | |",
            r.as_secs_f64() / fused.as_secs_f64()
        );
    }

    // Sequences: `forward_seq` on [8, 256, V] against `forward` on the same 2048 rows.
    if n % 8 == 0 {
        let seq = |t: &Tensor<2>| t.clone().reshape([8, n / 8, v]);
        let (ss, ts, ys) = (
            seq(&student),
            seq(&teacher),
            targets.clone().reshape([8, n / 8]),
        );
        let rows = row(
            "forward (rows)",
            measure(reps, || {
                sync(fused_loss.forward(student.clone(), teacher.clone(), targets.clone()))
            }),
        );
        let seqs = row(
            "forward_seq ([8, N/8, V])",
            measure(reps, || {
                sync(fused_loss.forward_seq(ss.clone(), ts.clone(), ys.clone()))
            }),
        );
        println!(
            "| forward_seq ÷ forward | {:.2}× | |",
            seqs.as_secs_f64() / rows.as_secs_f64()
        );
    }

    // Sparse teachers.
    for k in [20, 64] {
        let sparse =
            SparseDistillLossConfig::new(DistillLossConfig::new().with_temperature(2.0)).init();
        let top = SparseTeacher::from_logits(teacher.clone(), k, 1.0);
        let top = SparseTeacher::new(
            top.indices().clone().autodiff(),
            top.log_probs().clone().autodiff(),
        );
        row(
            &format!("sparse fused k = {k}, fwd+bwd"),
            measure(reps, || {
                let s = s_t.clone().require_grad();
                let value = sparse.forward(s.clone(), top.clone(), y_t.clone());
                let grads = value.backward();
                sync(s.grad(&grads).unwrap().slice([0..1, 0..1]).reshape([1]));
            }),
        );
    }

    // Fused-linear: hidden states and heads, against the materialised logits.
    let (hs, ht) = (a.hs, a.ht);
    let student_head = head(hs, v, &tracked);
    let teacher_head = head(ht, v, &tracked);
    let h_s = Tensor::<2>::random([n, hs], Distribution::Normal(0.0, 1.0), &tracked);
    let h_t = Tensor::<2>::random([n, ht], Distribution::Normal(0.0, 1.0), &tracked);
    let linear_step = |fused: bool| {
        let h = h_s.clone().require_grad();
        let value = if fused {
            fused_loss.forward_linear(
                h.clone(),
                &student_head,
                h_t.clone(),
                &teacher_head,
                y_t.clone(),
            )
        } else {
            let zs = student_head.forward(h.clone());
            let zt = teacher_head.forward(h_t.clone()).detach();
            fused_loss.forward(zs, zt, y_t.clone())
        };
        let grads = value.backward();
        sync(
            student_head
                .weight
                .val()
                .grad(&grads)
                .unwrap()
                .slice([0..1, 0..1])
                .reshape([1]),
        );
    };
    println!("| fused-linear: H_s = {hs}, H_t = {ht} | | |");
    let (lf, pf) = measure(reps, || linear_step(true));
    row("dense fused-linear, fwd+bwd", (lf, pf));
    let (lm, pm) = measure(reps.min(3), || linear_step(false));
    row("dense materialised, fwd+bwd", (lm, pm));
    println!(
        "| fused-linear peak ÷ materialised peak | {:.3} | |",
        pf as f64 / pm.max(1) as f64
    );

    let sparse =
        SparseDistillLossConfig::new(DistillLossConfig::new().with_temperature(2.0)).init();
    let top = SparseTeacher::from_logits(teacher_head.forward(h_t.clone()).inner(), 64, 1.0);
    let top = SparseTeacher::new(
        top.indices().clone().autodiff(),
        top.log_probs().clone().autodiff(),
    );
    row(
        "sparse fused-linear k = 64, fwd+bwd",
        measure(reps, || {
            let h = h_s.clone().require_grad();
            let value = sparse.forward_linear(h.clone(), &student_head, top.clone(), y_t.clone());
            let grads = value.backward();
            sync(
                student_head
                    .weight
                    .val()
                    .grad(&grads)
                    .unwrap()
                    .slice([0..1, 0..1])
                    .reshape([1]),
            );
        }),
    );
}
