"""scripts/guard_own_loop.py, the worked example of guarding a user's own loop, runs end to end."""
from __future__ import annotations

import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "guard_own_loop.py"
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("attack", [False, True])
def test_guard_example_runs_on_small_files(tiny_fashion_mnist, capsys, attack):
    main = runpy.run_path(str(SCRIPT))["main"]
    result = main(["--data-dir", str(tiny_fashion_mnist), "--steps", "3"] + (["--attack"] if attack else []))
    out = capsys.readouterr().out
    assert "deployed model: test error" in out and "step    3:" in out and "final test error" in out
    assert 0 <= result["flagged"] <= 3 and 0.0 <= result["error"] <= 1.0
    assert ("trigger_md" in result) == attack and ("trigger batch: MD" in out) == attack


def test_guard_example_rejects_bad_arguments(capsys):
    main = runpy.run_path(str(SCRIPT))["main"]
    with pytest.raises(SystemExit) as exc:
        main(["--steps", "0"])
    assert exc.value.code == 2 and "--steps must be >= 1" in capsys.readouterr().err
