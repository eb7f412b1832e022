"""memdisc.snapshots: K historical networks evaluated together, the ring of lagged online models,
per-sample discrepancy against all of them, and snapshots of a transfer victim (K heads, one backbone).

Small CNNs (memdisc.models "cnn", BatchNorm, 1x8x8 inputs, 10 classes) keep every test far below a second.
"""
from __future__ import annotations

import copy

import pytest
import torch

from memdisc.models import build_model
from memdisc.ops import discrepancy
from memdisc.snapshots import SnapshotSet
from memdisc.training.victim import TransferVictim

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py: faster on busy cores


def make_cnn(seed: int, num_classes: int = 10) -> torch.nn.Module:
    """A BatchNorm CNN with non-trivial running statistics (so eval mode differs from train mode)."""
    torch.manual_seed(seed)
    model = build_model("cnn", in_channels=1, num_classes=num_classes, image_size=8, norm="bn")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    return model


def batch(n: int = 12, seed: int = 100) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def own_logits(models, x) -> torch.Tensor:
    """``[K, B, C]``: every model's own eval-mode forward, stacked."""
    outs = []
    for m in models:
        m.eval()
        with torch.no_grad():
            outs.append(m(x))
    return torch.stack(outs)


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """A stand-in for one online SGD step: every parameter and buffer moved by a distinct amount."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.add_(0.05 * torch.randn(t.shape, generator=g))


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("vmap", [False, True])
def test_logits_equal_each_models_own_logits(k, vmap):
    models = [make_cnn(seed) for seed in range(k)]
    for m in models:
        m.train()  # the set must evaluate its copies in eval mode whatever the originals' mode
    snaps = SnapshotSet(models, vmap=vmap)
    x = batch()
    out = snaps.logits(x)
    expected = own_logits(models, x)
    assert out.shape == (k, 12, 10)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not out.requires_grad
    if k > 1:  # the K slots really are different networks
        assert (expected[0] - expected[1]).abs().max() > 1e-2


def test_snapshots_are_frozen_copies():
    model = make_cnn(0)
    snaps = SnapshotSet([model])
    x = batch()
    before = snaps.logits(x).clone()
    perturb_(model, 1)  # the original keeps training; the snapshot must not follow it
    torch.testing.assert_close(snaps.logits(x), before, rtol=0, atol=0)
    assert all(not p.requires_grad for m in snaps.models for p in m.parameters())


def test_ring_lags_hold_the_model_n_observations_ago():
    online = make_cnn(0)
    fixed = make_cnn(9)
    snaps = SnapshotSet([fixed], ring_lags=(1, 3))
    assert len(snaps) == 3
    x = batch()
    with pytest.raises(RuntimeError, match="observe"):
        snaps.logits(x)  # ring slots empty before the first observation
    seen = []  # logits of the online model at each observe() call
    for t in range(6):
        snaps.observe(online)
        seen.append(own_logits([online], x)[0])
        out = snaps.logits(x)
        torch.testing.assert_close(out[0], own_logits([fixed], x)[0], rtol=0, atol=0)
        # lag N: the model as observed N calls ago, or the oldest one seen before N observations exist
        torch.testing.assert_close(out[1], seen[max(0, t - 1)], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out[2], seen[max(0, t - 3)], rtol=1e-6, atol=1e-6)
        perturb_(online, 10 + t)
    assert (seen[5] - seen[2]).abs().max() > 1e-3  # the lags are distinguishable


def test_ring_vmap_path_follows_observations():
    online = make_cnn(0)
    loop, vmapped = SnapshotSet([make_cnn(5)], (2,), vmap=False), SnapshotSet([make_cnn(5)], (2,), vmap=True)
    x = batch()
    storage = None
    for t in range(4):
        loop.observe(online)
        vmapped.observe(online)
        torch.testing.assert_close(vmapped.logits(x), loop.logits(x), rtol=1e-5, atol=1e-5)
        perturb_(online, t)
        # the stacked copies are refreshed in place, not rebuilt (a captured CUDA graph keeps reading them)
        ptrs = [p.data_ptr() for p in vmapped.tensors()]
        assert storage is None or ptrs == storage
        storage = ptrs


def test_prepare_builds_the_stacked_weights_only_when_vmapped():
    x = batch()
    vmapped, looped = SnapshotSet([make_cnn(1), make_cnn(2)], vmap=True), SnapshotSet([make_cnn(1), make_cnn(2)])
    n_model_tensors = len(vmapped.tensors())
    vmapped.prepare(x)
    looped.prepare(x)  # auto on CPU: the loop, nothing to build
    assert len(vmapped.tensors()) > n_model_tensors and len(looped.tensors()) == n_model_tensors
    ptrs = [t.data_ptr() for t in vmapped.tensors()]
    torch.testing.assert_close(vmapped.logits(x), looped.logits(x), rtol=1e-5, atol=1e-5)
    assert [t.data_ptr() for t in vmapped.tensors()] == ptrs  # logits() used what prepare() built


@pytest.mark.parametrize("k", [1, 3])
def test_discrepancy_equals_op_on_stacked_logits(k):
    models = [make_cnn(seed) for seed in range(1, k + 1)]
    current = make_cnn(0).eval()
    snaps = SnapshotSet(models)
    x = batch()
    with torch.no_grad():
        cur = current(x)
    md = snaps.discrepancy(cur, x)
    assert md.shape == (k, 12)
    torch.testing.assert_close(md, discrepancy(cur, own_logits(models, x)), rtol=0, atol=0)
    md_t = snaps.discrepancy(cur, x, temperature=2.0)
    torch.testing.assert_close(md_t, discrepancy(cur, own_logits(models, x), 2.0), rtol=0, atol=0)
    assert (md > 0).all() and not torch.allclose(md, md_t)


def test_class_count_mismatch_is_a_value_error():
    snaps = SnapshotSet([make_cnn(1, num_classes=10)])
    x = batch()
    with torch.no_grad():
        cur = make_cnn(0, num_classes=7).eval()(x)
    with pytest.raises(ValueError, match=r"snapshots.*10 classes.*current model has 7"):
        snaps.discrepancy(cur, x)


def test_constructor_errors():
    with pytest.raises(ValueError, match="models"):
        SnapshotSet([])
    with pytest.raises(ValueError, match="ring_lags"):
        SnapshotSet([make_cnn(0)], ring_lags=(0,))
    with pytest.raises(ValueError, match="vmap"):
        SnapshotSet([make_cnn(0)], vmap="yes")


def test_state_dict_round_trip_restores_the_ring():
    online = make_cnn(0)
    fixed = [make_cnn(7)]
    a = SnapshotSet(fixed, ring_lags=(1, 2))
    x = batch()
    for t in range(3):
        a.observe(online)
        perturb_(online, t)
    state = a.state_dict()
    assert len(state["history"]) == 3  # max lag + 1 states kept
    b = SnapshotSet(fixed, ring_lags=(1, 2))
    b.load_state_dict(state)
    for t in range(3):  # continue both: identical slots at every step
        a.observe(online)
        b.observe(online)
        torch.testing.assert_close(b.logits(x), a.logits(x), rtol=0, atol=0)
        perturb_(online, 20 + t)
    # without the history the lagged slots differ (so the comparison above can fail)
    c = SnapshotSet(fixed, ring_lags=(1, 2))
    c.observe(online)
    a.observe(online)
    assert (c.logits(x)[2] - a.logits(x)[2]).abs().max() > 1e-3


# Snapshots of a transfer victim: K heads over one shared frozen backbone.

def transfer_victims(k: int) -> list[TransferVictim]:
    """K transfer victims on one backbone, each head moved differently (historical heads)."""
    backbone = make_cnn(0)
    victims = []
    for seed in range(k):
        victim = TransferVictim(backbone)
        perturb_(victim.head, 50 + seed)
        victims.append(victim)
    return victims


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


@pytest.mark.parametrize("vmap", [False, True])
def test_transfer_snapshots_share_the_backbone_and_hold_heads(vmap):
    """The logits equal those of full deep copies (bit for bit on the loop); the snapshots' backbone is the
    victims' one object, so the memory the set holds is one backbone and K heads."""
    victims = transfer_victims(3)
    backbone = victims[0].backbone
    snaps = SnapshotSet(victims, vmap=vmap)
    full = SnapshotSet([copy.deepcopy(v) for v in victims], vmap=False)  # three whole networks
    assert all(m.backbone is backbone for m in snaps.models)
    assert all(m.backbone is not backbone for m in full.models)
    x = batch()
    out = snaps.logits(x)
    assert out.shape == (3, 12, 10)
    if vmap:
        torch.testing.assert_close(out, full.logits(x), rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(out, full.logits(x))
    assert (out[0] - out[1]).abs().max() > 1e-2  # the heads differ
    head_bytes = _bytes(victims[0].head.parameters())
    held = _bytes(t for m in snaps.models for t in (*m.parameters(), *m.buffers()))
    assert held == _bytes([*backbone.parameters(), *backbone.buffers()]) + 3 * head_bytes
    assert _bytes(snaps.tensors()) == held + (3 * head_bytes if vmap else 0)  # the stack: heads only


@pytest.mark.parametrize("vmap", [False, True])
def test_transfer_ring_records_heads_and_follows_the_victim(vmap):
    """observe() of a transfer victim keeps its head's state only; the lagged slots share the backbone and
    hold the head as observed N calls ago; the vmapped stack is refreshed in place."""
    online, fixed = transfer_victims(2)  # on one backbone, as a transfer run's fixed heads and online victim
    snaps = SnapshotSet([fixed], ring_lags=(1, 2), vmap=vmap)
    x = batch()
    seen, storage = [], None
    for t in range(4):
        snaps.observe(online)
        seen.append(own_logits([online], x)[0])
        out = snaps.logits(x)
        torch.testing.assert_close(out[1], seen[max(0, t - 1)], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out[2], seen[max(0, t - 2)], rtol=1e-6, atol=1e-6)
        perturb_(online.head, 70 + t)
        ptrs = [p.data_ptr() for p in snaps.tensors()]
        assert storage is None or ptrs == storage
        storage = ptrs
    assert all(m.backbone is online.backbone for m in snaps.models)
    assert all(h.keys() == {"weight", "bias"} for h in snaps.state_dict()["history"])
    restored = SnapshotSet([fixed], ring_lags=(1, 2), vmap=vmap)
    restored.load_state_dict(snaps.state_dict())
    snaps.observe(online)
    restored.observe(online)
    torch.testing.assert_close(restored.logits(x), snaps.logits(x), rtol=0, atol=0)
