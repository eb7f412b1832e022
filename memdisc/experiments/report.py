"""The comparison report: a markdown table and three figures from one seed's comparison.

Input is a :class:`memdisc.experiments.compare.Comparison` (what ``results.json`` holds): its
``config`` (dataset, model, seed), ``provenance``, ``burnin`` (``test_error``, ``epochs``) and
``runs``, run name -> :class:`memdisc.eval.result.RunResult` (whose docstring gives the
shapes of ``curve``, ``detection``, ``scores`` and ``timing``).

Errors are fractions in [0, 1] and are shown in percent.  A missing detection summary (the
control's) or recorded value is shown as "n/a".  Figures are drawn on the Agg canvas
without pyplot, so importing this module changes no global matplotlib state.
Every file is written atomically (temporary file in the same directory, then
``os.replace``).
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from memdisc.artifacts import atomic_write_bytes, atomic_write_text
from memdisc.eval.result import RunResult

if TYPE_CHECKING:
    from memdisc.experiments.compare import Comparison

DPI = 120
NA = "n/a"

#: File names written by :func:`write_report`, keyed as in its return value.
REPORT_FILES = {"markdown": "results.md", "error_curves": "error_curves.png",
                "md_histograms": "md_histograms.png", "roc": "roc.png"}


# ----------------------------------------------------------------------------- access

def _runs(results: Comparison) -> dict[str, RunResult]:
    runs = results.runs
    if not isinstance(runs, dict) or not runs:
        raise ValueError(f"results.runs: expected a non-empty dict of run name -> RunResult, got {runs!r}")
    for name, run in runs.items():
        if not isinstance(run, RunResult):
            raise ValueError(f"results.runs[{name!r}]: expected a RunResult, got {type(run).__name__}")
    return runs


def _get(d: dict[str, Any] | None, *keys: str) -> Any:
    """``d[k0][k1]...`` or None where any level is missing or None."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _color(i: int) -> str:
    return f"C{i % 10}"


def _floats(values: Any) -> np.ndarray:
    """A list that may hold None as a float array with NaN for None."""
    return np.array([math.nan if v is None else float(v) for v in (values or [])], dtype=np.float64)


# ----------------------------------------------------------------------------- markdown

def _pct(x: Any, signed: bool = False) -> str:
    if x is None:
        return NA
    return f"{100.0 * float(x):+.2f}" if signed else f"{100.0 * float(x):.2f}"


def _num(x: Any, fmt: str) -> str:
    return NA if x is None else format(x, fmt)


def _cell(text: Any) -> str:
    return NA if text is None else str(text).replace("|", "\\|").replace("\n", " ")


def _fpr_target(runs: dict[str, RunResult]) -> float:
    """The FPR target of the first per-sample detection found (0.05 when none)."""
    for run in runs.values():
        target = _get(run.detection, "per_sample", "fpr_target")
        if target is not None:
            return float(target)
    return 0.05


def _header_line(results: Comparison) -> str:
    config, prov = results.config, results.provenance
    seed = prov.get("seed", config.get("seed"))
    return (f"Dataset **{config.get('dataset', NA)}**, model **{config.get('model', NA)}**, "
            f"seed **{NA if seed is None else seed}**, commit `{prov.get('commit', NA)}`")


def markdown_table(results: Comparison) -> str:
    """The comparison as a markdown table, one row per run in the order of ``results.runs``.

    Columns: run, defence, attack (yes/no), test error after burn-in / before
    the trigger / after the trigger and its delta (percent, 2 decimals; delta
    is the run's ``error_delta`` in percentage points), accumulative steps run,
    stop reason, per-sample AUROC, per-sample TPR at the detection's FPR target,
    per-batch AUROC, samples per second.  Missing values read "n/a".  The first
    line names dataset, model, seed and commit.
    """
    runs = _runs(results)
    target = _fpr_target(runs)
    head = ["run", "defence", "attack", "err burn-in %", "err before trigger %", "err after trigger %",
            "Δ err (pp)", "steps", "stop reason", "AUROC (sample)", f"TPR@{100 * target:g}%FPR (sample) %",
            "AUROC (batch)", "samples/s"]
    lines = [_header_line(results), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, run in runs.items():
        per_sample = _get(run.detection, "per_sample")
        row = [_cell(name), _cell(run.defense), "yes" if run.attack else "no",
               _pct(run.error_after_burnin), _pct(run.error_before_trigger),
               _pct(run.error_after_trigger), _pct(run.error_delta, signed=True),
               _cell(run.steps_run), _cell(run.stop_reason),
               _num(_get(per_sample, "auroc"), ".3f"), _pct(_get(per_sample, "tpr_at_fpr")),
               _num(_get(run.detection, "per_batch", "auroc"), ".3f"),
               _num(run.timing.get("samples_per_second"), ",.0f")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _notes(results: Comparison) -> str:
    runs = _runs(results)
    prov = results.provenance
    lines = ["## Notes", "", f"- Burn-in: test error {_pct(results.burnin.test_error)} % after "
                             f"{_cell(results.burnin.epochs)} epochs."]
    lines += [
        "- Errors are test error in percent; Δ err is each run's recorded `error_delta`, in percentage points.",
        "- Detection scores every sample (clean and poisoned) by its memorization discrepancy; poisoned is the "
        "positive class and a higher MD is more suspicious. AUROC 0.5 is chance; TPR is the highest reachable "
        "with the false-positive rate at most the target (no interpolation). Per batch gives each batch one "
        "score, the batch-level MD that the DSC rule thresholds.",
    ]
    counts = [f"{name}: {d['n_pos']} poisoned / {d['n_neg']} clean" for name, run in runs.items()
              if (d := _get(run.detection, "per_sample")) is not None]
    if counts:
        lines.append("- Samples scored (per sample): " + "; ".join(counts) + ".")
    timing = [f"{name}: online {_num(run.timing.get('online_seconds'), '.1f')} s, "
              f"trigger {_num(run.timing.get('trigger_seconds'), '.2f')} s"
              for name, run in runs.items() if run.timing]
    if timing:
        lines.append("- Wall time: " + "; ".join(timing) + ".")
    lines.append(f"- memdisc {prov.get('memdisc', NA)}, torch {prov.get('torch', NA)}, "
                 f"device {prov.get('device', NA)}.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- figures

def save_figure(fig: Figure, path: str | Path) -> Path:
    """Draw ``fig`` on the Agg canvas and write it to ``path`` as a PNG, atomically."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return atomic_write_bytes(path, buf.getvalue())


def _curve(run: RunResult, name: str, key: str) -> np.ndarray:
    values = _floats(run.curve.get(key))
    n_steps = len(run.curve.get("step") or [])
    if values.size not in (0, n_steps):
        raise ValueError(f"results.runs[{name!r}].curve[{key!r}]: expected {n_steps} values "
                         f"(one per step), got {values.size}")
    return values


def plot_error_curves(results: Comparison, path: str | Path) -> Path:
    """Test error (%) per online step, one line per run, and MD per step below it.

    The trigger of each run comes after its ``steps_run`` accumulative steps; it
    is marked by a dotted vertical line in the run's colour at that step and a
    star at the test error after the trigger.  The burn-in error is a grey
    dashed line.  The lower panel (drawn when any run records MD per step)
    shows mean MD on poisoned (solid) and clean (dashed) data.
    """
    runs = _runs(results)
    has_md = any(np.isfinite(_curve(r, n, k)).any() for n, r in runs.items() for k in ("md_poisoned", "md_clean"))
    fig = Figure(figsize=(8, 7.5 if has_md else 4.8), layout="tight")
    axes = fig.subplots(2 if has_md else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    ax.axhline(100 * results.burnin.test_error, color="0.5", ls="--", lw=1, label="after burn-in")
    for i, (name, run) in enumerate(runs.items()):
        steps = np.asarray(run.curve.get("step") or [], dtype=np.float64)
        err = _curve(run, name, "test_error")
        if err.size:
            ax.plot(steps, 100 * err, color=_color(i), lw=1.6, label=name)
        ax.axvline(run.steps_run, color=_color(i), ls=":", lw=1.2)
        ax.plot([run.steps_run], [100 * run.error_after_trigger], marker="*", ms=13,
                color=_color(i), mec="k", mew=0.6, ls="none")
    handles, _ = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], color="k", ls=":", marker="*", ms=10, label="trigger (★ error after)"))
    ax.legend(handles=handles, fontsize=8, ncol=2, loc="best")
    ax.set_ylabel("test error (%)")
    ax.set_title("Test error during the online phase")
    ax.grid(alpha=0.3)
    if has_md:
        ax_md = axes[1]
        for i, (name, run) in enumerate(runs.items()):
            steps = np.asarray(run.curve.get("step") or [], dtype=np.float64)
            for key, ls in (("md_poisoned", "-"), ("md_clean", "--")):
                md = _curve(run, name, key)
                if np.isfinite(md).any():
                    ax_md.plot(steps, md, color=_color(i), ls=ls, lw=1.4)
        style = [Line2D([], [], color=_color(i), lw=2, label=name) for i, name in enumerate(runs)]
        style += [Line2D([], [], color="k", ls="-", label="poisoned"),
                  Line2D([], [], color="k", ls="--", label="clean")]
        ax_md.legend(handles=style, fontsize=8, ncol=2, loc="best")
        ax_md.set_ylabel("mean memorization discrepancy")
        ax_md.set_title("MD per step: poisoned (solid) vs clean (dashed)")
        ax_md.grid(alpha=0.3)
    axes[-1].set_xlabel("online step")
    return save_figure(fig, path)


def plot_md_histograms(results: Comparison, path: str | Path) -> Path:
    """Histograms of per-sample MD on clean vs poisoned samples, one panel per run with scores.

    Each panel uses 40 bins shared by both classes and density normalisation
    (the classes differ in size); the title carries the per-sample AUROC when
    recorded.  Runs with no scores get no panel; with none at all the figure
    says so.
    """
    runs = _runs(results)
    panels = [(i, name, run) for i, (name, run) in enumerate(runs.items())
              if len(run.scores.get("clean") or []) + len(run.scores.get("poisoned") or []) > 0]
    ncols = min(3, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows), layout="tight")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (i, name, run) in zip(axes, panels):
        clean, poisoned = _floats(run.scores.get("clean")), _floats(run.scores.get("poisoned"))
        both = np.concatenate([clean, poisoned])
        both = both[np.isfinite(both)]
        bins = np.histogram_bin_edges(both, bins=40) if both.size else 40
        for values, color, label in ((clean, "tab:blue", "clean"), (poisoned, "tab:red", "poisoned")):
            values = values[np.isfinite(values)]
            if values.size:
                ax.hist(values, bins=bins, density=True, alpha=0.55, color=color,
                        label=f"{label} (n={values.size})")
        auc = _get(run.detection, "per_sample", "auroc")
        ax.set_title(name if auc is None else f"{name}  (AUROC {auc:.3f})", fontsize=10)
        ax.set_xlabel("memorization discrepancy")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    if not panels:
        axes[0].text(0.5, 0.5, "no per-sample scores recorded", ha="center", va="center")
    fig.suptitle("Per-sample memorization discrepancy: clean vs poisoned")
    return save_figure(fig, path)


def plot_roc(results: Comparison, path: str | Path) -> Path:
    """Per-sample ROC curves (FPR and TPR in %) of the runs with detection, AUROC in the legend.

    Draws the chance diagonal and a dotted vertical line at the FPR target.
    """
    runs = _runs(results)
    fig = Figure(figsize=(5.8, 5.4), layout="tight")
    ax = fig.subplots()
    ax.plot([0, 100], [0, 100], color="0.6", ls="--", lw=1, label="chance (AUROC 0.5)")
    target = _fpr_target(runs)
    ax.axvline(100 * target, color="0.3", ls=":", lw=1, label=f"FPR {100 * target:g}%")
    drawn = 0
    for i, (name, run) in enumerate(runs.items()):
        det = _get(run.detection, "per_sample")
        if det is None:
            continue
        fpr, tpr = np.asarray(det["roc"]["fpr"]), np.asarray(det["roc"]["tpr"])
        ax.plot(100 * fpr, 100 * tpr, color=_color(i), lw=1.8,
                label=f"{name} (AUROC {det['auroc']:.3f})")
        drawn += 1
    if not drawn:
        ax.text(50, 55, "no per-sample detection recorded", ha="center", va="center")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100.5)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate: clean samples flagged (%)")
    ax.set_ylabel("true positive rate: poisoned samples flagged (%)")
    ax.set_title("Per-sample detection by memorization discrepancy")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def write_report(results: Comparison, out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.md`` (table, notes, figure links) and the three PNGs into ``out_dir``.

    Returns ``{"markdown", "error_curves", "md_histograms", "roc"} -> Path``.
    """
    out_dir = Path(out_dir)
    paths = {key: out_dir / fname for key, fname in REPORT_FILES.items()}
    plot_error_curves(results, paths["error_curves"])
    plot_md_histograms(results, paths["md_histograms"])
    plot_roc(results, paths["roc"])
    figures = "\n\n".join(f"![{key.replace('_', ' ')}]({REPORT_FILES[key]})"
                        for key in ("error_curves", "md_histograms", "roc"))
    text = f"# Online comparison\n\n{markdown_table(results)}\n{_notes(results)}\n## Figures\n\n{figures}\n"
    atomic_write_text(paths["markdown"], text)
    return paths
