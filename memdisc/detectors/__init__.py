"""Detectors of poisoned samples: ``fit`` on clean data, then ``score(model, x, y) -> [N]`` (higher = more
suspicious) and ``flag(scores, y) -> [N] bool`` (the detector's own threshold rule).

    base.py                   Detector (the interface, the default flag rule), DETECTORS (name -> class)
    thresholds.py             the flag thresholds on a set's scores: the lower-half Gaussian tail (default)
                              and ASSET's get_t
    model_outputs.py          what the detectors read of the model under test (logits, penultimate
                              features), eval mode, and the labelled-set check
    md.py                     Memorization Discrepancy against the historical snapshots ("MD")
    loss.py                   a sample's loss under the model, the baseline ("loss")
    spectral.py               spectral signatures, Tran et al. 2018 ("spectral")
    activation_clustering.py  activation clustering, Chen et al. 2018 ("activation-clustering")
    outlyingness.py           medcouple and adjusted outlyingness (ASSET's choice of rows)
    asset.py                  ASSET, Pan et al. 2023, as its notebook ("asset")
"""
from memdisc.detectors.base import DETECTORS, Detector, register_detector
from memdisc.detectors.md import MDDetector, discrepancy_scores, reduce_over_snapshots
from memdisc.detectors.loss import LossDetector
from memdisc.detectors.spectral import SpectralDetector, spectral_signature
from memdisc.detectors.activation_clustering import ActivationClusteringDetector, cluster_margins
from memdisc.detectors.asset import ASSETDetector, offset_model, output_variance
from memdisc.detectors.outlyingness import adjusted_outlyingness, medcouple
from memdisc.detectors.thresholds import asset_threshold, tail_threshold

__all__ = ["Detector", "DETECTORS", "register_detector", "MDDetector", "discrepancy_scores",
           "reduce_over_snapshots", "LossDetector", "SpectralDetector", "spectral_signature",
           "ActivationClusteringDetector", "cluster_margins", "ASSETDetector", "offset_model", "output_variance",
           "medcouple", "adjusted_outlyingness", "tail_threshold", "asset_threshold"]
