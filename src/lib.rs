//! # burn-distill
//!
//! Knowledge distillation for the [burn](https://burn.dev) deep-learning framework (0.22):
//! train a small *student* to match a large *teacher*'s output distribution, in your own burn
//! training loop, on any device. Fused kernels compute each loss and its gradient in one pass
//! on the CPU (Flex) and on the GPU (wgpu, Vulkan, CUDA through CubeCL); every loss is checked
//! against float64 PyTorch references.
//!
//! This page is a map of the public items by task, each with an example that runs as a doc
//! test. The guide, one chapter per topic, is in the repository's `docs/guide/` (its index:
//! `docs/guide/README.md`); each section below names its chapter.
//!
//! | task | items |
//! |---|---|
//! | [Distilling a classifier](#distilling-a-classifier) | [`DistillLossConfig`], [`DistillLoss`], [`DistillOutput`], [`Divergence`], [`Reduction`], [`temperature_softmax`] |
//! | [Language models](#language-models-sequences-and-fused-linear-heads) | [`DistillLoss::forward_seq`], [`DistillLoss::forward_linear`], [`DistillLoss::forward_linear_seq`], [`VocabMismatch`], [`MASKED_LOGIT`] |
//! | [Sparse teachers and the store](#sparse-top-k-teachers-and-the-offline-store) | [`SparseDistillLoss`], [`SparseTeacher`], [`TailPolicy`], [`store`] |
//! | [Hidden states](#hidden-states) | [`HiddenStateLoss`] |
//! | [On-policy](#on-policy-distillation) | [`onpolicy`] |
//! | [Across tokenizers](#across-tokenizers) | [`cross`] |
//! | [Multi-device](#multi-device) | [`VocabShard`], [`RowExchange`], [`LocalExchange`] |
//! | [Bad input](#bad-input) | [`Validation`], [`DistillError`], the `try_` forms |
//! | [Backend implementers](#backend-implementers) | [`backend`], [`Kernel`], [`testing`], [`conformance_tests!`] |
//!
//! ## Distilling a classifier
//!
//! [`DistillLossConfig`] builds a [`DistillLoss`]: the soft term `D(p, q) · T²` between the
//! teacher's and the student's distributions at temperature `T`, in any [`Divergence`]
//! (forward and reverse KL, JSD(β), skew KL, skew reverse KL, TVD), mixed by `α` with the hard
//! cross-entropy (label smoothing, `ignore_index` masking), and reduced by a [`Reduction`]
//! (`Mean`, `Sum`, `Normalized { items }` for gradient accumulation, `PerRow`).
//! [`DistillLoss::forward`] takes `[N, V]` logits and `[N]` targets,
//! [`DistillLoss::forward_soft`] no targets, and [`DistillLoss::forward_parts`] returns a
//! [`DistillOutput`]: the loss and, from the same pass, its detached soft and hard terms for
//! logging. [`DistillLoss::with_reduction`] gives the same loss with another reduction and
//! [`DistillLoss::params`] its validated [`DistillParams`]; the loss is a parameter-free burn
//! `Module`, so it can be a field of your model. The softmax at a temperature is
//! [`temperature_softmax`] (and [`temperature_log_softmax`]); [`Kernel`] chooses between the
//! fused kernel and the composed reference. The formula, every divergence and reduction, and
//! gradient accumulation: the guide's *The losses and their math* chapter
//! (`docs/guide/losses.md`).
//!
//! ```
//! use burn::tensor::{Device, Int, Tensor};
//! use burn_distill::{DistillLossConfig, Divergence, Reduction, temperature_softmax};
//!
//! let device = Device::flex().autodiff();
//! let student = Tensor::<2>::from_floats([[2.0, 0.5, -1.0]], &device).require_grad();
//! let teacher = Tensor::<2>::from_floats([[3.0, 1.0, -2.0]], &device);
//! let targets = Tensor::<1, Int>::from_ints([0], &device);
//!
//! let loss = DistillLossConfig::new()
//!     .with_temperature(4.0)
//!     .with_alpha(0.9)
//!     .with_divergence(Divergence::ForwardKl)
//!     .with_reduction(Reduction::Mean)
//!     .init();
//! let value = loss.forward(student.clone(), teacher.clone(), targets.clone());
//! // α·T²·KL(p‖q) + (1 − α)·CE, by hand in f64.
//! assert!((value.clone().into_scalar::<f32>() - 0.255_161).abs() < 1e-5);
//! let grads = value.backward();
//! let grad = student.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
//! // α·T·(q − p) + (1 − α)·(softmax(z_s) − onehot(y)), by hand in f64: the student's first
//! // logit is pulled up (the teacher and the target both favour it).
//! assert!((grad[0] - -0.256_216).abs() < 1e-5, "{grad:?}");
//! assert!(grad.iter().sum::<f32>().abs() < 1e-6);
//!
//! // The same loss with its parts, for logging: T²·KL(p‖q) and the cross-entropy.
//! let out = loss.forward_parts(student.detach(), teacher, Some(targets));
//! let (soft, hard) = (out.soft.into_scalar::<f32>(), out.hard.unwrap().into_scalar::<f32>());
//! assert!((soft - 0.256_700).abs() < 1e-5 && (hard - 0.241_311).abs() < 1e-5);
//! assert!((out.loss.into_scalar::<f32>() - (0.9 * soft + 0.1 * hard)).abs() < 1e-6);
//!
//! // The softmax at a temperature: flatter at T = 4 (0.866 at T = 1).
//! let logits = Tensor::<2>::from_floats([[2.0, 0.0, -2.0]], &device);
//! let p = temperature_softmax(logits, 4.0, 1).into_data().to_vec::<f32>().unwrap();
//! assert!((p[0] - 0.506_480).abs() < 1e-5);
//! ```
//!
//! ## Language models: sequences and fused-linear heads
//!
//! [`DistillLoss::forward_seq`] (with [`forward_seq_soft`](DistillLoss::forward_seq_soft) and
//! [`forward_seq_parts`](DistillLoss::forward_seq_parts)) takes `[B, T, V]` logits and
//! `[B, T]` labels, prompt and padding tokens at the ignore index (`-100`); `Mean` averages
//! over the kept tokens of the batch. [`DistillLoss::forward_linear`] and
//! [`DistillLoss::forward_linear_seq`] (with `_soft`, `_parts` and `try_` forms) take the
//! last hidden states and the two models' burn `Linear` LM heads instead, and compute the
//! logits chunk by chunk of rows ([`DistillLossConfig::linear_chunk_rows`],
//! [`DistillLoss::linear_chunk_rows`]), so that the `[N, V]` logits never exist at once; a
//! frozen or tied head is [`DistillLossConfig::linear_head_grad`] `false`.
//! [`DistillLossConfig::logit_softcap`] caps both models' logits, `c · tanh(z / c)` (Gemma 2),
//! on every path. Vocabularies of different sizes are an error unless a [`VocabMismatch`]
//! truncates or pads with `−∞`, and a logit at or below [`MASKED_LOGIT`] is padding, as `−∞`
//! is. More: the guide's *Language models* chapter (`docs/guide/language-models.md`).
//!
//! ```
//! use burn::nn::LinearConfig;
//! use burn::tensor::{Device, Int, Tensor};
//! use burn_distill::{DistillLossConfig, MASKED_LOGIT, VocabMismatch};
//!
//! let device = Device::flex().autodiff();
//! // [B, T, H] hidden states of both models and their LM heads (H → V = 4).
//! let student_head = LinearConfig::new(2, 4).init(&device);
//! let teacher_head = LinearConfig::new(3, 4).init(&device);
//! let h_s = Tensor::<3>::from_floats([[[1.0, -0.5], [0.3, 2.0], [0.0, 1.0]]], &device)
//!     .require_grad();
//! let h_t = Tensor::<3>::from_floats(
//!     [[[0.2, 1.0, -1.0], [1.5, 0.0, 0.4], [0.1, -0.3, 0.8]]],
//!     &device,
//! );
//! let labels = Tensor::<2, Int>::from_ints([[-100, 2, 0]], &device); // token 0: the prompt
//! let loss = DistillLossConfig::new()
//!     .with_temperature(2.0)
//!     .with_logit_softcap(Some(3.0))
//!     .init();
//!
//! // From the [B, T, V] logits, or from the hidden states and heads, chunk by chunk: the same.
//! let logits = loss.forward_seq(
//!     student_head.forward(h_s.clone()),
//!     teacher_head.forward(h_t.clone()),
//!     labels.clone(),
//! );
//! let fused = loss.forward_linear_seq(h_s.clone(), &student_head, h_t, &teacher_head, labels);
//! let (a, b) = (logits.into_scalar::<f32>(), fused.clone().into_scalar::<f32>());
//! assert!(a > 0.0 && (a - b).abs() < 1e-5, "{a} vs {b}");
//! // The prompt token gets no gradient, the others do.
//! let grad: Vec<f32> = h_s.grad(&fused.backward()).unwrap().into_data().to_vec().unwrap();
//! assert!(grad[..2].iter().all(|g| *g == 0.0) && grad[2..].iter().any(|g| *g != 0.0));
//!
//! // A student of 4 columns and a teacher of 3: an error by default, the common 3 columns
//! // with `Truncate`; a column masked with MASKED_LOGIT on both sides is no column at all.
//! let y = Tensor::<1, Int>::from_ints([1], &device);
//! let s3 = Tensor::<2>::from_floats([[1.0, 2.0, 0.5]], &device);
//! let t3 = Tensor::<2>::from_floats([[0.5, 3.0, 0.0]], &device);
//! let plain = DistillLossConfig::new().init();
//! let three = plain.forward(s3, t3.clone(), y.clone()).into_scalar::<f32>();
//! let wide = Tensor::<2>::from_floats([[1.0, 2.0, 0.5, 7.0]], &device);
//! assert!(plain.try_forward(wide.clone(), t3.clone(), y.clone()).is_err());
//! let truncate = DistillLossConfig::new().with_vocab_mismatch(VocabMismatch::Truncate).init();
//! let truncated = truncate.forward(wide, t3, y.clone()).into_scalar::<f32>();
//! let m = MASKED_LOGIT as f32;
//! let s4 = Tensor::<2>::from_floats([[1.0, 2.0, 0.5, m]], &device);
//! let t4 = Tensor::<2>::from_floats([[0.5, 3.0, 0.0, m]], &device);
//! let masked = plain.forward(s4, t4, y).into_scalar::<f32>();
//! assert!((truncated - three).abs() < 1e-6 && (masked - three).abs() < 1e-6);
//! ```
//!
//! ## Sparse (top-k) teachers and the offline store
//!
//! When only the teacher's top-k log-probabilities are known (an API, or a store written
//! offline), [`SparseDistillLoss`] (from a [`SparseDistillLossConfig`] around the dense
//! settings) takes the student's full logits and a [`SparseTeacher`] (`[N, k]` or `[B, T, k]`
//! indices and log-probabilities, [`SparseTeacher::new`], or [`SparseTeacher::from_logits`]
//! for the top-k of full logits), and sends the gradient to all `V` student logits; it has the
//! forms of the dense loss ([`SparseDistillLoss::forward`],
//! [`SparseDistillLoss::forward_seq`], [`SparseDistillLoss::forward_linear`]…). A
//! [`TailPolicy`] says what happens to the missing mass: one tail bucket (the default; the
//! teacher's tail at least [`TAIL_FLOOR`]) or renormalisation over the top-k, on the full
//! vocabulary of the student or on its top-k ([`StudentSupport`]). [`store`] keeps a teacher's
//! top-k on disk: a [`store::TeacherStoreWriter`] (from a [`store::TeacherStoreConfig`])
//! writes one safetensors file, a [`store::TeacherStore`] reads it back as `SparseTeacher`
//! batches (its errors: [`store::StoreError`]; burn `Dataset`s and `Batcher`s over it with the
//! `dataset` feature). More: the guide's *Language models* chapter
//! (`docs/guide/language-models.md`), sections *Sparse teachers* and *An offline teacher
//! store*.
//!
//! ```
//! use burn::tensor::{Device, Int, Tensor};
//! use burn_distill::store::{TeacherStore, TeacherStoreConfig, TeacherStoreWriter};
//! use burn_distill::{DistillLossConfig, SparseDistillLossConfig, SparseTeacher, TailPolicy};
//!
//! let device = Device::flex();
//! let student = Tensor::<2>::from_floats([[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 0.5]], &device);
//! let teacher = Tensor::<2>::from_floats([[0.5, 3.0, 0.0, -2.0], [0.2, -2.0, 4.0, 1.0]], &device);
//! let targets = Tensor::<1, Int>::from_ints([1, 2], &device);
//! let config = DistillLossConfig::new().with_temperature(2.0);
//! let dense = config.init().forward(student.clone(), teacher.clone(), targets.clone());
//! let dense = dense.into_scalar::<f32>();
//!
//! // The teacher's top-3 of 4 tokens (log_softmax at T_gen = 1): the tail bucket is the one
//! // missing token, so the sparse loss is the dense one.
//! let sparse = SparseDistillLossConfig::new(config)
//!     .with_tail(TailPolicy::TailBucket)
//!     .with_generation_temperature(1.0)
//!     .init();
//! let top3 = SparseTeacher::from_logits(teacher.clone(), 3, 1.0);
//! let value = sparse.forward(student.clone(), top3, targets.clone()).into_scalar::<f32>();
//! assert!(dense > 0.0 && (value - dense).abs() < 1e-5, "{value} vs {dense}");
//!
//! // Offline: write the top-3 once, distil later from the file alone (f16 log-probabilities).
//! let path = std::env::temp_dir().join(format!("lib-store-{}.safetensors", std::process::id()));
//! let mut writer = TeacherStoreWriter::create(&path, TeacherStoreConfig::new(4, 3)).unwrap();
//! writer.append_logits(teacher).unwrap(); // [N, V] → the top-k of log_softmax
//! assert_eq!(writer.finish().unwrap().rows, 2);
//! let store = TeacherStore::open(&path).unwrap();
//! store.check(4, 3).unwrap(); // a store of another V or k is an error
//! let stored = store.batch(0..2, &device).unwrap();
//! let value = sparse.forward(student, stored, targets).into_scalar::<f32>();
//! assert!((value - dense).abs() < 1e-2 * dense, "{value} vs {dense}");
//! std::fs::remove_file(&path).unwrap();
//! ```
//!
//! ## Hidden states
//!
//! [`HiddenStateLoss`] (from a [`HiddenStateLossConfig`]) compares intermediate
//! representations (FitNets, DistilBERT) by a [`HiddenLossKind`], mean squared error or cosine
//! distance, averaged over the rows a mask keeps, through a learned linear projection when the
//! widths differ; add it to the distillation loss with your own weights. More: the guide's
//! *The losses and their math* chapter (`docs/guide/losses.md`), section *Hidden-state losses*.
//!
//! ```
//! use burn::tensor::{Bool, Device, Tensor};
//! use burn_distill::{HiddenLossKind, HiddenStateLossConfig};
//!
//! let device = Device::flex();
//! let student = Tensor::<2>::from_floats([[1.0, 2.0], [3.0, 4.0]], &device);
//! let teacher = Tensor::<2>::from_floats([[1.0, 0.0], [0.0, 4.0]], &device);
//! // Equal widths: no projection. MSE rows (0² + 2²) / 2 = 2 and (3² + 0²) / 2 = 4.5.
//! let mse = HiddenStateLossConfig::new(2, 2).init(&device);
//! let value = mse.forward(student.clone(), teacher.clone(), None).into_scalar::<f32>();
//! assert!((value - 3.25).abs() < 1e-6);
//! // Cosine, the second row masked out: 1 − 1/√5.
//! let cosine = HiddenStateLossConfig::new(2, 2)
//!     .with_kind(HiddenLossKind::Cosine)
//!     .init(&device);
//! let mask = Tensor::<1, Bool>::from_bool([true, false], &device);
//! let value = cosine.forward(student, teacher, Some(mask)).into_scalar::<f32>();
//! assert!((value - (1.0 - 1.0 / 5f32.sqrt())).abs() < 1e-6);
//! ```
//!
//! ## On-policy distillation
//!
//! The student samples and the teacher scores the student's own tokens ([`onpolicy`]). With
//! the teacher's full logits, that is [`DistillLoss::forward_seq`] with `α = 1` and reverse KL
//! or JSD (GKD). With only the log-probability of each sampled token (an API teacher),
//! [`onpolicy::SampledTokenLoss`] (from a [`onpolicy::SampledTokenLossConfig`]; Tinker's k1
//! with its discount and clipping, verl's k3: [`onpolicy::KlEstimator`]) takes the student's
//! logits and the [`onpolicy::SampledTokens`], and its `try_forward_parts` returns a
//! [`onpolicy::SampledTokenOutput`] with the detached reverse-KL estimate for logging.
//! [`onpolicy::token_log_probs`] is the student's log-probability of given tokens (fused;
//! [`onpolicy::IGNORE_TOKEN`] gives 0), and [`onpolicy::student_top_k`] the student's `k`
//! likeliest tokens, for a teacher to score and a [`SparseDistillLoss`] to compare. More: the
//! guide's *On-policy distillation* chapter (`docs/guide/on-policy.md`).
//!
//! ```
//! use burn::tensor::{Bool, Device, Int, Tensor};
//! use burn_distill::onpolicy::{
//!     IGNORE_TOKEN, SampledTokenLossConfig, SampledTokens, student_top_k, token_log_probs,
//! };
//!
//! let device = Device::flex().autodiff();
//! // One sampled sequence of two tokens over a vocabulary of 2; a uniform student.
//! let logits = Tensor::<3>::zeros([1, 2, 2], &device).require_grad();
//! let sampled = SampledTokens {
//!     tokens: Tensor::<2, Int>::from_ints([[0, 1]], &device),
//!     teacher_log_probs: Tensor::<2>::from_floats([[-0.1, -2.0]], &device), // the API's
//!     mask: Tensor::<2, Bool>::from_bool([[true, true]], &device),
//!     sampler_log_probs: None, // the student itself sampled
//! };
//! let loss = SampledTokenLossConfig::new().init(); // k1, no discount, unclipped, Mean
//! let out = loss.try_forward_parts(logits.clone(), sampled).unwrap();
//! // k1: the mean of log π_s − log π_t = ((ln ½ + 0.1) + (ln ½ + 2.0)) / 2, logged as reverse_kl.
//! let k1 = 0.5f32.ln() + 1.05;
//! assert!((out.loss.clone().into_scalar::<f32>() - k1).abs() < 1e-6);
//! assert!((out.reverse_kl.clone().into_scalar::<f32>() - k1).abs() < 1e-5);
//! // Its gradient −A_t ∇log π_s(y_t) / 2, A_0 = −0.1 − ln ½: token 0 is pulled up.
//! let grad: Vec<f32> = logits.grad(&out.loss.backward()).unwrap().into_data().to_vec().unwrap();
//! assert!((grad[0] - -(-0.1 - 0.5f32.ln()) / 4.0).abs() < 1e-6, "{grad:?}");
//!
//! // The student's log-probabilities of given tokens, and its top-k.
//! let plain = Device::flex();
//! let lp = token_log_probs(
//!     Tensor::<2>::from_floats([[0.0, 0.0], [2.0, 0.0]], &plain),
//!     Tensor::<1, Int>::from_ints([1, IGNORE_TOKEN], &plain),
//! );
//! let lp = lp.into_data().to_vec::<f32>().unwrap();
//! assert!((lp[0] - 0.5f32.ln()).abs() < 1e-6 && lp[1] == 0.0);
//! let top = student_top_k(Tensor::<2>::from_floats([[0.1, 3.0, -1.0, 2.0]], &plain), 2);
//! assert_eq!(top.into_data().iter::<i64>().collect::<Vec<_>>(), vec![1, 3]);
//! ```
//!
//! ## Across tokenizers
//!
//! A teacher and a student with different tokenizers ([`cross`]; TRL GOLD's recipe after
//! ULD): [`cross::align_spans`] and [`cross::SpanAlignment`] group both tokenizations of a text
//! into spans that both cut at the same bytes ([`cross::AlignedSpan`], merged by a
//! [`cross::MergeStrategy`]), and [`cross::CrossTokenizerLoss`] (from a
//! [`cross::CrossTokenizerLossConfig`]) compares each span's merged distributions from both
//! sides' [`cross::TokenRows`]: by sorted L1 (ULD, `forward`), or with a [`cross::VocabMatch`]
//! of the two token lists by GOLD's hybrid (`forward_hybrid`); `try_forward_parts` returns a
//! [`cross::CrossTokenizerOutput`]. The library takes byte spans and token strings, never a
//! tokenizer. More: the guide's *Across tokenizers* chapter (`docs/guide/cross-tokenizer.md`).
//!
//! ```
//! use burn::tensor::{Device, Int, Tensor};
//! use burn_distill::cross::{
//!     AlignedSpan, CrossTokenizerLossConfig, MergeStrategy, SpanAlignment, TokenRows,
//!     align_spans,
//! };
//!
//! // "hello world": the student cut "hel|lo| world", the teacher "hello| wor|ld".
//! let spans = align_spans(&[(0, 3), (3, 5), (5, 11)], &[(0, 5), (5, 9), (9, 11)]).unwrap();
//! assert_eq!(spans, vec![
//!     AlignedSpan { student: 0..2, teacher: 0..1 },
//!     AlignedSpan { student: 2..3, teacher: 1..3 },
//! ]);
//!
//! // A one-byte text, one token on each side, vocabularies of 2 and 3, uniform logits.
//! let device = Device::flex().autodiff();
//! let alignment =
//!     SpanAlignment::new(MergeStrategy::Observed, &[(&[(0, 1)][..], &[(0, 1)][..])]).unwrap();
//! let student = TokenRows {
//!     logits: Tensor::<2>::from_floats([[0.0, 0.0]], &device).require_grad(),
//!     tokens: Tensor::<1, Int>::from_ints([0], &device),
//! };
//! let teacher = TokenRows {
//!     logits: Tensor::<2>::from_floats([[0.0, 0.0, 0.0]], &device),
//!     tokens: Tensor::<1, Int>::from_ints([2], &device),
//! };
//! let loss = CrossTokenizerLossConfig::new().init(); // GOLD's defaults
//! let uld = loss.forward(student, teacher, &alignment).into_scalar::<f32>();
//! // Sorted (½, ½, 0) against (⅓, ⅓, ⅓): |⅙| + |⅙| + |⅓|.
//! assert!((uld - 2.0 / 3.0).abs() < 1e-6);
//! ```
//!
//! ## Multi-device
//!
//! Data parallel needs nothing new: each worker runs [`DistillLoss`] on its rows with
//! [`Reduction::Normalized`] by the kept tokens of the global batch. A tensor-parallel LM head
//! leaves each peer with a [`VocabShard`] of the columns: [`DistillLoss::forward_vocab_parallel`]
//! (with `_soft`, `_parts`, and [`DistillLoss::forward_linear_vocab_parallel`] for the heads'
//! slices) returns the loss of the whole vocabulary on every peer and each peer's columns of
//! the gradient, exchanging `O(N)` floats per call through a [`RowExchange`]: one element-wise
//! sum over the peers, which you implement over your collective. [`LocalExchange`] implements
//! it for peers that are threads of one process. More: the guide's *Multi-device* chapter
//! (`docs/guide/multi-device.md`).
//!
//! ```
//! use burn::tensor::{Device, Tensor};
//! use burn_distill::{DistillLossConfig, Divergence, LocalExchange, VocabShard};
//!
//! let student = [[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 0.5]];
//! let teacher = [[0.5, 3.0, 0.0, -2.0], [0.2, -2.0, 4.0, 1.0]];
//! let loss = DistillLossConfig::new().with_divergence(Divergence::Jsd { beta: 0.5 }).init();
//!
//! // Two peers (threads), each holding two of the four columns.
//! let peers: Vec<_> = LocalExchange::group(2)
//!     .into_iter()
//!     .map(|exchange| {
//!         let loss = loss.clone();
//!         std::thread::spawn(move || {
//!             let device = Device::flex();
//!             let rank = exchange.rank();
//!             let shard = VocabShard::balanced(rank, 2, 4).unwrap();
//!             let cols = VocabShard::balanced_range(4, 2, rank).unwrap();
//!             let cut = |rows: [[f32; 4]; 2]| {
//!                 Tensor::<2>::from_floats(rows, &device).slice([0..2, cols.clone()])
//!             };
//!             let value =
//!                 loss.forward_vocab_parallel_soft(cut(student), cut(teacher), &shard, &exchange);
//!             value.into_scalar::<f32>()
//!         })
//!     })
//!     .collect();
//! // Every peer gets the JSD of the whole rows (by hand in f64).
//! for peer in peers {
//!     let value = peer.join().unwrap();
//!     assert!((value - 0.028_175).abs() < 1e-6, "{value}");
//! }
//! ```
//!
//! ## Bad input
//!
//! Configurations are checked at `init` (or `try_init`), shapes and values at `forward`; each
//! error is a [`DistillError`] naming the argument, its value (a target's position as you
//! passed it) and what was expected. Every panicking method has a `try_` twin that returns
//! the error ([`DistillLossConfig::try_init`], [`DistillLoss::try_forward`],
//! [`DistillLoss::try_forward_seq`], [`SparseDistillLoss::try_forward`],
//! [`try_temperature_softmax`], [`try_temperature_log_softmax`]…), and the panicking forms
//! report your line. When the values on the device are read back is the loss's
//! [`Validation`]: `Eager` in every `forward` (the default), `Deferred` until
//! [`DistillOutput::validate`] (a bad row is NaN meanwhile), or `Off`. More: the guide's *Bad
//! input and validation* chapter (`docs/guide/bad-input.md`).
//!
//! ```
//! use burn::tensor::{Device, Int, Tensor};
//! use burn_distill::{DistillError, DistillLossConfig, Validation};
//!
//! let err = DistillLossConfig::new().with_alpha(1.5).try_init().unwrap_err();
//! assert_eq!(err.to_string(), "invalid alpha: got 1.5, expected a number in [0, 1]");
//!
//! let device = Device::flex();
//! let logits = Tensor::<2>::zeros([2, 3], &device);
//! let targets = Tensor::<1, Int>::from_ints([1, 7], &device);
//! let err = DistillLossConfig::new()
//!     .init()
//!     .try_forward(logits.clone(), logits.clone(), targets.clone())
//!     .unwrap_err();
//! assert_eq!(
//!     err.to_string(),
//!     "invalid targets: targets[1] = 7 is out of range, expected a class index in [0, 3) or \
//!      the ignore_index -100"
//! );
//!
//! // Deferred: no read-back in forward; the bad row makes the mean NaN, and validate names it.
//! let loss = DistillLossConfig::new().with_validation(Validation::Deferred).init();
//! let out = loss.forward_parts(logits.clone(), logits, Some(targets));
//! assert!(out.loss.clone().into_scalar::<f32>().is_nan());
//! assert!(matches!(
//!     out.validate(),
//!     Err(DistillError::TargetOutOfRange { row: 1, value: 7, classes: 3, .. })
//! ));
//! ```
//!
//! ## Backend implementers
//!
//! A training loop needs none of this. [`backend`] holds what a backend implementer needs: the
//! extension trait of the fused kernels ([`backend::DistillOps`]), what a device has
//! ([`backend::has_fused_kernel`], [`backend::has_sparse_fused_kernel`],
//! [`backend::MAX_SPARSE_K`], [`backend::linear_chunk_bytes`]) and the composed reference
//! ([`backend::reference_loss`]); [`Kernel`] picks the fused kernel (`Auto`, `Fused`) or the
//! reference. [`testing`] exports the conformance suites (the float64 PyTorch golden cases,
//! fused against reference, validation, on-policy and cross-tokenizer) as functions that panic
//! with a report of every mismatch, and [`conformance_tests!`] writes them as `#[test]`
//! functions for a device in one line of your crate's `tests/`. More: the guide's *Backends
//! and kernels* chapter (`docs/guide/backends-and-kernels.md`) and its *Architecture* chapter
//! (`docs/guide/architecture.md`).
//!
//! ```
//! use burn::tensor::{DType, Device};
//! use burn_distill::backend::{MAX_SPARSE_K, has_fused_kernel, has_sparse_fused_kernel};
//! use burn_distill::{Kernel, testing};
//!
//! // In a file of your `tests/`: the suites as `#[test]` functions for one device (`fused`:
//! // also the fused kernel's golden cases and its parity with the reference).
//! burn_distill::conformance_tests!(flex, Device::flex(), fused);
//!
//! # fn main() {
//! let device = Device::flex();
//! assert!(has_fused_kernel(&device, DType::F32) && has_fused_kernel(&device, DType::F64));
//! assert!(!has_fused_kernel(&device, DType::F16)); // f16 and bf16: the CubeCL kernels
//! assert!(has_sparse_fused_kernel(&device, DType::F32, 2 * MAX_SPARSE_K)); // any k on the CPU
//! // The suites as functions: the 38 dense golden cases (loss and gradient), and the fused
//! // kernel against the reference at vocabularies 1 and 17.
//! testing::assert_golden(&device, Kernel::Auto);
//! testing::parity::sweep(&device, &[1, 17]);
//! # }
//! ```
//!
//! ## The guide
//!
//! The repository's `docs/guide/` has one chapter per topic, each example in it a doc test:
//! *The losses and their math* (`losses.md`), *Language models* (`language-models.md`),
//! *On-policy distillation* (`on-policy.md`), *Across tokenizers* (`cross-tokenizer.md`),
//! *Coming from PyTorch, Liger, TRL, torchtune* (`coming-from-pytorch.md`), *Bad input and
//! validation* (`bad-input.md`), *Backends and kernels* (`backends-and-kernels.md`),
//! *Benchmarks* (`benchmarks.md`), *The experiments* (`experiments.md`), *Multi-device*
//! (`multi-device.md`) and *Architecture* (`architecture.md`). Coming from burn-distill 0.1:
//! `CHANGELOG.md`.
#![warn(missing_docs)]

pub mod backend;
pub mod cross;
mod divergence;
mod error;
mod hidden;
mod kernel;
mod linear;
mod loss;
pub mod onpolicy;
mod parallel;
mod params;
mod rank;
mod reduction;
mod softmax;
mod sparse;
pub mod store;
mod tail;
pub mod testing;
mod validation;
mod vocab;

pub use divergence::Divergence;
pub use error::DistillError;
pub use hidden::{HiddenLossKind, HiddenStateLoss, HiddenStateLossConfig};
pub use kernel::Kernel;
pub use loss::{DistillLoss, DistillLossConfig, DistillOutput};
pub use parallel::{LocalExchange, RowExchange, VocabShard};
pub use params::DistillParams;
pub use reduction::Reduction;
pub use softmax::{
    temperature_log_softmax, temperature_softmax, try_temperature_log_softmax,
    try_temperature_softmax,
};
pub use sparse::{SparseDistillLoss, SparseDistillLossConfig, SparseTeacher};
pub use tail::{StudentSupport, TAIL_FLOOR, TailPolicy};
pub use validation::Validation;
pub use vocab::{MASKED_LOGIT, VocabMismatch};

/// Hooks for this crate's own tests and benchmarks; not part of the API (no semver promise).
#[doc(hidden)]
pub mod internals {
    #[cfg(feature = "flex")]
    pub use crate::kernel::cpu::{Isa, force_isa, zeroed_grad};

    /// Runs of the fused-linear host loop of Flex on this thread so far.
    #[cfg(feature = "flex")]
    pub fn host_linear_calls() -> usize {
        crate::kernel::linear_cpu::HOST_LINEAR_CALLS.with(|calls| calls.get())
    }

    /// Runs of the fused-linear chunk loop (tensor code) on this thread so far.
    pub fn chunked_linear_calls() -> usize {
        crate::linear::CHUNKED_CALLS.with(|calls| calls.get())
    }
}

/// The README's examples, compiled and run as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// The guide's examples (`docs/guide/*.md`), compiled and run as doc tests: one item per
/// chapter.
#[cfg(doctest)]
pub mod guide {
    #[doc = include_str!("../docs/guide/losses.md")]
    pub struct Losses;
    #[doc = include_str!("../docs/guide/language-models.md")]
    pub struct LanguageModels;
    #[doc = include_str!("../docs/guide/on-policy.md")]
    pub struct OnPolicy;
    #[doc = include_str!("../docs/guide/cross-tokenizer.md")]
    pub struct CrossTokenizer;
    #[doc = include_str!("../docs/guide/coming-from-pytorch.md")]
    pub struct ComingFromPytorch;
    #[doc = include_str!("../docs/guide/bad-input.md")]
    pub struct BadInput;
    #[doc = include_str!("../docs/guide/backends-and-kernels.md")]
    pub struct BackendsAndKernels;
    #[doc = include_str!("../docs/guide/benchmarks.md")]
    pub struct Benchmarks;
    #[doc = include_str!("../docs/guide/experiments.md")]
    pub struct Experiments;
    #[doc = include_str!("../docs/guide/multi-device.md")]
    pub struct MultiDevice;
    #[doc = include_str!("../docs/guide/architecture.md")]
    pub struct Architecture;
}
