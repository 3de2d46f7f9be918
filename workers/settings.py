"""Settings with their allowed values, declared where the setting is declared.

A config dataclass field written as `setting(default, lo=1, example=20)` carries a `Rule`
in its metadata: the range or choices that a type alone cannot say. The dataclasses are the
single source of defaults, types and allowed values: Hydra's structured configs
(orchestrator/schema.py) take their types and defaults, `rules(cls)` collects their rules
for the up-front checks (orchestrator/config.py), and `check(obj)` applies them to an
instance built in code (a worker called from a notebook). Plain Python: no Ray, no Hydra.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

__all__ = ["Rule", "SettingError", "check", "rules", "setting"]


class SettingError(ValueError):
    """A setting outside its allowed values: one line naming the setting and the fix."""


def shown(value) -> str:
    """A value as a message shows it: a string quoted, anything else as it prints."""
    return repr(value) if isinstance(value, str) else str(value)


class Rule:
    """What one setting may hold; `check(key, value)` raises SettingError or returns None.

    kind: int | float | bool | str; lo/hi: bounds (closed unless lo_open/hi_open); null: None
    is allowed; choices: the allowed values (kind then does not matter); example: a good value,
    shown in the message.
    """

    def __init__(self, kind: type = float, lo=None, hi=None, lo_open=False, hi_open=False, null=False,
                 choices=None, example=None):
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open = kind, lo, hi, lo_open, hi_open
        self.null, self.choices, self.example = null, choices, example

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + "|".join(str(c) for c in self.choices)
        what = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[self.kind]
        if self.lo is not None and self.hi is not None:
            a = "(" if self.lo_open else "["
            b = ")" if self.hi_open else "]"
            return f"{what} in {a}{self.lo}, {self.hi}{b}"
        if self.lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {self.lo}"
        if self.hi is not None:
            return f"{what} {'<' if self.hi_open else '<='} {self.hi}"
        return what

    def check(self, key: str, value) -> None:
        if value is None:
            if self.null:
                return
            raise SettingError(f"{key} must be set: {self.describe()}{self._eg(key)}")
        if self.choices is not None:
            if value not in self.choices:
                raise SettingError(f"{key}={shown(value)} is not {self.describe()}")
            return
        ok = True
        if self.kind is bool:
            ok = isinstance(value, bool)
        elif self.kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif self.kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif self.kind is str:
            ok = isinstance(value, str)
        if not ok:
            raise SettingError(f"{key}={shown(value)} must be {self.describe()}{self._eg(key)}")
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            raise SettingError(f"{key}={shown(value)} must be {self.describe()}{self._eg(key)}")
        if self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)):
            raise SettingError(f"{key}={shown(value)} must be {self.describe()}{self._eg(key)}")

    def _eg(self, key: str) -> str:
        return f" (e.g. {key}={self.example})" if self.example is not None else ""


def setting(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, choices=None, lo=None,
            hi=None, lo_open: bool = False, hi_open: bool = False, example=None) -> Any:
    """A dataclass field with its default (or default factory) and allowed values. The rule's
    kind and whether None is allowed come from the field's type (see `rules`)."""
    spec = {"choices": tuple(choices) if choices is not None else None, "lo": lo, "hi": hi,
            "lo_open": lo_open, "hi_open": hi_open, "example": example}
    return dataclasses.field(default=default, default_factory=factory, metadata={"rule": spec})


def _kind(tp) -> tuple[Any, bool]:
    """(the scalar type, whether None is allowed) of an annotation such as `int | None`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else Any), len(args) < len(typing.get_args(tp))
    return tp, False


def rules(cls, prefix: str = "") -> dict[str, Rule]:
    """'<prefix><field>' -> Rule for every field of dataclass `cls` declared with `setting`,
    recursing into fields whose type is itself a dataclass (so a root config gives dotted keys)."""
    out: dict[str, Rule] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, null = _kind(hints[f.name])
        if dataclasses.is_dataclass(kind):
            out.update(rules(kind, f"{prefix}{f.name}."))
            continue
        spec = f.metadata.get("rule")
        scalar = kind in (int, float, bool, str)
        if spec is None or not (scalar or spec["choices"] is not None):
            continue                  # lists and mappings: their types are checked by the schema
        out[prefix + f.name] = Rule(kind if scalar else str, null=null, **spec)
    return out


def check(obj, prefix: str = "") -> None:
    """Apply the rules of dataclass instance `obj`'s fields to their values (SettingError)."""
    for key, rule in rules(type(obj)).items():
        value: Any = obj
        for part in key.split("."):
            value = getattr(value, part)
        rule.check(prefix + key, value)
