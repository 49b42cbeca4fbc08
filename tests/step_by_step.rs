//! The step-by-step distillation example: its task encoding (prompt, trace, answer, masking)
//! and a tiny end-to-end run in which the distilled student's loss must fall (on Flex).

#[path = "../examples/step_by_step.rs"]
mod step_by_step;

use burn::tensor::Device;
use clap::Parser;
use step_by_step::{
    EOS, Examples, IGNORE, PLUS, Problem, Rng, Settings, THEN, answer, problems, prompt,
    stated_answer, trace,
};

#[test]
fn traces_and_answers_state_the_sum() {
    let mut rng = Rng::new(3);
    for d in 1..=6 {
        for p in problems(200, d, &mut rng, &[], false) {
            let t = trace(p, d);
            assert_eq!(t.len(), 5 * d + 3);
            assert_eq!(stated_answer(&t, d, true), Some(p.a + p.b), "{p:?}");
            assert_eq!(stated_answer(&answer(p, d), d, false), Some(p.a + p.b));
            assert_eq!(prompt(p, d).len(), 2 * d + 2);
            assert_eq!(prompt(p, d)[d], PLUS);
        }
    }
    // 475 + 689 = 1164, the example of the module documentation.
    let p = Problem { a: 475, b: 689 };
    assert_eq!(
        trace(p, 4),
        [
            5, 9, 4, 1, 7, 8, 6, 1, 4, 6, 1, 1, 0, 0, 1, 0, THEN, 0, 1, 1, 6, 4, EOS
        ]
    );
    // Malformed continuations state no answer.
    assert_eq!(stated_answer(&[1, 2, 3], 4, true), None);
    assert_eq!(stated_answer(&[THEN, 1, PLUS, 3, 4, 5], 4, true), None);
}

#[test]
fn held_out_problems_are_never_trained_on() {
    let mut rng = Rng::new(9);
    let test = problems(50, 2, &mut rng, &[], true);
    let train = problems(9000, 2, &mut rng, &test, false);
    assert!(train.iter().all(|p| !test.contains(p)));
}

/// Prompt tokens and everything after the end token carry the ignore index; the targets are
/// the inputs shifted by one.
#[test]
fn examples_mask_the_prompt() {
    let d = 3;
    let p = Problem { a: 123, b: 989 };
    let mut seq = [prompt(p, d), trace(p, d)].concat();
    seq.extend([7, 7]); // junk after the end
    let ex = Examples::new(std::slice::from_ref(&seq), 2 * d + 2);
    let (inputs, targets) = (&ex.inputs[0], &ex.targets[0]);
    assert_eq!(inputs.len(), seq.len() - 1);
    let prompt_len = 2 * d + 2;
    for (i, &t) in targets.iter().enumerate() {
        let position = i + 1; // the token this target predicts
        let expected = if position < prompt_len || position > prompt_len + 5 * d + 2 {
            IGNORE
        } else {
            seq[position]
        };
        assert_eq!(t, expected, "target {i}");
    }
}

/// A tiny run of the whole experiment: every stage works, accuracies are fractions, and every
/// model's training loss falls by at least a third.
#[test]
fn tiny_experiment_runs_and_learns() {
    let settings = Settings::parse_from([
        "step_by_step",
        "--digits",
        "2",
        "--teacher-steps",
        "80",
        "--student-steps",
        "60",
        "--batch",
        "32",
        "--train-problems",
        "200",
        "--test-problems",
        "30",
        "--teacher-width",
        "32",
        "--teacher-layers",
        "1",
        "--student-width",
        "32",
        "--student-layers",
        "1",
        "--quiet",
    ]);
    let r = step_by_step::run(&settings, &Device::flex());
    for acc in [
        r.teacher,
        r.teacher_trace_accuracy,
        r.answers_only,
        r.traces_distilled,
        r.traces_hard,
    ] {
        assert!((0.0..=1.0).contains(&acc), "{r:?}");
    }
    assert_eq!(r.losses.len(), 4);
    for curve in &r.losses {
        let (first, last) = (curve.values[0], *curve.values.last().unwrap());
        assert!(first.is_finite() && last.is_finite(), "{curve:?}");
        assert!(
            last < 0.67 * first,
            "{}: loss {first} -> {last}",
            curve.label
        );
    }
}
