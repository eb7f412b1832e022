"""memdisc.detectors: MD as a detector (the registry-wide contract is tests/test_contracts.py)."""
from __future__ import annotations

import pytest
import torch

from memdisc.detectors import DETECTORS, MDDetector, discrepancy_scores, reduce_over_snapshots
from memdisc.ops import discrepancy
from memdisc.snapshots import SnapshotSet
from test_snapshots import batch, make_cnn  # the snapshot tests' BatchNorm CNN and inputs


def test_reduce_over_snapshots():
    md = torch.tensor([[0.1, 0.5, 0.3], [0.4, 0.2, 0.3]])
    torch.testing.assert_close(reduce_over_snapshots(md), torch.tensor([0.25, 0.35, 0.3]))
    torch.testing.assert_close(reduce_over_snapshots(md, "mean"), md.mean(0))
    torch.testing.assert_close(reduce_over_snapshots(md, "max"), torch.tensor([0.4, 0.5, 0.3]))
    torch.testing.assert_close(reduce_over_snapshots(md, "min"), torch.tensor([0.1, 0.2, 0.3]))
    torch.testing.assert_close(reduce_over_snapshots(md, 1), md[1])
    torch.testing.assert_close(reduce_over_snapshots(md, -2), md[0])
    for bad in (2, -3):
        with pytest.raises(ValueError, match=f"index {bad} out of range for K=2"):
            reduce_over_snapshots(md, bad)
    for bad in ("median", True):
        with pytest.raises(ValueError, match="expected 'mean', 'max', 'min' or an int"):
            reduce_over_snapshots(md, bad)


@pytest.mark.parametrize("reduce", ["mean", "max", "min", 0, -1])
def test_md_detector_is_the_reduced_kl_to_the_snapshots(reduce):
    model, snaps = make_cnn(0), SnapshotSet([make_cnn(1), make_cnn(2)])
    x = batch()
    model.train()
    scores = DETECTORS["MD"](snaps, reduce=reduce, temperature=2.0).score(model, x)
    model.eval()
    with torch.no_grad():
        want = reduce_over_snapshots(discrepancy(model(x), torch.stack([m(x) for m in snaps.models]), 2.0), reduce)
    torch.testing.assert_close(scores, want)
    assert torch.equal(scores, discrepancy_scores(model, snaps, x, reduce, 2.0))


def test_md_detector_refuses_bad_options_by_name():
    snaps = SnapshotSet([make_cnn(1)])
    with pytest.raises(ValueError, match="^reduce: expected one of mean, max, min or an int, got 'median'"):
        MDDetector(snaps, reduce="median")
    for bad in (0, -1.0, True, "1"):
        with pytest.raises(ValueError, match="^temperature: expected a number > 0"):
            MDDetector(snaps, temperature=bad)
