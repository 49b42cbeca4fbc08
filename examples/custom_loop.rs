//! The minimal distillation loop: a frozen teacher, a student, an optimiser, `DistillLoss`.
//!
//! `cargo run --release --example custom_loop [--features wgpu|flex]`
use burn::module::Module;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, ElementConversion, Tensor};
use burn_distill::{DistillBackend, DistillLossConfig};

#[derive(Module, Debug)]
struct Mlp<B: Backend> {
    hidden: Linear<B>,
    out: Linear<B>,
    act: Relu,
}

impl<B: Backend> Mlp<B> {
    fn new(inputs: usize, width: usize, classes: usize, device: &B::Device) -> Self {
        let hidden = LinearConfig::new(inputs, width).init(device);
        let out = LinearConfig::new(width, classes).init(device);
        Self {
            hidden,
            out,
            act: Relu::new(),
        }
    }
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.out.forward(self.act.forward(self.hidden.forward(x)))
    }
}

fn run<B: AutodiffBackend + DistillBackend>(device: B::Device) {
    B::seed(&device, 42);
    let (inputs, classes, batch) = (16, 10, 256);
    // The frozen teacher lives on the inner backend: its forward builds no autodiff graph.
    // (Here a wide random network stands in for a trained one; its argmax defines the labels.)
    let teacher = Mlp::<B::InnerBackend>::new(inputs, 512, classes, &device);
    let mut student = Mlp::<B>::new(inputs, 32, classes, &device);
    let mut optim = AdamConfig::new().init();
    let loss_fn = DistillLossConfig::new()
        .with_temperature(4.0)
        .with_alpha(0.9)
        .init();

    for step in 0..=300 {
        let x = Tensor::<B, 2>::random([batch, inputs], Distribution::Normal(0.0, 1.0), &device);
        let teacher_logits = teacher.forward(x.clone().inner()).mul_scalar(10.0);
        let targets = Tensor::from_inner(teacher_logits.clone().argmax(1).squeeze_dim(1));
        let student_logits = student.forward(x);
        let agree = student_logits
            .clone()
            .argmax(1)
            .squeeze_dim::<1>(1)
            .equal(targets.clone());
        let accuracy = agree.int().sum().into_scalar().elem::<f64>() / batch as f64;

        let parts = loss_fn.forward_parts(
            student_logits,
            Tensor::from_inner(teacher_logits),
            Some(targets),
        );
        if step % 50 == 0 {
            let (soft, hard) = (
                parts.soft.into_scalar().elem::<f64>(),
                parts.hard.unwrap().into_scalar().elem::<f64>(),
            );
            println!(
                "step {step:3}  soft {soft:.4}  hard {hard:.4}  agreement with teacher {accuracy:.3}"
            );
        }
        let grads = GradientsParams::from_grads(parts.loss.backward(), &student);
        student = optim.step(1e-2, student, grads);
    }
}

fn main() {
    #[cfg(feature = "wgpu")]
    run::<burn::backend::Autodiff<burn::backend::Wgpu>>(Default::default());
    #[cfg(all(feature = "flex", not(feature = "wgpu")))]
    run::<burn::backend::Autodiff<burn::backend::Flex>>(Default::default());
    #[cfg(all(feature = "ndarray", not(any(feature = "flex", feature = "wgpu"))))]
    run::<burn::backend::Autodiff<burn::backend::NdArray>>(Default::default());
}
