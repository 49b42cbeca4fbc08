//! The exchange of per-row statistics between the peers: the [`RowExchange`] trait a user
//! implements over their collective, and [`LocalExchange`], peers that are threads of one
//! process.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use burn::tensor::{Tensor, TensorData};

use crate::DistillError;

/// The one collective operation the vocabulary-parallel loss needs: an element-wise sum over
/// the peers of a `[L]` float tensor (an all-reduce with `Sum`).
///
/// Every peer calls [`RowExchange::sum`] the same number of times, in the same order, with
/// the same length `L`; each call returns, on every peer, the element-wise sum of the peers'
/// tensors, on the caller's device and in the dtype of its input. The loss calls it one to
/// three times per call (see [`VocabShard::exchanged_floats`](crate::VocabShard::exchanged_floats)),
/// always with tensors without autodiff. For the loss to be equal on every peer bit for bit,
/// every peer must receive the same sum (an all-reduce does; so does [`LocalExchange`], which
/// adds in rank order).
///
/// Implement it over your collective: [`LocalExchange`] for threads of one process; burn's
/// `burn::tensor::distributed::all_reduce` on CUDA (burn 0.22) or `Tensor::all_reduce` (burn
/// 0.23, every backend); NCCL, MPI or a socket of your own (see `docs/guide/multi-device.md`).
///
/// ```
/// use burn::tensor::{Device, Tensor};
/// use burn_distill::{DistillError, RowExchange};
///
/// /// A single peer: the sum over one peer is its own tensor.
/// struct Alone;
///
/// impl RowExchange for Alone {
///     fn sum(&self, values: Tensor<1>) -> Result<Tensor<1>, DistillError> {
///         Ok(values)
///     }
/// }
///
/// let device = Device::flex();
/// let sum = Alone.sum(Tensor::from_floats([1.0, 2.0], &device)).unwrap();
/// assert_eq!(sum.try_into_vec_as::<f32>().unwrap(), [1.0, 2.0]);
/// ```
pub trait RowExchange: Send + Sync {
    /// The element-wise sum over every peer of `values` (`[L]`, the same `L` on every peer).
    ///
    /// # Errors
    /// When the collective fails: [`DistillError::Collective`] with `operation` naming what
    /// failed and `message` the collective's error (the loss adds its own step to
    /// `operation`). Every peer should fail alike where it can: a peer that fails alone
    /// leaves the others waiting in their next call, as with any collective.
    fn sum(&self, values: Tensor<1>) -> Result<Tensor<1>, DistillError>;
}

/// Sums `tensor` across the peers, flat (the trait takes `[L]` tensors), naming the loss's
/// `step` in the error.
pub(super) fn sum_across<const D: usize>(
    exchange: &dyn RowExchange,
    tensor: Tensor<D>,
    step: &str,
) -> Result<Tensor<D>, DistillError> {
    let shape = tensor.shape();
    let flat = tensor.reshape([shape.num_elements()]);
    let sum = exchange.sum(flat).map_err(|e| match e {
        DistillError::Collective { operation, message } => DistillError::Collective {
            operation: if operation.is_empty() {
                step.to_string()
            } else {
                format!("{step} ({operation})")
            },
            message,
        },
        other => other,
    })?;
    if sum.dims() != [shape.num_elements()] {
        return Err(DistillError::Collective {
            operation: step.to_string(),
            message: format!(
                "the exchange returned shape {:?} for [{}] values",
                sum.dims(),
                shape.num_elements()
            ),
        });
    }
    Ok(sum.reshape(shape))
}

/// Peers that are threads of one process: [`LocalExchange::group`] gives one handle per peer,
/// each moved to its thread. A call to [`RowExchange::sum`] waits until every peer of the
/// group has made its call of the same round, then returns on every peer the sum of the
/// peers' values, added on the host in f64 in rank order (the same bits on every peer,
/// whatever order the threads arrive in), in the input's dtype and on its device.
///
/// Reusable for any number of calls. If a handle is dropped (its thread returned or
/// panicked) while the others still exchange, their pending and later calls fail with
/// [`DistillError::Collective`] instead of waiting forever; peers that pass different
/// lengths all fail alike.
///
/// ```
/// use burn::tensor::{Device, Tensor};
/// use burn_distill::{LocalExchange, RowExchange};
///
/// let peers = LocalExchange::group(3);
/// let threads: Vec<_> = peers
///     .into_iter()
///     .map(|peer| {
///         std::thread::spawn(move || {
///             let device = Device::flex();
///             let rank = peer.rank() as f32;
///             let sum = peer.sum(Tensor::from_floats([1.0, rank], &device)).unwrap();
///             sum.try_into_vec_as::<f32>().unwrap()
///         })
///     })
///     .collect();
/// for thread in threads {
///     // 1 + 1 + 1 and 0 + 1 + 2 on every peer.
///     assert_eq!(thread.join().unwrap(), [3.0, 3.0]);
/// }
/// ```
#[derive(Debug)]
pub struct LocalExchange {
    rank: usize,
    group: Arc<Group>,
}

#[derive(Debug)]
struct Group {
    peers: usize,
    state: Mutex<Round>,
    done: Condvar,
}

/// The round in progress and the result of the last one.
#[derive(Debug)]
struct Round {
    /// The values each peer brought to this round (by rank).
    slots: Vec<Option<Vec<f64>>>,
    arrived: usize,
    /// Rounds completed so far.
    completed: u64,
    /// The last completed round's sum (or why it failed); it stays until every peer has read
    /// it, since the next round cannot complete without each of them.
    result: Arc<Result<Vec<f64>, String>>,
    /// The rank of a handle that was dropped, if any.
    left: Option<usize>,
}

impl LocalExchange {
    /// One handle per peer of a new group of `peers` threads, in rank order (`0..peers`).
    pub fn group(peers: usize) -> Vec<LocalExchange> {
        let group = Arc::new(Group {
            peers,
            state: Mutex::new(Round {
                slots: vec![None; peers],
                arrived: 0,
                completed: 0,
                result: Arc::new(Ok(Vec::new())),
                left: None,
            }),
            done: Condvar::new(),
        });
        (0..peers)
            .map(|rank| LocalExchange {
                rank,
                group: group.clone(),
            })
            .collect()
    }

    /// This handle's rank, in `0..peers`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of peers of the group.
    pub fn peers(&self) -> usize {
        self.group.peers
    }

    fn lock(&self) -> MutexGuard<'_, Round> {
        // A peer that panicked while holding the lock left the state consistent (it only
        // panics outside it): go on.
        self.group
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// This peer's part of one round: the sum of every peer's `values`, or why there is none.
    fn exchange(&self, values: Vec<f64>) -> Result<Vec<f64>, String> {
        let group = &self.group;
        let mut round = self.lock();
        if let Some(left) = round.left {
            return Err(left_message(left));
        }
        round.slots[self.rank] = Some(values);
        round.arrived += 1;
        let ticket = round.completed;
        if round.arrived == group.peers {
            let slots: Vec<Vec<f64>> = round.slots.iter_mut().filter_map(Option::take).collect();
            round.result = Arc::new(add_in_rank_order(&slots));
            round.arrived = 0;
            round.completed += 1;
            group.done.notify_all();
        } else {
            while round.completed == ticket {
                if let Some(left) = round.left {
                    return Err(left_message(left));
                }
                round = group
                    .done
                    .wait(round)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
        }
        round.result.as_ref().clone()
    }
}

fn left_message(rank: usize) -> String {
    format!("peer {rank} of the local group left (its handle was dropped) before this exchange")
}

/// The element-wise sum of every peer's values, rank 0 first; an error naming the lengths if
/// they differ.
fn add_in_rank_order(slots: &[Vec<f64>]) -> Result<Vec<f64>, String> {
    let len = slots.first().map_or(0, Vec::len);
    if slots.iter().any(|s| s.len() != len) {
        let lengths: Vec<usize> = slots.iter().map(Vec::len).collect();
        return Err(format!(
            "the peers passed different lengths (by rank: {lengths:?}); every peer must \
             exchange the same rows in the same order"
        ));
    }
    let mut sum = vec![0.0; len];
    for slot in slots {
        for (s, v) in sum.iter_mut().zip(slot) {
            *s += v;
        }
    }
    Ok(sum)
}

impl Drop for LocalExchange {
    fn drop(&mut self) {
        let mut round = self.lock();
        round.left.get_or_insert(self.rank);
        self.group.done.notify_all();
    }
}

impl RowExchange for LocalExchange {
    fn sum(&self, values: Tensor<1>) -> Result<Tensor<1>, DistillError> {
        let failed = |message: String| DistillError::Collective {
            operation: "LocalExchange::sum".into(),
            message,
        };
        let (device, dtype, len) = (values.device(), values.dtype(), values.dims()[0]);
        let host = values
            .try_into_vec_as::<f64>()
            .map_err(|e| failed(format!("reading the values to the host: {e:?}")))?;
        let sum = self.exchange(host).map_err(failed)?;
        debug_assert_eq!(sum.len(), len);
        Ok(Tensor::from_data(
            TensorData::new(sum, [len]),
            (&device, dtype),
        ))
    }
}
