"""The compiled extension ``memdisc._C``: loading it, and what it is.

:func:`load` imports ``memdisc._C`` when it exists and was built for this torch; its
``TORCH_LIBRARY_IMPL(memdisc, CPU|CUDA)`` kernels then take precedence over the reference
registered in :mod:`memdisc.ops.library`.  A missing or mismatched build warns once and the
reference kernels serve every call.  :func:`extension_report`, :func:`missing_kernels` and
:func:`kernel_isa` say what the loaded build is (``memdisc info``, CI's registration checks).

Environment:
  MEMDISC_REQUIRE_EXTENSION=1  a missing or mismatched build raises instead of warning.
  MEMDISC_DISABLE_EXTENSION=1  never load the build (reference kernels only).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

_BUILD_INFO = Path(__file__).resolve().parent.parent / "_build_info.json"  # written by setup.py
_STATE = {"loaded": False, "error": None}


def _read_build_info() -> dict | None:
    """setup.py's record of what the extension was built against (None when there is none)."""
    return json.loads(_BUILD_INFO.read_text()) if _BUILD_INFO.exists() else None


def load() -> None:
    """Import memdisc._C if it exists and matches this torch; otherwise warn once (or raise)."""
    if os.environ.get("MEMDISC_DISABLE_EXTENSION", "0") == "1":
        _STATE["error"] = "disabled by MEMDISC_DISABLE_EXTENSION=1"
        warnings.warn(f"memdisc: compiled kernels unavailable ({_STATE['error']}); using the PyTorch reference "
                      "kernels.", RuntimeWarning, stacklevel=3)
        return
    try:
        built = _read_build_info()
        if built is not None:
            built_for = built["torch"]
            if built_for != torch.__version__:
                raise ImportError(f"memdisc._C was built for torch {built_for}, this is torch {torch.__version__}; "
                                  "rebuild with `pip install --no-build-isolation -e .`")
        import memdisc._C  # noqa: F401  (registers the kernels)
        _STATE["loaded"] = True
    except (ImportError, OSError) as exc:
        _STATE["error"] = str(exc)
        if os.environ.get("MEMDISC_REQUIRE_EXTENSION", "0") == "1":
            raise ImportError(f"MEMDISC_REQUIRE_EXTENSION=1 but the memdisc extension did not load: {exc}") from exc
        warnings.warn(f"memdisc: compiled kernels unavailable ({exc}); using the PyTorch reference kernels.",
                      RuntimeWarning, stacklevel=3)


def extension_loaded() -> bool:
    """True when the compiled kernels of memdisc._C are registered."""
    return _STATE["loaded"]


def extension_error():
    """Why the extension did not load (None when it did)."""
    return _STATE["error"]


KERNEL_OPS = ("discrepancy", "discrepancy_backward", "pgd_step_")


def kernel_isa() -> str:
    """The instruction set memdisc's CPU kernels run with in this process: "avx512", "avx2" or
    "default" (capped by MEMDISC_CPU_ISA), or "reference" when the extension is not loaded."""
    if not _STATE["loaded"]:
        return "reference"
    import memdisc._C
    return memdisc._C.cpu_isa()


def extension_report() -> dict:
    """What the loaded build is: ``built_against`` (setup.py's record: torch, CUDA version, CUDA
    toolkit directory, architectures), ``compiled_with`` (the extension's own ``build_info`` parsed:
    torch, ``cxx`` = the host compiler's ``__cplusplus``, and with CUDA ``cuda_cxx``, ``cudart``,
    ``cuda_arch``), and ``kernels``: for each op, the devices (CPU, CUDA) whose dispatch key has
    a kernel of its own registered (the reference is registered as CompositeExplicitAutograd
    only).  Empty dict when the extension is not loaded."""
    if not _STATE["loaded"]:
        return {}
    import memdisc._C
    compiled = dict(item.split("=", 1) for item in memdisc._C.build_info().split(";"))
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    kernels = {op: [key for key in ("CPU", "CUDA") if has(f"memdisc::{op}", key)] for op in KERNEL_OPS}
    return {"built_against": _read_build_info(), "compiled_with": compiled, "kernels": kernels}


def missing_kernels(devices: tuple[str, ...] = ("CPU", "CUDA")) -> list[str]:
    """``"op: DEVICE"`` for every op of KERNEL_OPS without a compiled kernel on one of ``devices``
    (all of them when the extension is not loaded): the check that a build registered what it should."""
    kernels = extension_report().get("kernels", {})
    return [f"{op}: {d}" for op in KERNEL_OPS for d in devices if d not in kernels.get(op, [])]
