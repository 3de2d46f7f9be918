"""The command's one top-level handler, as installed and typed: every error one line with
secrets redacted (an unexpected one included, Hydra's own report never reached), `--debug`
for the traceback, `--cfg job` checked like a run, Ctrl-C one line and a resume that trains
only what is missing. Run through the installed `datamodels` from a directory outside the
repository, without PYTHONPATH."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

BIN = os.path.dirname(sys.executable)
SECRET = "SUPERSECRET0123456789"

# A user's task module, written into the run's working directory (as a user's own code would
# be): it trains, but its images (arrays(), read by the evaluate stage's plot) fail with a URI
# holding a secret in the message: an error that no check of ours foresaw, inside the run.
USER_TASK = textwrap.dedent('''
    import numpy as np
    from types import SimpleNamespace

    class Flaky:
        def __init__(self, n=40, n_targets=4):
            self.n, self.n_targets = n, n_targets
            self.w = np.random.default_rng(0).normal(size=(n, n_targets)).astype(np.float32)

        def check(self):
            pass

        def setup(self, train_cfg):
            pass

        def train(self, masks, seeds, return_weights=False):
            k = len(masks)
            noise = np.stack([np.random.default_rng(int(s)).normal(size=self.n_targets) for s in seeds])
            margins = (masks.astype(np.float32) @ self.w + noise).astype(np.float32)
            return SimpleNamespace(margins=margins, train_acc=np.ones(k), target_acc=np.ones(k), loss=np.zeros(k),
                                   state_dicts=None)

        def arrays(self):
            raise RuntimeError("lost s3://bucket/x?secret_key=SECRET on the way")
''').replace("SECRET", SECRET)
FLAKY = ["task._target_=usertask.Flaky", "~task.data", "~task.n_train", "~task.n_targets", "~task.target_split",
         "~task.subset_seed", "~task.model", "~task.margin", "~task.name", "baselines.methods=[]", "masks.n_train=20",
         "masks.n_eval=5", "eval.replicas=1", "fit.prefixes=[]", "train.models_per_unit=25", "exp.name=flaky"]


def datamodels(args, cwd, timeout=300, flags=(), **popen):
    """The installed console script with `flags` and `args`, run from `cwd`, with no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    base = [f"exp.root={cwd}/runs", f"tracking.uri=sqlite:///{cwd}/mlflow.db"]
    cmd = [os.path.join(BIN, "datamodels"), *flags, *base, *args]
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, env=env, text=True, **popen)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("datamodels: error:")]


def test_cfg_job_runs_the_checks_of_a_run(tmp_path):
    """`--cfg job` printed a config that could not run (masks.alpha=5, exit 0); now it is the
    run's one line and exit 2, and a good config still prints."""
    bad = datamodels(["masks.alpha=5"], tmp_path, flags=["--cfg", "job"])
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert len(errors(bad.stderr)) == 1 and "masks.alpha" in bad.stderr and "Traceback" not in bad.stderr
    good = datamodels(["experiment=tiny"], tmp_path, flags=["--cfg", "job"])
    assert good.returncode == 0, good.stderr
    assert "alpha: 0.5" in good.stdout


def test_debug_gives_the_traceback_and_only_then(tmp_path):
    plain = datamodels(["masks.alpha=5"], tmp_path)
    debug = datamodels(["masks.alpha=5"], tmp_path, flags=["--debug"])
    assert plain.returncode == debug.returncode == 2
    assert "Traceback" not in plain.stderr and "Traceback" in debug.stderr
    assert errors(plain.stderr) == errors(debug.stderr) and len(errors(plain.stderr)) == 1


@pytest.mark.slow
def test_an_unexpected_error_is_one_line_with_its_secrets_redacted(tmp_path, s3_server):
    """An exception no check foresaw, raised inside the run on an S3 store given with its
    secret in the URI: one line with the error's type and --debug as the way to the
    traceback, exit 1; the secret appears nowhere (Hydra used to print the traceback and the
    overrides, the secret key in clear, which `ray job submit` keeps in the job's logs)."""
    (tmp_path / "usertask.py").write_text(USER_TASK)
    s3_server.make_bucket("unexpected")
    uri = s3_server.uri("unexpected", "runs", access_key="testing", secret_key=SECRET)
    for debug in ([], ["--debug"]):
        out = datamodels([*FLAKY, f"store.uri='{uri}'"], tmp_path, timeout=300, flags=debug)
        assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-3000:]
        assert SECRET not in out.stdout + out.stderr, (out.stdout + out.stderr)[-3000:]
        assert "Error executing job with overrides" not in out.stderr
        lines = errors(out.stderr)
        assert len(lines) == 1 and "RuntimeError" in lines[0] and "on the way" in lines[0], out.stderr[-3000:]
        assert ("Traceback" in out.stderr) == bool(debug)
        if not debug:
            assert "--debug" in lines[0]


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_the_same_command_resumes(tmp_path):
    """Ctrl-C (SIGINT to the command's process group, as a terminal sends it) during training:
    one line saying what is kept and how to resume, no traceback, exit 130; the same command
    then trains only what the ledger lacks."""
    args = ["experiment=tiny", "stage=train", "baselines.methods=[]", "train.models_per_unit=25",
            "masks.n_train=1000"]
    log = open(tmp_path / "output.txt", "w+")
    proc = datamodels(args, tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ledger = tmp_path / "runs" / "tiny-1bfbbefd37" / "ledger"        # the preset's experiment (test_pinned)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:             # the first units are written
        if ledger.is_dir() and any(p.suffix == ".parquet" for p in ledger.iterdir()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    log.seek(0)
    text = log.read()
    assert proc.returncode == 130, text[-4000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-4000:]
    said = [ln for ln in text.splitlines() if ln.startswith("datamodels: interrupted")]
    assert len(said) == 1 and "run the same command again to resume" in said[0], text[-3000:]
    again = datamodels(args, tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    m = re.search(r"train: (\d+) models to train \((\d+) already in the ledger\)", again.stdout + again.stderr)
    assert m and int(m.group(2)) > 0 and int(m.group(1)) + int(m.group(2)) == 1000 + 30 * 2, again.stderr[-3000:]
    print(f"FAULT ctrl-c: kept {m.group(2)} models, trained {m.group(1)} on resume")


@pytest.mark.slow
def test_a_training_set_smaller_than_the_trak_projection_runs_through(tmp_path):
    """task.n_train=5 with the default TRAK projection (512 > n): trained, then failed in the
    baselines stage advising a dtype already set; TRAK now takes its n×n form and is scored
    (the other methods ran through before: tests/test_attribution.py checks the n×n form)."""
    out = datamodels(["task.n_train=5", "masks.n_train=20", "masks.n_eval=5", "eval.replicas=1",
                      "baselines.methods=[trak]", "fit.prefixes=[]"], tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    table = out.stdout[out.stdout.index("method"):]
    for method in ("datamodels", "trak"):
        assert re.search(rf"^{method}\s+-?\d", table, re.M), table
