"""A Hydra launcher that runs the points of a sweep at once, each as its own driver.

`datamodels -m masks.alpha=0.25,0.5,0.75` starts one `python -m orchestrator <point>`
process per point (at most `hydra.launcher.max_parallel` at a time; all by default). Under
`ray job submit` they join the job's cluster (RAY_ADDRESS); on a laptop they join one local
instance started here. Every point has its own experiment in the store and its own MLflow
parent run, and the cluster's scheduler shares its workers between them. A point's output
is relayed line by line with a `[point i]` prefix; a point that fails does not stop the
others, and the sweep then ends with one line naming those that failed.
"""

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.plugins.launcher import Launcher

log = logging.getLogger(__name__)


@dataclass
class ParallelLauncherConf:
    _target_: str = "hydra_plugins.datamodels_launcher.ParallelLauncher"
    max_parallel: int | None = None     # points running at once; null = all of them


ConfigStore.instance().store(group="hydra/launcher", name="parallel", node=ParallelLauncherConf,
                             provider="datamodels")


class ParallelLauncher(Launcher):
    def __init__(self, max_parallel: int | None = None) -> None:
        super().__init__()
        self.max_parallel = max_parallel
        self.config: Any = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config = config

    def _command(self, overrides: Sequence[str], run_dir: str) -> list[str]:
        hydra = self.config.hydra
        args = [sys.executable, "-m", "orchestrator"]
        for src in hydra.runtime.config_sources:
            if src.provider == "command-line" and src.schema == "file":
                args.append(f"--config-dir={src.path}")
        if hydra.job.config_name and hydra.job.config_name != "config":
            args.append(f"--config-name={hydra.job.config_name}")
        return args + list(overrides) + [f"hydra.run.dir={run_dir}"]

    def _ray_address(self) -> str:
        """Where the points' drivers join Ray: the job's cluster, or one local instance."""
        if os.environ.get("RAY_ADDRESS") or self.config.cluster.get("address"):
            return self.config.cluster.get("address") or os.environ["RAY_ADDRESS"]
        from orchestrator.scheduling import cluster as raycluster
        raycluster.connect(self.config.cluster)
        import ray
        return ray.get_runtime_context().gcs_address

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        sweep_dir = str(self.config.hydra.sweep.dir)
        os.makedirs(sweep_dir, exist_ok=True)
        address = self._ray_address()
        env = dict(os.environ, RAY_ADDRESS=address)
        limit = self.max_parallel or len(job_overrides)
        points = list(enumerate(job_overrides, start=initial_job_idx))
        varied = _varied(job_overrides)
        from orchestrator.pipeline import SWEEP_ID_ENV, SWEEP_POINT_ENV
        env[SWEEP_ID_ENV] = os.path.basename(os.path.normpath(sweep_dir))
        print(f"sweep: {len(points)} points, {min(limit, len(points))} at a time, on Ray at {env['RAY_ADDRESS']}",
              flush=True)
        for idx, overrides in points:
            print(f"  [point {idx}] {_shown(overrides)}", flush=True)
        running: dict[int, tuple[subprocess.Popen, threading.Thread, float]] = {}
        results: dict[int, tuple[int, float, float]] = {}
        queue = list(points)
        while queue or running:
            while queue and len(running) < limit:
                idx, overrides = queue.pop(0)
                run_dir = os.path.join(sweep_dir, str(idx))
                point = {k: v for k, v in _pairs(overrides).items() if k in varied}
                proc = subprocess.Popen(self._command(overrides, run_dir),
                                        env=dict(env, **{SWEEP_POINT_ENV: json.dumps(point)}), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, bufsize=1)
                relay = threading.Thread(target=_relay, args=(proc, f"[point {idx}] "), daemon=True)
                relay.start()
                running[idx] = (proc, relay, time.time())
            for idx, (proc, relay, t0) in list(running.items()):
                if proc.poll() is not None:
                    relay.join()
                    results[idx] = (proc.returncode, t0, time.time())
                    del running[idx]
            time.sleep(0.2)
        returns, failed = [], []
        for idx, overrides in points:
            rc, t0, t1 = results[idx]
            if rc != 0:
                failed.append(f"point {idx} ({_shown(overrides)}) exit {rc}")
            print(f"sweep: point {idx} {'finished' if rc == 0 else 'FAILED'} in {t1 - t0:.0f} s "
                  f"(start {time.strftime('%H:%M:%S', time.localtime(t0))}, "
                  f"end {time.strftime('%H:%M:%S', time.localtime(t1))})", flush=True)
            returns.append(JobReturn(overrides=list(overrides), cfg=None, hydra_cfg=None,
                                     working_dir=os.path.join(sweep_dir, str(idx)), task_name="datamodels",
                                     status=JobStatus.COMPLETED, _return_value=rc))
        if failed:
            print(f"datamodels: error: sweep: {len(failed)} of {len(points)} points failed: {'; '.join(failed)}",
                  file=sys.stderr, flush=True)
            sys.exit(1)
        return returns


def _pairs(overrides: Sequence[str]) -> dict[str, str]:
    """{key: value} of a point's overrides, credentials in URIs redacted."""
    from orchestrator.uris import redact
    out = {}
    for o in filter_overrides(overrides):
        if "=" in o:
            key, value = o.split("=", 1)
            out[key] = redact(value) if "://" in value else value
    return out


def _varied(job_overrides: Sequence[Sequence[str]]) -> list[str]:
    """The keys whose value differs between the points of the sweep."""
    pairs = [_pairs(o) for o in job_overrides]
    keys = dict.fromkeys(k for p in pairs for k in p)
    return [k for k in keys if len({p.get(k) for p in pairs}) > 1]


def _shown(overrides: Sequence[str]) -> str:
    """A point's overrides for people: credentials in URIs redacted."""
    from orchestrator.uris import redact
    return " ".join(redact(o) if "://" in o else o for o in filter_overrides(overrides))


def _relay(proc: subprocess.Popen, prefix: str) -> None:
    for line in proc.stdout:  # type: ignore[union-attr]  # started with stdout=PIPE
        sys.stdout.write(prefix + line)
        sys.stdout.flush()
