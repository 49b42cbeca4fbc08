//! The MNIST experiment end to end on a tiny configuration: loading (bundled digits and the
//! full-MNIST file layout), teacher, both students, results and JSON. Accuracy asserted only against chance.
//! The tiny experiment runs on Flex and, with `--features wgpu`, on wgpu (0.1 ran it on NdArray).

#[path = "../examples/mnist/experiment.rs"]
mod experiment;

use burn::tensor::Device;
use experiment::{Settings, load, parse_idx};

#[test]
fn bundled_digits_load_with_the_documented_split_and_counts() {
    let (train, test) = load(&experiment::default_data_dir()).expect("bundled MNIST");
    assert_eq!((train.len(), test.len()), (8000, 2000));
    let mut counts = [0usize; 10];
    for &l in train.labels.iter().chain(&test.labels) {
        counts[l as usize] += 1;
    }
    assert_eq!(
        counts,
        [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
    );
    assert!(train.images.iter().all(|p| (0.0..=1.0).contains(p)));
}

fn idx_images(n: usize, fill: u8) -> Vec<u8> {
    let mut v = Vec::new();
    for x in [2051u32, n as u32, 28, 28] {
        v.extend(x.to_be_bytes());
    }
    v.extend(std::iter::repeat_n(fill, n * 784));
    v
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    for x in [2049u32, labels.len() as u32] {
        v.extend(x.to_be_bytes());
    }
    v.extend(labels);
    v
}

#[test]
fn full_mnist_layout_uses_its_train_and_test_files() {
    let dir = std::env::temp_dir().join(format!("burn-distill-mnist-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("train-images-idx3-ubyte"), idx_images(3, 255)).unwrap();
    std::fs::write(dir.join("train-labels-idx1-ubyte"), idx_labels(&[1, 2, 3])).unwrap();
    std::fs::write(dir.join("t10k-images-idx3-ubyte"), idx_images(2, 0)).unwrap();
    std::fs::write(dir.join("t10k-labels-idx1-ubyte"), idx_labels(&[7, 8])).unwrap();
    let (train, test) = load(&dir).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(train.labels, vec![1, 2, 3]);
    assert_eq!(test.labels, vec![7, 8]);
    assert!(train.images.iter().all(|&p| p == 1.0));
}

#[test]
fn bad_idx_files_are_rejected_with_a_reason() {
    let err = parse_idx(&idx_labels(&[1]), &idx_labels(&[1])).unwrap_err();
    assert!(err.contains("magic 2051"), "{err}");
    let err = parse_idx(&idx_images(2, 0), &idx_labels(&[1])).unwrap_err();
    assert!(err.contains("2 images but 1 labels"), "{err}");
    let missing = load(std::path::Path::new("/nonexistent-dir")).unwrap_err();
    assert!(missing.contains("no MNIST IDX files"), "{missing}");
}

#[cfg(feature = "flex")]
#[test]
fn tiny_experiment_runs_end_to_end() {
    tiny_experiment(&Device::flex());
}

#[cfg(feature = "wgpu")]
#[test]
fn tiny_experiment_runs_end_to_end_wgpu() {
    tiny_experiment(&Device::wgpu(Default::default()));
}

#[allow(dead_code)]
fn tiny_experiment(device: &Device) {
    let (train, test) = load(&experiment::default_data_dir()).unwrap();
    let (train, test) = (train.take(300), test.take(100));
    let settings = Settings {
        seeds: 2,
        temperature: 4.0,
        sweep: vec![2.0, 4.0],
        teacher_hidden: vec![32],
        teacher_epochs: 5,
        student_hidden: vec![16],
        student_epochs: 5,
        batch_size: 64,
        progress: false,
        ..Settings::default()
    };
    let r = experiment::run(&train, &test, &settings, device);
    assert_eq!((r.test_size, r.train_size), (100, 300));
    assert_eq!(r.teacher_test_errors.len(), 2);
    assert_eq!(r.student_hard_test_errors.len(), 2);
    assert_eq!(r.student_kd_test_errors.len(), 2);
    assert_eq!(r.sweep.len(), 2, "main temperature plus one more");
    assert_eq!(r.sweep[0].student_kd_test_errors, r.student_kd_test_errors);
    // Even this tiny training (5 epochs of 300 images) beats chance (90 errors in 100 for 10
    // classes) by a wide margin: every model makes fewer than 75 errors (35–60 when written).
    let all = r
        .teacher_test_errors
        .iter()
        .chain(&r.student_hard_test_errors);
    assert!(
        all.chain(&r.student_kd_test_errors).all(|&e| e < 75),
        "{:?} {:?} {:?}",
        r.teacher_test_errors,
        r.student_hard_test_errors,
        r.student_kd_test_errors
    );

    let json: serde_json::Value = serde_json::to_value(&r).unwrap();
    for key in [
        "test_size",
        "teacher_test_errors",
        "student_hard_test_errors",
        "student_kd_test_errors",
        "temperature",
        "alpha",
    ] {
        assert!(json.get(key).is_some(), "JSON lacks {key}");
    }
    assert_eq!(json["temperature"], 4.0);
}
