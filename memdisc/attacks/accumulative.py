"""The accumulative poisoning attack of Pang et al. (NeurIPS 2021), fast path, and its options.

ALGORITHM.md section 4.  Both crafting problems are signed steps on the alignment
objective ``J(X; D)`` of memdisc.attacks.crafting:

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

With ``poison_scale < 1`` the rows left clean stay clean during the crafting (the
``active`` mask of the PGD step).  The seed instead crafts every row and resets the
clean ones afterwards (``reset_clean_rows=True``); with C >= 2 steps that differs,
because the batch-mean loss couples the rows.  The validation gradient of the trigger
crafting is computed once per crafting (the seed recomputes it with create_graph at
every step) and, when the trigger is re-crafted every step, shared with ``G_t``.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from memdisc.attacks.base import Attack, AttackData, PoisonedBatch, register_attack
from memdisc.checks import describe
from memdisc.attacks.crafting import (MODES, TERMS, _craft, _direction, _loss, _normalized, _param_grads,
                                      crafting_state)
from memdisc.config import OptionError, check_choice, check_int, check_number, field

__all__ = ["AttackConfig", "AccumulativeAttack"]

_CLEAN_ROWS = ("per_step", "fixed")


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
        for name, options in (("terms", TERMS), ("clean_rows", _CLEAN_ROWS), ("crafting_mode", MODES)):
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



@register_attack("accumulative")
class AccumulativeAttack(Attack):
    """The attacker of the online phase: a poisoned trigger batch plus one poisoned batch per step.

    Args:
        cfg: ``AttackConfig``.
        data: ``AttackData`` with the clean trigger batch ``S_T`` (``x_trigger [B_T, ...]``,
            ``y_trigger [B_T]``) and the attacker's validation batch ``S_val`` (``x_val [N_val, ...]``,
            ``y_val [N_val]``).
        seed: integer >= 0; the rows left clean when ``poison_scale < 1`` are a function of (seed, step).

    Use: ``prepare(model)`` once (crafts the trigger batch), ``poison(model, x, y, step)`` for every
    incoming batch, ``trigger_batch(model)`` for the final trigger step.  The attack's tensors
    follow the device of the model (``prepare``) and of the incoming batch (``poison``).
    """

    kind = "online"
    config_class = AttackConfig

    def __init__(self, cfg: AttackConfig, data: AttackData, seed: int):
        super().__init__(cfg, data, seed)
        for name, what in (("trigger", "the clean trigger batch S_T"), ("val", "the validation batch S_val")):
            if getattr(data, "x_" + name) is None:
                raise ValueError(f"data: the accumulative attack needs {what} (x_{name}, y_{name}), got none")
        self.x_trigger, self.y_trigger = data.x_trigger.detach(), data.y_trigger.detach()
        self.x_val, self.y_val = data.x_val.detach(), data.y_val.detach()
        self.trigger_poisoned_mask = self.poison_mask(self.x_trigger.shape[0], None).to(self.x_trigger.device)
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

    def poison(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> PoisonedBatch:
        """Poison one incoming batch ``S_t``.

        Args:
            x: ``[B, ...]`` the clean batch (pixels in [0, 1]); y: ``[B]`` its labels.
            step: the online step index t >= 0 (keys the clean-row draw).
        Returns:
            ``PoisonedBatch(x_poisoned [B, ...], y, poisoned [B] bool)`` on x's device, the labels
            unchanged: rows with ``poisoned`` False are bit-identical to x, and
            ``|x_poisoned - x| <= eps``, ``x_poisoned`` in [0, 1].
        """
        self.check_received(x, y)
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
        return PoisonedBatch(x_poisoned, y, active)

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
            raise ValueError(f"state: x_trigger_poisoned ({describe(trig)}) does not match the trigger "
                             f"({describe(self.x_trigger)})")
        self._x_trigger_poisoned = None if trig is None else trig.to(self.x_trigger.device).clone()
