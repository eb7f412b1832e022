"""Historical models ("snapshots") whose logits are computed together.

A :class:`SnapshotSet` holds K >= 1 copies of one architecture: fixed
burn-in epochs and/or *ring* slots that follow the online model with a lag
of N steps.  ``logits(x)`` returns ``[K, B, C]`` for the discrepancy op.

How the K forwards run is a measured choice (bench/NOTES.md, "K snapshot
forwards"): on CUDA the parameters are stacked (``torch.func.stack_module_state``)
and the forward is vmapped over K, one batched call instead of K launches per
layer; on CPU a plain loop over the K networks measured faster, so
``vmap="auto"`` picks by device.

Snapshots of a transfer victim (:class:`memdisc.training.victim.TransferVictim`) share its
frozen backbone (:func:`memdisc.training.victim.frozen_copy`): K snapshots hold K heads, the
ring history records heads only, and when every slot has that one backbone the features are
computed once per batch and only the K heads run (looped or vmapped).
"""
from __future__ import annotations

import collections
import copy

import torch
from torch import nn
from torch.func import functional_call, stack_module_state

from memdisc.ops import discrepancy
from memdisc.training.victim import TransferVictim, frozen_copy, trained_module


def _shared_backbone(models: list[nn.Module]) -> nn.Module | None:
    """The one backbone every model is a :class:`TransferVictim` of, or None."""
    if models and all(isinstance(m, TransferVictim) and m.backbone is models[0].backbone for m in models):
        return models[0].backbone
    return None


class SnapshotSet:
    """K frozen historical networks, all in eval mode.

    Args:
        models: the fixed snapshots (e.g. burn-in epochs), same architecture; copied
            (:func:`~memdisc.training.victim.frozen_copy`: a transfer victim's backbone is shared).
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
        self._fixed = [frozen_copy(m) for m in models]
        self._ring_models: list[nn.Module] = []
        self._history: collections.deque = collections.deque(maxlen=max(self.ring_lags, default=0) + 1)
        self._stacked = None
        self._backbone = _shared_backbone(self._fixed)

    def __len__(self) -> int:
        return len(self._fixed) + len(self.ring_lags)

    @property
    def models(self) -> list[nn.Module]:
        """The K networks in slot order (fixed first, then ring slots)."""
        return self._fixed + self._ring_models

    def _nets(self) -> list[nn.Module]:
        """What runs per slot on the forward's input: the heads over the shared backbone's features
        when there is one, else the K networks on x."""
        return self.models if self._backbone is None else [m.head for m in self.models]

    def observe(self, model: nn.Module) -> None:
        """Record the online model's current state (call once per online step, before the update);
        of a transfer victim only the head's (:func:`~memdisc.training.victim.trained_module`)."""
        if not self.ring_lags:
            return
        self._history.append({k: v.detach().clone() for k, v in trained_module(model).state_dict().items()})
        if not self._ring_models:
            self._ring_models = [frozen_copy(model) for _ in self.ring_lags]
            self._backbone = _shared_backbone(self.models)
        with torch.no_grad():
            for net, lag in zip(self._ring_models, self.ring_lags):
                state = self._history[max(0, len(self._history) - 1 - lag)]
                for name, t in trained_module(net).state_dict().items():
                    t.copy_(state[name])
            self._refresh_stack()

    def _refresh_stack(self) -> None:
        """Copy the ring slots into the stacked tensors of the vmapped forward, in place: no
        re-stacking of K networks per step, and the storage a captured CUDA graph reads stays put."""
        if self._stacked is None:
            return
        params, buffers, _ = self._stacked
        first = len(self._fixed)
        for j, net in enumerate(self._nets()[first:]):
            for name, t in net.named_parameters():
                params[name][first + j].copy_(t)
            for name, t in net.named_buffers():
                buffers[name][first + j].copy_(t)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the snapshot forward reads, each once (the networks', a shared backbone's
        once, and the stacked copies once built)."""
        out = list({id(t): t for m in self.models for t in (*m.parameters(), *m.buffers())}.values())
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
            nets = self._nets()
            params, buffers = stack_module_state(nets)
            base = copy.deepcopy(nets[0]).to("meta")

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
        if len(self.models) != len(self):
            raise RuntimeError("SnapshotSet: ring slots are empty; call observe(model) before logits()")
        inputs = x if self._backbone is None else self._backbone.features(x)
        if not self._uses_vmap(x):
            return torch.stack([net(inputs) for net in self._nets()])
        params, buffers, fn = self._stack()
        return fn(params, buffers, inputs)

    def discrepancy(self, current_logits: torch.Tensor, x: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Per-sample MD of every snapshot: ``[K, B]`` = KL(p_snapshot(x) || softmax(current_logits / T))."""
        snap = self.logits(x)
        if snap.shape[-1] != current_logits.shape[-1]:
            raise ValueError(f"snapshots: the snapshots have {snap.shape[-1]} classes but the current model has "
                             f"{current_logits.shape[-1]}")
        return discrepancy(current_logits, snap.to(current_logits.dtype), temperature)
