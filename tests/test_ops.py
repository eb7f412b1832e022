"""Tests of the memdisc custom operators against the float64 PyTorch reference.

The oracle is memdisc.ops.reference run in float64.  Every fast path (the
compiled CPU/CUDA kernel behind torch.ops.memdisc.*, torch.compile) is compared
with it on fresh random inputs.  With MEMDISC_REQUIRE_EXTENSION=1 (CI) a
missing build fails the import instead of falling back silently.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import memdisc.ops as ops
from memdisc.ops.reference import discrepancy_reference, pgd_step_reference

DEVICES = [pytest.param("cpu"),
           pytest.param("cuda", marks=[pytest.mark.cuda,
                                       pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])]
HALF = (torch.float16, torch.bfloat16)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _logits(shape, device, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _oracle(current, snapshots, temperature=1.0, reverse=False, grad=None):
    """float64 reference values (and gradients when grad [K, B] is given)."""
    a = current.detach().double().requires_grad_(grad is not None)
    b = snapshots.detach().double().requires_grad_(grad is not None)
    kl = discrepancy_reference(a, b, temperature, reverse)[0]
    if grad is None:
        return kl.detach(), None, None
    (kl * grad.double()).sum().backward()
    return kl.detach(), a.grad, b.grad


def _run_op(current, snapshots, temperature=1.0, reverse=False, grad=None):
    a = current.detach().clone().requires_grad_(grad is not None)
    b = snapshots.detach().clone().requires_grad_(grad is not None)
    kl = ops.discrepancy(a, b, temperature, reverse)
    if grad is None:
        return kl.detach(), None, None
    (kl * grad).sum().backward()
    return kl.detach(), a.grad, b.grad


def test_extension_required_when_asked():
    if os.environ.get("MEMDISC_REQUIRE_EXTENSION", "0") != "1":
        pytest.skip("MEMDISC_REQUIRE_EXTENSION is not set")
    assert ops.extension_loaded(), ops.extension_error()


# ----------------------------------------------------------------------------- discrepancy parity

SHAPES = ([(K, B, C) for K in (1, 3) for B in (0, 1, 100) for C in (1, 2, 10, 1000, 1001)]
          + [(16, 100, 10), (16, 4097, 2), (3, 4097, 10), (16, 1, 1001), (3, 41, 1271)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K,B,C", SHAPES)
def test_discrepancy_float32_matches_float64_reference(device, K, B, C):
    current, snapshots = _logits((B, C), device, seed=K * 7 + C), _logits((K, B, C), device, seed=B + C)
    grad = torch.rand(K, B, device=device) + 0.5  # not ones
    for reverse in (False, True):
        want, want_ga, want_gb = _oracle(current, snapshots, 1.0, reverse, grad)
        got, got_ga, got_gb = _run_op(current, snapshots, 1.0, reverse, grad)
        assert got.dtype == torch.float32 and got.shape == (K, B)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-5)
        # gradients: within 2x the error of the eager float32 reference (cancellation in log p_h - log p_t - kl)
        a, b = current.clone().requires_grad_(), snapshots.clone().requires_grad_()
        (discrepancy_reference(a, b, 1.0, reverse)[0] * grad).sum().backward()
        for g, e, w in ((got_ga, a.grad, want_ga), (got_gb, b.grad, want_gb)):
            assert torch.isfinite(g).all()
            assert _err(g, w) <= 2 * _err(e, w) + 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True])
def test_discrepancy_temperature_float64_exact(device, reverse):
    current, snapshots = _logits((37, 23), device, torch.float64), _logits((4, 37, 23), device, torch.float64, seed=1)
    grad = torch.rand(4, 37, dtype=torch.float64, device=device)
    want = _oracle(current, snapshots, 0.37, reverse, grad)
    got = _run_op(current, snapshots, 0.37, reverse, grad)
    for g, w in zip(got, want):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def _err(x, ref):
    return (x.double() - ref).abs().max().item() if x.numel() else 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("K,B,C", [(3, 41, 1271), (16, 100, 10)])
def test_discrepancy_half_within_twice_eager_error(device, dtype, K, B, C):
    """flash-attention's rule: kernel error vs float64 <= 2x eager error in the same dtype (+ tiny floor)."""
    current, snapshots = _logits((B, C), device, dtype, seed=3), _logits((K, B, C), device, dtype, seed=4)
    grad = (torch.rand(K, B, device=device) + 0.5).to(dtype)
    for reverse in (False, True):
        ref = _oracle(current, snapshots, 1.3, reverse, grad.float())
        a, b = current.clone().requires_grad_(), snapshots.clone().requires_grad_()
        kl = discrepancy_reference(a, b, 1.3, reverse)[0]
        (kl * grad.float()).sum().backward()
        eager = (kl.detach(), a.grad, b.grad)
        got = _run_op(current, snapshots, 1.3, reverse, grad.float())
        assert got[1].dtype == dtype and got[2].dtype == dtype
        for g, e, r in zip(got, eager, ref):
            assert _err(g, r) <= 2 * _err(e, r) + 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_discrepancy_non_contiguous_inputs(device):
    base_a, base_b = _logits((123, 40), device), _logits((5, 123, 40), device, seed=2)
    current, snapshots = base_a[::3, ::2], base_b[::2, ::3, ::2]
    assert not current.is_contiguous() and not snapshots.is_contiguous()
    grad = torch.rand(3, 41, device=device).t().contiguous().t()  # a non-contiguous upstream gradient
    want = _oracle(current, snapshots, 2.0, False, grad)
    got = _run_op(current, snapshots, 2.0, False, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_discrepancy_outputs_are_fully_written(device):
    """Kernels allocate with torch.empty: NaN-filled memory handed back by the caching allocator must not leak."""
    for _ in range(2):
        torch.full((1 << 16,), float("nan"), device=device)  # recycled by the next allocations
        current, snapshots = _logits((100, 1001), device), _logits((3, 100, 1001), device, seed=5)
        kl = ops.discrepancy(current, snapshots)
        assert torch.isfinite(kl).all()
        torch.testing.assert_close(kl.double(), _oracle(current, snapshots)[0], rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_discrepancy_extreme_logits(device, dtype):
    g = torch.Generator().manual_seed(9)
    current = (torch.randint(-1, 2, (64, 10), generator=g) * 1e4).to(device=device, dtype=dtype)
    snapshots = (torch.randint(-1, 2, (3, 64, 10), generator=g) * 1e4).to(device=device, dtype=dtype)
    a, b = current.clone().requires_grad_(), snapshots.clone().requires_grad_()
    for reverse in (False, True):
        kl = ops.discrepancy(a, b, reverse=reverse)
        kl.sum().backward()
        assert torch.isfinite(kl).all() and (kl >= -1e-3).all()
        assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
        want = _oracle(current, snapshots, reverse=reverse)[0]
        eager = discrepancy_reference(current, snapshots, 1.0, reverse)[0]
        assert _err(kl, want) <= 2 * _err(eager, want) + 1e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [1, 10, 1001])
def test_discrepancy_of_identical_distributions_is_zero(device, C):
    current = _logits((50, C), device, scale=10.0)
    kl = ops.discrepancy(current, current.expand(4, 50, C))
    assert kl.abs().max().item() <= 1e-5
    kl_rev = ops.discrepancy(current, current.unsqueeze(0), reverse=True)
    assert kl_rev.abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- PGD step

def _pgd_inputs(device, dtype=torch.float32, shape=(37, 3, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=g).to(device=device, dtype=dtype)
    x = (x0 + 0.3 * torch.randn(shape, generator=g).to(device=device, dtype=dtype)).clamp(0, 1)
    grad = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    grad[::3] = 0  # exact zeros: sign(0) = 0
    return x, grad, x0


def _both(x, grad, x0, **kw):
    want, got = x.clone(), x.clone()
    kw = {"step": 0.02, "eps": 0.2, "lo": 0.0, "hi": 1.0, "active": None, "descent": True} | kw
    pgd_step_reference(want, grad, x0, kw["active"], kw["step"], kw["eps"], kw["lo"], kw["hi"], kw["descent"])
    out = ops.pgd_step_(got, grad, x0, **kw)
    assert out is got
    return got, want


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["descent", "ascent", "eps0", "zero_grad", "all_active", "none_active", "some_active",
                                  "outside_ball", "box", "odd_shape"])
def test_pgd_step_bit_equal_float32(device, case):
    shape = (41, 1271) if case == "odd_shape" else (37, 3, 8, 8)
    x, grad, x0 = _pgd_inputs(device, shape=shape)
    kw = {}
    if case == "ascent":
        kw["descent"] = False
    elif case == "eps0":
        kw["eps"] = 0.0
    elif case == "zero_grad":
        grad = torch.zeros_like(grad)
    elif case == "all_active":
        kw["active"] = torch.ones(x.shape[0], dtype=torch.bool, device=device)
    elif case == "none_active":
        kw["active"] = torch.zeros(x.shape[0], dtype=torch.bool, device=device)
    elif case == "some_active":
        kw["active"] = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(1)).to(device) < 0.5
    elif case == "outside_ball":
        x = (x0 + 0.7).clamp(max=2.0)  # starts outside the eps-ball and the box
    elif case == "box":
        kw.update(lo=-0.25, hi=0.75, step=0.1)
    got, want = _both(x, grad, x0, **kw)
    assert torch.equal(got, want)
    if case == "none_active":
        assert torch.equal(got, x)


@pytest.mark.parametrize("device", DEVICES)
def test_pgd_step_non_contiguous(device):
    x, grad, x0 = _pgd_inputs(device, shape=(60, 3, 10, 10))
    xs, gs, x0s = x[::3, :, ::2], grad[::3, :, ::2], x0[::3, :, ::2]
    base = x.clone()
    got, want = base[::3, :, ::2], xs.clone()
    pgd_step_reference(want, gs, x0s, None, 0.05, 0.1, 0.0, 1.0, True)
    ops.pgd_step_(got, gs, x0s, step=0.05, eps=0.1)
    assert torch.equal(got, want)
    untouched = torch.ones_like(base, dtype=torch.bool)
    untouched[::3, :, ::2] = False
    assert torch.equal(base[untouched], x[untouched])  # only the view was written


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", HALF + (torch.float64,))
def test_pgd_step_other_dtypes(device, dtype):
    x, grad, x0 = _pgd_inputs(device, dtype=dtype)
    active = torch.arange(x.shape[0], device=device) % 2 == 0
    got, want = _both(x, grad, x0, active=active, descent=False)
    if dtype == torch.float64:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=2 * torch.finfo(dtype).eps)
    assert torch.equal(got[~active], x[~active])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("K,B,C", [(3, 100, 10), (1, 7, 1), (0, 5, 10), (2, 41, 33), (4, 64, 1000), (2, 9, 1001),
                                   (2, 3, 5000), (1, 3, 4099)])
def test_cuda_kernels_within_twice_eager_error(K, B, C):
    """Every team size of the CUDA forward, its vector and scalar paths, every dtype, both directions,
    two temperatures, +-1e4 logits on one row: values and gradients within flash-attention's rule
    (twice the eager error in the same dtype against float64, plus a first-order rounding bound)."""
    from memdisc.ops.reference import discrepancy_backward_reference
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for reverse in (False, True):
            for T, huge in [(1.0, False), (2.5, False), (1.0, True), (2.5, True)]:
                cur = (torch.randn(B, C, device="cuda") * 4).to(dtype)
                snap = (torch.randn(K, B, C, device="cuda") * 4).to(dtype)
                if huge and B > 2:
                    cur[1] = cur[1] + 1e4
                    if K:
                        snap[:, 1] = snap[:, 1] - 1e4
                m = max(cur.abs().max().item(), snap.abs().max().item() if snap.numel() else 0.0) / T
                eps = 2.0 ** -52 if dtype == torch.float64 else 2.0 ** -23
                grad = torch.rand(K, B, device="cuda", dtype=torch.float64 if dtype == torch.float64 else torch.float32)
                ref = discrepancy_reference(cur.double(), snap.double(), T, reverse)
                eager = discrepancy_reference(cur, snap, T, reverse)
                out = torch.ops.memdisc.discrepancy(cur, snap, T, reverse)
                gref = discrepancy_backward_reference(grad.double(), cur.double(), snap.double(), ref[1], ref[2], ref[0],
                                                      T, reverse)
                geager = discrepancy_backward_reference(grad, cur, snap, eager[1], eager[2], eager[0], T, reverse)
                gout = torch.ops.memdisc.discrepancy_backward(grad, cur, snap, out[1], out[2], out[0], T, reverse)
                for what, o, e, r in [("kl", out[0], eager[0], ref[0]), ("lse_cur", out[1], eager[1], ref[1]),
                                      ("lse_snap", out[2], eager[2], ref[2]), ("grad_cur", gout[0], geager[0], gref[0]),
                                      ("grad_snap", gout[1], geager[1], gref[1])]:
                    err = (o.double() - r).abs().max().item() if o.numel() else 0.0
                    eager_err = (e.double() - r).abs().max().item() if e.numel() else 0.0
                    rmax = r.abs().max().item() if r.numel() else 0.0
                    assert err <= 2 * eager_err + 16 * eps * (1 + rmax) * (1 + m), \
                        f"{what} {dtype} reverse={reverse} T={T} huge={huge}: err {err:.3g}"


# ----------------------------------------------------------------------------- autograd / opcheck / compile

@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64_both_inputs(device):
    for reverse in (False, True):
        a = _logits((5, 7), device, torch.float64).requires_grad_()
        b = _logits((3, 5, 7), device, torch.float64, seed=1).requires_grad_()
        assert torch.autograd.gradcheck(lambda a, b: ops.discrepancy(a, b, 0.8, reverse), (a, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True])
def test_gradgradcheck_float64_both_inputs(device, reverse):
    """create_graph=True: the backward is differentiable (the compiled kernels' backward is not)."""
    a = _logits((4, 6), device, torch.float64).requires_grad_()
    b = _logits((3, 4, 6), device, torch.float64, seed=1).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a, b: ops.discrepancy(a, b, 0.8, reverse), (a, b))


def test_backward_without_create_graph_uses_the_fused_op():
    a = _logits((4, 6), "cpu").requires_grad_()
    kl = ops.discrepancy(a, _logits((2, 4, 6), "cpu", seed=1))
    with torch.profiler.profile() as prof:
        kl.sum().backward()
    assert "memdisc::discrepancy_backward" in {e.name for e in prof.events()}


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op(device):
    a, b = _logits((6, 9), device), _logits((2, 6, 9), device, seed=1)
    ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
    torch.library.opcheck(torch.ops.memdisc.discrepancy.default, (ar, br, 0.7, False))
    torch.library.opcheck(torch.ops.memdisc.discrepancy.default, (ar, br, 1.0, True))
    kl, lse_a, lse_b = torch.ops.memdisc.discrepancy.default(a, b, 0.7, False)
    torch.library.opcheck(torch.ops.memdisc.discrepancy_backward.default,
                          (torch.rand(2, 6, device=device), a, b, lse_a, lse_b, kl, 0.7, False))
    x, grad, x0 = _pgd_inputs(device, shape=(6, 5))
    torch.library.opcheck(torch.ops.memdisc.pgd_step_.default, (x, grad, x0, None, 0.02, 0.2, 0.0, 1.0, True))
    torch.library.opcheck(torch.ops.memdisc.pgd_step_.default,
                          (x, grad, x0, torch.tensor([True, False] * 3, device=device), 0.02, 0.2, 0.0, 1.0, False))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_matches_eager(device):
    def dsc_step(x, grad, x0, current, snapshots, active):
        kl = ops.discrepancy(current, snapshots, 1.5)
        ops.pgd_step_(x, grad, x0, step=0.02, eps=0.2, active=active)
        return kl.mean(0), x

    x, grad, x0 = _pgd_inputs(device, shape=(8, 3, 4, 4))
    current, snapshots = _logits((8, 10), device), _logits((2, 8, 10), device, seed=1)
    active = torch.arange(8, device=device) % 3 != 0
    x_eager, x_comp = x.clone(), x.clone()
    want = dsc_step(x_eager, grad, x0, current, snapshots, active)
    got = torch.compile(dsc_step, fullgraph=True)(x_comp, grad, x0, current, snapshots, active)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    assert torch.equal(got[1], want[1]) and torch.equal(x_comp, x_eager)


# ----------------------------------------------------------------------------- argument validation

@pytest.mark.parametrize("args,match", [
    ((torch.zeros(3), torch.zeros(1, 3, 2)), "current"),
    ((torch.zeros(3, 2), torch.zeros(3, 2)), "snapshots"),
    ((torch.zeros(3, 2), torch.zeros(1, 4, 2)), "snapshots"),
    ((torch.zeros(3, 2), torch.zeros(1, 3, 2, dtype=torch.float64)), "dtype"),
    ((torch.zeros(3, 2, dtype=torch.int64), torch.zeros(1, 3, 2, dtype=torch.int64)), "dtype"),
    ((torch.zeros(3, 0), torch.zeros(1, 3, 0)), "C must be >= 1"),
    ((torch.zeros(3, 2), torch.zeros(1, 3, 2), 0.0), "temperature"),
    ((torch.zeros(3, 2), torch.zeros(1, 3, 2), -1.0), "temperature"),
    ((torch.zeros(3, 2), torch.zeros(1, 3, 2), float("nan")), "temperature"),
    ((torch.zeros(3, 2), torch.zeros(1, 3, 2), float("inf")), "temperature"),
    ((torch.zeros(3, 2), torch.zeros(1, 3, 2, device="meta")), "snapshots: expected a tensor on cpu like current, got"),
    ((torch.zeros(3, 2, device="meta"), torch.zeros(1, 3, 2)), "snapshots: expected a tensor on meta like current"),
])
def test_discrepancy_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        ops.discrepancy(*args)


def test_ops_refuse_mixed_devices_below_the_wrapper():
    """The fake (meta) kernels check devices too: a raw op call on cpu + meta raises instead of returning garbage."""
    a, b = torch.zeros(3, 2), torch.zeros(1, 3, 2, device="meta")
    with pytest.raises(RuntimeError, match="snapshots is on meta but current is on cpu"):
        torch.ops.memdisc.discrepancy.default(a, b, 1.0, False)
    x = torch.zeros(3, 2)
    with pytest.raises(RuntimeError, match="x0 is on meta but x is on cpu"):
        torch.ops.memdisc.pgd_step_.default(x, x, x.to("meta"), None, 0.1, 0.1, 0.0, 1.0, True)


def test_compiled_kernels_refuse_non_finite_scalars():
    """The C++ checks behind the wrapper's: a raw op call with a non-finite scalar raises."""
    if not ops.extension_loaded():
        pytest.skip("needs the compiled extension")
    x = torch.rand(3, 2)
    with pytest.raises(RuntimeError, match="step, eps, lo and hi must be finite"):
        torch.ops.memdisc.pgd_step_.default(x, x, x, None, float("nan"), 0.1, 0.0, 1.0, True)
    with pytest.raises(RuntimeError, match="temperature must be finite"):
        torch.ops.memdisc.discrepancy.default(x, x[None], float("inf"), False)


@pytest.mark.parametrize("kw,match", [
    ({"grad": torch.zeros(4, 2)}, "grad/x0"),
    ({"x0": torch.zeros(4, 3, dtype=torch.float64)}, "dtype"),
    ({"x": torch.zeros(4, 3, dtype=torch.int32)}, "x"),
    ({"eps": -0.1}, "eps"),
    ({"lo": 1.0, "hi": 0.0}, "lo/hi"),
    ({"active": torch.ones(4)}, "active"),
    ({"active": torch.ones(3, dtype=torch.bool)}, "active"),
    ({"grad": torch.zeros(4, 3, device="meta")}, "grad: expected a tensor on cpu like x, got meta"),
    ({"x0": torch.zeros(4, 3, device="meta")}, "x0: expected a tensor on cpu like x, got meta"),
    ({"active": torch.ones(4, dtype=torch.bool, device="meta")}, "active: expected a tensor on cpu like x, got meta"),
    ({"x": torch.zeros(4, 3, device="meta")}, "grad: expected a tensor on meta like x, got cpu"),
    ({"step": float("nan")}, "step: expected a finite number"),
    ({"step": float("inf")}, "step: expected a finite number"),
    ({"eps": float("inf")}, "eps: expected a finite number"),
    ({"lo": float("-inf")}, "lo: expected a finite number"),
    ({"hi": float("nan")}, "hi: expected a finite number"),
])
def test_pgd_step_bad_arguments(kw, match):
    args = {"x": torch.zeros(4, 3), "grad": torch.zeros(4, 3), "x0": torch.zeros(4, 3), "step": 0.1, "eps": 0.2} | kw
    with pytest.raises(ValueError, match=match):
        ops.pgd_step_(args.pop("x"), args.pop("grad"), args.pop("x0"), **args)


# ----------------------------------------------------------------------------- pgd_step_ and autograd

def _pgd(x, **kw):
    """pgd_step_ on x with fresh grad and x0 (kw overrides them)."""
    args = {"grad": torch.randn(x.shape, device=x.device), "x0": torch.rand(x.shape, device=x.device), "step": 0.1,
            "eps": 0.2} | kw
    return ops.pgd_step_(x, args.pop("grad"), args.pop("x0"), **args)


def test_pgd_step_on_a_leaf_that_requires_grad_raises_like_pytorch():
    leaf = torch.rand(4, 3, requires_grad=True)
    for x in (leaf, leaf[::2]):  # the leaf and a view of it, as torch's own in-place ops
        before = x.detach().clone()
        with pytest.raises(RuntimeError, match="leaf Variable that requires grad is being used in an in-place"):
            _pgd(x)
        assert torch.equal(x.detach(), before)
    with torch.no_grad():  # the usual way: allowed, and x changes
        _pgd(leaf)
    assert leaf._version == 1


@pytest.mark.parametrize("which", ["x", "grad", "x0"])
def test_pgd_step_refuses_inputs_that_require_grad(which):
    """No derivative: under grad mode any input that requires grad is refused, not silently mis-differentiated."""
    w = torch.rand(4, 3, requires_grad=True)
    kw = {which: w * 1.0}
    x = kw.pop("x", torch.rand(4, 3))
    with pytest.raises(RuntimeError, match="pgd_step_ has no derivative"):
        _pgd(x, **kw)
    with torch.no_grad():
        _pgd(x, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_pgd_step_bumps_the_version_of_a_tensor_saved_for_backward(device, mode):
    w = torch.rand(4, 3, device=device, requires_grad=True)
    y = w * 2.0
    loss = (y * y).sum()  # saves y
    plain = torch.rand(4, 3, device=device)
    loss2 = (plain * w).sum()  # saves plain (a tensor that does not require grad)
    with getattr(torch, mode)():
        _pgd(y)
        _pgd(plain)
    assert y._version == 1 and plain._version == 1
    for saved_loss in (loss, loss2):
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            saved_loss.backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_pgd_step_non_finite_values(device, dtype):
    """NaN in x or x0 gives NaN; a NaN gradient counts as sign 0 (projection only); +-inf go through the clamps."""
    nan, inf = float("nan"), float("inf")
    rows = [[nan, 0.5, 0.5, 0.5, inf, -inf, 0.5, 0.5],  # x
            [0.5, nan, 0.5, 0.5, 0.5, 0.5, inf, -inf],  # x0
            [1.0, 1.0, nan, -inf, 1.0, 1.0, 1.0, 1.0]]  # grad
    def tile(r):  # [2, 37]: vector body and scalar tail on every ISA
        return torch.tensor([r] * 2, device=device, dtype=dtype).repeat(1, 5)[:, :37].contiguous()

    x, x0, grad = (tile(r) for r in rows)
    ops.pgd_step_(x, grad, x0, step=0.125, eps=0.25, lo=0.0, hi=1.0)
    want = tile([nan, nan, 0.5, 0.625, 0.75, 0.25, 1.0, 0.0]).cpu()
    torch.testing.assert_close(x.cpu(), want, equal_nan=True, rtol=0, atol=0)


# ----------------------------------------------------------------------------- loader fallback and ISA variants

def _python(code, **env):
    drop = ("MEMDISC_REQUIRE_EXTENSION", "MEMDISC_DISABLE_EXTENSION", "MEMDISC_CPU_ISA")
    full_env = {k: v for k, v in os.environ.items() if k not in drop} | env
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, cwd=REPO, timeout=120)


_FALLBACK_CHECK = """
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import memdisc.ops as ops
        import memdisc.ops.library  # a second import must not warn again
    import torch
    from memdisc.ops.reference import discrepancy_reference
    assert not ops.extension_loaded(), "the extension should not have loaded"
    msgs = [str(w.message) for w in caught if "compiled kernels unavailable" in str(w.message)]
    assert len(msgs) == 1, msgs
    a, b = torch.randn(7, 5), torch.randn(2, 7, 5)
    assert torch.allclose(ops.discrepancy(a, b), discrepancy_reference(a, b)[0])
    from memdisc.ops.reference import pgd_step_reference
    x = torch.rand(3, 4); x0 = x.clone(); g = torch.randn(3, 4); want = x.clone()
    ops.pgd_step_(x, g, x0, step=0.1, eps=0.05)
    pgd_step_reference(want, g, x0, None, 0.1, 0.05, 0.0, 1.0, True)
    assert torch.equal(x, want)
    print("MSG", msgs[0])
"""


def test_fallback_when_extension_disabled():
    r = _python(_FALLBACK_CHECK, MEMDISC_DISABLE_EXTENSION="1")
    assert r.returncode == 0, r.stderr
    assert "MEMDISC_DISABLE_EXTENSION" in r.stdout


def test_fallback_when_build_info_names_another_torch(tmp_path):
    """A copy of the package whose _build_info.json claims another torch must fall back with a warning."""
    import shutil
    pkg = tmp_path / "memdisc"
    shutil.copytree(os.path.join(REPO, "memdisc"), pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "_build_info.json").write_text(json.dumps({"torch": "0.0.1-other", "cuda": None}))
    r = _python("import sys; sys.path.insert(0, %r)\n" % str(tmp_path) + textwrap.dedent(_FALLBACK_CHECK)
                + "\nimport memdisc; assert memdisc.__file__.startswith(%r)" % str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "0.0.1-other" in r.stdout


def test_cpu_isa_variants_agree():
    """Every instruction-set variant of the CPU kernels (capped by MEMDISC_CPU_ISA) gives the same results."""
    if not ops.extension_loaded():
        pytest.skip("needs the compiled extension")
    code = """
        import torch, memdisc.ops as ops
        torch.manual_seed(0)
        a, b = torch.randn(45, 37) * 4, torch.randn(3, 45, 37) * 4
        ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
        kl = ops.discrepancy(ar, br, 0.9, False) + ops.discrepancy(ar, br, 0.9, True)
        kl.sum().backward()
        x = torch.rand(45, 37); ops.pgd_step_(x, a, x.clone() * 0.9, step=0.05, eps=0.03)
        from memdisc.ops.extension import kernel_isa
        torch.save({"isa": kernel_isa(), "kl": kl.detach(), "ga": ar.grad, "gb": br.grad, "x": x},
                   %r)
    """
    results = []
    for isa in ("default", "avx2", "best"):  # "best": whatever this CPU supports (AVX-512 here)
        path = os.path.join(REPO, ".pytest_cache", f"isa_{isa}_{os.getpid()}.pt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        r = _python(code % path, MEMDISC_CPU_ISA=isa)
        assert r.returncode == 0, r.stderr
        results.append(torch.load(path))
        os.remove(path)
    assert results[0]["isa"] == "default"
    for res in results[1:]:
        for key in ("kl", "ga", "gb"):
            torch.testing.assert_close(res[key], results[0][key], rtol=1e-5, atol=1e-6)
        assert torch.equal(res["x"], results[0]["x"])
