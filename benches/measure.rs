//! A counting allocator and a timer shared by the benchmark examples: median time of `reps`
//! runs and the peak heap growth over them (memory beyond what existed before, CPU backends);
//! and the device of a `--backend NAME` option.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Counts live heap bytes and their peak, to report memory beyond the inputs (CPU backends).
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        let live = LIVE.fetch_add(new_size, Ordering::Relaxed) + new_size;
        PEAK.fetch_max(live, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Median time of `reps` runs (after one warm-up) and the peak heap growth over them.
pub fn measure(reps: usize, mut f: impl FnMut()) -> (Duration, usize) {
    f();
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let mut times: Vec<Duration> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    times.sort();
    (times[reps / 2], PEAK.load(Ordering::Relaxed) - base)
}

/// The device of `--backend NAME` (`flex`, or `wgpu`, `vulkan`, `cuda` where the build enables
/// them), without autodiff, with its title and whether it is the CPU.
pub fn backend_device(name: &str) -> (burn::tensor::Device, &'static str, bool) {
    use burn::tensor::Device;
    match name {
        "flex" => (Device::flex(), "Flex (CPU)", true),
        #[cfg(feature = "wgpu")]
        "wgpu" => (Device::wgpu(Default::default()), "wgpu", false),
        #[cfg(feature = "vulkan")]
        "vulkan" => (Device::vulkan(Default::default()), "Vulkan (wgpu)", false),
        #[cfg(feature = "cuda")]
        "cuda" => (Device::cuda(0), "CUDA", false),
        other => panic!(
            "backend {other} is not enabled (flex, or build with --features wgpu/vulkan/cuda)"
        ),
    }
}
