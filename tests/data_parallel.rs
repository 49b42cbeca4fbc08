//! Data-parallel distillation with `DistillLoss` unchanged: k workers (threads), each with its
//! own b rows and a replica of the frozen teacher, sum their gradients (an all-reduce, here
//! through `LocalExchange`, parameter by parameter in one order on every worker) and take the
//! same optimiser step. After a few steps their loss and parameters equal those of one worker
//! with the k·b rows.
//!
//! The losses use `Reduction::Normalized { items }` with the kept-token count of the whole
//! global batch (TRL's `num_items_in_batch`), so that ignored rows spread unevenly across the
//! workers still give the global mean. (0.1 all-reduced with burn-collective 0.21's
//! `GradientsParams::all_reduce` on `NdArray`; burn-collective has no 0.22 release, and burn
//! 0.22's own all-reduce runs on CUDA only.)
#![cfg(feature = "flex")]

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_distill::{DistillLossConfig, LocalExchange, Reduction, RowExchange};

const INPUTS: usize = 6;
const CLASSES: usize = 9;
const STEPS: usize = 4;
const LR: f64 = 0.5;

#[derive(Module, Debug)]
struct Mlp {
    hidden: Linear,
    out: Linear,
    act: Relu,
}

impl Mlp {
    fn new(width: usize, device: &Device) -> Self {
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
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
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

/// `grads` summed over the workers, one exchange per parameter in the module's order.
fn all_reduce(grads: &mut GradientsParams, student: &Mlp, exchange: &dyn RowExchange) {
    fn sum<const D: usize>(
        grads: &mut GradientsParams,
        param: &Param<Tensor<D>>,
        exchange: &dyn RowExchange,
    ) {
        let g: Tensor<D> = grads.remove(param.id).expect("a gradient");
        let shape = g.shape();
        let flat = g.reshape([shape.num_elements()]);
        let total = exchange.sum(flat).expect("the sum of the gradients");
        grads.register::<D>(param.id, total.reshape(shape));
    }
    for linear in [&student.hidden, &student.out] {
        sum(grads, &linear.weight, exchange);
        sum(grads, linear.bias.as_ref().unwrap(), exchange);
    }
}

/// `STEPS` SGD steps of one worker on rows `rows` of the global batch, its gradients summed
/// with its peers' when `exchange` is given; returns the per-step losses and the final
/// parameters.
fn train(
    mut student: Mlp,
    teacher: &Mlp,
    rows: std::ops::Range<usize>,
    global_rows: usize,
    exchange: Option<&dyn RowExchange>,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let device = Device::flex().autodiff();
    let (x, y) = data(global_rows);
    let kept = y.iter().filter(|&&t| t != -100).count() as u64;
    let loss_fn = DistillLossConfig::new()
        .with_temperature(2.0)
        .with_alpha(0.8)
        .with_ignore_index(Some(-100))
        .with_reduction(Reduction::Normalized { items: kept })
        .init();
    let x = Tensor::<2>::from_data(
        TensorData::new(
            x[rows.start * INPUTS..rows.end * INPUTS].to_vec(),
            [rows.len(), INPUTS],
        ),
        &device,
    );
    let targets = Tensor::<1, Int>::from_data(
        TensorData::new(y[rows.clone()].to_vec(), [rows.len()]),
        &device,
    );
    // The frozen teacher on the device without autodiff.
    let teacher_logits = teacher.forward(x.clone().inner()).autodiff();
    let mut optim = SgdConfig::new().init();
    let mut losses = Vec::new();
    for _ in 0..STEPS {
        let loss = loss_fn.forward(
            student.forward(x.clone()),
            teacher_logits.clone(),
            targets.clone(),
        );
        losses.push(loss.clone().into_scalar::<f32>());
        let mut grads = GradientsParams::from_grads(loss.backward(), &student);
        if let Some(exchange) = exchange {
            all_reduce(&mut grads, &student, exchange);
        }
        student = optim.step(LR, student, grads);
    }
    let read = |t: Tensor<2>| t.try_into_vec_as::<f32>().unwrap();
    let read_1 = |t: Tensor<1>| t.try_into_vec_as::<f32>().unwrap();
    let params = vec![
        read(student.hidden.weight.val()),
        read(student.out.weight.val()),
        read_1(student.hidden.bias.as_ref().unwrap().val()),
        read_1(student.out.bias.as_ref().unwrap().val()),
    ];
    (losses, params)
}

#[test]
fn k_workers_with_b_rows_equal_one_worker_with_k_b_rows() {
    let device = Device::flex();
    device.seed(7);
    let teacher = Mlp::new(32, &device).initialised();
    // One student, cloned to every worker.
    let student = Mlp::new(12, &device.clone().autodiff()).initialised();
    let b = 5;
    for k in [2, 4] {
        let global = k * b;
        let (want_losses, want_params) = train(student.clone(), &teacher, 0..global, global, None);

        let workers: Vec<_> = LocalExchange::group(k)
            .into_iter()
            .enumerate()
            .map(|(rank, exchange)| {
                let (student, teacher) = (student.clone(), teacher.clone());
                std::thread::spawn(move || {
                    let rows = rank * b..(rank + 1) * b;
                    train(student, &teacher, rows, global, Some(&exchange))
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
