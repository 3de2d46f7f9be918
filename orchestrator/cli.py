"""The `datamodels` command (also `python -m orchestrator`): the Hydra app.

Before Hydra runs, the overrides are composed and the config validated here, so a typo, an
impossible value or missing data is one line on stderr (exit 2) with nothing written and
no Ray started.
"""
from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

def _conf_dir() -> str:
    """The repository's conf/ (source checkout, editable install), else the packaged copy."""
    here = os.path.dirname(os.path.abspath(__file__))
    repo_conf = os.path.join(os.path.dirname(here), "conf")
    if os.path.isfile(os.path.join(repo_conf, "config.yaml")):
        return repo_conf
    return os.path.join(here, "conf")


CONF_DIR = _conf_dir()
log = logging.getLogger("orchestrator")

PASS_THROUGH = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "--version", "--shell-completion",
                "-sc", "--resolve", "--package", "-p")


def _one_line(err: Exception) -> str:
    text = str(err).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    first = lines[0]
    if first.startswith("Could not override"):
        key = first.split("'")[1] if "'" in first else first
        return (f"unknown config key '{key}': check its spelling (`datamodels --cfg job` lists the keys), "
                f"or prefix it with + to add a new key")
    if "Could not find" in first or "Could not load" in first:
        opts = []
        for ln in lines[1:]:
            if ln.startswith("Config search path") or ln.startswith("provider="):
                break
            if not ln.lower().startswith("available"):
                opts.append(ln)
        group = first.split("Could not find '")[-1].split("'")[0] if "Could not find '" in first else ""
        name = group.split("/")[0] if "/" in group else "the group"
        what = f"{name}={group.split('/', 1)[1]}: no such option" if "/" in group else first
        return f"{what}; available: {', '.join(opts[:12])}" if opts else what
    return first.replace("\n", " ")


def _first_point(args: list[str]) -> list[str]:
    """For -m sweeps: the overrides of the first sweep point (enough to catch typos early)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    parsed = OverridesParser.create().parse_overrides(args)
    out = []
    for o in parsed:
        if o.is_sweep_override():
            out.append(f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}")
        else:
            out.append(o.input_line)
    return out


def preflight(args: list[str]) -> None:
    """Compose and validate the config; on a mistake print one line and exit 2."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from orchestrator.config import ConfigError, validate
    multirun = "-m" in args or "--multirun" in args
    overrides = [a for a in args if not a.startswith("-")]
    try:
        if multirun:
            overrides = _first_point(overrides)
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        validate(cfg)
    except ConfigError as err:
        print(f"datamodels: error: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:  # noqa: BLE001 - Hydra's composition errors, shortened
        print(f"datamodels: error: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)
    finally:
        GlobalHydra.instance().clear()


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def app(cfg: DictConfig) -> None:
    from orchestrator import pipeline
    from orchestrator.config import ConfigError
    try:
        pipeline.run(cfg)
    except ConfigError as err:
        print(f"datamodels: error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    args = sys.argv[1:]
    if not any(a in PASS_THROUGH or a.split("=")[0] in PASS_THROUGH for a in args):
        preflight(args)
    app()
