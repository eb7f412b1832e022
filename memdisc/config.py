"""Command configurations: one dataclass per command, filled from defaults, an
optional preset, a TOML file and command-line flags (later sources win).

Every field becomes a flag ``--field-name`` with its ``metadata["help"]`` as
help text; an optional field also takes ``none`` (flag or TOML string) to
unset it.  A field whose type is itself a dataclass is a *section*: a TOML
table ``[section]`` and flags ``--section-field``.  Unknown keys and values of
the wrong type are errors naming the key, never silent defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def field(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field with a help string for its command-line flag."""
    return dataclasses.field(default=default, metadata={"help": help})


def section(cls: type, help: str) -> Any:  # noqa: A002
    """A nested dataclass field (a TOML table, flags prefixed with its name)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help})


def _base_type(tp):
    """(scalar type, optional) of an annotation such as ``int | None``."""
    args = typing.get_args(tp)
    if args and type(None) in args:
        return [a for a in args if a is not type(None)][0], True
    return tp, False


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _fields(cls: type):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield f, hints[f.name]


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "",
                         hidden: frozenset[str] = frozenset(), path: str = "") -> None:
    """Add ``--config FILE`` (top level only) and one flag per (nested) dataclass field,
    except the fields named in ``hidden`` (dotted paths such as ``"burnin.seed"``)."""
    if not prefix:
        parser.add_argument("--config", type=Path, default=None,
                            help="TOML file with option values (flags override it)")
    for f, tp in _fields(cls):
        if path + f.name in hidden:
            continue
        if dataclasses.is_dataclass(tp):
            add_config_arguments(parser, tp, prefix + f.name + "_", hidden, path + f.name + ".")
            continue
        tp, optional = _base_type(tp)
        default = f.default if f.default is not dataclasses.MISSING else None
        conv = _parse_bool if tp is bool else tp
        if optional:  # "none" unsets an optional value (also one a TOML file set)
            conv = _or_none(conv)
        parser.add_argument("--" + (prefix + f.name).replace("_", "-"), dest=prefix + f.name,
                            type=conv, default=None, metavar=tp.__name__.upper(),
                            help=f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%"))


def _or_none(conv):
    def parse(text: str):
        return "none" if text.lower() == "none" else conv(text)
    parse.__name__ = getattr(conv, "__name__", "value")
    return parse


def _check_value(key: str, value: Any, annotation) -> Any:
    tp, optional = _base_type(annotation)
    if optional and (value is None or (isinstance(value, str) and value.lower() == "none")):
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ValueError(f"{key}: expected {tp.__name__}{' or none' if optional else ''}, got {value!r}")
    return value


def build(cls: type[T], values: dict[str, Any], where: str = "") -> T:
    """Construct ``cls`` from a (nested) dict, validating names and types."""
    known = {f.name: (f, tp) for f, tp in _fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"config: unknown option {where + key!r}; known: {sorted(known)}")
        _, tp = known[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ValueError(f"{where + key}: expected a table of options, got {value!r}")
            kwargs[key] = build(tp, value, where + key + ".")
        else:
            kwargs[key] = _check_value(where + key, value, tp)
    return cls(**kwargs)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of nested option dicts (``update`` wins; None values in update are skipped)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        elif value is not None:
            out[key] = value
    return out


def read_toml(path: Path | str | None) -> dict[str, Any]:
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config: no such file {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config: {path} is not valid TOML: {exc}") from exc


def load_config(cls: type[T], toml_path: Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from defaults, then a TOML file, then (nested) non-None overrides."""
    return build(cls, merge(read_toml(toml_path), overrides or {}))


def args_to_overrides(cls: type, args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """The nested override dict of the flags given on a command line (unset flags omitted)."""
    out: dict[str, Any] = {}
    for f, tp in _fields(cls):
        if dataclasses.is_dataclass(tp):
            nested = args_to_overrides(tp, args, prefix + f.name + "_")
            if nested:
                out[f.name] = nested
        elif getattr(args, prefix + f.name, None) is not None:
            out[f.name] = getattr(args, prefix + f.name)
    return out


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The config for a parsed command line made by ``add_config_arguments``."""
    return load_config(cls, args.config, args_to_overrides(cls, args))


def to_dict(config) -> dict[str, Any]:
    """The config as a JSON-serialisable (nested) dict."""
    return dataclasses.asdict(config)
