"""Models per LDS point (issue 28): what the LDS-against-models curve of an experiment says,
with today's fit and with each option measured against it, on the same eval set.

For each experiment directory given (one that has run: a ledger of M train models, its eval
set, and the baselines' scores for the prior options), the datamodels are fit on the first m
train models for m on a grid: every doubling from --first up to M, and the point between two
doublings (×√2). Each option is a way to fit them:

  lasso            today's fit (fit=torch, its defaults): what `datamodels` runs
  prior:<method>   the lasso on the residual of <method>'s scores (influence functions,
                   TRAK, ...), scaled per target by --prior-shrink times the least-squares
                   scale fitted on the fit split; the prior's part is added back to the weights
  foldover         (--foldover, trains models) half the models on the complements of the
                   first masks, with the same seeds: the antithetic (foldover) design

It prints, per experiment and option:
  - the LDS at each m of the grid;
  - the models needed to reach LDS 0.80 and 0.85, interpolated on log m between grid points
    ("> M" where the grid never reaches it), and the ratio against today's;
  - seconds per model: the mean training seconds the ledger recorded (this machine, the run's load);
  - the forecast check: the curve of orchestrator.metrics.curve fitted to the doubling points up
    to M/8 and up to M/4, its forecast of the LDS at M against the LDS measured there;
  - the GPU-hours of the CIFAR-10 job on paper (bench/RESULTS.md, issue 10: 300,000 models ×
    5.555 GPU-seconds each, an estimate) if an option's saving in models held there.

    PYTHONPATH=. python bench/budget.py runs/fmnist_mlp-6693add97e [runs/fmnist_10k-...] [--targets 1000]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orchestrator import api  # noqa: E402
from orchestrator.metrics.curve import curve_at, fit_curve, forecast  # noqa: E402
from orchestrator.metrics.lds import score_method  # noqa: E402
from workers.lasso import LassoConfig, fit_lasso, split_fit_val  # noqa: E402

CIFAR_MODELS, CIFAR_GPU_SECONDS = 300_000, 5.555     # the CIFAR-10 job on paper (estimate, bench/RESULTS.md)
GOALS = (0.80, 0.85)


def grid(first: int, M: int) -> list[int]:
    out, m = [], first
    while m <= M:
        out.append(m)
        between = int(round(m * math.sqrt(2)))
        if between < M and 2 * m > M:
            out.append(between)
        elif 2 * m <= M:
            out.append(between)
        m *= 2
    if out[-1] != M:
        out.append(M)
    return sorted(set(x for x in out if x <= M))


def lasso(X, Y, _exp, _ids):
    r = fit_lasso(X, Y, LassoConfig())
    return r.weights, r.intercept


def prior_option(method: str, shrink: float):
    def fit(X, Y, exp, targets):
        P = exp.scores(method).T[targets].astype(np.float32)          # [T, n]
        Z = X.astype(np.float32) @ P.T                                # the prior's prediction [m, T]
        cfg = LassoConfig()
        fit_idx, _ = split_fit_val(len(X), cfg.val_fraction, cfg.split_seed)
        Zc = Z[fit_idx] - Z[fit_idx].mean(0)
        Yc = Y[fit_idx] - Y[fit_idx].mean(0)
        scale = shrink * (Zc * Yc).sum(0) / np.maximum((Zc * Zc).sum(0), 1e-12)
        r = fit_lasso(X, (Y - Z * scale).astype(np.float32), cfg)
        return r.weights + scale[:, None] * P, r.intercept
    return fit


def models_to_reach(ms, lds, goal: float) -> float:
    """log-linear interpolation between the grid points around the first crossing; inf if none."""
    for i, (m, v) in enumerate(zip(ms, lds)):
        if v >= goal:
            if i == 0:
                return float(m)
            m0, v0 = ms[i - 1], lds[i - 1]
            f = (goal - v0) / (v - v0)
            return float(math.exp(math.log(m0) + f * (math.log(m) - math.log(m0))))
    return math.inf


def shown_models(x: float, M: int) -> str:
    return f"> {M}" if not math.isfinite(x) else f"{x:.0f}"


def foldover_rows(exp, d: str, X, Y, half: int):
    """The foldover design: the complements of the first `half` masks, trained with the same
    seeds (the task built as the experiment's config says), beside those first `half` models."""
    import yaml

    from orchestrator.settings.task import build_task
    from orchestrator.storage.masks import model_seed
    cfg = yaml.safe_load(open(os.path.join(d, "config.yaml")))
    task = build_task(cfg["task"])
    task.setup(cfg["train"])
    seed = int(cfg["exp"]["seed"])
    comp = ~X[:half]
    seeds = np.array([model_seed(seed, "train", i, 0) for i in range(half)])
    parts = [np.asarray(task.train(comp[a:a + 100], seeds[a:a + 100]).margins, np.float32)
             for a in range(0, half, 100)]
    return comp, np.concatenate(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--first", type=int, default=125)
    ap.add_argument("--targets", type=int, default=0, help="the first T targets only (0: all)")
    ap.add_argument("--priors", default="if_cg,trak")
    ap.add_argument("--prior-shrink", type=float, default=0.5)
    ap.add_argument("--foldover", type=int, default=0, help="train the foldover design up to this many models")
    args = ap.parse_args()
    for d in args.dirs:
        exp = api.open(d)
        Xtr, Ytr, _ = exp.ledger("train")
        Xe, Ye, _ = exp.eval_set()
        targets = np.arange(Ye.shape[1] if not args.targets else min(args.targets, Ye.shape[1]))
        Ytr, Ye = Ytr[:, targets], Ye[:, targets]
        M = len(Xtr)
        ms = grid(args.first, M)
        dm = (exp.summary.get("lds") or {}).get("datamodels") or {}
        train_seconds = float((dm.get("seconds_parts") or {}).get("training") or float("nan")) / \
            max(int(exp.summary["models"]["train"]), 1)
        print(f"\n== {d}: M = {M} train models, {len(Xe)} eval masks, {len(targets)} targets; "
              f"{train_seconds:.3f} s per model (the ledger's training seconds, summary.json)")
        options = {"lasso": lasso}
        present = exp.methods
        for method in [p for p in args.priors.split(",") if p]:
            if method in present:
                options[f"prior:{method}x{args.prior_shrink:g}"] = prior_option(method, args.prior_shrink)
        curves: dict[str, dict[int, np.ndarray]] = {}
        fit_seconds: dict[str, float] = {}
        for name, fit in options.items():
            curves[name], fit_seconds[name] = {}, 0.0
            for m in ms:
                t0 = time.perf_counter()
                W, b = fit(Xtr[:m], Ytr[:m], exp, targets)
                fit_seconds[name] += time.perf_counter() - t0
                _, per_target = score_method(Xe, Ye, np.asarray(W, np.float32), np.asarray(b, np.float32), 10, 0)
                curves[name][m] = per_target
                print(f"  {name:<18} m={m:>6}  LDS {np.nanmean(per_target):.4f}", flush=True)
        if args.foldover:
            name = "foldover"
            curves[name] = {}
            half = args.foldover // 2
            comp, Yc = foldover_rows(exp, d, Xtr, exp.ledger("train")[1], half)
            Yc = Yc[:, targets]
            for m in [x for x in ms if x <= args.foldover]:
                k = m // 2
                X = np.concatenate([Xtr[:k], comp[:k]])
                Y = np.concatenate([Ytr[:k], Yc[:k]])
                W, b = lasso(X, Y, exp, targets)
                _, curves[name][m] = score_method(Xe, Ye, W, b, 10, 0)
                print(f"  {name:<18} m={m:>6}  LDS {np.nanmean(curves[name][m]):.4f}", flush=True)

        print(f"\n  {'option':<18}" + "".join(f"{m:>8}" for m in ms))
        for name, c in curves.items():
            print(f"  {name:<18}" + "".join(f"{np.nanmean(c[m]):>8.4f}" if m in c else f"{'-':>8}" for m in ms))
        print(f"\n  {'option':<18}{'to 0.80':>10}{'ratio':>8}{'to 0.85':>10}{'ratio':>8}  CIFAR job at the 0.85 saving")
        base = {g: models_to_reach(sorted(curves["lasso"]), [np.nanmean(curves["lasso"][m]) for m in
                                                             sorted(curves["lasso"])], g) for g in GOALS}
        for name, c in curves.items():
            cm = sorted(c)
            need = {g: models_to_reach(cm, [np.nanmean(c[m]) for m in cm], g) for g in GOALS}
            ratios = {g: need[g] / base[g] if math.isfinite(need[g]) and math.isfinite(base[g]) else float("nan")
                      for g in GOALS}
            r85 = ratios[0.85]
            cifar = (f"{CIFAR_MODELS * r85:,.0f} models, {CIFAR_MODELS * r85 * CIFAR_GPU_SECONDS / 3600:,.0f} GPU-h "
                     f"(estimate)") if math.isfinite(r85) else "-"
            top = max(cm)
            print(f"  {name:<18}{shown_models(need[0.80], top):>10}{ratios[0.80]:>8.2f}"
                  f"{shown_models(need[0.85], top):>10}{r85:>8.2f}  {cifar}")
        label = os.path.basename(os.path.normpath(d)).rsplit("-", 1)[0]
        best = min(curves, key=lambda n: models_to_reach(sorted(curves[n]), [np.nanmean(curves[n][m])
                                                                            for m in sorted(curves[n])], 0.85))
        need = models_to_reach(sorted(curves[best]), [np.nanmean(curves[best][m]) for m in sorted(curves[best])], 0.85)
        print(f"\n  {label}: models to reach LDS 0.85: {shown_models(need, M)} (option {best})")

        print("\n  forecast check (doubling points, orchestrator.metrics.curve):")
        c = curves["lasso"]
        doublings = [m for m in ms if m == args.first * 2 ** int(round(math.log2(m / args.first)))]
        measured = float(np.nanmean(c[M]))
        for frac in (8, 4):
            # within 1% of M/frac: a grid from --first 188 has 1504 as a quarter of 6000
            upto = [m for m in doublings if m <= M / frac * 1.01]
            if len(upto) < 3:
                print(f"    from {M // frac} (1/{frac}): fewer than 3 doubling points ({upto}); no forecast")
                continue
            fc = forecast(upto, np.stack([c[m] for m in upto]), at=(M,), n_boot=200)
            got = fc["lds_at"][str(M)] if fc else None
            if got is None:
                print(f"    from {M // frac} (1/{frac}): no fit")
                continue
            lo, hi = got["ci95"]
            print(f"    from {upto[-1]} (1/{frac}, points {upto}): LDS at {M} forecast {got['mean']:.4f} "
                  f"[{lo:.4f}, {hi:.4f}], measured {measured:.4f}, error {got['mean'] - measured:+.4f}")
        p = fit_curve(sorted(c), [np.nanmean(c[m]) for m in sorted(c)])
        if p is not None:
            print(f"    the curve through every point: a {p[0]:.4f}, d {p[1]:.1f}, c {p[2]:.3f}; "
                  f"LDS at 2M {float(curve_at(p, 2 * M)):.4f}, at 4M {float(curve_at(p, 4 * M)):.4f}")
        print("  fit seconds per option (the whole grid, this process): " +
              ", ".join(f"{k} {v:.0f}" for k, v in fit_seconds.items()))


if __name__ == "__main__":
    main()
