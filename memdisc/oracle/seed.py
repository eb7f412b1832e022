"""Plain port of the seed code's semantics: the oracle for parity tests.

Deliberately eager and simple: Python loops over parameters, ``torch.autograd.grad``,
host-side ``.item()`` decisions, exactly as the public code of Zhu et al. (ICML 2023)
and Pang et al. (NeurIPS 2021) behave (ALGORITHM.md sections 3 to 5).  Nothing here
is fast and nothing here is used by the online runner; ``memdisc.attacks`` and the
defences are tested against it.

Conventions: pixels in [0, 1]; ``n(v) = F.normalize(v.flatten(), dim=0)``
(``v / max(||v||, 1e-12)``); all crafting and correction runs with the models in
eval mode, gradients w.r.t. every parameter; every function restores the
train/eval flags and the requires_grad flags it changed and never writes ``.grad``,
except ``seed_train_step`` (which trains).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["seed_batch_md", "seed_dsc_correct", "seed_at_correct", "madry_at_perturb", "seed_train_step",
           "seed_craft_trigger", "seed_craft_accumulative"]


@contextlib.contextmanager
def _eval_mode(*models: nn.Module, grads: bool = False) -> Iterator[None]:
    """Models in eval mode (and, with ``grads``, every parameter requiring grad) for the block."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    needs = [(p, p.requires_grad) for model in models for p in model.parameters()]
    try:
        for model in models:
            model.eval()
            if grads:
                for p in model.parameters():
                    p.requires_grad_(True)
        yield
    finally:
        for m, training in flags:
            m.training = training
        for p, flag in needs:
            p.requires_grad_(flag)


def _project(x_new: torch.Tensor, x0: torch.Tensor, eps: float) -> torch.Tensor:
    """``clip_[0,1](clip_[x0-eps, x0+eps](x_new))``."""
    return torch.clamp(torch.min(torch.max(x_new, x0 - eps), x0 + eps), 0.0, 1.0)


def _grads(loss: torch.Tensor, params: list[torch.Tensor], create_graph: bool) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True,
                                    materialize_grads=True))


def _alignment(grads_a, grads_b) -> torch.Tensor:
    """``sum_l n(a_l) . n(b_l)`` with a Python loop, as the seed."""
    total = 0
    for a, b in zip(grads_a, grads_b):
        total = total + F.normalize(a.flatten(), p=2, dim=0) @ F.normalize(b.flatten(), p=2, dim=0)
    return total


def _kl_rows(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """``[B]`` ``KL(softmax(logits_p) || softmax(logits_q))``."""
    log_p = F.log_softmax(logits_p, dim=1)
    return (log_p.exp() * (log_p - F.log_softmax(logits_q, dim=1))).sum(dim=1)


def _hist_list(hist_model) -> list[nn.Module]:
    return list(hist_model) if isinstance(hist_model, (list, tuple)) else [hist_model]


def seed_sample_md(model: nn.Module, hist_model, x: torch.Tensor) -> torch.Tensor:
    """``[B]`` per-sample ``MD(x_i) = KL(p_h(x_i) || p_t(x_i))``, both models in eval mode, T = 1.

    hist_model: one historical model, or a list of K of them (their MDs are averaged:
    the plain generalisation of the seed, one forward per snapshot).
    """
    hists = _hist_list(hist_model)
    with _eval_mode(model, *hists), torch.no_grad():
        current = model(x)
        return sum(_kl_rows(h(x), current) for h in hists) / len(hists)


def seed_batch_md(model: nn.Module, hist_model, x: torch.Tensor) -> float:
    """Batch mean of ``MD(x_i) = KL(p_h(x_i) || p_t(x_i))`` (see ``seed_sample_md``)."""
    return seed_sample_md(model, hist_model, x).mean().item()


def seed_dsc_correct(model: nn.Module, hist_model, x: torch.Tensor, y: torch.Tensor, step_index: int, *,
                     tau0: float = 0.5, tau_slope: float = 0.02, max_iters: int = 10, step_size: float = 0.02,
                     eps: float = 0.2, per_sample: bool = False) -> tuple[torch.Tensor, int]:
    """DSC with the seed's per-batch rule (ALGORITHM.md section 3).

    ``tau = tau0 + tau_slope * step_index``; up to ``max_iters`` times: stop if the batch
    mean MD of the current ``x'`` is <= tau, else
    ``x' <- clip_[0,1](Pi_eps(x' - step_size * sign(grad_x' CE(f_t(x'), y)); x))``.
    ``per_sample=True`` is memdisc's per-sample rule written as plainly: a row stops
    for good once its own MD <= tau; the loop ends when no row moves.

    Returns ``(x_corrected [B, ...], iters_done)`` (the number of steps taken).
    """
    tau = tau0 + tau_slope * step_index
    x0 = x.detach()
    xc = x0.clone()
    moving = torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device)
    iters_done = 0
    for _ in range(max_iters):
        if per_sample:
            moving = moving & (seed_sample_md(model, hist_model, xc) > tau)
            if not moving.any():
                break
        elif seed_batch_md(model, hist_model, xc) <= tau:
            break
        with _eval_mode(model):
            xc.requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(xc), y), xc)
        x_new = _project(xc.detach() - step_size * g.sign(), x0, eps)
        xc = torch.where(_rows(moving, x_new), x_new, xc.detach())
        iters_done += 1
    return xc, iters_done


def seed_at_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, iters: int = 10, step_size: float = 0.02,
                    eps: float = 0.2, kl_weight: float | None = None) -> torch.Tensor:
    """The seed's "AT": loss *descent* with no early stop and a KL-to-natural term.

    ``iters`` times ``x' <- clip_[0,1](Pi_eps(x' - step_size * sign(grad_x' L); x))`` with
    ``L = CE(f(x'), y) + kl_weight * mean_i KL(softmax f(x_i) || softmax f(x'_i))``, eval mode.

    ``kl_weight=None`` means ``1 / C`` (C classes): the seed adds ``nn.KLDivLoss()`` with its
    default element-wise mean reduction, which divides the summed KL by B * C, i.e. the
    batch-mean KL times 1 / C.  (At ``x' = x`` that term and its gradient are 0; it matters
    from the second step on.)
    """
    x0 = x.detach()
    xc = x0.clone()
    with _eval_mode(model):
        with torch.no_grad():
            natural = model(x0)
        weight = 1.0 / natural.shape[1] if kl_weight is None else kl_weight
        for _ in range(iters):
            xc.requires_grad_(True)
            logits = model(xc)
            loss = F.cross_entropy(logits, y) + weight * _kl_rows(natural, logits).mean()
            (g,) = torch.autograd.grad(loss, xc)
            xc = _project(xc.detach() - step_size * g.sign(), x0, eps)
    return xc


def madry_at_perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, iters: int, step_size: float,
                     eps: float) -> torch.Tensor:
    """Standard (Madry) PGD: loss *ascent*, eval mode, starting at x (no random start).

    ``iters`` times ``x' <- clip_[0,1](Pi_eps(x' + step_size * sign(grad_x' CE(f(x'), y)); x))``.
    """
    x0 = x.detach()
    xc = x0.clone()
    with _eval_mode(model):
        for _ in range(iters):
            xc.requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(xc), y), xc)
            xc = _project(xc.detach() + step_size * g.sign(), x0, eps)
    return xc


def seed_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
                    clip_norm: float | None = None, clip_type: str = "inf") -> float:
    """One online SGD step (ST; GC when ``clip_norm`` is given), leaving the model in train mode.

    Train mode, ``loss = mean_i CE(f(x_i), y_i)``, backward, optionally
    ``clip_grad_norm_(params, clip_norm, norm_type=inf or 2)``, ``optimizer.step()``.
    Returns the loss before the step.
    """
    if clip_type not in ("inf", "2"):
        raise ValueError(f"clip_type: expected 'inf' or '2', got {clip_type!r}")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm: expected None or a number > 0, got {clip_norm!r}")
    model.train()
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm,
                                       norm_type=float("inf") if clip_type == "inf" else 2.0)
    optimizer.step()
    return loss.item()


def seed_craft_trigger(model: nn.Module, x_t: torch.Tensor, y_t: torch.Tensor, x_val: torch.Tensor,
                       y_val: torch.Tensor, *, eps: float, steps: int, step_size: float,
                       poison_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Poisoned trigger (ALGORITHM.md section 4), eval mode.

    ``steps`` times: ``A = sum_l n(grad CE(S_T')) . n(grad CE(S_val))`` (both parameter
    gradients with create_graph, recomputed every step as the seed does), then
    ``S_T' <- clip_[0,1](Pi_eps(S_T' - step_size * sign(grad_S_T' A); S_T))``.
    Rows where ``poison_mask`` ([B] bool) is False stay clean throughout.
    """
    x0 = x_t.detach()
    xc = x0.clone()
    with _eval_mode(model, grads=True):
        params = list(model.parameters())
        for _ in range(steps):
            xc.requires_grad_(True)
            g_trig = _grads(F.cross_entropy(model(xc), y_t), params, True)
            g_val = _grads(F.cross_entropy(model(x_val), y_val), params, True)
            (g,) = torch.autograd.grad(_alignment(g_trig, g_val), xc)
            x_new = _project(xc.detach() - step_size * g.sign(), x0, eps)
            xc = x_new if poison_mask is None else torch.where(_rows(poison_mask, x_new), x_new, xc.detach())
    return xc.detach()


def seed_craft_accumulative(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_trigger_poisoned: torch.Tensor,
                            y_trigger: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, *, eps: float,
                            steps: int, step_size: float, gamma: float, terms: str = "both",
                            poison_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Accumulative poisoned batch (ALGORITHM.md section 4), eval mode.

    ``G = grad_theta A(CE(P(S_T)), CE(S_val))`` (create_graph), then ``steps`` times
    ``X <- clip_[0,1](Pi_eps(X + step_size * sign(grad_X H); S_t))`` with
    ``H(X) = sum_l n(grad CE(X)) . (gamma * n(grad CE(S_t)) + n(G_l))``;
    ``terms="first"``: only the gamma term, ``"second"``: only the G term.
    Rows where ``poison_mask`` ([B] bool) is False stay clean throughout.
    """
    if terms not in ("both", "first", "second"):
        raise ValueError(f"terms: expected 'both', 'first' or 'second', got {terms!r}")
    x0 = x.detach()
    xc = x0.clone()
    with _eval_mode(model, grads=True):
        params = list(model.parameters())
        g_trig = _grads(F.cross_entropy(model(x_trigger_poisoned), y_trigger), params, True)
        g_val = _grads(F.cross_entropy(model(x_val), y_val), params, True)
        g_train = _grads(F.cross_entropy(model(x0), y), params, True)
        g_second = _grads(_alignment(g_trig, g_val), params, True)
        for _ in range(steps):
            xc.requires_grad_(True)
            g_adv = _grads(F.cross_entropy(model(xc), y), params, True)
            h = 0
            for a, t, s in zip(g_adv, g_train, g_second):
                n_adv = F.normalize(a.flatten(), p=2, dim=0)
                n_train = F.normalize(t.flatten(), p=2, dim=0)
                n_second = F.normalize(s.flatten(), p=2, dim=0)
                if terms == "first":
                    h = h + n_adv @ (gamma * n_train)
                elif terms == "second":
                    h = h + n_adv @ n_second
                else:
                    h = h + n_adv @ (gamma * n_train + n_second)
            (g,) = torch.autograd.grad(h, xc)
            x_new = _project(xc.detach() + step_size * g.sign(), x0, eps)
            xc = x_new if poison_mask is None else torch.where(_rows(poison_mask, x_new), x_new, xc.detach())
    return xc.detach()


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool mask viewed to broadcast over ``like``'s sample dimensions."""
    return mask.view((-1,) + (1,) * (like.dim() - 1))
