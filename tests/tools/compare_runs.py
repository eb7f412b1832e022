"""Compare two memdisc run directories number by number: the proof that a refactor moved nothing.

    python tests/tools/compare_runs.py BEFORE_DIR AFTER_DIR [--ignore KEY ...] [--rename OLD=NEW ...]

Every ``*.json`` under BEFORE_DIR must exist under AFTER_DIR with equal content, floats compared
exactly (Python's float repr round-trips, so equal text is equal bits), except what is allowed to
differ between two runs of the same configuration: provenance (commit, versions, host), wall-clock
timings, and the paths of the two run directories (compared with each directory's own path
replaced by ``<run>``).  Every tensor of every ``*.pt`` (burn-in snapshots, resumable states) is
compared with ``torch.equal``.  Prints one line per file and exits 1 on the first difference list.

A change that renames on purpose says so, and the tool then still compares every number:
``--ignore KEY`` drops a JSON key everywhere (e.g. a configuration option whose representation
changed; the ignored keys are printed), ``--rename OLD=NEW`` renames a tensor key prefix of
BEFORE's ``*.pt`` files (e.g. a layer renamed in a state_dict) before matching them by name.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

IGNORED_KEYS = {"provenance", "timing", "seconds", "samples_per_second"}


def _strip(value, root: str, ignored: frozenset = frozenset()):
    """The value with ignored keys dropped and the run directory's path replaced by ``<run>``."""
    if isinstance(value, dict):
        return {k: _strip(v, root, ignored) for k, v in value.items()
                if k not in IGNORED_KEYS | ignored and not k.endswith("_seconds")}
    if isinstance(value, list):
        return [_strip(v, root, ignored) for v in value]
    if isinstance(value, str):
        return value.replace(root, "<run>")
    return value


def _diff(a, b, where: str, out: list[str]) -> None:
    if type(a) is not type(b):
        out.append(f"{where}: {a!r} != {b!r}")
    elif isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{where}.{k}: only in {'after' if k not in a else 'before'}")
            else:
                _diff(a[k], b[k], f"{where}.{k}", out)
    elif isinstance(a, list):
        if len(a) != len(b):
            out.append(f"{where}: length {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{where}[{i}]", out)
    elif a != b and not (a != a and b != b):  # NaN equals NaN here
        out.append(f"{where}: {a!r} != {b!r}")


def _tensors(value, where: str):
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{where}[{i}]")


def _renamed(key: str, renames: list[tuple[str, str]]) -> str:
    for old, new in renames:
        if old in key:
            return key.replace(old, new, 1)
    return key


def compare(before: Path, after: Path, ignored: frozenset = frozenset(),
            renames: list[tuple[str, str]] = ()) -> list[str]:
    problems: list[str] = []
    files = sorted(p.relative_to(before) for p in before.rglob("*") if p.suffix in (".json", ".pt"))
    for rel in files:
        if not (after / rel).exists():
            problems.append(f"{rel}: missing in {after}")
            continue
        diffs: list[str] = []
        if rel.suffix == ".json":
            a = _strip(json.loads((before / rel).read_text()), str(before), ignored)
            b = _strip(json.loads((after / rel).read_text()), str(after), ignored)
            _diff(a, b, str(rel), diffs)
            what = "numbers"
        else:
            a = {_renamed(k, renames): t
                 for k, t in _tensors(torch.load(before / rel, map_location="cpu", weights_only=False), str(rel))}
            b = dict(_tensors(torch.load(after / rel, map_location="cpu", weights_only=False), str(rel)))
            if a.keys() != b.keys():
                diffs.append(f"{rel}: tensors {sorted(a.keys() ^ b.keys())} in one file only")
            diffs += [f"{k}: tensors differ" for k in a.keys() & b.keys()
                      if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
            what = f"{len(a)} tensors"
        print(f"{'equal' if not diffs else 'DIFFERENT'}  {rel} ({what})")
        problems += diffs
    extra = sorted(str(p.relative_to(after)) for p in after.rglob("*")
                   if p.suffix in (".json", ".pt") and p.relative_to(after) not in files)
    problems += [f"{rel}: only in {after}" for rel in extra]
    return problems


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--ignore", action="append", default=[], metavar="KEY")
    parser.add_argument("--rename", action="append", default=[], metavar="OLD=NEW")
    args = parser.parse_args(argv)
    if any("=" not in r for r in args.rename):
        parser.error("--rename: expected OLD=NEW")
    if args.ignore:
        print("ignored JSON keys (on purpose):", ", ".join(args.ignore))
    renames = [tuple(r.split("=", 1)) for r in args.rename]
    problems = compare(args.before.resolve(), args.after.resolve(), frozenset(args.ignore), renames)
    for line in problems:
        print(line)
    print("bit for bit: equal" if not problems else f"bit for bit: {len(problems)} differences")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
