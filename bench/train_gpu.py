"""GPU training throughput: datamodels ResNet-9 on CIFAR-10-shaped data, single vs batched engine.

Data: 50 000 synthetic uint8 32x32 RGB images with class-dependent patterns (a smooth
random template per class plus noise), 10 000 targets; masks at alpha = 0.5 (25 000).
Recipe: the datamodels one (24 epochs, batch 512, lr 0.5 triangular peak epoch 5,
momentum 0.9 Nesterov, wd 5e-4, label smoothing 0.1, flip + translate 2 + cutout 4, bf16
autocast, channels_last).

To fit a short device lease, each configuration trains for 1 epoch and for 2 epochs (after
a warm-up unit) and extrapolates: t(24) = t(1) + 23 * (t(2) - t(1)); t(1) includes the
evaluation (targets + the model's own 25 000 training examples). Printed per configuration:
models/hour, seconds per model, fraction of the 1.31 s lower bound
(3 x 0.583 GFLOP x 25 000 x 24 / 800e12), achieved TFLOP/s (conv + linear FLOPs, training
3x forward plus evaluation forward) and peak memory per model.

    PYTHONPATH=. python3 bench/train_gpu.py                 # on a GPU
    PYTHONPATH=. python3 bench/train_gpu.py --quick         # tiny CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from workers.models import build_model, forward_flops
from workers.train import TrainConfig, Trainer

BOUND_S = 3 * 0.583e9 * 25_000 * 24 / 800e12


def synthetic_cifar(n: int, t: int, hw: int, seed: int = 0):
    """uint8 images [n+t, 3, hw, hw]: per-class smooth template (upsampled 4x4 noise) + noise."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(10, 3, 4, 4, generator=g)
    templates = torch.nn.functional.interpolate(templates, size=(hw, hw), mode="bilinear", align_corners=False)
    y = torch.randint(0, 10, (n + t,), generator=g)
    x = (templates[y] * 180 + 40 + torch.randn(n + t, 3, hw, hw, generator=g) * 40).clamp(0, 255)
    x = x.to(torch.uint8).numpy()
    y = y.numpy().astype(np.int64)
    return x[:n], y[:n], x[n:], y[n:]


def measure(name, model_cfg, cfg, data, k, masks, fwd_flops, log):
    """Warm-up, then 1-epoch and 2-epoch units of k models; extrapolate to cfg.epochs."""
    x, y, xt, yt = data
    epochs = cfg.epochs
    cuda = torch.cuda.is_available()
    tr = Trainer(model_cfg, cfg, x, y, xt, yt)
    base = torch.cuda.memory_allocated() if cuda else 0
    seeds = np.arange(k)
    tr.cfg.epochs = 1
    t = time.perf_counter()
    tr.train(masks[:k], seeds)  # warm-up (cudnn autotune, compile)
    if cuda:
        torch.cuda.synchronize()
    warm = time.perf_counter() - t
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = {}
    res = None
    for e in (1, 2):
        tr.cfg.epochs = e
        t = time.perf_counter()
        res = tr.train(masks[:k], seeds + 100 * e)
        if cuda:
            torch.cuda.synchronize()
        times[e] = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() - base) if cuda else 0
    per_epoch = times[2] - times[1]
    total = times[1] + (epochs - 1) * per_epoch
    m = int(masks[0].sum())
    bs = min(cfg.batch_size, m)
    steps = m // bs
    flops = k * (3 * fwd_flops * bs * steps * epochs + fwd_flops * (m + len(xt)))
    per_model = total / k
    row = {
        "config": name, "k": k, "warmup_s": round(warm, 2), "t1_s": round(times[1], 3), "t2_s": round(times[2], 3),
        "epoch_s": round(per_epoch, 3), "s_per_model_24ep": round(per_model, 3),
        "models_per_hour": round(3600 / per_model, 1), "frac_of_bound": round(BOUND_S / per_model, 3),
        "tflops": round(flops / total / 1e12, 1), "mem_per_model_GiB": round(peak / k / 2**30, 3),
        "target_acc_2ep": round(float(res.target_acc.mean()), 3),
    }
    log(json.dumps(row))
    del tr
    if cuda:
        torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
    ap.add_argument("--ks", default="1,8,32", help="models per step for the batched engine")
    ap.add_argument("--compile-ks", default="8", help="k values also run with torch.compile ('' = none)")
    ap.add_argument("--nchw-ks", default="8", help="k values also run without channels_last ('' = none)")
    ap.add_argument("--budget", type=float, default=420.0, help="stop starting configurations after this many s")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    t_start = time.perf_counter()
    logf = open(os.path.join(args.out, "train_gpu_log.jsonl"), "a")

    def log(s):
        print(s, flush=True)
        logf.write(s + "\n")
        logf.flush()

    if args.quick:
        n, t, hw, width = 400, 100, 32, 0.125
        cfg = dict(epochs=24, batch_size=64, lr=0.5, lr_peak_epoch=5, label_smoothing=0.1, flip=True,
                   translate=2, cutout=4, precision="fp32", channels_last=False, device="cpu")
    else:
        n, t, hw, width = 50_000, 10_000, 32, 1.0
        cfg = dict(epochs=24, batch_size=512, lr=0.5, lr_peak_epoch=5, label_smoothing=0.1, flip=True,
                   translate=2, cutout=4, precision="bf16", channels_last=True, device="auto")
    dev = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    log(f"# torch {torch.__version__}, device {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}, "
        f"python {sys.version.split()[0]}")
    data = synthetic_cifar(n, t, hw)
    model_cfg = {"name": "resnet9", "width": width}
    fwd = forward_flops(build_model(model_cfg, (3, hw, hw), 10), (3, hw, hw))
    log(f"# forward GFLOP per image {fwd / 1e9:.4f}; lower bound per model {BOUND_S:.2f} s (full-size recipe)")
    ks = [int(v) for v in args.ks.split(",") if v]
    compile_ks = [int(v) for v in args.compile_ks.split(",") if v]
    rng = np.random.default_rng(0)
    kmax = max(ks + compile_ks + [1])
    masks = np.zeros((kmax, n), bool)
    for j in range(kmax):
        masks[j, rng.permutation(n)[: n // 2]] = True

    plan = [("single", TrainConfig(**cfg, engine="single"), 1)]
    plan += [(f"batched k={k}", TrainConfig(**cfg, engine="batched", models_per_step=k), k) for k in ks]
    plan += [(f"batched k={k} NCHW", TrainConfig(**{**cfg, "channels_last": False}, engine="batched",
                                                 models_per_step=k), k)
             for k in [int(v) for v in args.nchw_ks.split(",") if v]]
    plan += [(f"batched k={k} compile", TrainConfig(**cfg, engine="batched", models_per_step=k, compile=True), k)
             for k in compile_ks]
    rows = []
    for name, tc, k in plan:
        if time.perf_counter() - t_start > args.budget:
            log(f"# skipped {name}: over the {args.budget:.0f} s budget")
            continue
        try:
            rows.append(measure(name, model_cfg, tc, data, k, masks, fwd, log))
        except Exception as e:  # keep the other measurements (e.g. out of memory at large k)
            log(f"# {name} failed: {type(e).__name__}: {str(e)[:300]}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    print("\n(extrapolated to 24 epochs from 1- and 2-epoch units; alpha=0.5, 25 000 images per model)")
    hdr = f"{'config':<24}{'models/h':>10}{'s/model':>9}{'of 1.31s':>9}{'TFLOP/s':>9}{'GiB/model':>10}{'warmup s':>9}"
    print(hdr)
    for r in rows:
        print(f"{r['config']:<24}{r['models_per_hour']:>10.0f}{r['s_per_model_24ep']:>9.2f}"
              f"{r['frac_of_bound']:>9.3f}{r['tflops']:>9.1f}{r['mem_per_model_GiB']:>10.2f}{r['warmup_s']:>9.1f}")
    print(f"total bench time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
