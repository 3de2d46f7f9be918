"""Training engine: train k models on k equal-size subsets ("masks") and return their margins.

A `Trainer` keeps the target set (and, by default, the training set) resident on its device,
normalised once, and trains many work units. It has one training loop: k models in lockstep
as one k-copy module (workers.models), one SGD step at a time (`_Stepper`), over a batch
source that yields the k models' batches side by side:

    ResidentBatches  the training set on the device; a step gathers its examples by index
                     (train.loader=resident; the step can be captured as a CUDA graph)
    StreamedBatches  each model streams its mask's examples from a .beton through FFCV
                     (train.loader=ffcv, workers.ffcv_loader)

Every random number (init, shuffling, augmentation) comes from a per-model torch.Generator
seeded by the model's seed, so model j's numbers depend only on (mask j, seed j).
train.engine=batched trains `models_per_step` models per step; train.engine=single trains
one model at a time, on resident data with the textbook loop of the reference module
(workers.train_reference, which also holds the naive DataLoader path), streamed with k = 1.
Both engines take the pieces of the recipe below, the resident training set and the result
type from workers.train_parts.

Recipe: SGD (momentum, optional Nesterov, weight decay on all parameters), cross-entropy
with label smoothing, triangular learning rate per step
    lr_t = lr * interp(t, [0, peak_epoch * S, epochs * S], [0, 1, 0])   (S steps per epoch),
inputs normalised per channel, x' = (x - mean) / std with the training set's statistics,
then augmented in this order: horizontal flip (width axis), translate by up to `translate`
px padding with black (uint8 0), cutout of a `cutout` x `cutout` square set to the channel
mean (0 after normalisation). Each epoch is a fresh permutation of the subset, cut into
batches of `batch_size` (a final partial batch is dropped).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch

from workers import train_reference
from workers.devices import resolve_device
from workers.margins import MARGIN_KINDS, margin
from workers.models import build_model, init_weights, stack_states, unstack_states
from workers.recipe import TrainConfig
from workers.train_parts import (
    Recipe,
    ResidentBatches,
    TrainResult,
    batching,
    channel_stats,
    check_arrays,
    draw_epoch,
    lr_at,
    normalize,
)

log = logging.getLogger(__name__)

__all__ = ["BatchSource", "StreamedBatches", "TrainConfig", "TrainResult", "Trainer"]


# ============================================================================ batch sources
Batch = tuple[torch.Tensor, torch.Tensor]  # images [k*b, C, H, W] normalised, labels [k*b]; model-major


class BatchSource(Protocol):
    """Where the training loop's batches come from: k models' batches side by side, model-major.

    A step is split in two so that the device side can be captured as a CUDA graph:
    `stage(item, buf)` (host side) puts the step's inputs into `buf`, a fixed buffer made once
    per stepper by `buffer(k, bs)`; `batch(buf)` (device side, inside the step) turns them
    into images and labels. `capturable`: whether `batch` reads nothing but `buf`.
    """

    capturable: bool

    def start(self, idx: torch.Tensor, gens: list[torch.Generator], bs: int) -> None:
        """A new unit: k = len(gens) models on the rows of idx [k, m] (example indices), batch
        size bs; called after the initial weights are drawn from gens."""

    def epoch(self, perm: torch.Tensor, bs: int, steps: int) -> Iterator[Any]:
        """One item per step; perm [k, m] (on the device) is the epoch's order from draw_epoch."""

    def buffer(self, k: int, bs: int) -> Any: ...

    def stage(self, item: Any, buf: Any) -> None: ...

    def batch(self, buf: Any) -> Batch: ...

    def eval_batches(self, idx: torch.Tensor, rows: int) -> Iterator[Batch]:
        """Batches covering each row of idx [k, m] once, in order (rows: examples per model
        per batch, a hint), for the accuracy on the training subsets."""


class StreamedBatches:
    """Each model streams its mask's examples from the .beton at `beton` (workers.ffcv_loader).

    The order is FFCV's: each model's loader shuffles its indices with its own seeded order
    (the seed drawn from the model's generator), so the numbers are reproducible but not
    those of the resident source; the augmentation parameters still come from the model's
    generator, by position in the epoch. Batches are normalised on the device as they come.
    One Loader per model slot, batch size and mode, built once and then retargeted.
    """

    capturable = False

    def __init__(self, beton: str, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype,
                 device: torch.device, workers: int):
        self.beton, self.dtype, self.device, self.workers = beton, dtype, device, workers
        self.mean, self.std = mean.to(device), std.to(device)
        self._loaders: dict[tuple, Any] = {}
        self._train: list = []

    def _loader(self, slot: int, indices: np.ndarray, bs: int, seed: int, shuffle: bool):
        from workers import ffcv_loader
        key = (slot, bs, shuffle, len(indices))
        if key not in self._loaders:
            self._loaders[key] = ffcv_loader.mask_loader(
                self.beton, indices, bs, seed, self.device, self.workers, drop_last=shuffle, shuffle=shuffle)
            return self._loaders[key]
        return ffcv_loader.retarget(self._loaders[key], indices, seed)

    def _side_by_side(self, batches) -> Batch:
        """One batch from each model's loader, normalised in the compute dtype. Copies: FFCV
        reuses its batch buffers."""
        x = normalize(torch.cat([b[0] for b in batches]), self.mean, self.std, self.dtype, self.device)
        return x, torch.cat([b[1] for b in batches]).long()

    def start(self, idx, gens, bs):
        rows = idx.cpu().numpy()
        seeds = [int(torch.randint(0, 2**31 - 1, (1,), generator=g)) for g in gens]
        self._train = [self._loader(j, rows[j], bs, seeds[j], True) for j in range(len(gens))]

    def epoch(self, perm, bs, steps):
        return zip(*self._train)

    def buffer(self, k, bs):
        return [None]

    def stage(self, item, buf):
        buf[0] = self._side_by_side(item)

    def batch(self, buf):
        staged, buf[0] = buf[0], None  # handed over, not kept through the step
        return staged

    def eval_batches(self, idx, rows):
        m = idx.shape[1]
        rows_np = idx.cpu().numpy()
        plain = [self._loader(j, rows_np[j], min(m, 1024), 0, False) for j in range(len(rows_np))]
        return map(self._side_by_side, zip(*plain))


# ============================================================================ the trainer
class Trainer:
    """Persistent: holds the dataset on the device and the model spec; trains many units.

    x_*: uint8 [N, C, H, W]; y_*: int64. The images are normalised once with the training
    set's per-channel statistics and kept on the device in the compute dtype. With
    train.loader=ffcv the training images stay off the device instead (x_train is None):
    they are written once to a .beton and streamed (StreamedBatches); the targets stay resident.
    """

    def __init__(self, model_cfg: dict, train_cfg: TrainConfig, x_train, y_train, x_target, y_target,
                 margin: str = "logsumexp", self_targets: bool = False):
        train_cfg.validate()
        if self_targets and train_cfg.loader == "ffcv":
            raise ValueError("task.targets=both needs the training set on the device: set train.loader=resident")
        self.self_targets = bool(self_targets)   # also the margins on every training example (TrainResult.self_*)
        if margin not in MARGIN_KINDS:
            raise ValueError(f"margin={margin!r}: use one of {MARGIN_KINDS}")
        self.margin = margin
        check_arrays(x_train, y_train, x_target, y_target)
        self.model_cfg, self.cfg = dict(model_cfg), train_cfg
        self.device = dev = resolve_device(train_cfg.device)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True  # shapes are fixed per unit: autotune once
        c, h, w = (int(s) for s in x_train.shape[1:])
        self.in_shape = (c, h, w)
        inferred = int(max(np.max(y_train), np.max(y_target))) + 1
        self.num_classes = int(self.model_cfg.pop("num_classes", inferred))
        self.n, self.T = len(x_train), len(x_target)
        self.mean, self.std = mean, std = channel_stats(x_train)
        self.recipe = Recipe(train_cfg, dev, self.in_shape, self.num_classes, ((0.0 - mean) / std).to(dev))
        dtype = self.recipe.dtype
        self.streamed = train_cfg.loader == "ffcv"
        self.y_train = torch.from_numpy(np.asarray(y_train, dtype=np.int64)).to(dev)
        self.source: BatchSource
        if self.streamed:
            from workers import ffcv_loader
            beton = ffcv_loader.write_beton(x_train, y_train, train_cfg.ffcv_dir, train_cfg.ffcv_workers)
            self.x_train = None
            self.source = StreamedBatches(beton, mean, std, dtype, dev, train_cfg.ffcv_workers)
        else:  # resident data, normalised once in the compute dtype
            self.x_train = normalize(x_train, mean, std, dtype, dev)
            self.source = ResidentBatches(self.x_train, self.y_train)
        self.x_target = normalize(x_target, mean, std, dtype, dev)
        self.y_target = torch.from_numpy(np.asarray(y_target, dtype=np.int64)).to(dev)
        # CPU template that per-model initial weights are drawn into.
        self._template = build_model(self.model_cfg, self.in_shape, self.num_classes)
        self._models: dict[int, tuple[torch.nn.Module, Any]] = {}  # k -> (k-copy module, its forward)
        self._steppers: dict[tuple[int, int], _Stepper] = {}  # (k, batch size) -> stepper
        # Images per evaluation forward pass (all copies together).
        self.eval_images = 16384 if dev.type == "cuda" else 4096

    def _model(self, k: int) -> tuple[torch.nn.Module, Any]:
        """The k-copy module on the device and its forward (compiled if asked), built once per k."""
        if k not in self._models:
            mod = build_model(self.model_cfg, self.in_shape, self.num_classes, copies=k)
            mod = mod.to(self.device, dtype=self.recipe.acc)
            if self.cfg.channels_last:
                mod = mod.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stub lacks it
            self._models[k] = (mod, torch.compile(mod) if self.cfg.compile else mod)
        return self._models[k]

    def _stepper(self, k: int, bs: int) -> _Stepper:
        if (k, bs) not in self._steppers:
            self._steppers[(k, bs)] = _Stepper(self.recipe, self.source, *self._model(k), k, bs)
        return self._steppers[(k, bs)]

    def _init_states(self, gens: list[torch.Generator]) -> list[dict]:
        states = []
        for g in gens:
            init_weights(self._template, g)
            states.append({k: v.clone() for k, v in self._template.state_dict().items()})
        return states

    # ------------------------------------------------------------------ public
    def train(self, masks: np.ndarray, seeds: np.ndarray, return_weights: bool = False,
              labels: np.ndarray | None = None) -> TrainResult:
        """Train one model per row of `masks` (bool [k, n]) with `seeds` [k]; the masks of one
        size (row sum) are trained together, so a model's result does not depend on the others.
        labels: int [n], the training labels for these models in place of the trainer's own
        (stage=mislabel's repair check: labels restored to the true ones); resident data only."""
        if labels is None:
            return self._train(masks, seeds, return_weights)
        y = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(self.device)
        if self.streamed:
            raise ValueError("training with other labels needs the training set on the device: "
                             "set train.loader=resident")
        if y.shape != self.y_train.shape or int(y.min()) < 0 or int(y.max()) >= self.num_classes:
            raise ValueError(f"labels must be {self.n} ints in [0, {self.num_classes}), got {tuple(y.shape)}")
        own = self.y_train.clone()
        self.y_train.copy_(y)       # in place: the batch source and the evaluation read this tensor
        try:
            return self._train(masks, seeds, return_weights)
        finally:
            self.y_train.copy_(own)

    def _train(self, masks: np.ndarray, seeds: np.ndarray, return_weights: bool) -> TrainResult:
        t0 = time.perf_counter()
        masks = np.asarray(masks)
        seeds = np.asarray(seeds, dtype=np.int64).reshape(-1)
        if masks.ndim != 2 or masks.dtype != np.bool_:
            raise ValueError(f"masks must be a bool array [k, n], got {masks.dtype} {masks.shape}")
        if masks.shape[1] != self.n:
            raise ValueError(f"masks have {masks.shape[1]} columns but the training set has "
                             f"{self.n} examples")
        if len(seeds) != len(masks):
            raise ValueError(f"got {len(seeds)} seeds for {len(masks)} masks")
        if len(masks) == 0:
            raise ValueError("masks is empty: nothing to train")
        sizes = masks.sum(1)
        if (sizes == 0).any():
            raise ValueError("masks select no training examples")
        if (sizes != sizes[0]).any():   # masks with examples removed: the models of one size train in lockstep
            parts, rows = [], []
            for size in np.unique(sizes):
                sel = np.flatnonzero(sizes == size)
                parts.append(self._train(masks[sel], seeds[sel], return_weights))
                rows.append(sel)
            res = TrainResult.concat(parts, seconds=time.perf_counter() - t0)
            return res.take(np.argsort(np.concatenate(rows), kind="stable"))

        idx = torch.from_numpy(np.stack([np.flatnonzero(r) for r in masks])).to(self.device)
        chunk = self.cfg.models_per_step if self.cfg.engine == "batched" else 1
        parts = []
        for a in range(0, len(masks), chunk):
            gens = [torch.Generator().manual_seed(int(s)) for s in seeds[a:a + chunk]]
            parts.append(self._train_group(idx[a:a + chunk], gens, return_weights))
        res = TrainResult.concat(parts, seconds=time.perf_counter() - t0)
        log.debug("trained %d models in %.2f s", len(masks), res.seconds)
        return res

    # ------------------------------------------------------------------ the loop
    def _train_group(self, idx: torch.Tensor, gens: list[torch.Generator], return_weights: bool) -> TrainResult:
        """k = len(gens) models on the rows of idx [k, m], in lockstep; then evaluated."""
        t0 = time.perf_counter()
        cfg = self.cfg
        k, m = idx.shape
        bs, steps = batching(m, cfg.batch_size)
        if cfg.engine == "single" and not self.streamed:  # the textbook loop, one model
            module, fwd = self._model(1)
            assert isinstance(self.source, ResidentBatches)
            loss = train_reference.train_single(module, fwd, self.recipe, self.source, idx[0], gens[0],
                                                self._init_states(gens)[0])
        else:
            stepper = self._stepper(k, bs)
            stepper.reset(stack_states(self._init_states(gens)))
            self.source.start(idx, gens, bs)
            step = 0
            for _epoch in range(cfg.epochs):
                ds = [draw_epoch(g, m, cfg, self.in_shape[1:]) for g in gens]
                d = {key: torch.stack([x[key] for x in ds]).to(self.device, non_blocking=True) for key in ds[0]}
                stepper.loss_sum.zero_()
                for s, item in enumerate(self.source.epoch(d["perm"], bs, steps)):
                    sl = slice(s * bs, (s + 1) * bs)
                    stepper.step(item, {key: v[:, sl] for key, v in d.items()}, lr_at(step, steps, cfg))
                    step += 1
            loss = (stepper.loss_sum / steps).cpu().numpy().astype(np.float32)
            module = stepper.module
        margins, train_acc, target_acc, own = self._evaluate(module, idx)
        return TrainResult(margins, train_acc, target_acc, loss, seconds=time.perf_counter() - t0,
                           state_dicts=unstack_states(module.state_dict(), k) if return_weights else None,
                           self_margins=own[0] if own else None, self_correct=own[1] if own else None)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _evaluate(self, module: torch.nn.Module, idx: torch.Tensor):
        """Margins on the targets and accuracy on each model's own subset (eval mode, no aug);
        with self_targets also (margins, correct) on every training example, else None."""
        module.eval()
        r = self.recipe
        k, m = idx.shape
        nc = self.num_classes
        rows = max(1, self.eval_images // k)

        def forward(x):  # x [k*b, C, H, W] model-major (or [b, ...] shared by all copies)
            with r.autocast():
                if k == 1:
                    return module(r.prep(x, 1)).to(r.acc).view(1, -1, nc)
                return module(x.view(k, -1, *self.in_shape)).to(r.acc)

        def shared(xs):       # logits [k, N, C] of every copy on the same examples xs [N, ...]
            parts = []
            for a in range(0, len(xs), rows):
                x = xs[a:a + rows]
                if k > 1:  # every copy sees the same examples
                    x = x.unsqueeze(0).expand(k, *x.shape).reshape(-1, *self.in_shape)
                parts.append(forward(x))
            return torch.cat(parts, dim=1)

        logits = shared(self.x_target)  # [k, T, C]
        labels = self.y_target.expand(k, self.T)
        margins = margin(logits, labels, self.margin)
        target_acc = (logits.argmax(-1) == labels).float().mean(1)
        correct = torch.zeros(k, device=self.device)
        for xb, yb in self.source.eval_batches(idx, rows):
            correct += (forward(xb).argmax(-1) == yb.view(k, -1)).float().sum(1)
        own = None
        if self.self_targets:
            assert self.x_train is not None          # refused with train.loader=ffcv in __init__
            logits = shared(self.x_train)           # [k, n, C]
            labels = self.y_train.expand(k, self.n)
            own = (margin(logits, labels, self.margin).cpu().numpy().astype(np.float32),
                   (logits.argmax(-1) == labels).cpu().numpy())
        module.train()
        return (margins.cpu().numpy().astype(np.float32), (correct / m).cpu().numpy().astype(np.float32),
                target_acc.cpu().numpy().astype(np.float32), own)


class _Stepper:
    """One training step of k copies at batch size bs, with static input buffers.

    Persistent per (k, bs): the k-copy module and its forward, the optimizer (momentum
    buffers zeroed at each new unit, which is exactly SGD's first step: buf = grad) and the
    buffers holding the step's inputs (staged by the batch source), augmentation parameters
    and learning rate. With cfg.cuda_graph on a GPU and a capturable source, the whole step
    (gather, augment, forward, backward, SGD) is captured once as a CUDA graph after three
    eager warm-up steps and replayed afterwards, removing per-kernel CPU launch cost; the
    numbers are those of the eager step.
    """

    WARMUP = 3

    def __init__(self, recipe: Recipe, source: BatchSource, module: torch.nn.Module, fwd, k: int, bs: int):
        self.recipe, self.source, self.module, self.fwd, self.k, self.bs = recipe, source, module, fwd, k, bs
        dev = recipe.device
        self.use_graph = bool(recipe.cfg.cuda_graph) and dev.type == "cuda" and source.capturable
        self.lr = torch.zeros((), device=dev) if self.use_graph else None
        self.opt = recipe.optimizer(module.parameters(), lr=self.lr, copies=k)
        self.inputs = source.buffer(k, bs)
        probe = draw_epoch(torch.Generator().manual_seed(0), 1, recipe.cfg, recipe.in_shape[1:])
        self.aug = {key: torch.zeros((k, bs, *v.shape[1:]), dtype=v.dtype, device=dev)
                    for key, v in probe.items() if key != "perm"}
        self.loss_sum = torch.zeros(k, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_steps = 0

    def reset(self, state: dict) -> None:
        """Start a new unit: load the stacked initial weights, zero the momentum buffers."""
        with torch.no_grad():
            for key, v in self.module.state_dict().items():
                v.copy_(state[key])
            for st in self.opt.state.values():
                if st.get("momentum_buffer") is not None:
                    st["momentum_buffer"].zero_()
        self.module.train()

    def _body(self) -> None:
        r, k, bs = self.recipe, self.k, self.bs
        x, y = self.source.batch(self.inputs)
        aug = {key: v.view(k * bs, *v.shape[2:]) for key, v in self.aug.items()}
        xb = r.prep(r.augment(x, aug), k)
        del x  # the batch before augmentation is not kept through forward and backward
        with r.autocast(cache_enabled=not self.use_graph):
            out = self.fwd(xb)  # [k, bs, nc] (or [bs, nc] for k = 1)
        losses = r.losses(out, y, k, bs)
        losses.sum().backward()
        self.opt.step()
        self.loss_sum += losses.detach()

    def step(self, item, draws: dict, lr: float) -> None:
        """One SGD step: `item` is the source's for this step; draws hold this step's
        [k, bs, ...] slices of the epoch draws."""
        self.source.stage(item, self.inputs)
        for key, buf in self.aug.items():
            buf.copy_(draws[key])
        if not self.use_graph:
            for group in self.opt.param_groups:
                group["lr"] = lr
            self._body()
            self.opt.zero_grad(set_to_none=True)
            return
        assert self.lr is not None      # the graph's learning rate lives on the device
        self.lr.fill_(lr)
        if self.graph is not None:
            self.graph.replay()
        elif self.eager_steps < self.WARMUP:  # real steps, on a side stream as capture requires
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._body()
                self.opt.zero_grad(set_to_none=True)
            torch.cuda.current_stream().wait_stream(side)
            self.eager_steps += 1
        else:  # capture (records without running), then run this step by replaying
            self.opt.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._body()
            self.graph = graph
            graph.replay()
