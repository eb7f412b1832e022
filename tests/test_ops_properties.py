"""Property-based tests of the memdisc ops (hypothesis): classes of inputs, not examples.

Each test draws shapes (B = 0, K = 0 and C = 1 included), dtypes (float32,
float64, float16, bfloat16), strides (contiguous, transposed, sliced with
NaN-filled gaps, expanded), non-finite values (NaN, +-inf), temperatures,
directions, active masks, devices (cpu, meta) and autograd settings, and checks
the public op (the compiled kernel when memdisc._C is loaded, the PyTorch
reference otherwise) against memdisc.ops.reference:

* discrepancy: against the reference in float64.  Finite results are within
  twice the error of the eager reference in the input dtype (flash-attention's
  rule) plus the kernels' error model (csrc/tests/test_kernels.cpp), which does
  not depend on the ISA: with m = 1 + max|z|/T over the row pair,
  |kl error| <= 16 eps m (1 + |kl| + log C) and a gradient term's error
  <= 16 eps m (|term| + |g| / T) (summed over k for current), plus half an ulp
  of the output dtype.  Non-finite results sit where the reference's do (NaN
  for NaN; an infinity may come out NaN when float32 underflows a probability
  the float64 reference keeps); in a row whose KL is not finite the gradients
  are non-finite at least where the reference's are.  Twice differentiable:
  second derivatives equal those of autograd through the reference.
* pgd_step_: bit-equal to the reference in float32/float64 (NaN where it has
  NaN), within a rounding or two in float16/bfloat16 (the reference rounds the
  scalars step, eps, lo, hi to the half type, the kernel keeps them in
  float32); inactive rows and the memory around a strided x are left
  bit-for-bit alone.
* bad input: mixed devices, non-finite scalars, overlapping x and inputs that
  require grad under grad mode raise, naming the argument; x's version counter
  is bumped once per call.

Settings: derandomize=True (reproducible in CI), deadline=None; the file runs
in well under a minute on two cores.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memdisc.ops as ops
from memdisc.ops.reference import discrepancy_backward_reference, discrepancy_reference, pgd_step_reference

NAN, INF = float("nan"), float("inf")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
            torch.bfloat16: torch.int16}
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")


def _settings(n: int):
    return settings(max_examples=n, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _inject(t: torch.Tensor, specials, gen: torch.Generator) -> torch.Tensor:
    """t with each value of specials written at a random position (t unchanged when empty)."""
    flat = t.clone().reshape(-1)
    for v in specials:
        if flat.numel():
            flat[torch.randint(flat.numel(), (1,), generator=gen)] = v
    return flat.reshape(t.shape)


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of t in a tensor with other strides ("expanded" repeats t[0] along dim 0)."""
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "sliced":
        big = torch.full(t.shape[:-1] + (2 * t.shape[-1],), NAN, dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "expanded" and t.shape[0] > 0:
        return t[:1].expand(t.shape)
    return t.contiguous()


def _nonfinite_pattern_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    for f in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(f(got), f(want)), f"{f.__name__} positions differ"


def _check(got: torch.Tensor, eager: torch.Tensor, want: torch.Tensor, tol: torch.Tensor,
           loose: torch.Tensor) -> None:
    """got vs the float64 want: NaN wherever want has NaN, non-finite wherever want is (an infinity may
    come out NaN: float32 underflows a tiny p to 0, and 0 * inf = NaN), the same infinity where both are
    infinite, finite wherever want is except where loose, and where both are finite
    |got - want| <= 2 max|eager - want| + tol (eager: the reference in the input dtype)."""
    got, eager = got.detach().double(), eager.double()
    assert not (want.isnan() & ~got.isnan()).any(), "a NaN of the reference was swallowed"
    assert not (~want.isfinite() & got.isfinite()).any(), "an infinity of the reference was lost"
    assert not (want.isfinite() & ~got.isfinite() & ~loose).any(), "non-finite where the reference is finite"
    both_inf = want.isinf() & got.isinf()
    assert torch.equal(got[both_inf], want[both_inf]), "infinities of opposite sign"
    both, eager_ok = got.isfinite() & want.isfinite(), eager.isfinite() & want.isfinite()
    tol = tol + 2 * ((eager - want).abs()[eager_ok].max() if eager_ok.any() else 0.0)
    err = (got - want).abs()[both]
    assert (err <= tol[both]).all(), f"max err {err.max().item():.3g}, tol there {tol[both][err.argmax()]:.3g}"


# ----------------------------------------------------------------------------- discrepancy

@_settings(300)
@given(K=st.integers(0, 10), B=st.integers(0, 40), C=st.one_of(st.integers(1, 20), st.integers(21, 70)),
       dtype=st.sampled_from(DTYPES), layout_a=st.sampled_from(LAYOUTS), layout_b=st.sampled_from(LAYOUTS),
       scale=st.sampled_from([0.01, 1.0, 3.0, 30.0, 1e4]),
       specials_a=st.lists(st.sampled_from([NAN, INF, -INF]), max_size=2),
       specials_b=st.lists(st.sampled_from([NAN, INF, -INF]), max_size=2),
       temperature=st.floats(0.05, 20.0), reverse=st.booleans(), seed=st.integers(0, 2**16))
def test_discrepancy_matches_float64_reference(K, B, C, dtype, layout_a, layout_b, scale, specials_a, specials_b,
                                               temperature, reverse, seed):
    gen = torch.Generator().manual_seed(seed)
    a = _inject(torch.randn(B, C, generator=gen, dtype=torch.float64) * scale, specials_a, gen).to(dtype)
    b = _inject(torch.randn(K, B, C, generator=gen, dtype=torch.float64) * scale, specials_b, gen).to(dtype)
    a, b = _layout(a, layout_a), _layout(b, layout_b)
    g = torch.rand(K, B, generator=gen, dtype=torch.float64) + 0.5  # upstream gradient, not ones

    ar, br = a.detach().requires_grad_(), b.detach().requires_grad_()
    kl = ops.discrepancy(ar, br, temperature, reverse)
    assert kl.shape == (K, B) and kl.dtype == _acc(dtype) and kl.device == a.device
    (kl * g.to(kl.dtype)).sum().backward()
    assert ar.grad.dtype == dtype and br.grad.dtype == dtype

    a64, b64 = a.double(), b.double()
    want, lse_a, lse_b = discrepancy_reference(a64, b64, temperature, reverse)
    ga, gb = discrepancy_backward_reference(g, a64, b64, lse_a, lse_b, want, temperature, reverse)
    eager = discrepancy_reference(a, b, temperature, reverse)
    eager_ga, eager_gb = discrepancy_backward_reference(g.to(kl.dtype), a, b, *eager[1:], eager[0], temperature,
                                                        reverse)

    # the error model, m per (k, i) row pair over its finite logits; the tolerances add the float64
    # oracle's own error (same model; its kl, from unshifted logits, also carries eps m |kl| into the gradients)
    zmax = torch.maximum(a64.nan_to_num(0, 0, 0).abs().amax(-1, keepdim=True),
                         b64.nan_to_num(0, 0, 0).abs().amax(-1, keepdim=True))  # [K, B, 1]
    m = 1 + zmax / temperature
    eps, eps_ref, out_eps = _eps(_acc(dtype)) + _eps(torch.float64), _eps(torch.float64), _eps(dtype) / 2
    kl_bad = ~want.isfinite()
    _check(kl, eager[0], want, 16 * eps * m[..., 0] * (1 + want.abs() + math.log(C)), torch.zeros_like(kl_bad))

    # gradients of a row pair whose KL is not finite: only their non-finite positions are pinned (float32
    # underflows p to 0 where float64 keeps a tiny p: 0 * inf = NaN instead of -inf)
    gt = (g / temperature).unsqueeze(-1)
    row_tol = 16 * m * gt * (eps + eps_ref * want.nan_to_num(0, 0, 0).abs().unsqueeze(-1))  # [K, B, 1]
    tol_gb = 16 * eps * m * gb.abs() + row_tol + out_eps * gb.abs()
    _check(br.grad, eager_gb, gb, tol_gb, kl_bad.unsqueeze(-1).expand(K, B, C))
    ga_terms = torch.stack([discrepancy_backward_reference(g * (torch.arange(K) == k).unsqueeze(-1), a64, b64,
                                                           lse_a, lse_b, want, temperature, reverse)[0]
                            for k in range(K)]) if K else gb
    tol_ga = (16 * eps * m * ga_terms.abs() + row_tol).sum(0) + out_eps * ga.abs()
    _check(ar.grad, eager_ga, ga, tol_ga, kl_bad.any(0).unsqueeze(-1).expand(B, C))


@_settings(40)
@given(K=st.integers(1, 3), B=st.integers(1, 4), C=st.integers(1, 6), temperature=st.floats(0.3, 3.0),
       reverse=st.booleans(), seed=st.integers(0, 2**16))
def test_discrepancy_second_derivatives_match_reference(K, B, C, temperature, reverse, seed):
    """create_graph=True: the gradients are differentiable and their derivatives are the reference's."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(B, C, generator=gen, dtype=torch.float64) * 3, torch.randn(K, B, C, generator=gen,
                                                                                 dtype=torch.float64) * 3
    g, u, w = torch.rand(K, B, generator=gen, dtype=torch.float64), torch.randn_like(a), torch.randn_like(b)

    def second(fn):
        ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
        ga, gb = torch.autograd.grad((fn(ar, br) * g).sum(), (ar, br), create_graph=True)
        return torch.autograd.grad((ga * u).sum() + (gb * w).sum(), (ar, br), allow_unused=True,
                                   materialize_grads=True)

    got = second(lambda a, b: ops.discrepancy(a, b, temperature, reverse))
    want = second(lambda a, b: discrepancy_reference(a, b, temperature, reverse)[0])
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)


# ----------------------------------------------------------------------------- pgd_step_

_NAMES = ("x", "grad", "x0")


@_settings(500)
@given(shape=st.tuples(st.integers(0, 12), st.lists(st.integers(1, 7), max_size=3)), dtype=st.sampled_from(DTYPES),
       layouts=st.tuples(st.sampled_from(LAYOUTS[:3]), st.sampled_from(LAYOUTS), st.sampled_from(LAYOUTS)),
       specials=st.lists(st.tuples(st.sampled_from(_NAMES), st.sampled_from([NAN, INF, -INF])), max_size=4),
       step=st.floats(0.0, 0.5), eps=st.floats(0.0, 0.5), lo=st.floats(-2.0, 1.0), width=st.floats(0.0, 2.0),
       active=st.sampled_from([None, "random", "none"]), descent=st.booleans(), seed=st.integers(0, 2**16))
def test_pgd_step_matches_reference(shape, dtype, layouts, specials, step, eps, lo, width, active, descent, seed):
    gen = torch.Generator().manual_seed(seed)
    size = (shape[0], *shape[1])
    hi = lo + width
    x0 = torch.rand(size, generator=gen, dtype=torch.float64) * (width + 0.6) + (lo - 0.3)
    vals = {"x0": x0, "x": x0 + 0.3 * torch.randn(size, generator=gen, dtype=torch.float64),
            "grad": torch.randn(size, generator=gen, dtype=torch.float64) * (torch.rand(size, generator=gen) > 0.3)}
    for name, v in specials:
        vals[name] = _inject(vals[name], [v], gen)
    x, grad, x0 = (_layout(vals[n].to(dtype), lay) for n, lay in zip(_NAMES, layouts))
    mask = {None: None, "none": torch.zeros(size[0], dtype=torch.bool),
            "random": torch.rand(size[0], generator=gen) < 0.5}[active]
    before = x.clone()
    want = x.clone().contiguous()
    pgd_step_reference(want, grad, x0, mask, step, eps, lo, hi, descent)

    version = x._version
    assert ops.pgd_step_(x, grad, x0, step=step, eps=eps, lo=lo, hi=hi, active=mask, descent=descent) is x
    assert x._version == version + 1
    _nonfinite_pattern_equal(x, want)
    fin = want.isfinite()
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(x[fin], want[fin])
    else:  # the reference rounds step, eps, lo and hi to the half type first, the kernel keeps them in float32
        mag = sum(t.double().nan_to_num(0, 0, 0).abs() for t in (before, x0)) + step + eps + abs(lo) + abs(hi)
        assert ((x.double() - want.double()).abs()[fin] <= (2 * _eps(dtype) * mag)[fin]).all()
    if mask is not None:
        kept = ~mask
        assert torch.equal(x[kept].view(INT_VIEW[dtype]), before[kept].view(INT_VIEW[dtype]))
    if layouts[0] == "sliced":  # the NaN gaps between the elements of x are untouched
        assert x._base[..., 1::2].isnan().all()


@_settings(30)
@given(shape=st.tuples(st.integers(2, 6), st.integers(1, 5)), dtype=st.sampled_from(DTYPES))
def test_pgd_step_refuses_an_x_whose_elements_overlap(shape, dtype):
    x = torch.rand(1, shape[1]).to(dtype).expand(shape)
    with pytest.raises(RuntimeError, match="single memory location"):
        ops.pgd_step_(x, torch.randn(shape).to(dtype), torch.rand(shape).to(dtype), step=0.1, eps=0.1)


@_settings(150)
@given(which=st.sampled_from(["none", "leaf", "view_of_leaf", "non_leaf", "grad", "x0"]),
       mode=st.sampled_from(["grad", "no_grad", "inference_mode"]), dtype=st.sampled_from(DTYPES),
       B=st.integers(1, 5))
def test_pgd_step_autograd_like_pytorch_inplace_ops(which, mode, dtype, B):
    """Under grad mode an input that requires grad raises (PyTorch's message for a leaf x or a view of one);
    otherwise the step runs, bumps x's version once, and a backward that saved x raises."""
    w = torch.rand(2 * B, 3, dtype=dtype, requires_grad=True)
    x = {"leaf": torch.rand(B, 3, dtype=dtype, requires_grad=True), "view_of_leaf": w[::2],
         "non_leaf": w[:B] * 1.0}.get(which, torch.rand(B, 3).to(dtype))
    loss = (x * x).sum() if which == "non_leaf" else None  # saves x for backward
    grad = w[:B] * 1.0 if which == "grad" else torch.randn(B, 3).to(dtype)
    x0 = w[:B] * 1.0 if which == "x0" else torch.rand(B, 3).to(dtype)
    before, version = x.detach().clone(), x._version
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    if mode == "grad" and which != "none":
        match = {"leaf": "^a leaf Variable that requires grad is being used in an in-place operation",
                 "view_of_leaf": "^a view of a leaf Variable that requires grad"}.get(which, "has no derivative")
        with pytest.raises(RuntimeError, match=match):
            ops.pgd_step_(x, grad, x0, step=0.1, eps=0.2)
        assert torch.equal(x.detach(), before) and x._version == version
        return
    with context():
        ops.pgd_step_(x, grad, x0, step=0.1, eps=0.2)
    want = before.clone()
    pgd_step_reference(want, grad.detach(), x0.detach(), None, 0.1, 0.2, 0.0, 1.0, True)
    torch.testing.assert_close(x.detach(), want, rtol=0, atol=2 * _eps(dtype))  # half: one rounding of step
    assert x._version == version + 1
    if loss is not None:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


# ----------------------------------------------------------------------------- devices and scalars

@_settings(150)
@given(op=st.sampled_from(["discrepancy", "pgd_step_"]), on_meta=st.sets(st.integers(0, 3), max_size=4),
       dtype=st.sampled_from(DTYPES), B=st.integers(0, 5), C=st.integers(1, 5))
def test_devices_must_match(op, on_meta, dtype, B, C):
    """All on one device (cpu or meta) works; any mix is a ValueError from the wrapper naming the first argument
    that differs, and a RuntimeError from the raw op (its fake kernel checks devices too)."""
    if op == "discrepancy":
        names, tensors = ("current", "snapshots"), [torch.randn(B, C), torch.randn(2, B, C)]
    else:
        names, tensors = ("x", "grad", "x0", "active"), [torch.rand(B, C), torch.randn(B, C), torch.rand(B, C),
                                                         torch.ones(B, dtype=torch.bool)]
    tensors = [(t.to("meta") if i in on_meta else t).to(dtype if t.is_floating_point() else t.dtype)
               for i, t in enumerate(tensors)]
    devices = [t.device.type for t in tensors]
    if op == "discrepancy":
        call = lambda: ops.discrepancy(*tensors)  # noqa: E731
        raw = lambda: torch.ops.memdisc.discrepancy.default(*tensors, 1.0, False)  # noqa: E731
    else:
        call = lambda: ops.pgd_step_(*tensors[:3], active=tensors[3], step=0.1, eps=0.2)  # noqa: E731
        raw = lambda: torch.ops.memdisc.pgd_step_.default(*tensors, 0.1, 0.2, 0.0, 1.0, True)  # noqa: E731
    if len(set(devices)) == 1:
        out = call()
        assert out.device == tensors[0].device
        if op == "discrepancy":
            assert out.shape == (2, B) and out.dtype == _acc(dtype)
        return
    first = next(i for i, d in enumerate(devices) if d != devices[0])
    with pytest.raises(ValueError, match=f"^{names[first]}: expected a tensor on {devices[0]} like {names[0]}, "
                                         f"got {devices[first]}$"):
        call()
    with pytest.raises(RuntimeError, match="is on"):
        raw()


@_settings(40)
@given(name=st.sampled_from(["step", "eps", "lo", "hi", "temperature"]),
       value=st.sampled_from([NAN, INF, -INF]))
def test_non_finite_scalars_are_refused(name, value):
    x = torch.rand(3, 4)
    before = x.clone()
    with pytest.raises(ValueError, match=f"^{name}: expected a finite"):
        if name == "temperature":
            ops.discrepancy(torch.randn(3, 4), torch.randn(2, 3, 4), value)
        else:
            ops.pgd_step_(x, torch.randn(3, 4), x.clone(), **({"step": 0.1, "eps": 0.2} | {name: value}))
    assert torch.equal(x, before)
