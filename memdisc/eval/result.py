"""``RunResult``: the typed result of one online run, the schema of ``OUT/result.json``, and the
payload of an online cell of an experiment grid (``memdisc.experiments``: ``kind`` and ``file``).

:meth:`RunResult.to_json` gives the JSON object written to ``result.json`` (the keys in the field
order below) and :meth:`RunResult.from_json` reads it back, so a finished run is returned from its
file unchanged.  Errors are fractions in [0, 1]; the nested records keep their JSON shape:

* ``curve``: per online step, ``{"step": [int], "test_error": [float], "md_poisoned": [float | None],
  "md_clean": [float], "corrected_fraction": [float] (rows the defence moved, dropped or
  down-weighted: ``BatchReport.acted_on``), "threshold": [float | None]}``;
* ``detection``: ``{"per_sample": detection_summary | None, "per_batch": detection_summary | None}``
  (``memdisc.eval.detection``; None for the control);
* ``scores``: ``{"poisoned": [float], "clean": [float]}``, MD per row;
* ``timing``: ``{"online_seconds", "trigger_seconds", "attack_seconds", "defense_seconds",
  "scoring_seconds", "eval_seconds", "samples_per_second": float}``;
* ``picture``: ``{"file": str | None, "step": int | None, "corrected": bool | None}``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar


class JsonRecord:
    """A dataclass result read from and written to one JSON object, its fields as the keys
    (``described``: what the errors call it)."""

    described = "result"

    def to_json(self) -> dict[str, Any]:
        """The JSON object of the fields, in field order (a shallow copy: nested records are shared)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, obj: Any):
        """The result of a :meth:`to_json` object; ValueError naming the missing or unknown keys."""
        if not isinstance(obj, dict):
            raise ValueError(f"not the {cls.described} memdisc writes (a {type(obj).__name__})")
        names = [f.name for f in dataclasses.fields(cls)]
        missing, unknown = [k for k in names if k not in obj], sorted(set(obj) - set(names))
        if missing or unknown:
            raise ValueError(f"not the {cls.described} memdisc writes ("
                             + "; ".join(f"{what}: {', '.join(keys)}" for what, keys in
                                         (("missing", missing), ("unknown", unknown)) if keys) + ")")
        return cls(**obj)


@dataclasses.dataclass
class RunResult(JsonRecord):
    """Every number of one online run (control or attacked, one defence)."""
    kind: ClassVar[str] = "online-run"     # its name in a cell result (memdisc.experiments.results)
    file: ClassVar[str] = "result.json"    # its file in the run's directory
    described = "online result"
    config: dict[str, Any]          # the OnlineConfig as written (memdisc.config.to_dict)
    defense: str
    attack: bool                    # False for the no-attack control
    error_after_burnin: float
    error_before_trigger: float
    error_after_trigger: float
    error_delta: float              # error_after_trigger - error_before_trigger
    steps_run: int
    stop_reason: str
    stop_error: float               # the threshold the stop rule compared the error with
    trigger_md: float               # mean MD of the trigger batch
    curve: dict[str, list]
    detection: dict[str, Any]
    scores: dict[str, list[float]]
    timing: dict[str, float]
    provenance: dict[str, Any]
    picture: dict[str, Any]
