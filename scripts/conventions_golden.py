"""Golden values proving how other tools' distillation losses map onto burn-distill configs.

Writes tests/golden/conventions.json. Run from the project root:

    python -m venv .venv && .venv/bin/pip install torch
    .venv/bin/python scripts/conventions_golden.py            # check + write
    .venv/bin/python scripts/conventions_golden.py --check    # check only, write nothing

Everything is float64 PyTorch, gradients by autograd. Each tool's loss is transcribed from its
own source (see docs/conventions.md for the file and function of each):

  pytorch_hinton          the classic recipe: alpha*T*T*KLDivLoss('batchmean')(log_softmax(s/T),
                          softmax(t/T)) + (1-alpha)*cross_entropy(s, y), on [B*T, V] rows
  trl_gkd                 huggingface/trl, trl/experimental/gkd/gkd_trainer.py,
                          GKDTrainer.generalized_jsd_loss (1.10.0.dev0, 2026-07; identical maths in
                          trl/trainer/gkd_trainer.py before the move to experimental, except the
                          num_items_in_batch argument, added in #6006, and clamp_min(1))
  liger_jsd               linkedin/Liger-Kernel, src/liger_kernel/ops/jsd.py (_jsd_kernel,
                          LigerJSDFunction) behind src/liger_kernel/transformers/jsd.py (LigerJSD);
                          the Triton kernel's per-element loss and its hand-written dX are
                          transcribed into a torch.autograd.Function
  liger_fused_linear_jsd  linkedin/Liger-Kernel, src/liger_kernel/chunked_loss/
                          fused_linear_distillation.py (chunk_forward, _compute_loss) and
                          jsd_loss.py (distillation_loss_fn), v0.6.5+ (normalised by valid tokens);
                          called at the logits level with an identity lm_head (hidden = logits,
                          W = I), so d loss / d hidden = d loss / d logits
  torchtune_forward_kl    pytorch/torchtune, torchtune/modules/loss/kd_losses.py, ForwardKLLoss
  torchtune_reverse_kl    same file, ReverseKLLoss
  torchtune_kd_recipe     recipes/knowledge_distillation_single_device.py, _loss_step/train:
                          (1-kd_ratio)*CE + kd_ratio*ForwardKL(WithChunkedOutput)Loss

Next to each tool there is an independent implementation of burn-distill's own semantics
(crate_loss). The script asserts, for every case, that crate_loss(crate_config) after "post"
reproduces the tool's loss and gradient to 1e-12, plus a few cross-checks against
torch.nn.functional (kl_div, cross_entropy). Inputs are rounded to float32 so that the crate's
f32 tests read exactly the numbers used here.
"""

import argparse
import json
import math
import pathlib

import torch
import torch.nn.functional as F

torch.set_default_dtype(torch.float64)
IGNORE = -100
ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "golden" / "conventions.json"


# ---------------------------------------------------------------------------------------------
# The tools, transcribed. Variable names and operation order follow the sources.
# ---------------------------------------------------------------------------------------------


def pytorch_hinton(student, teacher, labels, temperature, alpha):
    """Classic Hinton et al. recipe as written in PyTorch training scripts (rows = tokens)."""
    V = student.shape[-1]
    s, t, y = student.reshape(-1, V), teacher.reshape(-1, V), labels.reshape(-1)
    T = temperature
    soft = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1))
    return alpha * T * T * soft + (1.0 - alpha) * F.cross_entropy(s, y)


def trl_generalized_jsd_loss(
    student_logits,
    teacher_logits,
    labels=None,
    beta=0.5,
    temperature=1.0,
    reduction="batchmean",
    num_items_in_batch=None,
):
    """trl/experimental/gkd/gkd_trainer.py, GKDTrainer.generalized_jsd_loss (verbatim maths)."""
    student_logits = student_logits / temperature
    teacher_logits = teacher_logits / temperature
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta = torch.tensor(beta, dtype=student_log_probs.dtype, device=student_log_probs.device)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log1p(-beta), teacher_log_probs + torch.log(beta)]),
            dim=0,
        )
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta * kl_teacher + (1 - beta) * kl_student
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if num_items_in_batch is not None:
        jsd_sum = jsd.sum()
        return jsd_sum / num_items_in_batch
    if reduction == "batchmean":
        denom = mask.sum().clamp_min(1) if labels is not None else max(jsd.size(0), 1)
        return jsd.sum() / denom
    elif reduction == "sum":
        return jsd.sum()
    elif reduction == "mean":
        return jsd.mean()
    else:
        return jsd


class LigerJSDFunction(torch.autograd.Function):
    """src/liger_kernel/ops/jsd.py: _jsd_kernel + jsd_forward/jsd_backward, in torch.

    Forward stores the kernel's per-element loss and its hand-written dX (both scaled by
    1/n_non_ignore, ignored rows left at loss 0 / dX 0); backward returns dX * grad_output.
    """

    @staticmethod
    def forward(ctx, X, Y, shift_labels, beta, ignore_index):
        # X = log Q (student, input), Y = log P (teacher, target), both [BT, V] in log space
        BT, V = X.shape
        has_label = shift_labels is not None
        n_non_ignore = int((shift_labels != ignore_index).sum()) if has_label else BT
        loss = torch.zeros_like(X)
        dX = torch.zeros_like(X)
        for row in range(BT):
            if has_label and int(shift_labels[row]) == ignore_index:
                continue  # loss row stays 0, dX row 0
            x, y = X[row], Y[row]
            if beta == 0.0:  # forward KL
                y_prob = torch.exp(y)
                l = y_prob * (y - x)
                d = -y_prob
            elif beta == 1.0:  # reverse KL
                x_prob = torch.exp(x)
                l = x_prob * (x - y)
                d = l + x_prob
            else:
                Q, P = torch.exp(x), torch.exp(y)
                beta_P = beta * P
                one_minus_beta_Q = (1 - beta) * Q
                M = beta_P + one_minus_beta_Q
                log_M = torch.log(M)
                l = beta_P * y + one_minus_beta_Q * x - M * log_M
                d = one_minus_beta_Q * (x - log_M)
            scale = 1.0 / n_non_ignore
            loss[row] = l * scale
            dX[row] = d * scale
        ctx.save_for_backward(dX)
        return torch.sum(loss)

    @staticmethod
    def backward(ctx, grad_output):
        (dX,) = ctx.saved_tensors
        return grad_output * dX, None, None, None, None


def liger_jsd(student, teacher, labels, beta, temperature):
    """LigerJSD(beta, ignore_index=-100)(log_q, log_p, shift_labels) on flattened rows; the user
    applies log_softmax (and any temperature) first, as LigerJSD's docstring shows."""
    V = student.shape[-1]
    log_q = F.log_softmax(student.reshape(-1, V) / temperature, dim=-1)
    log_p = F.log_softmax(teacher.reshape(-1, V) / temperature, dim=-1)
    shift_labels = labels.reshape(-1) if labels is not None else None
    return LigerJSDFunction.apply(log_q, log_p, shift_labels, beta, IGNORE)


def liger_jsd_distillation_loss_fn(student_logits, teacher_logits, beta=0.5, target=None, ignore_index=-100):
    """src/liger_kernel/chunked_loss/jsd_loss.py, LigerFusedLinearJSDFunction.distillation_loss_fn."""
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
    if beta == 0:
        jsd_loss = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd_loss = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        log_mean_probs = torch.logsumexp(
            torch.stack([student_log_probs + math.log(1 - beta), teacher_log_probs + math.log(beta)], dim=0), dim=0
        )
        student_kl = F.kl_div(log_mean_probs, student_log_probs, reduction="none", log_target=True)
        teacher_kl = F.kl_div(log_mean_probs, teacher_log_probs, reduction="none", log_target=True)
        jsd_loss = beta * teacher_kl + (1 - beta) * student_kl
    jsd_loss = jsd_loss.sum(dim=-1)
    if target is not None:
        mask = target != ignore_index
        jsd_loss = jsd_loss.masked_fill(~mask, 0.0)
    return jsd_loss.sum()


def liger_fused_linear_jsd(student, teacher, labels, weight_hard_loss, weight_soft_loss, beta, temperature):
    """LigerFusedLinearJSDLoss(...)(student_input, student_weight, teacher_input, teacher_weight,
    true_labels) with hidden = logits and W = I: fused_linear_distillation.py chunk_forward +
    _compute_loss (one chunk: num_chunks = max(1, BT // 1024) = 1 here)."""
    V = student.shape[-1]
    student_input_chunk = student.reshape(-1, V)
    teacher_input_chunk = teacher.reshape(-1, V)
    student_weight = torch.eye(V)
    teacher_weight = torch.eye(V)
    target_chunk = labels.reshape(-1)
    full_target = target_chunk
    ignore_index = IGNORE
    # chunk_forward
    student_logits_chunk = student_input_chunk @ student_weight.t()
    # Liger upcasts with .float() (bf16 -> fp32); everything here is already float64
    student_log_probs_chunk = F.log_softmax(student_logits_chunk, dim=-1)
    with torch.no_grad():
        teacher_logits_chunk = teacher_input_chunk @ teacher_weight.t()
    hard_loss = F.nll_loss(
        student_log_probs_chunk.view(-1, student_log_probs_chunk.shape[-1]),
        target_chunk.view(-1),
        reduction="sum",
        ignore_index=ignore_index,
    )
    # _compute_loss
    student_logits_chunk = student_logits_chunk / temperature
    teacher_logits_chunk = teacher_logits_chunk / temperature
    num_valid_tokens = (full_target != ignore_index).sum()
    num_valid_tokens = num_valid_tokens.clamp_min(1)
    hard_loss = hard_loss / num_valid_tokens
    soft_loss = liger_jsd_distillation_loss_fn(
        student_logits_chunk, teacher_logits_chunk, beta=beta, target=target_chunk, ignore_index=ignore_index
    )
    soft_loss = soft_loss / num_valid_tokens
    return weight_hard_loss * hard_loss + weight_soft_loss * soft_loss


def torchtune_forward_kl(student_logits, teacher_logits, labels, ignore_index=-100, normalize=True):
    """torchtune/modules/loss/kd_losses.py, ForwardKLLoss.forward (dtype=float32 -> float64 here)."""
    teacher_prob = F.softmax(teacher_logits, dim=-1, dtype=torch.float64)
    inf_mask = torch.isinf(student_logits)
    student_logprob = F.log_softmax(student_logits, dim=-1, dtype=torch.float64)
    prod_probs = torch.masked_fill(teacher_prob * student_logprob, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    mask = (labels != ignore_index).int()
    if not normalize:
        return -torch.sum(x * mask.view(-1), dim=0)
    sum_masks = torch.sum(mask.view(-1), dim=0)
    if sum_masks == 0:
        return torch.tensor(0.0, device=x.device)
    return -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)


def torchtune_reverse_kl(student_logits, teacher_logits, labels, ignore_index=-100, normalize=True):
    """torchtune/modules/loss/kd_losses.py, ReverseKLLoss.forward (dtype=float32 -> float64 here)."""
    student_prob = F.softmax(student_logits, dim=-1, dtype=torch.float64)
    student_logprob = F.log_softmax(student_logits, dim=-1, dtype=torch.float64)
    teacher_logprob = F.log_softmax(teacher_logits, dim=-1, dtype=torch.float64)
    inf_mask = torch.isinf(student_logits) | torch.isinf(teacher_logits)
    prod_probs = torch.masked_fill(student_prob * teacher_logprob, inf_mask, 0)
    prod_probs -= torch.masked_fill(student_prob * student_logprob, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    mask = (labels != ignore_index).int()
    if not normalize:
        return -torch.sum(x * mask.view(-1), dim=0)
    if torch.sum(mask.view(-1), dim=0) == 0:
        return torch.tensor(0.0, device=x.device)
    return -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)


def torchtune_kd_recipe(student, teacher, labels, kd_ratio):
    """recipes/knowledge_distillation_single_device.py: _loss_step flattens to [B*T, V] / [B*T];
    train() combines (1 - kd_ratio) * class_loss + kd_ratio * kd_loss. class_loss is
    CEWithChunkedOutputLoss (sum of CE over kept tokens / kept tokens = cross_entropy 'mean'),
    kd_loss is ForwardKLWithChunkedOutputLoss (sum of ForwardKLLoss(normalize=False) / kept)."""
    V = student.shape[-1]
    logits, teacher_logits, y = student.reshape(-1, V), teacher.reshape(-1, V), labels.reshape(-1)
    kd_loss = torchtune_forward_kl(logits, teacher_logits, y)
    class_loss = F.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum") / (y != IGNORE).sum()
    return (1 - kd_ratio) * class_loss + kd_ratio * kd_loss


# ---------------------------------------------------------------------------------------------
# burn-distill's semantics, implemented independently (row by row).
# ---------------------------------------------------------------------------------------------


def _kl(a_log, b_log):
    """KL(a || b) = sum a (log a - log b), with 0 * anything = 0."""
    a = a_log.exp()
    return torch.where(a > 0, a * (a_log - b_log), torch.zeros_like(a)).sum()


def crate_divergence(cfg, logp, logq):
    d = cfg["divergence"]
    if d == "forward_kl":
        return _kl(logp, logq)
    if d == "reverse_kl":
        return _kl(logq, logp)
    if d == "jsd":
        beta = cfg["beta"]
        if beta == 0.0:  # accepted as ForwardKl
            return _kl(logp, logq)
        if beta == 1.0:  # accepted as ReverseKl
            return _kl(logq, logp)
        logm = torch.log(beta * logp.exp() + (1 - beta) * logq.exp())
        return beta * _kl(logp, logm) + (1 - beta) * _kl(logq, logm)
    raise ValueError(d)


def crate_loss(cfg, student, teacher, labels):
    """burn-distill: forward_seq (with_labels) or forward_seq_soft, reduction mean/sum/normalized."""
    B, Tn, V = student.shape
    s, t = student.reshape(-1, V), teacher.reshape(-1, V)
    y = labels.reshape(-1) if cfg["with_labels"] else None
    T, alpha, eps = cfg["temperature"], cfg["alpha"], cfg["label_smoothing"]
    total, kept = 0.0, 0
    for i in range(B * Tn):
        if y is not None and int(y[i]) == cfg["ignore_index"]:
            continue
        kept += 1
        logq = F.log_softmax(s[i] / T, dim=-1)
        logp = F.log_softmax(t[i] / T, dim=-1)
        soft = crate_divergence(cfg, logp, logq) * (T * T if cfg["scale_by_t2"] else 1.0)
        if y is None:
            row = soft
        else:
            logq1 = F.log_softmax(s[i], dim=-1)
            hard = -(1 - eps) * logq1[int(y[i])] - eps * logq1.mean()
            row = alpha * soft + (1 - alpha) * hard
        total = total + row
    if isinstance(total, float):
        total = (student * 0.0).sum()  # zero with a gradient path
    red = cfg["reduction"]
    if red == "mean":
        return total / kept if kept > 0 else total * 0.0
    if red == "sum":
        return total
    if red == "normalized":
        return total / cfg["items"]
    raise ValueError(red)


def mean_teacher_entropy(cfg, teacher, labels):
    """Mean over kept tokens of H(softmax(teacher / T)) (torchtune's soft cross-entropy offset)."""
    V = teacher.shape[-1]
    t = teacher.reshape(-1, V)
    keep = torch.ones(t.shape[0], dtype=torch.bool) if labels is None else labels.reshape(-1) != cfg["ignore_index"]
    logp = F.log_softmax(t[keep] / cfg["temperature"], dim=-1)
    h = -(logp.exp() * logp).sum(dim=-1)
    return float(h.sum() / max(int(keep.sum()), 1))


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


def f32(x):
    return x.float().double()


def make_inputs(seed, shape, ignored=(), labels=True, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    B, Tn, V = shape
    student = f32(scale * torch.randn(B, Tn, V, generator=g))
    teacher = f32(scale * torch.randn(B, Tn, V, generator=g))
    y = torch.randint(0, V, (B, Tn), generator=g)
    for b, t in ignored:
        y[b, t] = IGNORE
    return student, teacher, (y if labels else None)


def crate_cfg(T, alpha, divergence, beta=None, t2=False, reduction="mean", items=None, with_labels=True):
    return {
        "temperature": T,
        "alpha": alpha,
        "divergence": divergence,
        "beta": beta,
        "scale_by_t2": t2,
        "ignore_index": IGNORE,
        "label_smoothing": 0.0,
        "reduction": reduction,
        "items": items,
        "with_labels": with_labels,
    }


def post(scale=1.0, entropy=False, entropy_weight=1.0):
    p = {"scale": scale, "add_teacher_entropy": entropy}
    if entropy and entropy_weight != 1.0:
        # extension: the recipe adds kd_ratio * mean teacher entropy (absent = 1.0)
        p["teacher_entropy_weight"] = entropy_weight
    return p


def build_cases():
    cases = []

    def add(tool, name, shape, seed, tool_args, fn, cfg, pst, ignored=(), labels=True):
        student, teacher, y = make_inputs(seed, shape, ignored, labels)
        cases.append(dict(tool=tool, name=name, shape=list(shape), student=student, teacher=teacher,
                          labels=y, tool_args=tool_args, fn=fn, crate_config=cfg, post=pst))

    S = (2, 3, 6)
    IGN = ((0, 0), (1, 2))  # two of the six tokens ignored

    # --- classic PyTorch Hinton recipe -----------------------------------------------------
    add("pytorch_hinton", "pytorch_hinton_T4_alpha0.9", (2, 3, 7), 101,
        {"temperature": 4.0, "alpha": 0.9, "kl_reduction": "batchmean", "ce_reduction": "mean",
         "rows": "flattened [B*T, V]"},
        lambda s, t, y: pytorch_hinton(s, t, y, 4.0, 0.9),
        crate_cfg(4.0, 0.9, "forward_kl", t2=True), post())

    # --- TRL GKD ---------------------------------------------------------------------------
    for beta, T, seed in ((0.0, 1.0, 201), (0.5, 1.0, 202), (1.0, 2.0, 203), (0.1, 2.0, 204), (0.5, 2.0, 205)):
        add("trl_gkd", f"trl_gkd_labels_beta{beta}_T{T}", S, seed,
            {"beta": beta, "temperature": T, "reduction": "batchmean", "labels": True, "num_items_in_batch": None},
            lambda s, t, y, beta=beta, T=T: trl_generalized_jsd_loss(s, t, y, beta=beta, temperature=T),
            crate_cfg(T, 1.0, "jsd", beta=beta), post(), ignored=IGN)
    for beta, T, seed in ((0.5, 1.0, 211), (0.0, 2.0, 212)):
        add("trl_gkd", f"trl_gkd_no_labels_beta{beta}_T{T}", S, seed,
            {"beta": beta, "temperature": T, "reduction": "batchmean", "labels": False, "num_items_in_batch": None},
            lambda s, t, y, beta=beta, T=T: trl_generalized_jsd_loss(s, t, None, beta=beta, temperature=T),
            crate_cfg(T, 1.0, "jsd", beta=beta, reduction="normalized", items=S[0], with_labels=False),
            post(), labels=False)
    add("trl_gkd", "trl_gkd_num_items_in_batch_beta0.5", S, 221,
        {"beta": 0.5, "temperature": 1.0, "reduction": "batchmean", "labels": True, "num_items_in_batch": 11},
        lambda s, t, y: trl_generalized_jsd_loss(s, t, y, beta=0.5, num_items_in_batch=11),
        crate_cfg(1.0, 1.0, "jsd", beta=0.5, reduction="normalized", items=11), post(), ignored=IGN)
    add("trl_gkd", "trl_gkd_num_items_in_batch_no_labels_beta0.9", S, 222,
        {"beta": 0.9, "temperature": 1.0, "reduction": "batchmean", "labels": False, "num_items_in_batch": 13},
        lambda s, t, y: trl_generalized_jsd_loss(s, t, None, beta=0.9, num_items_in_batch=13),
        crate_cfg(1.0, 1.0, "jsd", beta=0.9, reduction="normalized", items=13, with_labels=False),
        post(), labels=False)
    add("trl_gkd", "trl_gkd_reduction_sum_beta0.5", S, 231,
        {"beta": 0.5, "temperature": 1.0, "reduction": "sum", "labels": True, "num_items_in_batch": None},
        lambda s, t, y: trl_generalized_jsd_loss(s, t, y, beta=0.5, reduction="sum"),
        crate_cfg(1.0, 1.0, "jsd", beta=0.5, reduction="sum"), post(), ignored=IGN)
    kept = S[0] * S[1] - len(IGN)
    add("trl_gkd", "trl_gkd_reduction_mean_beta0.5", S, 232,
        {"beta": 0.5, "temperature": 1.0, "reduction": "mean", "labels": True, "num_items_in_batch": None},
        lambda s, t, y: trl_generalized_jsd_loss(s, t, y, beta=0.5, reduction="mean"),
        crate_cfg(1.0, 1.0, "jsd", beta=0.5, reduction="normalized", items=kept * S[2]), post(), ignored=IGN)
    add("trl_gkd", "trl_gkd_all_ignored_beta0.5", S, 241,
        {"beta": 0.5, "temperature": 1.0, "reduction": "batchmean", "labels": True, "num_items_in_batch": None},
        lambda s, t, y: trl_generalized_jsd_loss(s, t, y, beta=0.5),
        crate_cfg(1.0, 1.0, "jsd", beta=0.5), post(),
        ignored=[(b, t) for b in range(S[0]) for t in range(S[1])])

    # --- Liger JSD (LigerJSD, Triton op on log-probs) -----------------------------------------
    for beta, T, lab, seed in ((0.5, 1.0, True, 301), (0.1, 1.0, False, 302), (0.0, 1.0, True, 303),
                               (1.0, 2.0, True, 304), (0.5, 2.0, False, 305)):
        add("liger_jsd", f"liger_jsd_beta{beta}_T{T}_{'labels' if lab else 'no_labels'}", (2, 3, 5), seed,
            {"beta": beta, "ignore_index": IGNORE, "shift_labels": lab,
             "temperature_applied_by_user": T, "input": "log_softmax(student / T)", "target": "log_softmax(teacher / T)"},
            lambda s, t, y, beta=beta, T=T: liger_jsd(s, t, y, beta, T),
            crate_cfg(T, 1.0, "jsd", beta=beta, with_labels=lab), post(),
            ignored=IGN if lab else (), labels=lab)

    # --- Liger fused linear JSD distillation (chunked loss) --------------------------------------
    for wh, ws, beta, T, seed in ((0.5, 0.5, 0.5, 1.0, 401), (0.3, 0.7, 0.1, 2.0, 402),
                                  (0.3, 0.7, 0.5, 3.0, 403), (0.0, 1.0, 0.5, 1.0, 404),
                                  (0.5, 0.5, 1.0, 2.0, 405), (1.0, 0.5, 0.5, 2.0, 407)):
        add("liger_fused_linear_jsd", f"liger_fused_linear_jsd_wh{wh}_ws{ws}_beta{beta}_T{T}", (2, 3, 7), seed,
            {"weight_hard_loss": wh, "weight_soft_loss": ws, "beta": beta, "temperature": T,
             "ignore_index": IGNORE, "student_weight": "identity", "teacher_weight": "identity",
             "liger_version": ">=0.6.5"},
            lambda s, t, y, wh=wh, ws=ws, beta=beta, T=T: liger_fused_linear_jsd(s, t, y, wh, ws, beta, T),
            crate_cfg(T, ws / (wh + ws), "jsd", beta=beta), post(scale=wh + ws), ignored=IGN)
    add("liger_fused_linear_jsd", "liger_fused_linear_jsd_all_ignored", (2, 3, 7), 406,
        {"weight_hard_loss": 0.5, "weight_soft_loss": 0.5, "beta": 0.5, "temperature": 1.0,
         "ignore_index": IGNORE, "student_weight": "identity", "teacher_weight": "identity",
         "liger_version": ">=0.6.5"},
        lambda s, t, y: liger_fused_linear_jsd(s, t, y, 0.5, 0.5, 0.5, 1.0),
        crate_cfg(1.0, 0.5, "jsd", beta=0.5), post(scale=1.0),
        ignored=[(b, t) for b in range(2) for t in range(3)])

    # --- torchtune -------------------------------------------------------------------------------
    def flat(fn):
        return lambda s, t, y: fn(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), y.reshape(-1))

    add("torchtune_forward_kl", "torchtune_forward_kl_ignored", S, 501,
        {"ignore_index": IGNORE, "normalize": True},
        flat(torchtune_forward_kl), crate_cfg(1.0, 1.0, "forward_kl"), post(entropy=True), ignored=IGN)
    add("torchtune_forward_kl", "torchtune_forward_kl_no_ignored", (2, 3, 7), 502,
        {"ignore_index": IGNORE, "normalize": True},
        flat(torchtune_forward_kl), crate_cfg(1.0, 1.0, "forward_kl"), post(entropy=True))
    add("torchtune_reverse_kl", "torchtune_reverse_kl_ignored", S, 511,
        {"ignore_index": IGNORE, "normalize": True},
        flat(torchtune_reverse_kl), crate_cfg(1.0, 1.0, "reverse_kl"), post(), ignored=IGN)
    add("torchtune_kd_recipe", "torchtune_kd_recipe_kd_ratio0.5", S, 521,
        {"kd_ratio": 0.5, "loss": "CEWithChunkedOutputLoss", "kd_loss": "ForwardKLWithChunkedOutputLoss"},
        lambda s, t, y: torchtune_kd_recipe(s, t, y, 0.5),
        crate_cfg(1.0, 0.5, "forward_kl"), post(entropy=True, entropy_weight=0.5), ignored=IGN)
    return cases


# ---------------------------------------------------------------------------------------------


def value_and_grad(fn, student, teacher, labels):
    s = student.clone().requires_grad_(True)
    loss = fn(s, teacher, labels)
    (g,) = torch.autograd.grad(loss, s, allow_unused=True)
    if g is None:
        g = torch.zeros_like(s)
    return float(loss.detach()), g


def close(a, b, tol=1e-12):
    return abs(a - b) <= tol * max(1.0, abs(b))


def self_checks(cases):
    n = 0
    # 1. the tool value after "post" equals the crate formula for every case (loss and gradient)
    for c in cases:
        s, t, y, cfg, p = c["student"], c["teacher"], c["labels"], c["crate_config"], c["post"]
        tool_loss, tool_grad = value_and_grad(c["fn"], s, t, y)
        crate_l, crate_g = value_and_grad(lambda a, b, l: crate_loss(cfg, a, b, l), s, t, y)
        mapped = p["scale"] * crate_l
        if p["add_teacher_entropy"]:
            mapped += p.get("teacher_entropy_weight", 1.0) * mean_teacher_entropy(cfg, t, y)
        assert close(mapped, tool_loss), (c["name"], mapped, tool_loss)
        gdiff = float((p["scale"] * crate_g - tool_grad).abs().max())
        assert gdiff <= 1e-12, (c["name"], gdiff)
        assert torch.isfinite(tool_grad).all(), c["name"]
        c["expected"] = {"loss": tool_loss, "grad_student": tool_grad}
        n += 1
        print(f"  ok  {c['name']:<52} loss {tool_loss:+.12f}  |loss diff| {abs(mapped - tool_loss):.1e}"
              f"  max|grad diff| {gdiff:.1e}")

    # 2. cross-checks against torch.nn.functional / hand-written references
    by = {c["name"]: c for c in cases}
    # TRL beta = 0 is forward KL = F.kl_div(log q, p, 'sum') / kept tokens
    c = by["trl_gkd_labels_beta0.0_T1.0"]
    keep = c["labels"] != IGNORE
    ref = F.kl_div(F.log_softmax(c["student"][keep], -1), F.softmax(c["teacher"][keep], -1), reduction="sum") / keep.sum()
    assert close(c["expected"]["loss"], float(ref)), "trl beta 0 vs F.kl_div"
    # TRL beta = 1 is reverse KL
    c = by["trl_gkd_labels_beta1.0_T2.0"]
    keep = c["labels"] != IGNORE
    ref = F.kl_div(F.log_softmax(c["teacher"][keep] / 2, -1), F.softmax(c["student"][keep] / 2, -1), reduction="sum") / keep.sum()
    assert close(c["expected"]["loss"], float(ref)), "trl beta 1 vs F.kl_div"
    # TRL without labels: batchmean divides by B (jsd.size(0) of the [B, T, V] tensor)
    c = by["trl_gkd_no_labels_beta0.0_T2.0"]
    ref = F.kl_div(F.log_softmax(c["student"] / 2, -1), F.log_softmax(c["teacher"] / 2, -1),
                   reduction="sum", log_target=True) / c["shape"][0]
    assert close(c["expected"]["loss"], float(ref)), "trl no labels / B"
    # Liger JSD and TRL agree on the JSD definition (same inputs, TRL with labels == Liger with labels)
    c = by["liger_jsd_beta0.5_T1.0_labels"]
    ref = trl_generalized_jsd_loss(c["student"], c["teacher"], c["labels"], beta=0.5)
    assert close(c["expected"]["loss"], float(ref)), "liger jsd vs trl"
    # Liger JSD: the kernel's hand-written dX equals autograd of its own loss expression
    for c in cases:
        if c["tool"] != "liger_jsd":
            continue
        beta, T = c["tool_args"]["beta"], c["tool_args"]["temperature_applied_by_user"]

        def autograd_version(s, t, y, beta=beta, T=T):
            V = s.shape[-1]
            X = F.log_softmax(s.reshape(-1, V) / T, -1)
            Y = F.log_softmax(t.reshape(-1, V) / T, -1)
            keep = torch.ones(X.shape[0], dtype=torch.bool) if y is None else y.reshape(-1) != IGNORE
            X, Y = X[keep], Y[keep]
            if beta == 0.0:
                l = Y.exp() * (Y - X)
            elif beta == 1.0:
                l = X.exp() * (X - Y)
            else:
                M = beta * Y.exp() + (1 - beta) * X.exp()
                l = beta * Y.exp() * Y + (1 - beta) * X.exp() * X - M * M.log()
            return l.sum() / keep.sum()

        l2, g2 = value_and_grad(autograd_version, c["student"], c["teacher"], c["labels"])
        assert close(l2, c["expected"]["loss"]) and float((g2 - c["expected"]["grad_student"]).abs().max()) <= 1e-12
    # Liger fused: hard part is F.cross_entropy('mean', ignore_index) and soft part has no T^2
    c = by["liger_fused_linear_jsd_wh0.3_ws0.7_beta0.1_T2.0"]
    V = c["shape"][2]
    s, t, y = c["student"].reshape(-1, V), c["teacher"].reshape(-1, V), c["labels"].reshape(-1)
    keep = y != IGNORE
    soft = trl_generalized_jsd_loss(s, t, y, beta=0.1, temperature=2.0)
    ref = 0.3 * F.cross_entropy(s, y) + 0.7 * soft
    assert close(c["expected"]["loss"], float(ref)), "liger fused vs CE + TRL JSD"
    # Hinton: soft part equals F.kl_div(..., 'sum') / rows
    c = by["pytorch_hinton_T4_alpha0.9"]
    V = c["shape"][2]
    s, t, y = c["student"].reshape(-1, V), c["teacher"].reshape(-1, V), c["labels"].reshape(-1)
    ref = 0.9 * 16 * F.kl_div(F.log_softmax(s / 4, -1), F.softmax(t / 4, -1), reduction="sum") / s.shape[0] \
        + 0.1 * F.cross_entropy(s, y)
    assert close(c["expected"]["loss"], float(ref)), "hinton vs kl_div sum / N"
    # torchtune ForwardKLLoss = soft cross-entropy = KL + H(p): so its gradient is the KL gradient
    c = by["torchtune_forward_kl_ignored"]
    V = c["shape"][2]
    s, t, y = c["student"].reshape(-1, V), c["teacher"].reshape(-1, V), c["labels"].reshape(-1)
    keep = y != IGNORE
    ref = -(F.softmax(t[keep], -1) * F.log_softmax(s[keep], -1)).sum() / keep.sum()
    assert close(c["expected"]["loss"], float(ref)), "torchtune soft CE"
    ref_kl = F.kl_div(F.log_softmax(s[keep], -1), F.softmax(t[keep], -1), reduction="sum") / keep.sum()
    assert not close(c["expected"]["loss"], float(ref_kl), 1e-3), "torchtune is not KL"
    print(f"{n} cases: tool == post(crate) to 1e-12 (loss and gradient); cross-checks passed")


def encode(c):
    def floats(x):
        return [float(v) for v in x.reshape(-1).tolist()]

    for name in ("student", "teacher"):
        assert all(float(torch.tensor(v, dtype=torch.float32)) == v for v in floats(c[name])), "not f32-exact"
    return {
        "tool": c["tool"],
        "name": c["name"],
        "shape": c["shape"],
        "student": floats(c["student"]),
        "teacher": floats(c["teacher"]),
        "labels": None if c["labels"] is None else [int(v) for v in c["labels"].reshape(-1).tolist()],
        "tool_args": c["tool_args"],
        "crate_config": c["crate_config"],
        "post": c["post"],
        "expected": {"loss": c["expected"]["loss"], "grad_student": floats(c["expected"]["grad_student"])},
    }


def dump(cases):
    """One case per block, one key per line, arrays on one line: compact but diffable."""
    lines = ['{"format": 1, "generator": "scripts/conventions_golden.py", "cases": [']
    for k, c in enumerate(cases):
        lines.append("{")
        items = list(c.items())
        for j, (key, val) in enumerate(items):
            comma = "," if j < len(items) - 1 else ""
            if key == "expected":
                inner = ", ".join(f"{json.dumps(k2)}: {json.dumps(v2)}" for k2, v2 in val.items())
                lines.append(f'  "expected": {{{inner}}}{comma}')
            else:
                lines.append(f"  {json.dumps(key)}: {json.dumps(val)}{comma}")
        lines.append("}" + ("," if k < len(cases) - 1 else ""))
    lines.append("]}")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="run the self-checks only; write nothing")
    args = ap.parse_args()
    cases = build_cases()
    names = [c["name"] for c in cases]
    assert len(names) == len(set(names)), "duplicate case names"
    self_checks(cases)
    text = dump([encode(c) for c in cases])
    json.loads(text)  # well-formed
    if args.check:
        if OUT.exists():
            old = json.loads(OUT.read_text())
            new = json.loads(text)
            print("stored file matches" if old == new else "stored file DIFFERS from a fresh run")
        return
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
