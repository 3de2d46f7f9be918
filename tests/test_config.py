"""Every numeric and path setting has a rule (declared with its field in the schema,
orchestrator/settings/schema.py, and collected in orchestrator/settings/rules.py RULES); each rule is tested
here with a value it must refuse and one it must accept, through the same checks the command
line runs before anything starts: composition (the schema's types) and then check_rules."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from orchestrator.errors import ConfigError
from orchestrator.settings.rules import BASELINE_PARAM_RULES, RULES, check_rules
from tests.conftest import compose
from workers.settings import Rule

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


def checked(overrides: list[str], tmp_path):
    """Compose (a value of the wrong type is refused here) and check the rules."""
    cfg = compose(overrides, tmp_path)
    check_rules(cfg)
    return cfg


@pytest.mark.parametrize("key", sorted(RULES))
def test_rule_refuses_a_bad_value_with_one_line_naming_the_setting(key, tmp_path):
    rule = RULES[key]
    with pytest.raises(ConfigError) as err:
        checked(CONTEXT.get(key, []) + [f"{key}={bad_value(rule)}"], tmp_path)
    msg = str(err.value)
    assert key in msg and "\n" not in msg, msg
    # the default (or the group's) value passes the same rule
    good = compose(CONTEXT.get(key, []), tmp_path)
    check_rules(good)


@pytest.mark.parametrize("key", sorted(k for k, r in RULES.items() if r.kind in (int, float) and r.choices is None))
def test_numeric_rule_refuses_nan_infinity_strings_and_lists(key, tmp_path):
    for value in ("nan", "inf", "'abc'", "[1]", "{a: 1}"):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
            checked(CONTEXT.get(key, []) + [f"{key}={value}"], tmp_path)
        assert "\n" not in str(err.value)


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
    # the schema's types and keys, as Hydra composes
    ("train.epochs=1.5", "train.epochs"),
    ("exp.name=[1]", "exp.name"),
    ("fit.prefixes=[a]", "fit.prefixes"),
    ("baselines.methods=3", "baselines.methods"),
    ("train.foo=1", "train.foo"),
    ("+train.foo=1", "train.foo"),
    ("+fit.lambda=1", "fit.lambda"),
])
def test_structured_settings(override, needle, tmp_path):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        checked([override], tmp_path)


def test_every_baseline_param_rule_accepts_the_shipped_values(tmp_path):
    cfg = compose([], tmp_path)
    params = OmegaConf.to_container(cfg.baselines.params)
    seen = {k for p in params.values() for k in (p or {})}
    assert seen & set(BASELINE_PARAM_RULES)          # the rules do cover shipped parameters
    check_rules(cfg)


def test_rules_describe_themselves():
    assert "(0, 1)" in RULES["masks.alpha"].describe()
    assert RULES["exp.seed"].describe().startswith("an integer in [0,")


@pytest.mark.parametrize("override,needle", [
    ("+baselines.params.if_cg.inverse=chol", "baselines.params.if_cg.inverse='chol' must be one of auto|cg|woodbury"),
    ("+baselines.params.if_cg.hessian=fisher", "baselines.params.if_cg.hessian"),
    ("+baselines.params.trak.proj_type=sparse", "baselines.params.trak.proj_type"),
    ("+baselines.params.trak.dtype=float16", "baselines.params.trak.dtype"),
    ("+baselines.params.representer.direction=up", "baselines.params.representer.direction"),
    ("+baselines.params.tracin.factored=1", "baselines.params.tracin.factored"),
    ("+baselines.params.tracin.layer=first", "baselines.params.tracin.layer"),
    ("+baselines.params.if_cg.cg_itters=5", "baselines.params.if_cg.cg_itters is not a setting of if_cg"),
])
def test_a_methods_params_are_checked_before_any_work(override, needle, tmp_path):
    import os

    from orchestrator.runtime.plan import validate
    with pytest.raises(ConfigError) as err:
        validate(compose([override], tmp_path))
    assert needle in str(err.value) and "\n" not in str(err.value), err.value
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("override", [
    "+baselines.params.if_cg.inverse=woodbury", "+baselines.params.tracin.factored=false",
    "+baselines.params.tracin.layer=[fc1]", "+baselines.params.if_cg.factor_max_rows=100"])
def test_good_method_params_pass(override, tmp_path):
    from orchestrator.runtime.plan import validate
    validate(compose([override], tmp_path), check_data=False)


@pytest.mark.parametrize("value", ["[0]", "[1.5]", "'abc'", "[true]"])
def test_malformed_budget_checkpoints_is_one_line_before_any_work(value, tmp_path):
    import os

    from orchestrator.runtime.plan import validate
    with pytest.raises(ConfigError, match="baselines.budget_checkpoints"):
        validate(compose(["experiment=tiny", f"baselines.budget_checkpoints={value}"], tmp_path))
    assert not os.path.exists(tmp_path / "runs")


# --------------------------------------------------------------------------- the schema
# The ledger's identity of each shipped preset (the experiment directory's hash). A change to
# the schema or the presets must not move an existing experiment to a new directory.
PRESET_HASHES = {
    (): "6693add97e",
    ("experiment=tiny",): "1bfbbefd37",
    ("experiment=fmnist_10k",): "8081878d98",      # the default's recipe, 10,000 targets
    ("experiment=fmnist_mislabel",): "9d4e32be66",  # the default's recipe, 10% flipped, margins on the training set
    ("train=resnet9_datamodels", "task=cifar10_resnet9"): "6c42288037",
    ("train=resnet9_fast",): "425b5d2e3b",
    ("fit=glmnet",): "6693add97e",
    ("task=digits_mlp",): "1fc05aeeec",
    ("train.lr_peak_epoch=4.0",): "6693add97e",     # 4.0 and 4 are one recipe
    ("task.label_noise=0",): "6693add97e",          # no noise: the experiment it always was
    ("task.label_noise=0.0", "task.noise_seed=7"): "6693add97e",   # a seed that seeds nothing
    ("task.targets=test",): "6693add97e",           # the targets only: as always
    ("experiment=tiny", "task.targets=test"): "1bfbbefd37",
}


def test_margins_on_the_training_examples_are_another_experiment(tmp_path):
    from orchestrator.settings.identity import config_hash
    both = config_hash(compose(["task.targets=both"], tmp_path))
    assert both != PRESET_HASHES[()]
    assert config_hash(compose(["task.targets=both", "task.label_noise=0.1"], tmp_path)) not in (
        both, config_hash(compose(["task.label_noise=0.1"], tmp_path)))
    train = config_hash(compose(["task.targets=train", "task.n_targets=1000"], tmp_path))
    assert train not in (both, PRESET_HASHES[()], config_hash(compose(["task.n_targets=1000"], tmp_path)))


def test_label_noise_is_another_experiment_and_its_seed_too(tmp_path):
    from orchestrator.settings.identity import config_hash
    noisy = config_hash(compose(["task.label_noise=0.1"], tmp_path))
    assert noisy != PRESET_HASHES[()]
    assert config_hash(compose(["task.label_noise=0.1", "task.noise_seed=0"], tmp_path)) == noisy
    assert config_hash(compose(["task.label_noise=0.1", "task.noise_seed=1"], tmp_path)) != noisy
    assert config_hash(compose(["task.label_noise=0.2"], tmp_path)) != noisy


def test_a_task_class_without_label_noise_is_refused_in_one_line_only_when_it_is_set(tmp_path):
    from orchestrator.runtime.plan import validate
    from tests.test_pipeline import planted_overrides
    base = planted_overrides(tmp_path)
    validate(compose(base, tmp_path))                         # the preset's neutral values are dropped
    for setting in ("task.label_noise=0.1", "task.targets=both"):
        with pytest.raises(ConfigError) as err:
            validate(compose(base + [setting], tmp_path))
        msg = str(err.value)
        assert setting in msg and "PlantedTask does not take it" in msg and "\n" not in msg, msg


def test_the_shipped_task_plants_seeded_noise_in_the_training_labels_only():
    from workers.tasks import ImageClassificationTask
    kw = dict(name="digits_mlp", data={"name": "digits"}, n_train=300, n_targets=50, model={"name": "mlp"})
    clean = ImageClassificationTask(**kw)
    noisy = ImageClassificationTask(**kw, label_noise=0.1, noise_seed=3)
    assert clean.true_labels() is None
    x0, y0, xt0, yt0, _ = clean.arrays()
    x1, y1, xt1, yt1, _ = noisy.arrays()
    y_true, flipped = noisy.true_labels()
    assert flipped.sum() == 30
    assert (y1[flipped] != y0[flipped]).all() and (y1[~flipped] == y0[~flipped]).all()
    assert (y_true == y0).all() and (x1 == x0).all() and (xt1 == xt0).all() and (yt1 == yt0).all()
    assert (noisy.attribution_inputs()[2].numpy() == y1).all()     # the baselines see what the models saw
    with pytest.raises(ValueError, match="task.label_noise"):
        ImageClassificationTask(**kw, label_noise=0.1, target_split="train").check()


@pytest.mark.parametrize("overrides", sorted(PRESET_HASHES))
def test_the_shipped_presets_keep_their_ledger_hash(overrides, tmp_path):
    from orchestrator.settings.identity import config_hash
    assert config_hash(compose(list(overrides), tmp_path)) == PRESET_HASHES[overrides]


def _preset_files():
    import glob
    import os

    from tests.conftest import REPO
    for group in ("train", "fit", "cluster"):
        for path in sorted(glob.glob(os.path.join(REPO, "conf", group, "*.yaml"))):
            yield group, os.path.splitext(os.path.basename(path))[0], path


@pytest.mark.parametrize("group,name,path", list(_preset_files()))
def test_a_preset_holds_only_what_differs_from_the_base_it_extends(group, name, path, tmp_path):
    """Presets extend a base (the schema's defaults, or another preset named in their
    defaults list) and set only what differs: a restated default is a copy."""
    import yaml

    from orchestrator.settings import schema
    raw = yaml.safe_load(open(path)) or {}
    bases = [d for d in raw.pop("defaults", []) if d != "_self_"]
    base = (OmegaConf.to_container(compose([f"{group}={bases[0]}"], tmp_path)[group]) if bases
            else OmegaConf.to_container(OmegaConf.structured(schema.GROUPS[group])))
    restated = {k: v for k, v in raw.items() if k in base and base[k] == v}
    assert not restated, f"conf/{group}/{name}.yaml restates {restated} of its base"
    composed = compose([f"{group}={name}"], tmp_path)[group]
    assert {k: composed[k] for k in raw} == raw          # and what it sets is what runs


def test_the_schema_is_the_single_source_of_the_workers_defaults():
    """The train and fit groups are the workers' config classes, extended with scheduling:
    the same fields with the same defaults, and their rules are the schema's."""
    import dataclasses

    from orchestrator.settings import schema
    from workers.lasso import LassoConfig
    from workers.train import TrainConfig
    for conf, worker in ((schema.TrainConf, TrainConfig), (schema.FitConf, LassoConfig)):
        assert issubclass(conf, worker)
        mine = {f.name: f.default for f in dataclasses.fields(worker)}
        assert {k: v for k, v in ((f.name, f.default) for f in dataclasses.fields(conf)) if k in mine} == mine
    for key in ("train.epochs", "train.engine", "train.precision", "fit.backend", "fit.n_lambdas"):
        assert key in RULES


def test_a_worker_config_built_in_code_is_checked_by_the_same_rules():
    from workers.lasso import LassoConfig
    from workers.settings import SettingError, check
    from workers.train import TrainConfig
    with pytest.raises(SettingError, match=r"train\.engine='fast' is not one of batched\|single"):
        TrainConfig(engine="fast").validate()
    with pytest.raises(SettingError, match=r"train\.epochs=0 must be an integer >= 1"):
        TrainConfig(epochs=0).validate()
    with pytest.raises(SettingError, match=r"fit\.backend='lars'"):
        check(LassoConfig(backend="lars"), "fit.")
