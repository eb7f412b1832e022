"""The online (accumulative) setting's stream loop and the trigger step: ALGORITHM.md section 1,
phases 2 and 3, with a defence in the loop and Memorization Discrepancy
recorded as a poison score (memdisc.detectors.MDDetector).

``run_online`` is three functions: :func:`start_online` (the set-up: data split, models, snapshots,
attack, defence, resume from ``state.pt``), :func:`accumulate` (the loop with its stop rule and
checkpoints) and :func:`trigger` (the trigger step and the ``RunResult``).  The resumable state is
``memdisc.training.checkpoint``; what the loop records is ``memdisc.eval.recorder.RunRecord``.

Data split (all seeded):
* stream: fresh batches of the training set minus the defender's held-out slice;
* heldout: clean training samples the defender may use (DSC calibration);
* test set: the attacker's validation batch S_val and clean trigger S_T are drawn
  from it, the rest is the evaluation set (per-step error on its first
  ``eval_size`` samples, all of it by default, as the seed; before/after-trigger error on all of it).

Per step s: the attacker poisons the incoming batch (if attacking) -> MD of
the poisoned batch and of its clean counterpart are recorded (evaluation only,
never shown to the defence) -> the defence trains on the batch -> test error.
Accumulation stops when the error exceeds the stop threshold or after
``max_steps``; then one step on the (poisoned) trigger batch.

Files in OUT: config.json, state.pt (resumable state, every ``checkpoint_every`` steps),
result.json (every number) and attack_batch.png (``memdisc.pictures``: one online batch
clean, as received, their difference, and what the defence trained on; the first batch the
defence changed, or the first batch while it changed none).

Several processes (torchrun; ``memdisc.runtime.distributed``): every rank draws the same stream batch
and the attacker poisons all of it (the attack is the adversary's, not the guard's: it sees the whole
batch, as in one process), then each rank keeps its contiguous shard of the received batch; MD, the
correction and the defence's step run on the shard, with the global values through ``comm`` (the
calibrated threshold, the batch-mean rule, the gradients, the test error on each rank's shard of the
evaluation set, the recorder).  The held-out and evaluation sets are sharded the same way; snapshots
and the attack use the model itself.  Rank 0 writes the files (the picture shows its shard); state.pt
records the number of processes and resumes only on that number.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from memdisc.artifacts import load_model_file, model_from_file, provenance, read_json, remove_stale_temp_files, write_json
from memdisc.attacks import AttackConfig, PoisonedBatch, build_attack
from memdisc.config import (OptionError, check_choice, check_int, check_list, check_number, check_seed, comparable,
                            field, option_name, section, to_dict)
from memdisc.data import BatchStream, load_dataset, mirror_ok
from memdisc.defenses import DEFENSES, BaselineConfig, DefenseContext, DSCConfig, FilterConfig, build_defense
from memdisc.detectors import MDDetector
from memdisc.eval.classification import error_rate
from memdisc.eval.recorder import RunRecord
from memdisc.eval.result import RunResult
from memdisc.pictures import PICTURE_NAME, write_batch_picture_safely
from memdisc.runtime import Precision
from memdisc.runtime.device import resolve_device
from memdisc.runtime.distributed import Comm, process_comm
from memdisc.snapshots import SnapshotSet
from memdisc.training.checkpoint import load_state, save_state
from memdisc.training.supervised import snapshot_path
from memdisc.training.victim import trainable_parameters


@dataclasses.dataclass
class OnlineConfig:
    burnin: str = field("runs/burnin-fashion-mnist-cnn-s0", "burn-in run directory (its snapshots)", path="run")
    start_epoch: int | None = field(None, "burn-in epoch the online model starts from (default: the last)")
    history_epochs: list[int] = field([3], "burn-in epochs used as historical snapshots")
    ring_lags: list[int] = field([], "lags N: snapshots that follow the online model N steps behind")
    defense: str = field("ST", f"defence: {', '.join(DEFENSES)}")
    control: bool = field(False, "the no-attack control: the same stream, never poisoned")
    batch_size: int = field(100, "online batch size")
    lr: float = field(0.1, "online SGD learning rate")
    momentum: float = field(0.9, "online SGD momentum")
    weight_decay: float = field(0.0, "online SGD weight decay")
    victim_momentum: float | None = field(None, "momentum during accumulation only (Pang et al.: 1.1)")
    max_steps: int = field(100, "maximum accumulative steps")
    stop_rise: float = field(0.05, "stop accumulating once the eval error exceeds burn-in error + this")
    stop_error: float | None = field(None, "absolute stop threshold instead (seed: 0.18 on CIFAR-10)")
    eval_size: int | None = field(None, "test samples evaluated after every step, where the stop rule reads the "
                                        "error (none: the whole evaluation set, as the seed)")
    val_size: int = field(500, "attacker's validation batch S_val (from the test set)")
    heldout_size: int = field(500, "defender's clean held-out training samples (DSC calibration)")
    channels_last: str = field("auto", "channels-last memory format for the correction loops: true, false, "
                                       "or auto (on CPU)")
    autocast: str | None = field(None, "autocast dtype of the correction loops' model passes: bfloat16, float16")
    cuda_graph: bool = field(False, "capture each correction loop as a CUDA graph and replay it (CUDA only; "
                                    "not yet measured on a GPU)")
    repeat_first: bool = field(False, "seed behaviour: the stream repeats the first batch every step")
    augment: bool | None = field(None, "augment the stream's batches (crop + flip) as the seed's loader does "
                                       "(none: as the burn-in did)")
    checkpoint_every: int = field(10, "save resumable state every N steps")
    seed: int = field(0, "random seed (stream, splits, attack)")
    device: str = field("auto", "cpu, cuda or auto")
    out: str | None = field(None, "run directory (default: BURNIN/online-DEFENSE[-control]-sSEED)", path="run")
    attack: AttackConfig = section(AttackConfig, "the accumulative attack")
    dsc: DSCConfig = section(DSCConfig, "DSC options")
    baselines: BaselineConfig = section(BaselineConfig, "GC / AT options")
    filter: FilterConfig = section(FilterConfig, "MD-drop / MD-reweight options (a detector as a defence)")

    def __post_init__(self):
        """A known defence; epoch lists of integers >= 1 giving at least one snapshot; counts >= 1;
        lr > 0, momenta and weight decay >= 0, stop thresholds finite; known channels_last and
        autocast values; a seed in [0, 2**32)."""
        check_choice("defense", self.defense, DEFENSES)
        if self.start_epoch is not None:
            check_int("start_epoch", self.start_epoch)
        check_list("history_epochs", self.history_epochs, int, minimum=1)
        check_list("ring_lags", self.ring_lags, int, minimum=1)
        if not self.history_epochs + self.ring_lags:
            raise OptionError("history_epochs", "expected at least one snapshot: a burn-in epoch here or a lag in "
                                                "ring_lags")
        for name in ("batch_size", "max_steps", "eval_size", "val_size", "heldout_size", "checkpoint_every"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name))
        check_number("lr", self.lr, 0.0, strict=True)
        for name in ("momentum", "weight_decay", "victim_momentum"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), 0.0)
        check_number("stop_rise", self.stop_rise)
        if self.stop_error is not None:
            check_number("stop_error", self.stop_error)
        check_choice("channels_last", self.channels_last.lower(), ("true", "false", "auto"))
        check_choice("autocast", self.autocast, (None, "bfloat16", "float16"))
        check_seed("seed", self.seed)
        if self.out is None:
            tag = "-control" if self.control else ""
            self.out = str(Path(self.burnin) / f"online-{self.defense}{tag}-s{self.seed}")


def _split(n: int, sizes: list[int], seed: int) -> list[torch.Tensor]:
    """Disjoint index sets of the given sizes from a seeded permutation of range(n); the rest last."""
    if sum(sizes) >= n:
        raise ValueError(f"sizes: {sizes} leave nothing of a set of {n} samples")
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    out, start = [], 0
    for size in sizes:
        out.append(perm[start:start + size].sort().values)
        start += size
    out.append(perm[start:].sort().values)
    return out


def precision_of(cfg: OnlineConfig) -> Precision:
    """How the run's model passes execute (memory format, autocast, CUDA graphs)."""
    channels_last = cfg.channels_last.lower()
    return Precision({"true": True, "false": False}.get(channels_last, channels_last),
                     cfg.autocast, cfg.cuda_graph)


class OnlineRun:
    """Everything one online run needs, set up from a config (see module docstring)."""

    def __init__(self, cfg: OnlineConfig, device: torch.device, comm: Comm | None = None):
        comm = process_comm() if comm is None else comm
        if cfg.cuda_graph and comm.world_size > 1:
            raise OptionError("cuda_graph", f"a CUDA graph cannot hold the collectives of a run on {comm.world_size} "
                                            "processes; run without it under torchrun")
        if cfg.batch_size < comm.world_size:
            raise OptionError("batch_size", f"{cfg.batch_size} rows cannot be shared by {comm.world_size} processes; "
                                            f"expected at least {comm.world_size}")
        self.cfg = cfg
        self.device, self.comm = device, comm
        start = self._load_burnin_file(cfg.start_epoch)
        bcfg = start["config"]
        self.burnin_error = float(start["test_error"])
        train = load_dataset(bcfg["dataset"], "train", bcfg["data_dir"])
        test = load_dataset(bcfg["dataset"], "test", bcfg["data_dir"])
        heldout_idx, stream_idx = _split(len(train), [cfg.heldout_size], cfg.seed)
        val_idx, trig_idx, eval_idx = _split(len(test), [cfg.val_size, cfg.batch_size], cfg.seed + 1)
        dev = self.device
        self.heldout = tuple(comm.shard(t).to(dev) for t in train.batch(heldout_idx))
        augment = bcfg.get("augment", False) if cfg.augment is None else cfg.augment
        self.stream = BatchStream(train.subset(stream_idx), cfg.batch_size, cfg.seed, repeat_first=cfg.repeat_first,
                                  augment=augment, flip=mirror_ok(bcfg["dataset"]))
        x_eval, y_eval = test.batch(eval_idx)
        self.eval_all = tuple(comm.shard(t).to(dev) for t in (x_eval, y_eval))
        self.eval_step = tuple(comm.shard(t[:cfg.eval_size]).to(dev) for t in (x_eval, y_eval))
        self.trigger_clean = tuple(t.to(dev) for t in test.batch(trig_idx))
        self.model = model_from_file(start, dev)
        history = [model_from_file(self._load_burnin_file(e), dev) for e in cfg.history_epochs]
        self.snapshots = SnapshotSet(history, tuple(cfg.ring_lags)).to(dev)
        # the poison score of every run (evaluation only: never shown to the defence)
        self.detector = MDDetector(self.snapshots, cfg.dsc.reduce)
        self.defense = build_defense(cfg.defense, DefenseContext(self.snapshots, self.heldout, cfg.seed,
                                                                 precision_of(cfg), comm), cfg.dsc, cfg.baselines,
                                     cfg.filter)
        # Memory formats fixed before any step (exact resume), the same for every defence and the control.
        precision_of(cfg).prepare(self.heldout[0][:1], self.model)
        self.defense.prepare(self.model, self.heldout[0][:1])
        self.optimizer = torch.optim.SGD(trainable_parameters(self.model), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.attack = None
        if not cfg.control:
            x_val, y_val = (t.to(dev) for t in test.batch(val_idx))
            self.attack = build_attack("accumulative", cfg.seed, cfg.attack, num_classes=test.num_classes, x_val=x_val,
                                       y_val=y_val, x_trigger=self.trigger_clean[0], y_trigger=self.trigger_clean[1])
        self.stop_error = cfg.stop_error if cfg.stop_error is not None else self.burnin_error + cfg.stop_rise

    def _load_burnin_file(self, epoch: int | None) -> dict:
        root = Path(self.cfg.burnin)
        path = root / "checkpoint.pt" if epoch is None else snapshot_path(root, epoch)
        if not path.exists():
            raise FileNotFoundError(f"burnin: no model file {path}; run `memdisc burnin` (with a snapshot at that "
                                    f"epoch) or pass --online-burnin DIR / --online-history-epochs (TOML: "
                                    f"online.burnin, online.history_epochs)")
        return load_model_file(path)

    def components(self) -> dict:
        """The stateful components ``memdisc.training.checkpoint`` saves and restores."""
        return {"model": self.model, "optimizer": self.optimizer, "defense": self.defense,
                "snapshots": self.snapshots, "attack": self.attack}


def _clock(device: torch.device) -> float:
    """Wall time after the device's queued work is done (on CUDA the phases would otherwise be
    charged to whichever later phase first waits for the GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _online_step(run: OnlineRun, progress: RunRecord) -> float:
    """Attack (if any) -> record MD -> defence trains -> test error.  Returns the error."""
    model, attack, timing = run.model, run.attack, progress.timing
    x, y, _ = run.stream.batch_at(progress.step)
    x, y = x.to(run.device), y.to(run.device)
    t0 = _clock(run.device)
    if attack is not None:
        received = attack.poison(model, x, y, progress.step)
    else:
        received = PoisonedBatch(x, y, torch.zeros(x.shape[0], dtype=torch.bool, device=x.device))
    x, y, x_in, y_in, poisoned = (run.comm.shard(t) for t in (x, y, received.x, received.y, received.poisoned))
    t1 = _clock(run.device)
    run.snapshots.observe(model)
    md_in, md_clean = run.detector.score(model, x_in, y_in), run.detector.score(model, x, y)
    t2 = _clock(run.device)
    x_train, report = run.defense.correct(model, x_in, y_in, progress.step)
    run.defense.train_on(model, run.optimizer, x_train, y_in, report, comm=run.comm)
    t3 = _clock(run.device)
    err = error_rate(model, *run.eval_step, comm=run.comm)
    timing["attack"] += t1 - t0
    timing["scoring"] += t2 - t1
    timing["defense"] += t3 - t2
    timing["eval"] += _clock(run.device) - t3
    # outside the timed phases: the first batch, replaced once by the first one the defence changed
    corrected = bool(run.comm.all_reduce_sum(report.acted_on.sum()) > 0)  # on any rank: the same branch on all
    if progress.picture is None or (corrected and not progress.picture["corrected"]):
        progress.picture = {"step": progress.step, "corrected": corrected,
                            "written": _write_picture(run, progress.step, corrected, x, x_in, x_train, poisoned)}
    progress.record(err, md_in, md_clean, poisoned, report, attacked=attack is not None, comm=run.comm)
    return err


def _write_picture(run: OnlineRun, step: int, corrected: bool, x: torch.Tensor, x_in: torch.Tensor,
                   x_train: torch.Tensor, poisoned: torch.Tensor) -> bool:
    """OUT/attack_batch.png of this step's batch: clean, received, trained on (``memdisc.pictures``).
    Returns whether it was written (a failure is a warning)."""
    cfg = run.cfg
    what = "no attack (control)" if cfg.control else f"accumulative attack, eps {cfg.attack.eps:g}"
    which = "the first batch the defence changed" if corrected else "the first batch; the defence changed none"
    title = f"defence {cfg.defense}, {what}, seed {cfg.seed}, online step {step} ({which})"
    return write_batch_picture_safely(Path(cfg.out) / PICTURE_NAME, x, x_in, x_train, poisoned, eps=cfg.attack.eps,
                                      title=title, attacked=not cfg.control) is not None


def check_device(cfg: OnlineConfig, where: str = "") -> torch.device:
    """The device the run will use, refused early where an option cannot run on it (``where``: the
    options' section, as ``"online."`` in compare)."""
    device = resolve_device(cfg.device)
    if cfg.cuda_graph and device.type != "cuda":
        raise ValueError(f"{option_name(where + 'cuda_graph')}: CUDA graphs need a CUDA device; --device "
                         f"{cfg.device} gives {device.type}")
    return device


def run_online(cfg: OnlineConfig, progress: bool = True, device: torch.device | None = None,
               comm: Comm | None = None) -> RunResult:
    """Run (or resume, or return the finished result of) one online run; writes OUT/result.json.

    ``device``: the device an entry point above resolved and checked (default: :func:`check_device`
    of ``cfg`` here).  ``comm``: the processes the run is spread over (``memdisc.runtime.distributed``;
    default: this process's group; rank 0 writes the files)."""
    device = check_device(cfg) if device is None else device
    comm = process_comm() if comm is None else comm
    result_path = Path(cfg.out) / "result.json"
    if result_path.exists():
        done = read_json(result_path, "delete it to finish this online run again", objects=("config",))
        if comparable(OnlineConfig, done["config"]) != comparable(OnlineConfig, to_dict(cfg)):
            raise ValueError(f"{result_path}: a finished run with another configuration; use another --out")
        try:
            return RunResult.from_json(done)
        except ValueError as exc:
            raise ValueError(f"{result_path}: {exc}; delete it to finish this online run again") from None
    run, rec = start_online(cfg, device, comm)
    accumulate(run, rec, progress and comm.is_writer)
    result = trigger(run, rec)
    write_json(result_path, result.to_json())
    return result


def start_online(cfg: OnlineConfig, device: torch.device,
                 comm: Comm | None = None) -> tuple[OnlineRun, RunRecord]:
    """The set-up: every component built (:class:`OnlineRun`), restored from OUT/state.pt when it
    exists (``memdisc.training.checkpoint``), and OUT/config.json written."""
    out = Path(cfg.out)
    run = OnlineRun(cfg, device, comm)
    rec = load_state(out / "state.pt", cfg, run.components(), device, run.comm)
    if rec is None:
        if run.attack is not None:
            run.attack.prepare(run.model)
        rec = RunRecord()
    remove_stale_temp_files(out)
    # written only once the out dir is known to hold no run with another configuration
    write_json(out / "config.json", {"command": "online", "config": to_dict(cfg),
                                     "provenance": provenance(cfg.seed, device)})
    return run, rec


def accumulate(run: OnlineRun, rec: RunRecord, progress: bool = True) -> None:
    """The loop: online steps (with ``victim_momentum`` if set) until the stop rule holds, the state
    saved every ``checkpoint_every`` steps and at the stop; ``rec.stop_reason`` says why it stopped."""
    cfg = run.cfg
    if cfg.victim_momentum is not None:
        for group in run.optimizer.param_groups:
            group["momentum"] = cfg.victim_momentum
    name = "control (no attack)" if cfg.control else cfg.defense
    bar = tqdm(total=cfg.max_steps, initial=rec.step, desc=f"online {name}", disable=not progress,
               leave=False, mininterval=1.0)
    while rec.stop_reason is None:
        err = _online_step(run, rec)
        bar.update(1)
        bar.set_postfix(err=f"{100 * err:.1f}%")
        if err > run.stop_error:
            rec.stop_reason = (f"test error {100 * err:.2f}% exceeded the stop threshold "
                               f"{100 * run.stop_error:.2f}%")
        elif rec.step >= cfg.max_steps:
            rec.stop_reason = f"reached max_steps={cfg.max_steps}"
        if rec.stop_reason is not None or rec.step % cfg.checkpoint_every == 0:
            save_state(Path(cfg.out) / "state.pt", cfg, run.components(), rec, run.comm.world_size)
    bar.close()


def trigger(run: OnlineRun, rec: RunRecord) -> RunResult:
    """One step on the (poisoned) trigger batch, with the ordinary momentum, and the run's result."""
    cfg, model, opt = run.cfg, run.model, run.optimizer
    for group in opt.param_groups:
        group["momentum"] = cfg.momentum
    error_before = error_rate(model, *run.eval_all, comm=run.comm)
    t0 = _clock(run.device)
    x_t, y_t = (run.comm.shard(t) for t in (run.attack.trigger_batch(model) if run.attack is not None
                                            else run.trigger_clean))
    run.snapshots.observe(model)  # as in every step: the ring first, then the score
    trigger_md = float(run.comm.row_mean(run.detector.score(model, x_t, y_t)))
    run.defense.train_step(model, opt, x_t, y_t, rec.step, comm=run.comm)
    trigger_seconds = _clock(run.device) - t0
    error_after = error_rate(model, *run.eval_all, comm=run.comm)

    timing, out = rec.timing, Path(cfg.out)
    return RunResult(
        config=to_dict(cfg), defense=cfg.defense, attack=not cfg.control,
        error_after_burnin=run.burnin_error, error_before_trigger=error_before,
        error_after_trigger=error_after, error_delta=error_after - error_before,
        steps_run=rec.step, stop_reason=rec.stop_reason, stop_error=run.stop_error,
        trigger_md=trigger_md, curve=rec.log, detection=rec.detection(),
        scores=rec.scores,
        timing={"online_seconds": sum(timing.values()), "trigger_seconds": trigger_seconds,
                **{f"{k}_seconds": v for k, v in timing.items()},
                "samples_per_second": rec.step * cfg.batch_size / max(timing["defense"], 1e-9)},
        provenance=provenance(cfg.seed, run.device),
        picture={"file": PICTURE_NAME if rec.picture["written"] and (out / PICTURE_NAME).exists() else None,
                 "step": rec.picture["step"], "corrected": rec.picture["corrected"]}
                if rec.picture is not None else {"file": None, "step": None, "corrected": None},
    )
