"""Build memdisc and its compiled extension ``memdisc._C``.

The extension holds the CPU kernels always, and the CUDA kernels when the
installed torch was built with CUDA and nvcc is found.  Environment switches:

* ``MEMDISC_NO_EXTENSION=1`` builds the pure-Python package only (the ops then
  run their PyTorch reference implementation).
* ``MEMDISC_NO_CUDA=1`` builds the CPU kernels only, even with CUDA present.
* ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (default ``9.0``).
* ``CUDA_HOME`` (or ``CUDA_PATH``) names the CUDA toolkit; unset, it is found
  from nvcc itself (see ``_cuda_home``).

The C++ standard is left to torch's extension builder, which passes the one
its headers need (torch 2.13 and 2.14 pass C++20; 2.14's headers refuse
anything older); the compiled module reports the one used (``memdisc info``).

Build with ``pip install --no-build-isolation -e .`` so the extension is
compiled against the torch that is already installed.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _toolkit(path):
    """path, resolved, if it is a CUDA toolkit (include/cuda_runtime_api.h and bin/nvcc), else None."""
    if path and all(os.path.isfile(os.path.join(path, *f)) for f in (("include", "cuda_runtime_api.h"),
                                                                       ("bin", "nvcc"))):
        return os.path.realpath(path)
    return None


def _cuda_home():
    """The CUDA toolkit's own directory, or None.

    CUDA_HOME or CUDA_PATH when set (a wrong one is an error, not a guess); else the
    directory nvcc reports as its own (``nvcc --dryrun`` prints ``TOP=<toolkit>/bin/..``:
    right also when the nvcc on PATH is a link or a wrapper script in a ``bin`` folder
    outside the toolkit, where torch's own guess, the parent of that folder, has no
    CUDA headers); else the real path of nvcc's parent; else /usr/local/cuda.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            home = _toolkit(os.environ[var])
            if home is None:
                raise SystemExit(f"{var}={os.environ[var]}: expected a CUDA toolkit directory "
                                 "(with include/cuda_runtime_api.h and bin/nvcc)")
            return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            run = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                                 timeout=60)
            top = re.search(r"^#\$ TOP=(.+)$", run.stderr + run.stdout, re.M)
            home = _toolkit(top.group(1).strip()) if top else None
            if home:
                return home
        except (OSError, subprocess.SubprocessError):
            pass
        home = _toolkit(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        if home:
            return home
    return _toolkit("/usr/local/cuda")


def _no_cuda_reason(torch):
    """Why the CUDA kernels are not built (for memdisc info)."""
    if _flag("MEMDISC_NO_CUDA"):
        return "MEMDISC_NO_CUDA=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    nvcc = shutil.which("nvcc")
    where = f"nvcc at {nvcc} reports no toolkit" if nvcc else "no nvcc on PATH"
    return f"torch {torch.__version__} is a CUDA build but no CUDA toolkit was found ({where}, " \
           "CUDA_HOME and CUDA_PATH unset, no /usr/local/cuda): set CUDA_HOME"


def _extensions():
    if _flag("MEMDISC_NO_EXTENSION"):
        return [], {}
    import torch

    want_cuda = not _flag("MEMDISC_NO_CUDA") and torch.version.cuda is not None
    cuda_home = _cuda_home() if want_cuda else None
    if cuda_home:
        # torch reads CUDA_HOME once, when cpp_extension is first imported.
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension as ce
    if cuda_home:
        ce.CUDA_HOME = cuda_home

    cpu_sources = sorted(glob.glob(os.path.join("csrc", "bindings", "*_cpu.cpp")))
    cpu_sources.append(os.path.join("csrc", "bindings", "module.cpp"))
    use_cuda = cuda_home is not None
    cxx = ["-O3", "-fopenmp"]
    include = [os.path.join(ROOT, "csrc")]
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        sources = (cpu_sources + sorted(glob.glob(os.path.join("csrc", "bindings", "*_cuda.cpp")))
                   + sorted(glob.glob(os.path.join("csrc", "kernels", "*.cu"))))
        ext = ce.CUDAExtension(
            "memdisc._C", sources, include_dirs=include, define_macros=[("MEMDISC_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"], py_limited_api=False)
    else:
        ext = ce.CppExtension("memdisc._C", cpu_sources, include_dirs=include,
                              extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    skipped = None if use_cuda else _no_cuda_reason(torch)
    if want_cuda and not use_cuda:
        print(f"memdisc: building the CPU kernels only: {skipped}", file=sys.stderr)
    _write_build_info({"torch": torch.__version__, "cuda": torch.version.cuda if use_cuda else None,
                       "cuda_home": cuda_home, "cuda_arch_list": os.environ["TORCH_CUDA_ARCH_LIST"] if use_cuda else None,
                       "cuda_skipped": skipped})
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


def _write_build_info(info):
    """Record what the extension is built against (the loader checks the torch version;
    ``memdisc info`` prints the rest)."""
    path = os.path.join(ROOT, "memdisc", "_build_info.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)


if __name__ == "__main__":  # also under pip: setuptools' build backend runs this file as __main__
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
