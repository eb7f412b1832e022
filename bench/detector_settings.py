"""Settings of MD as a detector and of ASSET on the default detection grid (issue 14), measured on tuning
seeds that the committed results do not use.

    python bench/detector_settings.py [--out bench/results/epyc-avx2] [--work runs/detector-settings]
                                      [--seeds 100,101] [--parts md,asset] [--summary-only]

Everything is the grid's own machinery (:mod:`memdisc.experiments.detect` with its default
configuration, ``out`` set to ``--work``): per tuning seed, ``DetectRun.prepare`` draws the 6000
training, 1000 validation and 2000 test rows of Fashion-MNIST and the 100-per-class clean base set;
``poisoned_set`` makes each default attack's 5 % (BadNets all-to-one, Blended); ``DetectRun._train``
trains the ``cnn`` end to end on it with ``DetectFit`` (at most 10 epochs, patience 3: the model keeps
the weights of its best validation epoch), keeping a copy after **every** epoch.  That is the grid's
suspect model (the same call, data and seed; the grid keeps only the copies of ``md.snapshot_epochs``),
cached in ``WORK/seed-S/suspects/ATTACK-end-to-end-every-epoch.pt``.

Part ``md``: for each current model, the suspect (``best``: its best epoch's weights, what the grid
scores) and its last trained epoch's weights (``last``: training without the restore of early
stopping), the per-sample discrepancy of every epoch's copy, ``[E, N] = KL(p_e(x) || p_current(x))``
(``SnapshotSet.logits`` and ``memdisc.ops.discrepancy``, as ``SnapshotSet.discrepancy``); then per
subset of epochs (``--md-subsets``: ``1,2,3``, or ``last-1`` / ``best-1``: the epoch before the last
trained or the best one; the epochs at or after the current model's are left out, as the grid keeps only
the copies before the suspect's best epoch) and reduction
(``mean``, ``max``, ``min``; one row for a single epoch, where they agree) the MD score
(:func:`memdisc.detectors.md.reduce_over_snapshots` of the subset's rows: what ``MDDetector`` over a
``SnapshotSet`` of the subset computes, checked against it on the grid's default subset for every
suspect) and the flags of ``MDDetector.flag`` (the default rule, the lower half's Gaussian tail); and
``tpr_at_fpr_low``, the TPR at 5 % FPR of the opposite ranking (the *lowest* MD suspected; its AUROC is
1 - AUROC).

Part ``asset``, pruned in three stages (ASSET's other options are the grid's, its seed the cell's):

* ``screen``: on the first seed and the first attack, every ``--asset-lr`` x ``--asset-vnet-lr`` x
  ``--asset-epochs`` at the grid's batch size (512);
* ``batch``: the ``--asset-batch-top`` best screened settings again with ``--asset-batch`` rows a batch;
* ``confirm``: the ``--asset-confirm`` best of those, ASSET's own defaults (the notebook's) and the
  grid's current options on every seed and attack.

"Best": the highest TPR at 5 % FPR, then AUROC.  Each row: AUROC, TPR at 5 % FPR, the TPR and FPR of
the detector's own flag (ASSET: the notebook's ``get_t``; MD: the default rule); for ASSET also those of
the default rule (``Detector.flag``) and the seconds of its fit + score + flag; for both, as a measured
alternative (``logtail``), the TPR and FPR of the default rule applied to the log of the scores.  Rows
go to ``OUT/detector_settings.csv`` (rewritten atomically after each row) with provenance and the
1-minute load average; a summary (mean over the seeds and each seed's value) is printed at the end, and
by ``--summary-only`` from the CSV; ``--resume`` keeps the CSV's rows and runs only the missing ones.
Run it with ``OMP_NUM_THREADS=1`` (it sets one thread).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import inspect
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import out_dir_arg, provenance, write_csv_atomic  # noqa: E402

from memdisc.artifacts import atomic_torch_save, load_torch_file  # noqa: E402
from memdisc.config import to_dict  # noqa: E402
from memdisc.detectors import DETECTORS, Detector  # noqa: E402
from memdisc.detectors.md import REDUCTIONS, reduce_over_snapshots  # noqa: E402
from memdisc.detectors.thresholds import tail_threshold  # noqa: E402
from memdisc.eval.detection import detection_summary, tpr_at_fpr  # noqa: E402
from memdisc.experiments.detect import DetectRun, load_detect_config  # noqa: E402
from memdisc.ops import discrepancy  # noqa: E402
from memdisc.snapshots import SnapshotSet  # noqa: E402
from memdisc.training.victim import trained_module  # noqa: E402

SETTING = "end-to-end"
CSV_NAME = "detector_settings.csv"
FORMAT = "memdisc-bench-every-epoch-suspect-1"
MD_SUBSETS = "1;2;3;4;5;1,2;1,2,3;2,3,4;3,4,5;2,3,4,5;1,2,3,4,5;last-1;best-1"
RELATIVE = ("last-1", "best-1")


@dataclasses.dataclass
class EveryEpoch:
    """A suspect model with a copy after every epoch it trained (``snapshots[e - 1]``: after epoch e), its
    poisoned training set ``x [N, ...]``, ``y [N]``, the poisoned rows ``poisoned [N]`` bool, its best epoch
    (the weights of ``model``), clean test error and ASR."""
    model: torch.nn.Module
    snapshots: list[torch.nn.Module]
    best_epoch: int
    clean_error: float
    asr: float
    x: torch.Tensor
    y: torch.Tensor
    poisoned: torch.Tensor

    def describe(self) -> dict[str, object]:
        return {"epochs_trained": len(self.snapshots), "best_epoch": self.best_epoch,
                "suspect_clean_error": round(self.clean_error, 4), "suspect_asr": round(self.asr, 4)}


def suspect_every_epoch(run: DetectRun, seed: int, attack: str) -> EveryEpoch:
    """The grid's suspect for ``(seed, attack)`` end to end, with a copy after every epoch: read from the
    work directory, else trained (``DetectRun._train``), measured and saved."""
    run.prepare(seed)
    data = run.data[seed]
    poisons = run.poisoned_set(seed, attack, run.cfg.fraction(attack))
    x, y = poisons.apply(data.x_train, data.y_train)
    poisoned = torch.zeros(x.shape[0], dtype=torch.bool)
    poisoned[poisons.rows] = True
    path = run.seed_dir(seed) / "suspects" / f"{attack}-{SETTING}-every-epoch.pt"
    options = {"model": run.cfg.model, "attack": to_dict(run.cfg.attack_options(attack)),
               "training": to_dict(run.cfg.training(SETTING, seed))}
    if path.exists():
        saved = load_torch_file(path, "delete it to train the suspect again")
        if not isinstance(saved, dict) or saved.get("format") != FORMAT or saved.get("options") != options:
            raise ValueError(f"{path}: not the {attack} suspect of this benchmark's options; delete it to train "
                             "it again")
        model, snapshots = run._victim(SETTING, seed), []
        trained_module(model).load_state_dict(saved["state"])
        for state in saved["snapshots"]:
            snapshots.append(run._victim(SETTING, seed))
            trained_module(snapshots[-1]).load_state_dict(state)
        return EveryEpoch(model.eval(), [s.eval() for s in snapshots], saved["best_epoch"], saved["clean_error"],
                          saved["asr"], x, y, poisoned)
    print(f"seed {seed}, {attack}: training the suspect, a copy after every epoch", flush=True)
    epochs = list(range(1, run.cfg.training(SETTING, seed).epochs + 1))
    model, snapshots, _, log, _ = run._train(SETTING, seed, x, y, keep_epochs=epochs)
    error, asr = run._measure(model, seed, attack)
    atomic_torch_save({"format": FORMAT, "options": options, "state": trained_module(model).state_dict(),
                       "snapshots": [trained_module(s).state_dict() for s in snapshots], "best_epoch": log.best_epoch,
                       "clean_error": error, "asr": asr, "val_loss": log.val_loss}, path)
    return EveryEpoch(model, snapshots, log.best_epoch, error, asr, x, y, poisoned)


def measure(scores: torch.Tensor, flags: torch.Tensor, poisoned: torch.Tensor, fpr: float, prefix: str = "flag"
            ) -> dict[str, float]:
    """AUROC and TPR at ``fpr`` of ``scores [N]``; TPR and FPR of ``flags [N]`` bool as ``PREFIX_tpr/fpr``."""
    summary = detection_summary(scores.detach().cpu().double(), poisoned, fpr=fpr)
    return {"auroc": round(summary["auroc"], 4), "tpr_at_fpr": round(summary["tpr_at_fpr"], 4),
            **flag_rates(flags, poisoned, prefix), **flag_rates(log_tail_flags(scores), poisoned, "logtail")}


def log_tail_flags(scores: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: the default rule (:func:`tail_threshold`) on ``log s`` instead of ``s``
    (``s`` clamped to the dtype's smallest normal number first): not a memdisc rule, a measured alternative
    for scores whose clean values are skewed (a KL, a cross-entropy) and whose lower half is then narrow."""
    logs = scores.detach().double().clamp_min(torch.finfo(scores.dtype).tiny).log()
    return logs >= tail_threshold(logs)


def flag_rates(flags: torch.Tensor, poisoned: torch.Tensor, prefix: str) -> dict[str, float]:
    flags = flags.cpu()
    return {f"{prefix}_flagged": int(flags.sum()),
            f"{prefix}_tpr": round(float((flags & poisoned).sum() / poisoned.sum()), 4),
            f"{prefix}_fpr": round(float((flags & ~poisoned).sum() / (~poisoned).sum()), 4)}


def resolve_subset(spec: str, suspect: EveryEpoch, current: int) -> list[int]:
    """The epochs of subset ``spec`` (``"1,2,3"``, ``"last-1"``, ``"best-1"``) before epoch ``current``, the
    one whose weights the scored model holds."""
    anchor = {"last-1": len(suspect.snapshots) - 1, "best-1": suspect.best_epoch - 1}
    epochs = [anchor[spec]] if spec in anchor else [int(e) for e in spec.split(",")]
    return [e for e in epochs if 1 <= e < current]


def md_rows(run: DetectRun, seed: int, attack: str, suspect: EveryEpoch, subsets: list[str]) -> list[dict]:
    """Part ``md`` (module docstring) for one suspect."""
    fpr, default = run.cfg.fpr, run.cfg.md
    with torch.no_grad():
        every = SnapshotSet(suspect.snapshots)
        snapshot_logits = every.logits(suspect.x)  # [E, N, C]
        currents = {"best": (suspect.model, suspect.best_epoch),
                    "last": (suspect.snapshots[-1], len(suspect.snapshots))}
        kl = {which: discrepancy(model(suspect.x), snapshot_logits) for which, (model, _) in currents.items()}  # [E, N]
    grid = [e - 1 for e in resolve_subset(",".join(map(str, default.snapshot_epochs)), suspect, suspect.best_epoch)]
    if grid:  # the grid's MD on this suspect (none when it has no copy before the best epoch)
        detector = DETECTORS["MD"](SnapshotSet([suspect.snapshots[i] for i in grid]), reduce=default.reduce)
        torch.testing.assert_close(detector.score(suspect.model, suspect.x, suspect.y),
                                   reduce_over_snapshots(kl["best"][grid], default.reduce))
    rows = []
    for which, spec in itertools.product(currents, subsets):
        epochs = resolve_subset(spec, suspect, currents[which][1])
        if not epochs:
            continue
        for reduce in REDUCTIONS[:1] if len(epochs) == 1 else REDUCTIONS:
            detector = DETECTORS["MD"](SnapshotSet([suspect.snapshots[e - 1] for e in epochs]), reduce=reduce)
            scores = reduce_over_snapshots(kl[which][[e - 1 for e in epochs]], reduce)
            flags = detector.flag(scores, suspect.y)
            rows.append({"part": "md", "stage": "", "seed": seed, "attack": attack, **suspect.describe(),
                         "md_model": which, "md_subset": spec, "md_epochs": " ".join(map(str, epochs)),
                         "md_reduce": reduce, **measure(scores, flags, suspect.poisoned, fpr),
                         "tpr_at_fpr_low": round(tpr_at_fpr(-scores.double(), suspect.poisoned, fpr), 4)})
    return rows


def asset_row(run: DetectRun, seed: int, attack: str, suspect: EveryEpoch, stage: str, options: dict) -> dict:
    """ASSET with the grid's options updated by ``options``, the seed's base set and the cell's seed."""
    options = {**dataclasses.asdict(run.cfg.asset), **options}
    detector = DETECTORS["asset"](None, **options, seed=seed)
    start = time.perf_counter()
    detector.fit(suspect.model, *run.base[seed])
    scores = detector.score(suspect.model, suspect.x, suspect.y)
    flags = detector.flag(scores, suspect.y)
    seconds = time.perf_counter() - start
    row = {"part": "asset", "stage": stage, "seed": seed, "attack": attack, **suspect.describe(),
           **{f"asset_{k}": options[k] for k in ("lr", "vnet_lr", "epochs", "batch_size")},
           **measure(scores, flags, suspect.poisoned, run.cfg.fpr),
           **flag_rates(Detector.flag(detector, scores, suspect.y), suspect.poisoned, "tail"),
           "seconds": round(seconds, 2)}
    print({k: row[k] for k in ("stage", "seed", "attack", "asset_lr", "asset_vnet_lr", "asset_epochs",
                               "asset_batch_size", "auroc", "tpr_at_fpr", "flag_fpr", "seconds")}, flush=True)
    return row


def setting_of(row: dict) -> tuple:
    return tuple(float(row[f"asset_{k}"]) if k.endswith("lr") else int(row[f"asset_{k}"])
                 for k in ("lr", "vnet_lr", "epochs", "batch_size"))


def best_settings(rows: list[dict], stages: tuple[str, ...], k: int) -> list[tuple]:
    """The ``k`` ASSET settings of the ``rows`` of ``stages`` (each setting once there) with the highest TPR
    at the target FPR, then AUROC."""
    rows = sorted((r for r in rows if r["stage"] in stages), key=lambda r: (float(r["tpr_at_fpr"]),
                                                                           float(r["auroc"])), reverse=True)
    return [setting_of(r) for r in rows[:k]]


def as_options(setting: tuple) -> dict:
    return dict(zip(("lr", "vnet_lr", "epochs", "batch_size"), setting))


def number_list(kind: type):
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"expected values > 0, got {text!r}")
        return values
    return parse


def subset_list(text: str) -> list[str]:
    specs = text.split(";")
    for spec in specs:
        if spec not in RELATIVE and not all(e.isdigit() and int(e) >= 1 for e in spec.split(",")):
            raise argparse.ArgumentTypeError(f"expected subsets like '1,2,3', 'last-1' or 'best-1' separated by "
                                             f"';', got {spec!r}")
    return specs


def summarise(rows: list[dict]) -> None:
    """Markdown tables: per setting and attack, the mean over the seeds and each seed's value."""
    def cell(group: list[dict], key: str) -> str:
        values = [float(r[key]) for r in group]
        return f"{statistics.mean(values):.3f} ({' / '.join(f'{v:.3f}' for v in values)})"

    for part, keys in (("md", ("md_model", "md_subset", "md_reduce")),
                       ("asset", ("asset_lr", "asset_vnet_lr", "asset_epochs", "asset_batch_size"))):
        metrics = ("auroc", "tpr_at_fpr", "flag_tpr", "flag_fpr", "logtail_tpr", "logtail_fpr") + (
            ("tail_tpr", "tail_fpr", "seconds") if part == "asset" else ("tpr_at_fpr_low",))
        chosen = [r for r in rows if r["part"] == part]
        groups: dict[tuple, list[dict]] = {}
        for r in chosen:  # read back from the CSV, a row holds strings: ASSET's settings are keyed as numbers
            setting = setting_of(r) if part == "asset" else tuple(r[k] for k in keys)
            groups.setdefault((r["attack"],) + setting, []).append(r)
        if not groups:
            continue
        print(f"\n| attack | {' | '.join(keys)} | seeds | {' | '.join(metrics)} |")
        print("|" + "---|" * (len(keys) + len(metrics) + 2))
        for key, group in groups.items():
            print(f"| {' | '.join(map(str, key))} | {len(group)} | "
                  f"{' | '.join(cell(group, m) for m in metrics)} |")


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(here, "results", "epyc-avx2"), type=out_dir_arg,
                        help="directory for the CSV")
    parser.add_argument("--work", default=os.path.join(os.path.dirname(here), "runs", "detector-settings"),
                        help="the grid's run directory for the seeds' poisons and the suspects (a cache)")
    parser.add_argument("--seeds", default=[100, 101], type=number_list(int),
                        help="tuning seeds, none of the committed grid's")
    parser.add_argument("--parts", default="md,asset", choices=("md", "asset", "md,asset"))
    parser.add_argument("--md-subsets", default=subset_list(MD_SUBSETS), type=subset_list,
                        help=f"MD's subsets of epochs, ';'-separated (default {MD_SUBSETS})")
    parser.add_argument("--asset-lr", default=[1e-4, 1e-3, 3e-3], type=number_list(float))
    parser.add_argument("--asset-vnet-lr", default=[1e-4, 1e-3], type=number_list(float))
    parser.add_argument("--asset-epochs", default=[1, 2], type=number_list(int))
    parser.add_argument("--asset-batch", default=128, type=int, help="the batch size of the 'batch' stage")
    parser.add_argument("--asset-batch-top", default=2, type=int, help="screened settings rerun at --asset-batch")
    parser.add_argument("--asset-confirm", default=3, type=int, help="settings confirmed on every seed and attack")
    parser.add_argument("--resume", action="store_true", help="keep OUT's CSV rows and run only what it lacks")
    parser.add_argument("--summary-only", action="store_true", help="print the summary of OUT's CSV, run nothing")
    args = parser.parse_args()
    path = os.path.join(args.out, CSV_NAME)
    if args.summary_only:
        with open(path, newline="") as f:
            summarise(list(csv.DictReader(f)))
        return
    cfg = load_detect_config(None, {"out": args.work})
    committed = set(cfg.seeds())
    if committed & set(args.seeds):
        parser.error(f"--seeds: expected tuning seeds apart from the committed grid's {sorted(committed)}, got "
                     f"{args.seeds}")
    torch.set_num_threads(1)
    run = DetectRun(cfg, torch.device("cpu"), progress=False)
    run.load_splits()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    if args.resume and os.path.exists(path):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))

    def done(seed: int, attack: str, setting: tuple | None = None) -> bool:
        """Whether ``rows`` hold MD's rows of ``(seed, attack)`` (``setting`` None) or ASSET's with ``setting``."""
        return any(str(r["seed"]) == str(seed) and r["attack"] == attack
                   and (r["part"] == "md" if setting is None else r["part"] == "asset" and setting_of(r) == setting)
                   for r in rows)

    def keep(new: list[dict]) -> None:
        stamp = {**provenance("cpu"), "load1": round(os.getloadavg()[0], 2)}
        rows.extend({**row, **stamp} for row in new)
        write_csv_atomic(path, rows)

    pairs = [(seed, attack) for seed in args.seeds for attack in cfg.attacks]
    suspects = {pair: suspect_every_epoch(run, *pair) for pair in pairs}
    if "md" in args.parts:
        for pair in (p for p in pairs if not done(*p)):
            keep(md_rows(run, *pair, suspects[pair], args.md_subsets))
    if "asset" in args.parts:
        first = pairs[0]
        batch = cfg.asset.batch_size
        screen = list(itertools.product(args.asset_lr, args.asset_vnet_lr, args.asset_epochs, [batch]))
        for setting in (s for s in screen if not done(*first, s)):
            keep([asset_row(run, *first, suspects[first], "screen", as_options(setting))])
        for setting in best_settings(rows, ("screen",), args.asset_batch_top):
            setting = setting[:3] + (args.asset_batch,)
            if not done(*first, setting):
                keep([asset_row(run, *first, suspects[first], "batch", as_options(setting))])
        notebook = {k: p.default for k, p in inspect.signature(DETECTORS["asset"]).parameters.items()}
        baselines = [setting_of({f"asset_{k}": v for k, v in options.items()})
                     for options in (notebook, dataclasses.asdict(cfg.asset))]
        confirm = dict.fromkeys(best_settings(rows, ("screen", "batch"), args.asset_confirm) + baselines)
        for pair, setting in itertools.product(pairs, confirm):
            if not done(*pair, setting):
                keep([asset_row(run, *pair, suspects[pair], "confirm", as_options(setting))])
    summarise(rows)


if __name__ == "__main__":
    main()
