"""Golden values for the on-policy (sampled-token) and cross-tokenizer losses, in float64.

Writes tests/golden/onpolicy.json. Run from the project root:

    python -m venv .venv && .venv/bin/pip install torch
    .venv/bin/python scripts/onpolicy_golden.py

The formulas follow the public code the crate reproduces, written out here independently of
the crate's tensor formulation:
- sampled-token loss: Tinker's on-policy distillation (advantage = teacher − sampler
  log-probability, discounted future sum by a backward running sum, importance-sampling and
  PPO-clipped losses), verl's k3 (`low_var_kl`, clamps at ±20 and ±10);
- cross-tokenizer loss: TRL GOLD's `ULDLoss` (sorted L1 per aligned row, divided by the
  sequence's rows, mean over sequences; hybrid: generalized JSD on the matched vocabulary with
  probabilities clamped at 1e-8, sorted L1 on the rest, weights |M| / V_t), its byte-offset
  alignment (two pointers on token end offsets) and probability merging (no renormalisation),
  with rows that predict their own token (the shifted slice).
Each case stores the loss and the gradient of `upstream · Σ loss` with respect to the
student's logits. Inputs are rounded to float32 so that the f32 tests read exactly these numbers.
"""

import json
import math
import pathlib

import torch
import torch.nn.functional as F

torch.set_default_dtype(torch.float64)
G = torch.Generator().manual_seed(20261203)


def f32(x):
    return x.float().double()


def randn(*shape, scale=1.0):
    return f32(torch.randn(*shape, generator=G) * scale)


def flat(t):
    return [float(x) for x in t.reshape(-1).tolist()]


# ---------------------------------------------------------------- sampled-token loss

def discounted(x, gamma):
    """Tinker's discounted_future_sum_vectorized, per row: running = x[t] + γ·running."""
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        running = torch.zeros(())
        for t in reversed(range(x.shape[1])):
            running = x[b, t] + gamma * running
            out[b, t] = running
    return out


def sampled_loss(z, tokens, teacher, mask, sampler, c):
    m = mask.double()
    lp_all = F.log_softmax(z, dim=-1)
    safe = torch.where(mask, tokens, torch.zeros_like(tokens))
    lp = lp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * m
    teacher = torch.where(mask, teacher, torch.zeros_like(teacher))
    if c["estimator"] == "k1":
        old = lp.detach() if sampler is None else torch.where(mask, sampler, torch.zeros_like(sampler))
        adv = -(old - teacher) * m  # Tinker: −coef · mask · (sampled − teacher)
        if c["discount"] > 0:
            adv = discounted(adv, c["discount"])
        adv = adv.detach() * m
        ratio = torch.exp(lp - old)
        obj = ratio * adv
        if c["clip"] is not None:
            eps = c["clip"]
            obj = torch.min(obj, torch.clamp(ratio, 1 - eps, 1 + eps) * adv)
        per = -obj * m
    else:  # verl low_var_kl
        kl = torch.clamp(teacher - lp, -20, 20)
        per = torch.clamp(torch.exp(kl) - kl - 1, -10, 10) * m
    red = c["reduction"]
    if red == "mean":
        return (per.sum() / m.sum().clamp_min(1)).reshape(1)
    if red == "sum":
        return per.sum().reshape(1)
    if red == "normalized":
        return (per.sum() / c["items"]).reshape(1)
    return per.reshape(-1)


def sampled_case(name, b, t, v, c, sampler=False, prompt=0, pad=None, scale=2.0, upstream=0.7):
    z = randn(b, t, v, scale=scale).requires_grad_()
    tokens = torch.randint(0, v, (b, t), generator=G)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[:, :prompt] = False
    if pad is not None:
        for row, n in pad.items():
            mask[row, t - n:] = False
    tokens = torch.where(mask, tokens, torch.full_like(tokens, 977))  # garbage where masked
    teacher = f32(F.log_softmax(torch.randn(b, t, v, generator=G) * 2.5, -1).gather(
        -1, tokens.clamp(max=v - 1).unsqueeze(-1)).squeeze(-1))
    teacher = torch.where(mask, teacher, torch.full_like(teacher, 5.0))  # garbage where masked
    samp = None
    if sampler:
        noise = randn(b, t, v, scale=0.6)
        samp = f32(F.log_softmax(z.detach() + noise, -1).gather(
            -1, tokens.clamp(max=v - 1).unsqueeze(-1)).squeeze(-1))
        samp = torch.where(mask, samp, torch.full_like(samp, 3.0))
    loss = sampled_loss(z, tokens, teacher, mask, samp, c)
    (loss.sum() * upstream).backward()
    return {
        "name": name, "shape": [b, t, v], "logits": flat(z.detach()),
        "tokens": [int(x) for x in tokens.reshape(-1)], "teacher": flat(teacher),
        "mask": [bool(x) for x in mask.reshape(-1)],
        "sampler": None if samp is None else flat(samp),
        "config": c, "upstream": upstream,
        "expected": {"loss": flat(loss.detach()), "grad": flat(z.grad)},
    }


def cfg(estimator="k1", discount=0.0, clip=None, reduction="mean", items=None):
    return {"estimator": estimator, "discount": discount, "clip": clip,
            "reduction": reduction, "items": items}


# ---------------------------------------------------------------- cross-tokenizer loss

def align(s_off, t_off):
    """GOLD's _align_by_byte_offsets (two pointers on end offsets)."""
    groups, s, t, s0, t0 = [], 0, 0, 0, 0
    while s < len(s_off) and t < len(t_off):
        se, te = s_off[s][1], t_off[t][1]
        if se < te:
            s += 1
        elif se > te:
            t += 1
        else:
            s += 1
            t += 1
            groups.append((list(range(s0, s)), list(range(t0, t))))
            s0, t0 = s, t
    return groups


def merge(probs, token_ids, groups, bayesian):
    """GOLD's _merge_probabilities_with_alignment_groups (no renormalisation)."""
    rows = []
    for g in groups:
        if bayesian:
            base, scalars = probs[g[-1]], g[:-1]
        else:
            base, scalars = probs[g[0]], g[1:]
        prod = torch.ones(())
        for idx in scalars:
            prod = prod * probs[idx, token_ids[idx]].clamp_min(1e-8)
        rows.append(base * prod)
    return torch.stack(rows)


def sorted_l1(a, b):
    a = a.sort(dim=-1, descending=True).values
    b = b.sort(dim=-1, descending=True).values
    width = max(a.shape[-1], b.shape[-1])
    a = F.pad(a, (0, width - a.shape[-1]))
    b = F.pad(b, (0, width - b.shape[-1]))
    return F.l1_loss(a, b, reduction="none").sum(-1)


def gjsd_probs(s, t, beta):
    """GOLD's generalized_jsd_loss with logits_are_probs, per row (summed over the vocab)."""
    ls = torch.log(s.clamp_min(1e-8))
    lt = torch.log(t.clamp_min(1e-8))
    if beta == 0:
        jsd = F.kl_div(ls, lt, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(lt, ls, reduction="none", log_target=True)
    else:
        bt = torch.tensor(beta)
        mix = torch.logsumexp(torch.stack([ls + torch.log(1 - bt), lt + torch.log(bt)]), dim=0)
        jsd = beta * F.kl_div(mix, lt, reduction="none", log_target=True) + \
            (1 - beta) * F.kl_div(mix, ls, reduction="none", log_target=True)
    return jsd.sum(-1)


def cross_loss(zs, ys, zt, yt, seqs, c, vocab):
    ps = F.softmax(zs / c["student_temperature"], -1)
    pt = F.softmax(zt.detach() / c["teacher_temperature"], -1)
    per_seq, rows_all = [], []
    s_row = t_row = 0
    for s_off, t_off in seqs:
        groups = align(s_off, t_off)
        gs = [[s_row + i for i in g[0]] for g in groups]
        gt = [[t_row + i for i in g[1]] for g in groups]
        ms = merge(ps, ys, gs, c["merge"] == "bayesian")
        mt = merge(pt, yt, gt, c["merge"] == "bayesian")
        if vocab is None:
            rows = sorted_l1(ms, mt)
        else:
            s_ids = [p[0] for p in vocab]
            t_ids = [p[1] for p in vocab]
            w = c["matched_weight"] if c["matched_weight"] is not None else len(t_ids) / zt.shape[-1]
            rows = w * gjsd_probs(ms[:, s_ids], mt[:, t_ids], c["matched_beta"])
            us = [i for i in range(zs.shape[-1]) if i not in s_ids]
            ut = [i for i in range(zt.shape[-1]) if i not in t_ids]
            if us and ut:
                rows = rows + (1 - w) * sorted_l1(ms[:, us], mt[:, ut])
        per_seq.append(rows.sum() / len(groups))
        rows_all.append(rows)
        s_row += len(s_off)
        t_row += len(t_off)
    rows = torch.cat(rows_all)
    red = c["reduction"]
    if red == "mean":
        dist = torch.stack(per_seq).mean().reshape(1)
    elif red == "sum":
        dist = rows.sum().reshape(1)
    else:
        dist = rows
    loss = c["distillation_weight"] * dist
    if c["crossentropy_weight"] > 0:
        ce = F.cross_entropy(zs, ys, reduction="mean")
        loss = loss + c["crossentropy_weight"] * ce
    return loss


def random_spans(length, rng_cuts):
    cuts = sorted(set(rng_cuts))
    bounds = [0] + [c for c in cuts if 0 < c < length] + [length]
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def cross_case(name, lengths, vs, vt, c, vocab=None, upstream=0.6, scale=2.0):
    seqs = []
    for n in lengths:
        s_cuts = torch.randint(1, n, (n // 2,), generator=G).tolist()
        t_cuts = torch.randint(1, n, (n // 3 + 1,), generator=G).tolist()
        seqs.append((random_spans(n, s_cuts), random_spans(n, t_cuts)))
    ns = sum(len(s) for s, _ in seqs)
    nt = sum(len(t) for _, t in seqs)
    zs = randn(ns, vs, scale=scale).requires_grad_()
    zt = randn(nt, vt, scale=scale)
    ys = torch.randint(0, vs, (ns,), generator=G)
    yt = torch.randint(0, vt, (nt,), generator=G)
    loss = cross_loss(zs, ys, zt, yt, seqs, c, vocab)
    (loss.sum() * upstream).backward()
    return {
        "name": name, "sequences": [[s, t] for s, t in seqs],
        "student_shape": [ns, vs], "teacher_shape": [nt, vt],
        "student": flat(zs.detach()), "teacher": flat(zt),
        "student_tokens": [int(x) for x in ys], "teacher_tokens": [int(x) for x in yt],
        "vocab": vocab, "config": c, "upstream": upstream,
        "expected": {"loss": flat(loss.detach()), "grad": flat(zs.grad)},
    }


def xcfg(merge="observed", ts=1.0, tt=1.0, dw=1.0, cw=0.0, beta=0.5, mw=None, reduction="mean"):
    return {"merge": merge, "student_temperature": ts, "teacher_temperature": tt,
            "distillation_weight": dw, "crossentropy_weight": cw, "matched_beta": beta,
            "matched_weight": mw, "reduction": reduction}


def main():
    sampled = [
        sampled_case("k1_on_policy", 2, 5, 7, cfg()),
        sampled_case("k1_prompt_and_padding", 3, 6, 11, cfg(), prompt=2, pad={0: 2, 2: 4}),
        sampled_case("k1_sum", 2, 4, 9, cfg(reduction="sum"), prompt=1),
        sampled_case("k1_normalized", 2, 4, 9, cfg(reduction="normalized", items=13), prompt=1),
        sampled_case("k1_per_row", 2, 4, 5, cfg(reduction="per_row"), pad={1: 1}),
        sampled_case("k1_discount", 2, 6, 7, cfg(discount=0.9), prompt=1, pad={1: 2}),
        sampled_case("k1_discount_one", 1, 5, 6, cfg(discount=1.0)),
        sampled_case("k1_importance", 2, 5, 8, cfg(), sampler=True, prompt=1),
        sampled_case("k1_importance_clip", 3, 5, 8, cfg(clip=0.2), sampler=True, scale=3.0),
        sampled_case("k1_discount_importance_clip", 2, 5, 6, cfg(discount=0.5, clip=0.1),
                     sampler=True, prompt=1),
        sampled_case("k3", 2, 5, 7, cfg(estimator="k3"), prompt=1, pad={0: 1}),
        sampled_case("k3_clamped", 2, 3, 5, cfg(estimator="k3", reduction="sum"), scale=12.0),
        sampled_case("k3_per_row", 2, 3, 4, cfg(estimator="k3", reduction="per_row")),
        sampled_case("all_masked_row", 2, 3, 5, cfg(), pad={1: 3}),
    ]
    # The clip case must clip: some ratio out of [0.8, 1.2] (the sampler is noisy).
    cross = [
        cross_case("uld_one_sequence", [9], 7, 10, xcfg()),
        cross_case("uld_two_sequences", [6, 11], 9, 6, xcfg()),
        cross_case("uld_bayesian", [8, 5], 6, 9, xcfg(merge="bayesian")),
        cross_case("uld_temperatures_ce", [7, 7], 8, 12, xcfg(ts=2.0, tt=0.5, dw=0.7, cw=0.4)),
        cross_case("uld_sum", [6, 4], 5, 7, xcfg(reduction="sum")),
        cross_case("uld_per_row", [5], 6, 6, xcfg(reduction="per_row")),
        cross_case("hybrid_adaptive", [8, 6], 7, 9, xcfg(),
                   vocab=[[0, 1], [2, 3], [5, 4], [6, 8]]),
        cross_case("hybrid_forward_kl_fixed", [7], 6, 8, xcfg(beta=0.0, mw=0.7),
                   vocab=[[1, 0], [3, 5]]),
        cross_case("hybrid_reverse_kl_bayesian", [6, 9], 8, 5, xcfg(merge="bayesian", beta=1.0),
                   vocab=[[0, 0], [7, 2], [4, 4]]),
        cross_case("hybrid_all_matched", [6], 4, 4, xcfg(cw=0.5),
                   vocab=[[0, 3], [1, 2], [2, 1], [3, 0]]),
    ]
    out = pathlib.Path(__file__).resolve().parent.parent / "tests" / "golden" / "onpolicy.json"
    out.write_text(json.dumps({"format": 1, "torch": torch.__version__,
                               "sampled": sampled, "cross": cross}) + "\n")
    print(f"wrote {out}: {len(sampled)} sampled-token and {len(cross)} cross-tokenizer cases")


if __name__ == "__main__":
    main()
