"""pytest-benchmark suite of the memdisc CPU kernels (registered ops, called through memdisc.ops).

    pytest bench/test_kernels_benchmark.py                     # timings
    pytest bench/test_kernels_benchmark.py --benchmark-disable  # each body once, as a smoke test

Each benchmark also checks its result against the PyTorch reference, so the
suite fails if a kernel is fast but wrong.
"""
from __future__ import annotations

import pytest
import torch

import memdisc.ops as ops
from memdisc.ops.reference import discrepancy_reference, pgd_step_reference

DISC_SHAPES = [(1, 100, 10), (8, 1024, 10), (8, 1024, 100), (8, 1024, 1000)]


def _logits(K, B, C, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, generator=g) * 3, torch.randn(K, B, C, generator=g) * 3


@pytest.mark.parametrize("K,B,C", DISC_SHAPES, ids=lambda v: str(v))
def test_discrepancy_forward(benchmark, K, B, C):
    a, b = _logits(K, B, C)
    kl = benchmark(ops.discrepancy, a, b)
    torch.testing.assert_close(kl, discrepancy_reference(a, b)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("K,B,C", DISC_SHAPES, ids=lambda v: str(v))
def test_discrepancy_forward_backward(benchmark, K, B, C):
    a, b = _logits(K, B, C)
    a.requires_grad_()
    b.requires_grad_()

    def step():
        a.grad = b.grad = None
        ops.discrepancy(a, b).sum().backward()
        return a.grad, b.grad

    ga, gb = benchmark(step)
    ra, rb = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    discrepancy_reference(ra, rb)[0].sum().backward()
    torch.testing.assert_close(ga, ra.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gb, rb.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("B,frac", [(100, 1.0), (256, 1.0), (2000, 0.5)], ids=lambda v: str(v))
def test_pgd_step(benchmark, B, frac):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(B, 3, 32, 32, generator=g)
    grad = torch.randn(B, 3, 32, 32, generator=g)
    active = None if frac == 1.0 else torch.rand(B, generator=g) < frac
    x = x0.clone()
    benchmark(ops.pgd_step_, x, grad, x0, step=0.02, eps=0.2, active=active)
    want, got = x.clone(), x.clone()  # one more step from wherever the benchmark left x
    pgd_step_reference(want, grad, x0, active, 0.02, 0.2, 0.0, 1.0, True)
    ops.pgd_step_(got, grad, x0, step=0.02, eps=0.2, active=active)
    assert torch.equal(got, want)
