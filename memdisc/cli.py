"""The ``memdisc`` command line: one entry point, one subcommand per job.

    memdisc compare [--config FILE] [--flags]   burn-in, control and every defence, report
    memdisc study   [--config FILE] [--flags]   poisoning attacks x training settings x fractions, report
    memdisc detect  [--config FILE] [--flags]   backdoor attacks x settings x detectors, remove-and-retrain, report
    memdisc burnin  [--config FILE] [--flags]   supervised training + snapshots
    memdisc online  [--config FILE] [--flags]   one online run (attack + one defence)
    memdisc info                                versions and kernel status

Every option can come from a TOML file (``--config``) or a flag; flags win.
Each run writes its outputs and the configuration it used into one run directory.
The grid commands (compare, study, detect) also take the flags of how their cells run
(``--executor local|processes|ray``, ``--workers``, ``--retries``, ``--ray-address``,
``--cell-cpus``, ``--cell-gpus``: :class:`memdisc.experiments.executors.ExecutorConfig`), flags only,
not part of the run's configuration: a run directory resumes under any of them.
A bad option or file is one line on stderr, ``memdisc COMMAND: error: ...`` naming the
option or the file, and exit status 2.  Runs of a comparison that failed are one line
naming each failed run's cell and error, after every other run finished, and exit status 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from memdisc.config import add_config_arguments, args_to_overrides, build, load_config

GRID_COMMANDS = ("compare", "study", "detect")
"""The commands that run a grid of cells, and take the executor's flags."""

def _burnin_config():
    from memdisc.training.supervised import BurninConfig
    return BurninConfig


def _online_config():
    from memdisc.training.online import OnlineConfig
    return OnlineConfig


def _compare_config():
    from memdisc.experiments.compare import CompareConfig
    return CompareConfig


def _run_grid(command: str, run: Callable[[], object]) -> int:
    """Run a grid command; cells that failed are one line on stderr and exit status 1."""
    from memdisc.experiments.runner import GridError
    try:
        run()
    except GridError as exc:
        print(f"memdisc {command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    return 0


def _run_compare(cfg, executor) -> int:
    from memdisc.experiments.compare import run_compare
    return _run_grid("compare", lambda: run_compare(cfg, executor=executor))


def _study_config():
    from memdisc.experiments.study import StudyConfig
    return StudyConfig


def _run_study(cfg, executor) -> int:
    from memdisc.experiments.study import run_study
    return _run_grid("study", lambda: run_study(cfg, executor=executor))


def _detect_config():
    from memdisc.experiments.detect import DetectConfig
    return DetectConfig


def _run_detect(cfg, executor) -> int:
    from memdisc.experiments.detect import run_detect
    return _run_grid("detect", lambda: run_detect(cfg, executor=executor))


def _run_online(cfg):
    from memdisc.training.online import run_online
    r = run_online(cfg)
    print(f"{cfg.defense}{' (control)' if cfg.control else ''}: error {100 * r.error_before_trigger:.2f}% -> "
          f"{100 * r.error_after_trigger:.2f}% after the trigger; {r.steps_run} steps ({r.stop_reason}); "
          f"result in {cfg.out}/result.json")


def _run_burnin(cfg):
    from memdisc.training.supervised import run_burnin
    result = run_burnin(cfg)
    print(f"burn-in done: test error {100 * result['final_test_error']:.2f}% after "
          f"{len(result['history'])} epochs; snapshots in {cfg.out}/snapshots")


def _info(_cfg):
    import torch

    from memdisc.artifacts import provenance
    from memdisc.ops.extension import extension_error, extension_report
    info = provenance()
    info["extension_error"] = extension_error()
    info["extension_build"] = extension_report()
    info["cuda_available"] = torch.cuda.is_available()
    print(json.dumps(info, indent=2))


def _join_torchrun(cfg) -> None:
    """Under torchrun, this process joins the run's process group (``memdisc.runtime.distributed``;
    gloo on CPU, NCCL on CUDA, from the command's ``device`` option); the standard output of every
    rank but 0 is dropped (they compute what rank 0 prints; their errors still reach stderr)."""
    from memdisc.runtime.distributed import init_distributed, launched_by_torchrun
    if launched_by_torchrun():
        import os

        from memdisc.runtime.device import resolve_device
        comm, _ = init_distributed(resolve_device(cfg.device))
        if not comm.is_writer:
            sys.stdout = open(os.devnull, "w")


def _check_torchrun_executor(executor) -> None:
    """Under torchrun a grid's cells run on the ranks together, one after another: only ``local``."""
    from memdisc.config import OptionError
    from memdisc.runtime.distributed import launched_by_torchrun
    if launched_by_torchrun() and executor.executor != "local":
        raise OptionError("--executor", f"under torchrun every process runs each cell together (one run spread "
                                        f"over them); expected local, got {executor.executor!r} (start a grid's "
                                        f"cells on workers or Ray without torchrun)")


def _one_line(exc: Exception) -> str:
    """The error as one line: ``FILE: what is wrong`` for an OSError about a file, else its message."""
    text = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) and exc.filename else str(exc)
    return " ".join(text.split())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memdisc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (config_factory, help_text, _) in _commands().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if config_factory is not None:
            hidden = frozenset()
            if name == "compare":
                from memdisc.experiments.compare import SHARED_FIELDS as hidden
            elif name == "study":
                from memdisc.experiments.study import SHARED_FIELDS as hidden
            elif name == "detect":
                from memdisc.experiments.detect import SHARED_FIELDS as hidden
            add_config_arguments(p, config_factory(), hidden=hidden)
            if name in GRID_COMMANDS:
                from memdisc.experiments.executors import ExecutorConfig
                add_config_arguments(p.add_argument_group("how the cells run (flags only; not part of the run's "
                                                          "configuration)"), ExecutorConfig, config_file=False)
    return parser


def _commands():
    return {
        "compare": (_compare_config, "the main job: burn-in, the no-attack control and every defence on one "
                    "seeded stream, then results.json, a Markdown table and plots", _run_compare),
        "study": (_study_config, "the poisoning study: every attack x training setting (end-to-end, transfer, "
                  "online) x poison fraction over seeds, then results.json, a Markdown table and figures",
                  _run_study),
        "detect": (_detect_config, "backdoor data detection: every attack x training setting x detector (ASSET, "
                   "spectral signatures, activation clustering, loss, MD) over seeds, with remove-and-retrain, "
                   "then results.json, a Markdown table and figures", _run_detect),
        "burnin": (_burnin_config, "supervised burn-in training with snapshots at chosen epochs", _run_burnin),
        "online": (_online_config, "one online run: accumulative attack (or control) against one defence",
                   _run_online),
        "info": (None, "print versions, device and whether the compiled kernels are loaded", _info),
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config_factory, _, fn = _commands()[args.command]
    try:
        cfg = None
        if config_factory is not None:
            cls = config_factory()
            overrides = args_to_overrides(cls, args)
            if args.command == "compare":
                from memdisc.experiments.compare import load_compare_config
                cfg = load_compare_config(args.config, overrides)
            elif args.command == "study":
                from memdisc.experiments.study import load_study_config
                cfg = load_study_config(args.config, overrides)
            elif args.command == "detect":
                from memdisc.experiments.detect import load_detect_config
                cfg = load_detect_config(args.config, overrides)
            else:
                cfg = load_config(cls, args.config, overrides)
        if cfg is not None:
            _join_torchrun(cfg)
        if args.command in GRID_COMMANDS:
            from memdisc.experiments.executors import ExecutorConfig
            executor = build(ExecutorConfig, args_to_overrides(ExecutorConfig, args))
            _check_torchrun_executor(executor)
            status = fn(cfg, executor)
        else:
            status = fn(cfg)
    except (ValueError, OSError) as exc:
        print(f"memdisc {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"memdisc {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        from memdisc.runtime.distributed import shutdown_distributed
        shutdown_distributed()
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
