"""Every GPU path in one device lease (issue 28): models/h and a check of each against its CPU
or eager reference, under a time budget (default 7 minutes, so that it fits 8 minutes of
device time with the start-up).

  1. train, datamodels recipe (24 epochs), batched engine k=8: models/h (bench/train_gpu.measure:
     warm-up, 1- and 2-epoch units, extrapolated)
  2. train, the same with the CUDA graph (cuda_graph=true), after a check that one short unit's
     margins agree with the eager step's
  3. train, the fast recipe (conf/train/resnet9_fast.yaml: 16 epochs, peak at epoch 4) with
     the CUDA graph: models/h
  4. fit: the batched lasso on the GPU against the CPU on a small planted problem (same λ, the
     same weights to 1e-3; bench/fit_gpu.check), then 1,000 targets x 5,000 examples x 10,000
     masks timed
  5. baselines: every attribution method, with its shipped settings, on a small MLP task on
     the GPU against the CPU (Spearman of the scores per target)

Data are synthetic CIFAR-10-shaped images (bench/train_gpu.synthetic_cifar). Each part prints
one line; a part that fails prints why and the others still run. `--device cpu --quick` is a
dry run of the script itself at toy sizes (no GPU figure means anything then).

    PYTHONPATH=. python bench/gpu_check.py                    # on a GPU
    PYTHONPATH=. python bench/gpu_check.py --device cpu --quick
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_gpu import measure, synthetic_cifar  # noqa: E402

from workers.models import build_model, forward_flops  # noqa: E402
from workers.train import TrainConfig, Trainer  # noqa: E402

DATAMODELS = dict(epochs=24, batch_size=512, lr=0.5, lr_peak_epoch=5, label_smoothing=0.1, flip=True,
                  translate=2, cutout=4, precision="bf16", channels_last=True)
FAST = {**DATAMODELS, "epochs": 16, "lr_peak_epoch": 4}      # conf/train/resnet9_fast.yaml


def part(name: str, fn, results: dict, deadline: float) -> None:
    if time.perf_counter() > deadline:
        print(f"{name}: not run (the time budget is spent)", flush=True)
        results[name] = "not run"
        return
    t0 = time.perf_counter()
    try:
        out = fn()
        results[name] = out
        print(f"{name}: {out} ({time.perf_counter() - t0:.0f} s)", flush=True)
    except Exception as err:  # noqa: BLE001 - a failing part is reported, the others still run
        results[name] = f"FAILED: {type(err).__name__}: {err}"
        print(f"{name}: FAILED {type(err).__name__}: {err}", flush=True)
        traceback.print_exc()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="toy sizes (a dry run of the script)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; parts not started by then are skipped")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    t_start = time.perf_counter()
    deadline = t_start + args.budget
    dev = args.device
    gpu = dev.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; run it on a GPU, or --device cpu --quick for a dry run")
    print(f"# torch {torch.__version__}, device {torch.cuda.get_device_name() if gpu else 'cpu'}", flush=True)
    n, t, width = (400, 100, 0.125) if args.quick else (50_000, 10_000, 1.0)
    data = synthetic_cifar(n, t, 32)
    model_cfg = {"name": "resnet9", "width": width}
    fwd = forward_flops(build_model(model_cfg, (3, 32, 32), 10), (3, 32, 32))
    rng = np.random.default_rng(0)
    masks = np.zeros((8, n), bool)
    for j in range(8):
        masks[j, rng.permutation(n)[: n // 2]] = True
    quick = {"batch_size": 64, "precision": "fp32", "channels_last": False} if args.quick else {}
    results: dict = {}

    def log(s):
        pass                                      # measure() logs its row; the part's line says it

    def train_rate(recipe, k, graph):
        cfg = TrainConfig(**{**recipe, **quick}, engine="batched", models_per_step=k, device=dev,
                          cuda_graph=graph and gpu)
        row = measure("check", model_cfg, cfg, data, k, masks, fwd, log)
        return f"{row['models_per_hour']:.0f} models/h ({row['s_per_model_24ep']:.2f} s a model at " \
               f"{recipe['epochs']} epochs, k={k}, target acc after 2 epochs {row['target_acc_2ep']:.3f})"

    def graph_check():
        short = {**DATAMODELS, **quick, "epochs": 1}
        r = [Trainer(model_cfg, TrainConfig(**short, models_per_step=1, device=dev, cuda_graph=g and gpu), *data)
             .train(masks[:1], np.arange(1)) for g in (False, True)]
        diff = float(np.abs(r[0].margins - r[1].margins).max())
        scale = float(np.abs(r[0].margins).mean())
        ok = diff <= 0.05 * max(scale, 1e-6)
        return f"{'ok' if ok else 'DIFFERS'}: max |margin diff| {diff:.3g} against a margin scale {scale:.3g}"

    def fit_check():
        import fit_gpu

        from workers.lasso import LassoConfig, fit_lasso
        from workers.lasso.synthetic import make_planted
        if gpu:
            fit_gpu.check()                 # raises if the GPU fit disagrees with the CPU's
        T, nn_, m = (64, 500, 1000) if args.quick else (1000, 5000, 10_000)
        P, Y, W = make_planted(m, nn_, T, k=20, seed=0)
        if gpu:
            P, Y = P.cuda(), Y.cuda()
        t0 = time.perf_counter()
        r = fit_lasso(P, Y, LassoConfig(backend="torch", device=dev), n=nn_)
        if gpu:
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        corr = float(np.corrcoef(r.weights.ravel(), W.cpu().numpy().T.ravel())[0, 1])   # W: [n, T]
        return ("CPU check passed; " if gpu else "") + \
            f"{T} targets x {nn_} examples x {m} masks in {secs:.1f} s ({T / secs:.0f} targets/s), " \
            f"planted weights recovered: correlation {corr:.3f}"

    def baselines_check():
        from scipy.stats import spearmanr

        from workers.attribution import METHODS, compute_scores
        torch.manual_seed(0)
        d, C = 20, 4
        x = torch.randn(300, d)
        y = (x[:, :C].argmax(1)).long()
        xt, yt = torch.randn(40, d), None
        yt = (xt[:, :C].argmax(1)).long()

        def mlp():
            return torch.nn.Sequential(torch.nn.Linear(d, 16), torch.nn.ReLU(), torch.nn.Linear(16, C))
        cks = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            net = mlp()
            opt = torch.optim.SGD(net.parameters(), lr=0.1)
            for _ in range(100):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(x), y).backward()
                opt.step()
            cks.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        from orchestrator.settings.schema import BaselinesConf
        params = BaselinesConf().params                       # the shipped settings of each method
        params["trak"] = {**params["trak"], "proj_dim": 64}
        out = []
        for method in sorted(METHODS):
            p = {**params.get(method, {}), "seed": 0}
            sc = compute_scores(method, mlp, cks, x, y, xt, yt, {**p, "device": "cpu"})
            sg = compute_scores(method, mlp, cks, x, y, xt, yt, {**p, "device": dev})
            rho = np.nanmean([spearmanr(sc[:, j], sg[:, j])[0] for j in range(sc.shape[1])])
            out.append(f"{method} {rho:.4f}")
        return "Spearman GPU vs CPU per target: " + ", ".join(out)

    part("train datamodels recipe, batched k=8", lambda: train_rate(DATAMODELS, 8, False), results, deadline)
    part("CUDA graph against the eager step", graph_check, results, deadline)
    part("train datamodels recipe, batched k=8 + CUDA graph", lambda: train_rate(DATAMODELS, 8, True), results,
         deadline)
    part("train fast recipe (16 epochs), k=8 + CUDA graph", lambda: train_rate(FAST, 8, True), results, deadline)
    part("fit", fit_check, results, deadline)
    part("baselines", baselines_check, results, deadline)
    print(f"# {time.perf_counter() - t_start:.0f} s in all", flush=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
