//! The offline teacher store: round trips (indices bit-exact, values within f16/bf16 rounding,
//! several chunks, random access), the loss from stored values, atomic writing, and every
//! corruption and mismatch case as a clear error; rows and `[B, T, k]` sequences. On Flex
//! (0.1 ran these on NdArray).
#![cfg(feature = "flex")]

use std::path::{Path, PathBuf};

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use burn_distill::store::{
    StoreError, StoreValues, TeacherStore, TeacherStoreConfig, TeacherStoreWriter,
};
use burn_distill::{DistillLossConfig, SparseDistillLossConfig, SparseTeacher};
use half::{bf16, f16};

fn device() -> Device {
    Device::flex()
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("burn-distill-store-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    path
}

/// Deterministic rows: distinct indices spread over `[0, V)`, log-probabilities in about
/// `[-20, 0]`, and every 7th entry missing (`−∞`).
fn rows(n: usize, k: usize, vocab: usize, seed: u64) -> (Vec<i64>, Vec<f32>) {
    let mut s = seed;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as usize
    };
    let mut indices = Vec::new();
    let mut values = Vec::new();
    for r in 0..n {
        for j in 0..k {
            indices.push(((next() % (vocab / k)) * k + j) as i64);
            values.push(if (r * k + j) % 7 == 6 {
                f32::NEG_INFINITY
            } else {
                -((next() % 20_000) as f32) / 1000.0
            });
        }
    }
    // The largest index and a log-probability of exactly 0 appear.
    indices[0] = vocab as i64 - 1;
    values[0] = 0.0;
    (indices, values)
}

fn write(path: &Path, config: TeacherStoreConfig, batches: &[(Vec<i64>, Vec<f32>)]) {
    let mut w = TeacherStoreWriter::create(path, config).unwrap();
    for (i, v) in batches {
        w.append_rows(i, v).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn round_trip_is_bit_exact_for_indices_and_rounds_values_once() {
    for (vocab, k, values, chunk_rows) in [
        (128_256, 5, StoreValues::F16, 7),
        (50_000, 3, StoreValues::Bf16, 4),
        (2, 1, StoreValues::F16, 1000),
        (1000, 1000, StoreValues::F16, 3),
    ] {
        let path = temp(&format!("rt-{vocab}-{k}.safetensors"));
        let (a, b) = (rows(13, k, vocab, 1), rows(10, k, vocab, 2));
        let config = TeacherStoreConfig::new(vocab, k)
            .with_values(values)
            .with_chunk_rows(chunk_rows)
            .with_generation_temperature(0.7);
        write(&path, config.clone(), &[a.clone(), b.clone()]);
        let store = TeacherStore::open(&path).unwrap();
        let info = store.info();
        assert_eq!((info.rows, info.vocab, info.k), (23, vocab, k));
        assert_eq!(info.index_bits, config.index_bits());
        assert_eq!(info.generation_temperature, 0.7);
        assert_eq!(info.values, values);
        let (indices, log_probs) = store.read_rows(0..23).unwrap();
        let expected_i: Vec<i64> = a.0.iter().chain(&b.0).copied().collect();
        let expected_v: Vec<f32> = a.1.iter().chain(&b.1).copied().collect();
        for (p, ((got_i, got_v), (want_i, want_v))) in indices
            .iter()
            .zip(&log_probs)
            .zip(expected_i.iter().zip(&expected_v))
            .enumerate()
        {
            // Rounded once, toward −∞, by less than one unit in the last place.
            let (nearest, ulp) = match values {
                StoreValues::F16 => (f16::from_f32(*want_v).to_f32(), 2f32.powi(-10)),
                _ => (bf16::from_f32(*want_v).to_f32(), 2f32.powi(-7)),
            };
            assert_eq!(got_v.to_bits(), values.quantize(*want_v).to_bits());
            if want_v.is_finite() {
                assert!(
                    *got_v <= *want_v && want_v - got_v <= ulp * want_v.abs(),
                    "value {p} ({vocab}, {k}): {want_v} stored as {got_v}"
                );
                assert!(*got_v <= nearest, "value {p}");
            } else {
                assert_eq!(*got_v, f32::NEG_INFINITY);
            }
            if *want_v != f32::NEG_INFINITY {
                assert_eq!(got_i, want_i, "index {p} ({vocab}, {k})");
            }
        }
        // Random access across chunk boundaries equals the slice of a full read.
        for range in [3..9, 22..23, 0..0, 7..8] {
            let (i, v) = store.read_rows(range.clone()).unwrap();
            assert_eq!(i, indices[range.start * k..range.end * k]);
            assert_eq!(v, log_probs[range.start * k..range.end * k]);
        }
        // Random access and batches as SparseTeacher: the same values as `read_rows`.
        let g = store.gather(&[22, 0, 9], &device()).unwrap();
        let (mut want_i, mut want_v) = (Vec::new(), Vec::new());
        for r in [22, 0, 9] {
            want_i.extend_from_slice(&indices[r * k..(r + 1) * k]);
            want_v.extend_from_slice(&log_probs[r * k..(r + 1) * k]);
        }
        assert_eq!(values_i(g.indices().clone()), want_i);
        assert_eq!(values_f(g.log_probs().clone()), want_v);
        let (mut all_i, mut sizes) = (Vec::new(), Vec::new());
        for t in store.batches(10, &device()) {
            let t = t.unwrap();
            sizes.push(t.dims()[0]);
            all_i.extend(values_i(t.indices().clone()));
        }
        assert_eq!(sizes, [10, 10, 3]);
        assert_eq!(all_i, indices);
        let err = store.read_rows(20..24).unwrap_err().to_string();
        assert!(err.contains("20..24") && err.contains("0..23"), "{err}");
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn the_loss_from_stored_values_is_the_loss_of_the_rounded_teacher() {
    let device = device();
    let (n, v, k) = (6, 40, 8);
    let logit = |i: usize, s: f64| (((i as f64 + 1.0) * s).sin() * 4.0) as f32;
    let teacher: Vec<f32> = (0..n * v).map(|i| logit(i, 0.37)).collect();
    let student: Vec<f32> = (0..n * v).map(|i| logit(i, 0.91)).collect();
    let teacher = Tensor::<2>::from_data(TensorData::new(teacher, [n, v]), &device);
    let student = Tensor::<2>::from_data(TensorData::new(student, [n, v]), &device);
    let targets =
        Tensor::<1, Int>::from_data(TensorData::new(vec![1i64, 5, -100, 39, 0, 7], [n]), &device);
    let path = temp("loss.safetensors");
    let mut w = TeacherStoreWriter::create(&path, TeacherStoreConfig::new(v, k).with_chunk_rows(4))
        .unwrap();
    w.append_logits(teacher.clone()).unwrap();
    w.finish().unwrap();
    let store = TeacherStore::open(&path).unwrap();
    store.check(v, k).unwrap();
    let stored = store.batch(0..n, &device).unwrap();
    let direct = SparseTeacher::from_logits(teacher, k, 1.0);
    // The same teacher with its log-probabilities rounded to f16 (toward −∞) by hand.
    let (di, dv) = {
        let i = values_i(direct.indices().clone());
        let v: Vec<f32> = values_f(direct.log_probs().clone())
            .iter()
            .map(|x| {
                let h = f16::from_f32(*x);
                let h = if h.to_f32() > *x {
                    f16::from_bits(h.to_bits() + 1)
                } else {
                    h
                };
                h.to_f32()
            })
            .collect();
        (i, v)
    };
    let rounded = SparseTeacher::new(
        Tensor::<2, Int>::from_data(TensorData::new(di, [n, k]), &device),
        Tensor::<2>::from_data(TensorData::new(dv, [n, k]), &device),
    );
    let loss = SparseDistillLossConfig::new(DistillLossConfig::new().with_temperature(2.0)).init();
    let value = |t: SparseTeacher| {
        loss.forward(student.clone(), t, targets.clone())
            .into_scalar::<f32>()
    };
    let (from_store, from_rounded, exact) = (value(stored), value(rounded), value(direct));
    assert_eq!(from_store, from_rounded);
    // f16 keeps 11 significant bits: the loss moves by far less than 1%.
    assert!(
        (from_store - exact).abs() <= 2e-3 * exact.abs(),
        "{from_store} vs {exact}"
    );
    std::fs::remove_file(&path).unwrap();
}

/// Int tensors are i32 on Flex: read back as i64.
fn values_i<const D: usize>(t: Tensor<D, Int>) -> Vec<i64> {
    t.into_data().iter::<i64>().collect()
}
fn values_f<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

#[test]
fn masked_entries_are_stored_as_missing() {
    let device = device();
    let path = temp("mask.safetensors");
    let teacher = SparseTeacher::new(
        Tensor::from_data(TensorData::new(vec![3i64, 99, 1, 2], [2, 2]), &device),
        Tensor::from_data(
            TensorData::new(vec![-0.1f32, 5.0, -1.0, -2.0], [2, 2]),
            &device,
        ),
    )
    .with_mask(Tensor::<2, Bool>::from_data(
        TensorData::new(vec![true, false, true, true], [2, 2]),
        &device,
    ));
    let mut w = TeacherStoreWriter::create(&path, TeacherStoreConfig::new(10, 2)).unwrap();
    // The masked entry's index (99) and value (5) would be errors if they were read.
    w.append(&teacher).unwrap();
    w.finish().unwrap();
    let (i, v) = TeacherStore::open(&path).unwrap().read_rows(0..2).unwrap();
    assert_eq!(i, [3, 0, 1, 2]);
    assert_eq!(v[1], f32::NEG_INFINITY);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn bad_rows_and_settings_are_named() {
    let path = temp("bad.safetensors");
    let err = |e: StoreError| e.to_string();
    let mut w = TeacherStoreWriter::create(&path, TeacherStoreConfig::new(10, 2)).unwrap();
    w.append_rows(&[1, 2, 3, 4], &[-1.0, -2.0, -0.5, -0.1])
        .unwrap();
    let e = err(w.append_rows(&[1, 10], &[-1.0, -2.0]).unwrap_err());
    assert!(
        e.contains("row 2, entry 1") && e.contains("got 10,") && e.contains("[0, 10)"),
        "{e}"
    );
    let e = err(w.append_rows(&[1, 2], &[0.5, -2.0]).unwrap_err());
    assert!(
        e.contains("row 2, entry 0") && e.contains("0.5") && e.contains("<= 0"),
        "{e}"
    );
    let e = err(w.append_rows(&[1, 2], &[f32::NAN, -2.0]).unwrap_err());
    assert!(e.contains("NaN"), "{e}");
    let e = err(w.append_rows(&[1, 2, 3], &[-1.0, -2.0, -3.0]).unwrap_err());
    assert!(e.contains("k = 2"), "{e}");
    // Nothing of the bad calls was appended.
    assert_eq!(w.rows(), 2);
    let e = err(w
        .append_logits(Tensor::<2>::zeros([1, 11], &device()))
        .unwrap_err());
    assert!(e.contains("[1, 11]") && e.contains("[N, 10]"), "{e}");
    drop(w);
    for (config, needle) in [
        (TeacherStoreConfig::new(0, 1), "vocab"),
        (TeacherStoreConfig::new(10, 11), "k"),
        (
            TeacherStoreConfig::new(10, 2).with_chunk_rows(0),
            "chunk_rows",
        ),
        (
            TeacherStoreConfig::new(10, 2).with_generation_temperature(0.0),
            "generation_temperature",
        ),
    ] {
        let e = err(TeacherStoreWriter::create(&path, config).err().unwrap());
        assert!(e.contains(needle), "{e}");
    }
}

#[test]
fn writing_is_atomic() {
    let path = temp("atomic.safetensors");
    let config = TeacherStoreConfig::new(100, 4).with_chunk_rows(2);
    let batch = rows(5, 4, 100, 3);
    write(&path, config.clone(), std::slice::from_ref(&batch));
    let before = std::fs::read(&path).unwrap();
    // A second writer at the same path: until `finish`, the old store stays whole and readable.
    let mut w = TeacherStoreWriter::create(&path, config.clone()).unwrap();
    w.append_rows(&batch.0, &batch.1).unwrap();
    w.append_rows(&batch.0, &batch.1).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(TeacherStore::open(&path).unwrap().rows(), 5);
    // Dropped unfinished: nothing changes and no side file remains.
    drop(w);
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let dir = path.parent().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("atomic.safetensors.partial")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // A new path: nothing there before `finish`.
    let fresh = temp("fresh.safetensors");
    let mut w = TeacherStoreWriter::create(&fresh, config).unwrap();
    w.append_rows(&batch.0, &batch.1).unwrap();
    assert!(matches!(
        TeacherStore::open(&fresh),
        Err(StoreError::Io { .. })
    ));
    w.finish().unwrap();
    assert_eq!(TeacherStore::open(&fresh).unwrap().rows(), 5);
    std::fs::remove_file(&path).unwrap();
    std::fs::remove_file(&fresh).unwrap();
}

#[test]
fn corrupt_truncated_and_mismatched_files_are_clear_errors() {
    let path = temp("good.safetensors");
    let batch = rows(9, 4, 1000, 4);
    write(
        &path,
        TeacherStoreConfig::new(1000, 4).with_chunk_rows(4),
        &[batch],
    );
    let good = std::fs::read(&path).unwrap();
    let bad = temp("bad-file.safetensors");
    let open_err = |bytes: &[u8]| {
        std::fs::write(&bad, bytes).unwrap();
        match TeacherStore::open(&bad) {
            Err(e) => e,
            Ok(_) => panic!("a damaged store opened"),
        }
    };
    // Truncated anywhere: in the data, in the header, to nothing.
    for cut in [1, 100, good.len() - 10, good.len()] {
        let e = open_err(&good[..good.len() - cut]);
        assert!(matches!(e, StoreError::Corrupt { .. }), "cut {cut}: {e}");
        assert!(e.to_string().contains("corrupt"), "{e}");
    }
    // A flipped bit in the data: found by the chunk's checksum when that chunk is read.
    let mut flipped = good.clone();
    let last = flipped.len() - 3;
    flipped[last] ^= 0x10;
    std::fs::write(&bad, &flipped).unwrap();
    let store = TeacherStore::open(&bad).unwrap();
    assert!(store.read_rows(0..4).is_ok(), "chunk 0 is intact");
    let e = store.read_rows(8..9).unwrap_err().to_string();
    assert!(
        e.contains("checksum mismatch in chunk 2") && e.contains("rows 8..9"),
        "{e}"
    );
    drop(store); // unmapped before the file is rewritten
    // Another version, another format, no metadata.
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&good[8..8 + header_len]).unwrap();
    let with = |from: &str, to: &str| {
        assert_eq!(from.len(), to.len());
        let mut bytes = good.clone();
        let at = 8 + header
            .find(from)
            .unwrap_or_else(|| panic!("{from} in {header}"));
        bytes[at..at + to.len()].copy_from_slice(to.as_bytes());
        bytes
    };
    let e = open_err(&with("\"version\":\"1\"", "\"version\":\"2\""));
    assert!(
        matches!(
            &e,
            StoreError::Mismatch {
                field: "version",
                ..
            }
        ) && e.to_string().contains("version is 2"),
        "{e}"
    );
    // A damaged header value (the vocabulary, 1000 → 1001) fails the header checksum.
    let e = open_err(&with("\"vocab\":\"1000\"", "\"vocab\":\"1001\""));
    assert!(e.to_string().contains("header checksum mismatch"), "{e}");
    let e = open_err(&with("burn-distill-topk", "burn-distill-xxxx"));
    assert!(e.to_string().contains("burn-distill-xxxx"), "{e}");
    let e = open_err(&with("__metadata__", "__metadataX_"));
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    // A store of another vocabulary or k than the run expects.
    let store = TeacherStore::open(&path).unwrap();
    let e = store.check(1001, 4).unwrap_err().to_string();
    assert!(e.contains("vocab is 1000, expected 1001"), "{e}");
    let e = store.check(1000, 5).unwrap_err().to_string();
    assert!(e.contains("k is 4, expected 5"), "{e}");
    std::fs::remove_file(&path).unwrap();
    std::fs::remove_file(&bad).unwrap();
}

/// An edit of a tensor's bytes.
type Poke = dyn Fn(&mut Vec<u8>);

/// `good` rewritten with `edit` applied to its metadata (string values) and, if given, its
/// chunk 0 log-probability bytes, and the checksums (header, chunk 0) recomputed as a writer
/// would: the structural checks behind the checksums must catch what is left.
fn rewritten(
    good: &[u8],
    edit: impl Fn(&mut std::collections::HashMap<String, String>),
    values: Option<&Poke>,
) -> Vec<u8> {
    use safetensors::{SafeTensors, tensor::TensorView};
    let (_, metadata) = SafeTensors::read_metadata(good).unwrap();
    let mut meta = metadata.metadata().clone().unwrap();
    let tensors = SafeTensors::deserialize(good).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = tensors
        .tensors()
        .into_iter()
        .map(|(name, t)| (name, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    if let Some(change) = values {
        let at = owned.iter().position(|t| t.0 == "log_probs.0").unwrap();
        change(&mut owned[at].3);
        let data = |name: &str| owned.iter().find(|t| t.0 == name).unwrap().3.clone();
        let mut h = crc32fast::Hasher::new();
        h.update(&data("indices.0"));
        h.update(&data("log_probs.0"));
        let mut crcs: Vec<u32> = serde_json::from_str(&meta["crc32"]).unwrap();
        crcs[0] = h.finalize();
        meta.insert("crc32".into(), serde_json::to_string(&crcs).unwrap());
    }
    edit(&mut meta);
    // The header checksum: every other key, sorted, as `key=value\n`.
    let mut keys: Vec<String> = meta
        .keys()
        .filter(|k| *k != "header_crc32")
        .cloned()
        .collect();
    keys.sort();
    let mut h = crc32fast::Hasher::new();
    for k in &keys {
        h.update(format!("{k}={}\n", meta[k]).as_bytes());
    }
    meta.insert("header_crc32".into(), h.finalize().to_string());
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(name, dtype, shape, data)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, Some(meta)).unwrap()
}

/// Headers that pass their checksum (rewritten as a writer would) but describe a store the
/// tensors are not, and decoded values that are not log-probabilities (chunk checksum
/// recomputed): each a `Corrupt` error naming what is wrong.
#[test]
fn structurally_bad_headers_and_values_behind_valid_checksums_are_found() {
    let path = temp("good-structure.safetensors");
    write(
        &path,
        TeacherStoreConfig::new(1000, 4).with_chunk_rows(4),
        &[rows(9, 4, 1000, 5)],
    );
    let good = std::fs::read(&path).unwrap();
    let bad = temp("bad-structure.safetensors");
    // The unchanged rewrite opens and reads: the helper itself is faithful.
    std::fs::write(&bad, rewritten(&good, |_| {}, None)).unwrap();
    let store = TeacherStore::open(&bad).unwrap();
    assert_eq!(
        store.read_rows(0..9).unwrap(),
        TeacherStore::open(&path).unwrap().read_rows(0..9).unwrap()
    );
    drop(store);
    let set = |key: &'static str, value: &'static str| {
        move |meta: &mut std::collections::HashMap<String, String>| {
            meta.insert(key.into(), value.into());
        }
    };
    for (key, value, expected) in [
        ("k", "5000", "bad header"),
        ("vocab", "0", "bad header"),
        ("generation_temperature", "-1.0", "bad header"),
        ("index_bits", "11", "index_bits = 11"),
        ("rows", "13", "checksums for 13 rows"),
        ("rows", "18446744073709551615", "k = 4"),
        ("chunk_rows", "5", "in chunks of 5"),
        ("chunk_rows", "4611686018427387904", "bad header"),
        ("values", "f32", "value type `f32`"),
        ("crc32", "[1,2]", "2 checksums"),
        ("vocab", "not a number", "bad header"),
    ] {
        std::fs::write(&bad, rewritten(&good, set(key, value), None)).unwrap();
        match TeacherStore::open(&bad) {
            Ok(_) => panic!("{key} = {value}: a damaged store opened"),
            Err(e) => {
                assert!(
                    matches!(e, StoreError::Corrupt { .. }),
                    "{key} = {value}: {e}"
                );
                assert!(e.to_string().contains(expected), "{key} = {value}: {e}");
            }
        }
    }
    // Values: NaN (f16 0x7E00) at row 1, entry 2; +1.0 (0x3C00) at row 3, entry 0; +∞.
    for (at, bits, expected) in [
        (4 + 2, 0x7E00u16, "log-probability NaN at row 1, entry 2"),
        (12, 0x3C00, "log-probability 1 at row 3, entry 0"),
        (12, 0x7C00, "log-probability inf at row 3, entry 0"),
    ] {
        let poke = move |bytes: &mut Vec<u8>| {
            bytes[2 * at..2 * at + 2].copy_from_slice(&bits.to_le_bytes());
        };
        std::fs::write(&bad, rewritten(&good, |_| {}, Some(&poke))).unwrap();
        let store = TeacherStore::open(&bad).unwrap();
        let e = store.read_rows(0..4).unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains(expected), "{e}");
        assert!(store.read_rows(4..9).is_ok(), "the other chunks read");
    }
    std::fs::remove_file(&path).unwrap();
    std::fs::remove_file(&bad).unwrap();
}

/// `chunk_rows · k` that cannot be addressed is refused by the writer's configuration.
#[test]
fn chunk_rows_times_k_overflow_is_refused() {
    let path = temp("overflow.safetensors");
    for chunk_rows in [usize::MAX / 2, usize::MAX / 8 + 1] {
        let e = TeacherStoreWriter::create(
            &path,
            TeacherStoreConfig::new(1000, 4).with_chunk_rows(chunk_rows),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("chunk_rows") && e.contains("k = 4"), "{e}");
    }
}

/// The writer's free-form metadata comes back from the header, is checked by
/// `check_metadata` (a store of another teacher or tokenizer is an error naming the key and both
/// values), and is covered by the header checksum.
#[test]
fn metadata_records_who_wrote_the_store() {
    let path = temp("metadata.safetensors");
    let mut w = TeacherStoreWriter::create(&path, TeacherStoreConfig::new(1000, 4)).unwrap();
    w.set_metadata("teacher", "kjv-teacher-6x256").unwrap();
    w.set_metadata("tokenizer", "bpe-4096").unwrap();
    w.set_metadata("tokenizer", "bpe-8192").unwrap();
    assert!(w.set_metadata("", "x").is_err());
    let (i, v) = rows(5, 4, 1000, 9);
    w.append_rows(&i, &v).unwrap();
    let info = w.finish().unwrap();
    assert_eq!(info.metadata.len(), 2);
    assert_eq!(info.metadata["tokenizer"], "bpe-8192");
    let store = TeacherStore::open(&path).unwrap();
    assert_eq!(store.info().metadata, info.metadata);
    store
        .check_metadata("teacher", "kjv-teacher-6x256")
        .unwrap();
    let e = store.check_metadata("tokenizer", "bpe-4096").unwrap_err();
    assert!(matches!(e, StoreError::Mismatch { .. }), "{e}");
    let e = e.to_string();
    assert!(
        e.contains("tokenizer = \"bpe-8192\"") && e.contains("bpe-4096"),
        "{e}"
    );
    let e = store.check_metadata("data", "kjv").unwrap_err().to_string();
    assert!(e.contains("no \"data\""), "{e}");
    drop(store);
    // A changed value without a new header checksum is found.
    let good = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&good[8..8 + header_len]).unwrap();
    let at = 8 + header.find("bpe-8192").unwrap();
    let mut bad = good.clone();
    bad[at..at + 8].copy_from_slice(b"bpe-4096");
    let bad_path = temp("metadata-bad.safetensors");
    std::fs::write(&bad_path, &bad).unwrap();
    let e = TeacherStore::open(&bad_path).unwrap_err().to_string();
    assert!(e.contains("header checksum mismatch"), "{e}");
    std::fs::remove_file(&path).unwrap();
    std::fs::remove_file(&bad_path).unwrap();
}

/// `gather_host` returns the rows in the order asked (shuffled, repeated, across chunks) equal
/// to `read_rows`, and `read_ahead` yields the same batches in order from its thread, stopping
/// cleanly when dropped early.
#[test]
fn gathered_and_read_ahead_batches_equal_read_rows() {
    let path = temp("gather.safetensors");
    let (k, n) = (5, 300);
    write(
        &path,
        TeacherStoreConfig::new(5000, k).with_chunk_rows(64),
        &[rows(n, k, 5000, 12)],
    );
    let store = std::sync::Arc::new(TeacherStore::open(&path).unwrap());
    let one = |r: usize| store.read_rows(r..r + 1).unwrap();
    let batches: Vec<Vec<usize>> = vec![
        vec![299, 0, 63, 64, 65, 66, 10, 10, 128],
        (100..140).rev().collect(),
        vec![7],
        (0..n).collect(),
    ];
    for rows in &batches {
        let host = store.gather_host(rows).unwrap();
        assert_eq!((host.rows, host.k), (rows.len(), k));
        for (j, &r) in rows.iter().enumerate() {
            let (i, v) = one(r);
            assert_eq!(host.indices[j * k..(j + 1) * k], i[..], "row {r}");
            let same = host.log_probs[j * k..(j + 1) * k]
                .iter()
                .zip(&v)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "row {r}");
        }
    }
    let ahead: Vec<_> = store
        .clone()
        .read_ahead(batches.clone(), 2)
        .map(Result::unwrap)
        .collect();
    assert_eq!(ahead.len(), batches.len());
    for (a, rows) in ahead.iter().zip(&batches) {
        assert_eq!(*a, store.gather_host(rows).unwrap());
    }
    // Dropped after one batch: the thread stops (the test would hang otherwise).
    let mut early = store.clone().read_ahead(vec![vec![1]; 1000], 1);
    assert!(early.next().unwrap().is_ok());
    drop(early);
    // A row outside the store: an error naming it, in order.
    let mut bad = store.clone().read_ahead(vec![vec![0], vec![n]], 2);
    assert!(bad.next().unwrap().is_ok());
    let e = bad.next().unwrap().unwrap_err().to_string();
    assert!(e.contains(&format!("row {n}")), "{e}");
    assert!(store.gather_host(&[n + 5]).is_err());
    std::fs::remove_file(&path).unwrap();
}

/// The message of a panic of `f`.
#[cfg(feature = "dataset")]
fn panic_message<T>(f: impl FnOnce() -> T) -> String {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(_) => panic!("no panic"),
        Err(payload) => payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default(),
    }
}

/// The store as a burn `Dataset` of sequences aligned with a token dataset, batched into one
/// `SparseTeacher` by burn's data loader, equal to the stored rows; in 0.2 also into `[B, T, k]`
/// sequences (`TeacherSeqBatcher`), and a damaged chunk is the loader's error.
#[cfg(feature = "dataset")]
#[test]
fn dataset_and_batcher_feed_a_data_loader() {
    use burn::data::dataloader::DataLoaderBuilder;
    use burn::data::dataloader::batcher::Batcher;
    use burn::data::dataset::{Dataset, InMemDataset};
    use burn_distill::store::{
        AlignedDataset, HostTeacher, TeacherBatcher, TeacherSeqBatcher, TeacherStoreDataset,
    };
    let path = temp("dataset.safetensors");
    let (k, t, items) = (3, 8, 12);
    write(
        &path,
        TeacherStoreConfig::new(700, k).with_chunk_rows(20),
        &[rows(t * items, k, 700, 14)],
    );
    let store = std::sync::Arc::new(TeacherStore::open(&path).unwrap());
    assert!(TeacherStoreDataset::new(store.clone(), 7).is_err());
    let teacher = TeacherStoreDataset::new(store.clone(), t).unwrap();
    assert_eq!(teacher.len(), items);
    let item = teacher.get(5).unwrap();
    let (i, v) = store.read_rows(5 * t..6 * t).unwrap();
    assert_eq!((item.indices, item.log_probs.len()), (i, v.len()));
    // 0.1's `get(items)` was `None`; burn 0.22's `Dataset::get` panics past the end (its
    // contract, as a slice's indexing), naming the item and the count.
    let e = panic_message(|| teacher.get(items));
    assert!(
        e.contains("item 12 is out of range") && e.contains("12 items of 8 rows"),
        "{e}"
    );
    // Token items: the sequence number.
    let tokens = || InMemDataset::new((0..items).collect::<Vec<usize>>());
    assert!(AlignedDataset::new(InMemDataset::new(vec![0usize; 3]), teacher.clone()).is_err());
    let aligned = AlignedDataset::new(tokens(), teacher.clone()).unwrap();
    #[derive(Clone)]
    struct Pairs;
    impl Batcher<(usize, HostTeacher), (Vec<usize>, SparseTeacher)> for Pairs {
        fn batch(
            &self,
            items: Vec<(usize, HostTeacher)>,
            device: &Device,
        ) -> (Vec<usize>, SparseTeacher) {
            let (seqs, teachers): (Vec<_>, Vec<_>) = items.into_iter().unzip();
            (seqs, TeacherBatcher.batch(teachers, device))
        }
    }
    let loader = DataLoaderBuilder::new(Pairs)
        .batch_size(5)
        .shuffle(3)
        .num_workers(2)
        .set_device(device())
        .build(aligned);
    let mut seen = 0;
    for batch in loader.iter() {
        let (seqs, teacher) = batch.unwrap();
        assert_eq!(teacher.dims(), [seqs.len() * t, k]);
        let rows: Vec<usize> = seqs.iter().flat_map(|s| s * t..(s + 1) * t).collect();
        let want = store.gather(&rows, &device()).unwrap();
        assert_eq!(
            values_i(teacher.indices().clone()),
            values_i(want.indices().clone())
        );
        seen += seqs.len();
    }
    assert_eq!(seen, items);
    // The same items as `[B, T, k]` sequences.
    #[derive(Clone)]
    struct Sequences;
    impl Batcher<(usize, HostTeacher), (Vec<usize>, SparseTeacher<3>)> for Sequences {
        fn batch(
            &self,
            items: Vec<(usize, HostTeacher)>,
            device: &Device,
        ) -> (Vec<usize>, SparseTeacher<3>) {
            let (seqs, teachers): (Vec<_>, Vec<_>) = items.into_iter().unzip();
            (seqs, TeacherSeqBatcher.batch(teachers, device))
        }
    }
    let loader = DataLoaderBuilder::new(Sequences)
        .batch_size(5)
        .shuffle(4)
        .num_workers(2)
        .set_device(device())
        .build(AlignedDataset::new(tokens(), teacher.clone()).unwrap());
    let mut seen = 0;
    for batch in loader.iter() {
        let (seqs, teacher) = batch.unwrap();
        assert_eq!(teacher.dims(), [seqs.len(), t, k]);
        let want = store.gather_seq(&seqs, t, &device()).unwrap();
        assert_eq!(
            values_i(teacher.indices().clone()),
            values_i(want.indices().clone())
        );
        let same = values_f(teacher.log_probs().clone())
            .iter()
            .zip(&values_f(want.log_probs().clone()))
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "sequences {seqs:?}");
        seen += seqs.len();
    }
    assert_eq!(seen, items);
    let item_of = |rows: usize| HostTeacher {
        rows,
        k,
        indices: vec![0; rows * k],
        log_probs: vec![-1.0; rows * k],
    };
    let e = panic_message(|| TeacherSeqBatcher.batch(vec![item_of(2), item_of(3)], &device()));
    assert!(e.contains("2 and 3 rows"), "{e}");
    // A damaged chunk (the last: rows 80..96 of chunks of 20) is an error, not a panic: the
    // `Dataset`'s `DatasetError` holds the `StoreError`, and a loader yields it.
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x10;
    let damaged = temp("dataset-damaged.safetensors");
    std::fs::write(&damaged, &bytes).unwrap();
    let store = std::sync::Arc::new(TeacherStore::open(&damaged).unwrap());
    let teacher = TeacherStoreDataset::new(store, t).unwrap();
    assert!(teacher.get(0).is_ok());
    let e = teacher.get(items - 1).unwrap_err();
    let source = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<StoreError>())
        .expect("a StoreError");
    assert!(matches!(source, StoreError::Corrupt { .. }), "{source}");
    assert!(
        e.to_string().contains("checksum mismatch in chunk 4"),
        "{e}"
    );
    let loader = DataLoaderBuilder::new(Pairs)
        .batch_size(5)
        .num_workers(2)
        .set_device(device())
        .build(AlignedDataset::new(tokens(), teacher).unwrap());
    let errors: Vec<String> = loader
        .iter()
        .filter_map(|batch| batch.err().map(|e| e.to_string()))
        .collect();
    assert!(!errors.is_empty(), "the loader hid the damaged chunk");
    assert!(
        errors
            .iter()
            .all(|e| e.contains("checksum mismatch in chunk 4")),
        "{errors:?}"
    );
    std::fs::remove_file(&path).unwrap();
    std::fs::remove_file(&damaged).unwrap();
}

/// 0.2: the writer takes `[B, T, k]` teachers and `[B, T, V]` logits (their tokens row-major:
/// the same store as their flattened rows), the reader hands back `[B, T, k]` sequences
/// (`batch_seq`, `gather_seq`, `HostTeacher::to_teacher_seq`) equal to the stored rows, and
/// bad entries and shapes are named as the caller passed them.
#[test]
fn sequences_are_written_and_read_in_the_callers_shape() {
    let device = device();
    let (b, t, k, vocab) = (3, 5, 4, 300);
    let (i, v) = rows(b * t, k, vocab, 21);
    // Every 5th entry masked, with an index and a value behind it that would be errors.
    let (mut i_bad, mut v_bad, mut mask) = (i.clone(), v.clone(), vec![true; b * t * k]);
    for e in (3..b * t * k).step_by(5) {
        (i_bad[e], v_bad[e], mask[e]) = (9999, 7.0, false);
    }
    let seq = SparseTeacher::new(
        Tensor::<3, Int>::from_data(TensorData::new(i_bad.clone(), [b, t, k]), &device),
        Tensor::<3>::from_data(TensorData::new(v_bad.clone(), [b, t, k]), &device),
    )
    .with_mask(Tensor::<3, Bool>::from_data(
        TensorData::new(mask.clone(), [b, t, k]),
        &device,
    ));
    let flat = SparseTeacher::new(
        Tensor::<2, Int>::from_data(TensorData::new(i_bad, [b * t, k]), &device),
        Tensor::<2>::from_data(TensorData::new(v_bad, [b * t, k]), &device),
    )
    .with_mask(Tensor::<2, Bool>::from_data(
        TensorData::new(mask, [b * t, k]),
        &device,
    ));
    let config = TeacherStoreConfig::new(vocab, k).with_chunk_rows(4);
    let (p_seq, p_rows) = (temp("seq.safetensors"), temp("seq-rows.safetensors"));
    let mut w = TeacherStoreWriter::create(&p_seq, config.clone()).unwrap();
    w.append_seq(&seq).unwrap();
    w.append_seq(&seq).unwrap();
    assert_eq!(w.finish().unwrap().rows, 2 * b * t);
    let mut w = TeacherStoreWriter::create(&p_rows, config.clone()).unwrap();
    w.append(&flat).unwrap();
    w.append(&flat).unwrap();
    w.finish().unwrap();
    let store = TeacherStore::open(&p_seq).unwrap();
    let (all_i, all_v) = store.read_rows(0..2 * b * t).unwrap();
    assert_eq!(
        (all_i.clone(), all_v.clone()),
        TeacherStore::open(&p_rows)
            .unwrap()
            .read_rows(0..2 * b * t)
            .unwrap()
    );
    assert_eq!(all_v[3], f32::NEG_INFINITY);
    assert_eq!(all_i[..3], i[..3]);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    // Sequences 2..5 of the 2·B sequences of T tokens: rows 2T..5T.
    let s = store.batch_seq(2..5, t, &device).unwrap();
    assert_eq!(s.dims(), [3, t, k]);
    assert_eq!(values_i(s.indices().clone()), all_i[2 * t * k..5 * t * k]);
    assert_eq!(
        bits(&values_f(s.log_probs().clone())),
        bits(&all_v[2 * t * k..5 * t * k])
    );
    assert_eq!(store.batch_seq(6..6, t, &device).unwrap().dims(), [0, t, k]);
    // A shuffled batch of sequences, repeated and across chunks.
    let order = [4, 0, 4, 1];
    let rows_of: Vec<usize> = order.iter().flat_map(|s| s * t..(s + 1) * t).collect();
    let g = store.gather_seq(&order, t, &device).unwrap();
    assert_eq!(g.dims(), [4, t, k]);
    let want = store.gather(&rows_of, &device).unwrap();
    assert_eq!(
        values_i(g.indices().clone()),
        values_i(want.indices().clone())
    );
    assert_eq!(
        bits(&values_f(g.log_probs().clone())),
        bits(&values_f(want.log_probs().clone()))
    );
    let host = store.gather_host(&rows_of).unwrap();
    let h = host.clone().to_teacher_seq([4, t], &device).unwrap();
    assert_eq!(h.dims(), [4, t, k]);
    assert_eq!(values_i(h.indices().clone()), values_i(g.indices().clone()));
    let e = host
        .to_teacher_seq([3, t], &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("[3, 5]") && e.contains("B·T = 20"), "{e}");
    // Sequence lengths that do not divide the rows, sequences outside the store.
    for seq_len in [0, 7] {
        let e = store
            .batch_seq(0..1, seq_len, &device)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("invalid seq_len: got {seq_len},")) && e.contains("30 rows"),
            "{e}"
        );
        let e = store
            .gather_seq(&[0], seq_len, &device)
            .unwrap_err()
            .to_string();
        assert!(e.contains("seq_len"), "{e}");
    }
    let e = store.batch_seq(5..7, t, &device).unwrap_err().to_string();
    assert!(
        e.contains("5..7") && e.contains("within 0..6 (of 5 rows each)"),
        "{e}"
    );
    let e = store
        .gather_seq(&[1, 6], t, &device)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sequence 6") && e.contains("0..6"), "{e}");
    // `[B, T, V]` logits: the top-k of their tokens, as of the flattened rows.
    let logits: Vec<f32> = (0..2 * 3 * vocab)
        .map(|x| ((x as f32 + 1.0) * 0.37).sin() * 4.0)
        .collect();
    let logits = Tensor::<3>::from_data(TensorData::new(logits, [2, 3, vocab]), &device);
    let (p_lseq, p_lrows) = (
        temp("seq-logits.safetensors"),
        temp("seq-logits-rows.safetensors"),
    );
    let mut w = TeacherStoreWriter::create(&p_lseq, config.clone()).unwrap();
    w.append_logits_seq(logits.clone()).unwrap();
    w.finish().unwrap();
    let mut w = TeacherStoreWriter::create(&p_lrows, config.clone()).unwrap();
    w.append_logits(logits.clone().reshape([6, vocab])).unwrap();
    w.finish().unwrap();
    let (li, lv) = TeacherStore::open(&p_lseq)
        .unwrap()
        .read_rows(0..6)
        .unwrap();
    assert_eq!((li, bits(&lv)), {
        let (i, v) = TeacherStore::open(&p_lrows)
            .unwrap()
            .read_rows(0..6)
            .unwrap();
        (i, bits(&v))
    });
    // Bad sequences: named at the token `[b, t]`, the entry and the row of the store.
    let mut w = TeacherStoreWriter::create(temp("seq-bad.safetensors"), config).unwrap();
    w.append_rows(&i[..2 * k], &v[..2 * k]).unwrap();
    let with = |at: usize, index: i64, lp: f32| {
        let (mut i, mut v) = (i.clone(), v.clone());
        (i[at], v[at]) = (index, lp);
        SparseTeacher::new(
            Tensor::<3, Int>::from_data(TensorData::new(i, [b, t, k]), &device),
            Tensor::<3>::from_data(TensorData::new(v, [b, t, k]), &device),
        )
    };
    // Token [1, 2] is row 1·T + 2 = 7 of the call, 9 of the store.
    let e = w
        .append_seq(&with((t + 2) * k + 3, 300, -1.0))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("indices (token [1, 2], entry 3; row 9 of the store)")
            && e.contains("got 300,")
            && e.contains("[0, 300)"),
        "{e}"
    );
    let e = w
        .append_seq(&with((2 * t + 4) * k, 5, 0.5))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("log_probs (token [2, 4], entry 0; row 16 of the store)") && e.contains("0.5"),
        "{e}"
    );
    let e = w
        .append_seq(&SparseTeacher::new(
            Tensor::<3, Int>::zeros([1, 2, 3], &device),
            Tensor::<3>::zeros([1, 2, 3], &device),
        ))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("shape [1, 2, 3] (k = 3)") && e.contains("[B, T, 4]"),
        "{e}"
    );
    let e = w
        .append(&SparseTeacher::new(
            Tensor::<2, Int>::zeros([2, 3], &device),
            Tensor::<2>::zeros([2, 3], &device),
        ))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("shape [2, 3] (k = 3)") && e.contains("[N, 4]"),
        "{e}"
    );
    let e = w
        .append_logits_seq(Tensor::<3>::zeros([2, 3, 301], &device))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("[2, 3, 301]") && e.contains("[B, T, 300]"),
        "{e}"
    );
    // Nothing of the bad calls was appended.
    assert_eq!(w.rows(), 2);
    drop(w);
    for path in [p_seq, p_rows, p_lseq, p_lrows] {
        std::fs::remove_file(path).unwrap();
    }
}

/// The rows of the 0.1 fixtures (`tests/fixtures/store-0.1-*.safetensors`): distinct indices per
/// row, the largest index, a log-probability of exactly 0 and one in `(0, 1e-3]` (stored as 0),
/// and every 4th entry missing (`−∞`).
fn fixture_rows(rows: usize, k: usize, vocab: usize) -> (Vec<i64>, Vec<f32>) {
    let (mut indices, mut values) = (Vec::new(), Vec::new());
    for r in 0..rows {
        for j in 0..k {
            let e = r * k + j;
            indices.push(((r * 7919 + j * 104_729) % vocab) as i64);
            values.push(if e % 4 == 3 {
                f32::NEG_INFINITY
            } else {
                -(e as f32) * 0.37
            });
        }
    }
    indices[0] = vocab as i64 - 1;
    values[0] = 0.0;
    values[6] = 0.0005;
    (indices, values)
}

/// Stores written by 0.1's own writer (burn-distill 0.1.0's `src/store/`, unchanged, on burn
/// 0.21: `append_rows` of `fixture_rows` in two calls, the second starting inside a chunk, and
/// the metadata `teacher` and `written-by`): f16 with 16-bit indices in chunks of 3 rows (the
/// last of one row), and bf16 with 130 one-bit indices (two bit-packed blocks, the last
/// partial). 0.2 reads them to the bit, and writes the same store from the same calls: the same
/// header entries and the same tensor bytes, byte for byte (only the order of the header's keys
/// may differ: safetensors writes a hash map, in 0.1 as in 0.2).
#[test]
fn stores_written_by_0_1_read_to_the_bit_and_0_2_writes_the_same_bytes() {
    use safetensors::SafeTensors;
    for (name, vocab, k, values, chunk_rows, rows, t_gen, bits) in [
        (
            "store-0.1-f16.safetensors",
            50_000,
            5,
            StoreValues::F16,
            3,
            7,
            0.7,
            16,
        ),
        (
            "store-0.1-bf16.safetensors",
            2,
            1,
            StoreValues::Bf16,
            1000,
            130,
            1.0,
            1,
        ),
    ] {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        let store = TeacherStore::open(&fixture).unwrap();
        let info = store.info().clone();
        assert_eq!(
            (
                info.version,
                info.vocab,
                info.k,
                info.index_bits,
                info.values
            ),
            (1, vocab, k, bits, values),
            "{name}"
        );
        assert_eq!((info.rows, info.chunk_rows), (rows, chunk_rows), "{name}");
        assert_eq!(info.generation_temperature, t_gen, "{name}");
        assert_eq!(info.metadata["teacher"], "fixture-teacher", "{name}");
        assert_eq!(info.metadata["written-by"], "burn-distill 0.1.0", "{name}");
        store.check_metadata("teacher", "fixture-teacher").unwrap();
        let (want_i, want_v) = fixture_rows(rows, k, vocab);
        let (got_i, got_v) = store.read_rows(0..rows).unwrap();
        for (p, ((gi, gv), (wi, wv))) in got_i
            .iter()
            .zip(&got_v)
            .zip(want_i.iter().zip(&want_v))
            .enumerate()
        {
            assert_eq!(
                gv.to_bits(),
                values.quantize(*wv).to_bits(),
                "{name}: value {p}"
            );
            let index = if *wv == f32::NEG_INFINITY { 0 } else { *wi };
            assert_eq!(*gi, index, "{name}: index {p}");
        }
        assert_eq!(got_v[6], 0.0);
        let teacher = store.batch(0..rows, &device()).unwrap();
        assert_eq!(values_i(teacher.indices().clone()), got_i, "{name}");
        // The same calls through 0.2's writer.
        let path = temp(&format!("0.2-{name}"));
        let config = TeacherStoreConfig::new(vocab, k)
            .with_values(values)
            .with_chunk_rows(chunk_rows)
            .with_generation_temperature(t_gen);
        let mut w = TeacherStoreWriter::create(&path, config).unwrap();
        w.set_metadata("teacher", "fixture-teacher").unwrap();
        w.set_metadata("written-by", "burn-distill 0.1.0").unwrap();
        let split = (rows / 2) * k;
        w.append_rows(&want_i[..split], &want_v[..split]).unwrap();
        w.append_rows(&want_i[split..], &want_v[split..]).unwrap();
        assert_eq!(w.finish().unwrap(), info, "{name}");
        let (old, new) = (
            std::fs::read(&fixture).unwrap(),
            std::fs::read(&path).unwrap(),
        );
        let (old_len, old_meta) = SafeTensors::read_metadata(&old).unwrap();
        let (new_len, new_meta) = SafeTensors::read_metadata(&new).unwrap();
        assert_eq!(
            old_meta.metadata(),
            new_meta.metadata(),
            "{name}: header entries"
        );
        assert_eq!((old_len, old.len()), (new_len, new.len()), "{name}: sizes");
        assert!(
            old[8 + old_len..] == new[8 + new_len..],
            "{name}: tensor bytes"
        );
        let (old_t, new_t) = (
            SafeTensors::deserialize(&old).unwrap(),
            SafeTensors::deserialize(&new).unwrap(),
        );
        let mut names = old_t.names();
        names.sort();
        let mut new_names = new_t.names();
        new_names.sort();
        assert_eq!(names, new_names, "{name}");
        for tensor in names {
            let (a, b) = (old_t.tensor(tensor).unwrap(), new_t.tensor(tensor).unwrap());
            assert_eq!(
                (a.dtype(), a.shape(), a.data()),
                (b.dtype(), b.shape(), b.data()),
                "{name}: {tensor}"
            );
        }
        std::fs::remove_file(&path).unwrap();
    }
}
