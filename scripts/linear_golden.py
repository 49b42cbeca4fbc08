"""Golden values for the fused-linear losses and logit soft-capping, in float64 PyTorch.

Writes tests/golden/linear.json. Run from the project root:

    python -m venv .venv && .venv/bin/pip install torch
    .venv/bin/python scripts/linear_golden.py            # check + write
    .venv/bin/python scripts/linear_golden.py --check    # check only, write nothing

Each case is a student and a teacher LM head (`hidden @ W + b`, burn's `Linear` layout: W is
[H, V]), the logits optionally soft-capped (`c * tanh(z / c)`, Gemma 2's
final_logit_softcapping), brought to one vocabulary (truncated, or padded with -inf), and the
distillation loss of burn-distill's spec (tests/golden/README.md) on them, written with
torch.nn.functional (log_softmax, kl_div, cross_entropy with label_smoothing and
ignore_index). Gradients of the student's hidden states, weight and bias come from autograd,
with an upstream gradient of 0.5 (the loss enters the objective as 0.5 * loss.sum()).
Inputs are rounded to float32 so that f32 tests read exactly the numbers used here.
"""

import argparse
import json
import math
import pathlib

import torch
import torch.nn.functional as F

torch.set_default_dtype(torch.float64)
IGNORE = -100
UPSTREAM = 0.5
ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "golden" / "linear.json"


def f32(x):
    return x.float().double()


def kl(logp, logq):
    """KL(p || q) per row, 0 log 0 = 0, columns where both are -inf ignored."""
    return F.kl_div(logq, logp, reduction="none", log_target=True).nan_to_num(0.0).sum(-1)


def divergence(cfg, logp, logq):
    name = cfg["divergence"]
    if name == "forward_kl":
        return kl(logp, logq)
    if name == "reverse_kl":
        return kl(logq, logp)
    if name == "jsd":
        b = cfg["beta"]
        logm = torch.logaddexp(logp + math.log(b), logq + math.log(1 - b))
        return b * kl(logp, logm) + (1 - b) * kl(logq, logm)
    if name == "tvd":
        return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)
    raise ValueError(name)


def softcap(z, cap):
    return z if cap is None else cap * torch.tanh(z / cap)


def align(zs, zt, policy):
    vs, vt = zs.shape[-1], zt.shape[-1]
    if vs == vt:
        return zs, zt
    if policy == "truncate":
        v = min(vs, vt)
        return zs[:, :v], zt[:, :v]
    assert policy == "pad_neg_inf"
    v = max(vs, vt)
    pad = lambda z: torch.cat([z, torch.full((z.shape[0], v - z.shape[1]), -math.inf)], 1)
    return (pad(zs) if vs < v else zs), (pad(zt) if vt < v else zt)


def loss_of_logits(cfg, zs, zt, y):
    """burn-distill's loss on [N, V] logits (rows = tokens)."""
    zs, zt = align(softcap(zs, cfg["softcap"]), softcap(zt, cfg["softcap"]), cfg["vocab_mismatch"])
    T, alpha = cfg["temperature"], cfg["alpha"]
    soft = divergence(cfg, F.log_softmax(zt / T, -1), F.log_softmax(zs / T, -1)) * T * T
    if y is None:
        rows, kept = soft, zs.shape[0]
    else:
        keep = y != IGNORE
        hard = F.cross_entropy(
            zs, y, reduction="none", ignore_index=IGNORE, label_smoothing=cfg["label_smoothing"]
        )
        rows = torch.where(keep, alpha * soft + (1 - alpha) * hard, torch.zeros_like(soft))
        kept = int(keep.sum())
    if cfg["reduction"] == "sum":
        return rows.sum().reshape(1)
    if cfg["reduction"] == "mean":
        return (rows.sum() / max(kept, 1)).reshape(1)
    assert cfg["reduction"] == "per_row"
    return rows


def make_case(name, seed, n, hs, ht, vs, vt, cfg, bias=True, labels=True, ignored=(), scale=1.5):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: f32(torch.randn(*s, generator=g))
    h_s, h_t = f32(scale * rnd(n, hs)), f32(scale * rnd(n, ht))
    w_s, w_t = f32(rnd(hs, vs) / math.sqrt(hs) * 3), f32(rnd(ht, vt) / math.sqrt(ht) * 3)
    b_s = f32(0.5 * rnd(vs)) if bias else None
    b_t = f32(0.5 * rnd(vt)) if bias else None
    classes = min(vs, vt) if cfg["vocab_mismatch"] == "truncate" else max(vs, vt)
    y = torch.randint(0, classes, (n,), generator=g) if labels else None
    for i in ignored:
        y[i] = IGNORE
    h_s.requires_grad_(True)
    w_s.requires_grad_(True)
    if b_s is not None:
        b_s.requires_grad_(True)
    zs = h_s @ w_s + (b_s if b_s is not None else 0.0)
    zt = h_t @ w_t + (b_t if b_t is not None else 0.0)
    loss = loss_of_logits(cfg, zs, zt, y)
    (UPSTREAM * loss.sum()).backward()
    if cfg["softcap"] is not None:
        # The cap bites: some logits are past c / 2, where tanh bends.
        assert (zs.detach().abs() > cfg["softcap"] / 2).any(), name
    flat = lambda t: None if t is None else [float(x) for x in t.detach().reshape(-1)]
    return {
        "name": name,
        "config": cfg,
        "dims": {"n": n, "hs": hs, "ht": ht, "vs": vs, "vt": vt},
        "student_hidden": flat(h_s),
        "student_weight": flat(w_s),
        "student_bias": flat(b_s),
        "teacher_hidden": flat(h_t),
        "teacher_weight": flat(w_t),
        "teacher_bias": flat(b_t),
        "targets": None if y is None else [int(v) for v in y],
        "upstream": UPSTREAM,
        "expected": {
            "loss": flat(loss),
            "grad_hidden": flat(h_s.grad),
            "grad_weight": flat(w_s.grad),
            "grad_bias": flat(None if b_s is None else b_s.grad),
        },
    }


def config(divergence="forward_kl", beta=None, temperature=1.0, alpha=0.5, label_smoothing=0.0,
           reduction="mean", softcap=None, vocab_mismatch="error"):
    return {
        "temperature": temperature,
        "alpha": alpha,
        "divergence": divergence,
        "beta": beta,
        "lambda": None,
        "scale_by_t2": True,
        "ignore_index": IGNORE,
        "label_smoothing": label_smoothing,
        "reduction": reduction,
        "softcap": softcap,
        "vocab_mismatch": vocab_mismatch,
    }


def cases():
    return [
        make_case("forward_kl_t2_mean", 1, 7, 5, 8, 13, 13, config(temperature=2.0, alpha=0.7),
                  ignored=(2,)),
        make_case("jsd_softcap_sum", 2, 6, 4, 6, 11, 11,
                  config("jsd", beta=0.5, softcap=2.0, reduction="sum", label_smoothing=0.1)),
        make_case("reverse_kl_softcap_per_row_no_bias", 3, 5, 6, 4, 9, 9,
                  config("reverse_kl", temperature=1.5, softcap=1.5, reduction="per_row"),
                  bias=False, ignored=(0, 3)),
        make_case("soft_only_tvd_softcap", 4, 4, 3, 5, 10, 10,
                  config("tvd", softcap=3.0, temperature=2.0), labels=False),
        make_case("truncate_wider_teacher_softcap", 5, 6, 4, 7, 9, 12,
                  config(softcap=2.5, vocab_mismatch="truncate", temperature=2.0)),
        make_case("pad_neg_inf_narrower_teacher_softcap", 6, 6, 4, 7, 12, 9,
                  config(softcap=2.5, vocab_mismatch="pad_neg_inf", alpha=0.4)),
    ]


def check(cs):
    # Cross-checks of the spec: with no cap and no labels forward KL is kl_div('batchmean').
    c = cs[0]
    d = c["dims"]
    zs = torch.tensor(c["student_hidden"]).reshape(d["n"], d["hs"]) @ torch.tensor(
        c["student_weight"]).reshape(d["hs"], d["vs"]) + torch.tensor(c["student_bias"])
    zt = torch.tensor(c["teacher_hidden"]).reshape(d["n"], d["ht"]) @ torch.tensor(
        c["teacher_weight"]).reshape(d["ht"], d["vt"]) + torch.tensor(c["teacher_bias"])
    cfg = dict(c["config"], alpha=1.0, temperature=1.0)
    ours = loss_of_logits(cfg, zs, zt, None)
    ref = F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1), reduction="batchmean",
                   log_target=True)
    assert abs(float(ours) - float(ref)) < 1e-12, (ours, ref)
    # A cap far above the logits changes nothing (to the precision of tanh's series).
    far = loss_of_logits(dict(cfg, softcap=1e6), zs, zt, None)
    assert abs(float(far) - float(ours)) < 1e-9, (far, ours)
    for c in cs:
        for k, v in c["expected"].items():
            assert v is None or all(math.isfinite(x) for x in v), (c["name"], k)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    cs = cases()
    check(cs)
    if args.check:
        old = json.loads(OUT.read_text())
        assert old["cases"] == json.loads(json.dumps(cs)), "tests/golden/linear.json is stale"
        print(f"{OUT.relative_to(ROOT)}: {len(cs)} cases, up to date")
        return
    OUT.write_text(json.dumps({"format": 1, "upstream": UPSTREAM, "cases": cs}, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}: {len(cs)} cases")


if __name__ == "__main__":
    main()
