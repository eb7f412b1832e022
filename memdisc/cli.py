"""The ``memdisc`` command line: one entry point, one subcommand per job.

    memdisc burnin  [--config FILE] [--flags]   supervised training + snapshots
    memdisc info                                versions and kernel status

Every option can come from a TOML file (``--config``) or a flag; flags win.
Each run writes its outputs and the configuration it used into one run directory.
"""
from __future__ import annotations

import argparse
import json
import sys

from memdisc.config import add_config_arguments, config_from_args

def _burnin_config():
    from memdisc.burnin import BurninConfig
    return BurninConfig


def _run_burnin(cfg):
    from memdisc.burnin import run_burnin
    result = run_burnin(cfg)
    print(f"burn-in done: test error {100 * result['final_test_error']:.2f}% after "
          f"{len(result['history'])} epochs; snapshots in {cfg.out}/snapshots")


def _info(_cfg):
    from memdisc.artifacts import provenance
    from memdisc.ops import extension_error
    info = provenance()
    info["extension_error"] = extension_error()
    print(json.dumps(info, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memdisc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (config_factory, help_text, _) in _commands().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if config_factory is not None:
            add_config_arguments(p, config_factory())
    return parser


def _commands():
    return {
        "burnin": (_burnin_config, "supervised burn-in training with snapshots at chosen epochs", _run_burnin),
        "info": (None, "print versions, device and whether the compiled kernels are loaded", _info),
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config_factory, _, fn = _commands()[args.command]
    try:
        cfg = config_from_args(config_factory(), args) if config_factory is not None else None
        fn(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"memdisc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"memdisc {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
