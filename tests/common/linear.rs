//! The fused-linear loss against `forward` on materialised logits (`hidden · W + b`): loss and
//! the gradients of the student's hidden states, head weight and bias.
//!
//! 0.1 took a backend type `B` (`Autodiff<NdArray<f64>>`, …), which fixed the float type too;
//! here a [`Dev`] names the device and the dtype every float tensor is created in. Where a
//! test compares the fused-linear path with the materialised one, the hooks of
//! `burn_distill::internals` say which path ran ([`Dev::path`]): the values agree either way.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use burn_distill::testing::{mismatches, values};
use burn_distill::{DistillLossConfig, Kernel, Reduction};

/// Deterministic values in about [-1, 1].
pub fn wave(len: usize, seed: f64) -> Vec<f64> {
    (0..len)
        .map(|i| ((i as f64 + 1.0) * seed).sin() * 0.9 + ((i as f64) * 0.37 + seed).cos() * 0.1)
        .map(|x| x as f32 as f64)
        .collect()
}

/// Where a test runs: a device with autodiff, and the float dtype of every tensor it creates.
#[derive(Clone, Debug)]
pub struct Dev {
    pub device: Device,
    pub dtype: DType,
}

/// The path a fused-linear call took, as the hooks of `burn_distill::internals` count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Flex's host loop (`kernel/linear_cpu.rs`), f32 and f64.
    Host,
    /// The chunk loop as tensor code (fused kernels per chunk, or the reference kernel per
    /// chunk without a gradient).
    Chunks,
    /// The logits materialised, through autodiff (`Kernel::Reference` or `Reduction::PerRow`
    /// with a gradient).
    Materialised,
}

impl Dev {
    /// `device` (with autodiff) creating its float tensors in `dtype`.
    pub fn new(device: &Device, dtype: DType) -> Self {
        Self {
            device: device.clone().autodiff(),
            dtype,
        }
    }

    /// Float64 on Flex (0.1's `Autodiff<NdArray<f64>>`).
    #[cfg(feature = "flex")]
    pub fn flex_f64() -> Self {
        Self::new(&Device::flex(), DType::F64)
    }

    /// `[D]`-rank float tensor of row-major values, in this dtype.
    pub fn float<const D: usize>(&self, values: Vec<f64>, shape: [usize; D]) -> Tensor<D> {
        Tensor::from_data(TensorData::new(values, shape), (&self.device, self.dtype))
    }

    /// `[D]`-rank int tensor.
    pub fn ints<const D: usize>(&self, values: Vec<i64>, shape: [usize; D]) -> Tensor<D, Int> {
        Tensor::from_data(TensorData::new(values, shape), &self.device)
    }

    /// Does a fused-linear loss run Flex's host loop here (Flex, f32 or f64)?
    pub fn host_loop(&self) -> bool {
        cfg!(feature = "flex")
            && matches!(self.dtype, DType::F32 | DType::F64)
            && is_flex(&self.device)
    }

    /// The path a fused-linear loss with `kernel` and `reduction` takes here, with a gradient
    /// (a tracked student) or without.
    pub fn path(&self, kernel: Kernel, reduction: Reduction, with_grad: bool) -> Path {
        if with_grad && (reduction == Reduction::PerRow || kernel == Kernel::Reference) {
            Path::Materialised
        } else if kernel != Kernel::Reference && self.host_loop() {
            Path::Host
        } else {
            Path::Chunks
        }
    }
}

#[cfg(feature = "flex")]
fn is_flex(device: &Device) -> bool {
    device.clone().inner() == Device::flex()
}

#[cfg(not(feature = "flex"))]
fn is_flex(_: &Device) -> bool {
    false
}

/// Runs of Flex's host loop on this thread so far (none without Flex).
pub fn host_calls() -> usize {
    #[cfg(feature = "flex")]
    {
        burn_distill::internals::host_linear_calls()
    }
    #[cfg(not(feature = "flex"))]
    {
        0
    }
}

/// `f()`, and the runs of `[host loop, chunk loop]` it made.
pub fn counted<T>(f: impl FnOnce() -> T) -> (T, [usize; 2]) {
    let chunks = burn_distill::internals::chunked_linear_calls;
    let before = [host_calls(), chunks()];
    let out = f();
    (out, [host_calls() - before[0], chunks() - before[1]])
}

/// Asserts that one fused-linear call made the runs `runs` of `path`. A materialised call
/// runs no host loop (the chunk loop's hook may count one start: it counts a run when the loop
/// begins, and `Kernel::Reference` with a gradient leaves it at its first chunk).
pub fn assert_path(path: Path, runs: [usize; 2], what: &str) {
    match path {
        Path::Host => assert_eq!(runs, [1, 0], "{what}: the host loop ran once"),
        Path::Chunks => assert_eq!(runs, [0, 1], "{what}: the chunk loop ran once"),
        Path::Materialised => assert_eq!(runs[0], 0, "{what}: no host loop"),
    }
}

/// A linear head `h → v` with the given weight and optional bias values.
pub fn head(h: usize, v: usize, seed: f64, bias: bool, dev: &Dev) -> Linear {
    let weight = dev.float(wave(h * v, seed), [h, v]);
    let bias = bias.then(|| Param::from_tensor(dev.float(wave(v, seed + 0.5), [v])));
    Linear {
        weight: Param::from_tensor(weight),
        bias,
    }
}

/// One fused-linear problem.
#[derive(Clone, Debug)]
pub struct LinearCase {
    pub n: usize,
    pub hs: usize,
    pub ht: usize,
    pub vs: usize,
    pub vt: usize,
    pub bias: bool,
    /// `None`: `forward_linear_soft`.
    pub targets: Option<Vec<i64>>,
    /// Scale of the hidden states (sets how peaked the logits are).
    pub scale: f64,
    /// Hidden states given as transposed views of `[H, N]` tensors, and the student's head
    /// weight as the transpose of a `[V, H]` tensor (a tied embedding): strided, not row-major.
    pub transposed: bool,
}

impl LinearCase {
    pub fn new(n: usize, hs: usize, ht: usize, v: usize) -> Self {
        let targets = (0..n)
            .map(|i| {
                if i % 4 == 2 {
                    -100
                } else {
                    ((i * 7) % v) as i64
                }
            })
            .collect();
        Self {
            n,
            hs,
            ht,
            vs: v,
            vt: v,
            bias: true,
            targets: Some(targets),
            scale: 2.0,
            transposed: false,
        }
    }
}

/// Loss values and gradients (hidden, weight, bias) of the fused-linear path and of the
/// materialised path; asserts they agree to `(abs, rel)` per entry, and that the fused-linear
/// calls took the path [`Dev::path`] names (with the gradient, and forward only).
pub fn check_linear(
    config: &DistillLossConfig,
    case: &LinearCase,
    (abs, rel): (f64, f64),
    dev: &Dev,
) {
    let loss = config.init();
    let mut sh = head(case.hs, case.vs, 0.71, case.bias, dev);
    if case.transposed {
        let embedding = dev.float(values(sh.weight.val().transpose()), [case.vs, case.hs]);
        sh.weight = Param::from_tensor(embedding.transpose());
    }
    let th = head(case.ht, case.vt, 1.37, case.bias, dev);
    let hidden = |h: usize, seed: f64| {
        let v: Vec<f64> = wave(case.n * h, seed)
            .iter()
            .map(|x| x * case.scale)
            .collect();
        if case.transposed {
            // The same values, as the transpose of an `[H, N]` tensor.
            let t: Vec<f64> = (0..h * case.n)
                .map(|i| v[i % case.n * h + i / case.n])
                .collect();
            dev.float(t, [h, case.n]).transpose()
        } else {
            dev.float(v, [case.n, h])
        }
    };
    let hs = hidden(case.hs, 0.53).require_grad();
    let ht = hidden(case.ht, 0.29);
    let targets = case
        .targets
        .as_ref()
        .map(|t| dev.ints(t.clone(), [t.len()]));

    let (fused, runs) = counted(|| match &targets {
        Some(y) => loss.forward_linear(hs.clone(), &sh, ht.clone(), &th, y.clone()),
        None => loss.forward_linear_soft(hs.clone(), &sh, ht.clone(), &th),
    });
    let what = format!("{case:?} {config:?}");
    assert_path(dev.path(config.kernel, config.reduction, true), runs, &what);
    assert_eq!(fused.dtype(), dev.dtype, "{what}: the loss's dtype");
    let (zs, zt) = (sh.forward(hs.clone()), th.forward(ht.clone()).detach());
    let dense = match &targets {
        Some(y) => loss.forward(zs, zt, y.clone()),
        None => loss.forward_soft(zs, zt),
    };
    // Forward only without autodiff (the chunked path without gradients, including `PerRow`,
    // the reference kernel per chunk and the ignored-row scatter).
    let inner = {
        let (sv, tv) = (sh.valid(), th.valid());
        let (hs_i, ht_i) = (hs.clone().inner(), ht.clone().inner());
        let y_i = targets.clone().map(|y| y.inner());
        let (fused, runs) = counted(|| match &y_i {
            Some(y) => loss.forward_linear(hs_i.clone(), &sv, ht_i.clone(), &tv, y.clone()),
            None => loss.forward_linear_soft(hs_i.clone(), &sv, ht_i.clone(), &tv),
        });
        let path = dev.path(config.kernel, config.reduction, false);
        assert_path(path, runs, &format!("{what} (no autodiff)"));
        let (zs, zt) = (sv.forward(hs_i), tv.forward(ht_i));
        let dense = match &y_i {
            Some(y) => loss.forward(zs, zt, y.clone()),
            None => loss.forward_soft(zs, zt),
        };
        mismatches("inner loss", &values(fused), &values(dense), abs, rel)
    };
    // An upstream gradient that is not 1 (the loss enters the objective with weight 0.5).
    let grads_of = |value: Tensor<1>| {
        let grads = value.sum().mul_scalar(0.5).backward();
        let g_h = values(hs.grad(&grads).expect("hidden gradient"));
        let g_w = values(sh.weight.val().grad(&grads).expect("weight gradient"));
        let g_b = sh
            .bias
            .as_ref()
            .map(|b| values(b.val().grad(&grads).expect("bias gradient")))
            .unwrap_or_default();
        (g_h, g_w, g_b)
    };
    let (fv, dv) = (values(fused.clone()), values(dense.clone()));
    let (fh, fw, fb) = grads_of(fused);
    let (dh, dw, db) = grads_of(dense);
    let mut failures = inner;
    failures.extend(mismatches("loss", &fv, &dv, abs, rel));
    failures.extend(mismatches("grad hidden", &fh, &dh, abs, rel));
    failures.extend(mismatches("grad weight", &fw, &dw, abs, rel));
    failures.extend(mismatches("grad bias", &fb, &db, abs, rel));
    assert!(failures.is_empty(), "{what}:\n{}", failures.join("\n"));
    // The comparison must see a real gradient (unless every row is ignored).
    let kept = case
        .targets
        .as_ref()
        .is_none_or(|t| t.iter().any(|&y| y != -100));
    assert_eq!(
        fw.iter().any(|g| *g != 0.0),
        kept,
        "{case:?}: weight gradient"
    );
}

/// The sweep every device runs: every divergence (each with one of the four reductions, so
/// every reduction is met), chunks of 1, 3 and more rows
/// than `N` (V not a multiple of anything), no bias, no labels, all rows ignored, vocabulary
/// mismatch both ways.
pub fn sweep(tol: (f64, f64), dev: &Dev) {
    use burn_distill::{Divergence, VocabMismatch};
    let base = LinearCase::new(9, 6, 10, 37);
    for (k, d) in Divergence::ALL.into_iter().enumerate() {
        let reduction = [
            Reduction::Mean,
            Reduction::Sum,
            Reduction::Normalized { items: 4 },
            Reduction::PerRow,
        ][k % 4];
        for chunk in [1, 3, 64] {
            let config = DistillLossConfig::new()
                .with_divergence(d)
                .with_temperature(2.0)
                .with_alpha(0.7)
                .with_label_smoothing(0.1)
                .with_reduction(reduction)
                .with_linear_chunk_rows(Some(chunk));
            check_linear(&config, &base, tol, dev);
        }
    }
    let config = DistillLossConfig::new()
        .with_temperature(3.0)
        .with_alpha(0.5)
        .with_linear_chunk_rows(Some(4));
    let mut no_bias = base.clone();
    no_bias.bias = false;
    check_linear(&config, &no_bias, tol, dev);
    let mut soft = base.clone();
    soft.targets = None;
    check_linear(&config, &soft, tol, dev);
    let mut ignored = base.clone();
    ignored.targets = Some(vec![-100; base.n]);
    check_linear(&config, &ignored, tol, dev);
    // Teacher wider (truncated to the student's 37; or the student padded to 41, so the
    // gradient is narrowed back: reverse KL stays finite there) and teacher narrower (padded).
    for (policy, vt, d) in [
        (VocabMismatch::Truncate, 41, Divergence::ForwardKl),
        (VocabMismatch::PadNegInf, 41, Divergence::ReverseKl),
        (VocabMismatch::PadNegInf, 33, Divergence::ForwardKl),
    ] {
        let mut mismatch = base.clone();
        mismatch.vt = vt;
        let config = config
            .clone()
            .with_vocab_mismatch(policy)
            .with_divergence(d);
        check_linear(&config, &mismatch, tol, dev);
    }
    // Logit soft-capping (the cap bites: the logits reach about ±3), with both vocabulary
    // policies, so that `−∞` padding is applied after the cap (and the student wider than
    // the teacher: its cap gradient and weight gradient stop at the common columns).
    for (policy, vt, d) in [
        (VocabMismatch::Error, 37, Divergence::Jsd { beta: 0.5 }),
        (VocabMismatch::PadNegInf, 33, Divergence::ForwardKl),
        (VocabMismatch::PadNegInf, 41, Divergence::ReverseKl),
        (VocabMismatch::Truncate, 33, Divergence::ReverseKl),
    ] {
        let mut capped = base.clone();
        capped.vt = vt;
        if policy == VocabMismatch::Truncate {
            // Targets inside the common columns.
            capped.targets = Some((0..base.n as i64).map(|i| i % 30).collect());
        }
        let config = config
            .clone()
            .with_logit_softcap(Some(1.5))
            .with_vocab_mismatch(policy)
            .with_divergence(d)
            .with_linear_chunk_rows(Some(3));
        check_linear(&config, &capped, tol, dev);
    }
    // Strided hidden states, and more rows than a chunk with ignored rows scattered through
    // them (V = 1031, chunks of 100 rows and the automatic size).
    let mut strided = base.clone();
    strided.transposed = true;
    check_linear(&config, &strided, tol, dev);
    let large = LinearCase::new(257, 32, 48, 1031);
    for chunk in [Some(100), None] {
        let config = config.clone().with_linear_chunk_rows(chunk);
        check_linear(&config, &large, tol, dev);
    }
    let mut wide = base.clone();
    wide.vt = 33;
    wide.targets = Some((0..base.n as i64).map(|i| i % 30).collect());
    let config = config.with_vocab_mismatch(VocabMismatch::Truncate);
    check_linear(&config, &wide, tol, dev);
}

/// One case of `tests/golden/linear.json` (scripts/linear_golden.py, float64 PyTorch).
#[derive(serde::Deserialize)]
struct GoldenLinear {
    name: String,
    config: GoldenConfig,
    dims: GoldenDims,
    student_hidden: Vec<f64>,
    student_weight: Vec<f64>,
    student_bias: Option<Vec<f64>>,
    teacher_hidden: Vec<f64>,
    teacher_weight: Vec<f64>,
    teacher_bias: Option<Vec<f64>>,
    targets: Option<Vec<i64>>,
    upstream: f64,
    expected: GoldenGrads,
}

#[derive(serde::Deserialize)]
struct GoldenConfig {
    #[serde(flatten)]
    loss: burn_distill::testing::RawConfig,
    softcap: Option<f64>,
    vocab_mismatch: String,
}

#[derive(serde::Deserialize)]
struct GoldenDims {
    n: usize,
    hs: usize,
    ht: usize,
    vs: usize,
    vt: usize,
}

#[derive(serde::Deserialize)]
struct GoldenGrads {
    loss: Vec<f64>,
    grad_hidden: Vec<f64>,
    grad_weight: Vec<f64>,
    grad_bias: Option<Vec<f64>>,
}

/// Every case of `tests/golden/linear.json` (fused-linear losses with logit soft-capping,
/// vocabulary mismatch, every reduction) through `forward_linear` in chunks of 2 rows and
/// through `forward` on the materialised logits, with both kernels: loss and the gradients of
/// the student's hidden states, weight and bias against float64 PyTorch to `(abs, rel)`.
/// With `all_paths` false, only `forward_linear` with the fused kernel (on lavapipe every new
/// graph of burn's fusion backend compiles and tunes its shaders: seconds each).
pub fn assert_linear_golden((abs, rel): (f64, f64), dev: &Dev, all_paths: bool) {
    use burn_distill::VocabMismatch;
    #[derive(serde::Deserialize)]
    struct File {
        format: u32,
        cases: Vec<GoldenLinear>,
    }
    // The 0.1 crate's file (the root's tests/golden/), read where it is.
    let file: File = serde_json::from_str(include_str!("../golden/linear.json"))
        .expect("tests/golden/linear.json");
    assert_eq!(file.format, 1);
    assert!(file.cases.len() >= 6);
    let mut failures = Vec::new();
    for c in file.cases {
        let d = &c.dims;
        let t2 = |v: &[f64], s: [usize; 2]| dev.float(v.to_vec(), s);
        let t1 = |v: &[f64]| dev.float(v.to_vec(), [v.len()]);
        let linear = |w: &[f64], b: &Option<Vec<f64>>, h: usize, v: usize| Linear {
            weight: Param::from_tensor(t2(w, [h, v])),
            bias: b.as_ref().map(|b| Param::from_tensor(t1(b))),
        };
        let policy = match c.config.vocab_mismatch.as_str() {
            "error" => VocabMismatch::Error,
            "truncate" => VocabMismatch::Truncate,
            "pad_neg_inf" => VocabMismatch::PadNegInf,
            other => panic!("unknown vocabulary policy {other}"),
        };
        for kernel in [Kernel::Auto, Kernel::Reference] {
            for fused_linear in [true, false] {
                let fused_only = fused_linear && kernel == Kernel::Auto;
                if !(all_paths || fused_only) {
                    continue;
                }
                let config = c
                    .config
                    .loss
                    .dense()
                    .with_logit_softcap(c.config.softcap)
                    .with_vocab_mismatch(policy)
                    .with_kernel(kernel)
                    .with_linear_chunk_rows(Some(2));
                let loss = config.init();
                let sh = linear(&c.student_weight, &c.student_bias, d.hs, d.vs);
                let th = linear(&c.teacher_weight, &c.teacher_bias, d.ht, d.vt);
                let hs = t2(&c.student_hidden, [d.n, d.hs]).require_grad();
                let ht = t2(&c.teacher_hidden, [d.n, d.ht]);
                let y = c.targets.as_ref().map(|t| dev.ints(t.clone(), [t.len()]));
                let what = format!(
                    "{} ({kernel:?}, {})",
                    c.name,
                    if fused_linear {
                        "forward_linear"
                    } else {
                        "forward"
                    }
                );
                let (value, runs) = counted(|| match (&y, fused_linear) {
                    (Some(y), true) => loss.forward_linear(hs.clone(), &sh, ht, &th, y.clone()),
                    (None, true) => loss.forward_linear_soft(hs.clone(), &sh, ht, &th),
                    (Some(y), false) => {
                        loss.forward(sh.forward(hs.clone()), th.forward(ht), y.clone())
                    }
                    (None, false) => loss.forward_soft(sh.forward(hs.clone()), th.forward(ht)),
                });
                if fused_linear {
                    assert_path(dev.path(kernel, config.reduction, true), runs, &what);
                } else {
                    assert_eq!(runs, [0, 0], "{what}: no fused-linear loop");
                }
                assert_eq!(value.dtype(), dev.dtype, "{what}: the loss's dtype");
                failures.extend(mismatches(
                    &format!("{what} loss"),
                    &values(value.clone()),
                    &c.expected.loss,
                    abs,
                    rel,
                ));
                let grads = value.sum().mul_scalar(c.upstream).backward();
                let mut grad = |name: &str, got: Option<Vec<f64>>, expected: &[f64]| {
                    let got = got.unwrap_or_default();
                    failures.extend(mismatches(
                        &format!("{what} {name}"),
                        &got,
                        expected,
                        abs,
                        rel,
                    ));
                };
                grad(
                    "grad hidden",
                    hs.grad(&grads).map(values),
                    &c.expected.grad_hidden,
                );
                grad(
                    "grad weight",
                    sh.weight.val().grad(&grads).map(values),
                    &c.expected.grad_weight,
                );
                grad(
                    "grad bias",
                    sh.bias
                        .as_ref()
                        .and_then(|b| b.val().grad(&grads))
                        .map(values),
                    c.expected.grad_bias.as_deref().unwrap_or_default(),
                );
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A frozen or tied head: with `linear_head_grad(false)`, or with a head whose weight and bias
/// do not require a gradient, the loss and the hidden-state gradient equal the trained-head
/// run's (and the materialised path's), and the head gets no gradient from the loss.
pub fn check_frozen_head((abs, rel): (f64, f64), dev: &Dev) {
    let case = LinearCase::new(23, 6, 9, 37);
    let hidden = |h: usize, seed: f64| {
        let v: Vec<f64> = wave(case.n * h, seed).iter().map(|x| x * 3.0).collect();
        dev.float(v, [case.n, h])
    };
    let targets = case.targets.clone().unwrap();
    let y = dev.ints(targets.clone(), [targets.len()]);
    let th = head(case.ht, case.vt, 1.37, true, dev);
    let ht = hidden(case.ht, 0.29);
    let config = DistillLossConfig::new()
        .with_temperature(2.0)
        .with_alpha(0.6)
        .with_linear_chunk_rows(Some(5));
    // (loss, hidden gradient, did the head get a gradient?)
    let run = |config: DistillLossConfig, frozen_params: bool| {
        let mut sh = head(case.hs, case.vs, 0.71, true, dev);
        if frozen_params {
            sh.weight = sh.weight.set_require_grad(false);
            sh.bias = sh.bias.map(|b| b.set_require_grad(false));
        }
        let hs = hidden(case.hs, 0.53).require_grad();
        let (value, runs) = counted(|| {
            config
                .init()
                .forward_linear(hs.clone(), &sh, ht.clone(), &th, y.clone())
        });
        let path = dev.path(config.kernel, config.reduction, true);
        assert_path(path, runs, &format!("frozen head {config:?}"));
        let grads = value.clone().sum().mul_scalar(0.5).backward();
        let head_grad = sh.weight.val().grad(&grads).is_some()
            || sh
                .bias
                .as_ref()
                .is_some_and(|b| b.val().grad(&grads).is_some());
        (values(value), values(hs.grad(&grads).unwrap()), head_grad)
    };
    // The chunked path, and the fallbacks that materialise the logits (`PerRow` with a
    // gradient, `Kernel::Reference`): a frozen head gets no gradient on any of them.
    for base in [
        config.clone(),
        config.clone().with_reduction(Reduction::PerRow),
        config.clone().with_kernel(Kernel::Reference),
    ] {
        let (lt, gt, trained) = run(base.clone(), false);
        assert!(trained, "the trained head gets a gradient");
        for (what, frozen) in [
            (
                "linear_head_grad(false)",
                run(base.clone().with_linear_head_grad(false), false),
            ),
            ("frozen Param", run(base.clone(), true)),
        ] {
            let (lf, gf, head_grad) = frozen;
            assert!(!head_grad, "{what} {base:?}: the head got a gradient");
            let mut failures = mismatches("loss", &lf, &lt, abs, rel);
            failures.extend(mismatches("grad hidden", &gf, &gt, abs, rel));
            assert!(gf.iter().any(|g| *g != 0.0), "{what}: zero hidden gradient");
            assert!(
                failures.is_empty(),
                "{what} {base:?}:\n{}",
                failures.join("\n")
            );
        }
    }
}

/// The fused-linear sparse loss against the sparse loss on materialised logits: loss and the
/// gradients of the hidden states, head weight and bias (upstream 0.5), for every tail policy,
/// several divergences and reductions, chunks of 1, 4 and more rows than `N`, no bias, no
/// labels, ignored rows, missing teacher entries, `T ≠ T_gen`; a frozen head gets no gradient.
pub fn check_sparse_linear((abs, rel): (f64, f64), dev: &Dev) {
    use burn_distill::{
        Divergence, SparseDistillLossConfig, SparseTeacher, StudentSupport, TailPolicy,
    };
    let (n, h, v, k) = (19, 7, 41, 4);
    let hidden = || {
        let x: Vec<f64> = wave(n * h, 0.53).iter().map(|x| x * 2.5).collect();
        dev.float(x, [n, h]).require_grad()
    };
    // Distinct indices per row; every fifth entry missing; mass below 1.
    let indices: Vec<i64> = (0..n * k)
        .map(|e| (((e / k) * 7 + (e % k) * 9) % v) as i64)
        .collect();
    let log_probs: Vec<f64> = (0..n * k)
        .map(|e| {
            if e % 5 == 4 {
                f64::NEG_INFINITY
            } else {
                -0.9 - 0.6 * (e % k) as f64 - 0.01 * (e / k) as f64
            }
        })
        .collect();
    let teacher = || {
        SparseTeacher::new(
            dev.ints(indices.clone(), [n, k]),
            dev.float(log_probs.clone(), [n, k]),
        )
    };
    let targets: Vec<i64> = (0..n)
        .map(|i| {
            if i % 4 == 1 {
                -100
            } else {
                ((i * 5) % v) as i64
            }
        })
        .collect();
    let y = dev.ints(targets, [n]);
    let cases = [
        (
            TailPolicy::TailBucket,
            Divergence::ForwardKl,
            Reduction::Mean,
            Some(4),
            true,
            true,
            None,
        ),
        (
            TailPolicy::TailBucket,
            Divergence::ReverseKl,
            Reduction::Sum,
            Some(1),
            true,
            true,
            Some(0.8),
        ),
        (
            TailPolicy::Renormalize {
                student: StudentSupport::TopK,
            },
            Divergence::Jsd { beta: 0.3 },
            Reduction::Normalized { items: 11 },
            Some(64),
            false,
            true,
            Some(0.3),
        ),
        (
            TailPolicy::Renormalize {
                student: StudentSupport::FullVocab,
            },
            Divergence::ForwardKl,
            Reduction::Mean,
            None,
            true,
            false,
            None,
        ),
        (
            TailPolicy::TailBucket,
            Divergence::Tvd,
            Reduction::PerRow,
            Some(5),
            true,
            true,
            // `PerRow` with a gradient materialises the logits: the fallback caps once.
            Some(0.5),
        ),
        (
            TailPolicy::TailBucket,
            Divergence::ForwardKl,
            Reduction::Mean,
            Some(3),
            true,
            true,
            Some(0.4),
        ),
    ];
    // (tail, divergence, reduction, chunk rows, bias, labels, logit soft-cap): caps of 0.3 to
    // 0.8, below the largest logits (0.7 without bias, 1.7 with), saturate part of the rows.
    for (tail, divergence, reduction, chunk, bias, labels, cap) in cases {
        let config = SparseDistillLossConfig::new(
            DistillLossConfig::new()
                .with_temperature(2.0)
                .with_alpha(0.7)
                .with_divergence(divergence)
                .with_reduction(reduction)
                .with_label_smoothing(0.05)
                .with_logit_softcap(cap)
                .with_linear_chunk_rows(chunk),
        )
        .with_tail(tail)
        .with_generation_temperature(1.5);
        let loss = config.init();
        let sh = head(h, v, 0.71, bias, dev);
        if let Some(cap) = cap {
            let top = values(sh.forward(hidden()).abs().max());
            assert!(
                top[0] > 1.5 * cap,
                "the cap {cap} bites (max |z| = {})",
                top[0]
            );
        }
        let run = |fused: bool| {
            let hs = hidden();
            let (value, runs) = counted(|| match (fused, labels) {
                (true, true) => loss.forward_linear(hs.clone(), &sh, teacher(), y.clone()),
                (true, false) => loss.forward_linear_soft(hs.clone(), &sh, teacher()),
                (false, true) => loss.forward(sh.forward(hs.clone()), teacher(), y.clone()),
                (false, false) => loss.forward_soft(sh.forward(hs.clone()), teacher()),
            });
            let what = format!("{tail:?} {divergence:?} {reduction:?} fused-linear {fused}");
            if fused {
                assert_path(dev.path(Kernel::Auto, reduction, true), runs, &what);
            } else {
                assert_eq!(runs, [0, 0], "{what}: no fused-linear loop");
            }
            let grads = value.clone().sum().mul_scalar(0.5).backward();
            let g_w = values(sh.weight.val().grad(&grads).expect("weight gradient"));
            let g_b = sh
                .bias
                .as_ref()
                .map(|b| values(b.val().grad(&grads).expect("bias gradient")))
                .unwrap_or_default();
            (values(value), values(hs.grad(&grads).unwrap()), g_w, g_b)
        };
        let ((fl, fh, fw, fb), (ml, mh, mw, mb)) = (run(true), run(false));
        let mut failures = mismatches("loss", &fl, &ml, abs, rel);
        failures.extend(mismatches("grad hidden", &fh, &mh, abs, rel));
        failures.extend(mismatches("grad weight", &fw, &mw, abs, rel));
        failures.extend(mismatches("grad bias", &fb, &mb, abs, rel));
        assert!(
            fw.iter().any(|g| *g != 0.0),
            "{tail:?}: zero weight gradient"
        );
        assert!(
            failures.is_empty(),
            "{tail:?} {divergence:?} {reduction:?} chunk {chunk:?} cap {cap:?}:\n{}",
            failures.join("\n")
        );
    }
    // A frozen head: the same loss and hidden gradient, no head gradient.
    let config = SparseDistillLossConfig::new(
        DistillLossConfig::new()
            .with_alpha(0.5)
            .with_linear_chunk_rows(Some(6)),
    );
    let sh = head(h, v, 0.71, true, dev);
    let run = |config: &SparseDistillLossConfig| {
        let hs = hidden();
        let (value, runs) = counted(|| {
            config
                .init()
                .forward_linear(hs.clone(), &sh, teacher(), y.clone())
        });
        let path = dev.path(Kernel::Auto, Reduction::Mean, true);
        assert_path(path, runs, "sparse, frozen head");
        let grads = value.clone().backward();
        let head_grad = sh.weight.val().grad(&grads).is_some();
        (values(value), values(hs.grad(&grads).unwrap()), head_grad)
    };
    let (lt, gt, trained) = run(&config);
    let mut frozen = config.clone();
    frozen.loss = frozen.loss.with_linear_head_grad(false);
    let (lf, gf, head_grad) = run(&frozen);
    assert!(trained && !head_grad);
    let mut failures = mismatches("frozen loss", &lf, &lt, abs, rel);
    failures.extend(mismatches("frozen grad hidden", &gf, &gt, abs, rel));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
