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

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from workers.devices import resolve_device
from workers.margins import MARGIN_KINDS, margin
from workers.models import build_model, init_weights, stack_states, unstack_states
from workers.recipe import PRECISIONS, TrainConfig

log = logging.getLogger(__name__)

__all__ = ["BatchSource", "Recipe", "ResidentBatches", "StreamedBatches", "TrainConfig", "TrainResult", "Trainer",
           "augment", "channel_stats", "draw_epoch", "lr_at", "normalize"]


# ============================================================================ configuration
# precision -> (input dtype, parameter / loss dtype); bf16 runs under autocast.
DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.float32),
          "fp64": (torch.float64, torch.float64)}
assert tuple(DTYPES) == PRECISIONS

@dataclass
class TrainResult:
    margins: np.ndarray  # float32 [k, T]
    train_acc: np.ndarray  # float32 [k]  (accuracy on the model's own training subset)
    target_acc: np.ndarray  # float32 [k]
    loss: np.ndarray  # float32 [k]  final-epoch mean training loss
    seconds: float
    state_dicts: list | None = None  # CPU state dicts of plain (copies=1) models, if asked

    @classmethod
    def concat(cls, parts: list[TrainResult], seconds: float) -> TrainResult:
        """The results of consecutive groups of models as one (state dicts kept if every part has them)."""
        weights = all(p.state_dicts is not None for p in parts)
        return cls(margins=np.concatenate([p.margins for p in parts]),
                   train_acc=np.concatenate([p.train_acc for p in parts]),
                   target_acc=np.concatenate([p.target_acc for p in parts]),
                   loss=np.concatenate([p.loss for p in parts]), seconds=seconds,
                   state_dicts=[sd for p in parts for sd in p.state_dicts or []] if weights else None)

    def take(self, order: np.ndarray) -> TrainResult:
        """The models in `order` (indices into this result)."""
        sds = None if self.state_dicts is None else [self.state_dicts[int(i)] for i in order]
        return TrainResult(self.margins[order], self.train_acc[order], self.target_acc[order], self.loss[order],
                           self.seconds, sds)


# ============================================================================ recipe pieces
def lr_at(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Triangular schedule: 0 -> lr linearly until lr_peak_epoch, then linearly to 0 at the end."""
    s = float(steps_per_epoch)
    return float(cfg.lr * np.interp(step, [0.0, cfg.lr_peak_epoch * s, cfg.epochs * s], [0.0, 1.0, 0.0]))


def batching(m: int, batch_size: int) -> tuple[int, int]:
    """(batch size, steps per epoch) for a subset of m examples; a partial last batch is dropped."""
    bs = min(batch_size, m)
    return bs, m // bs


def draw_epoch(gen: torch.Generator, m: int, cfg: TrainConfig, hw: tuple[int, int]) -> dict:
    """One epoch of one model's randomness, on the CPU, in a fixed order.

    perm [m]: order of the subset; the augmentation parameters are indexed by position in
    that order: flip [m] bool, shift [m, 2] in [0, 2*translate] (offset of the crop in the
    padded image, rows then columns), corner [m, 2] (top-left of the cutout square).
    Only enabled augmentations draw numbers.
    """
    h, w = hw
    d = {"perm": torch.randperm(m, generator=gen)}
    if cfg.flip:
        d["flip"] = torch.randint(0, 2, (m,), generator=gen).bool()
    if cfg.translate > 0:
        d["shift"] = torch.randint(0, 2 * cfg.translate + 1, (m, 2), generator=gen)
    if cfg.cutout > 0:
        c = cfg.cutout
        rows = torch.randint(0, max(1, h - c + 1), (m,), generator=gen)
        cols = torch.randint(0, max(1, w - c + 1), (m,), generator=gen)
        d["corner"] = torch.stack([rows, cols], dim=1)
    return d


def augment(x: torch.Tensor, draws: dict, cfg: TrainConfig, pad: torch.Tensor) -> torch.Tensor:
    """Flip / translate / cutout a normalised batch x [N, C, H, W] with per-image parameters.

    draws hold [N] / [N, 2] tensors (see draw_epoch). Flip reverses the WIDTH axis;
    translate pads by t pixels of value `pad` [C] (normalised black) and crops H x W at
    `shift`; cutout sets a square at `corner` to 0 (the normalised mean). Returns a new
    tensor (or x itself if no augmentation is on).
    """
    n, c, h, w = x.shape
    if "flip" in draws:
        x = torch.where(draws["flip"].view(n, 1, 1, 1), x.flip(-1), x)
    if "shift" in draws:
        t = cfg.translate
        xp = pad.to(x.dtype).view(1, c, 1, 1).expand(n, c, h + 2 * t, w + 2 * t).clone()
        xp[:, :, t:t + h, t:t + w] = x
        rows = draws["shift"][:, 0:1] + torch.arange(h, device=x.device)  # [N, H]
        cols = draws["shift"][:, 1:2] + torch.arange(w, device=x.device)  # [N, W]
        ni = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        ci = torch.arange(c, device=x.device).view(1, c, 1, 1)
        x = xp[ni, ci, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
    if "corner" in draws:
        s = cfg.cutout
        ar_h = torch.arange(h, device=x.device)
        ar_w = torch.arange(w, device=x.device)
        r0, c0 = draws["corner"][:, 0:1], draws["corner"][:, 1:2]
        in_r = (ar_h >= r0) & (ar_h < r0 + s)  # [N, H]
        in_c = (ar_w >= c0) & (ar_w < c0 + s)  # [N, W]
        box = (in_r[:, :, None] & in_c[:, None, :]).unsqueeze(1)  # [N, 1, H, W]
        x = x.masked_fill(box, 0.0)
    return x


def _host_tensor(x: np.ndarray) -> torch.Tensor:
    """A CPU tensor over x; read-only arrays (e.g. from Ray's object store) are copied first."""
    x = np.ascontiguousarray(x)
    return torch.from_numpy(x if x.flags.writeable else x.copy())


def normalize(x: np.ndarray | torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              dtype=torch.float32, device="cpu") -> torch.Tensor:
    """(x - mean) / std per channel for uint8 images [N, C, H, W], in float32 then cast to dtype."""
    x = _host_tensor(x) if isinstance(x, np.ndarray) else x
    out = torch.empty(x.shape, dtype=dtype, device=device)
    m, s = mean.view(-1, 1, 1).to(device), std.view(-1, 1, 1).to(device)
    for a in range(0, len(x), 4096):  # bounded float32 temporaries
        out[a:a + 4096] = ((x[a:a + 4096].to(device).float() - m) / s).to(dtype)
    return out


def channel_stats(x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (uint8 units) of the training images x [N, C, H, W].

    The engine feeds the network (x - mean) / std; accumulated in float64 for stability.
    """
    xs = _host_tensor(x)
    c = xs.shape[1]
    flat = xs.transpose(0, 1).reshape(c, -1)
    mean = torch.zeros(c, dtype=torch.float64)
    sq = torch.zeros(c, dtype=torch.float64)
    for chunk in flat.split(1 << 24, dim=1):  # bounded temporary memory
        chunk = chunk.double()
        mean += chunk.sum(1)
        sq += (chunk * chunk).sum(1)
    cnt = flat.shape[1]
    mean /= cnt
    std = (sq / cnt - mean * mean).clamp_min(1e-12).sqrt()
    return mean.float(), std.clamp_min(1e-3).float()


def check_arrays(x_train, y_train, x_target, y_target) -> None:
    for name, x in (("x_train", x_train), ("x_target", x_target)):
        if x.dtype != np.uint8 or x.ndim != 4:
            raise ValueError(f"{name} must be uint8 [N, C, H, W], got {x.dtype} {x.shape}")
    if x_train.shape[1:] != x_target.shape[1:]:
        raise ValueError(f"x_train {x_train.shape[1:]} and x_target {x_target.shape[1:]} differ in shape")
    if len(y_train) != len(x_train) or len(y_target) != len(x_target):
        raise ValueError("labels and images differ in length")


class Recipe:
    """The recipe bound to a device and an input shape: what one training step computes with.

    cfg is held, not copied (a trainer's cfg.epochs may be changed between units); the
    dtypes are fixed at construction. pad [C] is normalised black (for translate).
    """

    def __init__(self, cfg: TrainConfig, device: torch.device, in_shape: tuple[int, int, int], num_classes: int,
                 pad: torch.Tensor):
        self.cfg, self.device, self.in_shape, self.num_classes, self.pad = cfg, device, in_shape, num_classes, pad
        self.dtype, self.acc = DTYPES[cfg.precision]  # input dtype; parameter / loss dtype

    def autocast(self, cache_enabled: bool = True):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)
        return contextlib.nullcontext()

    def prep(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """[k*B, C, H, W] (model-major) -> the module's input: [B, C, H, W] or [k, B, C, H, W]."""
        if k == 1:
            return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x
        return x.view(k, -1, *self.in_shape)

    def augment(self, x: torch.Tensor, draws: dict) -> torch.Tensor:
        return augment(x, draws, self.cfg, self.pad)

    def optimizer(self, params, lr: torch.Tensor | None = None) -> torch.optim.Optimizer:
        cfg = self.cfg
        kw = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        return torch.optim.SGD(params, lr=0.0 if lr is None else lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0, **kw)

    def losses(self, out: torch.Tensor, y: torch.Tensor, k: int, bs: int) -> torch.Tensor:
        """Per-model mean training loss [k] of outputs [k, bs, C] (or [bs, C]) against y [k*bs]."""
        return F.cross_entropy(out.to(self.acc).reshape(k * bs, self.num_classes), y, reduction="none",
                               label_smoothing=self.cfg.label_smoothing).view(k, bs).mean(1)


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


class ResidentBatches:
    """The training set on the device, normalised once (x [n, C, H, W], y [n]).

    A step's input is the index tensor [k, bs] of its examples (the epoch's order gathered
    from the unit's rows), so the whole step, gather included, can be captured.
    """

    capturable = True

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y
        self.idx: torch.Tensor | None = None

    def start(self, idx, gens, bs):
        self.idx = idx

    def epoch(self, perm, bs, steps):
        return (perm[:, s * bs:(s + 1) * bs] for s in range(steps))

    def buffer(self, k, bs):
        return torch.zeros(k, bs, dtype=torch.long, device=self.x.device)

    def stage(self, item, buf):
        torch.gather(self.idx, 1, item, out=buf)

    def batch(self, buf):
        ex = buf.view(-1)
        return self.x.index_select(0, ex), self.y.index_select(0, ex)

    def eval_batches(self, idx, rows):
        m = idx.shape[1]
        for a in range(0, m, rows):
            ex = idx[:, a:a + rows].reshape(-1)
            yield self.x.index_select(0, ex), self.y.index_select(0, ex)


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
                 margin: str = "logsumexp"):
        train_cfg.validate()
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
    def train(self, masks: np.ndarray, seeds: np.ndarray, return_weights: bool = False) -> TrainResult:
        """Train one model per row of `masks` (bool [k, n]) with `seeds` [k]; the masks of one
        size (row sum) are trained together, so a model's result does not depend on the others."""
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
                parts.append(self.train(masks[sel], seeds[sel], return_weights))
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
            from workers import train_reference
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
        margins, train_acc, target_acc = self._evaluate(module, idx)
        return TrainResult(margins, train_acc, target_acc, loss, seconds=time.perf_counter() - t0,
                           state_dicts=unstack_states(module.state_dict(), k) if return_weights else None)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _evaluate(self, module: torch.nn.Module, idx: torch.Tensor):
        """Margins on the targets and accuracy on each model's own subset (eval mode, no aug)."""
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

        parts = []
        for a in range(0, self.T, rows):
            x = self.x_target[a:a + rows]
            if k > 1:  # every copy sees the same targets
                x = x.unsqueeze(0).expand(k, *x.shape).reshape(-1, *self.in_shape)
            parts.append(forward(x))
        logits = torch.cat(parts, dim=1)  # [k, T, C]
        labels = self.y_target.expand(k, self.T)
        margins = margin(logits, labels, self.margin)
        target_acc = (logits.argmax(-1) == labels).float().mean(1)
        correct = torch.zeros(k, device=self.device)
        for xb, yb in self.source.eval_batches(idx, rows):
            correct += (forward(xb).argmax(-1) == yb.view(k, -1)).float().sum(1)
        module.train()
        return (margins.cpu().numpy().astype(np.float32), (correct / m).cpu().numpy().astype(np.float32),
                target_acc.cpu().numpy().astype(np.float32))


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
        self.opt = recipe.optimizer(module.parameters(), lr=self.lr)
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
