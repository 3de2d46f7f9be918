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

    PYTHONPATH=. python3 bench/train_gpu.py                      # on a GPU
    PYTHONPATH=. python3 bench/train_gpu.py --configs single,b1,b8,g8 --check-graph
    PYTHONPATH=. python3 bench/train_gpu.py --profile 1,8         # kernel-time breakdown
    PYTHONPATH=. python3 bench/train_gpu.py --quick              # tiny CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import re
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


CATEGORIES = [
    ("conv/matmul", ("conv", "xmma", "sm90", "sm80", "cutlass", "implicit", "gemm", "wgrad", "dgrad", "cudnn")),
    ("batchnorm", ("batch_norm", "bn_", "batchnorm")),
    ("pooling", ("pool",)),
    ("index/gather (data)", ("index", "gather", "scatter")),
    ("reduction", ("reduce",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "triton")),
]


def profile(model_cfg, cfg, data, k, masks, log):
    """Kernel-time breakdown of one 1-epoch unit (after a warm-up unit)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile
    x, y, xt, yt = data
    tr = Trainer(model_cfg, cfg, x, y, xt, yt)
    tr.cfg.epochs = 1
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    tr.train(masks[:k], np.arange(k))
    sync()
    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        tr.train(masks[:k], np.arange(k) + 7)
        sync()
        wall = time.perf_counter() - t
    per_kernel = {}
    for ev in prof.key_averages():
        dt = getattr(ev, "self_device_time_total", 0) or getattr(ev, "self_cuda_time_total", 0)
        if dt > 0 and ev.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[ev.key] = per_kernel.get(ev.key, 0) + dt
    busy = max(sum(per_kernel.values()) / 1e6, 1e-9)
    cats = {}
    for name, dt in per_kernel.items():
        low = name.lower()
        cat = next((c for c, keys in CATEGORIES if any(kw in low for kw in keys)), "other")
        cats[cat] = cats.get(cat, 0) + dt / 1e6
    log(f"# profile k={k} compile={cfg.compile}: wall {wall:.3f} s, GPU kernel time {busy:.3f} s")
    for c, v in sorted(cats.items(), key=lambda kv: -kv[1]):
        log(f"#   {c:<22}{v:8.3f} s {100 * v / busy:5.1f}%")
    for name, dt in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]:
        log(f"#     {dt / 1e6:7.3f} s  {name[:110]}")
    del tr
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
    ap.add_argument("--configs", default="single,b1,b8,b32,g1,g8,c8",
                    help="comma list: single | b<k> batched | g<k> batched + CUDA graph | c<k> batched + "
                         "torch.compile | cg<k> compile + graph | n<k> batched without channels_last")
    ap.add_argument("--check-graph", action="store_true",
                    help="first compare margins of a short unit with and without the CUDA graph")
    ap.add_argument("--budget", type=float, default=420.0, help="stop starting configurations after this many s")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--profile", default="", help="k values to profile instead of timing, 'c8' = k=8 compiled")
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
    specs = [v for v in args.configs.split(",") if v]
    digits = [re.sub(r"\D", "", v) for v in specs + args.profile.split(",")]
    kmax = max([1] + [int(d) for d in digits if d])
    rng = np.random.default_rng(0)
    masks = np.zeros((kmax, n), bool)
    for j in range(kmax):
        masks[j, rng.permutation(n)[: n // 2]] = True

    if args.profile:
        for v in [v for v in args.profile.split(",") if v]:  # "8" eager, "c8" compiled
            k = int(v.lstrip("c"))
            tc = TrainConfig(**cfg, engine="batched", models_per_step=k, compile=v.startswith("c"))
            profile(model_cfg, tc, data, k, masks, log)
        return

    if args.check_graph and torch.cuda.is_available():
        short = {**cfg, "epochs": 1}
        r = [Trainer(model_cfg, TrainConfig(**short, models_per_step=1, cuda_graph=g), *data)
             .train(masks[:1], np.arange(1)) for g in (False, True)]
        diff = np.abs(r[0].margins - r[1].margins).max()
        log(f"# CUDA graph check (k=1, 1 epoch, bf16): max |margin diff| {diff:.4g}, margin scale "
            f"{np.abs(r[0].margins).mean():.3g}, target acc {r[0].target_acc} vs {r[1].target_acc}")

    plan = []
    for v in specs:
        if v == "single":
            plan.append(("single", TrainConfig(**cfg, engine="single"), 1))
            continue
        kind, k = re.match(r"([a-z]+)(\d+)", v).groups()
        k = int(k)
        flags = {"b": {}, "g": {"cuda_graph": True}, "c": {"compile": True},
                 "cg": {"compile": True, "cuda_graph": True}, "n": {"channels_last": False}}[kind]
        label = {"b": "", "g": " graph", "c": " compile", "cg": " compile+graph", "n": " NCHW"}[kind]
        tc = TrainConfig(**{**cfg, **flags}, engine="batched", models_per_step=k)
        plan.append((f"batched k={k}{label}", tc, k))
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
