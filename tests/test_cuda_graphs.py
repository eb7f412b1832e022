"""memdisc.runtime.cuda_graphs and the ``cuda_graph`` option of the correction loops.

CPU: the option's argument checks.  CUDA (skipped without a GPU): a captured DSC
or AT loop gives the same corrected batches, reports and weights as the eager
loop over several online steps (weights and ring snapshots updated in place
between replays), captures once per batch shape, and refuses the options that a
fixed-length, fixed-shape loop cannot have.  cuDNN runs deterministically so that
"the same kernels" means the same bits.
"""
from __future__ import annotations

import copy

import pytest
import torch

from memdisc.defenses import DSC, Precision, SeedAT, ThresholdSchedule
from memdisc.runtime.cuda_graphs import CapturedLoop
from memdisc.models import build_model
from memdisc.snapshots import SnapshotSet

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_precision_cuda_graph_must_be_a_bool():
    with pytest.raises(ValueError, match="cuda_graph: expected true or false"):
        Precision(cuda_graph="yes")


def test_cuda_graph_on_a_cpu_batch_is_refused_by_name():
    model = build_model("cnn", 1, 10, 28)
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    dsc = DSC(SnapshotSet([copy.deepcopy(model)]), schedule=ThresholdSchedule("fixed"),
              precision=Precision(cuda_graph=True))
    with pytest.raises(ValueError, match="cuda_graph: CUDA graphs need the batch on a CUDA device, got cpu"):
        dsc.correct(model, x, y, 0)
    with pytest.raises(ValueError, match="cuda_graph: CUDA graphs need the batch on a CUDA device"):
        SeedAT(precision=Precision(cuda_graph=True)).correct(model, x, y, 0)


def test_captured_loop_refuses_cpu_inputs():
    with pytest.raises(ValueError, match=r"inputs: CUDA-graph capture needs CUDA tensors; inputs \[0\]"):
        CapturedLoop()(lambda a: (a,), [torch.zeros(1)], lambda: [])


@pytest.fixture
def deterministic_cudnn():
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def _online_setup(K: int, seed: int = 0):
    """Current CNN on CUDA, K - 1 nudged fixed snapshots plus one ring slot of lag 1."""
    torch.manual_seed(seed)
    model = build_model("cnn", 1, 10, 28).cuda()
    fixed = []
    for _ in range(K - 1):
        h = copy.deepcopy(model)
        with torch.no_grad():
            for p in h.parameters():
                p.add_(0.05 * p.std().nan_to_num(0.01) * torch.randn_like(p))
        fixed.append(h)
    return model, fixed


def _batch(step: int, n: int = 64):
    g = torch.Generator().manual_seed(100 + step)
    return torch.rand(n, 1, 28, 28, generator=g).cuda(), torch.randint(0, 10, (n,), generator=g).cuda()


@cuda
@pytest.mark.usefixtures("deterministic_cudnn")
@pytest.mark.parametrize("mode", ["batch", "sample"])
@pytest.mark.parametrize("K", [1, 3])
def test_captured_dsc_matches_the_eager_loop_over_online_steps(mode, K):
    model, fixed = _online_setup(K)
    runs = {}
    for graph in (False, True):
        m = copy.deepcopy(model)
        snaps = SnapshotSet([copy.deepcopy(h) for h in fixed], ring_lags=(1,))
        snaps.observe(m)
        x0, _ = _batch(0)
        with torch.no_grad():
            tau = float(snaps.discrepancy(m.eval()(x0), x0).mean(0).median())  # about half the rows stop early
        dsc = DSC(snaps, mode=mode, schedule=ThresholdSchedule("fixed", tau0=tau), precision=Precision(cuda_graph=graph))
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        out = []
        for step in range(4):
            x, y = _batch(step, 64 if step < 3 else 48)  # the last batch has another shape: one more capture
            snaps.observe(m)
            x_corr, report = dsc.correct(m, x, y, step)
            loss, _ = dsc.train_step(m, opt, x, y, step)
            out.append((x_corr, report.md, report.iterations, loss))
        runs[graph] = (out, [p.detach().clone() for p in m.parameters()], dsc._captured.captures)
    (eager, w_eager, _), (graphed, w_graph, captures) = runs[False], runs[True]
    assert captures == 2
    assert any(0 < int(it.sum()) < 10 * it.numel() for _, _, it, _ in eager)  # the masks were exercised
    for (xe, mde, ite, le), (xg, mdg, itg, lg) in zip(eager, graphed):
        torch.testing.assert_close(xg, xe, rtol=0, atol=1e-6)
        torch.testing.assert_close(mdg, mde, rtol=0, atol=1e-6)
        assert torch.equal(itg, ite)
        torch.testing.assert_close(lg, le, rtol=0, atol=1e-6)
    for pg, pe in zip(w_graph, w_eager):
        torch.testing.assert_close(pg, pe, rtol=0, atol=1e-6)


@cuda
@pytest.mark.usefixtures("deterministic_cudnn")
def test_captured_seed_at_matches_the_eager_loop():
    model, _ = _online_setup(1)
    eager, graphed = SeedAT(), SeedAT(precision=Precision(cuda_graph=True))
    for step in range(3):
        x, y = _batch(step)
        xe, _ = eager.correct(model, x, y, step)
        xg, _ = graphed.correct(model, x, y, step)
        torch.testing.assert_close(xg, xe, rtol=0, atol=1e-6)
        with torch.no_grad():  # a weight update in place between replays
            for p in model.parameters():
                p.mul_(0.99)
    assert graphed._captured.captures == 1
    eager.kl_weight = graphed.kl_weight = 1.0  # a changed setting gets its own graph, not a stale replay
    x, y = _batch(9)
    torch.testing.assert_close(graphed.correct(model, x, y, 9)[0], eager.correct(model, x, y, 9)[0], rtol=0, atol=1e-6)
    assert graphed._captured.captures == 2


@cuda
def test_alternating_shapes_keep_one_graph_each():
    model, _ = _online_setup(1)
    at = SeedAT(iters=2, precision=Precision(cuda_graph=True))
    for n in (64, 48, 64, 48, 64):
        x, y = _batch(n, n)
        at.correct(model, x, y, 0)
    assert at._captured.captures == 2
    model.cpu().cuda()  # new parameter storage: the graph of that shape is recorded again
    at.correct(model, *_batch(0, 64), 0)
    assert at._captured.captures == 3


@cuda
def test_captured_dsc_refuses_early_exit_and_compaction():
    model, fixed = _online_setup(2)
    x, y = _batch(0)
    for kw in ({"early_exit": True}, {"mode": "sample", "compact": True}):
        dsc = DSC(SnapshotSet(fixed), schedule=ThresholdSchedule("fixed"), precision=Precision(cuda_graph=True), **kw)
        with pytest.raises(ValueError, match="cuda_graph: a captured loop has a fixed length"):
            dsc.correct(model, x, y, 0)
