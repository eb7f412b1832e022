"""memdisc.experiments.report on a small synthetic comparison."""
import json
import re

import numpy as np
import pytest

from memdisc.eval.detection import detection_summary
from memdisc.eval.result import RunResult
from memdisc.experiments.compare import BurninSummary, Comparison
from memdisc.experiments.report import (REPORT_FILES, markdown_table, plot_error_curves, plot_md_histograms,
                                        plot_roc, write_report)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run(defense, attack, errors, steps, rng, with_detection):
    n_steps = steps + 1
    run = {"defense": defense, "attack": attack,
           "error_after_burnin": errors[0], "error_before_trigger": errors[1],
           "error_after_trigger": errors[2], "error_delta": errors[2] - errors[1],
           "steps_run": steps, "stop_reason": "max_steps" if steps == 30 else "test error | limit",
           "curve": {"step": list(range(n_steps)),
                     "test_error": list(np.linspace(errors[0], errors[1], n_steps)),
                     "md_poisoned": list(np.linspace(0.05, 0.3, n_steps)) if attack else [None] * n_steps,
                     "md_clean": list(np.full(n_steps, 0.05))},
           "detection": {"per_sample": None, "per_batch": None},
           "scores": {"clean": [], "poisoned": []},
           "timing": {"online_seconds": 12.5, "trigger_seconds": 0.25, "samples_per_second": 2345.6},
           "config": {}, "stop_error": 0.15, "trigger_md": 0.1, "provenance": {},
           "picture": {"file": None, "step": None, "corrected": None}}
    if with_detection:
        clean, poisoned = rng.gamma(2.0, 0.03, 400), rng.gamma(2.0, 0.03, 100) + 0.05
        s = np.r_[clean, poisoned]
        y = np.r_[np.zeros(400), np.ones(100)]
        run["detection"] = {"per_sample": detection_summary(s, y),
                            "per_batch": detection_summary(s[::10] + y[::10], y[::10])}
        run["scores"] = {"clean": clean.tolist(), "poisoned": poisoned.tolist()}
    return run


@pytest.fixture
def results():
    rng = np.random.default_rng(0)
    runs = {"control": _run("none", False, (0.1, 0.105, 0.104), 30, rng, with_detection=False),
            "ST": _run("none", True, (0.1, 0.12, 0.4567), 30, rng, with_detection=True),
            "DSC-sample": _run("dsc-sample", True, (0.1, 0.11, 0.1234), 17, rng, with_detection=True)}
    # Each run goes through JSON, as compare reads a finished run's result.json.
    return Comparison({"dataset": "fashion-mnist", "model": "cnn", "seed": 3},
                      {"memdisc": "0.1.0", "torch": "2.13.0", "commit": "abc123", "device": "cpu", "seed": 3},
                      BurninSummary(test_error=0.1, epochs=6, seconds=60.0),
                      {name: RunResult.from_json(json.loads(json.dumps(run))) for name, run in runs.items()})


def _cells(line):
    """The cells of a markdown table row, split on unescaped '|'."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def test_markdown_has_one_row_per_run_with_the_numbers(results):
    md = markdown_table(results)
    assert "fashion-mnist" in md and "cnn" in md and "seed **3**" in md and "abc123" in md
    lines = md.splitlines()
    header = _cells(lines[2])
    assert len(header) == 13 and "TPR@5%FPR (sample) %" in header
    rows = [_cells(line) for line in lines[4:]]
    assert [r[0] for r in rows] == ["control", "ST", "DSC-sample"]
    assert all(len(r) == len(header) for r in rows)
    cells = {r[0]: r for r in rows}
    d = results.runs["ST"].detection
    assert cells["ST"][1:9] == ["none", "yes", "10.00", "12.00", "45.67", "+33.67", "30", "max_steps"]
    assert cells["ST"][9:] == [f"{d['per_sample']['auroc']:.3f}", f"{100 * d['per_sample']['tpr_at_fpr']:.2f}",
                               f"{d['per_batch']['auroc']:.3f}", "2,346"]
    # A '|' inside a cell is escaped, so the row keeps its 13 columns.
    assert cells["DSC-sample"][7:9] == ["17", "test error \\| limit"]
    assert cells["control"][2] == "no" and cells["control"][6] == "-0.10"
    assert cells["control"][9:12] == ["n/a", "n/a", "n/a"]


def test_markdown_rejects_results_without_runs(results):
    results.runs = {}
    with pytest.raises(ValueError, match="results.runs: expected a non-empty dict of run name -> RunResult"):
        markdown_table(results)
    results.runs = {"ST": {"defense": "ST"}}
    with pytest.raises(ValueError, match=r"results.runs\['ST'\]: expected a RunResult, got dict"):
        markdown_table(results)


def test_mismatched_curve_length_is_an_error(results, tmp_path):
    results.runs["ST"].curve["test_error"].pop()
    with pytest.raises(ValueError, match=r"runs\['ST'\]\.curve\['test_error'\]: expected 31 values"):
        plot_error_curves(results, tmp_path / "e.png")


def test_write_report_writes_files_atomically(results, tmp_path):
    out = tmp_path / "report"
    paths = write_report(results, out)
    assert set(paths) == set(REPORT_FILES)
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORT_FILES.values())  # no temp file left
    for key in ("error_curves", "md_histograms", "roc"):
        data = paths[key].read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
    text = paths["markdown"].read_text()
    assert markdown_table(results) in text
    assert "Burn-in: test error 10.00 % after 6 epochs" in text
    assert "ST: 100 poisoned / 400 clean" in text
    assert "![roc](roc.png)" in text


def test_plots_without_any_detection_or_scores(results, tmp_path):
    for run in results.runs.values():
        run.detection = {"per_sample": None, "per_batch": None}
        run.scores = {"clean": [], "poisoned": []}
    for plot in (plot_md_histograms, plot_roc):
        path = plot(results, tmp_path / f"{plot.__name__}.png")
        assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot_md_histograms.png", "plot_roc.png"]
