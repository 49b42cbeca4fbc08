//! Distillation inside burn-train's `Learner`: the model of the `TrainStep` holds the frozen
//! teacher and the student; its step computes `DistillLoss` and hands burn-train a
//! `ClassificationOutput`, so loss and accuracy are logged like any classifier's.
//!
//! `cargo run --release --example burn_train [-- EPOCHS [DEVICES]]`
//!
//! With `DEVICES > 1`, burn-train trains data-parallel (`ExecutionStrategy::multi`: each device
//! a replica of teacher and student and a share of every batch, gradients gathered on the main
//! device), with `DistillLoss` unchanged; on Flex (the default) and on wgpu
//! (`--features wgpu`) the devices are copies of the one device. burn-train's DDP strategy
//! (`ExecutionStrategy::ddp`, gradients all-reduced between the devices) is in every build of
//! burn 0.22, but only CUDA implements its all-reduce (NCCL): on Flex it panics ("Distributed
//! operations are not supported"), on wgpu in CubeCL's all-reduce. So `ddp` as a third argument
//! needs `--features cuda` (which downloads LLVM at build time) and trains on CUDA devices
//! `0..DEVICES`; burn 0.21 ran it on wgpu with its `distributed` feature, which 0.22 no longer
//! has.
use burn::data::dataloader::{DataLoaderBuilder, batcher::Batcher};
use burn::data::dataset::InMemDataset;
use burn::module::Module;
use burn::optim::AdamConfig;
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn::train::metric::{AccuracyMetric, LossMetric};
use burn::train::{
    ClassificationOutput, ExecutionStrategy, InferenceStep, Learner, MultiDeviceOptim,
    SupervisedTraining, TrainOutput, TrainStep,
};
use burn_distill::{DistillLoss, DistillLossConfig};

#[path = "mnist/experiment.rs"]
mod experiment;
use experiment::{Digits, Mlp, Settings};

/// The trained module: a frozen teacher beside the student. Only the student is optimised
/// (the teacher's parameters are marked `no_grad`, and it runs on the device without
/// autodiff).
#[derive(Module, Debug)]
struct Distiller {
    teacher: Mlp,
    student: Mlp,
    #[module(skip)]
    loss: DistillLoss,
}

#[derive(Clone, Debug)]
struct Batch {
    images: Tensor<2>,
    labels: Tensor<1, Int>,
}

#[derive(Clone, Debug)]
struct Digit {
    pixels: Vec<f32>,
    label: u8,
}

#[derive(Clone, Default)]
struct DigitBatcher;

impl Batcher<Digit, Batch> for DigitBatcher {
    fn batch(&self, items: Vec<Digit>, device: &Device) -> Batch {
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

impl TrainStep for Distiller {
    type Input = Batch;
    type Output = ClassificationOutput;

    fn step(&self, batch: Batch) -> TrainOutput<ClassificationOutput> {
        // The frozen teacher: forward without autodiff, no graph.
        let teacher_logits = self.teacher.valid().forward(batch.images.clone().inner());
        let logits = self.student.forward(batch.images);
        let loss = self.loss.forward(
            logits.clone(),
            teacher_logits.autodiff(),
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

impl InferenceStep for Distiller {
    type Input = Batch;
    type Output = ClassificationOutput;

    fn step(&self, batch: Batch) -> ClassificationOutput {
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
fn strategy(device: &Device, devices: usize) -> ExecutionStrategy {
    if devices > 1 {
        ExecutionStrategy::multi(
            vec![device.clone(); devices],
            MultiDeviceOptim::OptimMainDevice,
        )
    } else {
        ExecutionStrategy::single(device.clone())
    }
}

/// Trains on `device` (its autodiff form) with the strategy that `strategy` makes of it.
fn run(device: Device, epochs: usize, strategy: impl FnOnce(&Device) -> ExecutionStrategy) {
    let device = device.autodiff();
    let (train, valid) = experiment::load(&experiment::default_data_dir()).expect("bundled MNIST");
    device.seed(0);
    println!("training the teacher (784-1200-1200-10, 5 epochs)…");
    let settings = Settings {
        progress: true,
        ..Settings::default()
    };
    let teacher = Mlp::new(&[1200, 1200], 0.2, 0.5, &device);
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

/// The device of this build: wgpu with `--features wgpu`, else Flex.
fn device() -> Device {
    #[cfg(feature = "wgpu")]
    return Device::wgpu(Default::default());
    #[cfg(not(feature = "wgpu"))]
    return Device::flex();
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
    #[cfg(feature = "cuda")]
    if ddp {
        use burn::tensor::distributed::{DistributedConfig, ReduceOperation};
        let all = (0..devices).map(Device::cuda).collect::<Vec<_>>();
        return run(all[0].clone(), epochs, |_| {
            ExecutionStrategy::ddp(
                all,
                DistributedConfig {
                    all_reduce_op: ReduceOperation::Mean,
                },
            )
        });
    }
    assert!(
        !ddp,
        "burn 0.22's DDP strategy runs on CUDA only: build with --features cuda"
    );
    run(device(), epochs, |d| strategy(d, devices));
}
