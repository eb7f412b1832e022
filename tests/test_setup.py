"""setup.py's search for the CUDA toolkit (``_cuda_home``), on fake toolkits and fake nvcc scripts.

CI's machines have /usr/local/cuda, so a broken search would still build there; these tests
pin each rule: CUDA_HOME / CUDA_PATH first (a wrong one is an error), else the toolkit nvcc
names itself (``#$ TOP=`` of ``nvcc --dryrun``: right for a wrapper script outside the toolkit),
else the real path of a linked nvcc.
"""
from __future__ import annotations

import os
import runpy
import stat
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parent.parent / "setup.py"


@pytest.fixture()
def cuda_home(monkeypatch):
    """setup.py's ``_cuda_home`` with CUDA_HOME / CUDA_PATH unset and an empty PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", "")
    return runpy.run_path(str(SETUP), run_name="memdisc_setup")["_cuda_home"]


def _toolkit(root: Path) -> Path:
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime_api.h").write_text("")
    (root / "bin").mkdir()
    _script(root / "bin" / "nvcc", "")
    return root


def _script(path: Path, stderr_line: str) -> Path:
    path.write_text(f"#!/bin/sh\necho '{stderr_line}' >&2\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_nvcc_wrapper_outside_the_toolkit_names_it(cuda_home, tmp_path, monkeypatch):
    toolkit = _toolkit(tmp_path / "cuda-13.0")
    bin_dir = tmp_path / "local" / "bin"  # torch's guess would be tmp_path/local: no headers there
    bin_dir.mkdir(parents=True)
    _script(bin_dir / "nvcc", f"#$ TOP={toolkit}/bin/..")
    monkeypatch.setenv("PATH", str(bin_dir))
    assert cuda_home() == str(toolkit)


def test_a_linked_nvcc_resolves_to_its_toolkit(cuda_home, tmp_path, monkeypatch):
    toolkit = _toolkit(tmp_path / "cuda")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(toolkit / "bin" / "nvcc", bin_dir / "nvcc")  # prints no TOP line
    monkeypatch.setenv("PATH", str(bin_dir))
    assert cuda_home() == str(toolkit)


def test_cuda_home_and_cuda_path_come_first(cuda_home, tmp_path, monkeypatch):
    home, path = _toolkit(tmp_path / "a"), _toolkit(tmp_path / "b")
    monkeypatch.setenv("CUDA_PATH", str(path))
    assert cuda_home() == str(path)
    monkeypatch.setenv("CUDA_HOME", str(home))
    assert cuda_home() == str(home)


@pytest.mark.parametrize("var", ["CUDA_HOME", "CUDA_PATH"])
def test_a_wrong_cuda_home_is_an_error_naming_it(cuda_home, tmp_path, monkeypatch, var):
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime_api.h").write_text("")  # headers but no bin/nvcc
    monkeypatch.setenv(var, str(tmp_path))
    with pytest.raises(SystemExit, match=rf"^{var}={tmp_path}: expected a CUDA toolkit directory"):
        cuda_home()


def test_no_toolkit_anywhere_is_none(cuda_home, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir / "nvcc", f"#$ TOP={tmp_path}/nowhere/bin/..")
    monkeypatch.setenv("PATH", str(bin_dir))
    expected = str(Path("/usr/local/cuda").resolve()) if (Path("/usr/local/cuda/include/cuda_runtime_api.h").is_file()
                                                          and Path("/usr/local/cuda/bin/nvcc").is_file()) else None
    assert cuda_home() == expected
