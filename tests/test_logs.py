"""What the user reads: repeated warnings summarised, library chatter quiet, no colour codes
in files."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

from tests.conftest import REPO
from workers.logs import CHATTER, quiet_libraries, repeats_summarised


def test_a_warning_repeated_per_target_is_printed_once_with_a_count(caplog):
    lg = logging.getLogger("workers.attribution.influence")
    other = logging.getLogger("workers.lasso")
    with caplog.at_level(logging.INFO):
        with repeats_summarised():
            for t in range(200):
                lg.warning("CG stopped at %d iterations with relative residual %.2e > tol %.1e; raise it", 30,
                           1e-3 * (t + 1), 1e-3)
                lg.info("progress %d", t)               # below the level: untouched
            other.warning("lasso: %d targets did not converge", 3)
    texts = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert texts[0].startswith("CG stopped at 30 iterations with relative residual 1.00e-03")
    assert texts[1] == "lasso: 3 targets did not converge"
    assert texts[2] == ('the warning "CG stopped at … iterations with relative residual … > tol …" '
                        'came 200 times in all (the first is shown)')
    assert len(texts) == 3
    assert sum(1 for r in caplog.records if r.levelno == logging.INFO) == 200
    # outside the block nothing is filtered any more
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        lg.warning("again")
        lg.warning("again")
    assert len(caplog.records) == 2


def test_library_chatter_is_quiet_unless_debugging():
    root = logging.getLogger()
    old = root.level
    try:
        root.setLevel(logging.INFO)
        for name in CHATTER:
            logging.getLogger(name).setLevel(logging.NOTSET)
        quiet_libraries()
        assert all(logging.getLogger(n).level == logging.ERROR for n in CHATTER)
        for name in CHATTER:
            logging.getLogger(name).setLevel(logging.NOTSET)
        root.setLevel(logging.DEBUG)
        quiet_libraries()
        assert all(logging.getLogger(n).level == logging.NOTSET for n in CHATTER)     # left alone
    finally:
        root.setLevel(old)
        for name in CHATTER:
            logging.getLogger(name).setLevel(logging.NOTSET)


def test_ray_colour_codes_are_off_when_output_is_a_file(tmp_path):
    code = ("import os; from workers.logs import plain_when_not_a_terminal as p; p(); "
            "print(os.environ.get('RAY_COLOR_PREFIX'))")
    env = {k: v for k, v in os.environ.items() if k != "RAY_COLOR_PREFIX"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert out.stdout.strip() == "0"
