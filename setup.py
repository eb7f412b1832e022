"""Build memdisc and its compiled extension ``memdisc._C``.

The extension holds the CPU kernels always, and the CUDA kernels when the
installed torch was built with CUDA and nvcc is found.  Environment switches:

* ``MEMDISC_NO_EXTENSION=1`` builds the pure-Python package only (the ops then
  run their PyTorch reference implementation).
* ``MEMDISC_NO_CUDA=1`` builds the CPU kernels only, even with CUDA present.
* ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (default ``9.0``).

Build with ``pip install --no-build-isolation -e .`` so the extension is
compiled against the torch that is already installed.
"""
import glob
import json
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("MEMDISC_NO_EXTENSION"):
        return [], {}
    import torch
    from torch.utils import cpp_extension as ce

    cpu_sources = sorted(glob.glob(os.path.join("csrc", "bindings", "*_cpu.cpp")))
    cpu_sources.append(os.path.join("csrc", "bindings", "module.cpp"))
    use_cuda = (not _flag("MEMDISC_NO_CUDA")) and torch.version.cuda is not None and ce.CUDA_HOME is not None
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    include = [os.path.join(ROOT, "csrc")]
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        sources = (cpu_sources + sorted(glob.glob(os.path.join("csrc", "bindings", "*_cuda.cpp")))
                   + sorted(glob.glob(os.path.join("csrc", "kernels", "*.cu"))))
        ext = ce.CUDAExtension(
            "memdisc._C", sources, include_dirs=include, define_macros=[("MEMDISC_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
            extra_link_args=["-fopenmp"], py_limited_api=False)
    else:
        ext = ce.CppExtension("memdisc._C", cpu_sources, include_dirs=include,
                              extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    _write_build_info(torch.__version__, torch.version.cuda if use_cuda else None)
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


def _write_build_info(torch_version, cuda_version):
    """Record which torch the extension is built against; the loader checks it."""
    path = os.path.join(ROOT, "memdisc", "_build_info.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"torch": torch_version, "cuda": cuda_version}, f)
    os.replace(tmp, path)


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
