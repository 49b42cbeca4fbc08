#!/usr/bin/env bash
# The 0.2 benchmarks on an NVIDIA GPU through wgpu's Vulkan device (`Device::vulkan`): CubeCL's
# kernels as SPIR-V, no LLVM (burn 0.22's CUDA backend downloads LLVM 23.1 at build time, which
# machines without network access cannot do). Needs the NVIDIA driver's Vulkan ICD
# (`vulkaninfo` lists the GPU). One run, bounded by a timeout; the tables go to stdout and to
# docs/bench/vulkan-<date>.md.
#
#   bash docs/bench/run_vulkan.sh            # from the repository root (build here or on the GPU machine)
#   TIMEOUT=500 REPS=10 bash docs/bench/run_vulkan.sh
#
# Shapes: the bars' [2048, 32768] and an LLM-sized [8192, 128256] batch (f32 logits: 4.2 GB
# each, within one device buffer on a datacenter GPU; wgpu's 256 MiB limit applies to
# software drivers only).
set -euo pipefail
cd "$(dirname "$0")/../.."
TIMEOUT="${TIMEOUT:-540}"
REPS="${REPS:-5}"
BIN=target/release/examples/bench_bars
if [ ! -x "$BIN" ] || [ -n "${REBUILD:-}" ]; then
  cargo build --release --features vulkan,fusion --example bench_bars
fi
out="docs/bench/vulkan-$(date +%Y%m%d).md"
{
  echo "# bench_bars on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo 'a GPU') through Vulkan"
  echo
  timeout "$TIMEOUT" "$BIN" --device vulkan --reps "$REPS" --skip-reference
  echo
  timeout "$TIMEOUT" "$BIN" --device vulkan --reps "$REPS" --skip-reference \
    --n 8192 --v 128256 --hs 2048 --ht 4096 || echo "(the LLM-sized run did not finish in ${TIMEOUT} s)"
} | tee "$out"
