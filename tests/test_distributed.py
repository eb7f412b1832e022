"""memdisc.runtime.distributed: the single-process Comm is the identity, and the four global values
(DSC's calibrated quantile, the per-batch rule's batch mean, the test error, the recorder) go through
it, checked with a fake second rank whose shard the test holds."""
from __future__ import annotations

import pytest
import torch

from memdisc.defenses import DSC, ThresholdSchedule
from memdisc.defenses.base import BatchReport
from memdisc.eval.classification import error_rate
from memdisc.eval.recorder import RunRecord
from memdisc.runtime.distributed import LOCAL, Comm, TorchDistributedComm
from memdisc.snapshots import SnapshotSet
from test_snapshots import batch, make_cnn  # the snapshot tests' BatchNorm CNN and inputs


class OtherRank(Comm):
    """Rank 0 of two: the other rank's contributions are queued by the test, one per collective call."""
    world_size = 2

    def __init__(self, *theirs: torch.Tensor):
        self.theirs = list(theirs)

    def all_gather(self, t):
        return torch.cat([t, self.theirs.pop(0).to(t.dtype)])

    def all_reduce_sum(self, t):
        return t + self.theirs.pop(0)

    def row_mean(self, t):
        theirs = self.theirs.pop(0)
        return (t.sum() + theirs.sum()) / (t.numel() + theirs.numel())


def test_one_process_is_the_identity_and_writes():
    t = torch.randn(5, 3)
    assert LOCAL.world_size == 1 and LOCAL.rank == 0 and LOCAL.is_writer
    for op in (LOCAL.all_gather, LOCAL.all_reduce_sum, LOCAL.shard):
        assert op(t) is t
    assert not type("Rank1", (Comm,), {"rank": 1})().is_writer


def test_torch_distributed_comm_needs_an_initialised_group():
    with pytest.raises(RuntimeError, match="not initialised"):
        TorchDistributedComm()


def test_the_calibrated_quantile_is_over_every_rank_s_held_out_scores():
    scores = torch.rand(40, generator=torch.Generator().manual_seed(0))
    for batch_size in (None, 8):
        whole, sharded = ThresholdSchedule(quantile=0.9), ThresholdSchedule(quantile=0.9)
        whole.update(0, scores, batch_size, torch.Generator().manual_seed(1))
        sharded.update(0, scores[:15], batch_size, torch.Generator().manual_seed(1), comm=OtherRank(scores[15:]))
        assert sharded.value == whole.value


def test_the_test_error_counts_every_rank_s_samples():
    model, x = make_cnn(0), batch(30)
    y = torch.randint(0, 10, (30,), generator=torch.Generator().manual_seed(2))
    wrong_theirs = (model.eval()(x[10:]).argmax(1) != y[10:]).sum()
    sharded = error_rate(model, x[:10], y[:10], comm=OtherRank(wrong_theirs, torch.tensor(20)))
    assert sharded == error_rate(model, x, y)


def test_the_recorder_records_every_rank_s_rows():
    md_in, md_clean = torch.rand(8), torch.rand(8)
    poisoned = torch.arange(8) % 2 == 0
    report = BatchReport(md=md_in, moved=torch.zeros(8, dtype=torch.bool), iterations=torch.zeros(8, dtype=torch.long))
    whole, sharded = RunRecord(), RunRecord()
    whole.record(0.1, md_in, md_clean, poisoned, report, attacked=True)
    sharded.record(0.1, md_in[:3], md_clean[:3], poisoned[:3], BatchReport(md=md_in[:3], moved=report.moved[:3],
                   iterations=report.iterations[:3]), attacked=True,
                   comm=OtherRank(md_in[3:], md_clean[3:], poisoned[3:], report.moved[3:]))
    assert sharded == whole


def test_the_per_batch_rule_reads_the_global_batch_mean():
    """With a threshold above this rank's batch mean, no row moves alone; the other rank's larger
    discrepancies lift the global mean above it and every row moves."""
    model, snaps, x = make_cnn(0), SnapshotSet([make_cnn(1)]), batch(8)
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        md = snaps.discrepancy(model.eval()(x), x).mean()
    tau = 2 * float(md)
    alone = DSC(snaps, "batch", ThresholdSchedule("fixed", tau0=tau), iters=3, early_exit=False)
    assert int(alone.correct(model, x, y, 0)[1].iterations.sum()) == 0
    together = DSC(snaps, "batch", ThresholdSchedule("fixed", tau0=tau), iters=3, early_exit=False,
                   comm=OtherRank(*[torch.full((8,), 4 * float(md))] * 3))
    assert together.correct(model, x, y, 0)[1].iterations.tolist() == [3] * 8


def _two_gloo_ranks(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        comm = TorchDistributedComm()
        mine = torch.arange(3 + rank, dtype=torch.float32) + 10 * rank  # shards of unequal length
        gathered = comm.all_gather(mine)
        total = comm.all_reduce_sum(torch.tensor([1.0 + rank, 2.0]))
        mean = comm.row_mean(mine)
        shard = comm.shard(torch.arange(5))
        buffer = comm.broadcast_(torch.tensor([float(rank + 1)]))
        layer = torch.nn.Linear(2, 1)
        layer.weight.grad = torch.full_like(layer.weight, 1.0 + rank)  # layer.bias.grad stays None: zeros
        comm.sync_gradients(list(layer.parameters()))
        comm.barrier()
        torch.save({"rank": comm.rank, "writer": comm.is_writer, "gathered": gathered, "sum": total, "mean": mean,
                    "shard": shard, "broadcast": buffer, "grads": [p.grad for p in layer.parameters()]},
                   f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_torch_distributed_comm_on_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "rank")
    mp.spawn(_two_gloo_ranks, args=(str(tmp_path / "store"), out), nprocs=2)
    for rank in (0, 1):
        got = torch.load(f"{out}.{rank}")
        assert got["rank"] == rank and got["writer"] == (rank == 0)
        assert got["gathered"].tolist() == [0.0, 1.0, 2.0, 10.0, 11.0, 12.0, 13.0]
        assert got["sum"].tolist() == [3.0, 4.0] and got["mean"].item() == 7.0  # (0+1+2 + 10+11+12+13) / 7
        assert got["shard"].tolist() == [[0, 1, 2], [3, 4]][rank]
        assert got["broadcast"].tolist() == [1.0]
        assert got["grads"][0].tolist() == [[3.0, 3.0]] and got["grads"][1].tolist() == [0.0]
