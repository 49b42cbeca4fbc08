//! Data-parallel distillation with `DistillLoss` unchanged: k workers (threads, peers of
//! burn-collective on NdArray), each with its own b rows and a replica of the frozen teacher,
//! all-reduce their gradients (`GradientsParams::all_reduce`, what burn's data-parallel training
//! does) and take the same optimiser step. After a few steps their loss and parameters equal
//! those of one worker with the k·b rows.
//!
//! The losses use `Reduction::Normalized { items }` with the kept-token count of the whole
//! global batch (TRL's `num_items_in_batch`), so that ignored rows spread unevenly across the
//! workers still give the global mean.
#![cfg(all(feature = "collective", feature = "ndarray"))]

use std::sync::Mutex;

use burn::backend::{Autodiff, NdArray};
use burn::collective::{
    CollectiveConfig, PeerId, ReduceOperation, finish_collective, register, reset_collective,
};
use burn::module::Module;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use burn_distill::{DistillLossConfig, Reduction};

type Inner = NdArray<f32>;
type B = Autodiff<Inner>;

static COLLECTIVE: Mutex<()> = Mutex::new(());

const INPUTS: usize = 6;
const CLASSES: usize = 9;
const STEPS: usize = 4;
const LR: f64 = 0.5;

#[derive(Module, Debug)]
struct Mlp<B: Backend> {
    hidden: Linear<B>,
    out: Linear<B>,
    act: Relu,
}

impl<B: Backend> Mlp<B> {
    fn new(width: usize, device: &B::Device) -> Self {
        Self {
            hidden: LinearConfig::new(INPUTS, width).init(device),
            out: LinearConfig::new(width, CLASSES).init(device),
            act: Relu::new(),
        }
    }
    /// Initialises the (lazy) parameters now, so that clones share their values: an
    /// uninitialised `Param` would draw new random values in each clone.
    fn initialised(self) -> Self {
        for linear in [&self.hidden, &self.out] {
            let _ = linear.weight.val();
            let _ = linear.bias.as_ref().map(|b| b.val());
        }
        self
    }
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.out.forward(self.act.forward(self.hidden.forward(x)))
    }
}

/// `rows` deterministic inputs and targets; every 4th row ignored (`−100`), so that the
/// workers' shares of kept rows differ.
fn data(rows: usize) -> (Vec<f32>, Vec<i64>) {
    let x = (0..rows * INPUTS)
        .map(|i| ((i * 37 % 101) as f32 / 101.0 - 0.5) * 3.0)
        .collect();
    let y = (0..rows)
        .map(|r| {
            if r % 4 == 1 {
                -100
            } else {
                (r * 5 % CLASSES) as i64
            }
        })
        .collect();
    (x, y)
}

/// `STEPS` SGD steps of one worker on rows `rows` of the global batch, its gradients summed
/// with its peers' when `peer` is given; returns the per-step losses and the final parameters.
fn train(
    mut student: Mlp<B>,
    teacher: &Mlp<Inner>,
    rows: std::ops::Range<usize>,
    global_rows: usize,
    peer: Option<PeerId>,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let device = Default::default();
    let (x, y) = data(global_rows);
    let kept = y.iter().filter(|&&t| t != -100).count() as u64;
    let loss_fn = DistillLossConfig::new()
        .with_temperature(2.0)
        .with_alpha(0.8)
        .with_ignore_index(Some(-100))
        .with_reduction(Reduction::Normalized { items: kept })
        .init();
    let x = Tensor::<B, 2>::from_data(
        TensorData::new(
            x[rows.start * INPUTS..rows.end * INPUTS].to_vec(),
            [rows.len(), INPUTS],
        ),
        &device,
    );
    let targets = Tensor::<B, 1, Int>::from_ints(&y[rows.clone()], &device);
    let teacher_logits = Tensor::<B, 2>::from_inner(teacher.forward(x.clone().inner()));
    let mut optim = SgdConfig::new().init();
    let mut losses = Vec::new();
    for _ in 0..STEPS {
        let loss = loss_fn.forward(
            student.forward(x.clone()),
            teacher_logits.clone(),
            targets.clone(),
        );
        losses.push(loss.clone().into_scalar());
        let mut grads = GradientsParams::from_grads(loss.backward(), &student);
        if let Some(peer) = peer {
            grads = grads
                .all_reduce::<Inner>(peer, ReduceOperation::Sum)
                .expect("all-reduce of the gradients");
        }
        student = optim.step(LR, student, grads);
    }
    let params = [student.hidden.weight.val(), student.out.weight.val()]
        .into_iter()
        .map(|w| w.into_data().to_vec::<f32>().unwrap())
        .chain(
            [&student.hidden.bias, &student.out.bias]
                .into_iter()
                .map(|b| {
                    b.as_ref()
                        .unwrap()
                        .val()
                        .into_data()
                        .to_vec::<f32>()
                        .unwrap()
                }),
        )
        .collect();
    (losses, params)
}

#[test]
fn k_workers_with_b_rows_equal_one_worker_with_k_b_rows() {
    let _lock = COLLECTIVE.lock().unwrap_or_else(|e| e.into_inner());
    let device = Default::default();
    Inner::seed(&device, 7);
    let teacher = Mlp::<Inner>::new(32, &device).initialised();
    // One student, cloned to every worker: the replicas share their parameter ids, which
    // `GradientsParams::all_reduce` orders its all-reduces by.
    let student = Mlp::<B>::new(12, &device).initialised();
    let b = 5;
    for k in [2, 4] {
        let global = k * b;
        let (want_losses, want_params) = train(student.clone(), &teacher, 0..global, global, None);

        reset_collective::<Inner>();
        let config = CollectiveConfig::default().with_num_devices(k);
        let workers: Vec<_> = (0..k)
            .map(|rank| {
                let (student, teacher, config) = (student.clone(), teacher.clone(), config.clone());
                std::thread::spawn(move || {
                    let peer = PeerId::from(rank as u32);
                    register::<Inner>(peer, Default::default(), config).expect("register");
                    let out = train(
                        student,
                        &teacher,
                        rank * b..(rank + 1) * b,
                        global,
                        Some(peer),
                    );
                    finish_collective::<Inner>(peer).expect("finish");
                    out
                })
            })
            .collect();
        let outputs: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();

        for step in 0..STEPS {
            // The workers' Normalized losses sum to the global mean.
            let total: f32 = outputs.iter().map(|(losses, _)| losses[step]).sum();
            let want = want_losses[step];
            assert!(
                (total - want).abs() <= 1e-5 * want.abs().max(1.0),
                "k = {k}, step {step}: workers' losses sum to {total}, one worker {want}"
            );
        }
        assert!(
            want_losses[STEPS - 1] < want_losses[0] - 1e-3,
            "training moves the loss: {want_losses:?}"
        );
        for (rank, (_, params)) in outputs.iter().enumerate() {
            for (p, (got, want)) in params.iter().zip(&want_params).enumerate() {
                for (i, (g, w)) in got.iter().zip(want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-5 + 1e-5 * w.abs(),
                        "k = {k}, worker {rank}, parameter {p}[{i}]: {g} vs one worker's {w}"
                    );
                }
            }
            assert_eq!(
                params, &outputs[0].1,
                "every worker holds the same parameters"
            );
        }
    }
}
