"""CPU training throughput: the naive path against the engine, same config, same run.

(a) naive: one model per Ray task in a FRESH worker process (@ray.remote(max_calls=1)),
    data shipped to the task, host torch DataLoader (workers.train_reference.naive_train_one);
(b) engine: one persistent Ray actor per CPU, each holding a Trainer (data resident),
    training units of masks with the batched engine.
Both train the same (mask, seed) pairs for the first `--naive-models` models, so their
mean target accuracy must agree. Also measured in-process (no Ray): models/s of the
single and batched engines with 1 (and 2) torch threads, and with --ffcv (needs the
optional extra) the same engines streaming from a .beton instead of resident data.

The arithmetic rate: each in-process engine's GFLOP/s (conv/linear FLOPs, forward_flops x 3
per training example-step plus evaluation) as a fraction of this machine's matmul peak with
the same thread count, measured here: float32 square GEMM (best of sizes 256-2048), and the
batched GEMMs of the engine's own shapes (torch.bmm of k models x batch x layer, forward,
grad-input and grad-weight). The gap between the two peaks is what the small shapes cost;
the gap between the shapes' rate and the engine's is what the rest of a step (elementwise
ops, the optimizer, batch gathering, evaluation) costs.

Default network: the CPU demo MLP (784 -> 64 -> 10), 10 epochs, batch 100, lr 0.1, on
Fashion-MNIST (1 000 training examples, alpha = 0.5, 200 targets) if present, else digits.

    RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=. python bench/train_throughput.py

--preset: the shipped CPU preset (conf/train/cpu.yaml) on one thread, the engine's step as it
is against the step before issue 28 (autograd's own backward for the grouped linear layers,
whose weight gradient is copied into the weight's layout each step, and the multi-tensor SGD)
and against "whole" (torch's fused SGD over each whole [k*...] parameter, which the engine ran
before it split the update per copy for bit-identical retraining), alternating in this
process, best of 3 each; the rate as a fraction of the GEMM peak and of
the preset's k-shape bmm, measured in the same process; then where a step's time goes
(torch profiler, self time per op), as it is now.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from workers.models import build_model, forward_flops  # noqa: E402
from workers.train import TrainConfig, Trainer  # noqa: E402
from workers.train_reference import naive_train_one  # noqa: E402


def load(n: int, t: int):
    from workers.data import load_dataset, select
    name = "fashion_mnist" if os.path.isdir("/usr/share/datasets/fashion-mnist") else "digits"
    ds = load_dataset(name)
    x, y, xt, yt = select(ds, n, t, seed=0)
    return name, x, y, xt, yt


def exact_masks(count: int, n: int, m: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros((count, n), bool)
    for j in range(count):
        masks[j, rng.permutation(n)[:m]] = True
    return masks


def flops_per_model(model_cfg, in_shape, cfg: TrainConfig, m: int, t: int) -> float:
    """Conv/linear FLOPs of one model: 3 x forward per training example-step, plus evaluation."""
    fwd = forward_flops(build_model(model_cfg, in_shape, 10), in_shape)
    bs = min(cfg.batch_size, m)
    return 3 * fwd * bs * (m // bs) * cfg.epochs + fwd * (m + t)


def _best_seconds(fn, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(threads: int) -> float:
    """GFLOP/s of float32 square GEMM with `threads` torch threads: the best over sizes."""
    torch.set_num_threads(threads)
    best = 0.0
    for size in (256, 512, 1024, 2048):
        a, b = torch.randn(size, size), torch.randn(size, size)
        out = torch.empty(size, size)
        sec = _best_seconds(lambda a=a, b=b, out=out: torch.mm(a, b, out=out), reps=3 if size >= 2048 else 5)
        best = max(best, 2 * size ** 3 / sec / 1e9)
    return best


def shape_rate(threads: int, k: int, batch: int, widths: list[int]) -> float:
    """GFLOP/s of the engine's batched GEMMs for k models, a batch and layer widths
    (in, hidden..., out): forward x W, grad-input g Wᵀ and grad-weight xᵀ g per layer."""
    torch.set_num_threads(threads)
    mats = []
    for i, o in zip(widths[:-1], widths[1:]):
        x, w, g = torch.randn(k, batch, i), torch.randn(k, i, o), torch.randn(k, batch, o)
        mats.append((x, w, g))

    def step():
        for x, w, g in mats:
            torch.bmm(x, w)
            torch.bmm(g, w.transpose(1, 2))
            torch.bmm(x.transpose(1, 2), g)
    flops = sum(3 * 2 * k * batch * x.shape[2] * w.shape[2] for x, w, _ in mats)
    return flops / _best_seconds(step, reps=20) / 1e9


def arithmetic_report(rows, fpm: float, batch: int, widths: list[int]) -> None:
    """Each in-process engine's GFLOP/s against the measured peaks, per thread count."""
    print("\narithmetic rate (conv/linear FLOPs) against this machine's measured float32 peaks:")
    print(f"{'threads':>7} {'engine':<8} {'k':>3} {'GFLOP/s':>8} {'GEMM peak':>10} {'of peak':>8} "
          f"{'k-shape bmm':>12} {'of shape':>9}")
    peaks = {t: matmul_peak(t) for t in sorted({r[0] for r in rows})}
    for threads, engine, k, rate, _ in rows:
        achieved = rate * fpm / 1e9
        shaped = shape_rate(threads, k, batch, widths)
        print(f"{threads:>7} {engine:<8} {k:>3} {achieved:>8.2f} {peaks[threads]:>10.1f} "
              f"{achieved / peaks[threads]:>8.3f} {shaped:>12.1f} {achieved / shaped:>9.3f}")
    torch.set_num_threads(1)


def in_process(model_cfg, cfg, data, masks, seeds, thread_counts):
    """models/s of the engines in this process, per torch thread count."""
    x, y, xt, yt = data
    rows = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for engine, k in (("single", 1), ("batched", 1), ("batched", 4), ("batched", 16), ("batched", 64)):
            tc = TrainConfig(**{**cfg.__dict__, "engine": engine, "models_per_step": k})
            tr = Trainer(model_cfg, tc, x, y, xt, yt)
            tr.train(masks[:2], seeds[:2])  # warm-up
            count = 64 if engine == "batched" and k > 1 else 32
            best = float("inf")
            for _ in range(2):  # best of 2: the machine is shared
                t0 = time.perf_counter()
                res = tr.train(masks[:count], seeds[:count])
                best = min(best, time.perf_counter() - t0)
            rows.append((threads, engine, k, count / best, float(res.target_acc.mean())))
            print(f"  in-process threads={threads} engine={engine:<7} k={k:<3} {count / best:7.1f} models/s  "
                  f"target acc {res.target_acc.mean():.3f}", flush=True)
    return rows


def ffcv_in_process(model_cfg, cfg, data, masks, seeds, directory):
    """models/s with train.loader=ffcv against the resident loader, same process, 1 thread."""
    x, y, xt, yt = data
    torch.set_num_threads(1)
    for loader in ("resident", "ffcv"):
        for engine, k in (("single", 1), ("batched", 4), ("batched", 16)):
            tc = TrainConfig(**{**cfg.__dict__, "engine": engine, "models_per_step": k, "loader": loader,
                                "ffcv_dir": directory, "ffcv_workers": 1})
            t0 = time.perf_counter()
            tr = Trainer(model_cfg, tc, x, y, xt, yt)
            tr.train(masks[:k], seeds[:k])  # warm-up: .beton written once, loaders compiled
            warm = time.perf_counter() - t0
            count = 32
            t0 = time.perf_counter()
            res = tr.train(masks[:count], seeds[:count])
            wall = time.perf_counter() - t0
            print(f"  in-process loader={loader:<8} engine={engine:<7} k={k:<3} {count / wall:7.1f} models/s  "
                  f"target acc {res.target_acc.mean():.3f}  (set-up + first unit {warm:.1f} s)", flush=True)


@contextlib.contextmanager
def step_before_issue28():
    """The training step as it was before issue 28, for the same-process comparison."""
    from workers import models
    from workers.train_parts import Recipe

    def forward(self, x):
        if self.groups == 1 and x.dim() == 2:
            return F.linear(x, self.weight, self.bias)
        k, o = self.groups, self.out_features
        w = self.weight.view(k, o, self.in_features).transpose(1, 2)
        return torch.baddbmm(self.bias.view(k, 1, o), x, w)

    saved = models.GroupedLinear.forward, Recipe.optimizer
    models.GroupedLinear.forward, Recipe.optimizer = forward, _plain_sgd(foreach=True)
    try:
        yield
    finally:
        models.GroupedLinear.forward, Recipe.optimizer = saved


def _plain_sgd(**kw):
    """Recipe.optimizer as torch's SGD over whole parameters, with `kw` (foreach or fused)."""
    def optimizer(self, params, lr=None, copies=1):
        c = self.cfg
        return torch.optim.SGD(params, lr=0.0 if lr is None else lr, momentum=c.momentum,
                               weight_decay=c.weight_decay, nesterov=c.nesterov and c.momentum > 0, **kw)
    return optimizer


@contextlib.contextmanager
def step_whole_tensor_sgd():
    """The step of the first issue-28 change: torch's fused SGD over each whole [k*...]
    parameter, which rounds the copy in the kernel's tail otherwise (CopywiseSGD)."""
    from workers.train_parts import Recipe
    saved = Recipe.optimizer
    Recipe.optimizer = _plain_sgd(fused=True)
    try:
        yield
    finally:
        Recipe.optimizer = saved


def preset_report(model_cfg, data, n: int, alpha: float, t: int) -> None:
    """The shipped CPU preset on one thread: the step now against the step before issue 28."""
    from omegaconf import OmegaConf
    x, y, xt, yt = data
    here = os.path.dirname(os.path.abspath(__file__))
    preset = OmegaConf.to_container(OmegaConf.load(os.path.join(here, "..", "conf", "train", "cpu.yaml")))
    cfg = TrainConfig(**{k: v for k, v in preset.items() if k in TrainConfig.__dataclass_fields__})
    k, m = cfg.models_per_step, round(alpha * n)
    count = 2 * k
    masks, seeds = exact_masks(count, n, m), np.arange(count, dtype=np.int64) + 1000
    fpm = flops_per_model(model_cfg, x.shape[1:], cfg, m, t)
    torch.set_num_threads(1)
    print(f"shipped CPU preset {preset}: k {k}, {fpm / 1e9:.2f} GFLOP per model, {count} models per timing, "
          f"1 thread", flush=True)
    widths = [int(np.prod(x.shape[1:])), *model_cfg["hidden"], 10]
    peaks = [(matmul_peak(1), shape_rate(1, k, min(cfg.batch_size, m), widths))]  # again after: the best
    steps = {"before": step_before_issue28, "whole": step_whole_tensor_sgd, "now": contextlib.nullcontext}
    trainers = {}
    for label, step in steps.items():
        with step():
            trainers[label] = Trainer(model_cfg, cfg, x, y, xt, yt)
            trainers[label].train(masks[:k], seeds[:k])  # warm-up
    best = dict.fromkeys(steps, float("inf"))
    margins = {}
    for _ in range(3):                 # alternating: the machine is shared
        for label, step in steps.items():
            with step():
                t0 = time.perf_counter()
                margins[label] = trainers[label].train(masks, seeds).margins
                best[label] = min(best[label], time.perf_counter() - t0)
    peaks.append((matmul_peak(1), shape_rate(1, k, min(cfg.batch_size, m), widths)))
    torch.set_num_threads(1)
    peak, shaped = max(p for p, _ in peaks), max(r for _, r in peaks)
    print(f"peaks before and after the timings: GEMM {peaks[0][0]:.1f}, {peaks[1][0]:.1f}; "
          f"k-shape bmm {peaks[0][1]:.1f}, {peaks[1][1]:.1f} GFLOP/s (the best of each is used)")
    print(f"{'step':<8}{'models/s':>9}{'GFLOP/s':>9}{'GEMM peak':>10}{'of peak':>8}{'k-shape bmm':>12}{'of shape':>9}")
    for label in steps:
        rate = count / best[label] * fpm / 1e9
        print(f"{label:<8}{count / best[label]:>9.2f}{rate:>9.2f}{peak:>10.1f}{rate / peak:>8.3f}{shaped:>12.1f}"
              f"{rate / shaped:>9.3f}")
    diff = float(np.abs(margins["now"] - margins["before"]).max())
    print(f"speed-up now / before: {best['before'] / best['now']:.2f}x; margins now vs before: max |diff| {diff:.2e}")
    print(f"now (fused SGD per copy) / whole (fused SGD per whole parameter): {best['whole'] / best['now']:.3f}x "
          f"speed; margins max |diff| {float(np.abs(margins['now'] - margins['whole']).max()):.2e}")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainers["now"].train(masks[:k], seeds[:k])
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print("where a step's time goes now (self time, top ops):")
    for e in events[:8]:
        print(f"  {e.key:<36}{100 * e.self_cpu_time_total / total:6.1f}%")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--targets", type=int, default=200)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--naive-models", type=int, default=40)
    ap.add_argument("--engine-models", type=int, default=4096)
    ap.add_argument("--unit", type=int, default=64, help="models per work unit sent to an actor")
    ap.add_argument("--models-per-step", type=int, default=16)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--skip-in-process", action="store_true")
    ap.add_argument("--in-process-only", action="store_true", help="the engines and the peaks, no Ray part")
    ap.add_argument("--ffcv", action="store_true", help="also time train.loader=ffcv (optional extra)")
    ap.add_argument("--preset", action="store_true",
                    help="the shipped CPU preset: the step now against the step before issue 28, then stop")
    ap.add_argument("--ffcv-only", action="store_true", help="only the --ffcv comparison, then stop")
    ap.add_argument("--threads", default="1,2",
                    help="torch thread counts for the in-process part (2 threads on a loaded 2-core "
                         "machine oversubscribes OpenMP and collapses)")
    args = ap.parse_args()

    import ray

    name, x, y, xt, yt = load(args.n, args.targets)
    model_cfg = {"name": "mlp", "hidden": [64]}
    cfg = TrainConfig(epochs=10, batch_size=100, lr=0.1, lr_peak_epoch=2, device="cpu",
                      models_per_step=args.models_per_step)
    m = round(args.alpha * args.n)
    total_models = max(args.engine_models, args.naive_models)
    masks = exact_masks(total_models, args.n, m)
    seeds = np.arange(total_models, dtype=np.int64) + 1000
    fpm = flops_per_model(model_cfg, x.shape[1:], cfg, m, args.targets)
    print(f"data {name}: n={args.n}, m={m} per model, T={args.targets}; model {model_cfg}; "
          f"{cfg.epochs} epochs, batch {cfg.batch_size}; {fpm / 1e9:.2f} GFLOP per model", flush=True)

    if args.preset:
        preset_report(model_cfg, (x, y, xt, yt), args.n, args.alpha, args.targets)
        return
    if args.ffcv or args.ffcv_only:
        import tempfile
        print("in-process, resident data vs FFCV .beton (1 thread):", flush=True)
        with tempfile.TemporaryDirectory() as d:
            ffcv_in_process(model_cfg, cfg, (x, y, xt, yt), masks, seeds, d)
        if args.ffcv_only:
            return
    if not args.skip_in_process:
        print("in-process engine throughput (no Ray):", flush=True)
        rows = in_process(model_cfg, cfg, (x, y, xt, yt), masks, seeds, [int(t) for t in args.threads.split(",")])
        widths = [int(np.prod(x.shape[1:])), *model_cfg["hidden"], 10]
        arithmetic_report(rows, fpm, min(cfg.batch_size, m), widths)
        torch.set_num_threads(1)
        if args.in_process_only:
            return

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        xr, yr, xtr, ytr = (ray.put(a) for a in (x, y, xt, yt))

        # ---------------------------------------------------------------- (a) naive
        @ray.remote(num_cpus=1, max_calls=1)
        def naive_task(x, y, xt, yt, mask, seed):
            torch.set_num_threads(1)
            r = naive_train_one(model_cfg, cfg, x, y, xt, yt, mask, seed)
            return float(r.target_acc[0]), os.getpid()

        t0 = time.perf_counter()
        out = ray.get([naive_task.remote(xr, yr, xtr, ytr, masks[j], seeds[j])
                       for j in range(args.naive_models)])
        naive_wall = time.perf_counter() - t0
        naive_acc = np.array([a for a, _ in out])
        pids = len({p for _, p in out})

        # ---------------------------------------------------------------- (b) engine
        @ray.remote(num_cpus=1)
        class TrainActor:
            def __init__(self, x, y, xt, yt):
                torch.set_num_threads(1)
                self.trainer = Trainer(model_cfg, cfg, x, y, xt, yt)

            def train(self, masks, seeds):
                r = self.trainer.train(masks, seeds)
                return r.target_acc

        t0 = time.perf_counter()
        actors = [TrainActor.remote(xr, yr, xtr, ytr) for _ in range(args.cpus)]
        ray.get([a.train.remote(masks[:1], seeds[:1]) for a in actors])  # started and warm
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        futs = []
        for u, a in enumerate(range(0, args.engine_models, args.unit)):
            futs.append(actors[u % len(actors)].train.remote(masks[a:a + args.unit], seeds[a:a + args.unit]))
        eng_acc = np.concatenate(ray.get(futs))
        engine_wall = time.perf_counter() - t0
    finally:
        ray.shutdown()

    naive_rate = args.naive_models / naive_wall
    engine_rate = args.engine_models / engine_wall
    engine_rate_setup = args.engine_models / (engine_wall + setup)
    same = eng_acc[:args.naive_models]
    print()
    print(f"{'path':<44}{'models':>7}{'wall s':>9}{'models/h':>11}{'GFLOP/s':>9}{'target acc':>11}")
    print(f"{'(a) naive: fresh process per model (Ray)':<44}{args.naive_models:>7}{naive_wall:>9.1f}"
          f"{3600 * naive_rate:>11.0f}{fpm * naive_rate / 1e9:>9.2f}{naive_acc.mean():>11.4f}")
    print(f"{'(b) engine: persistent actors, batched':<44}{args.engine_models:>7}{engine_wall:>9.1f}"
          f"{3600 * engine_rate:>11.0f}{fpm * engine_rate / 1e9:>9.2f}{eng_acc.mean():>11.4f}")
    print(f"    engine, same {args.naive_models} (mask, seed) pairs as (a): target acc {same.mean():.4f}; "
          f"max |acc diff| per model {np.abs(same - naive_acc).max():.4f}")
    print(f"    engine incl. actor start + data load ({setup:.1f} s): "
          f"{3600 * engine_rate_setup:.0f} models/h")
    print(f"    naive used {pids} worker processes for {args.naive_models} models")
    print(f"speed-up engine / naive: {engine_rate / naive_rate:.1f}x "
          f"({engine_rate_setup / naive_rate:.1f}x including the engine's start-up)")


if __name__ == "__main__":
    main()
