"""Pure-PyTorch reference of the memdisc ops: the oracle for every fast path
and the fallback when the compiled extension is missing.

All functions run in float64 as well, for gradcheck.  Half inputs are
computed in float32.
"""
from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for float32/float16/bfloat16."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def discrepancy_reference(current: torch.Tensor, snapshots: torch.Tensor, temperature: float = 1.0,
                          reverse: bool = False):
    """Per-sample KL between snapshot and current softmaxes.

    current [B, C], snapshots [K, B, C] -> (kl [K, B], lse_current [B], lse_snapshots [K, B]),
    all in float32 (float64 for float64 inputs).  With a = current/T, b = snapshots/T:
    ``kl = KL(softmax(b) || softmax(a))``, or ``KL(softmax(a) || softmax(b))`` if reverse.
    """
    acc = acc_dtype(current.dtype)
    a = current.to(acc) / temperature
    b = snapshots.to(acc) / temperature
    lse_a = torch.logsumexp(a, dim=-1)
    lse_b = torch.logsumexp(b, dim=-1)
    log_pt = a - lse_a.unsqueeze(-1)
    log_ph = b - lse_b.unsqueeze(-1)
    if reverse:
        kl = (log_pt.exp() * (log_pt - log_ph)).sum(-1)
    else:
        kl = (log_ph.exp() * (log_ph - log_pt)).sum(-1)
    return kl, lse_a, lse_b


def discrepancy_backward_reference(grad_kl, current, snapshots, lse_current, lse_snapshots, kl,
                                   temperature: float, reverse: bool):
    """Gradients of ``sum(grad_kl * kl)`` w.r.t. current [B, C] and snapshots [K, B, C].

    forward KL(p_h||p_t):  d/dcurrent = sum_k g (p_t - p_h) / T,  d/dsnap = g p_h (log p_h - log p_t - kl) / T
    reverse KL(p_t||p_h):  d/dcurrent = sum_k g p_t (log p_t - log p_h - kl) / T,  d/dsnap = g (p_h - p_t) / T
    """
    acc = acc_dtype(current.dtype)
    log_pt = current.to(acc) / temperature - lse_current.to(acc).unsqueeze(-1)
    log_ph = snapshots.to(acc) / temperature - lse_snapshots.to(acc).unsqueeze(-1)
    pt, ph = log_pt.exp(), log_ph.exp()
    g = grad_kl.to(acc).unsqueeze(-1) / temperature
    d = kl.to(acc).unsqueeze(-1)
    if reverse:
        grad_current = (g * pt * (log_pt - log_ph - d)).sum(0)
        grad_snapshots = g * (ph - pt)
    else:
        grad_current = (g * (pt - ph)).sum(0)
        grad_snapshots = g * ph * (log_ph - log_pt - d)
    return grad_current.to(current.dtype), grad_snapshots.to(snapshots.dtype)


def pgd_step_reference(x: torch.Tensor, grad: torch.Tensor, x0: torch.Tensor, active, step: float, eps: float,
                       lo: float, hi: float, descent: bool) -> None:
    """In place: ``x <- clip_[lo,hi](clip_[x0-eps, x0+eps](x -/+ step * sign(grad)))``.

    x, grad, x0 [B, ...]; active [B] bool or None; rows with active False are unchanged.
    Descent subtracts (the DSC correction), ascent adds (an attack).  Non-finite values follow
    torch: a NaN in x or x0 propagates (torch.maximum/minimum, clamp), sign(NaN) = 0.
    """
    s = torch.sign(grad)
    new = x - step * s if descent else x + step * s
    new = torch.minimum(torch.maximum(new, x0 - eps), x0 + eps)
    new = new.clamp(lo, hi)
    if active is not None:
        new = torch.where(active.view((-1,) + (1,) * (x.dim() - 1)), new, x)
    x.copy_(new)
