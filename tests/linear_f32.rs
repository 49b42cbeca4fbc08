//! The fused-linear loss against the materialised path in f32 on every enabled device (Flex;
//! wgpu, through burn's fusion wrapper where the build enables `fusion`). 0.1 also ran it on
//! NdArray, gone in 0.2: the Flex test is its counterpart.
#![cfg(any(feature = "flex", feature = "wgpu"))]

mod common;

use burn::tensor::DType;
use common::linear::{
    Dev, assert_linear_golden, check_frozen_head, check_sparse_linear, host_calls, sweep,
};

/// f32: per entry `1e-5 + 1e-3·|x|` (the chunked sums of `∂W = Σ h g` are reordered).
const TOL: (f64, f64) = (1e-5, 1e-3);

#[cfg(feature = "flex")]
#[test]
fn flex() {
    let dev = Dev::new(&burn::tensor::Device::flex(), DType::F32);
    let before = host_calls();
    sweep(TOL, &dev);
    // Flex ran its host loop (the sweep's calls with the fused kernel).
    assert!(host_calls() > before);
    assert_linear_golden(TOL, &dev, true);
    check_frozen_head(TOL, &dev);
    let before = host_calls();
    check_sparse_linear(TOL, &dev);
    // The sparse fused-linear loss ran the host loop around the sparse row kernel.
    assert!(host_calls() > before);
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu() {
    let dev = Dev::new(&burn_distill::testing::wgpu_device(), DType::F32);
    let before = burn_distill::internals::chunked_linear_calls();
    sweep(TOL, &dev);
    assert_linear_golden(TOL, &dev, false);
    check_frozen_head(TOL, &dev);
    check_sparse_linear(TOL, &dev);
    // wgpu ran the chunk loop (and never a host loop: each call's path is checked too).
    assert!(burn_distill::internals::chunked_linear_calls() > before);
}

/// f16 hidden states and heads under a loss scale of 65,536 (wgpu): the fused-linear
/// gradients stay finite and equal the f32 run's on the same f16-rounded inputs (the logits
/// differ by the f16 products, so to 1% in L2), where rounding each chunk's gradient to f16
/// before the scale flushed small entries and made the scale `+∞`.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_f16_fused_linear_under_a_loss_scale() {
    use burn::module::Param;
    use burn::nn::Linear;
    use burn::tensor::{Tensor, f16};
    use burn_distill::DistillLossConfig;
    use common::linear::{assert_path, counted, wave};
    let (n, hs, ht, v) = (64, 16, 24, 1031);
    let y: Vec<i64> = (0..n as i64).map(|i| i * 37 % v as i64).collect();
    let run = |dtype: DType| {
        let dev = Dev::new(&burn_distill::testing::wgpu_device(), dtype);
        // The values rounded to f16 (0.1: `.cast(F16).cast(dtype)`), created in `dtype`.
        let t = |len: usize, shape: [usize; 2], seed: f64, scale: f64| -> Tensor<2> {
            let x = wave(len, seed)
                .iter()
                .map(|x| f16::from_f32((x * scale) as f32).to_f64())
                .collect();
            dev.float(x, shape)
        };
        let head = |h: usize, seed: f64| Linear {
            weight: Param::from_tensor(t(h * v, [h, v], seed, 1.5)),
            bias: None,
        };
        let (sh, th) = (head(hs, 0.71), head(ht, 1.37));
        let h_s = t(n * hs, [n, hs], 0.53, 3.0).require_grad();
        let h_t = t(n * ht, [n, ht], 0.29, 3.0);
        assert_eq!(h_s.dtype(), dtype);
        let config = DistillLossConfig::new().with_linear_chunk_rows(Some(16));
        let (loss, runs) = counted(|| {
            config
                .init()
                .forward_linear(h_s.clone(), &sh, h_t, &th, dev.ints(y.clone(), [n]))
        });
        // The chunks ran the fused kernel (the materialised path would round differently).
        let path = dev.path(config.kernel, config.reduction, true);
        assert_path(path, runs, &format!("{dtype:?}"));
        let grads = loss.mul_scalar(65_536.0).backward();
        let f = |g: Tensor<2>| {
            assert_eq!(g.dtype(), dtype);
            common::values(g.cast(DType::F32))
        };
        (
            f(h_s.grad(&grads).unwrap()),
            f(sh.weight.val().grad(&grads).unwrap()),
        )
    };
    let (h16, w16) = run(DType::F16);
    let (h32, w32) = run(DType::F32);
    for (what, a, b) in [("hidden", &h16, &h32), ("weight", &w16, &w32)] {
        assert!(
            a.iter().all(|x| x.is_finite()),
            "{what}: non-finite f16 gradient"
        );
        let err: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
        assert!(
            norm > 0.0 && err <= 1e-2 * norm,
            "{what}: {err} vs norm {norm}"
        );
    }
}

/// The head's gradients from a chunk of 100,000 rows on wgpu, against Flex's (0.1: NdArray's):
/// the bias gradient as a product `1ᵀ g`, like the weight's `hᵀ g` (burn 0.21's column
/// `sum_dim(0)` on wgpu drops rows past about 65,532: a third of every bias entry here).
#[cfg(all(feature = "wgpu", feature = "flex"))]
#[test]
fn wgpu_head_gradients_over_many_rows() {
    use burn::tensor::Device;
    use burn_distill::testing::{mismatches, values};
    use burn_distill::{DistillLossConfig, Reduction};
    use common::linear::{assert_path, counted, head, wave};

    fn head_grads(dev: &Dev) -> (Vec<f64>, Vec<f64>) {
        let (n, h, v) = (100_000, 3, 5);
        let config = DistillLossConfig::new()
            .with_alpha(0.5)
            .with_reduction(Reduction::Sum)
            .with_linear_chunk_rows(Some(n));
        let loss = config.init();
        let (sh, th) = (head(h, v, 0.71, true, dev), head(h, v, 1.37, true, dev));
        let hidden = |seed| dev.float(wave(n * h, seed), [n, h]);
        let targets: Vec<i64> = (0..n).map(|i| ((i * 7) % v) as i64).collect();
        let y = dev.ints(targets, [n]);
        let (value, runs) =
            counted(|| loss.forward_linear(hidden(0.53).require_grad(), &sh, hidden(0.29), &th, y));
        let path = dev.path(config.kernel, config.reduction, true);
        assert_path(path, runs, &format!("{:?}", dev.device));
        let grads = value.mul_scalar(0.5).backward();
        let bias = sh.bias.as_ref().expect("a bias");
        let weight = values(sh.weight.val().grad(&grads).expect("weight gradient"));
        (
            values(bias.val().grad(&grads).expect("bias gradient")),
            weight,
        )
    }
    let cpu = head_grads(&Dev::new(&Device::flex(), DType::F32));
    let gpu = head_grads(&Dev::new(&burn_distill::testing::wgpu_device(), DType::F32));
    // Sums of 100,000 f32 terms in two orders (measured 6.4e-6 of the largest entry apart); a
    // sum that drops rows is off by about a third.
    for (what, cpu, gpu) in [
        ("grad bias", &cpu.0, &gpu.0),
        ("grad weight", &cpu.1, &gpu.1),
    ] {
        let largest = cpu.iter().fold(0f64, |m, g| m.max(g.abs()));
        assert!(largest > 1_000.0, "{what}: a real gradient: {cpu:?}");
        let failures = mismatches(what, gpu, cpu, 4e-5 * largest, 0.0);
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}
