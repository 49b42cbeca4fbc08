//! The minimal distillation loop: a frozen teacher, a student, an optimiser, `DistillLoss`.
//!
//! `cargo run --release --example custom_loop [--features wgpu]`
use burn::module::Module;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Distribution, Tensor};
use burn_distill::DistillLossConfig;

#[derive(Module, Debug)]
struct Mlp {
    hidden: Linear,
    out: Linear,
    act: Relu,
}

impl Mlp {
    fn new(inputs: usize, width: usize, classes: usize, device: &Device) -> Self {
        let hidden = LinearConfig::new(inputs, width).init(device);
        let out = LinearConfig::new(width, classes).init(device);
        Self {
            hidden,
            out,
            act: Relu::new(),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.out.forward(self.act.forward(self.hidden.forward(x)))
    }
}

fn run(device: Device) {
    device.seed(42);
    let (inputs, classes, batch) = (16, 10, 256);
    let tracked = device.clone().autodiff();
    // The frozen teacher lives on the device without autodiff: its forward builds no graph.
    // (Here a wide random network stands in for a trained one; its argmax defines the labels.)
    let teacher = Mlp::new(inputs, 512, classes, &device);
    let mut student = Mlp::new(inputs, 32, classes, &tracked);
    let mut optim = AdamConfig::new().init();
    let loss_fn = DistillLossConfig::new()
        .with_temperature(4.0)
        .with_alpha(0.9)
        .init();

    for step in 0..=300 {
        let x = Tensor::<2>::random([batch, inputs], Distribution::Normal(0.0, 1.0), &tracked);
        let teacher_logits = teacher.forward(x.clone().inner()).mul_scalar(10.0);
        let targets = teacher_logits
            .clone()
            .argmax(1)
            .squeeze_dim::<1>(1)
            .autodiff();
        let student_logits = student.forward(x);
        let agree = student_logits
            .clone()
            .argmax(1)
            .squeeze_dim::<1>(1)
            .equal(targets.clone());
        let accuracy = agree.int().sum().into_scalar::<i64>() as f64 / batch as f64;

        let parts = loss_fn.forward_parts(student_logits, teacher_logits.autodiff(), Some(targets));
        if step % 50 == 0 {
            let soft = parts.soft.clone().into_scalar::<f64>();
            let hard = parts.hard.clone().unwrap().into_scalar::<f64>();
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
    run(Device::wgpu(Default::default()));
    #[cfg(not(feature = "wgpu"))]
    run(Device::flex());
}
