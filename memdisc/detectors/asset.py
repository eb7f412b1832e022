"""ASSET (Pan, Zeng, Lyu, Lin, Jia, "ASSET: Robust Backdoor Data Detection Across a Multiplicity of
Deep Learning Paradigms", USENIX Security 2023): "asset", as its public notebook does it
(reds-lab/ASSET, ASSET_demo.ipynb cell 8 and new_poi_util.py).

``fit`` stores the clean base set (the notebook: 1,000 held-out rows, 100 per class).  ``score``
trains an *offset* model, a re-initialised copy of the model under test (:func:`offset_model`), for
``epochs`` passes over the scored set in shuffled batches of ``batch_size``; for each batch ``B``:

(a) a random base batch ``Q`` of ``min(batch_size, n_base)`` rows (without replacement); one Adam step
    (``lr``) on the offset model ``g`` minimising :func:`output_variance` ``mean_{q in Q} var_k g(x_q)_k``
    (unbiased variance over the C logits): flat outputs on clean data;
(b) a fresh "Vnet" (:func:`make_vnet`: D -> 128 -> 128 -> 1, ReLU, sigmoid) fitted for ``vnet_steps``
    iterations (:func:`fit_vnet`), each one Adam step (``vnet_lr``) towards output 1 on ``B``'s features
    and one (a second Adam, same rate) towards 0 on ``Q``'s (mean squared error), the features being the
    suspect model's penultimate ``features(x)``; rows unlike the clean base set come out near 1;
(c) the rows of ``B`` whose Vnet output has adjusted outlyingness (:mod:`memdisc.detectors.outlyingness`)
    above ``cutoff`` get one step of a second Adam optimiser of the offset model (``lr``) *maximising*
    its mean cross-entropy on them (no step when there are none).

Score = the offset model's per-sample cross-entropy ``CE(g(x_i), y_i)`` in eval mode; flag =
``scores >= asset_threshold(scores)`` (:func:`~memdisc.detectors.thresholds.asset_threshold`, the
notebook's ``get_t`` with eps 1e-6).  Every random draw (re-initialisation, shuffles, base batches,
Vnet initialisations, dropout) comes from ``seed``; the global RNG is restored afterwards.

Departures from the notebook, and why:

* Vnet features: the suspect's ``features(x)`` (the input of its head: the pooled 512 values of a
  ResNet-18) in eval mode, computed once per scored set.  The notebook cuts the suspect ResNet-18 as
  ``Sequential(*children[:-1], Flatten())``: the *un-pooled* last feature map (512 x 4 x 4 = 8,192
  values; the average pooling and the stem's ReLU are functional calls in its ``forward``, so the cut
  drops them), in train mode (BatchNorm batch statistics), recomputed in each of the 100 Vnet
  iterations.  memdisc's models define ``features`` as their penultimate representation for every
  architecture (and the transfer setting's frozen backbone), eval mode makes a row's features not
  depend on its batch-mates, and computing them once keeps ASSET seconds, not minutes, on a CPU.
* Scoring: every row in eval mode.  The notebook (``get_result``) scores the poisoned rows while the
  offset model is still in train mode, so BatchNorm normalises a batch made only of poisons with its
  own statistics (a leak of the ground truth), then switches to eval mode for the clean rows.
* The offset model: the notebook trains a fresh ResNet-18 (the line loading a warm-up checkpoint is
  commented out) and reads the suspect from a hard-coded checkpoint path on a hard-coded GPU; here the
  suspect is the model passed to ``score`` and the offset model its architecture re-initialised under
  the seed.  For a :class:`~memdisc.training.victim.TransferVictim` that re-initialises the head only
  (the frozen backbone is shared, not copied): the offset model trains what the victim's training does.
* Step (c) with no outlier: skipped.  The notebook takes the mean cross-entropy of an empty batch
  (NaN) and steps on it, which turns every parameter into NaN.
* The medcouple is memdisc's (statsmodels' exact algorithm, no statsmodels dependency); the adjusted
  outlyingness is computed in float64 on the ``[B]`` outputs (the notebook: float32, ``[B, 1]``).
* Randomness: one seed (the notebook: Python's ``random`` for base batches, a DataLoader shuffle,
  unseeded CUDA kernels).  The threshold: ``get_t`` rewritten for current numpy (``np.float`` and
  ``np.quantile(interpolation=)`` are gone) returning a float.
* The base set's labels are checked but not kept: the notebook draws them and never uses them (the
  variance objective reads none).

Under torchrun (``memdisc.runtime.distributed.process_comm``) the offset model's steps (a) and (c) are
data-parallel: every rank draws the same batches, outliers and Vnets (the same seed; the Vnet is small),
forwards its contiguous part of the rows of ``Q`` and of the pushed rows, with its loss scaled by its share
of them, and the gradients are summed over ranks before each Adam step (DDP's average, through
``Comm.sync_gradients``: a rank's part of the pushed rows may be empty); after each step rank 0's buffers
and random state go to every rank, so the next draws agree.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from memdisc.checks import check_batch, describe
from memdisc.config import check_int, check_number, check_seed
from memdisc.detectors.base import Detector, register_detector
from memdisc.detectors.model_outputs import check_labelled, features_of, logits_of
from memdisc.detectors.outlyingness import adjusted_outlyingness
from memdisc.detectors.thresholds import asset_threshold, check_scores
from memdisc.runtime.distributed import Comm, process_comm
from memdisc.training.victim import TransferVictim, trainable_parameters

__all__ = ["ASSETDetector", "output_variance", "make_vnet", "fit_vnet", "offset_model"]


def output_variance(logits: torch.Tensor) -> torch.Tensor:
    """ASSET's base-set objective: ``(1/B) sum_q var_k logits[q, k]``, the unbiased variance over the C
    outputs of each row (``torch.var(dim=1)``, as the notebook), averaged over ``logits [B, C]``; a scalar."""
    return logits.var(dim=1).mean()


def make_vnet(in_features: int, hidden: int = 128) -> nn.Sequential:
    """The notebook's Vnet (``MLP(input_size, hidden_size=128, num_layers=2)``): ``[B, D] -> [B, 1]``,
    linear(D -> hidden) - ReLU - linear(hidden -> hidden) - ReLU - linear(hidden -> 1) - sigmoid,
    PyTorch's default initialisation (from the global RNG)."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1), nn.Sigmoid())


def fit_vnet(vnet: nn.Module, suspect: torch.Tensor, base: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """Fit ``vnet`` to tell ``suspect [B, D]`` features (target 1) from ``base [Q, D]`` ones (target 0), as the
    notebook: ``steps`` iterations, each one Adam step (``lr``) on ``mean_i (vnet(s_i) - 1)^2`` and then one
    step of a second Adam (``lr``) on ``mean_q vnet(b_q)^2``.  Returns ``[B]`` its outputs on ``suspect``
    afterwards (no grad)."""
    to_one, to_zero = torch.optim.Adam(vnet.parameters(), lr=lr), torch.optim.Adam(vnet.parameters(), lr=lr)
    ones = torch.ones(suspect.shape[0], device=suspect.device)
    zeros = torch.zeros(base.shape[0], device=base.device)
    for _ in range(steps):
        for features, target, optimizer in ((suspect, ones, to_one), (base, zeros, to_zero)):
            loss = F.mse_loss(vnet(features).view(-1), target)
            vnet.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return vnet(suspect).view(-1)


def _step(module: nn.Module, parameters: list[nn.Parameter], optimizer: torch.optim.Optimizer, rows: torch.Tensor,
          mean_loss, comm: Comm) -> None:
    """One ``optimizer`` step on ``mean_loss(rows)`` (a mean over the given rows of the global batch ``rows``):
    each rank's share ``mean_loss(its rows) * n_r / n``, gradients summed over ranks, then rank 0's buffers
    and random state (a dropout forward on a shard draws per row) copied to every rank."""
    mine = comm.shard(rows)
    optimizer.zero_grad()
    if mine.numel():
        (mean_loss(mine) * (mine.numel() / rows.numel())).backward()
    comm.sync_gradients(parameters)
    optimizer.step()
    comm.sync_buffers(module)
    comm.sync_random_state(rows.device)


def offset_model(model: nn.Module, seed: int) -> nn.Module:
    """ASSET's offset model: a copy of ``model`` in which every module holding parameters that train
    (``requires_grad``) is re-initialised by its ``reset_parameters()``, drawing from ``seed`` (the global
    RNG is restored afterwards).  Buffers of other modules (e.g. input normalisation) are copied; a
    :class:`TransferVictim`'s frozen backbone is shared, not copied, so only its head is new.  ``model`` is
    not changed.

    Raises:
        ValueError: naming ``model`` when a module with trainable parameters has no ``reset_parameters``.
    """
    memo = {id(model.backbone): model.backbone} if isinstance(model, TransferVictim) else {}
    fresh = copy.deepcopy(model, memo)
    devices = sorted({p.device for p in fresh.parameters() if p.device.type == "cuda"}, key=str)
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for name, module in fresh.named_modules():
            if not any(p.requires_grad for p in module.parameters(recurse=False)):
                continue
            if not callable(getattr(module, "reset_parameters", None)):
                raise ValueError(f"model: ASSET re-initialises every layer that trains, but {name or 'the model'} "
                                 f"({type(module).__name__}) has no reset_parameters()")
            module.reset_parameters()
    return fresh


@register_detector("asset")
class ASSETDetector(Detector):
    """ASSET as the notebook runs it (module docstring).

    Args:
        snapshots: None or a SnapshotSet (unused).
        epochs: an int >= 1, passes of the offset training over the scored set (the notebook: 1).
        batch_size: an int >= 1, rows per offset-training batch, and the base batch's size at most (512).
        lr: > 0, Adam's learning rate for the offset model's two optimisers (1e-4).
        vnet_steps: an int >= 1, Vnet iterations per batch (100).
        vnet_lr: > 0, Adam's learning rate for the Vnet's two optimisers (the notebook's 1e-4, as ``lr``).
        vnet_hidden: an int >= 1, the Vnet's hidden width (128).
        cutoff: > 0, the adjusted outlyingness above which a row's loss is maximised (2).
        seed: an int in [0, 2**32), every random draw of ``score``.

    The defaults are the notebook's, for 50,000 CIFAR-10 rows and 8,192 features.  Adam moves each weight
    by about its learning rate per step whatever the gradient's scale, so a Vnet on D features changes its
    first layer's output by about ``vnet_lr * sum_j |f_j|`` per step: on 128 features the notebook's
    1e-4 learns far more slowly than on its 8,192, and fewer rows mean fewer offset steps per epoch.
    """

    def __init__(self, snapshots=None, *, epochs: int = 1, batch_size: int = 512, lr: float = 1e-4,
                 vnet_steps: int = 100, vnet_lr: float = 1e-4, vnet_hidden: int = 128, cutoff: float = 2.0,
                 seed: int = 0):
        self.check_snapshots(snapshots)
        check_int("epochs", epochs)
        check_int("batch_size", batch_size)
        check_number("lr", lr, 0.0, strict=True)
        check_int("vnet_steps", vnet_steps)
        check_number("vnet_lr", vnet_lr, 0.0, strict=True)
        check_int("vnet_hidden", vnet_hidden)
        check_number("cutoff", cutoff, 0.0, strict=True)
        check_seed("seed", seed)
        self.epochs, self.batch_size, self.lr = epochs, batch_size, float(lr)
        self.vnet_steps, self.vnet_lr, self.vnet_hidden = vnet_steps, float(vnet_lr), vnet_hidden
        self.cutoff, self.seed = float(cutoff), seed
        self.x_base: torch.Tensor | None = None

    def fit(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> "ASSETDetector":
        """Keep the clean base set ``x [N, ...]`` (N >= 1; its labels ``y [N]`` are checked, not used)."""
        check_batch("x", x, "y", y)
        if x.shape[0] == 0:
            raise ValueError(f"x: expected a clean base set of at least one row, got {describe(x)}")
        self.x_base = x.detach().clone()
        return self

    def state_dict(self) -> dict:
        return {} if self.x_base is None else {"x_base": self.x_base}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or (state and set(state) != {"x_base"}):
            keys = sorted(state) if isinstance(state, dict) else describe(state)
            raise ValueError(f"state: expected ASSET's state, {{}} or {{'x_base': the clean base set}}, got {keys}")
        if state:
            x = state["x_base"]
            if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point() or x.shape[0] == 0:
                raise ValueError(f"state: x_base must be a non-empty floating [N, ...] tensor, got {describe(x)}")
        self.x_base = state.get("x_base")

    def score(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` float32 cross-entropy of each row of ``x [N, ...]`` (labels ``y [N]``) under the offset model
        trained on this set and the base set (module docstring); ``model`` unchanged (its mode restored).

        Raises:
            ValueError: naming ``x``, ``y``, ``model``, or ``x_base`` before ``fit``.
        """
        check_labelled(x, y)
        suspect = features_of(model, x).to(x.device)
        if not isinstance(getattr(model, "head", None), nn.Linear):
            raise ValueError(f"model: expected a memdisc model with a linear head (memdisc.models), got "
                             f"{describe(model)}")
        check_labelled(x, y, model.head.out_features)
        if self.x_base is None:
            raise ValueError("x_base: ASSET has no clean base set; call fit(model, x_base, y_base) (or "
                             "load_state_dict) before score")
        x_base = self.x_base.to(x.device)
        base = features_of(model, x_base).to(x.device)
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            offset = self._train_offset(offset_model(model, self.seed), x, y, suspect, x_base, base)
        return F.cross_entropy(logits_of(offset, x), y, reduction="none")

    def _train_offset(self, offset: nn.Module, x: torch.Tensor, y: torch.Tensor, suspect: torch.Tensor,
                      x_base: torch.Tensor, base: torch.Tensor) -> nn.Module:
        """Steps (a)-(c) of the module docstring over ``epochs`` shuffled passes; returns ``offset`` trained."""
        parameters = trainable_parameters(offset)
        flatten = torch.optim.Adam(parameters, lr=self.lr)
        push = torch.optim.Adam(parameters, lr=self.lr)
        n_base = x_base.shape[0]
        comm = process_comm()
        offset.train()
        for _ in range(self.epochs):
            for rows in torch.randperm(x.shape[0]).to(x.device).split(self.batch_size):
                drawn = torch.randperm(n_base)[:min(self.batch_size, n_base)].to(x.device)
                _step(offset, parameters, flatten, drawn, lambda mine: output_variance(offset(x_base[mine])), comm)
                vnet = make_vnet(suspect.shape[1], self.vnet_hidden).to(x.device)
                outlying = adjusted_outlyingness(fit_vnet(vnet, suspect[rows], base[drawn], self.vnet_steps,
                                                          self.vnet_lr)) > self.cutoff
                pushed = rows[outlying]
                if pushed.numel():
                    _step(offset, parameters, push, pushed, lambda mine: -F.cross_entropy(offset(x[mine]), y[mine]),
                          comm)
        return offset

    def flag(self, scores: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` bool ``scores >= asset_threshold(scores)`` (the notebook's ``get_t(scores, 1e-6)``); ``y`` unused
        (checked when given).

        Raises:
            ValueError: naming ``scores`` or ``y``.
        """
        check_scores(scores, y)
        return scores.double() >= asset_threshold(scores)
