"""PyTorch baselines for the benchmark table, on a CUDA GPU: the same loss as
benches/workload.rs (Hinton's full loss, T = 4, alpha = 0.9, forward KL, mean) on the same
shapes, forward and forward+backward, median of CUDA-event timings.

Variants: eager PyTorch (log_softmax + kl_div + cross_entropy, what most training scripts
write), torch.compile of the same function, and Liger-Kernel's Triton losses
(LigerKLDIVLoss on log-probs + LigerCrossEntropyLoss) where liger_kernel is importable.

    python3 scripts/torch_baseline.py --shapes 512x32000,2048x32768,4096x50257 --reps 20

With --linear, the fused-linear comparison of issue 10 instead: the student's and teacher's LM
heads and the loss (generalized JSD, beta = 0.5, T = 1, hard and soft weights 0.5, one token
in ten ignored) from hidden states, forward + backward of the student (hidden states and head
weight), in bf16 at BT = 8192, H_s = 2048, H_t = 4096, V = 128256: PyTorch eager on
materialised logits, and Liger-Kernel's chunked LigerFusedLinearJSDLoss where importable.
The Rust side: examples/bench_linear.rs --backend cuda --dtype bf16 --jsd (same shapes).

    python3 scripts/torch_baseline.py --linear 8192x2048x4096x128256 --reps 10
"""

import argparse
import math
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


BETA = 0.5


def linear_eager(hs, ws, ht, wt, y):
    """The materialised path: [N, V] logits of both heads (weights [V, H], torch's layout),
    generalized JSD at T = 1 in f32 (M = beta P + (1 - beta) Q) and cross-entropy, 0.5 each,
    means over the rows not ignored."""
    zs, zt = (hs @ ws.t()).float(), (ht @ wt.t()).float()
    keep = y != -100
    log_q, log_p = F.log_softmax(zs, dim=-1), F.log_softmax(zt, dim=-1)
    log_m = torch.logaddexp(log_p + math.log(BETA), log_q + math.log(1 - BETA))
    jsd = BETA * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - BETA) * (
        log_q.exp() * (log_q - log_m)
    ).sum(-1)
    soft = jsd[keep].mean()
    hard = F.cross_entropy(zs, y, ignore_index=-100)
    return 0.5 * soft + 0.5 * hard


def liger_linear():
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss = LigerFusedLinearJSDLoss(
        weight_hard_loss=0.5, weight_soft_loss=0.5, beta=BETA, temperature=1.0
    )
    return lambda hs, ws, ht, wt, y: loss(hs, ws, ht, wt, y)


def linear_main(spec, reps):
    n, h_s, h_t, v = map(int, spec.split("x"))
    variants = [("torch eager, materialised logits", linear_eager)]
    try:
        variants.append(("Liger-Kernel LigerFusedLinearJSDLoss (chunked)", liger_linear()))
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"(Liger-Kernel not available: {e})")
    g = torch.Generator(device="cuda").manual_seed(7)
    dt = torch.bfloat16

    def rand(*shape, scale=1.0):
        return (torch.rand(*shape, device="cuda", generator=g) * 2 - 1).mul_(scale).to(dt)

    hs, ht = rand(n, h_s), rand(n, h_t)
    ws, wt = rand(v, h_s, scale=h_s ** -0.5), rand(v, h_t, scale=h_t ** -0.5)
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[9::10] = -100
    print(f"### PyTorch {torch.__version__} on {torch.cuda.get_device_name()}: fused-linear, "
          f"bf16, N = {n}, H_s = {h_s}, H_t = {h_t}, V = {v}\n")
    print("| variant | fwd+bwd | peak extra memory | loss |")
    print("|---|---:|---:|---:|")
    for name, f in variants:
        def both():
            hg = hs.detach().requires_grad_(True)
            wg = ws.detach().requires_grad_(True)
            out = f(hg, wg, ht, wt, y)
            out.backward()
            return out

        value = both().item()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = time_ms(both, reps)
        peak = torch.cuda.max_memory_allocated() - base
        print(f"| {name} | {t:.1f} ms | {peak / 1e9:.2f} GB | {value:.5f} |", flush=True)


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
    ap.add_argument("--linear", metavar="NxH_SxH_TxV", help="the fused-linear comparison instead")
    args = ap.parse_args()
    if args.linear:
        linear_main(args.linear, args.reps)
        return
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
