"""Reference engines for checking and timing the training engine (workers.train).

`train_single`: one model on resident data, written as the textbook loop (a fresh optimizer,
the batch's mean loss, one step at a time). It is what train.engine=single runs, and the
batched engine must match it (tests/test_train.py).
`naive_train_one`: the "naive path" of bench/train_throughput.py: one model, a host
DataLoader with a per-item transform, nothing kept between calls.

Both follow the recipe and the random streams of workers.train (per-model generator:
initial weights, then each epoch's draw_epoch), so they give the engine's numbers up to
rounding. The pieces they share with it come from workers.train_parts; this module does
not import workers.train (workers.train imports it, for train.engine=single).
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
import torch.nn.functional as F

from workers.devices import resolve_device
from workers.margins import margin
from workers.models import build_model, init_weights
from workers.recipe import TrainConfig
from workers.train_parts import (
    DTYPES,
    Recipe,
    ResidentBatches,
    TrainResult,
    augment,
    batching,
    channel_stats,
    check_arrays,
    draw_epoch,
    lr_at,
    normalize,
)

__all__ = ["naive_train_one", "train_single"]


def _sgd_step(opt: torch.optim.Optimizer, loss: torch.Tensor, lr: float) -> None:
    """The textbook step: backward, the step's learning rate, SGD, gradients cleared."""
    loss.backward()
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    opt.zero_grad(set_to_none=True)


def train_single(model: torch.nn.Module, fwd, recipe: Recipe, data: ResidentBatches, idx: torch.Tensor,
                 gen: torch.Generator, init_state: dict) -> np.ndarray:
    """Train `model` (plain, on the device; `fwd` its forward) on the examples idx [m] of
    `data` from `init_state`, drawing each epoch's order and augmentation from `gen`.

    Returns the final epoch's mean training loss as float32 [1]; the model is left trained.
    """
    cfg, dev = recipe.cfg, recipe.device
    m = idx.shape[0]
    model.load_state_dict(init_state)
    model.train()
    opt = recipe.optimizer(model.parameters())
    bs, steps = batching(m, cfg.batch_size)
    step = 0
    for _epoch in range(cfg.epochs):
        d = {key: v.to(dev) for key, v in draw_epoch(gen, m, cfg, recipe.in_shape[1:]).items()}
        total = torch.zeros((), device=dev)
        for s in range(steps):
            sl = slice(s * bs, (s + 1) * bs)
            ex = idx[d["perm"][sl]]
            aug = {key: v[sl] for key, v in d.items()}
            xb = recipe.prep(recipe.augment(data.x.index_select(0, ex), aug), 1)
            with recipe.autocast():
                out = fwd(xb)
            loss = F.cross_entropy(out.to(recipe.acc), data.y.index_select(0, ex), label_smoothing=cfg.label_smoothing)
            _sgd_step(opt, loss, lr_at(step, steps, cfg))
            total += loss.detach()
            step += 1
    return (total / steps).cpu().numpy().astype(np.float32).reshape(1)


# ============================================================================ naive path
class _SubsetImages(torch.utils.data.Dataset):
    """Host-side dataset over one model's subset; item p is the p-th example of the epoch order,
    normalised and augmented on its own (the per-item transform a plain DataLoader runs)."""

    def __init__(self, x, y, idx, cfg, mean, std):
        self.x, self.y, self.idx, self.cfg, self.mean, self.std = x, y, idx, cfg, mean, std
        self.pad = (0.0 - mean) / std
        self.draws: dict = {}

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, p):
        i = int(self.idx[int(self.draws["perm"][p])])
        img = normalize(self.x[i:i + 1], self.mean, self.std)
        aug = {key: v[p:p + 1] for key, v in self.draws.items() if key != "perm"}
        return augment(img, aug, self.cfg, self.pad)[0], int(self.y[i])


def naive_train_one(model_cfg, train_cfg: TrainConfig, x_train, y_train, x_target, y_target, mask,
                    seed, margin_kind: str = "logsumexp") -> TrainResult:
    """The "naive path" for benchmarks: one model, host DataLoader, nothing kept between calls.

    Same recipe and random streams as the single engine (so the same numbers up to rounding),
    but every item goes through a per-item Dataset transform and a torch DataLoader and is
    copied to the device each step.
    """
    t0 = time.perf_counter()
    cfg = train_cfg
    cfg.validate()
    check_arrays(x_train, y_train, x_target, y_target)
    dev = resolve_device(cfg.device)
    in_shape = tuple(x_train.shape[1:])
    model_cfg = dict(model_cfg)
    nc = int(model_cfg.pop("num_classes", int(max(np.max(y_train), np.max(y_target))) + 1))
    mean, std = channel_stats(x_train)
    gen = torch.Generator().manual_seed(int(seed))
    model = init_weights(build_model(model_cfg, in_shape, nc), gen).to(dev)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stub lacks it
    idx = np.flatnonzero(np.asarray(mask))
    m = len(idx)
    bs, steps = batching(m, cfg.batch_size)
    ds = _SubsetImages(x_train, y_train, idx, cfg, mean, std)
    loader = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=False, drop_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          nesterov=cfg.nesterov and cfg.momentum > 0)
    dtype, acc = DTYPES[cfg.precision]
    model = model.to(acc)
    amp = (torch.autocast(dev.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
           else contextlib.nullcontext())

    def prep(x):
        x = x.to(dev).to(dtype)
        return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x

    step = 0
    model.train()
    for _epoch in range(cfg.epochs):
        ds.draws = draw_epoch(gen, m, cfg, in_shape[1:])
        total = 0.0
        for xb, yb in loader:
            with amp:
                out = model(prep(xb))
            loss = F.cross_entropy(out.to(acc), yb.to(dev), label_smoothing=cfg.label_smoothing)
            _sgd_step(opt, loss, lr_at(step, steps, cfg))
            total += loss.item()
            step += 1
    model.eval()
    with torch.no_grad():
        def predict(x):
            outs = []
            for a in range(0, len(x), 1000):
                with amp:
                    outs.append(model(prep(normalize(x[a:a + 1000], mean, std))).to(acc))
            return torch.cat(outs)

        logits_t = predict(x_target)
        yt = torch.from_numpy(np.asarray(y_target, dtype=np.int64)).to(dev)
        margins = margin(logits_t, yt, margin_kind)
        target_acc = (logits_t.argmax(-1) == yt).float().mean()
        ytr = torch.from_numpy(np.asarray(y_train, dtype=np.int64)[idx]).to(dev)
        train_acc = (predict(x_train[idx]).argmax(-1) == ytr).float().mean()
    return TrainResult(
        margins=margins.cpu().numpy().astype(np.float32)[None],
        train_acc=np.array([float(train_acc)], np.float32),
        target_acc=np.array([float(target_acc)], np.float32),
        loss=np.array([total / steps], np.float32),
        seconds=time.perf_counter() - t0,
        state_dicts=None,
    )
