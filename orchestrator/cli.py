"""The `datamodels` command (also `python -m orchestrator`): the Hydra app.

Before Hydra runs, the arguments are parsed as Hydra parses them (`--config-dir DIR` and
`--config-dir=DIR` alike), the config is composed and validated, and every output location
is checked, so a typo, an impossible value, missing data or an unwritable store is one
line on stderr (exit 2) with nothing written and no Ray started. A fault at run time (disk
full, a store or MLflow server gone, work that keeps failing) is one line too (exit 1). One
handler prints every error, foreseen or not, as one line with its secrets redacted, so
Hydra's own report (a traceback, and the overrides with their credentials) is never reached;
`--debug` or `hydra.verbose` adds the traceback. Ctrl-C and SIGTERM are one line too.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from typing import NoReturn

import hydra
from hydra.core.plugins import Plugins
from omegaconf import DictConfig

# hydra/launcher=parallel: importing the module stores its config; the class is registered with
# Hydra below. Hydra finds plugin classes by scanning the hydra_plugins namespace on sys.path,
# which the editable install leaves empty (`datamodels -m` then failed with "Unknown plugin
# class"); registering it works from any directory and for any kind of install. Where the scan
# does find the module it runs it again, so the class registered is the module's own after the
# scan (registered once, not twice).
import hydra_plugins.datamodels_launcher as launcher  # noqa: E402
import orchestrator.settings.schema  # noqa: F401,E402  (registers the structured configs: conf/config.yaml extends them)
from orchestrator import pipeline
from orchestrator.errors import ConfigError, UserError, install_redaction, one_line, redact_text
from orchestrator.pipeline import check, code_version
from orchestrator.runtime.plan import validate
from orchestrator.settings.identity import config_hash, experiment_uri
from orchestrator.settings.rules import schema_error
from orchestrator.tracking import signal_received
from orchestrator.uris import redact

_plugins = Plugins.instance()
_plugins.register(launcher.ParallelLauncher)


def _conf_dir() -> str:
    """The repository's conf/ (source checkout, editable install), else the packaged copy."""
    here = os.path.dirname(os.path.abspath(__file__))
    repo_conf = os.path.join(os.path.dirname(here), "conf")
    if os.path.isfile(os.path.join(repo_conf, "config.yaml")):
        return repo_conf
    return os.path.join(here, "conf")


CONF_DIR = _conf_dir()
log = logging.getLogger("orchestrator")

# Hydra commands that do not run the pipeline: no checks before them (`--cfg` is checked: the
# config it prints is one that would run).
PASS_THROUGH = ("help", "hydra_help", "info", "shell_completion")
DEBUG_ENV = "DATAMODELS_DEBUG"      # set by --debug (and so passed to a sweep's points)
CHECKED: list = []                  # [the job's config, its Plan], validated and checked by preflight


def debugging() -> bool:
    """--debug or hydra.verbose: errors come with their traceback."""
    return os.environ.get(DEBUG_ENV) == "1"


def fail(message: str, code: int, err: BaseException | None = None) -> NoReturn:
    """Print one line (`datamodels: error: ...`, secrets redacted) and exit with `code`; with
    --debug the traceback (redacted too) comes first."""
    if err is not None and debugging():
        text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        print(redact_text(text), file=sys.stderr, end="", flush=True)
    print(f"datamodels: error: {redact_text(' '.join(message.split()))}", file=sys.stderr, flush=True)
    sys.exit(code)


def unexpected(err: BaseException) -> NoReturn:
    """An error no check foresaw: one line with its type, and how to see the traceback."""
    hint = "" if debugging() else "; run again with --debug for the traceback"
    fail(f"{type(err).__name__}: {one_line(err)} (an unexpected error{hint}; what was finished is kept)", 1, err)


def interrupted(cfg: DictConfig | None = None, signum: int = signal.SIGINT) -> NoReturn:
    """Ctrl-C (or SIGTERM): one line saying what is kept and how to resume; exit 128 + the signal."""
    where = ""
    if cfg is not None:
        try:
            where = f" in {redact(experiment_uri(cfg, config_hash(cfg)))}"
        except Exception:  # noqa: BLE001 - the message must not fail
            where = ""
    what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    print(f"datamodels: {what}: every finished unit, fit chunk and scores file is kept{where}; run the "
          f"same command again to resume", file=sys.stderr, flush=True)
    sys.exit(128 + signum)


def runtime_errors() -> tuple:
    """Faults reported as one line instead of a traceback: every error of the family
    (errors.UserError: the store, the ledger, the pool, tracking, the stages, the analyses),
    and a file the user named that is not there."""
    return (UserError, FileNotFoundError)


def _yaml_error(err: BaseException | None) -> str | None:
    """'FILE line L: PROBLEM' for a YAML syntax error anywhere in the exception's chain."""
    import yaml
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, yaml.MarkedYAMLError):
            mark = err.problem_mark or err.context_mark
            where = f"{mark.name} line {mark.line + 1}" if mark is not None else "a config file"
            what = " ".join(x for x in (err.context, err.problem) if x)
            return f"{where}: invalid YAML ({what}); fix the file"
        err = err.__cause__ or err.__context__
    return None


def _one_line(err: Exception) -> str:
    bad_yaml = _yaml_error(err)
    if bad_yaml:
        return bad_yaml
    text = str(err).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    first = lines[0]
    if first.startswith("Could not override") or first.startswith("Key '") and "not in struct" in text:
        key = first.split("'")[1] if "'" in first else first
        plus = ", or prefix it with + to add a new key to your task" if key.startswith("task.") else ""
        parts = key.split(".")
        if len(parts) == 4 and parts[:2] == ["baselines", "params"]:
            from workers.attribution import DEFAULTS, accepted_params
            if parts[2] in DEFAULTS and parts[3] in accepted_params(parts[2]):
                return (f"{key} is a setting of {parts[2]} that the config does not set: add it with a "
                        f"leading +, e.g. +{key}=...")
        return f"unknown config key '{key}': check its spelling (`datamodels --cfg job` lists the keys){plus}"
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
    if "Additional config directory" in first:
        return first.replace("Additional config directory", "--config-dir: directory") + "; check the path"
    return " ".join(first.split())


def _first_point(args: list[str]) -> list[str]:
    """For -m sweeps: the overrides of the first sweep point (enough to catch typos early)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    parsed = OverridesParser.create().parse_overrides(args)
    out = []
    for o in parsed:
        if o.is_sweep_override():
            out.append(f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}")
        else:
            out.append(o.input_line)  # type: ignore[arg-type]  # set for parsed overrides
    return out


def compose(args) -> DictConfig:
    """The config Hydra will run, composed the way Hydra composes it (search path
    included), for the first point of a sweep."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    overrides = list(args.overrides)
    from hydra.core.override_parser.overrides_parser import OverridesParser
    parser = OverridesParser.create()
    for o in overrides:
        try:
            parser.parse_overrides([o])
        except Exception as err:  # noqa: BLE001 - Hydra's OverrideParseException
            key = o.split("=", 1)[0]
            raise ConfigError(f"{o}: Hydra cannot parse this ({str(err).splitlines()[0]}); quote a value that holds "
                              f"= & ? or spaces: \"{key}='...'\"") from None
    for o in overrides:
        if o.split("=", 1)[0].lstrip("+~").startswith("ledger."):
            raise ConfigError(f"{o.split('=', 1)[0]}: the ledger is no longer placed on its own; set store.uri "
                              f"(the whole experiment, ledger included, lives there)")
    if args.multirun:
        overrides = _first_point(overrides)
    search_path = create_config_search_path(CONF_DIR)
    if args.config_dir is not None:
        abs_dir = os.path.abspath(args.config_dir)
        if not os.path.isdir(abs_dir):
            raise ConfigError(f"--config-dir={args.config_dir}: no such directory")
        search_path.prepend(provider="command-line", path=f"file://{abs_dir}",
                            anchor=SearchPathQuery(provider="schema"))
    GlobalHydra.instance().clear()
    try:
        h = Hydra.create_main_hydra2(task_name="datamodels", config_search_path=search_path)
        return h.compose_config(args.config_name or "config", overrides,
                                run_mode=RunMode.RUN,
                                with_log_configuration=False)
    except Exception as err:  # noqa: BLE001 - Hydra's composition errors, as one line naming the setting
        raise (schema_error(err) or ConfigError(_one_line(err))) from None
    finally:
        GlobalHydra.instance().clear()


def preflight(argv: list[str]) -> None:
    """Compose, validate and check outputs; on a mistake print one line and exit 2."""
    from hydra._internal.utils import get_args_parser

    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit as err:          # argparse's own message is already printed
        sys.exit(2 if err.code else 0)
    if any(getattr(args, name, None) for name in PASS_THROUGH):
        return
    try:
        cfg = compose(args)
        from omegaconf import OmegaConf
        hydra_root = OmegaConf.select(cfg, "exp.root")
        plan = validate(cfg)
        check(plan, hydra_dir=os.path.join(str(hydra_root), "hydra"))
        if not args.multirun:     # the run reuses what was validated and checked here
            job = OmegaConf.to_container(cfg, resolve=False)
            job.pop("hydra", None)   # type: ignore[union-attr]  # a dict: the composed config
            CHECKED[:] = [job, plan]
    except ConfigError as err:
        fail(str(err), 2, err)
    except runtime_errors() as err:
        fail(str(err), 2, err)
    except Exception as err:  # noqa: BLE001 - Hydra's composition errors, shortened
        fail(_one_line(err), 2, err)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def app(cfg: DictConfig) -> None:
    """The run, under the one handler of every error: nothing reaches Hydra's own report
    (which prints a traceback and the overrides, credentials included)."""
    from omegaconf import OmegaConf

    try:
        try:
            plan = None
            if CHECKED and CHECKED[0] == OmegaConf.to_container(cfg, resolve=False):
                plan = CHECKED[1]
                plan.cfg = cfg      # Hydra's own copy of the same config
            pipeline.run(cfg, plan, checked=plan is not None)
        finally:
            _stop_ray()
    except ConfigError as err:
        fail(str(err), 2, err)
    except runtime_errors() as err:
        fail(str(err), getattr(err, "code", 1), err)
    except KeyboardInterrupt:
        interrupted(cfg)
    except SystemExit:
        # SIGTERM (tracking.Terminated), or Ray's SystemExit(1) for a signal during ray.get
        signum = signal_received()
        if signum is not None:
            interrupted(cfg, signum)
        raise
    except Exception as err:  # noqa: BLE001 - the one top-level handler: one line, never a traceback
        unexpected(err)


def _stop_ray() -> None:
    """Stop this process's Ray (a local instance it started, or its connection) before exit,
    with Ctrl-C ignored meanwhile: a Ctrl-C in Ray's own shutdown at exit would print a
    traceback and leave Ray's processes half stopped, once every result is already kept."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ray.shutdown()
    except Exception:  # noqa: BLE001 - exiting anyway: Ray's own processes are stopped at its exit
        pass
    finally:
        signal.signal(signal.SIGINT, before)


def _debug_flag(argv: list[str]) -> list[str]:
    """argv without --debug; --debug, or hydra.verbose set to anything but false, turns on
    tracebacks (DEBUG_ENV, which a sweep's points inherit)."""
    verbose = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("hydra.verbose=")]
    if "--debug" in argv or any(v.strip().lower() not in ("false", "0", "null", "[]", "") for v in verbose):
        os.environ[DEBUG_ENV] = "1"
    return [a for a in argv if a != "--debug"]


def main() -> None:
    install_redaction()
    # A user's task module in the directory the command runs from is importable, as under
    # `python -m orchestrator` (after the installed packages: a local file never shadows them).
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    sys.argv = [sys.argv[0], *_debug_flag(sys.argv[1:])]
    if "--version" in sys.argv[1:] or "-V" in sys.argv[1:]:
        print(f"datamodels {code_version()}")
        return
    try:
        from workers.logs import plain_when_not_a_terminal
        plain_when_not_a_terminal()
        preflight(sys.argv[1:])
        try:
            app()
        finally:
            _stop_ray()            # a sweep's launcher starts the local instance its points join
    except KeyboardInterrupt:
        interrupted()
    except SystemExit:
        raise
    except Exception as err:  # noqa: BLE001 - Hydra's and the sweep launcher's errors too: one line
        unexpected(err)
