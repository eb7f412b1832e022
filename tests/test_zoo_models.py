"""The torchvision victims (memdisc.models.ZOO): shapes on Fashion-MNIST and CIFAR inputs, the input
adapter, the classifier head and forward == head(features(x)), weights files (round trip, a head of another class count, clear
errors) and a burn-in from the command line.  Skipped without torchvision (the CPU-torch path:
tests/test_models.py checks the error there)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from memdisc.artifacts import load_model_file, model_from_file
from memdisc.cli import main
from memdisc.models import IMAGENET_MEAN, IMAGENET_STD, ZOO, ZooVictim, build_model, classifier_head, load_weights
from memdisc.training.victim import TransferVictim, trainable_parameters

torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.usefixtures("single_thread")


def _pixels(shape, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("channels, classes, size", [(1, 10, 28), (3, 100, 32)], ids=["fashion-mnist", "cifar100"])
@pytest.mark.parametrize("name", list(ZOO))
def test_builds_runs_and_is_twice_differentiable(name, channels, classes, size):
    """Logits of the right shape, and d/dx of a function of the stem's weight gradient (what the
    accumulative attack's crafting takes: it goes back through every layer's backward)."""
    torch.manual_seed(0)
    model = build_model(name, channels, classes, size)
    assert isinstance(model, ZooVictim) and model.name == name
    head = classifier_head(model)
    assert isinstance(head, nn.Linear) and head.out_features == classes and head is model.head
    assert head is model.net.get_submodule(ZOO[name].head)
    assert model.input_size == (224 if name == "tv-vit_b_16" else 32)  # raised to what the network takes
    vit = name == "tv-vit_b_16"
    if vit and channels == 3:
        return  # one ViT-B/16 pass (batch 1, 224x224 after the resize) is enough for a CPU test
    nn.init.normal_(head.weight, std=0.1)  # torchvision zero-initialises ViT's head: no gradient would pass it
    x = _pixels((1 if vit else 2, channels, size, size)).requires_grad_(True)
    out = model.train(not vit)(x)
    assert out.shape == (x.shape[0], classes) and out.dtype == torch.float32 and torch.isfinite(out).all()
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(out, torch.arange(x.shape[0])),
                                  next(model.net.parameters()), create_graph=True)
    (grad_x,) = torch.autograd.grad(grad.square().sum(), x)
    assert torch.isfinite(grad_x).all() and (grad_x.flatten(1).abs().sum(1) > 0).all()


@pytest.mark.parametrize("name", list(ZOO))
def test_forward_is_head_of_features_bit_for_bit(name):
    """``features(x)`` is the head's input ``[B, D]`` (captured, the network's state_dict keys unchanged) and
    ``forward(x) == head(features(x))`` exactly (eval mode: the networks' dropout is off)."""
    torch.manual_seed(0)
    model = build_model(name, 1, 10, 28).eval()
    nn.init.normal_(model.head.weight, std=0.1)  # ViT's zero-initialised head would make any logits equal
    assert all(k.startswith(("normalize.", "net.")) for k in model.state_dict())
    x = _pixels((1 if name == "tv-vit_b_16" else 3, 1, 28, 28))
    with torch.no_grad():
        z = model.features(x)
        assert z.shape == (x.shape[0], model.head.in_features) and torch.isfinite(z).all()
        assert torch.equal(model(x), model.head(z))
        assert not model.head._forward_pre_hooks  # the capture hook is removed


@pytest.mark.parametrize("name", ["tv-resnet18", "tv-mobilenet_v3_small"])
def test_transfer_victim_on_a_zoo_backbone(name):
    """A zoo model as a frozen backbone: the victim with the copied head gives the model's eval logits, also
    in train mode (the backbone's BatchNorm and dropout stay in eval mode), and only the head trains."""
    torch.manual_seed(0)
    model = build_model(name, 1, 10, 28)
    victim = TransferVictim(model).train()
    x = _pixels((3, 1, 28, 28))
    with torch.no_grad():
        assert torch.equal(victim(x), model.eval()(x)) and torch.equal(victim(x), victim(x))
    assert victim.head.training and not any(m.training for m in model.modules())
    assert trainable_parameters(victim) == list(victim.head.parameters())


def test_input_adapter_is_repeat_normalise_resize():
    """The victim's logits are torchvision's network on the 3-channel, ImageNet-normalised, resized input."""
    torch.manual_seed(0)
    model = build_model("tv-resnet18", 1, 10, 28).eval()
    x = _pixels((3, 1, 28, 28))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    adapted = nn.functional.interpolate((x.repeat(1, 3, 1, 1) - mean) / std, size=32, mode="bilinear",
                                        antialias=True)
    assert torch.allclose(model(x), model.net(adapted), atol=1e-5)
    x = _pixels((3, 1, 28, 28)).requires_grad_(True)  # attacks need d loss / d x through the adapter
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(model(x), torch.tensor([0, 3, 9])), x)
    assert torch.isfinite(grad).all() and (grad.flatten(1).abs().sum(1) > 0).all()


def _save_torchvision(tmp_path, arch: str, num_classes: int = 1000, seed: int = 1):
    """A state_dict file of a torchvision network, as torchvision's downloaded .pth files are."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    path = tmp_path / f"{arch}.pth"
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


def test_weights_round_trip_with_a_fresh_head(tmp_path):
    """A 1000-class file into a 10-class victim: every backbone tensor equal, the head as initialised."""
    path, saved = _save_torchvision(tmp_path, "resnet18")
    torch.manual_seed(0)
    model = build_model("tv-resnet18", 1, 10, 28)
    torch.manual_seed(0)
    fresh = build_model("tv-resnet18", 1, 10, 28).net.state_dict()
    message = load_weights(model, path)
    assert message == f"tv-resnet18: loaded {path} except its head fc (1000 classes in the file, 10 here), which " \
                      "stays freshly initialised"
    state = model.net.state_dict()
    for key, value in state.items():
        assert torch.equal(value, fresh[key] if key.startswith("fc.") else saved[key]), key
    assert not torch.equal(state["fc.weight"], saved["fc.weight"][:10])

    torch.manual_seed(0)
    same_classes = build_model("tv-resnet18", 3, 1000, 32)
    assert load_weights(same_classes, path) == f"tv-resnet18: loaded all {len(saved)} tensors of {path}"
    assert all(torch.equal(v, saved[k]) for k, v in same_classes.net.state_dict().items())


def test_bad_weights_files_name_the_file_and_keys(tmp_path):
    model = build_model("tv-resnet18", 3, 10, 32)
    other, _ = _save_torchvision(tmp_path, "resnet34")
    with pytest.raises(ValueError, match=rf"^{other}: not a state_dict of tv-resnet18 \(torchvision resnet18\); "
                                         r"unexpected: layer1\.2\.conv1\.weight, .* \(\+\d+ more\)$"):
        load_weights(model, other)

    path, saved = _save_torchvision(tmp_path, "resnet18")
    torch.save({**saved, "conv1.weight": saved["conv1.weight"][:, :1]}, path)  # a 1-channel stem
    with pytest.raises(ValueError, match=r"other shapes: conv1\.weight: \[64, 1, 7, 7\] in the file, "
                                         r"\[64, 3, 7, 7\] here$"):
        load_weights(model, path)
    torch.save({k: v for k, v in saved.items() if k != "bn1.weight"}, path)
    with pytest.raises(ValueError, match=r"missing from the file: bn1\.weight$"):
        load_weights(model, path)
    torch.save({"model": saved}, path)  # a checkpoint wrapping the state_dict
    with pytest.raises(ValueError, match=rf"^{path}: not a state_dict \(a dict of parameter name -> tensor\)"):
        load_weights(model, path)
    path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=rf"^{path}: not a readable torch file"):
        load_weights(model, path)
    with pytest.raises(ValueError, match=r"^absent\.pth: no such weights file for tv-resnet18$"):
        load_weights(model, "absent.pth")


def test_burnin_from_the_command_line_with_weights(tmp_path, tiny_fashion_mnist, capsys):
    """``memdisc burnin --model tv-resnet18 --model-weights FILE``: loads, says what it loaded, trains, and the
    snapshot rebuilds without the file (it holds the weights)."""
    path, _ = _save_torchvision(tmp_path, "resnet18")
    out = tmp_path / "run"
    assert main(["burnin", "--model", "tv-resnet18", "--model-weights", str(path), "--data-dir",
                 str(tiny_fashion_mnist), "--epochs", "1", "--train-subset", "64", "--test-subset", "32",
                 "--batch-size", "32", "--device", "cpu", "--out", str(out)]) == 0
    assert f"tv-resnet18: loaded {path} except its head fc" in capsys.readouterr().out
    snapshot = load_model_file(out / "snapshots" / "epoch_001.pt")
    assert snapshot["model_spec"] == {"name": "tv-resnet18", "in_channels": 1, "num_classes": 10, "image_size": 28,
                                      "norm": "auto"}
    assert snapshot["config"]["model_weights"] == str(path)
    path.unlink()
    model = model_from_file(snapshot).eval()
    assert model(_pixels((2, 1, 28, 28))).shape == (2, 10)
    assert main(["burnin", "--model", "tv-resnet18", "--norm", "gn"]) == 2
    assert "norm (--norm): tv-resnet18 keeps torchvision's own normalisation layers; expected auto, got 'gn'" \
        in capsys.readouterr().err


def test_compare_refuses_a_weights_file_of_another_network_before_writing(tmp_path, tiny_fashion_mnist, capsys):
    """``memdisc compare --model tv-resnet18 --burnin-model-weights FILE`` with a resnet34 file: one line naming
    the file, and nothing written (the check runs before compare's config.json)."""
    other, _ = _save_torchvision(tmp_path, "resnet34")
    out = tmp_path / "cmp"
    assert main(["compare", "--model", "tv-resnet18", "--burnin-model-weights", str(other), "--data-dir",
                 str(tiny_fashion_mnist), "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{other}: not a state_dict of tv-resnet18" in err
    assert not out.exists()
