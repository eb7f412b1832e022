"""Detectors of poisoned samples: ``fit`` on clean data, then ``score(model, x, y) -> [N]``.

    base.py  Detector (the interface), DETECTORS (name -> class)
    md.py    Memorization Discrepancy against the historical snapshots ("MD")
"""
from memdisc.detectors.base import DETECTORS, Detector, register_detector
from memdisc.detectors.md import MDDetector, discrepancy_scores, reduce_over_snapshots

__all__ = ["Detector", "DETECTORS", "register_detector", "MDDetector", "discrepancy_scores",
           "reduce_over_snapshots"]
