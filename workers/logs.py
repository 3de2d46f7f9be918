"""What the user reads: one log format, no colour codes in files, no library chatter, and a
warning that repeats (per target, per block) printed once with a count.

Pure `logging`, no Ray: used by the driver (`orchestrator.cli`) and inside Ray tasks.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys

# Libraries whose INFO and WARNING lines are routine for our users (database migrations,
# Ray's notice that token auth is on, MLflow's run links): shown only with hydra.verbose.
CHATTER = ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent", "mlflow.tracking._tracking_service",
           "mlflow.utils.autologging_utils", "ray._private.authentication.authentication_token_setup")


# Hydra's default job-log format, which the driver uses: worker processes use it too, so
# that a line relayed by Ray reads like the driver's own (after Ray's "(Task pid=…)" prefix).
FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def worker_format() -> None:
    """In a Ray worker process: our loggers (`workers`, `orchestrator`) print warnings and
    errors in the driver's format. Idempotent."""
    for name in ("workers", "orchestrator"):
        lg = logging.getLogger(name)
        if any(getattr(h, "_datamodels", False) for h in lg.handlers):
            continue
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._datamodels = True  # type: ignore[attr-defined]  # marks our handler
        lg.addHandler(handler)
        lg.setLevel(logging.WARNING)      # a worker's INFO lines are detail; progress is the driver's
        lg.propagate = False


def quiet_libraries() -> None:
    """Raise the chatty libraries' loggers to ERROR, unless the root logger is at DEBUG."""
    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
        return
    for name in CHATTER:
        logging.getLogger(name).setLevel(logging.ERROR)


def plain_when_not_a_terminal() -> None:
    """Ray wraps every relayed worker line in colour codes; not when the output is a file."""
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        try:        # Ray colours some lines regardless ("[repeated 7x across cluster]"): strip them
            import colorama
            colorama.init(strip=True, convert=False)
        except ImportError:
            pass


class _Repeats(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level
        self.counts: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level:
            return True
        key = (record.name, str(record.msg))
        self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts[key] == 1


@contextlib.contextmanager
def repeats_summarised(logger: str = "workers", level: int = logging.WARNING):
    """Within the block, a record of `level` or above whose message template was already
    logged is counted instead of printed; at the end, one line per template that repeated
    says how many more there were."""
    # a logger's filters see only its own records, not its children's: filter each one
    names = [logger] + [n for n in list(logging.root.manager.loggerDict) if n.startswith(logger + ".")]
    loggers = [logging.getLogger(n) for n in names]
    repeats = _Repeats(level)
    for lg in loggers:
        lg.addFilter(repeats)
    try:
        yield repeats
    finally:
        for lg in loggers:
            lg.removeFilter(repeats)
        for (name, msg), count in repeats.counts.items():
            if count > 1:
                gist = re.sub(r"%[-#0 +]*\d*(?:\.\d+)?[sdifgeEr]", "…", msg).split(";")[0].strip()
                logging.getLogger(name).log(level, "the warning \"%s\" came %d times in all (the first is shown)",
                                            gist, count)
