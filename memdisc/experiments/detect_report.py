"""The detection grid's report: the table over seeds, the score histograms and the ROC curves
(``memdisc detect``, :mod:`memdisc.experiments.detect`).

Input: the grid's results (:class:`memdisc.experiments.results.GridResults` whose payloads are
:class:`memdisc.experiments.detect_result.DetectResult`) and, for the histograms, each cell's
``scores.pt`` in the run directory.  Each (attack, setting, detector) is summarised over the seeds it
finished on with :func:`memdisc.experiments.summary.spread` (n the number of seeds).  Rates and errors
are shown in percent.  Figures are drawn on the Agg canvas and written atomically.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
from matplotlib.figure import Figure

from memdisc.artifacts import atomic_write_text, load_torch_file
from memdisc.experiments.grid import Cell
from memdisc.experiments.report import save_figure
from memdisc.experiments.results import GridResults
from memdisc.experiments.summary import spread

__all__ = ["REPORT_FILES", "METRICS", "summarize", "markdown_report", "plot_scores", "plot_roc",
           "write_detect_report"]

#: File names written by :func:`write_detect_report`, keyed as in its return value.
REPORT_FILES = {"markdown": "results.md", "scores": "scores.png", "roc": "roc.png"}

#: The measures summarised over seeds: name -> how it is read from a payload.
METRICS = {
    "auroc": lambda p: p.detection["auroc"],
    "tpr_at_fpr": lambda p: p.detection["tpr_at_fpr"],
    "tpr": lambda p: p.detection["tpr"],
    "fpr": lambda p: p.detection["fpr"],
    "flagged": lambda p: p.detection["flagged"],
    "detect_seconds": lambda p: p.detect_seconds,
    "error_before": lambda p: p.before["clean_error"],
    "asr_before": lambda p: p.before["asr"],
    "error_after": lambda p: p.after["clean_error"],
    "asr_after": lambda p: p.after["asr"],
}

Key = tuple[str, str, str]  # (attack, setting, detector)


def summarize(results: GridResults) -> dict[Key, dict[str, Any]]:
    """Per (attack, setting, detector), in the order the cells first appear: each of :data:`METRICS` as
    :func:`~memdisc.experiments.summary.spread` over the seeds (values in seed order; a measure that is
    None, e.g. the ASR of a label-flip control, gives an empty spread)."""
    groups: dict[Key, list] = {}
    for result in results.cells:
        p = result.payload
        groups.setdefault((p.attack, p.setting, p.detector), []).append(p)
    return {key: {m: spread([v for v in map(read, payloads) if v is not None]) for m, read in METRICS.items()}
            for key, payloads in groups.items()}


def _pct(m: dict[str, Any]) -> str:
    """``mean ± std`` of a spread of fractions, in percent (n/a when empty; no std for one value)."""
    if m["mean"] is None:
        return "n/a"
    return f"{100 * m['mean']:.1f}" + ("" if m["std"] is None else f" ± {100 * m['std']:.1f}")


def _num(m: dict[str, Any], fmt: str) -> str:
    if m["mean"] is None:
        return "n/a"
    return format(m["mean"], fmt) + ("" if m["std"] is None else " ± " + format(m["std"], fmt))


def markdown_report(results: GridResults) -> str:
    """``results.md``: per (attack, setting) the detectors' quality (AUROC, TPR at the target FPR, TPR
    and FPR of their own flags), time, and the clean error and ASR before and after removal."""
    summary = summarize(results)
    first = results.cells[0].payload if results.cells else None
    seeds = sorted({r.cell.seed for r in results.cells})
    lines = ["# Backdoor data detection", ""]
    if first is not None:
        cfg, prov = first.config, first.provenance
        lines += [f"Dataset **{cfg['dataset']}**, model **{cfg['model']}**, {cfg['train_subset']} training rows "
                  f"(the poisoned ones replace clean rows), {cfg['val_size']} validation rows, {cfg['test_subset']} "
                  f"test rows, a clean base set of {cfg['base_per_class']} rows per class; seeds "
                  f"{', '.join(map(str, seeds))}; memdisc {prov.get('memdisc')}, torch {prov.get('torch')}, commit "
                  f"`{prov.get('commit')}`, device {prov.get('device')}, CPU instruction set "
                  f"{(prov.get('cpu_isa') or {}).get('aten', 'n/a')}.", ""]
        target = first.detection["fpr_target"]
    else:
        target = 0.05
    lines += [f"Rates and errors in %, mean ± std over the seeds (n the number of seeds).  AUROC over every "
              f"training row (positive: poisoned); TPR@{100 * target:g}%FPR: the highest TPR of a threshold with at "
              "most that FPR; TPR / FPR (own): of the rows the detector flags by its own rule; after: the model "
              "retrained without the flagged rows.", ""]
    head = ["detector", "AUROC", f"TPR@{100 * target:g}%FPR", "TPR (own)", "FPR (own)", "flagged", "detect s",
            "clean err before", "clean err after", "ASR before", "ASR after", "n"]
    for attack, setting in dict.fromkeys((a, s) for a, s, _ in summary):
        poisoned = next(r.payload.poisoned for r in results.cells
                        if (r.payload.attack, r.payload.setting) == (attack, setting))
        lines += [f"## {attack}, {setting} ({poisoned} poisoned rows)", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]
        for (a, s, detector), m in summary.items():
            if (a, s) != (attack, setting):
                continue
            lines.append(f"| {detector} | {_num(m['auroc'], '.3f')} | {_pct(m['tpr_at_fpr'])} | {_pct(m['tpr'])} | "
                         f"{_pct(m['fpr'])} | {_num(m['flagged'], '.0f')} | {_num(m['detect_seconds'], '.1f')} | "
                         f"{_pct(m['error_before'])} | {_pct(m['error_after'])} | {_pct(m['asr_before'])} | "
                         f"{_pct(m['asr_after'])} | {len(m['auroc']['values'])} |")
        lines.append("")
    if results.failures:
        lines += [f"{len(results.failures)} cells failed: " + "; ".join(
            f"{f.cell.id}: {f.error}" for f in results.failures), ""]
    return "\n".join(lines)


def _first_seed_cells(results: GridResults) -> list:
    seed = min(r.cell.seed for r in results.cells)
    return [r for r in results.cells if r.cell.seed == seed]


def plot_scores(results: GridResults, cell_dir: Callable[[Cell], Path], path: str | Path) -> Path:
    """Histograms of clean vs poisoned scores of the first seed (read from each cell's directory,
    ``cell_dir(cell)``): one row per (attack, setting), one column per detector (each panel its own
    score axis; counts on a log scale)."""
    cells = _first_seed_cells(results)
    rows = list(dict.fromkeys((r.payload.attack, r.payload.setting) for r in cells))
    cols = list(dict.fromkeys(r.payload.detector for r in cells))
    fig = Figure(figsize=(2.8 * len(cols), 2.2 * len(rows)), layout="tight")
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    for r in cells:
        p = r.payload
        ax = axes[rows.index((p.attack, p.setting))][cols.index(p.detector)]
        saved = load_torch_file(cell_dir(r.cell) / p.scores, "delete its cell directory to run the cell again")
        scores, poisoned = saved["scores"].numpy(), saved["poisoned"].numpy()
        bins = np.histogram_bin_edges(scores, bins=60)
        ax.hist(scores[~poisoned], bins=bins, color="#5da1f0", alpha=0.8, label="clean")
        ax.hist(scores[poisoned], bins=bins, color="#f0a030", alpha=0.8, label="poisoned")
        ax.set_yscale("log")
        ax.set_title(f"{p.detector}: {p.attack}, {p.setting}", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, path)


def plot_roc(results: GridResults, path: str | Path) -> Path:
    """ROC curves: one panel per (attack, setting), one line per detector per seed (the stored compact
    curves), each detector one colour."""
    rows = list(dict.fromkeys((r.payload.attack, r.payload.setting) for r in results.cells))
    detectors = list(dict.fromkeys(r.payload.detector for r in results.cells))
    fig = Figure(figsize=(3.6 * len(rows), 3.4), layout="tight")
    axes = fig.subplots(1, len(rows), squeeze=False)[0]
    labelled = set()
    for r in results.cells:
        p = r.payload
        ax, i = axes[rows.index((p.attack, p.setting))], detectors.index(p.detector)
        key = (rows.index((p.attack, p.setting)), p.detector)
        ax.plot(p.detection["roc"]["fpr"], p.detection["roc"]["tpr"], color=f"C{i % 10}", lw=1, alpha=0.8,
                label=None if key in labelled else p.detector)
        labelled.add(key)
    for ax, (attack, setting) in zip(axes, rows):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.6, ls=":")
        ax.set_title(f"{attack}, {setting}", fontsize=9)
        ax.set_xlabel("false-positive rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("true-positive rate")
    return save_figure(fig, path)


def write_detect_report(results: GridResults, out_dir: str | Path, cell_dir: Callable[[Cell], Path]) -> dict[str, Path]:
    """``results.md``, ``scores.png`` and ``roc.png`` in ``out_dir`` (no figure without a finished cell);
    ``cell_dir(cell)``: the directory holding a cell's ``scores.pt``."""
    out = Path(out_dir)
    paths = {"markdown": atomic_write_text(out / REPORT_FILES["markdown"], markdown_report(results))}
    if results.cells:
        paths["scores"] = plot_scores(results, cell_dir, out / REPORT_FILES["scores"])
        paths["roc"] = plot_roc(results, out / REPORT_FILES["roc"])
    return paths
