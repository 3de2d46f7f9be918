"""Training in rounds: `masks.n_train=auto` (or a number with a `budget.` rule set) trains
`budget.first` models, fits and scores them, then `budget.growth` times as many, and so on,
until the first rule the user set is met (orchestrator.stages.rounds runs them):

    budget.lds                  the datamodels' LDS reached this
    budget.gain_per_doubling    the LDS gained per doubling of the models fell below this
    budget.models               this many train models (a number given as masks.n_train too)
    budget.seconds              the compute seconds counted so far (training every model used,
                                and the fits), or those the next round would take, pass this

`rounds(cfg)` reads and checks these settings (ConfigError, one line) and returns None when a
run trains its masks.n_train models in one go, as it always did.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import OmegaConf

from orchestrator.errors import ConfigError

AUTO = "auto"
RULES = ("lds", "gain_per_doubling", "models", "seconds")


@dataclass(frozen=True)
class Rounds:
    first: int                       # train models in the first round
    growth: float                    # each round's models: the last round's times this
    cap: int | None                  # at most this many train models (budget.models, or masks.n_train)
    lds: float | None = None
    gain_per_doubling: float | None = None
    seconds: float | None = None

    def sizes(self, limit: int = 64) -> list[int]:
        """The train models of each round, up to the cap (at most `limit` rounds listed)."""
        out = [self.first if self.cap is None else min(self.first, self.cap)]
        while len(out) < limit:
            nxt = self.next_size(out[-1])
            if nxt is None:
                break
            out.append(nxt)
        return out

    def next_size(self, m: int) -> int | None:
        """The next round's train models after a round of m, or None at the cap."""
        if self.cap is not None and m >= self.cap:
            return None
        nxt = max(m + 1, int(math.ceil(m * self.growth)))
        return nxt if self.cap is None else min(nxt, self.cap)

    def describe(self) -> str:
        rules = []
        if self.lds is not None:
            rules.append(f"LDS >= {self.lds:g}")
        if self.gain_per_doubling is not None:
            rules.append(f"gain per doubling < {self.gain_per_doubling:g}")
        if self.cap is not None:
            rules.append(f"{self.cap} models")
        if self.seconds is not None:
            rules.append(f"{self.seconds:g} compute seconds")
        return " or ".join(rules)


def is_auto(value) -> bool:
    return isinstance(value, str) and value.strip().lower() == AUTO


def check_n_train(value) -> None:
    """masks.n_train: an integer >= 10, or auto."""
    if is_auto(value):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 10:
        raise ConfigError(f"masks.n_train={value!r} must be an integer >= 10 (e.g. masks.n_train=4000), or auto "
                          f"to train in rounds until a budget. rule is met (e.g. masks.n_train=auto budget.lds=0.85)")


def rounds(cfg) -> Rounds | None:
    """The rounds this run trains in, or None (one go of masks.n_train models)."""
    n_train = OmegaConf.select(cfg, "masks.n_train")
    check_n_train(n_train)
    b = OmegaConf.select(cfg, "budget")
    b = OmegaConf.to_container(b, resolve=True) if b is not None else {}
    rules = {k: b.get(k) for k in RULES if b.get(k) is not None}
    auto = is_auto(n_train)
    if not auto and not rules:
        return None
    if auto and not rules:
        raise ConfigError("masks.n_train=auto needs a rule to stop on: set budget.lds=0.85, "
                          "budget.gain_per_doubling=0.005, budget.models=8000 or budget.seconds=3600")
    stage = str(OmegaConf.select(cfg, "stage"))
    if stage != "all":
        if auto:
            raise ConfigError(f"masks.n_train=auto trains in rounds, which needs stage=all (stage={stage}); for "
                              f"stage={stage} give the count the rounds stopped at (summary.json: rounds.models), "
                              f"e.g. masks.n_train=2000")
        return None                    # a number: the stage runs on that many models, as always
    caps = [int(v) for v in (b.get("models"), None if auto else n_train) if v is not None]
    return Rounds(first=int(b.get("first") or 250), growth=float(b.get("growth") or 2.0),
                  cap=min(caps) if caps else None, lds=rules.get("lds"),
                  gain_per_doubling=rules.get("gain_per_doubling"), seconds=rules.get("seconds"))
