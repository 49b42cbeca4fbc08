//! Distillation inside burn-train's `Learner`: the model of the `TrainStep` holds the frozen
//! teacher and the student; its step computes `DistillLoss` and hands burn-train a
//! `ClassificationOutput`, so loss and accuracy are logged like any classifier's.
//!
//! `cargo run --release --example burn_train [-- EPOCHS [DEVICES]]`
//!
//! With `DEVICES > 1`, burn-train trains data-parallel (`ExecutionStrategy::multi`: each device
//! a replica of teacher and student and a share of every batch, gradients gathered on the main
//! device), with `DistillLoss` unchanged; on the CPU backends the devices are copies of the one
//! CPU device. burn-train's DDP strategy (`ExecutionStrategy::ddp`, gradients all-reduced
//! through burn-collective) needs burn's `distributed` feature, which burn 0.21 only grants to
//! the CubeCL backends: build with `--features wgpu,distributed` (or `cuda,distributed`) and
//! pass `ddp` as a third argument (see docs/parallel.md).
use burn::data::dataloader::{DataLoaderBuilder, batcher::Batcher};
use burn::data::dataset::InMemDataset;
use burn::module::{AutodiffModule, Module};
use burn::optim::AdamConfig;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use burn::train::metric::{AccuracyMetric, LossMetric};
use burn::train::{
    ClassificationOutput, ExecutionStrategy, InferenceStep, Learner, MultiDeviceOptim,
    SupervisedTraining, TrainOutput, TrainStep,
};
use burn_distill::{DistillBackend, DistillLoss, DistillLossConfig};

#[path = "mnist/experiment.rs"]
mod experiment;
use experiment::{Digits, Mlp, Settings};

/// The trained module: a frozen teacher beside the student. Only the student is optimised
/// (the teacher's parameters are marked `no_grad`, and it runs on the inner backend).
#[derive(Module, Debug)]
struct Distiller<B: Backend> {
    teacher: Mlp<B>,
    student: Mlp<B>,
    #[module(skip)]
    loss: DistillLoss,
}

#[derive(Clone, Debug)]
struct Batch<B: Backend> {
    images: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
}

#[derive(Clone, Debug)]
struct Digit {
    pixels: Vec<f32>,
    label: u8,
}

#[derive(Clone, Default)]
struct DigitBatcher;

impl<B: Backend> Batcher<B, Digit, Batch<B>> for DigitBatcher {
    fn batch(&self, items: Vec<Digit>, device: &B::Device) -> Batch<B> {
        let n = items.len();
        let pixels: Vec<f32> = items
            .iter()
            .flat_map(|d| d.pixels.iter().copied())
            .collect();
        let labels: Vec<i64> = items.iter().map(|d| d.label as i64).collect();
        Batch {
            images: Tensor::from_data(TensorData::new(pixels, [n, 784]), device),
            labels: Tensor::from_data(TensorData::new(labels, [n]), device),
        }
    }
}

impl<B: AutodiffBackend + DistillBackend> TrainStep for Distiller<B> {
    type Input = Batch<B>;
    type Output = ClassificationOutput<B>;

    fn step(&self, batch: Batch<B>) -> TrainOutput<ClassificationOutput<B>> {
        // The frozen teacher: forward on the inner backend, no graph.
        let teacher_logits = self.teacher.valid().forward(batch.images.clone().inner());
        let logits = self.student.forward(batch.images);
        let loss = self.loss.forward(
            logits.clone(),
            Tensor::from_inner(teacher_logits),
            batch.labels.clone(),
        );
        let output = ClassificationOutput {
            loss: loss.clone(),
            output: logits,
            targets: batch.labels,
        };
        TrainOutput::new(self, loss.backward(), output)
    }
}

impl<B: Backend + DistillBackend> InferenceStep for Distiller<B> {
    type Input = Batch<B>;
    type Output = ClassificationOutput<B>;

    fn step(&self, batch: Batch<B>) -> ClassificationOutput<B> {
        let teacher_logits = self.teacher.forward(batch.images.clone());
        let logits = self.student.forward(batch.images);
        let loss = self
            .loss
            .forward(logits.clone(), teacher_logits, batch.labels.clone());
        ClassificationOutput {
            loss,
            output: logits,
            targets: batch.labels,
        }
    }
}

fn dataset(d: &Digits) -> InMemDataset<Digit> {
    InMemDataset::new(
        (0..d.len())
            .map(|i| Digit {
                pixels: d.images[i * 784..(i + 1) * 784].to_vec(),
                label: d.labels[i],
            })
            .collect(),
    )
}

/// How burn-train spreads the training over `devices` copies of `device`.
fn strategy<B: AutodiffBackend>(device: &B::Device, devices: usize) -> ExecutionStrategy<B> {
    if devices > 1 {
        ExecutionStrategy::multi(
            vec![device.clone(); devices],
            MultiDeviceOptim::OptimMainDevice,
        )
    } else {
        ExecutionStrategy::single(device.clone())
    }
}

fn run<B: AutodiffBackend + DistillBackend>(
    device: B::Device,
    epochs: usize,
    strategy: impl FnOnce(&B::Device) -> ExecutionStrategy<B>,
) where
    B::InnerBackend: DistillBackend,
{
    let (train, valid) = experiment::load(&experiment::default_data_dir()).expect("bundled MNIST");
    B::seed(&device, 0);
    println!("training the teacher (784-1200-1200-10, 5 epochs)…");
    let settings = Settings {
        progress: true,
        ..Settings::default()
    };
    let teacher = Mlp::<B>::new(&[1200, 1200], 0.2, 0.5, &device);
    let teacher = experiment::train_hard(teacher, &train, 5, 0, &settings).no_grad();

    let model = Distiller {
        teacher,
        student: Mlp::new(&[128], 0.0, 0.0, &device),
        loss: DistillLossConfig::new()
            .with_temperature(4.0)
            .with_alpha(0.9)
            .init(),
    };
    let loader_train = DataLoaderBuilder::new(DigitBatcher)
        .batch_size(128)
        .shuffle(0)
        .build(dataset(&train));
    let loader_valid = DataLoaderBuilder::new(DigitBatcher)
        .batch_size(500)
        .build(dataset(&valid));
    let artifacts = std::env::temp_dir().join("burn-distill-burn-train");
    let training = SupervisedTraining::new(&artifacts, loader_train, loader_valid)
        .metrics((AccuracyMetric::new(), LossMetric::new()))
        .num_epochs(epochs)
        .with_training_strategy(strategy(&device).into())
        .summary();
    let result = training.launch(Learner::new(model, AdamConfig::new().init(), 1e-3));
    let _student = result.model.student;
    println!("done; burn-train's logs are in {}", artifacts.display());
}

fn main() {
    let mut args = std::env::args().skip(1);
    let epochs = args.next().and_then(|e| e.parse().ok()).unwrap_or(5);
    let devices: usize = args.next().and_then(|d| d.parse().ok()).unwrap_or(1);
    let ddp = args.next().as_deref() == Some("ddp");
    println!(
        "{epochs} epochs on {devices} device(s){}",
        if ddp { ", DDP" } else { "" }
    );
    use burn::backend::Autodiff;
    #[cfg(all(feature = "wgpu", feature = "distributed"))]
    if ddp {
        use burn::tensor::backend::distributed::{DistributedConfig, ReduceOperation};
        type B = Autodiff<burn::backend::Wgpu>;
        return run::<B>(Default::default(), epochs, |device| {
            ExecutionStrategy::ddp(
                vec![device.clone(); devices],
                DistributedConfig {
                    all_reduce_op: ReduceOperation::Mean,
                },
            )
        });
    }
    assert!(!ddp, "the DDP strategy needs --features wgpu,distributed");
    #[cfg(feature = "wgpu")]
    run::<Autodiff<burn::backend::Wgpu>>(Default::default(), epochs, |d| strategy(d, devices));
    #[cfg(all(feature = "flex", not(feature = "wgpu")))]
    run::<Autodiff<burn::backend::Flex>>(Default::default(), epochs, |d| strategy(d, devices));
    #[cfg(all(feature = "ndarray", not(any(feature = "flex", feature = "wgpu"))))]
    run::<Autodiff<burn::backend::NdArray>>(Default::default(), epochs, |d| strategy(d, devices));
}
