"""The accumulative poisoning attack of Pang et al. (NeurIPS 2021), fast path.

ALGORITHM.md section 4.  With per-parameter-tensor normalisation
``n(v) = v / max(||v||_2, 1e-12)`` (flattened; the ``F.normalize`` convention the
seed uses, so a zero gradient tensor contributes 0, never NaN), both crafting
problems are signed steps on one objective of an input batch ``X`` (labels ``y``):

    J(X; D) = sum_l < n(grad_theta_l CE(f(X), y)), D_l >

* **poisoned trigger**: ``D = n(grad_theta CE(S_val))``; C steps *decrease*
  ``J = A(CE(S_T'), CE(S_val))`` inside the ``trigger_eps`` ball around the clean
  trigger ``S_T`` (step ``2 * trigger_eps / C`` by default).
* **accumulative batch**: ``D = gamma * n(grad_theta CE(S_t)) + n(G_t)`` with
  ``G_t = grad_theta A(CE(P(S_T)), CE(S_val))`` (second order, create_graph);
  C steps *increase* ``J = H`` inside the ``eps`` ball around ``S_t``.
  ``terms="first"`` keeps only the gamma term, ``"second"`` only the G term.
  Note: the gamma term alone is stationary at the clean batch (every cosine is
  1, its maximum), so with ``terms="first"`` the first step follows rounding
  noise; this is the seed's ``--only_normal`` behaviour, kept as is.

Each step is ``memdisc.ops.pgd_step_`` (sign, step, L-inf projection, [0, 1]
clamp, only rows of the ``active`` mask): with ``poison_scale < 1`` the rows left
clean stay clean during the crafting.  The seed instead crafts every row and
resets the clean ones afterwards (``reset_clean_rows=True``); with C >= 2 steps
that differs, because the batch-mean loss couples the rows.  ``D`` is a
constant computed once per batch; the loop never reads a value back to the
host.  Gradients are taken w.r.t. every parameter of the model (as the seed).
``memdisc.reference.seed`` holds the plain port of the seed code these
functions are tested against.

Speed choices, measured on the 2-core CPU box (torch 2.13, one thread, forward
plus backward of the alignment of two ResNet-18-sized gradient lists, 62
tensors): one ``torch._foreach_norm`` for the norms plus one ``torch.dot`` per
tensor took 60 ms, against 250 ms for the seed's per-tensor ``F.normalize``
loop, 345 ms for an all-foreach polarisation form and 320 ms for one
concatenated vector with ``index_add`` segment sums.  The validation gradient of
the trigger crafting is computed once per crafting (the seed recomputes it with
create_graph at every step) and, when the trigger is re-crafted every step,
shared with ``G_t``.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from memdisc.config import OptionError, check_choice, check_int, check_number, field
from memdisc.ops import pgd_step_

__all__ = ["NORM_EPS", "gradient_alignment", "crafting_state", "craft_alignment", "accumulative_direction",
           "AttackConfig", "AccumulativeAttack"]

NORM_EPS = 1e-12
"""Zero-norm guard of ``n(v) = v / max(||v||, NORM_EPS)``, as ``F.normalize`` (the seed's call)."""

_TERMS = ("both", "first", "second")
_MODES = ("eval", "train")
_CLEAN_ROWS = ("per_step", "fixed")


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def _norms(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[L]`` tensor of ``max(||g_l||_2, NORM_EPS)`` (one foreach launch for all L tensors)."""
    return torch.stack(torch._foreach_norm(list(grads))).clamp_min(NORM_EPS)


def _dots(grads_a: Sequence[torch.Tensor], grads_b: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[L]`` tensor of ``<a_l, b_l>`` over flattened tensors."""
    return torch.stack([torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(grads_a, grads_b)])


def _normalized(grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[n(g_l)]``: every tensor divided by its clamped L2 norm."""
    return list(torch._foreach_div(list(grads), list(_norms(grads).unbind())))


def _check_lists(name_a: str, grads_a, name_b: str, grads_b) -> None:
    if len(grads_a) == 0 or len(grads_a) != len(grads_b):
        raise ValueError(f"{name_a}/{name_b}: expected two non-empty sequences of equal length, got "
                         f"{len(grads_a)} and {len(grads_b)} tensors")
    for i, (a, b) in enumerate(zip(grads_a, grads_b)):
        if a.shape != b.shape:
            raise ValueError(f"{name_b}[{i}]: expected shape {tuple(a.shape)} to match {name_a}[{i}], "
                             f"got {tuple(b.shape)}")


def gradient_alignment(grads_a: Sequence[torch.Tensor], grads_b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over parameter tensors of the cosine of two gradients.

    ``A = sum_l <a_l, b_l> / (max(||a_l||, eps) * max(||b_l||, eps)) = sum_l <n(a_l), n(b_l)>``
    with eps = ``NORM_EPS``; a zero tensor contributes 0.

    Args:
        grads_a, grads_b: equal-length sequences of tensors, ``grads_b[l]`` of the shape of
            ``grads_a[l]`` (e.g. the per-parameter gradients of two losses).
    Returns:
        0-dim tensor, differentiable w.r.t. both lists (usable under create_graph).
    """
    grads_a, grads_b = list(grads_a), list(grads_b)
    _check_lists("grads_a", grads_a, "grads_b", grads_b)
    return (_dots(grads_a, grads_b) / (_norms(grads_a) * _norms(grads_b))).sum()


@contextlib.contextmanager
def crafting_state(model: nn.Module, mode: str = "eval") -> Iterator[list[nn.Parameter]]:
    """Put ``model`` in crafting state for the block and restore it afterwards.

    Inside: every module in ``mode`` ("eval" or "train") and every parameter with
    ``requires_grad=True``.  On exit every module's training flag and every
    parameter's requires_grad flag are restored; with ``mode="train"`` the buffers
    (BatchNorm running statistics) are restored too, so crafting never changes the
    victim.  Yields ``list(model.parameters())``.  Crafting takes gradients with
    ``torch.autograd.grad``, so the parameters' ``.grad`` is never written.
    """
    if mode not in _MODES:
        raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
    params = list(model.parameters())
    if not params:
        raise ValueError("model: expected a module with parameters")
    flags = [(m, m.training) for m in model.modules()]
    needs_grad = [p.requires_grad for p in params]
    saved = [(b, b.detach().clone()) for b in model.buffers()] if mode == "train" else []
    try:
        model.train(mode == "train")
        for p in params:
            p.requires_grad_(True)
        yield params
    finally:
        for m, training in flags:
            m.training = training
        for p, flag in zip(params, needs_grad):
            p.requires_grad_(flag)
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def _param_grads(loss: torch.Tensor, params: list[torch.Tensor], create_graph: bool) -> list[torch.Tensor]:
    """``grad_theta loss`` for every parameter (zeros where the loss does not use one)."""
    return list(torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True,
                                    materialize_grads=True))


def _craft(model: nn.Module, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
           direction: list[torch.Tensor], *, eps: float, steps: int, step_size: float, ascent: bool,
           active: torch.Tensor | None) -> torch.Tensor:
    """The crafting loop of ``craft_alignment``; ``model`` already in crafting state."""
    x0 = x.detach().contiguous()
    xp = x0.clone().requires_grad_(True)
    for _ in range(steps):
        grads = _param_grads(_loss(model, xp, y), params, True)
        objective = (_dots(grads, direction) / _norms(grads)).sum()
        (gx,) = torch.autograd.grad(objective, xp)
        with torch.no_grad():
            pgd_step_(xp, gx, x0, step=step_size, eps=eps, active=active, descent=not ascent)
    return xp.detach()


def craft_alignment(model: nn.Module, x: torch.Tensor, y: torch.Tensor, direction: Sequence[torch.Tensor], *,
                    eps: float, steps: int, step_size: float, ascent: bool, active: torch.Tensor | None = None,
                    mode: str = "eval") -> torch.Tensor:
    """Signed steps on ``J(X) = sum_l <n(grad_theta_l CE(f(X), y)), D_l>``.

    ``steps`` times ``X <- clip_[0,1](Pi_eps(X +/- step_size * sign(grad_X J); x))``,
    ``+`` when ``ascent``, only on the rows where ``active`` is True.

    Args:
        x: ``[B, ...]`` pixels in [0, 1]; y: ``[B]`` class indices.
        direction: one constant tensor ``D_l`` per parameter, in ``model.parameters()`` order.
        active: optional ``[B]`` bool on x's device; rows with False come back bit-identical.
        mode: the model's mode while crafting ("eval" as the seed, or "train").
    Returns:
        ``[B, ...]`` the crafted batch (detached): ``|X - x| <= eps`` and ``X`` in [0, 1].
    """
    _check_batch("x", x, "y", y)
    with crafting_state(model, mode) as params:
        direction = list(direction)
        _check_lists("model.parameters()", params, "direction", direction)
        return _craft(model, params, x, y, direction, eps=eps, steps=steps, step_size=step_size,
                      ascent=ascent, active=active)


def _direction(model: nn.Module, params: list[torch.Tensor], x, y, x_val, y_val,
               trigger: Callable[[list[torch.Tensor]], tuple[torch.Tensor, torch.Tensor]], *,
               gamma: float, terms: str) -> list[torch.Tensor]:
    """``D`` of H (model in crafting state); ``trigger(grad CE(S_val))`` gives ``(P(S_T), y_T)``."""
    parts = []
    if terms in ("both", "first"):
        parts.append(torch._foreach_mul(_normalized(_param_grads(_loss(model, x, y), params, False)), gamma))
    if terms in ("both", "second"):
        g_val = _param_grads(_loss(model, x_val, y_val), params, True)
        x_trig, y_trig = trigger([g.detach() for g in g_val])
        g_trig = _param_grads(_loss(model, x_trig, y_trig), params, True)
        parts.append(_normalized(_param_grads(gradient_alignment(g_trig, g_val), params, False)))
    direction = parts[0] if len(parts) == 1 else torch._foreach_add(parts[0], parts[1])
    return [d.detach() for d in direction]


def accumulative_direction(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_trigger: torch.Tensor,
                           y_trigger: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, *,
                           gamma: float = 1.0, terms: str = "both", mode: str = "eval") -> list[torch.Tensor]:
    """The constant direction ``D`` of the accumulative objective H, one tensor per parameter.

    ``D_l = gamma * n(grad_theta_l CE(x, y)) + n(G_l)``, ``G = grad_theta A(CE(x_trigger), CE(x_val))``;
    ``terms="first"`` keeps only the gamma term, ``"second"`` only the G term.
    x: ``[B, ...]`` the clean incoming batch; x_trigger: the (poisoned) trigger batch;
    x_val: the attacker's validation batch; labels are ``[N]`` class indices.
    """
    if terms not in _TERMS:
        raise ValueError(f"terms: expected one of {_TERMS}, got {terms!r}")
    _check_batch("x", x, "y", y)
    _check_batch("x_trigger", x_trigger, "y_trigger", y_trigger)
    _check_batch("x_val", x_val, "y_val", y_val)
    with crafting_state(model, mode) as params:
        return _direction(model, params, x, y, x_val, y_val, lambda _: (x_trigger, y_trigger), gamma=gamma,
                          terms=terms)


@dataclasses.dataclass
class AttackConfig:
    """Options of the accumulative attack (seed defaults: eps 0.2, C = 2, alpha = 0.2, gamma 1, eval mode)."""

    eps: float = field(0.2, "L-inf radius of the accumulative poison")
    steps: int = field(2, "signed steps C per accumulative batch")
    step_size: float | None = field(None, "accumulative step size alpha (None: 2 * eps / steps, the seed's rule)")
    trigger_eps: float | None = field(None, "L-inf radius of the poisoned trigger (None: eps)")
    trigger_steps: int | None = field(None, "signed steps of the trigger crafting (None: steps)")
    trigger_step_size: float | None = field(None, "trigger step size (None: 2 * trigger_eps / trigger_steps)")
    gamma: float = field(1.0, "weight of the clean-gradient term of H")
    terms: str = field("both", "terms of H: both, first (gamma term only) or second (G_t term only)")
    poison_scale: float = field(1.0, "poisoned fraction of each batch: B - int(poison_scale * B) rows stay "
                                      "clean (the seed's rule)")
    clean_rows: str = field("per_step", "which rows stay clean: per_step (drawn from (seed, step)) or fixed "
                                         "(one draw for every batch and the trigger, as the seed code)")
    reset_clean_rows: bool = field(False, "seed behaviour: craft every row, then reset the clean rows "
                                           "(False: the clean rows are held fixed while crafting)")
    recraft_trigger: bool = field(False, "re-craft the poisoned trigger from the clean one at every step")
    crafting_mode: str = field("eval", "model mode while crafting: eval (seed) or train")

    def __post_init__(self):
        """Radii in [0, 1] (pixels are in [0, 1]), step sizes > 0, step counts >= 1, all finite."""
        check_number("eps", self.eps, 0.0, 1.0)
        check_int("steps", self.steps)
        if self.step_size is not None:
            check_number("step_size", self.step_size, 0.0, strict=True)
        if self.trigger_eps is not None:
            check_number("trigger_eps", self.trigger_eps, 0.0, 1.0)
        if self.trigger_steps is not None:
            check_int("trigger_steps", self.trigger_steps)
        if self.trigger_step_size is not None:
            check_number("trigger_step_size", self.trigger_step_size, 0.0, strict=True)
        check_number("gamma", self.gamma)
        check_number("poison_scale", self.poison_scale, 0.0, 1.0)
        for name, options in (("terms", _TERMS), ("clean_rows", _CLEAN_ROWS), ("crafting_mode", _MODES)):
            check_choice(name, getattr(self, name), options)
        for name in ("reset_clean_rows", "recraft_trigger"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(name, f"expected a bool, got {getattr(self, name)!r}")

    def poison_schedule(self) -> tuple[float, int, float]:
        """``(eps, steps, step_size)`` of the accumulative poison, the None default resolved."""
        step_size = 2.0 * self.eps / self.steps if self.step_size is None else self.step_size
        return self.eps, self.steps, step_size

    def trigger_schedule(self) -> tuple[float, int, float]:
        """``(eps, steps, step_size)`` of the trigger crafting, the None defaults resolved."""
        eps = self.eps if self.trigger_eps is None else self.trigger_eps
        steps = self.steps if self.trigger_steps is None else self.trigger_steps
        step_size = 2.0 * eps / steps if self.trigger_step_size is None else self.trigger_step_size
        return eps, steps, step_size


def _check_batch(name_x: str, x, name_y: str, y) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"{name_x}: expected a floating [N, ...] tensor of pixels in [0, 1], got {_describe(x)}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0] \
            or y.dtype not in (torch.int64, torch.int32) or y.device != x.device:
        raise ValueError(f"{name_y}: expected an integer [{x.shape[0]}] tensor of class indices on {x.device}, "
                         f"got {_describe(y)}")


class AccumulativeAttack:
    """The attacker of the online phase: a poisoned trigger plus one poisoned batch per step.

    Args:
        cfg: ``AttackConfig``.
        x_trigger, y_trigger: ``[B_T, ...]`` / ``[B_T]`` the clean trigger batch ``S_T``.
        x_val, y_val: ``[N_val, ...]`` / ``[N_val]`` the attacker's validation batch ``S_val``.
        seed: integer >= 0; the rows left clean when ``poison_scale < 1`` are a function of (seed, step).

    Use: ``prepare(model)`` once (crafts the trigger), ``poison(model, x, y, step)`` for every
    incoming batch, ``trigger_batch(model)`` for the final trigger step.  The attack's tensors
    follow the device of the model (``prepare``) and of the incoming batch (``poison``).
    """

    def __init__(self, cfg: AttackConfig, x_trigger: torch.Tensor, y_trigger: torch.Tensor, x_val: torch.Tensor,
                 y_val: torch.Tensor, seed: int):
        if not isinstance(cfg, AttackConfig):
            raise ValueError(f"cfg: expected an AttackConfig, got {type(cfg).__name__}")
        _check_batch("x_trigger", x_trigger, "y_trigger", y_trigger)
        _check_batch("x_val", x_val, "y_val", y_val)
        if x_val.shape[1:] != x_trigger.shape[1:] or x_val.dtype != x_trigger.dtype \
                or x_val.device != x_trigger.device:
            raise ValueError(f"x_val: expected samples like x_trigger's ({x_trigger.dtype}, "
                             f"{tuple(x_trigger.shape[1:])}, {x_trigger.device}), got {_describe(x_val)} "
                             f"on {x_val.device}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
        self.cfg = cfg
        self.seed = seed
        self.x_trigger, self.y_trigger = x_trigger.detach(), y_trigger.detach()
        self.x_val, self.y_val = x_val.detach(), y_val.detach()
        self.trigger_poisoned_mask = self.poison_mask(x_trigger.shape[0], None).to(x_trigger.device)
        self._x_trigger_poisoned: torch.Tensor | None = None

    def poison_mask(self, batch_size: int, step: int | None) -> torch.Tensor:
        """``[batch_size]`` bool on the CPU: True for the rows the attacker perturbs.

        Exactly ``batch_size - int(poison_scale * batch_size)`` rows are False (the seed's
        ``normal_num``), drawn by a
        generator seeded with ``(seed, step)`` for ``clean_rows="per_step"`` (``step=None``
        is the trigger's own draw), or with ``seed`` alone for ``"fixed"`` (the same
        positions in every batch and in the trigger, as the seed's ``normal_indices``).
        """
        n_clean = batch_size - int(self.cfg.poison_scale * batch_size)
        mask = torch.ones(batch_size, dtype=torch.bool)
        if n_clean == 0:
            return mask
        if self.cfg.clean_rows == "fixed":
            key = [self.seed, 0]
        else:
            key = [self.seed, 1] if step is None else [self.seed, 2, step]
        state = int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0]) & (2 ** 63 - 1)
        mask[torch.randperm(batch_size, generator=torch.Generator().manual_seed(state))[:n_clean]] = False
        return mask

    def _to(self, device: torch.device) -> None:
        """Keep the attack's tensors on ``device`` (a no-op once they are there)."""
        if self.x_trigger.device != device:
            for name in ("x_trigger", "y_trigger", "x_val", "y_val", "trigger_poisoned_mask", "_x_trigger_poisoned"):
                value = getattr(self, name)
                if value is not None:
                    setattr(self, name, value.to(device))

    def _craft_trigger(self, model: nn.Module, params: list[torch.Tensor],
                       g_val: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Poisoned trigger from the clean one (model in crafting state); ``g_val`` is reused when given."""
        eps, steps, step_size = self.cfg.trigger_schedule()
        if g_val is None:
            g_val = _param_grads(_loss(model, self.x_val, self.y_val), params, False)
        return self._masked_craft(model, params, self.x_trigger, self.y_trigger,
                                  [d.detach() for d in _normalized(g_val)], self.trigger_poisoned_mask,
                                  eps=eps, steps=steps, step_size=step_size, ascent=False)

    def _masked_craft(self, model, params, x, y, direction, active, **schedule) -> torch.Tensor:
        """``_craft`` honouring ``reset_clean_rows``: rows where ``active`` is False end up clean."""
        if not self.cfg.reset_clean_rows:
            return _craft(model, params, x, y, direction, active=active, **schedule)
        crafted = _craft(model, params, x, y, direction, active=None, **schedule)
        return torch.where(active.view((-1,) + (1,) * (x.dim() - 1)), crafted, x)

    def prepare(self, model: nn.Module) -> None:
        """Craft the poisoned trigger from the clean trigger with the current ``model``."""
        with crafting_state(model, self.cfg.crafting_mode) as params:
            self._to(params[0].device)
            self._x_trigger_poisoned = self._craft_trigger(model, params)

    def _require_prepared(self) -> None:
        if self._x_trigger_poisoned is None:
            raise RuntimeError("AccumulativeAttack: call prepare(model) or load_state_dict() first")

    def trigger_batch(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x [B_T, ...], y [B_T])``: the poisoned trigger, re-crafted with ``model`` if ``recraft_trigger``.

        Rows where ``trigger_poisoned_mask`` is False are the clean trigger's.
        """
        self._require_prepared()
        if self.cfg.recraft_trigger:
            self.prepare(model)
        return self._x_trigger_poisoned.clone(), self.y_trigger.clone()

    def _trigger_for_step(self, model, params):
        def trigger(g_val: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            if self.cfg.recraft_trigger:
                self._x_trigger_poisoned = self._craft_trigger(model, params, g_val)
            return self._x_trigger_poisoned, self.y_trigger
        return trigger

    def poison(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Poison one incoming batch ``S_t``.

        Args:
            x: ``[B, ...]`` the clean batch (pixels in [0, 1]); y: ``[B]`` its labels.
            step: the online step index t >= 0 (keys the clean-row draw).
        Returns:
            ``(x_poisoned [B, ...], poisoned [B] bool)`` on x's device: rows with ``poisoned``
            False are bit-identical to x, and ``|x_poisoned - x| <= eps``, ``x_poisoned`` in [0, 1].
        """
        _check_batch("x", x, "y", y)
        if x.shape[1:] != self.x_trigger.shape[1:] or x.dtype != self.x_trigger.dtype:
            raise ValueError(f"x: expected samples like the trigger's ({self.x_trigger.dtype}, "
                             f"{tuple(self.x_trigger.shape[1:])}), got {_describe(x)}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step: expected an integer >= 0, got {step!r}")
        self._require_prepared()
        self._to(x.device)
        active = self.poison_mask(x.shape[0], step).to(x.device)
        cfg = self.cfg
        with crafting_state(model, cfg.crafting_mode) as params:
            direction = _direction(model, params, x, y, self.x_val, self.y_val, self._trigger_for_step(model, params),
                                   gamma=cfg.gamma, terms=cfg.terms)
            eps, steps, step_size = cfg.poison_schedule()
            x_poisoned = self._masked_craft(model, params, x, y, direction, active, eps=eps, steps=steps,
                                            step_size=step_size, ascent=True)
        return x_poisoned, active

    def state_dict(self) -> dict:
        """What an interrupted run needs to resume exactly: the config, the seed and the crafted trigger."""
        trig = self._x_trigger_poisoned
        return {"config": dataclasses.asdict(self.cfg), "seed": self.seed,
                "x_trigger_poisoned": None if trig is None else trig.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``; its config and seed must equal this attack's (ValueError otherwise)."""
        if not isinstance(state, dict) or not {"config", "seed", "x_trigger_poisoned"} <= state.keys():
            raise ValueError("state: expected a dict from AccumulativeAttack.state_dict()")
        if state["config"] != dataclasses.asdict(self.cfg):
            raise ValueError(f"state: its config {state['config']} differs from this attack's "
                             f"{dataclasses.asdict(self.cfg)}")
        if state["seed"] != self.seed:
            raise ValueError(f"state: its seed {state['seed']} differs from this attack's {self.seed}")
        trig = state["x_trigger_poisoned"]
        if trig is not None and (trig.shape != self.x_trigger.shape or trig.dtype != self.x_trigger.dtype):
            raise ValueError(f"state: x_trigger_poisoned ({_describe(trig)}) does not match the trigger "
                             f"({_describe(self.x_trigger)})")
        self._x_trigger_poisoned = None if trig is None else trig.to(self.x_trigger.device).clone()
