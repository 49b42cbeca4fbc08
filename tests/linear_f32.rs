//! The fused-linear loss against the materialised path in f32 on every enabled backend
//! (NdArray, Flex, wgpu through burn's fusion wrapper).
#![cfg(feature = "ndarray")]

mod common;

use burn::backend::Autodiff;
use common::linear::{assert_linear_golden, check_frozen_head, check_sparse_linear, sweep};

/// f32: per entry `1e-5 + 1e-3·|x|` (the chunked sums of `∂W = Σ h g` are reordered).
const TOL: (f64, f64) = (1e-5, 1e-3);

#[test]
fn ndarray() {
    sweep::<Autodiff<burn::backend::NdArray>>(TOL, &Default::default());
    assert_linear_golden::<Autodiff<burn::backend::NdArray>>(TOL, &Default::default(), true);
    check_frozen_head::<Autodiff<burn::backend::NdArray>>(TOL, &Default::default());
    let before = burn_distill::internals::host_linear_calls();
    check_sparse_linear::<Autodiff<burn::backend::NdArray>>(TOL, &Default::default());
    // The sparse fused-linear loss ran the host loop around the sparse row kernel.
    assert!(burn_distill::internals::host_linear_calls() > before);
}

#[cfg(feature = "flex")]
#[test]
fn flex() {
    let before = burn_distill::internals::host_linear_calls();
    sweep::<Autodiff<burn::backend::Flex>>(TOL, &Default::default());
    // Flex ran its host loop (the sweep's calls with the fused kernel).
    assert!(burn_distill::internals::host_linear_calls() > before);
    assert_linear_golden::<Autodiff<burn::backend::Flex>>(TOL, &Default::default(), true);
    check_frozen_head::<Autodiff<burn::backend::Flex>>(TOL, &Default::default());
    let before = burn_distill::internals::host_linear_calls();
    check_sparse_linear::<Autodiff<burn::backend::Flex>>(TOL, &Default::default());
    // The sparse fused-linear loss ran the host loop around the sparse row kernel.
    assert!(burn_distill::internals::host_linear_calls() > before);
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu() {
    let device = burn_distill::testing::wgpu_device();
    sweep::<Autodiff<burn::backend::Wgpu>>(TOL, &device);
    assert_linear_golden::<Autodiff<burn::backend::Wgpu>>(TOL, &device, false);
    check_frozen_head::<Autodiff<burn::backend::Wgpu>>(TOL, &device);
    check_sparse_linear::<Autodiff<burn::backend::Wgpu>>(TOL, &device);
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
    use burn::tensor::{DType, Int, Tensor, TensorData};
    use burn_distill::DistillLossConfig;
    use common::linear::wave;
    type W = Autodiff<burn::backend::Wgpu>;
    let device = burn_distill::testing::wgpu_device();
    let (n, hs, ht, v) = (64, 16, 24, 1031);
    let t = |len: usize, shape: [usize; 2], seed: f64, scale: f64, dtype: DType| {
        let x: Vec<f64> = wave(len, seed).iter().map(|x| x * scale).collect();
        Tensor::<W, 2>::from_data(TensorData::new(x, shape), &device)
            .cast(DType::F16)
            .cast(dtype)
    };
    let y = Tensor::<W, 1, Int>::from_data(
        TensorData::new((0..n as i64).map(|i| i * 37 % v as i64).collect(), [n]),
        &device,
    );
    let run = |dtype: DType| {
        let head = |h: usize, seed: f64| Linear {
            weight: Param::from_tensor(t(h * v, [h, v], seed, 1.5, dtype)),
            bias: None,
        };
        let (sh, th) = (head(hs, 0.71), head(ht, 1.37));
        let h_s = t(n * hs, [n, hs], 0.53, 3.0, dtype).require_grad();
        let h_t = t(n * ht, [n, ht], 0.29, 3.0, dtype);
        let loss = DistillLossConfig::new()
            .with_linear_chunk_rows(Some(16))
            .init()
            .forward_linear(h_s.clone(), &sh, h_t, &th, y.clone());
        let grads = loss.mul_scalar(65_536.0).backward();
        let f = |g: Tensor<burn::backend::Wgpu, 2>| {
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

/// The head's gradients from a chunk of 100,000 rows on wgpu, against NdArray's: the bias
/// gradient as a product `1ᵀ g`, like the weight's `hᵀ g` (burn 0.21's column `sum_dim(0)` on
/// wgpu drops rows past about 65,532: a third of every bias entry here).
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_head_gradients_over_many_rows() {
    use burn::tensor::{Int, Tensor, TensorData, backend::AutodiffBackend};
    use burn_distill::testing::{mismatches, values};
    use burn_distill::{DistillBackend, DistillLossConfig, Reduction};
    use common::linear::{head, wave};

    fn head_grads<B>(device: &B::Device) -> (Vec<f64>, Vec<f64>)
    where
        B: AutodiffBackend + DistillBackend,
    {
        let (n, h, v) = (100_000, 3, 5);
        let loss = DistillLossConfig::new()
            .with_alpha(0.5)
            .with_reduction(Reduction::Sum)
            .with_linear_chunk_rows(Some(n))
            .init();
        let (sh, th) = (
            head::<B>(h, v, 0.71, true, device),
            head::<B>(h, v, 1.37, true, device),
        );
        let hidden =
            |seed| Tensor::<B, 2>::from_data(TensorData::new(wave(n * h, seed), [n, h]), device);
        let targets: Vec<i64> = (0..n).map(|i| ((i * 7) % v) as i64).collect();
        let y = Tensor::<B, 1, Int>::from_data(TensorData::new(targets, [n]), device);
        let value = loss.forward_linear(hidden(0.53).require_grad(), &sh, hidden(0.29), &th, y);
        let grads = value.mul_scalar(0.5).backward();
        let bias = sh.bias.as_ref().expect("a bias");
        let weight = values(sh.weight.val().grad(&grads).expect("weight gradient"));
        (
            values(bias.val().grad(&grads).expect("bias gradient")),
            weight,
        )
    }
    let cpu = head_grads::<Autodiff<burn::backend::NdArray>>(&Default::default());
    let gpu = head_grads::<Autodiff<burn::backend::Wgpu>>(&burn_distill::testing::wgpu_device());
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
