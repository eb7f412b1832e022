"""Command configurations: one dataclass per command, filled from a TOML file
and/or command-line flags (flags win).

Every field of a config dataclass becomes a flag ``--field-name``; its help
text is the field's ``metadata["help"]``.  ``load_config`` validates names and
types, so a typo in a TOML file is an error naming the key, not a silent default.
"""
from __future__ import annotations

import argparse
import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def field(default: Any, help: str, **kwargs) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field with a help string for its command-line flag."""
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def _base_type(tp):
    """(scalar type, optional) of a field annotation such as ``int | None``."""
    args = typing.get_args(tp)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add ``--config FILE`` and one ``--field-name`` flag per dataclass field."""
    parser.add_argument("--config", type=Path, default=None, help="TOML file with option values (flags override it)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, optional = _base_type(hints[f.name])
        conv = _parse_bool if tp is bool else tp
        default = f.default
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=conv, default=None,
                            metavar=tp.__name__.upper(),
                            help=f"{f.metadata.get('help', '')} (default: {default})")


def load_config(cls: type[T], toml_path: Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from defaults, then a TOML file, then non-None overrides.

    Raises ValueError naming any unknown key or a value of the wrong type.
    """
    values: dict[str, Any] = {}
    if toml_path is not None:
        path = Path(toml_path)
        if not path.is_file():
            raise ValueError(f"config: no such file {path}")
        try:
            values.update(tomllib.loads(path.read_text()))
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config: {path} is not valid TOML: {exc}") from exc
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"config: unknown option {key!r} for {cls.__name__}; known: {sorted(names)}")
        tp, optional = _base_type(hints[key])
        if value is None and optional:
            continue
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            values[key] = float(value)
        elif not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ValueError(f"{key}: expected {tp.__name__}, got {value!r}")
    return cls(**values)


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The config for a parsed command line made by ``add_config_arguments``."""
    names = [f.name for f in dataclasses.fields(cls)]
    return load_config(cls, args.config, {n: getattr(args, n) for n in names})


def to_dict(config) -> dict[str, Any]:
    """The config as a JSON-serialisable dict."""
    return dataclasses.asdict(config)
