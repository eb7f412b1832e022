"""The study's report: the table over seeds, the accuracy-vs-fraction curves, the sample grid and the
saliency figure (``memdisc study``, :mod:`memdisc.experiments.study`).

Input: the grid's results (:class:`memdisc.experiments.results.GridResults` whose payloads are
:class:`memdisc.experiments.study.StudyResult`), and for the two pictures the tensors they show
(:class:`SampleRow`, :class:`SaliencyFigure`), which the study reads from its run directory.  Each
(attack, setting, fraction) is summarised over the seeds it finished on with
:func:`memdisc.experiments.summary.spread` (mean, std, 95 % interval; n the number of seeds).
Accuracies are shown in percent.  Figures are drawn on the Agg canvas without pyplot and every
file is written atomically.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from memdisc.artifacts import atomic_write_text
from memdisc.experiments.report import save_figure
from memdisc.experiments.results import GridResults
from memdisc.experiments.summary import spread

__all__ = ["REPORT_FILES", "METRICS", "SampleRow", "SaliencyFigure", "summarize", "markdown_report",
           "plot_accuracy_vs_fraction", "plot_samples", "plot_saliency", "write_study_report"]

#: File names written by :func:`write_study_report`, keyed as in its return value.
REPORT_FILES = {"markdown": "results.md", "curves": "accuracy_vs_fraction.png", "samples": "samples.png",
                "saliency": "saliency.png"}

#: The payload fields summarised over seeds.
METRICS = ("test_accuracy", "probe_accuracy", "train_accuracy", "test_loss", "craft_seconds", "train_seconds")

Key = tuple[str, str, float]  # (attack, setting, fraction); fraction 0 is a setting's clean baseline


@dataclasses.dataclass(frozen=True)
class SampleRow:
    """One attack's row of the sample grid: ``clean`` and ``poisoned`` ``[k, C, H, W]`` pixels in [0, 1] (the same
    training rows before and after the attack) and their labels ``clean_labels``, ``poisoned_labels`` ``[k]``."""
    attack: str
    fraction: float
    clean: torch.Tensor
    poisoned: torch.Tensor
    clean_labels: torch.Tensor
    poisoned_labels: torch.Tensor


@dataclasses.dataclass(frozen=True)
class SaliencyFigure:
    """Fixed test samples ``images [k, C, H, W]`` with ``labels [k]``, and per row label (the clean baseline,
    then each attack at a fraction) the saliency maps ``[k, H, W]`` of the end-to-end victim of ``seed``."""
    seed: int
    images: torch.Tensor
    labels: torch.Tensor
    maps: dict[str, torch.Tensor]


def summarize(results: GridResults) -> dict[Key, dict[str, Any]]:
    """Per (attack, setting, fraction), in the order the cells first appear: each of :data:`METRICS` as
    :func:`~memdisc.experiments.summary.spread` over the seeds (``values`` in seed order)."""
    groups: dict[Key, list] = {}
    for result in results.cells:
        p = result.payload
        groups.setdefault((p.attack, p.setting, p.fraction), []).append(p)
    return {key: {m: spread([getattr(p, m) for p in payloads]) for m in METRICS} for key, payloads in groups.items()}


def _pct(m: dict[str, Any]) -> str:
    """``mean ± std`` of a spread of fractions, in percent (n/a when empty; no std for one value)."""
    if m["mean"] is None:
        return "n/a"
    return f"{100 * m['mean']:.2f}" + ("" if m["std"] is None else f" ± {100 * m['std']:.2f}")


def _axes(summary: dict[Key, dict]) -> tuple[list[str], list[str], list[float]]:
    """The attacks (of fractions > 0), settings and fractions (> 0) of a summary, in order of appearance."""
    attacks = list(dict.fromkeys(a for a, _, f in summary if f > 0))
    settings = list(dict.fromkeys(s for _, s, _ in summary))
    fractions = sorted({f for _, _, f in summary if f > 0})
    return attacks, settings, fractions


def _clean(summary: dict[Key, dict], setting: str) -> dict[str, Any] | None:
    """The summary of the setting's clean baseline (its fraction-0 cell), None if it did not finish."""
    return next((m for (_, s, f), m in summary.items() if s == setting and f == 0), None)


def markdown_report(results: GridResults) -> str:
    """``results.md``: per setting, test accuracy by attack and fraction (mean ± std over seeds, with the
    clean baseline as fraction 0); then every (attack, setting, fraction) with all its measures and n."""
    summary = summarize(results)
    attacks, settings, fractions = _axes(summary)
    first = results.cells[0].payload if results.cells else None
    seeds = sorted({r.cell.seed for r in results.cells})
    lines = ["# Poisoning study", ""]
    if first is not None:
        cfg, prov = first.config, first.provenance
        lines += [f"Dataset **{cfg['dataset']}**, model **{cfg['model']}**, {cfg['train_subset']} training rows "
                  f"(a fraction f of them replaced by poisons), {cfg['val_size']} validation rows, "
                  f"{cfg['test_subset']} test rows; seeds {', '.join(map(str, seeds))}; memdisc "
                  f"{prov.get('memdisc')}, torch {prov.get('torch')}, commit `{prov.get('commit')}`, device "
                  f"{prov.get('device')}.", ""]
    lines += ["Accuracies in %, mean ± std over the seeds (n in the last table); fraction 0 is the clean "
              "baseline of the setting.", ""]
    for setting in settings:
        clean = _clean(summary, setting)
        head = ["attack", "0 (clean)", *(f"{f:g}" for f in fractions)]
        lines += [f"## Test accuracy, {setting}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for attack in attacks:
            row = [_pct(clean["test_accuracy"]) if clean else "n/a"]
            row += [_pct(summary[(attack, setting, f)]["test_accuracy"]) if (attack, setting, f) in summary
                    else "n/a" for f in fractions]
            lines.append(f"| {attack} | " + " | ".join(row) + " |")
        lines.append("")
    head = ["attack", "setting", "fraction", "test acc %", "probe acc %", "train acc % (as trained on)",
            "test loss", "craft s", "train s", "n"]
    lines += ["## Every cell over seeds", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (attack, setting, fraction), m in summary.items():
        loss, craft, train = (m[k]["mean"] for k in ("test_loss", "craft_seconds", "train_seconds"))
        lines.append(f"| {attack} | {setting} | {fraction:g} | {_pct(m['test_accuracy'])} | "
                     f"{_pct(m['probe_accuracy'])} | {_pct(m['train_accuracy'])} | {loss:.3f} | {craft:.1f} | "
                     f"{train:.1f} | {len(m['test_accuracy']['values'])} |")
    lines += ["", "Probe: a logistic regression on the penultimate features of the trained victim, fitted on the "
              "poisoned training set, scored on the test rows.  Craft s: the attack's time to make the poisoned "
              "set (shared by the settings); train s: the victim's training."]
    if results.failures:
        lines += ["", f"{len(results.failures)} cells failed: " + "; ".join(
            f"{f.cell.id}: {f.error}" for f in results.failures)]
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_fraction(results: GridResults, path: str | Path) -> Path:
    """Test accuracy (%) against the poison fraction, one panel per setting, one line per attack: the
    mean over seeds, a band of ± one std where there are several seeds; every line starts at the
    setting's clean baseline (fraction 0)."""
    summary = summarize(results)
    attacks, settings, _ = _axes(summary)
    fig = Figure(figsize=(4.2 * max(1, len(settings)), 3.8), layout="tight")
    panels = fig.subplots(1, max(1, len(settings)), sharey=True, squeeze=False)[0]
    for ax, setting in zip(panels, settings):
        clean = _clean(summary, setting)
        for i, attack in enumerate(attacks):
            points = [(0.0, clean["test_accuracy"])] if clean else []
            points += sorted((f, m["test_accuracy"]) for (a, s, f), m in summary.items()
                             if a == attack and s == setting)
            x = np.array([f for f, _ in points])
            mean = np.array([100 * m["mean"] for _, m in points])
            ax.plot(x, mean, marker="o", ms=4, color=f"C{i % 10}", label=attack)
            std = np.array([np.nan if m["std"] is None else 100 * m["std"] for _, m in points])
            if np.isfinite(std).any():
                ax.fill_between(x, mean - std, mean + std, color=f"C{i % 10}", alpha=0.18, lw=0)
        ax.set_title(setting)
        ax.set_xlabel("poison fraction")
        ax.grid(alpha=0.3)
    panels[0].set_ylabel("test accuracy (%)")
    panels[0].legend(fontsize=8, loc="best")
    return save_figure(fig, path)


def _show(ax, image: torch.Tensor, title: str, cmap: str = "gray", normalise: bool = False) -> None:
    """``image`` ``[C, H, W]`` (C = 1 or 3) or ``[H, W]`` in [0, 1] (or scaled to its maximum)."""
    array = image.detach().to("cpu", torch.float32)
    if normalise:
        array = array / array.max().clamp_min(1e-12)
    array = array.permute(1, 2, 0).numpy() if array.dim() == 3 and array.shape[0] == 3 else array.reshape(
        array.shape[-2:]).numpy()
    ax.imshow(array, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_samples(rows: list[SampleRow], path: str | Path) -> Path:
    """Clean vs poisoned training samples, one row per attack: ``k`` pairs (the clean row with its label,
    then the same row as the attack left it, with the label it carries)."""
    k = max(r.clean.shape[0] for r in rows)
    fig = Figure(figsize=(1.1 * 2 * k + 0.6, 1.35 * len(rows) + 0.5), layout="tight")
    axes = fig.subplots(len(rows), 2 * k, squeeze=False)
    for row, ax_row in zip(rows, axes):
        for j in range(k):
            for ax, images, labels, what in ((ax_row[2 * j], row.clean, row.clean_labels, "clean"),
                                             (ax_row[2 * j + 1], row.poisoned, row.poisoned_labels, "poisoned")):
                if j < images.shape[0]:
                    _show(ax, images[j], f"{what} y={int(labels[j])}")
                else:
                    ax.axis("off")
        ax_row[0].set_ylabel(f"{row.attack}\nf={row.fraction:g}", fontsize=8)
    fig.suptitle("Training samples before and after each attack", fontsize=9)
    return save_figure(fig, path)


def plot_saliency(figure: SaliencyFigure, path: str | Path) -> Path:
    """The fixed test samples (top row), then per attack the saliency maps of the end-to-end victim trained
    on its poisoned set (each map scaled to its own maximum)."""
    k, names = figure.images.shape[0], list(figure.maps)
    fig = Figure(figsize=(1.1 * k + 0.6, 1.25 * (1 + len(names)) + 0.5), layout="tight")
    axes = fig.subplots(1 + len(names), k, squeeze=False)
    for j in range(k):
        _show(axes[0][j], figure.images[j], f"y={int(figure.labels[j])}")
    axes[0][0].set_ylabel("test sample", fontsize=8)
    for ax_row, name in zip(axes[1:], names):
        for j in range(k):
            _show(ax_row[j], figure.maps[name][j], "", cmap="hot", normalise=True)
        ax_row[0].set_ylabel(name, fontsize=8)
    fig.suptitle(f"Saliency |dCE/dx| of the end-to-end victim (seed {figure.seed})", fontsize=9)
    return save_figure(fig, path)


def write_study_report(results: GridResults, out_dir: str | Path, samples: list[SampleRow],
                       saliency: SaliencyFigure | None) -> dict[str, Path]:
    """Write ``results.md``, the curves and, where they have rows, the sample and saliency figures into
    ``out_dir``; returns the written files by key (of :data:`REPORT_FILES`)."""
    out_dir = Path(out_dir)
    paths = {"markdown": out_dir / REPORT_FILES["markdown"]}
    figures = {"curves": lambda p: plot_accuracy_vs_fraction(results, p)}
    if samples:
        figures["samples"] = lambda p: plot_samples(samples, p)
    if saliency is not None and saliency.maps:
        figures["saliency"] = lambda p: plot_saliency(saliency, p)
    if results.cells:
        for key, draw in figures.items():
            paths[key] = draw(out_dir / REPORT_FILES[key])
    links = "\n\n".join(f"![{key}]({REPORT_FILES[key]})" for key in paths if key != "markdown")
    atomic_write_text(paths["markdown"], markdown_report(results) + (f"\n## Figures\n\n{links}\n" if links else ""))
    return paths
