import json

import pytest

from ltk.training.config import ConfigError, RunConfig, apply_overrides
from ltk.training.presets import PRESETS, get_preset


def test_overrides_coerce_types():
    cfg = get_preset("gpt-debug")
    apply_overrides(cfg, ["--trainer.max_steps", "200", "--optim.lr=1e-3", "--trainer.compile", "true",
                          "--data.tokenizer", "none", "--model.n_layer=6", "--optim.decay_steps", "5e3"])
    assert cfg.trainer.max_steps == 200 and isinstance(cfg.trainer.max_steps, int)
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.trainer.compile is True
    assert cfg.data.tokenizer is None
    assert cfg.model.n_layer == 6
    assert cfg.optim.decay_steps == 5000


@pytest.mark.parametrize("args, words", [
    (["--trainer.max_stepz", "3"], ["unknown config field", "trainer.max_steps"]),
    (["--nosuch.field", "3"], ["unknown config field"]),
    (["--trainer.max_steps", "many"], ["cannot read", "int"]),
    (["--trainer.compile", "maybe"], ["cannot read", "bool"]),
    (["--trainer"], ["needs a value"]),
    (["--trainer", "3"], ["is a group"]),
    (["stray"], ["expected a --section.field"]),
])
def test_bad_overrides_name_the_problem(args, words):
    with pytest.raises(ConfigError) as e:
        apply_overrides(get_preset("gpt-debug"), args)
    for w in words:
        assert w in str(e.value)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="gpt2-124m"):
        get_preset("gpt-3")


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_through_dict(name):
    cfg = get_preset(name)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_from_dict_rejects_unknown_fields():
    d = get_preset("gpt-debug").to_dict()
    d["trainer"]["bogus"] = 1
    with pytest.raises(ConfigError, match="trainer.bogus"):
        RunConfig.from_dict(d)


# -- did you mean ---------------------------------------------------------------------------
@pytest.mark.parametrize("args, hint", [
    (["--trainer.max_stepz", "3"], "did you mean --trainer.max_steps?"),
    (["--trainr.max_steps", "3"], "did you mean --trainer.max_steps?"),
    (["--lr", "1e-3"], "did you mean --optim.lr?"),  # a field without its section
    (["--model.n_layers", "2"], "did you mean --model.n_layer?"),
])
def test_unknown_field_suggests_the_nearest(args, hint):
    with pytest.raises(ConfigError) as e:
        apply_overrides(get_preset("gpt-debug"), args)
    assert hint in str(e.value)


def test_unknown_field_without_a_near_one_lists_its_section_only():
    with pytest.raises(ConfigError) as e:
        apply_overrides(get_preset("gpt-debug"), ["--trainer.zzzz", "1"])
    msg = str(e.value)
    assert "fields of trainer" in msg and "max_steps" in msg
    assert "optim" not in msg and "n_layer" not in msg  # not every field of every section


def test_unknown_preset_and_family_suggest_the_nearest():
    from ltk.models import get_family

    with pytest.raises(ConfigError, match="did you mean gpt-debug"):
        get_preset("gpt-debg")
    with pytest.raises(ValueError, match="did you mean llama"):
        get_family("lama")
    with pytest.raises(ValueError, match="did you mean llama"):
        RunConfig.from_dict({"family": "lama"})


def test_from_dict_suggests_and_type_checks():
    d = get_preset("gpt-debug").to_dict()
    d["trainer"]["max_stepz"] = 1
    with pytest.raises(ConfigError, match="did you mean trainer.max_steps"):
        RunConfig.from_dict(d)
    for value, ok in [(5, 5), (5e3, 5000), ("5", None), (True, None), (2.5, None), (float("inf"), None)]:
        d = {"trainer": {"max_steps": value}}
        if ok is None:
            with pytest.raises(ConfigError, match="trainer.max_steps: expected an int"):
                RunConfig.from_dict(d)
        else:
            got = RunConfig.from_dict(d).trainer.max_steps
            assert got == ok and type(got) is int
    assert RunConfig.from_dict({"optim": {"decay_steps": "none"}}).optim.decay_steps is None
    assert RunConfig.from_dict({"optim": {"lr": 1}}).optim.lr == 1.0
    with pytest.raises(ConfigError, match="trainer is a section"):
        RunConfig.from_dict({"trainer": 3})


# -- config files -----------------------------------------------------------------------------
def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_round_trips_through_toml_and_json_files(name, tmp_path):
    from ltk.training.config_file import load_config, to_toml

    cfg = get_preset(name)
    assert load_config(_write(tmp_path / "c.toml", to_toml(cfg.to_dict()))) == cfg
    assert load_config(_write(tmp_path / "c.json", cfg.to_json())) == cfg


def test_a_partial_file_sets_only_its_fields(tmp_path):
    from ltk.training.config_file import load_config

    cfg = load_config(_write(tmp_path / "c.toml", "[trainer]\nmax_steps = 42\n"))
    want = get_preset("gpt-debug")
    want.trainer.max_steps = 42
    assert cfg == want
    cfg = load_config(_write(tmp_path / "c.json", '{"optim": {"lr": 0.01}}'), preset="llama-debug")
    assert cfg.family == "llama" and cfg.optim.lr == 0.01 and cfg.model == get_preset("llama-debug").model


def test_the_file_may_name_its_preset(tmp_path):
    from ltk.training.config_file import load_config

    f = _write(tmp_path / "c.toml", 'preset = "t5-debug"\n[trainer]\nmax_steps = 9\n')
    cfg = load_config(f)
    assert cfg.family == "t5" and cfg.trainer.max_steps == 9
    assert load_config(f, preset="t5-debug") == cfg
    with pytest.raises(ConfigError, match="disagree"):
        load_config(f, preset="gpt-debug")
    with pytest.raises(ConfigError, match="did you mean t5-debug"):
        load_config(_write(tmp_path / "d.toml", 'preset = "t5-debgu"\n'))


@pytest.mark.parametrize("name, text, words", [
    ("bad.toml", "[trainer]\nmax_steps = \n", ["bad.toml", "TOML", "line 2"]),
    ("bad.json", '{\n "trainer": {"max_steps": 5,}\n}', ["bad.json", "JSON", "line 2"]),
    ("typo.toml", "[trainer]\nmax_stepz = 5\n", ["typo.toml", "did you mean trainer.max_steps"]),
    ("type.toml", '[trainer]\nmax_steps = "many"\n', ["type.toml", "trainer.max_steps: expected an int"]),
    ("neg.json", '{"model": {"n_layer": -1}}', ["neg.json", "model.n_layer must be positive"]),
    ("heads.toml", "[model]\nn_head = 5\n", ["heads.toml", "not divisible by model.n_head"]),
    ("list.json", "[1, 2]", ["list.json", "table"]),
    ("c.yaml", "", ["c.yaml", ".toml or .json"]),
])
def test_config_file_errors_name_the_file(tmp_path, name, text, words):
    from ltk.training.config_file import load_config

    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path / name, text))
    for w in words:
        assert w in str(e.value)


def test_a_missing_config_file_is_named(tmp_path):
    from ltk.training.config_file import load_config

    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_config(tmp_path / "nope.toml")


def test_toml_writer_reads_back_awkward_values():
    import math

    import tomllib

    from ltk.training.config_file import to_toml

    d = {"s": 'quote " backslash \\ newline \n tab \t del \x7f ü 🙂', "i": -3, "big": 10**18, "f": 1e-8,
         "g": 0.1 + 0.2, "t": True, "n": None, "inf": float("inf"), "ninf": float("-inf"), "nan": float("nan"),
         "odd key": 1, "sec": {"a": 1, "sub": {"b": [1, 2.5, "x"]}}, "empty": {}}
    back = tomllib.loads(to_toml(d))
    assert math.isnan(back.pop("nan"))
    want = {k: v for k, v in d.items() if k != "nan"}
    want["n"] = "none"  # TOML has no null; "none" reads back as None into an optional field
    assert back == want


@pytest.mark.parametrize("fmt", ["json", "toml"])
def test_print_config_reads_back_through_config(fmt, tmp_path, capsys):
    """`ltk train --print-config > c.json && ltk train --config c.json --print-config` prints the same."""
    from ltk.cli import main

    assert main(["train", "--preset", "llama-debug", "--optim.lr", "1e-3", "--data.tokenizer", "tok.json",
                 "--print-config", fmt]) == 0
    first = capsys.readouterr().out
    f = tmp_path / f"c.{fmt}"
    f.write_text(first)
    assert main(["train", "--config", str(f), "--print-config", fmt]) == 0
    assert capsys.readouterr().out == first
    assert main(["train", "--config", str(f), "--print-config"]) == 0  # TOML in, JSON out: the same config
    assert RunConfig.from_dict(json.loads(capsys.readouterr().out)).optim.lr == 1e-3


def test_precedence_preset_file_flags_overrides(tmp_path, capsys):
    from ltk.cli import main

    f = _write(tmp_path / "c.toml", "[trainer]\nmax_steps = 50\nbatch_size = 4\ndevice = \"auto\"\n")

    def resolved(*argv):
        assert main(["train", "--config", str(f), *argv, "--print-config"]) == 0
        return json.loads(capsys.readouterr().out)

    d = resolved()
    assert d["trainer"]["max_steps"] == 50 and d["trainer"]["batch_size"] == 4  # the file over the preset
    assert d["optim"]["warmup_steps"] == 50 and d["name"] == "gpt-debug"  # the rest from the preset
    d = resolved("--max-steps", "70", "--device", "cpu")
    assert d["trainer"]["max_steps"] == 70 and d["trainer"]["device"] == "cpu"  # named flags over the file
    d = resolved("--max-steps", "70", "--trainer.max_steps", "80")
    assert d["trainer"]["max_steps"] == 80  # dotted overrides over everything
    assert resolved("--preset", "bert-debug")["family"] == "bert"  # --preset when the file names none
    with pytest.raises(SystemExit, match="not both"):
        main(["train", "--config", str(f), "--resume", str(tmp_path)])
