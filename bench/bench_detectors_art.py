"""Spectral signatures and activation clustering: memdisc's detectors against IBM ART's, on the same
features of the same poisoned training sets (issue 14).

    OMP_NUM_THREADS=1 PYTHONPATH=. /work/venv-art/bin/python bench/bench_detectors_art.py \\
        [--run /tmp/memdisc-detect-art] [--out bench/results/epyc-avx2] [--repeats 3] [--rounds 3] [--threads 1]

Needs the adversarial-robustness-toolbox (``pip install adversarial-robustness-toolbox``, MIT; not a
dependency of memdisc: install it in a venv that also sees memdisc's dependencies).

Inputs: the detection grid's (:mod:`memdisc.experiments.detect`, ``memdisc detect`` with its defaults:
Fashion-MNIST, model ``cnn``, 6000 training rows, BadNets and Blended at 5 %, end-to-end, seeds
``0 .. repeats - 1``).  :class:`~memdisc.experiments.detect.DetectRun` makes each seed's poisoned set
and suspect model, or reads them from the grid run directory ``--run`` (a ``memdisc detect --run DIR``
directory can be given: same configuration and thread count, checked as the grid checks it).

Per seed x attack: the penultimate features ``F = suspect.model.features(x)`` ``[N, 128]`` of every
training row (timed once: ``feature_seconds``), then on exactly those ``F`` (float32):

* memdisc ``spectral`` and ``activation-clustering``: ``score`` + ``flag``, given ``F`` as the rows
  and :class:`Penultimate` as the model (its ``features`` is the identity);
* ART ``SpectralSignatureDefense`` and ``ActivationDefence`` (``detect_poison``): ART reads the
  activations of its classifier's *last* layer name (``layer_names[-1]``; for a ``PyTorchClassifier``
  the model's last registered child module).  For memdisc's ``cnn`` that is ``head``: the logits
  (10 dims), not the features.  So ART gets a ``PyTorchClassifier`` of :class:`Penultimate` (the
  suspect's ``head`` on ``F``, its last child an identity named ``features``) and ``x_train = F``; the
  bench checks that ART's activations at that layer equal ``F`` bit for bit.

Option sets (``option_set``):

* ``matched``: the grid's detector options (read from ``DetectConfig``), given to ART as far as it
  takes them.  Spectral: memdisc ``expected_fraction`` (0.1), ART ``expected_pp_poison`` the same,
  ``eps_multiplier`` 1.5 (memdisc's fixed multiplier).  Activation clustering: memdisc FastICA to
  ``components`` (10) dims, 2-means, relative size < 0.35; ART ``nb_dims`` the same, ``reduce``
  FastICA, ``nb_clusters`` 2, its relative-size rule (threshold fixed at 0.35).  ART 1.20.1's
  ``detect_poison(cluster_analysis="relative-size")`` raises under numpy 2.4 for every class without a
  suspicious cluster (its report tests ``cluster_id in np.where(...)``, a tuple holding an empty
  array), so here ART clusters (its public ``cluster_activations``) and the bench applies ART's rule
  (:func:`relative_size`) and its row mapping (:func:`cluster_flags`, checked against
  ``detect_poison`` with the "smaller" rule);
* ``art-defaults``: ART's own defaults (spectral ``expected_pp_poison`` 0.33, ``eps_multiplier``
  1.5; activation ``nb_dims`` 10, ``reduce`` PCA, ``cluster_analysis`` smaller, no exclusionary
  reclassification); memdisc's spectral with ``expected_fraction`` 0.33 (memdisc's activation
  clustering has no PCA or "smaller" rule: its ``matched`` row is the counterpart).

ART's FastICA, PCA and KMeans take no seed (``random_state=None``: numpy's global generator), so the
bench seeds numpy's global generator with the grid seed before each ART call; memdisc's are seeded
with the grid seed as the grid does.

Measures per row (positives: the poisoned rows): ``flagged``, ``tpr``, ``fpr`` of the flags,
``balanced_accuracy = (tpr + 1 - fpr) / 2`` (equal to the AUROC of the flags taken as a 0/1 score:
the one quality number every row has); ``auroc`` and ``tpr_at_fpr`` (at the grid's 5 %) where a full
score exists (``auroc_source``): memdisc's scores; for ART's spectral rows, whose ``detect_poison``
reports the scores of the flagged rows only, the per-class scores of ART's public static
``SpectralSignatureDefense.spectral_signature_scores`` (checked: the report's scores and flags are
exactly these and their per-class quantile cut); ART's activation clustering gives flags only.
``jaccard`` = ``|A & B| / |A | B|`` of an ART row's flag set ``A`` and memdisc's ``B`` (the row named
in ``jaccard_with``).  ``seconds``: median wall time of ``--rounds`` interleaved calls (memdisc:
building the detector, score + flag; ART: building the defence, ``detect_poison`` or
``cluster_activations`` + the rule), the feature computation excluded; every round must give the same
flags.

One CSV row per seed x attack x implementation x detector x option set to ``OUT/detectors_vs_art.csv``
(provenance: commit, versions, ART's, CPU ISA, threads); a Markdown table of mean ± std over the seeds
on stdout.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List

import numpy as np
import sklearn
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import out_dir_arg, provenance, write_csv_atomic  # noqa: E402

from memdisc.artifacts import provenance as run_provenance, write_json  # noqa: E402
from memdisc.config import to_dict  # noqa: E402
from memdisc.data import check_dataset_files  # noqa: E402
from memdisc.detectors import DETECTORS  # noqa: E402
from memdisc.detectors.spectral import REMOVAL_MULTIPLIER  # noqa: E402
from memdisc.eval.detection import detection_summary  # noqa: E402
from memdisc.eval.probe import penultimate_features  # noqa: E402
from memdisc.experiments.detect import DetectConfig, DetectRun, _RERUNNABLE  # noqa: E402
from memdisc.experiments.study import check_run_dir  # noqa: E402
from memdisc.experiments.summary import spread  # noqa: E402

ART_INSTALL = ("this benchmark needs IBM's adversarial-robustness-toolbox (not a memdisc dependency): "
               "pip install adversarial-robustness-toolbox (in a venv that also sees torch, scikit-learn and "
               "memdisc's other dependencies)")
ART_RELATIVE_SIZE = 0.35
"""ART's relative-size analysis compares with this fixed threshold (``analyze_by_relative_size`` default)."""
SETTING = "end-to-end"


class Penultimate(nn.Module):
    """The suspect model cut at its penultimate layer: input ``F [N, D]`` (its features), output
    ``head(F) [N, C]`` (its logits).  ``features`` is the identity and is registered last, so memdisc's
    detectors (which call ``model.features(x)``) and ART (which reads its last child's output) both read
    ``F`` itself."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head
        self.features = nn.Identity()

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(f))


def import_art() -> SimpleNamespace:
    """ART's version and the pieces the bench calls; SystemExit with the install line when it is missing."""
    try:
        import art
        from art.defences.detector.poison import ActivationDefence, SpectralSignatureDefense
        from art.defences.detector.poison.clustering_analyzer import ClusteringAnalyzer
        from art.estimators.classification import PyTorchClassifier
        from art.utils import segment_by_class
    except ImportError as exc:
        raise SystemExit(f"{ART_INSTALL} ({exc})") from None
    return SimpleNamespace(version=art.__version__, ActivationDefence=ActivationDefence,
                           SpectralSignatureDefense=SpectralSignatureDefense, ClusteringAnalyzer=ClusteringAnalyzer,
                           PyTorchClassifier=PyTorchClassifier, segment_by_class=segment_by_class)


def flag_measures(flags: np.ndarray, poisoned: np.ndarray) -> Dict[str, float]:
    """``flagged``, ``tpr``, ``fpr`` and ``balanced_accuracy = (tpr + 1 - fpr) / 2`` of bool ``flags [N]``
    against bool ``poisoned [N]``."""
    tpr = float((flags & poisoned).sum() / poisoned.sum())
    fpr = float((flags & ~poisoned).sum() / (~poisoned).sum())
    return {"flagged": int(flags.sum()), "tpr": tpr, "fpr": fpr, "balanced_accuracy": (tpr + 1 - fpr) / 2}


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """``|a & b| / |a | b|`` of two bool ``[N]`` flag sets (1 when both are empty)."""
    union = int((a | b).sum())
    return float((a & b).sum() / union) if union else 1.0


def art_spectral_scores(art: SimpleNamespace, features: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``[N]`` ART's spectral score of every row of ``features [N, D]`` (in their dtype), per class of ``y [N]``:
    its public ``spectral_signature_scores``, ``|<f_i, v_c>|`` with ``v_c`` the top right singular vector of
    the class's centred features, as detect_poison computes them."""
    scores = np.zeros(len(y), dtype=features.dtype)
    for c in np.unique(y):
        scores[y == c] = art.SpectralSignatureDefense.spectral_signature_scores(features[y == c])[:, 0]
    return scores


def art_spectral_ranking(art: SimpleNamespace, features: np.ndarray, y: np.ndarray, report: Dict[int, float],
                         flags: np.ndarray, options: Dict[str, float]) -> np.ndarray:
    """``[N]`` :func:`art_spectral_scores`, checked to be what ``detect_poison`` ranked: its ``report`` holds
    exactly the flagged rows with these scores, and its ``flags`` are the per-class cut ``score >=
    np.quantile(class scores, max(0, 1 - eps_multiplier * expected_pp_poison))``.

    Raises:
        RuntimeError: when they are not.
    """
    scores = art_spectral_scores(art, features, y)
    level = max(0.0, 1 - options["eps_multiplier"] * options["expected_pp_poison"])
    cut = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        cut[y == c] = scores[y == c] >= np.quantile(scores[y == c], level)
    rows = np.array(sorted(report), dtype=np.int64)
    if not (np.array_equal(cut, flags) and np.array_equal(rows, np.flatnonzero(flags))
            and np.array_equal(np.array([report[i] for i in rows]), scores[rows])):
        raise RuntimeError("ART's spectral report is not its static scores' per-class quantile cut")
    return scores


def smaller(clusters: np.ndarray) -> np.ndarray:
    """ART's "smaller" rule: the cluster ids ``[1]`` of the smallest cluster of one class (``np.argmin`` of the
    sizes)."""
    return np.array([np.argmin(np.bincount(clusters))])


def relative_size(clusters: np.ndarray) -> np.ndarray:
    """ART's "relative-size" rule: the cluster ids holding less than 0.35 of one class, shares rounded to two
    decimals as ``analyze_by_relative_size`` rounds them."""
    return np.flatnonzero(np.round(np.bincount(clusters) / len(clusters), 2) < ART_RELATIVE_SIZE)


def cluster_flags(art: SimpleNamespace, clusters_by_class: List[np.ndarray], y: np.ndarray, num_classes: int,
                  rule: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``[N]`` bool: the rows in a cluster ``rule`` calls poisonous, from ART's per-class cluster ids (rows
    of each class in ART's order, ``segment_by_class``) and its ``ClusteringAnalyzer.assign_class``."""
    flags = np.zeros(len(y), dtype=bool)
    for rows, clusters in zip(art.segment_by_class(np.arange(len(y)), y, num_classes), clusters_by_class):
        poison = rule(clusters)
        clean = np.setdiff1d(np.unique(clusters), poison)
        flags[rows] = art.ClusteringAnalyzer.assign_class(clusters, clean, poison) == 0
    return flags


def providers(F: torch.Tensor, y: torch.Tensor, seed: int, run: DetectRun, suspect,
              art: SimpleNamespace) -> Dict[tuple, Callable]:
    """Each (implementation, detector, option_set) as a call ``() -> (flags bool [N], scores or None,
    options dict)`` on the features ``F [N, D]`` and labels ``y [N]`` (ART's spectral gives its report
    ``{row: score}`` of the flagged rows as its scores)."""
    model = Penultimate(suspect.model.head).eval()
    x_art, y_art = F.numpy(), y.numpy()
    num_classes = int(suspect.model.head.out_features)
    classifier = art.PyTorchClassifier(model, loss=nn.CrossEntropyLoss(), input_shape=(F.shape[1],),
                                       nb_classes=num_classes, device_type="cpu")
    layer = len(classifier.layer_names) - 1  # the layer both ART detectors read
    if classifier.layer_names[layer] != "features" or \
            not np.array_equal(classifier.get_activations(x_art, layer=layer, batch_size=128), x_art):
        raise RuntimeError(f"ART reads layer {classifier.layer_names[layer]!r}, not the features F")
    art_defaults = art.SpectralSignatureDefense(classifier, x_art, y_art).expected_pp_poison

    def memdisc(name: str, **options):
        def call():
            detector, used = (run.detector(name, seed, suspect) if not options
                              else (DETECTORS[name](None, **options), options))
            scores = detector.score(model, F, y)
            return detector.flag(scores, y).numpy(), scores.double().numpy(), used
        return call

    def art_spectral(**options):
        def call():
            defence = art.SpectralSignatureDefense(classifier, x_art, y_art, **options)
            report, is_clean = defence.detect_poison()
            return np.asarray(is_clean) == 0, report, {"expected_pp_poison": defence.expected_pp_poison,
                                                       "eps_multiplier": defence.eps_multiplier}
        return call

    def art_defaults_clustering():
        np.random.seed(seed)  # ART's PCA / FastICA / KMeans draw from numpy's global generator
        defence = art.ActivationDefence(classifier, x_art, y_art)
        _, is_clean = defence.detect_poison()
        flags = np.asarray(is_clean) == 0
        if not np.array_equal(cluster_flags(art, defence.clusters_by_class, y_art, num_classes, smaller), flags):
            raise RuntimeError("cluster_flags does not map ART's clusters to rows as detect_poison does")
        return flags, None, {k: v for k, v in defence.get_params().items() if k != "generator"}

    def art_matched_clustering():
        # detect_poison(cluster_analysis="relative-size") raises in ART 1.20.1 under numpy 2.4 for every class
        # without a suspicious cluster (its report tests `cluster_id in np.where(...)`, a tuple holding an empty
        # array); so ART clusters (cluster_activations, public) and the bench applies ART's relative-size rule.
        np.random.seed(seed)
        defence = art.ActivationDefence(classifier, x_art, y_art)
        options = {"nb_clusters": 2, "nb_dims": run.cfg.activation_clustering.components, "reduce": "FastICA"}
        clusters_by_class, _ = defence.cluster_activations(**options)
        flags = cluster_flags(art, clusters_by_class, y_art, num_classes, relative_size)
        return flags, None, {**options, "clustering_method": defence.clustering_method,
                             "cluster_analysis": f"relative-size {ART_RELATIVE_SIZE} (applied by the bench)"}

    return {
        ("memdisc", "spectral", "matched"): memdisc("spectral"),
        ("art", "spectral", "matched"): art_spectral(expected_pp_poison=run.cfg.spectral.expected_fraction,
                                                     eps_multiplier=REMOVAL_MULTIPLIER),
        ("memdisc", "spectral", "art-defaults"): memdisc("spectral", expected_fraction=art_defaults),
        ("art", "spectral", "art-defaults"): art_spectral(),
        ("memdisc", "activation-clustering", "matched"): memdisc("activation-clustering"),
        ("art", "activation-clustering", "matched"): art_matched_clustering,
        ("art", "activation-clustering", "art-defaults"): art_defaults_clustering,
    }


def measure(seed: int, attack: str, run: DetectRun, art: SimpleNamespace, rounds: int) -> List[Dict[str, object]]:
    """The rows of one seed x attack (module docstring)."""
    cfg, data = run.cfg, run.data[seed]
    suspect = run.suspect(seed, attack, SETTING)
    poisons = run.poisoned_set(seed, attack, cfg.fraction(attack))
    x, y = poisons.apply(data.x_train, data.y_train)
    poisoned = np.zeros(len(y), dtype=bool)
    poisoned[poisons.rows.numpy()] = True
    start = time.perf_counter()
    F = penultimate_features(suspect.model, x)
    feature_seconds = time.perf_counter() - start
    y = y.cpu()
    calls = providers(F, y, seed, run, suspect, art)
    times: Dict[tuple, List[float]] = {key: [] for key in calls}
    outputs: Dict[tuple, tuple] = {}
    for _ in range(rounds):
        for key, call in calls.items():
            start = time.perf_counter()
            flags, scores, options = call()
            times[key].append(time.perf_counter() - start)
            if key in outputs and not np.array_equal(outputs[key][0], flags):
                raise RuntimeError(f"{key}: the flags changed between rounds")
            outputs[key] = (flags, scores, options)
    rows = []
    for (impl, name, option_set), (flags, scores, options) in outputs.items():
        row = {"seed": seed, "attack": attack, "setting": SETTING, "rows": len(y), "poisoned": int(poisoned.sum()),
               "suspect_clean_error": suspect.clean_error, "suspect_asr": suspect.asr,
               "feature_dim": F.shape[1], "feature_seconds": feature_seconds,
               "implementation": impl, "detector": name, "option_set": option_set, "options": str(options),
               **flag_measures(flags, poisoned)}
        source = "scores"
        if impl == "art" and name == "spectral":  # its "scores": detect_poison's report {row: score}, flagged rows
            scores = art_spectral_ranking(art, F.numpy(), y.numpy(), scores, flags, options)
            source = "art-static-scores"
        if scores is None:
            row.update(auroc=None, tpr_at_fpr=None, auroc_source="n/a (flags only)")
        else:
            summary = detection_summary(scores, poisoned, fpr=cfg.fpr)
            row.update(auroc=summary["auroc"], tpr_at_fpr=summary["tpr_at_fpr"], auroc_source=source)
        row.update(jaccard=None, jaccard_with="")
        if impl == "art":
            partner = ("memdisc", name, option_set if (("memdisc", name, option_set) in outputs) else "matched")
            row.update(jaccard=jaccard(flags, outputs[partner][0]), jaccard_with=" ".join(partner))
        row.update(seconds=statistics.median(times[(impl, name, option_set)]),
                   seconds_rounds=";".join(f"{t:.4f}" for t in times[(impl, name, option_set)]))
        rows.append(row)
    return rows


def table(rows: List[Dict[str, object]]) -> str:
    """Markdown: per attack x detector x implementation x option set, mean ± std (ddof 1) over the seeds."""
    def cell(values, scale=1.0, digits=3):
        values = [v for v in values if v is not None]
        if not values:
            return "n/a"
        s = spread([scale * float(v) for v in values])
        return f"{s['mean']:.{digits}f}" + ("" if s["std"] is None else f" ± {s['std']:.{digits}f}")

    groups: Dict[tuple, List[Dict[str, object]]] = {}
    for row in rows:
        groups.setdefault((row["attack"], row["detector"], row["option_set"], row["implementation"]), []).append(row)
    lines = ["| attack | detector | options | impl | TPR % | FPR % | balanced acc. | AUROC | Jaccard vs memdisc "
             "| time (s) |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for (attack, name, option_set, impl), group in groups.items():
        col = lambda k: [r.get(k) for r in group]  # noqa: E731
        lines.append(f"| {attack} | {name} | {option_set} | {impl} | {cell(col('tpr'), 100, 1)} | "
                     f"{cell(col('fpr'), 100, 1)} | {cell(col('balanced_accuracy'))} | "
                     f"{cell(col('auroc'))} | {cell(col('jaccard'))} | {cell(col('seconds'), 1, 3)} |")
    features = spread([float(r["feature_seconds"]) for r in rows if r["implementation"] == "memdisc"
                       and r["detector"] == "spectral" and r["option_set"] == "matched"])
    return "\n".join(lines) + f"\n\nfeature computation (not in the times above): {features['mean']:.3f} s " \
                              f"(mean over seed x attack)"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default=os.path.join("/tmp", "memdisc-detect-art"),
                    help="the detection grid's run directory (its cached poisons and suspect models)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "epyc-avx2"),
                    type=out_dir_arg, help="directory for the CSV")
    ap.add_argument("--repeats", type=int, default=DetectConfig.repeats, help="seeds 0 .. repeats - 1")
    ap.add_argument("--rounds", type=int, default=3, help="timed calls of each detector (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch, BLAS and OpenMP threads")
    args = ap.parse_args(argv)
    for name in ("repeats", "rounds", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name}: expected an int >= 1, got {getattr(args, name)}")
    art = import_art()
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency: caps numpy's BLAS and OpenMP

    torch.set_num_threads(args.threads)
    cfg = DetectConfig(out=args.run, repeats=args.repeats, device="cpu")
    if cfg.activation_clustering.size_threshold != ART_RELATIVE_SIZE:
        raise SystemExit(f"activation_clustering.size_threshold {cfg.activation_clustering.size_threshold}: ART's "
                         f"relative-size rule is fixed at {ART_RELATIVE_SIZE}, the matched rows would not match")
    check_run_dir(cfg, _RERUNNABLE, "detection grid")
    check_dataset_files(cfg.dataset, cfg.data_dir)
    config = Path(cfg.out) / "config.json"
    if not config.exists():  # as memdisc detect writes it, so the directory is a grid run directory either way
        write_json(config, {"command": "detect", "config": to_dict(cfg), "threads": torch.get_num_threads(),
                            "provenance": run_provenance(cfg.seed, "cpu")})
    run = DetectRun(cfg, torch.device("cpu"))
    run.load_splits()
    prov = {**provenance("cpu"), "art": art.version, "sklearn": sklearn.__version__,
            "numpy": np.__version__, "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset")}
    rows = []
    with threadpool_limits(limits=args.threads):
        for seed in cfg.seeds():
            run.prepare(seed)
            for attack in cfg.attacks:
                new = measure(seed, attack, run, art, args.rounds)
                for row in new:
                    print(f"seed {seed} {attack:8s} {row['implementation']:7s} {row['detector']:21s} "
                          f"{row['option_set']:12s} TPR {100 * row['tpr']:5.1f}% FPR {100 * row['fpr']:5.1f}% "
                          f"bal {row['balanced_accuracy']:.3f} AUROC "
                          f"{'  n/a' if row['auroc'] is None else format(row['auroc'], '.3f')} "
                          f"{row['seconds']:.3f} s", flush=True)
                rows += [{**row, **prov, "config": str(vars(args))} for row in new]
    path = os.path.join(args.out, "detectors_vs_art.csv")
    write_csv_atomic(path, rows)
    print(table(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
