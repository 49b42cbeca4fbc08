"""Golden values for the sparse-teacher (top-k) distillation losses, in float64.

Writes tests/golden/topk.json. Run from the project root:

    python -m venv .venv && .venv/bin/pip install torch
    .venv/bin/python scripts/topk_golden.py

A soft-capped student (`softcap`) is capped `c · tanh(z / c)` before everything else.
The math is written out row by row, independently of the crate's tensor formulation, and
cross-checked against torch.nn.functional.kl_div / cross_entropy where a sparse loss reduces
to a dense one (k = V). Inputs are rounded to float32 so that the crate's f32 tests read
exactly the numbers used here.
"""

import json
import math
import pathlib

import torch
import torch.nn.functional as F

torch.set_default_dtype(torch.float64)
NEG_INF = float("-inf")


def f32(x):
    return x.float().double()


def divergence(name, logp, logq, beta=0.5, lam=0.5):
    p, q = logp.exp(), logq.exp()

    def kl(w, la, lb):  # sum w (la - lb), with 0 * anything = 0
        return torch.where(w > 0, w * (la - lb), torch.zeros_like(w)).sum()

    def log(m):
        return torch.where(m > 0, m, torch.ones_like(m)).log()

    if name == "forward_kl":
        return kl(p, logp, logq)
    if name == "reverse_kl":
        return kl(q, logq, logp)
    if name == "jsd":
        lm = log(beta * p + (1 - beta) * q)
        return beta * kl(p, logp, lm) + (1 - beta) * kl(q, logq, lm)
    if name == "skew_kl":
        return kl(p, logp, log(lam * p + (1 - lam) * q))
    if name == "skew_reverse_kl":
        return kl(q, logq, log((1 - lam) * p + lam * q))
    if name == "tvd":
        return 0.5 * (p - q).abs().sum()
    raise ValueError(name)


def soft_row(z, idx, lp, valid, c):
    """Soft term of one row: z [V] student logits, idx/lp/valid [k] teacher entries."""
    t, r = c["temperature"], c["generation_temperature"] / c["temperature"]
    keep = [j for j in range(len(idx)) if valid[j] and lp[j] != NEG_INF]
    tokens = [int(idx[j]) for j in keep]
    ell = torch.tensor([float(lp[j]) for j in keep])
    s = z / t
    logq_full = torch.log_softmax(s, 0)
    tail = c["tail"]
    if tail == "renormalize_full_vocab":
        logp, logq = torch.log_softmax(r * ell, 0), logq_full[tokens]
    elif tail == "renormalize_top_k":
        logp, logq = torch.log_softmax(r * ell, 0), torch.log_softmax(s[tokens], 0)
    elif tail == "tail_bucket":
        missing = 1.0 - ell.exp().sum()
        logp = torch.log_softmax(torch.cat([r * ell, (r * torch.log(missing)).view(1)]), 0)
        outside = torch.ones(z.shape[0], dtype=torch.bool)
        outside[tokens] = False
        logq = torch.cat([logq_full[tokens], torch.logsumexp(logq_full[outside], 0).view(1)])
    else:
        raise ValueError(tail)
    d = divergence(c["divergence"], logp, logq, c.get("beta", 0.5), c.get("lambda", 0.5))
    return d * t * t if c["scale_by_t2"] else d


def loss_rows(z, idx, lp, valid, targets, c):
    if c.get("softcap") is not None:
        # Gemma 2's final-logit soft-capping of the student, before everything else.
        z = c["softcap"] * torch.tanh(z / c["softcap"])
    rows = []
    for i in range(z.shape[0]):
        if targets is not None and targets[i] == c["ignore_index"]:
            rows.append(z[i].sum() * 0.0)
            continue
        soft = soft_row(z[i], idx[i], lp[i], valid[i], c)
        if targets is None:
            rows.append(soft)
            continue
        hard = F.cross_entropy(
            z[i].view(1, -1), torch.tensor([int(targets[i])]), label_smoothing=c["label_smoothing"]
        )
        rows.append(c["alpha"] * soft + (1 - c["alpha"]) * hard)
    rows = torch.stack(rows)
    kept = sum(1 for i in range(z.shape[0]) if targets is None or targets[i] != c["ignore_index"])
    if c["reduction"] == "mean":
        return (rows.sum() / max(kept, 1)).view(1)
    if c["reduction"] == "sum":
        return rows.sum().view(1)
    return rows


def make_case(name, gen, n, v, k, config, targets=True, drop=0, masked=0, ignore_rows=()):
    c = {
        "temperature": 1.0, "generation_temperature": 1.0, "tail": "tail_bucket",
        "divergence": "forward_kl", "beta": 0.5, "lambda": 0.5, "alpha": 0.5,
        "scale_by_t2": True, "ignore_index": -100, "label_smoothing": 0.0, "reduction": "mean",
        "softcap": None,
    }
    c.update(config)
    z = f32(torch.randn(n, v, generator=gen) * 2.0)
    zt = torch.randn(n, v, generator=gen) * 3.0
    full = torch.log_softmax(zt / c["generation_temperature"], 1)
    lp, idx = full.topk(k, 1)
    lp = f32(lp)
    valid = torch.ones(n, k, dtype=torch.bool)
    # Missing entries: -inf log-probabilities at the end of some rows ("fewer than k") and
    # mask-false entries holding garbage indices that must not be read.
    for i in range(n):
        for j in range(k - drop, k):
            lp[i, j] = NEG_INF
        if masked and i % 2 == 1:
            for j in range(k - drop - masked, k - drop):
                valid[i, j] = False
                idx[i, j] = -1 if j % 2 else v + 7
                lp[i, j] = 5.0  # garbage too: masked entries are never read
    y = None
    if targets:
        y = torch.randint(0, v, (n,), generator=gen)
        for i in ignore_rows:
            y[i] = c["ignore_index"]
    zg = z.clone().requires_grad_(True)
    loss = loss_rows(zg, idx, lp, valid, y, c)
    loss.sum().backward()
    enc = lambda xs: ["-inf" if x == NEG_INF else x for x in xs]
    return {
        "name": name, "shape": [n, v], "k": k,
        "student": z.flatten().tolist(),
        "indices": idx.flatten().tolist(),
        "log_probs": enc(lp.flatten().tolist()),
        "mask": valid.flatten().tolist() if masked else None,
        "targets": y.tolist() if y is not None else None,
        "config": c,
        "expected": {"loss": loss.tolist(), "grad_student": zg.grad.flatten().tolist()},
    }


def self_checks(gen):
    """k = V: every sparse form must reduce to the dense loss computed by torch itself."""
    n, v, t = 3, 7, 2.0
    z, zt = torch.randn(n, v, generator=gen), torch.randn(n, v, generator=gen)
    lp, idx = torch.log_softmax(zt / t, 1).topk(v, 1)
    dense = F.kl_div(torch.log_softmax(z / t, 1), torch.log_softmax(zt / t, 1),
                     log_target=True, reduction="batchmean") * t * t
    for tail in ["renormalize_full_vocab", "renormalize_top_k"]:
        c = {"temperature": t, "generation_temperature": t, "tail": tail,
             "divergence": "forward_kl", "scale_by_t2": True, "reduction": "mean"}
        got = loss_rows(z, idx, lp, torch.ones(n, v, dtype=torch.bool), None, c)
        assert torch.allclose(got, dense.view(1), atol=1e-12), (tail, got, dense)
    # Tail bucket with k = V - 1 equals the dense KL when the last token is the only one
    # outside (the bucket is that token), at T = T_gen.
    lp, idx = torch.log_softmax(zt / t, 1).topk(v - 1, 1)
    c = {"temperature": t, "generation_temperature": t, "tail": "tail_bucket",
         "divergence": "forward_kl", "scale_by_t2": True, "reduction": "mean"}
    got = loss_rows(z, idx, lp, torch.ones(n, v - 1, dtype=torch.bool), None, c)
    assert torch.allclose(got, dense.view(1), atol=1e-12), ("tail_bucket", got, dense)


def main():
    gen = torch.Generator().manual_seed(20261128)
    self_checks(gen)
    cases = []
    divs = [("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}),
            ("skew_kl", {"lambda": 0.2}), ("skew_reverse_kl", {"lambda": 0.25}), ("tvd", {})]
    cases.append(make_case("renorm_full_vocab_fkl_alpha", gen, 4, 11, 4,
                           {"tail": "renormalize_full_vocab", "temperature": 2.0, "alpha": 0.7}))
    cases.append(make_case("renorm_full_vocab_tgen", gen, 3, 13, 5,
                           {"tail": "renormalize_full_vocab", "temperature": 3.0,
                            "generation_temperature": 0.7}, targets=False))
    for d, extra in divs:
        cases.append(make_case(f"renorm_top_k_{d}", gen, 3, 9, 4,
                               {"tail": "renormalize_top_k", "divergence": d,
                                "temperature": 1.5, "reduction": "sum", **extra}, targets=False))
        cases.append(make_case(f"tail_bucket_{d}", gen, 3, 10, 3,
                               {"tail": "tail_bucket", "divergence": d, "temperature": 2.0,
                                "alpha": 0.6, **extra}))
    cases.append(make_case("tail_bucket_tgen_no_t2", gen, 4, 12, 5,
                           {"temperature": 4.0, "generation_temperature": 1.3,
                            "scale_by_t2": False, "label_smoothing": 0.1, "alpha": 0.8}))
    for tail in ["renormalize_full_vocab", "renormalize_top_k", "tail_bucket"]:
        cases.append(make_case(f"masked_{tail}", gen, 5, 16, 6,
                               {"tail": tail, "temperature": 2.0, "alpha": 0.5,
                                "reduction": "none"}, drop=1, masked=2, ignore_rows=(3,)))
        cases.append(make_case(f"ignored_mean_{tail}", gen, 4, 8, 3,
                               {"tail": tail, "temperature": 1.0, "alpha": 0.9}, drop=1,
                               ignore_rows=(0, 2)))
    # A soft-capped student (after every other case, so that their inputs stay as they were):
    # caps small enough that tanh saturates on part of each row.
    cases.append(make_case("softcap_tail_bucket_reverse_kl", gen, 4, 12, 4,
                           {"tail": "tail_bucket", "divergence": "reverse_kl",
                            "temperature": 2.0, "alpha": 0.6, "label_smoothing": 0.1,
                            "softcap": 2.5}, drop=1, ignore_rows=(2,)))
    cases.append(make_case("softcap_renorm_top_k_jsd", gen, 3, 9, 4,
                           {"tail": "renormalize_top_k", "divergence": "jsd", "beta": 0.3,
                            "temperature": 1.5, "reduction": "sum", "softcap": 1.5},
                           targets=False))
    cases.append(make_case("softcap_full_vocab_masked", gen, 5, 16, 6,
                           {"tail": "renormalize_full_vocab", "temperature": 3.0,
                            "generation_temperature": 0.7, "alpha": 0.5, "reduction": "none",
                            "softcap": 3.0}, drop=1, masked=2, ignore_rows=(3,)))
    for case in cases[-3:]:
        z, cap = torch.tensor(case["student"]), case["config"]["softcap"]
        assert (z.abs() > cap).any(), case["name"]  # the cap bites
    out = pathlib.Path(__file__).resolve().parent.parent / "tests" / "golden" / "topk.json"
    out.write_text(json.dumps({"format": 1, "torch": torch.__version__, "cases": cases}) + "\n")
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main()
