//! The language-model example (`examples/lm`) on a tiny configuration: every student trains
//! a few steps and learns (held-out bits per byte well below the uniform distribution's).
//! On Flex (the default feature; 0.1 ran it on NdArray).
#![cfg(feature = "flex")]

#[path = "../examples/lm/data.rs"]
#[allow(dead_code)]
mod data;
#[path = "../examples/lm/model.rs"]
#[allow(dead_code)]
mod model;
#[path = "../examples/lm/train.rs"]
#[allow(dead_code)]
mod train;

use burn::module::Module;
use burn::tensor::Device;
use model::LmConfig;
use train::{STUDENTS, Settings, World};

#[test]
fn every_student_learns() {
    // A fifth of the bundled text: 240 blocks (chapters).
    let full = data::corpus(None).unwrap();
    let dir = std::env::temp_dir().join(format!("burn_distill_lm_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = full.train[..216]
        .iter()
        .chain(std::iter::once(&full.valid))
        .cloned()
        .collect::<Vec<_>>()
        .join("\n\n");
    let path = dir.join("text.txt");
    std::fs::write(&path, &text).unwrap();
    let corpus = data::corpus(Some(&path)).unwrap();

    let (vocab, small) = (512, 320);
    let tok = data::Tok::train(&corpus.train, vocab);
    let tok_small = data::Tok::train(&corpus.train, small);
    let train_text = corpus.train.join("\n\n");
    let (stream, stream_small) = (tok.encode(&train_text), tok_small.encode(&train_text));
    let context = 24;
    let s = Settings {
        context,
        batch: 8,
        teacher: LmConfig::new(vocab, 48, 1, 2, context),
        teacher_steps: 100,
        teacher_lr: 1e-2,
        student: LmConfig::new(vocab, 32, 1, 2, context),
        student_steps: 60,
        student_lr: 1e-2,
        temperature: 1.0,
        alpha: 0.5,
        top_k: 8,
        onpolicy_batch: 4,
        prompt: context / 2,
        generate: context / 2,
        eval_every: 60,
        valid_bytes: 3_000,
        test_bytes: 4_000,
        samples: 2,
    };
    let progress = indicatif::ProgressBar::hidden();
    let (teacher, _) = train::teacher(
        &s,
        &tok,
        &stream,
        &corpus.valid,
        &dir.join("teacher.bpk"),
        &Device::flex(),
        &progress,
    );
    let prompts: Vec<String> = corpus
        .test
        .lines()
        .take(2)
        .map(|l| l.chars().take(20).collect())
        .collect();
    let world = World {
        s: &s,
        teacher: &teacher,
        tok: &tok,
        tok_small: &tok_small,
        stream: &stream,
        stream_small: &stream_small,
        valid: &corpus.valid,
        test: &corpus.test,
        prompts: &prompts,
        store_path: dir.clone(),
    };
    let teacher_bpb =
        train::bits_per_byte(&teacher.valid(), &tok, &corpus.test, s.test_bytes, context);
    let uniform = |t: &data::Tok, stream: &[u32]| {
        (t.vocab() as f64).log2() * stream.len() as f64 / train_text.len() as f64
    };
    let mut report = vec![format!(
        "teacher: {teacher_bpb:.3} (uniform {:.3})",
        uniform(&tok, &stream)
    )];
    for name in STUDENTS {
        let run = train::student(&world, name, 1, &progress);
        let u = if name.starts_with("cross") {
            uniform(&tok_small, &stream_small)
        } else {
            uniform(&tok, &stream)
        };
        report.push(format!("{name}: {:.3} (uniform {u:.3})", run.test_bpb));
        assert!(
            run.test_bpb.is_finite() && run.sample_bpb.is_finite(),
            "{report:?}"
        );
        assert!(run.test_bpb < 0.9 * u, "{name} did not learn: {report:?}");
        assert_eq!(
            run.curve.len(),
            2,
            "{name}: a validation point at the start and the end"
        );
        assert!(
            run.curve[1].1 < run.curve[0].1,
            "{name}: validation did not improve: {:?}",
            run.curve
        );
    }
    std::fs::remove_dir_all(&dir).ok();
    println!("{}", report.join("\n"));
}
