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
