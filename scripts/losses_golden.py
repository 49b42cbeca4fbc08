"""Recompute and verify tests/golden/losses.json (the dense distillation-loss golden values).

The file came without its generator; this script recomputes every case's expected loss and
student gradient from the stored inputs and config, in float64 with PyTorch autograd,
following the specification in tests/golden/README.md, and compares with the stored values.
Run from the project root:

    python -m venv .venv && .venv/bin/pip install torch
    .venv/bin/python scripts/losses_golden.py            # verify (default): writes nothing
    .venv/bin/python scripts/losses_golden.py --write    # rewrite "expected" in place

The maths is written out row by row, independently of the crate's tensor formulation:
padding columns (student and teacher both -inf) are dropped from a row before anything else,
so they contribute nothing and get an exact zero gradient. Each case is also cross-checked,
where one applies, against torch.nn.functional.kl_div / cross_entropy on the whole batch.
"""

import argparse
import json
import math
import pathlib

import torch
import torch.nn.functional as F

torch.set_default_dtype(torch.float64)
ROOT = pathlib.Path(__file__).resolve().parent.parent
PATH = ROOT / "tests" / "golden" / "losses.json"
REL_TOL = 1e-9


def num(x):
    if isinstance(x, str):
        return {"-inf": -math.inf, "inf": math.inf, "nan": math.nan}[x]
    return float(x)


def enc(x):
    if math.isinf(x):
        return "-inf" if x < 0 else "inf"
    return x


def kl(w_log, v_log):
    """KL(w || v) = sum w (log w - log v), with 0 * log(0/x) = 0."""
    w = w_log.exp()
    keep = w > 0
    return (w[keep] * (w_log[keep] - v_log[keep])).sum()


def divergence(cfg, logp, logq):
    name = cfg["divergence"]
    p, q = logp.exp(), logq.exp()
    if name == "forward_kl":
        return kl(logp, logq)
    if name == "reverse_kl":
        return kl(logq, logp)
    if name == "jsd":
        beta = cfg["beta"]
        logm = torch.log(beta * p + (1 - beta) * q)
        return beta * kl(logp, logm) + (1 - beta) * kl(logq, logm)
    if name == "skew_kl":
        lam = cfg["lambda"]
        return kl(logp, torch.log(lam * p + (1 - lam) * q))
    if name == "skew_reverse_kl":
        lam = cfg["lambda"]
        return kl(logq, torch.log((1 - lam) * p + lam * q))
    if name == "tvd":
        return 0.5 * (p - q).abs().sum()
    raise ValueError(name)


def rows(cfg, student, teacher, targets):
    """Per-row values [N] (0 for ignored rows) and the count of rows not ignored."""
    N, V = student.shape
    T, alpha, eps = cfg["temperature"], cfg["alpha"], cfg["label_smoothing"]
    ignore = cfg.get("ignore_index")
    out, kept = [], 0
    for i in range(N):
        if targets is not None and ignore is not None and targets[i] == ignore:
            out.append((student[i] * 0.0).sum())
            continue
        kept += 1
        cols = ~(torch.isneginf(student[i]) & torch.isneginf(teacher[i]))  # drop vocabulary padding
        zs, zt = student[i][cols], teacher[i][cols]
        logq = F.log_softmax(zs / T, dim=-1)
        logp = F.log_softmax(zt / T, dim=-1)
        soft = divergence(cfg, logp, logq) * (T * T if cfg["scale_by_t2"] else 1.0)
        if targets is None:
            out.append(soft)
            continue
        logq1 = F.log_softmax(zs, dim=-1)
        y = int(cols[: targets[i]].sum())  # target index among the kept columns
        assert cols[targets[i]], "target on a padding column"
        hard = -logq1[y]
        if eps > 0:
            # PyTorch: -(1-e) log q[y] - e * mean over the (whole) vocabulary of log q
            assert bool(cols.all()), "label smoothing with padding columns is not specified"
            hard = -(1 - eps) * logq1[y] - eps * logq1.mean()
        out.append(alpha * soft + (1 - alpha) * hard)
    return torch.stack(out), kept


def loss_of(cfg, student, teacher, targets):
    r, kept = rows(cfg, student, teacher, targets)
    red = cfg["reduction"]
    if red == "none":
        return r
    if red == "sum":
        return r.sum()
    if red == "mean":
        return r.sum() / kept if kept > 0 else r.sum() * 0.0
    raise ValueError(red)


def torch_reference(cfg, student, teacher, targets):
    """Whole-batch reference with torch.nn.functional, for the cases it covers (else None)."""
    if cfg["divergence"] not in ("forward_kl", "reverse_kl") or torch.isinf(student).any():
        return None
    if cfg["reduction"] == "none":
        return None
    T, alpha = cfg["temperature"], cfg["alpha"]
    ignore = cfg.get("ignore_index")
    keep = torch.ones(student.shape[0], dtype=torch.bool)
    if targets is not None and ignore is not None:
        keep = torch.tensor([t != ignore for t in targets])
    if keep.sum() == 0:
        return 0.0
    s, t = student[keep], teacher[keep]
    ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    if cfg["divergence"] == "forward_kl":
        soft = F.kl_div(ls, lt, reduction="sum", log_target=True)
    else:
        soft = F.kl_div(lt, ls, reduction="sum", log_target=True)
    if cfg["scale_by_t2"]:
        soft = soft * T * T
    if targets is None:
        total = soft
    else:
        y = torch.tensor(targets)[keep]
        ce = F.cross_entropy(s, y, reduction="sum", label_smoothing=cfg["label_smoothing"])
        total = alpha * soft + (1 - alpha) * ce
    return float(total / keep.sum() if cfg["reduction"] == "mean" else total)


def recompute(case):
    N, V = case["shape"]
    student = torch.tensor([num(x) for x in case["student"]]).reshape(N, V)
    teacher = torch.tensor([num(x) for x in case["teacher"]]).reshape(N, V)
    targets = case["targets"]
    s = student.clone().requires_grad_(True)
    loss = loss_of(case["config"], s, teacher, targets)
    (g,) = torch.autograd.grad(loss.sum(), s)
    assert torch.isfinite(g).all(), f"{case['name']}: non-finite gradient"
    ref = torch_reference(case["config"], student, teacher, targets)
    if ref is not None:
        assert abs(ref - float(loss.detach().sum())) <= 1e-12 * max(1.0, abs(ref)), (case["name"], ref)
    return loss.detach().reshape(-1).tolist(), g.reshape(-1).tolist(), ref is not None


def diff(new, old):
    """Max abs difference and max relative difference (|a-e| / max(|e|, 1e-300), 0 when equal)."""
    abs_d = rel_d = 0.0
    for a, e in zip(new, old):
        e = num(e)
        if math.isinf(e) or math.isinf(a):
            if a != e:
                return math.inf, math.inf
            continue
        d = abs(a - e)
        abs_d = max(abs_d, d)
        if d > 0:
            rel_d = max(rel_d, d / max(abs(e), 1e-300))
    return abs_d, rel_d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true", help="rewrite the expected values in place")
    ap.add_argument("--file", default=str(PATH))
    args = ap.parse_args()
    path = pathlib.Path(args.file)
    data = json.loads(path.read_text())
    bad, worst = [], (0.0, 0.0, 0.0, 0.0)
    print(f"{'case':<42} {'loss abs':>9} {'loss rel':>9} {'grad abs':>9} {'grad rel':>9} torch-ref")
    for case in data["cases"]:
        loss, grad, refd = recompute(case)
        exp = case["expected"]
        assert len(exp["loss"]) == len(loss) and len(exp["grad_student"]) == len(grad), case["name"]
        la, lr = diff(loss, exp["loss"])
        ga, gr = diff(grad, exp["grad_student"])
        # a gradient entry that is 0 in one and ~1e-17 in the other is a rounding difference:
        # judge the gradient relative to the largest entry of the case
        gscale = max((abs(num(e)) for e in exp["grad_student"]), default=0.0)
        g_ok = ga <= REL_TOL * max(gscale, 1e-300) or ga == 0.0
        l_ok = lr <= REL_TOL or la <= 1e-15
        worst = tuple(max(w, x) for w, x in zip(worst, (la, lr, ga, gr)))
        flag = "" if (l_ok and g_ok) else "  <-- DISAGREES"
        print(f"{case['name']:<42} {la:9.1e} {lr:9.1e} {ga:9.1e} {gr:9.1e} {'yes' if refd else 'no':>9}{flag}")
        if not (l_ok and g_ok):
            bad.append(case["name"])
        if args.write:
            case["expected"] = {"loss": [enc(x) for x in loss], "grad_student": [enc(x) for x in grad]}
    print(f"{len(data['cases'])} cases; max loss abs {worst[0]:.1e} rel {worst[1]:.1e}; "
          f"max grad abs {worst[2]:.1e} rel {worst[3]:.1e} (per entry)")
    if args.write:
        path.write_text(json.dumps(data, separators=(",", ":")) + "\n")
        print(f"rewrote {path}")
    assert not bad, f"cases that disagree beyond {REL_TOL} relative: {bad}"
    print(f"all cases agree to {REL_TOL} relative (gradient relative to each case's largest entry)")


if __name__ == "__main__":
    main()
