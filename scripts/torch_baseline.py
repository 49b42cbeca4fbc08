"""PyTorch baselines for the benchmark table, on a CUDA GPU: the same loss as
benches/workload.rs (Hinton's full loss, T = 4, alpha = 0.9, forward KL, mean) on the same
shapes, forward and forward+backward, median of CUDA-event timings.

Variants: eager PyTorch (log_softmax + kl_div + cross_entropy, what most training scripts
write), torch.compile of the same function, and Liger-Kernel's Triton losses
(LigerKLDIVLoss on log-probs + LigerCrossEntropyLoss) where liger_kernel is importable.

    python3 scripts/torch_baseline.py --shapes 512x32000,2048x32768,4096x50257 --reps 20
"""

import argparse
import statistics

import torch
import torch.nn.functional as F

T, ALPHA = 4.0, 0.9


def eager(s, t, y):
    log_q = F.log_softmax(s / T, dim=-1)
    log_p = F.log_softmax(t / T, dim=-1)
    soft = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * T * T
    return ALPHA * soft + (1 - ALPHA) * F.cross_entropy(s, y)


def liger_loss():
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss

    kl, ce = LigerKLDIVLoss(reduction="batchmean", log_target=True), LigerCrossEntropyLoss()

    def f(s, t, y):
        log_q = F.log_softmax(s / T, dim=-1)
        log_p = F.log_softmax(t / T, dim=-1)
        return ALPHA * kl(log_q, log_p) * T * T + (1 - ALPHA) * ce(s, y)

    return f


def time_ms(fn, reps):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="512x32000,2048x32768,4096x50257")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    variants = [("torch eager", eager)]
    if not args.no_compile:
        variants.append(("torch.compile", torch.compile(eager)))
    try:
        variants.append(("Liger-Kernel KLDiv+CE", liger_loss()))
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"(Liger-Kernel not available: {e})")
    print(f"### PyTorch {torch.__version__} on {torch.cuda.get_device_name()}\n")
    print("| shape | variant | forward | fwd+bwd | peak extra memory |")
    print("|---|---|---:|---:|---:|")
    for shape in args.shapes.split(","):
        n, v = map(int, shape.split("x"))
        g = torch.Generator(device="cuda").manual_seed(7)
        s = torch.randn(n, v, device="cuda", generator=g) * 3
        t = torch.randn(n, v, device="cuda", generator=g) * 3
        y = torch.randint(0, v, (n,), device="cuda", generator=g)
        for name, f in variants:
            def fwd():
                with torch.no_grad():
                    f(s, t, y)

            def both():
                sg = s.detach().requires_grad_(True)
                f(sg, t, y).backward()

            fw = time_ms(fwd, args.reps)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            bw = time_ms(both, args.reps)
            peak = torch.cuda.max_memory_allocated() - base
            inputs = 2 * n * v * 4
            print(f"| {n}×{v} | {name} | {fw:.2f} ms | {bw:.2f} ms | "
                  f"{peak / 1e9:.2f} GB ({peak / inputs:.2f}× inputs) |", flush=True)


if __name__ == "__main__":
    main()
