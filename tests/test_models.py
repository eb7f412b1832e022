"""memdisc.models: shapes, normalisation layers and buffers, registry errors, input gradients."""
from __future__ import annotations

import re
import sys

import pytest
import torch
from torch import nn

from memdisc.artifacts import load_model_file, model_from_file, save_model_file
from memdisc.cli import main
from memdisc.config import build
from memdisc.models import MODELS, ZOO, build_model, classifier_head, load_weights
from memdisc.training.supervised import BurninConfig

pytestmark = pytest.mark.usefixtures("single_thread")  # resnet18 on two busy cores: one thread is faster
NORM_LAYERS = {"bn": nn.BatchNorm2d, "gn": nn.GroupNorm}


def _norm_types(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))}


def _pixels(batch: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


# Every (channels, classes, size) combination for the cnn; for the (slow on CPU) resnet18 two shapes
# that between them cover every value.
SHAPES = [(c, k, s) for c in (1, 3) for k in (10, 100) for s in (28, 32)]
CASES = [("cnn", *shape) for shape in SHAPES] + [("resnet18", 1, 10, 28), ("resnet18", 3, 100, 32)]


@pytest.mark.parametrize("norm", ["bn", "gn", "none"])
@pytest.mark.parametrize("name, channels, classes, size", CASES)
def test_output_shape_and_norm_layers(name, channels, classes, size, norm):
    torch.manual_seed(0)
    model = build_model(name, in_channels=channels, num_classes=classes, image_size=size, norm=norm)
    assert isinstance(model, MODELS[name][0])
    assert _norm_types(model) == ({NORM_LAYERS[norm]} if norm in NORM_LAYERS else set())
    x = _pixels(3, channels, size)
    for train in (True, False):
        out = model.train(train)(x)
        assert out.shape == (3, classes) and out.dtype == torch.float32
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name, default", [("cnn", set()), ("resnet18", {nn.BatchNorm2d})])
def test_auto_norm_is_the_model_default(name, default):
    assert _norm_types(build_model(name, 3, 10, 32)) == default


def test_normalisation_buffers_in_state_dict_and_used():
    mean, std = [0.2, 0.4, 0.6], [0.1, 0.2, 0.3]
    torch.manual_seed(0)
    model = build_model("cnn", 3, 10, 32, mean=mean, std=std).eval()
    state = model.state_dict()
    assert torch.equal(state["normalize.mean"], torch.tensor(mean).view(1, 3, 1, 1))
    assert torch.equal(state["normalize.std"], torch.tensor(std).view(1, 3, 1, 1))
    assert "normalize.mean" not in dict(model.named_parameters())  # buffers, not trained

    x = _pixels(4, 3, 32)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(model.normalize(x), expected)
    # A default-statistics copy differs until it loads the state dict, buffers included.
    torch.manual_seed(1)
    other = build_model("cnn", 3, 10, 32).eval()
    assert torch.equal(other.normalize.mean, torch.full((1, 3, 1, 1), 0.5))
    other.load_state_dict(state)
    assert torch.equal(other(x), model(x))


def test_default_statistics_map_unit_range_to_minus_one_one():
    model = build_model("cnn", 1, 10, 28)
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3)
    assert torch.equal(model.normalize(x), torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 3))


@pytest.mark.parametrize("kwargs, argument", [
    (dict(name="vgg"), "model"),
    (dict(in_channels=0), "in_channels"),
    (dict(in_channels=True), "in_channels"),
    (dict(num_classes=-1), "num_classes"),
    (dict(num_classes=10.0), "num_classes"),
    (dict(image_size="28"), "image_size"),
    (dict(image_size=30), "image_size"),  # the cnn needs a multiple of 4
    (dict(norm="batch"), "norm"),
    (dict(mean=[0.5, 0.5]), "mean"),
    (dict(std=[0.5, 0.5, 0.5]), "std"),
    (dict(std=[0.0]), "std"),
])
def test_registry_errors_name_the_argument(kwargs, argument):
    args = dict(name="cnn", in_channels=1, num_classes=10, image_size=28) | kwargs
    with pytest.raises(ValueError, match=rf"^{argument}: "):
        build_model(**args)


@pytest.mark.parametrize("name, norm", [("cnn", "none"), ("cnn", "bn"), ("cnn", "gn"), ("resnet18", "bn"),
                                        ("seed-mlp", "none"), ("seed-cnn", "none")])
def test_gradient_flows_to_the_input(name, norm):
    """Attacks need d loss / d x: it must exist, be finite and nonzero for every sample, in eval mode."""
    torch.manual_seed(0)
    model = build_model(name, 1, 10, 28, norm=norm).eval()
    x = _pixels(3, 1, 28).requires_grad_(True)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 3, 9]))
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.shape == x.shape and torch.isfinite(grad).all()
    assert (grad.flatten(1).abs().sum(1) > 0).all()


@pytest.mark.parametrize("norm", ["none", "bn", "gn"])
def test_input_gradient_matches_finite_difference(norm):
    """The directional derivative along g = d loss / d x, by central differences in float64, equals |g|."""
    torch.manual_seed(0)
    model = build_model("cnn", 1, 10, 28, norm=norm).eval().double()
    x, y = _pixels(3, 1, 28).double().requires_grad_(True), torch.tensor([0, 3, 9])
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), x)
    direction, h = grad / grad.norm(), 1e-5
    with torch.no_grad():
        slope = (nn.functional.cross_entropy(model(x + h * direction), y)
                 - nn.functional.cross_entropy(model(x - h * direction), y)) / (2 * h)
    assert slope.item() == pytest.approx(grad.norm().item(), rel=1e-4)


@pytest.mark.parametrize("name", ["cnn", "resnet18", "seed-mlp", "seed-cnn"])
def test_classifier_head_is_the_last_linear_layer(name):
    model = build_model(name, 3, 10, 32)
    assert classifier_head(model) is model.head
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 10
    assert list(model.parameters())[-2:] == list(model.head.parameters())  # the last layer created
    with pytest.raises(ValueError, match=r"^model: expected a memdisc model with a linear head .* got Sequential "
                                         r"whose head is NoneType$"):
        classifier_head(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("norm", ["bn", "gn", "none"])
@pytest.mark.parametrize("name, channels, classes, size", [("cnn", 1, 10, 28), ("cnn", 3, 100, 32),
                                                           ("resnet18", 3, 10, 32)])
def test_forward_is_head_of_features_bit_for_bit(name, channels, classes, size, norm):
    """``features(x)`` is the head's input [B, D] and ``forward(x) == head(features(x))`` exactly, in both
    modes (train mode: the same batch statistics, so the same bits)."""
    torch.manual_seed(0)
    model = build_model(name, channels, classes, size, norm=norm)
    x = _pixels(4, channels, size)
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            z = model.features(x)
            assert z.shape == (4, model.head.in_features) and z.dtype == torch.float32
            assert torch.equal(model(x), model.head(z))
    x = x.requires_grad_(True)  # and the input gradient flows through features
    (grad,) = torch.autograd.grad(model.features(x).square().sum(), x)
    assert (grad.flatten(1).abs().sum(1) > 0).all()


# The vulnerability study seed's models (changhongyan123/poisoning model.py with main.py's parameters).

SEED_SHAPES = [(1, 10, 28), (3, 10, 32), (3, 100, 32)]


@pytest.mark.parametrize("channels, classes, size", SEED_SHAPES)
@pytest.mark.parametrize("name", ["seed-mlp", "seed-cnn"])
def test_seed_models_forward_is_head_of_features_bit_for_bit(name, channels, classes, size):
    """Logits [B, classes] and features [B, 10] (the seed's last hidden width, whatever the classes),
    ``forward == head(features)`` exactly in both modes, and ReLU features (>= 0)."""
    torch.manual_seed(0)
    model = build_model(name, channels, classes, size)
    x = _pixels(5, channels, size)
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            z = model.features(x)
            assert z.shape == (5, 10) and model.head.in_features == 10 and bool((z >= 0).all())
            out = model(x)
            assert out.shape == (5, classes) and bool(torch.isfinite(out).all())
            assert torch.equal(out, model.head(z))
    assert _norm_types(model) == set()


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_seed_mlp_layers(channels, size):
    """flatten - 64 - ReLU - 10 - ReLU - head, with the input statistics as buffers."""
    model = build_model("seed-mlp", channels, 10, size)
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == [
        ("body.1.weight", (64, channels * size * size)), ("body.1.bias", (64,)), ("body.3.weight", (10, 64)),
        ("body.3.bias", (10,)), ("head.weight", (10, 10)), ("head.bias", (10,))]
    x = _pixels(2, channels, size)
    with torch.no_grad():
        expected = model.body[1:](model.normalize(x).flatten(1))
        assert torch.equal(model.features(x), expected)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # the reference's
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_seed_cnn_layers_and_same_padding(channels, size):
    """Two convolutions keeping the side (the first 14x14 padded as TensorFlow's 'SAME', which is
    PyTorch's padding='same'), each pooled by 2: [B, 18, H/4, W/4]; then 256 - 128 - 10 - head."""
    torch.manual_seed(0)
    model = build_model("seed-cnn", channels, 10, size)
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == [
        ("body.1.weight", (18, channels, 14, 14)), ("body.1.bias", (18,)), ("body.4.weight", (18, 18, 7, 7)),
        ("body.4.bias", (18,)), ("embed.1.weight", (256, 18 * (size // 4) ** 2)), ("embed.1.bias", (256,)),
        ("embed.3.weight", (128, 256)), ("embed.3.bias", (128,)), ("embed.5.weight", (10, 128)),
        ("embed.5.bias", (10,)), ("head.weight", (10, 10)), ("head.bias", (10,))]
    with torch.no_grad():
        for p in model.parameters():  # Keras initialises biases to zero: make them matter here
            p.add_(0.01 * torch.randn_like(p))
        x = model.normalize(_pixels(2, channels, size))
        conv1, conv2 = model.body[1], model.body[4]
        first = model.body[:2](x)
        assert first.shape == (2, 18, size, size)
        torch.testing.assert_close(first, nn.functional.conv2d(x, conv1.weight, conv1.bias, padding="same"))
        pooled = model.body[:4](x)
        torch.testing.assert_close(model.body[4](pooled),
                                   nn.functional.conv2d(pooled, conv2.weight, conv2.bias, padding="same"))
        assert model.body(x).shape == (2, 18, size // 4, size // 4)


@pytest.mark.parametrize("name", ["seed-mlp", "seed-cnn"])
def test_seed_models_initialise_as_keras(name):
    """Glorot-uniform weights (|w| <= sqrt(6 / (fan_in + fan_out)), spread over that range) and zero biases."""
    torch.manual_seed(0)
    model = build_model(name, 3, 10, 32)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(layers) == {"seed-mlp": 3, "seed-cnn": 6}[name]
    for layer in layers:
        receptive = layer.weight[0, 0].numel()
        fan_in, fan_out = layer.weight.shape[1] * receptive, layer.weight.shape[0] * receptive
        bound, largest = (6 / (fan_in + fan_out)) ** 0.5, float(layer.weight.detach().abs().max())
        assert 0.9 * bound < largest <= bound
        assert not layer.bias.any()


@pytest.mark.parametrize("name, kwargs, message", [
    ("seed-mlp", dict(norm="bn"), "norm: the seed-mlp model has no normalisation layers (as the seed's); "
                                  "expected 'none' (or 'auto'), got 'bn'"),
    ("seed-cnn", dict(norm="gn"), "norm: the seed-cnn model has no normalisation layers (as the seed's); "
                                  "expected 'none' (or 'auto'), got 'gn'"),
    ("seed-cnn", dict(image_size=30), "image_size: the seed-cnn model needs a multiple of 4, got 30"),
    ("seed-cnn", dict(mean=[0.5, 0.5]), "mean: expected 1 values (one per input channel), got 2"),
])
def test_seed_models_refuse_bad_options_by_name(name, kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        build_model(**(dict(name=name, in_channels=1, num_classes=10, image_size=28) | kwargs))
    assert build_model("seed-mlp", 1, 10, 30)(_pixels(2, 1, 30)).shape == (2, 10)  # the MLP takes any side


def test_small_cnn_layers_and_parameter_order():
    """body / embed / head, created in this order: parameter order and seeded initialisation are those of
    the earlier layout (features / classifier), whose files load unchanged (next test)."""
    model = build_model("cnn", 1, 10, 28, norm="bn")
    assert [n for n, _ in model.named_parameters()] == [
        "body.0.weight", "body.1.weight", "body.1.bias", "body.4.weight", "body.5.weight", "body.5.bias",
        "embed.1.weight", "embed.1.bias", "head.weight", "head.bias"]


@pytest.mark.parametrize("norm", ["bn", "none"])
def test_small_cnn_loads_a_state_dict_of_the_earlier_layer_names(norm, tmp_path):
    """A burn-in snapshot written before the rename (keys features.*, classifier.1.*, classifier.3.*) loads
    into today's SmallCNN with every tensor in place, through the snapshot loader and nested in a module."""
    torch.manual_seed(0)
    model = build_model("cnn", 1, 10, 28, norm=norm)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.rand_like(t))  # every tensor distinct from a fresh model's
    old_names = {"body.": "features.", "embed.1.": "classifier.1.", "head.": "classifier.3."}

    def old(key: str) -> str:
        for new, before in old_names.items():
            if key.startswith(new):
                return before + key[len(new):]
        return key
    old_state = {old(k): v.clone() for k, v in model.state_dict().items()}
    assert "features.0.weight" in old_state and "classifier.3.weight" in old_state
    spec = {"name": "cnn", "in_channels": 1, "num_classes": 10, "image_size": 28, "norm": norm}
    save_model_file(tmp_path / "old.pt", model=model, model_spec=spec, epoch=1, test_error=0.5, config={}, seed=0)
    payload = load_model_file(tmp_path / "old.pt")
    payload["state_dict"] = old_state
    loaded = model_from_file(payload)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert old_state.keys() == {old(k) for k in model.state_dict()}  # the caller's dict is not changed
    wrapper = nn.Sequential(build_model("cnn", 1, 10, 28, norm=norm))
    wrapper.load_state_dict({"0." + k: v for k, v in old_state.items()})
    x = _pixels(2, 1, 28)
    assert torch.equal(wrapper.eval()(x), model.eval()(x))


# The torchvision victims without torchvision (the CPU-torch path; simulated, so these run under either torch).

@pytest.fixture
def no_torchvision(monkeypatch):
    """``import torchvision`` fails as it does where torchvision is not installed."""
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.models", None)


def test_zoo_without_torchvision_is_a_clear_error(no_torchvision, tmp_path, capsys):
    expected = f"tv-resnet18 needs torchvision, which is not importable with this torch ({torch.__version__}): "
    with pytest.raises(ValueError, match="^" + re.escape(f"model: {expected}ModuleNotFoundError")):
        build_model("tv-resnet18", 1, 10, 28)
    with pytest.raises(ValueError, match="^" + re.escape(f"model (--model): {expected}")):
        build(BurninConfig, {"model": "tv-resnet18"})
    assert main(["burnin", "--model", "tv-resnet18", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"memdisc burnin: error: model (--model): {expected}") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    assert "tv-resnet18" in MODELS and set(ZOO) <= set(MODELS)  # known names, whatever is installed


def test_weights_options_are_checked(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"^model_weights \(--model-weights\): no such file 'absent.pth'"):
        build(BurninConfig, {"model_weights": "absent.pth"})
    weights = tmp_path / "w.pth"
    torch.save({}, weights)
    with pytest.raises(ValueError, match=r"^model_weights: only the torchvision victims \(tv-resnet18, "):
        load_weights(build_model("cnn", 1, 10, 28), weights)
    assert main(["burnin", "--model-weights", str(tmp_path / "absent.pth")]) == 2
    assert "model_weights (--model-weights): no such file" in capsys.readouterr().err
