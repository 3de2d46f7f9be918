"""Which experiment a directory holds: the marker `experiment.json` at its root.

The marker names the experiment (its config hash and what the hash covers: task, recipe,
α, seed) and the settings every driver on it must share (the unit size, which names the
units that drivers claim). `check(plan)` runs before anything is written: a directory that
holds another experiment is refused in one line naming the setting, and nothing of it is
moved; a directory written before markers existed is recognised by its summary and its
ledger's rows. `claim(plan)` writes the marker when a run starts.
"""
from __future__ import annotations

import json
import logging

from orchestrator.errors import ConfigError
from orchestrator.settings.identity import ledger_identity
from orchestrator.storage.store import CorruptFile, Layout, StoreError

log = logging.getLogger(__name__)

FORMAT = 1


def content(plan) -> dict:
    """The marker of the plan's experiment (deterministic: drivers that start at once write
    the same bytes)."""
    cfg = plan.cfg
    return {"format": FORMAT, "config_hash": plan.config_hash, "name": str(cfg.exp.name),
            "identity": ledger_identity(cfg), "n": plan.n, "n_targets": plan.n_targets,
            "models_per_unit": int(cfg.train.models_per_unit)}


def _setting(cfg) -> str:
    return "exp.dir" if cfg.exp.get("dir") else ("store.uri" if cfg.store.get("uri") else "exp.root")


def read(store) -> dict | None:
    """The marker, or None when there is none or it cannot be read (then it is rewritten, after
    the directory's ledger and summary have been checked against the plan instead)."""
    try:
        marker = json.loads(store.read_bytes(Layout.EXPERIMENT))
    except FileNotFoundError:
        return None
    except ValueError as err:
        log.warning("%s is unreadable (%s); the experiment is recognised by its ledger instead, and the "
                    "marker rewritten", store.where(Layout.EXPERIMENT), str(err)[:120])
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("config_hash"), str):
        log.warning("%s is not an experiment marker; the experiment is recognised by its ledger instead, and "
                    "the marker rewritten", store.where(Layout.EXPERIMENT))
        return None
    return marker


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key old → new' for every leaf that differs between two identities."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a} → {b}")
    return out


def _legacy_hashes(store) -> set[str]:
    """The config hashes a directory without a marker shows: its summary's and those of the
    rows of its first ledger files (read verified; unreadable files are the ledger's to
    quarantine, not evidence)."""
    found = set()
    try:
        summary = json.loads(store.read_bytes(Layout.SUMMARY))
        if isinstance(summary, dict) and isinstance(summary.get("config_hash"), str):
            found.add(summary["config_hash"])
    except (FileNotFoundError, ValueError):
        pass
    for entry in store.list(Layout.LEDGER, ".parquet")[:5]:
        try:
            found |= set(store.read_table(entry.rel, ["config_hash"])["config_hash"].to_pylist())
        except (CorruptFile, FileNotFoundError, KeyError):
            continue
    return found


def check(plan) -> None:
    """Refuse (ConfigError, one line) a directory that holds another experiment than the
    plan's; set plan.models_per_unit to the unit size the experiment was started with."""
    cfg, store = plan.cfg, plan.store
    setting = _setting(cfg)
    where = store.where()
    try:
        marker = read(store)
        other = ({marker["config_hash"]} if marker is not None else _legacy_hashes(store)) - {None}
    except StoreError as err:
        raise ConfigError(f"{setting}: {err}") from None
    if other and plan.config_hash not in other:
        name = (marker or {}).get("name") or "another experiment"
        diffs = _differences((marker or {}).get("identity") or {}, ledger_identity(cfg)) if marker else []
        what = f" ({'; '.join(diffs[:4])})" if diffs else ""
        fix = ("drop exp.dir (this config's own directory is <store.uri or exp.root>/"
               f"{cfg.exp.name}-{plan.config_hash}) or point it at an empty directory"
               if setting == "exp.dir" else f"point {setting} elsewhere")
        raise ConfigError(f"{setting}: {where} holds {name} {sorted(other)[0]}, not this config's experiment "
                          f"{plan.config_hash}{what}; nothing there was changed: {fix}")
    asked = int(cfg.train.models_per_unit)
    fixed = (marker or {}).get("models_per_unit")
    plan.models_per_unit = asked
    plan.marker = marker
    if isinstance(fixed, int) and not isinstance(fixed, bool) and fixed >= 1 and fixed != asked:
        log.warning("train.models_per_unit=%d: this experiment's units hold %d models (set by its first run, so "
                    "that every driver names the same units and claims them); using %d", asked, fixed, fixed)
        plan.models_per_unit = fixed


def claim(plan) -> None:
    """Write the marker of the plan's experiment unless `check` found a readable one."""
    if getattr(plan, "marker", None) is None:
        plan.store.write_bytes(Layout.EXPERIMENT, json.dumps(content(plan), indent=1, sort_keys=True,
                                                             default=str).encode())
