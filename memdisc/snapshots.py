"""Historical models ("snapshots") whose logits are computed together.

A :class:`SnapshotSet` holds K >= 1 copies of one architecture: fixed
burn-in epochs and/or *ring* slots that follow the online model with a lag
of N steps.  ``logits(x)`` returns ``[K, B, C]`` for the discrepancy op.

How the K forwards run is a measured choice (bench/NOTES.md, "K snapshot
forwards"): on CUDA the parameters are stacked (``torch.func.stack_module_state``)
and the forward is vmapped over K, one batched call instead of K launches per
layer; on CPU a plain loop over the K networks measured faster, so
``vmap="auto"`` picks by device.
"""
from __future__ import annotations

import collections
import copy

import torch
from torch import nn
from torch.func import functional_call, stack_module_state

from memdisc.ops import discrepancy


class SnapshotSet:
    """K frozen historical networks, all in eval mode.

    Args:
        models: the fixed snapshots (e.g. burn-in epochs), same architecture.
        ring_lags: for each lag N in this list, one more slot that holds the
            online model as it was N calls of :meth:`observe` ago (until N
            observations exist it holds the oldest one seen).
        vmap: True, False, or "auto" (vmap on CUDA, a loop on CPU).
    """

    def __init__(self, models: list[nn.Module], ring_lags: tuple[int, ...] = (), vmap: str | bool = "auto"):
        if not models and not ring_lags:
            raise ValueError("models: a SnapshotSet needs at least one fixed snapshot or one ring lag")
        if any(int(n) < 1 for n in ring_lags):
            raise ValueError(f"ring_lags: expected lags >= 1, got {list(ring_lags)}")
        if vmap not in (True, False, "auto"):
            raise ValueError(f"vmap: expected True, False or 'auto', got {vmap!r}")
        self.ring_lags = tuple(int(n) for n in ring_lags)
        self.vmap = vmap
        self._fixed = [copy.deepcopy(m).eval().requires_grad_(False) for m in models]
        self._ring_models: list[nn.Module] = []
        self._history: collections.deque = collections.deque(maxlen=max(self.ring_lags, default=0) + 1)
        self._stacked = None

    def __len__(self) -> int:
        return len(self._fixed) + len(self.ring_lags)

    @property
    def models(self) -> list[nn.Module]:
        """The K networks in slot order (fixed first, then ring slots)."""
        return self._fixed + self._ring_models

    def observe(self, model: nn.Module) -> None:
        """Record the online model's current state (call once per online step, before the update)."""
        if not self.ring_lags:
            return
        self._history.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        if not self._ring_models:
            self._ring_models = [copy.deepcopy(model).eval().requires_grad_(False) for _ in self.ring_lags]
        with torch.no_grad():
            for net, lag in zip(self._ring_models, self.ring_lags):
                state = self._history[max(0, len(self._history) - 1 - lag)]
                for name, t in net.state_dict().items():
                    t.copy_(state[name])
            self._refresh_stack()

    def _refresh_stack(self) -> None:
        """Copy the ring slots into the stacked tensors of the vmapped forward, in place: no
        re-stacking of K networks per step, and the storage a captured CUDA graph reads stays put."""
        if self._stacked is None:
            return
        params, buffers, _ = self._stacked
        first = len(self._fixed)
        for j, net in enumerate(self._ring_models):
            for name, t in net.named_parameters():
                params[name][first + j].copy_(t)
            for name, t in net.named_buffers():
                buffers[name][first + j].copy_(t)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the snapshot forward reads (the networks', and the stacked copies once built)."""
        out = [t for m in self.models for t in (*m.parameters(), *m.buffers())]
        if self._stacked is not None:
            out += [*self._stacked[0].values(), *self._stacked[1].values()]
        return out

    def state_dict(self) -> dict:
        """The ring history (fixed snapshots are rebuilt from their files)."""
        return {"history": list(self._history)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the ring history; the ring slots are refreshed by the next :meth:`observe`."""
        self._history.clear()
        self._history.extend(state["history"])
        self._stacked = None

    def to(self, device) -> "SnapshotSet":
        self._fixed = [m.to(device) for m in self._fixed]
        self._ring_models = [m.to(device) for m in self._ring_models]
        self._stacked = None
        return self

    def _stack(self):
        if self._stacked is None:
            models = self.models
            params, buffers = stack_module_state(models)
            base = copy.deepcopy(models[0]).to("meta")

            def one(p, b, x):
                return functional_call(base, (p, b), (x,))
            self._stacked = (params, buffers, torch.vmap(one, in_dims=(0, 0, None)))
        return self._stacked

    def _uses_vmap(self, x: torch.Tensor) -> bool:
        return len(self) > 1 and (self.vmap if self.vmap != "auto" else x.device.type == "cuda")

    def prepare(self, x: torch.Tensor) -> None:
        """Build now, on the current stream, what the forward on batches like x builds lazily (the
        stacked weights of the vmapped forward); needed before a CUDA-graph capture."""
        if len(self.models) == len(self) and self._uses_vmap(x):
            self._stack()

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every snapshot on ``x`` [B, ...]: ``[K, B, C]`` (no grad)."""
        models = self.models
        if len(models) != len(self):
            raise RuntimeError("SnapshotSet: ring slots are empty; call observe(model) before logits()")
        if not self._uses_vmap(x):
            return torch.stack([m(x) for m in models])
        params, buffers, fn = self._stack()
        return fn(params, buffers, x)

    def discrepancy(self, current_logits: torch.Tensor, x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Per-sample MD of every snapshot: ``[K, B]`` = KL(p_snapshot(x) || softmax(current_logits / T))."""
        snap = self.logits(x)
        if snap.shape[-1] != current_logits.shape[-1]:
            raise ValueError(f"snapshots: the snapshots have {snap.shape[-1]} classes but the current model has "
                             f"{current_logits.shape[-1]}")
        return discrepancy(current_logits, snap.to(current_logits.dtype), temperature)
