"""memdisc.config: TOML + flags (flags win), nested sections, name/type validation, bool/optional/list parsing."""
from __future__ import annotations

import argparse
import dataclasses
import math

import pytest

from memdisc.training.supervised import BurninConfig
from memdisc.config import (OptionError, add_config_arguments, build, check_choice, check_int, check_list,
                            check_number, check_seed, comparable, config_from_args, field, load_config, merge,
                            read_toml, section, to_dict)
from memdisc.training.online import OnlineConfig


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


@dataclasses.dataclass
class Lists:
    epochs: list[int] = field([3], "a list of ints")
    lags: list[int] = field([], "an empty list of ints")
    names: list[str] = field(["ST", "GC"], "a list of strings")
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


@pytest.mark.parametrize("text, name", [
    ('epochs = "3"\n', "epochs (--epochs)"),
    ("epochs = 2.5\n", "epochs (--epochs)"),
    ("epochs = true\n", "epochs (--epochs)"),
    ("lr = true\n", "lr (--lr)"),
    ('lr = "0.1"\n', "lr (--lr)"),
    ('augment = "true"\n', "augment (--augment)"),
    ("augment = 1\n", "augment (--augment)"),
    ("name = 5\n", "name (--name)"),
    ('subset = "all"\n', "subset (--subset)"),
    ("inner = 3\n", "inner"),  # a section: a TOML table, no flag of its own
    ('[inner]\nthreshold = "high"\n', "inner.threshold (--inner-threshold)"),
])
def test_wrong_type_is_an_error_naming_the_key_and_flag(tmp_path, text, name):
    with pytest.raises(ValueError) as info:
        load_config(Toy, _toml(tmp_path, text))
    assert str(info.value).startswith(f"{name}: expected ")


def test_optional_accepts_none_only_where_declared():
    assert build(Toy, {"subset": None}).subset is None
    with pytest.raises(ValueError, match=r"^epochs \(--epochs\): expected int, got None"):
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
    with pytest.raises(ValueError, match=r"^\S*missing\.toml: no such file \(--config\)"):
        load_config(Toy, tmp_path / "missing.toml")
    with pytest.raises(ValueError, match=r"^\S*bad\.toml: not valid TOML \(.*\); fix the file given as --config"):
        read_toml(_toml(tmp_path, "epochs = = 3\n").rename(tmp_path / "bad.toml"))
    (tmp_path / "latin1.toml").write_bytes(b'name = "\xe9"\n')
    with pytest.raises(ValueError, match=r"latin1\.toml: not valid TOML"):
        read_toml(tmp_path / "latin1.toml")


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


@pytest.mark.parametrize("values, flag", [
    ({"epochs": 0}, "epochs"), ({"batch_size": 0}, "batch-size"), ({"snapshot_every": 0}, "snapshot-every"),
    ({"lr": 0}, "lr"), ({"lr": -0.1}, "lr"), ({"lr": math.nan}, "lr"), ({"momentum": -0.5}, "momentum"),
    ({"weight_decay": math.inf}, "weight-decay"), ({"train_subset": 0}, "train-subset"),
    ({"test_subset": -5}, "test-subset"), ({"seed": -1}, "seed"), ({"seed": 2 ** 32}, "seed"),
    ({"dataset": "fashion_mnist"}, "dataset"), ({"model": "vgg"}, "model"), ({"norm": "ln"}, "norm")])
def test_burnin_config_validates_values(values, flag):
    key = next(iter(values))
    with pytest.raises(ValueError, match=rf"^{key} \(--{flag}\): expected "):
        build(BurninConfig, values)
    with pytest.raises(OptionError, match=rf"^{key}: expected "):  # built directly: the field's name
        BurninConfig(**values)


@pytest.mark.parametrize("values, name", [
    ({"lr": -0.1}, "lr (--lr)"), ({"lr": math.nan}, "lr (--lr)"), ({"momentum": -1.0}, "momentum (--momentum)"),
    ({"victim_momentum": math.inf}, "victim_momentum (--victim-momentum)"),
    ({"stop_rise": math.nan}, "stop_rise (--stop-rise)"), ({"stop_error": math.inf}, "stop_error (--stop-error)"),
    ({"seed": -3}, "seed (--seed)"), ({"history_epochs": "1,3"}, "history_epochs (--history-epochs)"),
    ({"history_epochs": [1, "x"]}, "history_epochs (--history-epochs)"),
    ({"history_epochs": [0]}, "history_epochs (--history-epochs)"), ({"ring_lags": [-2]}, "ring_lags (--ring-lags)"),
    ({"ring_lags": 2}, "ring_lags (--ring-lags)"), ({"history_epochs": [True]}, "history_epochs (--history-epochs)"),
    ({"history_epochs": [], "ring_lags": []}, "history_epochs (--history-epochs)"),
    ({"start_epoch": 0}, "start_epoch (--start-epoch)"), ({"channels_last": "yes"}, "channels_last (--channels-last)"),
    ({"autocast": "float8"}, "autocast (--autocast)"), ({"eval_size": 0}, "eval_size (--eval-size)"),
    ({"dsc": {"quantile": 1.0}}, "dsc.quantile (--dsc-quantile)"),
    ({"dsc": {"quantile": 0.0}}, "dsc.quantile (--dsc-quantile)"),
    ({"dsc": {"threshold": "adaptive"}}, "dsc.threshold (--dsc-threshold)"),
    ({"dsc": {"eps": 1.5}}, "dsc.eps (--dsc-eps)"), ({"dsc": {"step_size": 0.0}}, "dsc.step_size (--dsc-step-size)"),
    ({"dsc": {"reduce": "median"}}, "dsc.reduce (--dsc-reduce)"),
    ({"dsc": {"recalibrate_every": 0}}, "dsc.recalibrate_every (--dsc-recalibrate-every)"),
    ({"baselines": {"gc_norm": "1"}}, "baselines.gc_norm (--baselines-gc-norm)"),
    ({"baselines": {"at_eps": 2.0}}, "baselines.at_eps (--baselines-at-eps)"),
    ({"baselines": {"at_kl_weight": -1.0}}, "baselines.at_kl_weight (--baselines-at-kl-weight)"),
    ({"attack": {"eps": 1.5}}, "attack.eps (--attack-eps)"),
    ({"attack": {"trigger_eps": math.nan}}, "attack.trigger_eps (--attack-trigger-eps)")])
def test_online_config_errors_name_the_option_as_typed(values, name):
    with pytest.raises(ValueError) as info:
        build(OnlineConfig, values)
    assert str(info.value).startswith(f"{name}: expected "), str(info.value)


def test_validators():
    check_number("x", 0.5, 0.0, 1.0, strict=True)
    check_int("n", 0, minimum=0)
    check_seed("seed", 2 ** 32 - 1)
    check_list("e", [], int, minimum=1)
    check_list("n", ["a"], str)
    for call, message in [
            (lambda: check_number("x", 1.0, 0.0, 1.0, strict=True), "x: expected a finite number > 0.0 and < 1.0, "
                                                                      "got 1.0"),
            (lambda: check_number("x", True), "x: expected a finite number, got True"),
            (lambda: check_number("x", -0.1, 0.0), "x: expected a finite number >= 0.0, got -0.1"),
            (lambda: check_int("n", 2.0), "n: expected an integer >= 1, got 2.0"),
            (lambda: check_seed("seed", 2 ** 32), "seed: expected an integer in [0, 4294967295], got 4294967296"),
            (lambda: check_choice("k", "c", ("a", "b")), "k: expected one of a, b, got 'c'"),
            (lambda: check_list("e", "1,2", int), "e: expected a list, e.g. [1, 3], got '1,2'"),
            (lambda: check_list("e", (1, 2), int), "e: expected a list, e.g. [1, 3], got (1, 2)"),
            (lambda: check_list("e", [1, 0], int, minimum=1), "e: expected a list of integers >= 1, e.g. [1, 3], "
                                                               "got [1, 0]"),
            (lambda: check_list("e", [1.0], int), "e: expected a list of integers, e.g. [1, 3], got [1.0]"),
            (lambda: check_list("n", ["a", 2], str), 'n: expected a list of strings, e.g. ["a", "b"], got [\'a\', 2]')]:
        with pytest.raises(OptionError) as info:
            call()
        assert str(info.value) == message


def test_comparable_makes_run_paths_relative_to_out_and_data_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spelled = [BurninConfig(out="runs/x", data_dir="data"),
               BurninConfig(out=str(tmp_path / "runs" / "x"), data_dir=str(tmp_path / "data") + "/"),
               BurninConfig(out="runs/../runs/x/", data_dir="./data")]
    keys = [comparable(BurninConfig, to_dict(cfg)) for cfg in spelled]
    assert keys[0] == keys[1] == keys[2]
    assert keys[0]["out"] == "." and keys[0]["data_dir"] == str(tmp_path / "data")
    online = [OnlineConfig(burnin=str(root / "burnin"), out=str(root / "runs" / "ST"))
              for root in (tmp_path / "a", tmp_path / "moved" / "b")]  # a directory moved with its burn-in
    assert comparable(OnlineConfig, to_dict(online[0])) == comparable(OnlineConfig, to_dict(online[1]))
    assert comparable(OnlineConfig, to_dict(online[0]))["burnin"] == "../../burnin"
    assert comparable(BurninConfig, "garbage") == "garbage"


def _parse_lists(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lists")
    add_config_arguments(parser, Lists)
    return parser.parse_args(argv)


def test_list_options_are_toml_arrays_and_comma_lists_on_the_command_line(tmp_path):
    assert load_config(Lists) == Lists() and Lists().epochs == [3] and Lists().lags == []
    assert Lists().epochs is not Lists().epochs  # each instance its own list
    path = _toml(tmp_path, 'epochs = [1, 3]\nnames = ["DSC-batch"]\nlags = []\n')
    assert load_config(Lists, path) == Lists(epochs=[1, 3], names=["DSC-batch"], lags=[])
    cfg = config_from_args(Lists, _parse_lists(["--config", str(path), "--epochs", " 2, 5,", "--lags", "4",
                                                "--names", "ST,AT-seed"]))
    assert (cfg.epochs, cfg.lags, cfg.names) == ([2, 5], [4], ["ST", "AT-seed"])  # flags win
    assert config_from_args(Lists, _parse_lists(["--config", str(path), "--epochs", ""])).epochs == []
    assert to_dict(cfg)["epochs"] == [2, 5]


@pytest.mark.parametrize("source, message", [
    ('epochs = "1,3"\n', "epochs (--epochs): expected a list, e.g. [1, 3], got '1,3'"),
    ("epochs = 3\n", "epochs (--epochs): expected a list, e.g. [1, 3], got 3"),
    ('epochs = [1, "3"]\n', "epochs (--epochs): expected a list of integers, e.g. [1, 3], got [1, '3']"),
    ("epochs = [1.5]\n", "epochs (--epochs): expected a list of integers, e.g. [1, 3], got [1.5]"),
    ('names = "ST"\n', 'names (--names): expected a list, e.g. ["a", "b"], got \'ST\''),
    ("names = [1]\n", 'names (--names): expected a list of strings, e.g. ["a", "b"], got [1]'),
    (["--epochs", "3,x"], "epochs (--epochs): expected a list of integers, e.g. [1, 3], got [3, 'x']"),
    (["--lags", "1.5"], "lags (--lags): expected a list of integers, e.g. [1, 3], got ['1.5']")])
def test_a_bad_list_names_the_toml_key_and_the_flag(tmp_path, source, message):
    """A string where a list is expected (the old comma-string form) is refused, not split."""
    argv = ["--config", str(_toml(tmp_path, source))] if isinstance(source, str) else source
    with pytest.raises(ValueError) as info:
        config_from_args(Lists, _parse_lists(argv))
    assert str(info.value) == message


def test_list_flags_show_their_default_as_a_comma_list(capsys):
    parser = argparse.ArgumentParser(prog="lists")
    add_config_arguments(parser, Lists)
    text = " ".join(parser.format_help().split())
    assert "--epochs INT,... a list of ints (default: 3)" in text
    assert '--lags INT,... an empty list of ints (default: "")' in text
    assert "--names STR,... a list of strings (default: ST,GC)" in text


def test_online_list_options_from_toml_and_flags(tmp_path):
    path = _toml(tmp_path, "history_epochs = [2, 4]\nring_lags = [1]\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, OnlineConfig)
    cfg = config_from_args(OnlineConfig, parser.parse_args(["--config", str(path), "--ring-lags", "3,5"]))
    assert (cfg.history_epochs, cfg.ring_lags) == ([2, 4], [3, 5])
    assert OnlineConfig().history_epochs == [3] and OnlineConfig().ring_lags == []
    with pytest.raises(OptionError, match=r"^history_epochs: expected a list, e\.g\. \[1, 3\], got '1,3'$"):
        OnlineConfig(history_epochs="1,3")  # built directly: the field's name
