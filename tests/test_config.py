"""memdisc.config: TOML + flags (flags win), nested sections, name/type validation, bool/optional parsing."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from memdisc.burnin import BurninConfig
from memdisc.config import (add_config_arguments, build, config_from_args, field, load_config, merge, read_toml,
                            section, to_dict)


@dataclasses.dataclass
class Inner:
    threshold: float = field(0.5, "a float in a section (stop at 18% error)")
    mode: str = field("seed", "a string in a section")


@dataclasses.dataclass
class Toy:
    name: str = field("toy", "a string")
    epochs: int = field(3, "an int")
    lr: float = field(0.1, "a float")
    augment: bool = field(False, "a bool")
    subset: int | None = field(None, "an optional int")
    inner: Inner = section(Inner, "a section")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="toy")
    add_config_arguments(parser, Toy)
    return parser.parse_args(argv)


def _toml(tmp_path, text: str):
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return path


def test_defaults_without_sources():
    assert load_config(Toy) == Toy()
    assert config_from_args(Toy, _parse([])) == Toy()


def test_toml_values_loaded_and_int_accepted_for_float(tmp_path):
    path = _toml(tmp_path, 'name = "t"\nepochs = 7\nlr = 1\naugment = true\nsubset = 64\n'
                           '[inner]\nthreshold = 0.25\n')
    cfg = load_config(Toy, path)
    assert cfg == Toy(name="t", epochs=7, lr=1.0, augment=True, subset=64, inner=Inner(threshold=0.25))
    assert isinstance(cfg.lr, float)


def test_flags_override_toml_which_overrides_defaults(tmp_path):
    path = _toml(tmp_path, 'epochs = 7\nlr = 0.5\n[inner]\nthreshold = 0.25\nmode = "toml"\n')
    args = _parse(["--config", str(path), "--epochs", "9", "--inner-mode", "flag", "--augment", "yes"])
    cfg = config_from_args(Toy, args)
    assert cfg == Toy(epochs=9, lr=0.5, augment=True, inner=Inner(threshold=0.25, mode="flag"))


@pytest.mark.parametrize("text, key", [
    ("bogus = 1\n", "'bogus'"),
    ("[inner]\nbogus = 1\n", "'inner.bogus'"),
    ("[nosuch]\nx = 1\n", "'nosuch'"),
])
def test_unknown_key_is_an_error_naming_it(tmp_path, text, key):
    with pytest.raises(ValueError, match=rf"unknown option {key}"):
        load_config(Toy, _toml(tmp_path, text))


@pytest.mark.parametrize("text, key", [
    ('epochs = "3"\n', "epochs"),
    ("epochs = 2.5\n", "epochs"),
    ("epochs = true\n", "epochs"),
    ("lr = true\n", "lr"),
    ('lr = "0.1"\n', "lr"),
    ('augment = "true"\n', "augment"),
    ("augment = 1\n", "augment"),
    ("name = 5\n", "name"),
    ('subset = "all"\n', "subset"),
    ("inner = 3\n", "inner"),
    ('[inner]\nthreshold = "high"\n', "inner.threshold"),
])
def test_wrong_type_is_an_error_naming_the_key(tmp_path, text, key):
    with pytest.raises(ValueError, match=rf"^{key}: expected "):
        load_config(Toy, _toml(tmp_path, text))


def test_optional_accepts_none_only_where_declared():
    assert build(Toy, {"subset": None}).subset is None
    with pytest.raises(ValueError, match=r"^epochs: expected int, got None"):
        build(Toy, {"epochs": None})


@pytest.mark.parametrize("text, value", [("1", True), ("true", True), ("Yes", True), ("ON", True),
                                         ("0", False), ("false", False), ("no", False), ("Off", False)])
def test_bool_flag_spellings(text, value):
    assert config_from_args(Toy, _parse(["--augment", text])).augment is value


def test_bad_flag_values_are_usage_errors(capsys):
    for argv, needle in ((["--augment", "maybe"], "expected true/false, got 'maybe'"),
                         (["--epochs", "three"], "--epochs"),
                         (["--subset", "many"], "--subset")):
        with pytest.raises(SystemExit) as exc:
            _parse(argv)
        assert exc.value.code == 2
        assert needle in capsys.readouterr().err


def test_optional_flag_parses_to_its_base_type():
    assert config_from_args(Toy, _parse(["--subset", "128"])).subset == 128


def test_none_unsets_an_optional_value_set_in_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("subset = 64\n")
    assert config_from_args(Toy, _parse(["--config", str(path)])).subset == 64
    assert config_from_args(Toy, _parse(["--config", str(path), "--subset", "none"])).subset is None
    path.write_text('subset = "none"\n')
    assert config_from_args(Toy, _parse(["--config", str(path)])).subset is None


def test_help_lists_every_flag_with_its_default():
    parser = argparse.ArgumentParser(prog="toy")
    add_config_arguments(parser, Toy)
    text = " ".join(parser.format_help().split())  # undo line wrapping
    for flag, default in (("--name", "toy"), ("--epochs", "3"), ("--lr", "0.1"), ("--augment", "False"),
                          ("--subset", "None"), ("--inner-threshold", "0.5"), ("--inner-mode", "seed")):
        assert flag in text and f"(default: {default})" in text
    assert "18% error" in text  # a '%' in a help string is shown, not taken as a format directive
    assert "--config" in text


def test_config_file_errors(tmp_path):
    with pytest.raises(ValueError, match=r"config: no such file .*missing\.toml"):
        load_config(Toy, tmp_path / "missing.toml")
    with pytest.raises(ValueError, match=r"config: .*bad\.toml is not valid TOML"):
        read_toml(_toml(tmp_path, "epochs = = 3\n").rename(tmp_path / "bad.toml"))


def test_merge_is_deep_and_skips_none():
    base = {"a": 1, "s": {"x": 1, "y": 2}}
    assert merge(base, {"a": None, "s": {"y": 3}, "b": 4}) == {"a": 1, "s": {"x": 1, "y": 3}, "b": 4}
    assert base == {"a": 1, "s": {"x": 1, "y": 2}}  # inputs untouched


def test_to_dict_is_nested():
    assert to_dict(Toy()) == {"name": "toy", "epochs": 3, "lr": 0.1, "augment": False, "subset": None,
                              "inner": {"threshold": 0.5, "mode": "seed"}}


def test_burnin_config_from_toml_and_flags(tmp_path):
    path = _toml(tmp_path, 'epochs = 2\nlr = 0.01\naugment = true\ntrain_subset = 100\n')
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, BurninConfig)
    cfg = config_from_args(BurninConfig, parser.parse_args(["--config", str(path), "--epochs", "4", "--seed", "3"]))
    assert (cfg.epochs, cfg.lr, cfg.augment, cfg.train_subset, cfg.seed) == (4, 0.01, True, 100, 3)
    assert cfg.out == "runs/burnin-fashion-mnist-cnn-s3"  # derived from the final values


@pytest.mark.parametrize("values, key", [({"epochs": 0}, "epochs"), ({"batch_size": 0}, "batch_size"),
                                         ({"snapshot_every": 0}, "snapshot_every"), ({"lr": 0}, "lr"),
                                         ({"lr": -0.1}, "lr"), ({"train_subset": 0}, "train_subset"),
                                         ({"test_subset": -5}, "test_subset")])
def test_burnin_config_validates_values(values, key):
    with pytest.raises(ValueError, match=rf"^{key}: expected "):
        build(BurninConfig, values)
