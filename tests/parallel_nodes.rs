//! The vocabulary-parallel loss across two processes: two nodes (child processes of this test
//! binary, one peer each) holding one half of the vocabulary each, exchanging their row
//! statistics through a `RowExchange` over a TCP connection on 127.0.0.1 (`TcpExchange`
//! below, written against the trait as a user would over their collective). Each node checks
//! its loss and its shard's gradient against the unsharded loss it computes itself from the
//! same data.
//!
//! 0.1 ran this over burn-collective 0.21's global orchestrator (which has no 0.22 release),
//! forward and reverse KL only, each call in its own session: burn-collective's multi-node
//! all-reduce hung on a second all-reduce in one session (tracel-ai/burn#4549). Here one
//! connection serves every call, so the divergences that need a second exchange (JSD, TVD) and
//! the trained fused-linear form (several exchanges per call) run across the processes too.
#![cfg(feature = "flex")]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_distill::{DistillError, DistillLossConfig, Divergence, RowExchange, VocabShard};

const ROWS: usize = 24;
const VOCAB: usize = 301;
const NODES: usize = 2;
const ROLE: &str = "BURN_DISTILL_TEST_NODE";

/// One of two peers over a TCP connection: each call sends this peer's values and receives
/// the other's (rank 0 writes first, rank 1 reads first, so that neither blocks on a full
/// socket buffer), then adds them in rank order (the same bits on both peers). The wire
/// format: the length as a little-endian `u64`, then the values as little-endian `f64`s.
struct TcpExchange {
    rank: usize,
    stream: Mutex<TcpStream>,
}

impl TcpExchange {
    /// Rank 0 listens on `port`, rank 1 connects to it (retrying while rank 0 starts).
    fn connect(rank: usize, port: u16) -> std::io::Result<Self> {
        let stream = if rank == 0 {
            TcpListener::bind(("127.0.0.1", port))?.accept()?.0
        } else {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                match TcpStream::connect(("127.0.0.1", port)) {
                    Ok(stream) => break stream,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        stream.set_nodelay(true)?;
        Ok(Self {
            rank,
            stream: Mutex::new(stream),
        })
    }

    fn send(stream: &mut TcpStream, values: &[f64]) -> std::io::Result<()> {
        let mut bytes = Vec::with_capacity(8 * (values.len() + 1));
        bytes.extend_from_slice(&(values.len() as u64).to_le_bytes());
        for v in values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        stream.write_all(&bytes)
    }

    fn receive(stream: &mut TcpStream) -> std::io::Result<Vec<f64>> {
        let mut word = [0u8; 8];
        stream.read_exact(&mut word)?;
        let len = u64::from_le_bytes(word) as usize;
        let mut bytes = vec![0u8; 8 * len];
        stream.read_exact(&mut bytes)?;
        Ok(bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect())
    }
}

impl RowExchange for TcpExchange {
    fn sum(&self, values: Tensor<1>) -> Result<Tensor<1>, DistillError> {
        let failed = |message: String| DistillError::Collective {
            operation: "TCP exchange".into(),
            message,
        };
        let (device, dtype) = (values.device(), values.dtype());
        let mine = values
            .try_into_vec_as::<f64>()
            .map_err(|e| failed(format!("{e:?}")))?;
        let mut stream = self.stream.lock().unwrap();
        let theirs = if self.rank == 0 {
            Self::send(&mut stream, &mine).and_then(|()| Self::receive(&mut stream))
        } else {
            Self::receive(&mut stream)
                .and_then(|theirs| Self::send(&mut stream, &mine).map(|()| theirs))
        }
        .map_err(|e| failed(e.to_string()))?;
        if theirs.len() != mine.len() {
            return Err(failed(format!(
                "{} values here, {} from the other peer",
                mine.len(),
                theirs.len()
            )));
        }
        let (first, second) = if self.rank == 0 {
            (&mine, &theirs)
        } else {
            (&theirs, &mine)
        };
        let sum: Vec<f64> = first.iter().zip(second).map(|(a, b)| a + b).collect();
        let len = sum.len();
        Ok(Tensor::from_data(
            TensorData::new(sum, [len]),
            (&device, dtype),
        ))
    }
}

/// A port the system says is free now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port")
        .port()
}

#[test]
fn two_processes_over_a_tcp_exchange() {
    let port = free_port();
    let marker = |rank: usize| {
        std::env::temp_dir().join(format!("burn-distill-node-{}-{rank}", std::process::id()))
    };
    let spawn = |rank: usize| -> Child {
        Command::new(std::env::current_exe().expect("this test binary"))
            .args(["--exact", "node", "--ignored", "--nocapture"])
            .env(ROLE, format!("{rank} {port} {}", marker(rank).display()))
            .spawn()
            .expect("a node process")
    };
    let mut nodes: Vec<Child> = (0..NODES).map(spawn).collect();
    let deadline = Instant::now() + Duration::from_secs(300);
    for (rank, node) in nodes.iter_mut().enumerate() {
        let status = loop {
            if let Some(status) = node.try_wait().expect("a node status") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = node.kill();
                panic!("node {rank} did not finish within 300 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "node {rank} failed: {status}");
        // The node ran its checks (a renamed test would run none and still exit 0).
        let report = std::fs::read_to_string(marker(rank)).unwrap_or_default();
        let _ = std::fs::remove_file(marker(rank));
        assert_eq!(report, "5 losses checked", "node {rank}");
    }
}

/// One node: run by `two_processes_over_a_tcp_exchange` in a child process (and a no-op when
/// run otherwise).
#[test]
#[ignore = "a child process of two_processes_over_a_tcp_exchange"]
fn node() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let fields: Vec<&str> = role.split(' ').collect();
    let rank: usize = fields[0].parse().expect("a rank");
    let port: u16 = fields[1].parse().expect("a port");
    let marker = fields[2];
    let exchange = TcpExchange::connect(rank, port).expect("the other node");
    let device = Device::flex().autodiff();

    // The same batch on both nodes (a deterministic function of the index).
    let logits = |len: usize, seed: f32| -> Vec<f32> {
        (0..len)
            .map(|i| ((i as f32 * 0.7548 + seed).sin() * 43758.547).fract() * 10.0 - 5.0)
            .collect()
    };
    let (student, teacher) = (logits(ROWS * VOCAB, 0.1), logits(ROWS * VOCAB, 0.9));
    let targets: Vec<i64> = (0..ROWS)
        .map(|r| {
            if r % 6 == 5 {
                -100
            } else {
                (r * 37 % VOCAB) as i64
            }
        })
        .collect();
    let cols = VocabShard::balanced_range(VOCAB, NODES, rank).unwrap();
    let shard = VocabShard::balanced(rank, NODES, VOCAB).unwrap();
    let cut = |data: &[f32], rows: usize| {
        let v: Vec<f32> = (0..rows)
            .flat_map(|r| data[r * VOCAB + cols.start..r * VOCAB + cols.end].to_vec())
            .collect();
        TensorData::new(v, [rows, cols.len()])
    };
    let y = Tensor::<1, Int>::from_data(TensorData::new(targets.clone(), [ROWS]), &device);
    let mut checked = 0;

    for (divergence, smoothing) in [
        (Divergence::ForwardKl, 0.0),
        (Divergence::ReverseKl, 0.1),
        (Divergence::Jsd { beta: 0.5 }, 0.0),
        (Divergence::Tvd, 0.1),
    ] {
        let loss = DistillLossConfig::new()
            .with_temperature(1.5)
            .with_alpha(0.6)
            .with_divergence(divergence)
            .with_label_smoothing(smoothing)
            .with_ignore_index(Some(-100))
            .init();
        let s = Tensor::<2>::from_data(cut(&student, ROWS), &device).require_grad();
        let value = loss.forward_vocab_parallel(
            s.clone(),
            Tensor::from_data(cut(&teacher, ROWS), &device),
            y.clone(),
            &shard,
            &exchange,
        );
        let grad = s.grad(&value.backward()).unwrap();

        let full = Tensor::<2>::from_data(TensorData::new(student.clone(), [ROWS, VOCAB]), &device)
            .require_grad();
        let want = loss.forward(
            full.clone(),
            Tensor::from_data(TensorData::new(teacher.clone(), [ROWS, VOCAB]), &device),
            y.clone(),
        );
        let want_grad = full
            .grad(&want.backward())
            .unwrap()
            .slice([0..ROWS, cols.clone()]);
        let (got, want) = (value.into_scalar::<f32>(), want.into_scalar::<f32>());
        println!("node {rank}, {divergence:?}: loss {got} (unsharded {want}), columns {cols:?}");
        assert!(
            (got - want).abs() <= 2e-6 * want.abs(),
            "node {rank}, {divergence:?}: {got} vs {want}"
        );
        grad.into_data().assert_approx_eq::<f32>(
            &want_grad.into_data(),
            burn::tensor::Tolerance::rel_abs(1e-4, 1e-7),
        );
        checked += 1;
    }

    // The trained fused-linear form: the 20 kept rows in chunks of 8, 8 and 4 (three
    // exchanges of statistics, three of row sums for JSD), then the hidden-state gradient's.
    let (hs, ht) = (6, 9);
    let (h_s, h_t) = (logits(ROWS * hs, 0.3), logits(ROWS * ht, 0.4));
    let (w_s, w_t) = (logits(hs * VOCAB, 0.5), logits(ht * VOCAB, 0.6));
    let scaled = |v: Vec<f32>, by: f32| v.into_iter().map(|x| x * by).collect::<Vec<_>>();
    let head = |w: &[f32], h: usize, cols: std::ops::Range<usize>| {
        let v: Vec<f32> = (0..h)
            .flat_map(|r| w[r * VOCAB + cols.start..r * VOCAB + cols.end].to_vec())
            .collect();
        let width = cols.len();
        Linear {
            weight: Param::from_tensor(Tensor::from_data(TensorData::new(v, [h, width]), &device)),
            bias: None,
        }
    };
    let (w_s, w_t) = (scaled(w_s, 0.1), scaled(w_t, 0.1));
    let loss = DistillLossConfig::new()
        .with_temperature(1.5)
        .with_alpha(0.6)
        .with_divergence(Divergence::Jsd { beta: 0.5 })
        .with_ignore_index(Some(-100))
        .with_linear_chunk_rows(Some(8))
        .init();
    let hidden = |v: &[f32], h: usize| {
        Tensor::<2>::from_data(TensorData::new(v.to_vec(), [ROWS, h]), &device)
    };
    let x = hidden(&h_s, hs).require_grad();
    let (student_head, teacher_head) = (head(&w_s, hs, cols.clone()), head(&w_t, ht, cols.clone()));
    let value = loss.forward_linear_vocab_parallel(
        x.clone(),
        &student_head,
        hidden(&h_t, ht),
        &teacher_head,
        y.clone(),
        &shard,
        &exchange,
    );
    let grads = value.backward();
    let (gx, gw) = (
        x.grad(&grads).unwrap(),
        student_head.weight.val().grad(&grads).unwrap(),
    );
    let x_full = hidden(&h_s, hs).require_grad();
    let (full_s, full_t) = (head(&w_s, hs, 0..VOCAB), head(&w_t, ht, 0..VOCAB));
    let want = loss.forward_linear(x_full.clone(), &full_s, hidden(&h_t, ht), &full_t, y);
    let want_grads = want.backward();
    let want_w = full_s
        .weight
        .val()
        .grad(&want_grads)
        .unwrap()
        .slice([0..hs, cols.clone()]);
    let (got, want) = (value.into_scalar::<f32>(), want.into_scalar::<f32>());
    println!("node {rank}, fused-linear JSD: loss {got} (unsharded {want})");
    assert!(
        (got - want).abs() <= 2e-5 * want.abs(),
        "node {rank}, fused-linear: {got} vs {want}"
    );
    let tolerance = burn::tensor::Tolerance::rel_abs(1e-4, 1e-6);
    gx.into_data()
        .assert_approx_eq::<f32>(&x_full.grad(&want_grads).unwrap().into_data(), tolerance);
    gw.into_data()
        .assert_approx_eq::<f32>(&want_w.into_data(), tolerance);
    checked += 1;

    std::fs::write(marker, format!("{checked} losses checked")).expect("the marker file");
}
