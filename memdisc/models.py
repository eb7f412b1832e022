"""Model definitions and a registry by name.

Every model takes images in [0, 1] of shape [B, C, H, W] and normalises them
inside (per-channel ``(x - mean) / std`` buffers), so attacks and defences
work in pixel space.  Outputs are logits [B, num_classes].

memdisc's own models ("cnn", "resnet18") and the vulnerability study seed's
("seed-mlp", "seed-cnn": :class:`SeedMLP`, :class:`SeedCNN`) need nothing beyond torch.  The
``tv-*`` victims (:data:`ZOO`) are torchvision.models classifiers, built only
when torchvision is importable, never downloaded: their weights come from a
file the user names (:func:`load_weights`).

Every model computes ``forward(x) == head(features(x))``, bit for bit: ``features(x)`` ->
``[B, D]`` is the penultimate representation (the input of the final linear layer) and
``head`` that final ``nn.Linear(D, num_classes)`` (:func:`classifier_head`), so detectors,
linear probes and the transfer setting (:class:`memdisc.training.victim.TransferVictim`)
work on any model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from memdisc.config import OptionError


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` with the statistics stored as buffers."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        return nn.GroupNorm(min(32, channels), channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm: expected 'bn', 'gn' or 'none', got {norm!r}")


class SmallCNN(nn.Module):
    """Two conv blocks and two linear layers; the default for 28x28 inputs.

    ``body``: conv3x3(in->w) - norm - ReLU - maxpool2 - conv3x3(w->2w) - norm - ReLU - maxpool2;
    ``embed``: flatten - linear(2w*(H/4)*(W/4) -> hidden) - ReLU, giving the features [B, hidden];
    ``head``: linear(hidden -> classes).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, norm: str = "none",
                 width: int = 16, hidden: int = 128, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None):
        super().__init__()
        self.normalize = Normalize(mean or [0.5] * in_channels, std or [0.5] * in_channels)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=norm == "none"), _norm_layer(norm, width),
            nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=norm == "none"), _norm_layer(norm, 2 * width),
            nn.ReLU(inplace=True), nn.MaxPool2d(2))
        side = image_size // 4
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * side * side, hidden), nn.ReLU(inplace=True))
        self.head = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] in [0, 1] -> the penultimate representation [B, hidden]."""
        return self.embed(self.body(self.normalize(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    # Files written before the models had features()/head (burn-in snapshots, online state) name
    # ``body`` "features" and ``embed`` + ``head`` "classifier" (indices 0-2, 3); their keys are
    # renamed on load, so those runs load unchanged.
    _RENAMED = (("features.", "body."), ("classifier.1.", "embed.1."), ("classifier.3.", "head."))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for old, new in self._RENAMED:
            for key in [k for k in state_dict if k.startswith(prefix + old)]:
                state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with a projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.n1 = _norm_layer(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.n2 = _norm_layer(norm, cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _norm_layer(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.n1(self.conv1(x)))
        out = self.n2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """The seed's CIFAR ResNet-18: 3x3 stride-1 stem, four stages of two basic blocks
    (64, 128, 256, 512 channels), global average pooling (the features [B, 512]), linear head."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, norm: str = "bn",
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        del image_size  # global pooling makes the network size-agnostic
        self.normalize = Normalize(mean or [0.5] * in_channels, std or [0.5] * in_channels)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False),
                                  _norm_layer(norm, 64), nn.ReLU(inplace=True))
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride, norm), BasicBlock(cout, cout, 1, norm)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(512, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] in [0, 1] -> the globally pooled last stage [B, 512]."""
        return F.adaptive_avg_pool2d(self.layers(self.stem(self.normalize(x))), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _keras_init(module: nn.Module) -> nn.Module:
    """Keras' default initialisation, in place: glorot-uniform weights (PyTorch's ``xavier_uniform_``,
    the same fans for convolutions) and zero biases for every Linear and Conv2d; returns ``module``."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return module


def _check_no_norm(model: str, norm: str) -> None:
    if norm != "none":
        raise ValueError(f"norm: the {model} model has no normalisation layers (as the seed's); expected "
                         f"'none' (or 'auto'), got {norm!r}")


class SeedMLP(nn.Module):
    """The seed's MLP ("seed-mlp"; changhongyan123/poisoning ``model.MLP``, ``hidden_layer [64, 10]``).

    ``body``: flatten ``[B, C*H*W]`` - linear(C*H*W -> 64) - ReLU - linear(64 -> 10) - ReLU, giving the
    features [B, 10] (the width 10 is the seed's, whatever the number of classes);
    ``head``: linear(10 -> classes) (the seed's ``preds`` layer, its softmax in the loss).
    Keras' initialisation (:func:`_keras_init`), as the seed's.  Any input shape; no normalisation
    layer (``norm`` "none" only).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, norm: str = "none",
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        _check_no_norm("seed-mlp", norm)
        self.normalize = Normalize(mean or [0.5] * in_channels, std or [0.5] * in_channels)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, 64),
                                  nn.ReLU(inplace=True), nn.Linear(64, 10), nn.ReLU(inplace=True))
        self.head = nn.Linear(10, num_classes)
        _keras_init(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] in [0, 1] -> the second hidden layer's ReLU output [B, 10]."""
        return self.body(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SeedCNN(nn.Module):
    """The seed's CNN ("seed-cnn"; changhongyan123/poisoning ``model.CNN`` with main.py's parameters:
    ``filter_number [18, 18]``, ``filter_shape [(14, 14), (7, 7)]``, 'SAME' padding, 2x2 pooling,
    ``fc_layer [256, 128, 10]``).

    ``body``: zero-pad (6 before, 7 after) - conv14x14(in -> 18) - ReLU - maxpool2 - conv7x7(18 -> 18,
    padding 3) - ReLU - maxpool2, ``[B, 18, H/4, W/4]``: each convolution keeps the side, with
    TensorFlow's 'SAME' padding (for the even 14x14 kernel, one more zero after than before);
    ``embed``: flatten - linear(18*(H/4)*(W/4) -> 256) - ReLU - linear(256 -> 128) - ReLU -
    linear(128 -> 10) - ReLU, giving the features [B, 10];
    ``head``: linear(10 -> classes) (the seed's ``preds`` layer).
    Keras' initialisation (:func:`_keras_init`), as the seed's.  H, W multiples of 4 (build_model
    checks the side); no normalisation layer (``norm`` "none" only).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, norm: str = "none",
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        _check_no_norm("seed-cnn", norm)
        self.normalize = Normalize(mean or [0.5] * in_channels, std or [0.5] * in_channels)
        self.body = nn.Sequential(
            nn.ZeroPad2d((6, 7, 6, 7)), nn.Conv2d(in_channels, 18, 14), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(18, 18, 7, padding=3), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        side = image_size // 4
        self.embed = nn.Sequential(
            nn.Flatten(), nn.Linear(18 * side * side, 256), nn.ReLU(inplace=True),
            nn.Linear(256, 128), nn.ReLU(inplace=True), nn.Linear(128, 10), nn.ReLU(inplace=True))
        self.head = nn.Linear(10, num_classes)
        _keras_init(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] in [0, 1] -> the last dense layer's ReLU output [B, 10]."""
        return self.embed(self.body(self.normalize(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ZooArch:
    """What memdisc needs to know of one torchvision.models classifier.

    Attributes:
        head: dotted path of its final linear layer in the torchvision network.
        input_size: the input side it takes: the smallest (a smaller input is upscaled), or,
            with ``fixed``, the only one (every input is resized to it).
    """

    head: str
    input_size: int
    fixed: bool = False


# "tv-" + the torchvision.models builder name.  The CNNs halve the side five times (VGG with
# unpadded max-pools), so they take at least 32x32; ViT-B/16's position embeddings are for the
# 14x14 patch grid of a 224x224 image.
ZOO: dict[str, ZooArch] = {
    **{f"tv-{n}": ZooArch("fc", 32) for n in ("resnet18", "resnet34", "resnet50")},
    **{f"tv-{n}": ZooArch("classifier.6", 32) for n in ("vgg11", "vgg11_bn", "vgg16", "vgg16_bn")},
    "tv-mobilenet_v2": ZooArch("classifier.1", 32),
    "tv-mobilenet_v3_small": ZooArch("classifier.3", 32),
    "tv-vit_b_16": ZooArch("heads.head", 224, fixed=True),
}


def torchvision_problem(name: str) -> str | None:
    """Why zoo model ``name`` cannot be built here (torchvision not importable), or None."""
    try:
        import torchvision.models  # noqa: F401
    except Exception as exc:  # ImportError, or e.g. RuntimeError from a torchvision built for another torch
        return (f"{name} needs torchvision, which is not importable with this torch ({torch.__version__}): "
                f"{type(exc).__name__}: {exc}")
    return None


def check_zoo_options(name: str, norm: str = "auto") -> None:
    """For a ``tv-*`` model: torchvision importable and ``norm`` "auto" (the network's own layers).

    Raises:
        OptionError: naming ``model`` or ``norm``.
    """
    if name not in ZOO:
        return
    problem = torchvision_problem(name)
    if problem:
        raise OptionError("model", problem)
    if norm != "auto":
        raise OptionError("norm", f"{name} keeps torchvision's own normalisation layers; expected auto, got {norm!r}")


class _Hardswish(nn.Module):
    """``x * relu6(x + 3) / 6``, nn.Hardswish's function with a second derivative (PyTorch's fused
    kernel has none, and the accumulative attack differentiates input gradients of weight gradients)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.relu6(x + 3) / 6


class _Hardsigmoid(nn.Module):
    """``relu6(x + 3) / 6``, nn.Hardsigmoid's function with a second derivative (see :class:`_Hardswish`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3) / 6


_TWICE_DIFFERENTIABLE = {nn.Hardswish: _Hardswish, nn.Hardsigmoid: _Hardsigmoid}


class ZooVictim(nn.Module):
    """A torchvision.models classifier as a memdisc victim (``net``, built with ``weights=None``).

    forward: x float [B, C, H, W] in [0, 1], C in {1, 3}
        -> channels repeated to 3 (C = 1) -> ``(x - mean) / std`` with ImageNet's statistics (what
        torchvision's weights expect) -> bilinear resize to ``input_size`` x ``input_size`` if the side
        differs -> ``net`` -> logits [B, num_classes].
    ``input_size``: ``image_size``, raised to the architecture's minimum (or its fixed size, :class:`ZooArch`).

    Every victim must be twice differentiable (the accumulative attack's crafting takes the input
    gradient of weight gradients), so ``net``'s hard-swish/-sigmoid modules (MobileNetV3) are
    replaced by the same functions in plain ops, and attention (ViT) runs PyTorch's math kernel:
    the fused attention kernels have no second derivative.

    ``head`` is ``net``'s final linear layer (``ZooArch.head``, the last operation of every
    architecture), ``features(x)`` its input (captured by a forward pre-hook, so ``net`` keeps its
    state_dict keys and runs once; in train mode that input is after the network's dropout).
    """

    def __init__(self, name: str, num_classes: int, image_size: int):
        super().__init__()
        import torchvision.models

        arch = ZOO[name]
        self.name = name
        self.input_size = arch.input_size if arch.fixed else max(image_size, arch.input_size)
        self.normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.net = getattr(torchvision.models, name[len("tv-"):])(weights=None, num_classes=num_classes)
        for parent in list(self.net.modules()):
            for child_name, child in parent.named_children():
                if type(child) in _TWICE_DIFFERENTIABLE:
                    setattr(parent, child_name, _TWICE_DIFFERENTIABLE[type(child)]())

    @property
    def head(self) -> nn.Linear:
        return self.net.get_submodule(ZOO[self.name].head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x.expand(-1, 3, -1, -1))
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        with sdpa_kernel(SDPBackend.MATH):
            return self.net(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] in [0, 1] -> the input of ``head`` [B, D] (the head's own output is discarded)."""
        captured = []
        hook = self.head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            self.forward(x)
        finally:
            hook.remove()
        return captured[0]


MODELS: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "cnn": (SmallCNN, "none"),
    "resnet18": (ResNet18, "bn"),
    "seed-mlp": (SeedMLP, "none"),
    "seed-cnn": (SeedCNN, "none"),
    **{name: (ZooVictim, "auto") for name in ZOO},
}


def classifier_head(model: nn.Module) -> nn.Linear:
    """``model.head``: the final linear layer of a model built by :func:`build_model` (or of a
    :class:`memdisc.training.victim.TransferVictim`), what a transfer set-up retrains.

    Raises:
        ValueError: naming ``model`` when it has no linear ``head``.
    """
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"model: expected a memdisc model with a linear head (build_model, TransferVictim), got "
                         f"{type(model).__name__} whose head is {type(head).__name__}")
    return head


def build_model(name: str, in_channels: int, num_classes: int, image_size: int, norm: str = "auto",
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> nn.Module:
    """Instantiate a registered model (randomly initialised; for a ``tv-*`` model see :func:`load_weights`).

    Args:
        name: one of ``MODELS``: "cnn", "resnet18", "seed-mlp", "seed-cnn", or a torchvision victim of
            :data:`ZOO` ("tv-resnet18", ...).
        in_channels, num_classes, image_size: input channels, output classes, input side length
            (a ``tv-*`` model takes 1 or 3 channels and adapts the side, :class:`ZooVictim`).
        norm: "bn", "gn", "none", or "auto" (the model's default: none for cnn, bn for resnet18; the
            seed-* models take only "none" or "auto", a ``tv-*`` model only "auto", its own layers).
        mean, std: per-channel input statistics used by the built-in normalisation
            (``in_channels`` values each, std > 0; default 0.5, mapping [0, 1] to [-1, 1]).
            A ``tv-*`` model takes neither: it normalises with ImageNet's.

    Raises:
        ValueError: naming the argument (``model`` for an unknown name or a ``tv-*`` model without
            torchvision) and what was expected.
    """
    if name not in MODELS:
        raise ValueError(f"model: expected one of {sorted(MODELS)}, got {name!r}")
    for arg, value in (("in_channels", in_channels), ("num_classes", num_classes), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg}: expected a positive int, got {value!r}")
    if norm not in ("auto", "bn", "gn", "none"):
        raise ValueError(f"norm: expected 'auto', 'bn', 'gn' or 'none', got {norm!r}")
    if name in ZOO:
        check_zoo_options(name, norm)
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels: {name} takes 1 (repeated to 3) or 3 channels, got {in_channels}")
        for arg, value in (("mean", mean), ("std", std)):
            if value is not None:
                raise ValueError(f"{arg}: {name} normalises with ImageNet's statistics (its weights expect them); "
                                 f"expected none, got {list(value)}")
        return ZooVictim(name, num_classes, image_size)
    for arg, value in (("mean", mean), ("std", std)):
        if value is not None and len(value) != in_channels:
            raise ValueError(f"{arg}: expected {in_channels} values (one per input channel), got {len(value)}")
    if std is not None and min(std) <= 0:
        raise ValueError(f"std: expected positive values, got {list(std)}")
    if name in ("cnn", "seed-cnn") and image_size % 4:
        raise ValueError(f"image_size: the {name} model needs a multiple of 4, got {image_size}")
    cls, default_norm = MODELS[name]
    return cls(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
               norm=default_norm if norm == "auto" else norm, mean=mean, std=std)


def _some(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_weights(model: nn.Module, path: str | Path) -> str:
    """Load a torchvision state_dict file into a ``tv-*`` victim's network, in place.

    The file is what ``torch.save(net.state_dict(), path)`` writes for the torchvision network
    (torchvision's own downloaded ``.pth`` files are such files); it is read with
    ``weights_only=True``.  Every tensor is loaded, except a classifier head whose shape differs
    (the file's number of classes is not the model's): that head keeps its fresh initialisation.

    Returns:
        one line saying what was loaded (and which head stayed fresh).

    Raises:
        ValueError: naming the file: missing, unreadable, not a state_dict, or not of this architecture
            (the first missing, unexpected and differently shaped keys); or a model that is not ``tv-*``.
    """
    if not isinstance(model, ZooVictim):
        raise ValueError(f"model_weights: only the torchvision victims ({', '.join(ZOO)}) take a weights file")
    shown = str(path)
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{shown}: no such weights file for {model.name}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged or foreign file
        raise ValueError(f"{shown}: not a readable torch file ({type(exc).__name__}: {exc}); give a state_dict "
                         f"saved with torch.save") from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{shown}: not a state_dict (a dict of parameter name -> tensor); save net.state_dict() "
                         f"of the torchvision {model.name[len('tv-'):]}")
    own = model.net.state_dict()
    head = ZOO[model.name].head + "."
    fresh = [k for k in own if k.startswith(head) and k in state and state[k].shape != own[k].shape]
    # BatchNorm fills a missing num_batches_tracked (files older than PyTorch 0.4.1 lack it)
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k}: {list(state[k].shape)} in the file, {list(own[k].shape)} here"
                for k in own if k in state and k not in fresh and state[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        parts = [f"{what}: {_some(keys)}" for what, keys in (("missing from the file", missing),
                 ("unexpected", unexpected), ("other shapes", reshaped)) if keys]
        raise ValueError(f"{shown}: not a state_dict of {model.name} (torchvision {model.name[len('tv-'):]}); "
                         + "; ".join(parts))
    model.net.load_state_dict({k: v for k, v in state.items() if k not in fresh}, strict=False)
    if not fresh:
        return f"{model.name}: loaded all {len(state)} tensors of {shown}"
    return (f"{model.name}: loaded {shown} except its head {head[:-1]} ({state[fresh[0]].shape[0]} classes in the "
            f"file, {own[fresh[0]].shape[0]} here), which stays freshly initialised")
