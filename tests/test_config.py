"""Every numeric and path setting has a rule (orchestrator/config.py RULES); each rule is
tested here with a value it must refuse and one it must accept, through the same check the
command line runs before anything starts."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from orchestrator.config import BASELINE_PARAM_RULES, RULES, ConfigError, Rule, check_rules
from tests.conftest import compose

# settings that live only in some config groups
CONTEXT = {"task.model.width": ["task=cifar10_resnet9"], "task.model.hidden": []}


def bad_value(rule: Rule):
    """A value the rule must refuse, written as a Hydra override value."""
    if rule.choices is not None:
        return "bogus"
    if rule.kind is bool:
        return "maybe"
    if rule.kind is str:
        return "[1]"
    if rule.lo is not None:
        return str(rule.lo if rule.lo_open else rule.lo - 1)
    if rule.hi is not None:
        return str(rule.hi + 1)
    return "abc"


@pytest.mark.parametrize("key", sorted(RULES))
def test_rule_refuses_a_bad_value_with_one_line_naming_the_setting(key, tmp_path):
    rule = RULES[key]
    cfg = compose(CONTEXT.get(key, []) + [f"{key}={bad_value(rule)}"], tmp_path)
    with pytest.raises(ConfigError) as err:
        check_rules(cfg)
    msg = str(err.value)
    assert key in msg and "\n" not in msg, msg
    # the default (or the group's) value passes the same rule
    good = compose(CONTEXT.get(key, []), tmp_path)
    check_rules(good)


@pytest.mark.parametrize("key", sorted(k for k, r in RULES.items() if r.kind in (int, float) and r.choices is None))
def test_numeric_rule_refuses_nan_infinity_strings_and_lists(key, tmp_path):
    for value in ("nan", "inf", "'12'", "[1]"):
        cfg = compose(CONTEXT.get(key, []) + [f"{key}={value}"], tmp_path)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            check_rules(cfg)


@pytest.mark.parametrize("override,needle", [
    ("exp.name=../elsewhere", "exp.name"),
    ("exp.name=a/b", "exp.name"),
    ("exp.name=''", "exp.name"),
    ("task.model.hidden=[64,-5]", "task.model.hidden"),
    ("task.model.hidden=[0]", "task.model.hidden"),
    ("fit.prefixes=[0.5,1.5]", "fit.prefixes"),
    ("train.device=gpu", "train.device"),
    ("fit.device=cuda:x", "fit.device"),
    ("baselines.params.trak.proj_dim=0", "baselines.params.trak.proj_dim"),
    ("baselines.params.if_cg.damping=-1", "baselines.params.if_cg.damping"),
    ("baselines.params.if_cg.cg_tol=0", "baselines.params.if_cg.cg_tol"),
])
def test_structured_settings(override, needle, tmp_path):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        check_rules(compose([override], tmp_path))


def test_every_baseline_param_rule_accepts_the_shipped_values(tmp_path):
    cfg = compose([], tmp_path)
    params = OmegaConf.to_container(cfg.baselines.params)
    seen = {k for p in params.values() for k in (p or {})}
    assert seen & set(BASELINE_PARAM_RULES)          # the rules do cover shipped parameters
    check_rules(cfg)


def test_rules_describe_themselves():
    assert "(0, 1)" in RULES["masks.alpha"].describe()
    assert RULES["exp.seed"].describe().startswith("an integer in [0,")


@pytest.mark.parametrize("value", ["[0]", "[1.5]", "'abc'", "[true]"])
def test_malformed_budget_checkpoints_is_one_line_before_any_work(value, tmp_path):
    import os

    from orchestrator.config import validate
    with pytest.raises(ConfigError, match="baselines.budget_checkpoints"):
        validate(compose(["experiment=tiny", f"baselines.budget_checkpoints={value}"], tmp_path))
    assert not os.path.exists(tmp_path / "runs")
