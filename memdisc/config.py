"""Command configurations: one dataclass per command, filled from defaults, an
optional preset, a TOML file and command-line flags (later sources win).

Every field becomes a flag ``--field-name`` with its ``metadata["help"]`` as
help text; an optional field also takes ``none`` (flag or TOML string) to
unset it.  A list field (``list[int]``, ``list[str]``) is a TOML array
(``history_epochs = [1, 3]``) or a comma list on the command line
(``--history-epochs 1,3``; an empty string is the empty list).  A field whose
type is itself a dataclass is a *section*: a TOML table ``[section]`` and flags
``--section-field``.  Unknown keys and values of the wrong type (a string where
a list is expected, too) are errors naming the key, never silent defaults.

Values are checked in each dataclass's ``__post_init__`` with the validators below, which
raise :class:`OptionError`; :func:`build` names the option as the user typed it (the
dotted TOML key and the flag), so a bad value fails before any work or any write.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tomllib
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def field(default: Any, help: str, path: str | None = None) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field with a help string for its command-line flag.

    A list default gives every instance its own copy.  ``path``: "run" for a run directory
    memdisc writes (compared relative to the run's ``out``, so a moved run directory stays the
    same run), "data" for an input folder (compared resolved); see :func:`comparable`.
    """
    metadata = {"help": help, "path": path}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: type, help: str) -> Any:  # noqa: A002
    """A nested dataclass field (a TOML table, flags prefixed with its name)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help})


class OptionError(ValueError):
    """A bad value of one option: ``option`` is the field's name, ``expected`` what it takes."""

    def __init__(self, option: str, expected: str):
        super().__init__(f"{option}: {expected}")
        self.option, self.expected = option, expected


def option_name(key: str) -> str:
    """How a user types option ``key`` (a dotted path such as ``online.dsc.quantile``): the TOML key
    and the flag, ``online.dsc.quantile (--online-dsc-quantile)``."""
    return f"{key} (--{key.replace('.', '-').replace('_', '-')})"


def check_number(name: str, value, minimum: float | None = None, maximum: float | None = None,
                 strict: bool = False) -> None:
    """A finite int or float (not a bool), ``>= minimum`` and ``<= maximum`` (``>`` and ``<`` if ``strict``)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (minimum is None or (value > minimum if strict else value >= minimum))
    ok = ok and (maximum is None or (value < maximum if strict else value <= maximum))
    if not ok:
        bounds = "" if minimum is None else f" {'>' if strict else '>='} {minimum}"
        bounds += "" if maximum is None else f"{' and' if bounds else ''} {'<' if strict else '<='} {maximum}"
        raise OptionError(name, f"expected a finite number{bounds}, got {value!r}")


def check_int(name: str, value, minimum: int = 1, maximum: int | None = None) -> None:
    """An int (not a bool) in ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum \
            or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise OptionError(name, f"expected an integer {bounds}, got {value!r}")


def check_seed(name: str, value) -> None:
    """A random seed: an int in ``[0, 2**32 - 1]``."""
    check_int(name, value, 0, 2 ** 32 - 1)


def check_choice(name: str, value, options) -> None:
    """One of ``options``."""
    if value not in options:
        raise OptionError(name, f"expected one of {', '.join(map(str, options))}, got {value!r}")


# What a list of each item type looks like in TOML, for the error messages.
_LIST_EXAMPLES = {int: "[1, 3]", str: '["a", "b"]'}


def check_list(name: str, value, item: type, minimum: int | None = None) -> None:
    """A list (not a string or tuple) of ``item`` values (ints: not bools, each ``>= minimum``)."""
    example = _LIST_EXAMPLES[item]
    if not isinstance(value, list):
        raise OptionError(name, f"expected a list, e.g. {example}, got {value!r}")
    ok = all(isinstance(v, item) and not isinstance(v, bool) for v in value)
    if not ok or (minimum is not None and any(v < minimum for v in value)):
        what = {int: "integers", str: "strings"}[item] + ("" if minimum is None else f" >= {minimum}")
        raise OptionError(name, f"expected a list of {what}, e.g. {example}, got {value!r}")


def _list_item(tp) -> type | None:
    """The item type of a ``list[X]`` annotation, None for anything else."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is list else None


def _parse_list(item: type):
    """The flag parser of a ``list[item]`` field: ``"1, 3"`` -> ``[1, 3]``, ``""`` -> ``[]``.  An item
    that does not convert stays a string, so :func:`build` names the option in its error."""
    def parse(text: str) -> list:
        values = [t.strip() for t in text.split(",") if t.strip()]
        return [_convert(item, v) for v in values]
    parse.__name__ = f"list of {item.__name__}"
    return parse


def _convert(item: type, text: str):
    try:
        return item(text)
    except ValueError:
        return text


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
                         hidden: frozenset[str] = frozenset(), path: str = "", config_file: bool = True) -> None:
    """Add ``--config FILE`` (top level only, unless ``config_file`` is false) and one flag per (nested)
    dataclass field, except the fields named in ``hidden`` (dotted paths such as ``"burnin.seed"``)."""
    if not prefix and config_file:
        parser.add_argument("--config", type=Path, default=None,
                            help="TOML file with option values (flags override it)")
    for f, tp in _fields(cls):
        if path + f.name in hidden:
            continue
        if dataclasses.is_dataclass(tp):
            add_config_arguments(parser, tp, prefix + f.name + "_", hidden, path + f.name + ".")
            continue
        item = _list_item(tp)
        if item is not None:  # a comma list on the command line
            conv, metavar = _parse_list(item), f"{item.__name__.upper()},..."
            default = ",".join(map(str, f.default_factory())) or '""'
        else:
            tp, optional = _base_type(tp)
            default = f.default if f.default is not dataclasses.MISSING else None
            conv, metavar = _parse_bool if tp is bool else tp, tp.__name__.upper()
            if optional:  # "none" unsets an optional value (also one a TOML file set)
                conv = _or_none(conv)
        parser.add_argument("--" + (prefix + f.name).replace("_", "-"), dest=prefix + f.name,
                            type=conv, default=None, metavar=metavar,
                            help=f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%"))


def _or_none(conv):
    def parse(text: str):
        return "none" if text.lower() == "none" else conv(text)
    parse.__name__ = getattr(conv, "__name__", "value")
    return parse


def _check_value(key: str, value: Any, annotation) -> Any:
    item = _list_item(annotation)
    if item is not None:
        try:
            check_list(key, value, item)
        except OptionError as exc:
            raise ValueError(f"{option_name(key)}: {exc.expected}") from None
        return list(value)
    tp, optional = _base_type(annotation)
    if optional and (value is None or (isinstance(value, str) and value.lower() == "none")):
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ValueError(f"{option_name(key)}: expected {tp.__name__}{' or none' if optional else ''}, "
                         f"got {value!r}")
    return value


def build(cls: type[T], values: dict[str, Any], where: str = "") -> T:
    """Construct ``cls`` from a (nested) dict, validating names, types and (``__post_init__``) values;
    an error names the option by its dotted key and flag (:func:`option_name`)."""
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
    try:
        return cls(**kwargs)
    except OptionError as exc:
        raise ValueError(f"{option_name(where + exc.option)}: {exc.expected}") from None


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
        raise ValueError(f"{path}: no such file (--config); give the path of a TOML file")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid TOML ({exc}); fix the file given as --config") from exc


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


def comparable(cls: type, values: Any, root: Path | None = None) -> Any:
    """A config dict of ``cls`` (e.g. one read back from a run directory) with its path options
    made independent of how they were spelled and of where the run directory now is: a run
    path (``field(path="run")``) becomes relative to the config's ``out``, a data path
    absolute, both resolved.  Two dicts of the same run compare equal; anything that is not
    a dict is returned as is (and so compares unequal)."""
    if not isinstance(values, dict):
        return values
    if root is None:
        root = Path(values.get("out") or ".").resolve()
    known = {f.name: (f, tp) for f, tp in _fields(cls)}
    out = {}
    for key, value in values.items():
        f, tp = known.get(key, (None, None))
        if f is not None and dataclasses.is_dataclass(tp):
            value = comparable(tp, value, root)
        elif f is not None and f.metadata.get("path") and isinstance(value, str):
            resolved = Path(value).resolve()
            value = os.path.relpath(resolved, root) if f.metadata["path"] == "run" else str(resolved)
        out[key] = value
    return out
