//! What makes the CPU kernels fast and portable: sums and maxima over independent lanes (so
//! that loops vectorize), the instruction set picked at run time, and zeroed gradient buffers
//! backed by huge pages.

use std::sync::atomic::{AtomicU8, Ordering};

use super::real::Real;

/// Lanes of the accumulator arrays (independent partial sums, so sums vectorize).
const LANES: usize = 16;

/// A zeroed `[N·V]` gradient buffer. It comes from `calloc` (pages untouched), and on Linux it
/// asks for transparent huge pages, so that the first write faults in 2 MiB at a time instead
/// of 4 KiB (a large share of the cost of writing a fresh gradient).
pub fn zeroed_grad<R: Real>(len: usize) -> Vec<R> {
    let buffer = vec![R::ZERO; len];
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = buffer.as_ptr() as usize;
        let end = start + std::mem::size_of_val(buffer.as_slice());
        let aligned = start.next_multiple_of(HUGE);
        if end >= aligned + HUGE {
            // SAFETY: the range lies inside `buffer`'s allocation, which we own; the advice only
            // changes how the kernel backs those pages, never their contents.
            unsafe {
                libc::madvise(
                    aligned as *mut libc::c_void,
                    (end - aligned) / HUGE * HUGE,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
    buffer
}

/// An instruction set the CPU row kernel is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 (F, VL, DQ) with AVX2, FMA and BMI2.
    Avx512,
    /// AVX2 with FMA.
    Avx2,
    /// The target's baseline (SSE2 on x86-64).
    Baseline,
}

impl Isa {
    /// The instruction sets this CPU can run, widest first.
    pub fn available() -> Vec<Isa> {
        let mut isas = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512dq")
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("bmi2")
            {
                isas.push(Isa::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                isas.push(Isa::Avx2);
            }
        }
        isas.push(Isa::Baseline);
        isas
    }
}

/// 0: automatic; otherwise `1 + Isa as u8`.
static FORCED_ISA: AtomicU8 = AtomicU8::new(0);

/// Forces the CPU kernel onto one instruction set (`None`: the widest available, the
/// default). For tests and benchmarks of the dispatch paths; forcing an instruction set the CPU
/// lacks falls back to the widest available one.
pub fn force_isa(isa: Option<Isa>) {
    FORCED_ISA.store(isa.map_or(0, |i| i as u8 + 1), Ordering::Relaxed);
}

pub(super) fn selected_isa() -> Isa {
    let available = Isa::available();
    let forced = match FORCED_ISA.load(Ordering::Relaxed) {
        1 => Some(Isa::Avx512),
        2 => Some(Isa::Avx2),
        3 => Some(Isa::Baseline),
        _ => None,
    };
    forced
        .filter(|i| available.contains(i))
        .unwrap_or(available[0])
}

/// A kernel call compiled once per instruction set: [`on_isa`] calls `run` from a
/// `#[target_feature]` function, into which the `#[inline(always)]` body is inlined.
pub(super) trait IsaKernel {
    /// What the call returns.
    type Out;
    /// The work (to be `#[inline(always)]`, and so compiled for its caller's features).
    fn run(self) -> Self::Out;
}

/// `kernel.run()` compiled for `isa` (one that [`selected_isa`] returned on this CPU).
pub(super) fn on_isa<K: IsaKernel>(isa: Isa, kernel: K) -> K::Out {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `selected_isa` only returns instruction sets whose every enabled feature
        // `Isa::available` detected on this CPU.
        Isa::Avx512 => unsafe { on_avx512(kernel) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { on_avx2(kernel) },
        _ => kernel.run(),
    }
}

/// # Safety
/// The CPU must support every feature enabled here (as [`Isa::available`] checks).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma,bmi2")]
unsafe fn on_avx512<K: IsaKernel>(kernel: K) -> K::Out {
    kernel.run()
}

/// # Safety
/// The CPU must support AVX2 and FMA (as [`Isa::available`] checks).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn on_avx2<K: IsaKernel>(kernel: K) -> K::Out {
    kernel.run()
}

/// `Σ f(x_j)` with `LANES` independent accumulators (so that the sum vectorizes; keep `f`
/// simple).
#[inline(always)]
pub(super) fn lane_sum_map<R: Real>(x: &[R], f: impl Fn(R) -> R) -> R {
    let mut acc = [R::ZERO; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = *a + f(v);
        }
    }
    let tail = chunks.remainder().iter().fold(R::ZERO, |m, &v| m + f(v));
    acc.iter().fold(tail, |m, &v| m + v)
}

/// `Σ x_j` with `LANES` independent accumulators.
#[inline(always)]
pub(super) fn lane_sum<R: Real>(x: &[R]) -> R {
    lane_sum_map(x, |v| v)
}

/// Maximum of a row with `LANES` independent accumulators.
#[inline(always)]
pub(super) fn lane_max<R: Real>(x: &[R]) -> R {
    let mut acc = [R::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = a.max(v);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(R::NEG_INFINITY, |m, &v| m.max(v));
    acc.iter().fold(tail, |m, &v| m.max(v))
}

#[inline(always)]
pub(super) fn select<R: Real>(cond: bool, a: R, b: R) -> R {
    if cond { a } else { b }
}

/// `x^K` by multiplication (`K` a constant, so loops over it vectorize).
#[inline(always)]
pub(super) fn pow_const<R: Real, const K: u32>(x: R) -> R {
    let mut y = x;
    for _ in 1..K {
        y = y * x;
    }
    y
}

/// `Σ f(a_j, b_j, c_j)` with `LANES` independent accumulators (keep `f` simple).
#[inline(always)]
pub(super) fn lane_sum_zip3<R: Real>(a: &[R], b: &[R], c: &[R], f: impl Fn(R, R, R) -> R) -> R {
    let mut acc = [R::ZERO; LANES];
    let (mut ca, mut cb, mut cc) = (
        a.chunks_exact(LANES),
        b.chunks_exact(LANES),
        c.chunks_exact(LANES),
    );
    for ((x, y), z) in (&mut ca).zip(&mut cb).zip(&mut cc) {
        for l in 0..LANES {
            acc[l] = acc[l] + f(x[l], y[l], z[l]);
        }
    }
    let tail = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .zip(cc.remainder())
        .fold(R::ZERO, |m, ((&x, &y), &z)| m + f(x, y, z));
    acc.iter().fold(tail, |m, &v| m + v)
}
