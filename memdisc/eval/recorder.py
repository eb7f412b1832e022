"""``RunRecord``: what an online run has recorded so far, step by step (saved in ``state.pt`` for
resuming): the test-error curve, the MD scores of the received rows and of their clean counterparts,
the defence's trace, the phase timings, and the batch the picture shows.  :meth:`RunRecord.detection`
judges MD as a poison score (``memdisc.eval.detection``)."""
from __future__ import annotations

import dataclasses

import torch

from memdisc.eval.detection import detection_summary
from memdisc.runtime.distributed import LOCAL, Comm


@dataclasses.dataclass
class RunRecord:
    """What an online run has recorded so far (saved in state.pt for resuming)."""
    step: int = 0
    stop_reason: str | None = None
    log: dict = dataclasses.field(default_factory=lambda: {k: [] for k in (
        "step", "test_error", "md_poisoned", "md_clean", "corrected_fraction", "threshold")})
    scores: dict = dataclasses.field(default_factory=lambda: {"poisoned": [], "clean": []})
    batch_scores: dict = dataclasses.field(default_factory=lambda: {"poisoned": [], "clean": []})
    timing: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(("attack", "defense", "scoring", "eval"),
                                                                           0.0))
    # the batch in attack_batch.png: {"step", "corrected" (the defence changed it), "written"}
    picture: dict | None = None

    def record(self, err: float, md_in: torch.Tensor, md_clean: torch.Tensor, poisoned: torch.Tensor,
               report, attacked: bool, comm: Comm = LOCAL) -> None:
        """One step's test error, discrepancies ([B] of the received batch and of its clean counterpart);
        over several processes (``comm``), the rows of every process's shard of the batch."""
        md_in, md_clean, poisoned, acted = (comm.all_gather(t) for t in (md_in, md_clean, poisoned,
                                                                                   report.acted_on))
        log = self.log
        log["step"].append(self.step)
        log["test_error"].append(err)
        log["md_poisoned"].append(float(md_in[poisoned].mean()) if bool(poisoned.any()) else None)
        log["md_clean"].append(float(md_clean.mean()))
        log["corrected_fraction"].append(float(acted.float().mean()))  # moved, dropped or down-weighted
        log["threshold"].append(report.threshold)
        if attacked:
            self.scores["poisoned"] += md_in[poisoned].tolist()
            self.batch_scores["poisoned"].append(float(md_in.mean()))
        self.scores["clean"] += md_clean.tolist()
        self.batch_scores["clean"].append(float(md_clean.mean()))
        self.step += 1

    def detection(self) -> dict:
        """MD as a poison score: per sample (poisoned rows vs clean counterparts) and per batch."""
        p, c = self.scores["poisoned"], self.scores["clean"]
        if not p:
            return {"per_sample": None, "per_batch": None}
        bp, bc = self.batch_scores["poisoned"], self.batch_scores["clean"]
        return {"per_sample": detection_summary(p + c, [1] * len(p) + [0] * len(c)),
                "per_batch": detection_summary(bp + bc, [1] * len(bp) + [0] * len(bc))}
