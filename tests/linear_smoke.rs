//! The fused-linear losses against the materialised loss: loss and gradients (hidden states,
//! head weight and bias) on Flex (f64) and wgpu, dense and sparse teachers, with ignored rows,
//! a soft-cap, chunks of 1, 3 and all rows, and an upstream gradient that is not 1.

use burn::module::Param;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use burn_distill::{
    DistillLossConfig, Divergence, Reduction, SparseDistillLossConfig, SparseTeacher,
};

fn values<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data().iter::<f64>().collect()
}

fn stream(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn tensor<const D: usize>(
    v: Vec<f64>,
    shape: [usize; D],
    device: &Device,
    dtype: DType,
) -> Tensor<D> {
    Tensor::from_data(TensorData::new(v, shape), (device, dtype))
}

fn head(h: usize, v: usize, seed: u64, device: &Device, dtype: DType) -> Linear {
    let mut l = LinearConfig::new(h, v).init(device);
    l.weight = Param::from_tensor(tensor(stream(seed, h * v, 0.5), [h, v], device, dtype));
    l.bias = Some(Param::from_tensor(tensor(
        stream(seed + 1, v, 0.5),
        [v],
        device,
        dtype,
    )));
    l
}

fn close(what: &str, a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

/// Runs of the fused paths so far: Flex's host loop, and the chunk loop as tensor code.
fn fused_runs() -> [usize; 2] {
    [
        burn_distill::internals::host_linear_calls(),
        burn_distill::internals::chunked_linear_calls(),
    ]
}

/// `f()` ran the fused path `expected` (`0`: Flex's host loop, `1`: the chunk loop) once.
fn ran_fused<T>(expected: usize, f: impl FnOnce() -> T) -> T {
    let before = fused_runs();
    let out = f();
    let after = fused_runs();
    let mut want = before;
    want[expected] += 1;
    assert_eq!(after, want, "the fused path ran (host loop, chunks)");
    out
}

fn check(device: &Device, dtype: DType, tol: f64) {
    let host = matches!(device.as_dispatch(), burn::backend::DispatchDevice::Flex(_));
    let path = if host { 0 } else { 1 };
    let device = &device.clone().autodiff();
    let (n, hs, ht, v) = (7, 5, 6, 11);
    let targets = Tensor::<1, Int>::from_ints([3, -100, 0, 10, 2, -100, 7], device);
    for (chunk, cap, div) in [
        (1, None, Divergence::ForwardKl),
        (3, Some(2.5), Divergence::Jsd { beta: 0.5 }),
        (64, None, Divergence::ReverseKl),
    ] {
        let config = DistillLossConfig::new()
            .with_temperature(2.0)
            .with_alpha(0.7)
            .with_divergence(div)
            .with_logit_softcap(cap)
            .with_linear_chunk_rows(Some(chunk))
            .with_reduction(Reduction::Mean);
        let loss = config.init();
        let student_head = head(hs, v, 1, device, dtype);
        let teacher_head = head(ht, v, 7, device, dtype);
        let h_s = tensor(stream(3, n * hs, 1.5), [n, hs], device, dtype).require_grad();
        let h_t = tensor(stream(4, n * ht, 1.5), [n, ht], device, dtype);
        let run = |fused: bool| {
            let value = if fused {
                loss.forward_linear(
                    h_s.clone(),
                    &student_head,
                    h_t.clone(),
                    &teacher_head,
                    targets.clone(),
                )
            } else {
                let zs = student_head.forward(h_s.clone());
                let zt = teacher_head.forward(h_t.clone());
                loss.forward(zs, zt, targets.clone())
            };
            // An upstream gradient of 0.75.
            let grads = value.clone().mul_scalar(0.75).backward();
            let g = |t: Tensor<2>| values(t.grad(&grads).unwrap());
            (
                values(value),
                g(h_s.clone()),
                g(student_head.weight.val()),
                values(
                    student_head
                        .bias
                        .as_ref()
                        .unwrap()
                        .val()
                        .grad(&grads)
                        .unwrap(),
                ),
            )
        };
        let (f, m) = (ran_fused(path, || run(true)), run(false));
        close("loss", &f.0, &m.0, tol);
        close("grad hidden", &f.1, &m.1, tol);
        close("grad weight", &f.2, &m.2, tol);
        close("grad bias", &f.3, &m.3, tol);

        // Sparse: the teacher's top-4 of its logits.
        let sparse = SparseDistillLossConfig::new(config).init();
        let teacher = SparseTeacher::from_logits(teacher_head.forward(h_t.clone()), 4, 1.0);
        let run = |fused: bool| {
            let value = if fused {
                sparse.forward_linear(h_s.clone(), &student_head, teacher.clone(), targets.clone())
            } else {
                sparse.forward(
                    student_head.forward(h_s.clone()),
                    teacher.clone(),
                    targets.clone(),
                )
            };
            let grads = value.clone().mul_scalar(0.75).backward();
            (
                values(value),
                values(h_s.grad(&grads).unwrap()),
                values(student_head.weight.val().grad(&grads).unwrap()),
            )
        };
        let (f, m) = (ran_fused(path, || run(true)), run(false));
        close("sparse loss", &f.0, &m.0, tol);
        close("sparse grad hidden", &f.1, &m.1, tol);
        close("sparse grad weight", &f.2, &m.2, tol);
    }
}

#[test]
fn flex_f64() {
    check(&Device::flex(), DType::F64, 1e-10);
}

#[test]
fn flex_f32() {
    check(&Device::flex(), DType::F32, 1e-5);
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_f32() {
    check(&burn_distill::testing::wgpu_device(), DType::F32, 1e-5);
}
