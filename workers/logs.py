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
