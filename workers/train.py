"""Training engine: train k models on k equal-size subsets ("masks") and return their margins.

A `Trainer` keeps the dataset resident on its device (normalised once) and trains many
work units. The "batched" engine trains k models in lockstep as one k-copy module
(workers.models); the "single" engine trains them one at a time and is the reference. Both draw every random
number (init, shuffling, augmentation) from a per-model torch.Generator seeded by the
model's seed, so model j's numbers depend only on (mask j, seed j).

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
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from workers.margins import MARGIN_KINDS, margin
from workers.models import build_model, init_weights, stack_states, unstack_states

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainResult", "Trainer", "augment", "channel_stats", "draw_epoch", "lr_at",
           "naive_train_one", "normalize"]


# ============================================================================ configuration
# precision -> (input dtype, parameter / loss dtype); bf16 runs under autocast.
_DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.float32),
           "fp64": (torch.float64, torch.float64)}

@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 100
    lr: float = 0.1
    lr_peak_epoch: float = 2
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    flip: bool = False
    translate: int = 0
    cutout: int = 0
    margin: str = "logsumexp"
    device: str = "auto"
    precision: str = "fp32"  # or "bf16" (autocast); "fp64" for exact cross-checks
    channels_last: bool = False
    compile: bool = False
    cuda_graph: bool = False  # capture the batched training step as a CUDA graph (GPU only;
    #                           experimental: not yet run on a GPU)
    engine: str = "batched"  # "batched" (k models at once) | "single" (reference, one at a time)
    models_per_step: int = 16  # k for the batched engine
    loader: str = "resident"  # "resident" (training set on the device) | "ffcv" (streamed .beton)
    ffcv_dir: str | None = None  # where the .beton is written once (default ~/.cache/datamodels/ffcv)
    ffcv_workers: int = 2  # FFCV decoding threads per model

    def validate(self) -> None:
        if self.engine not in ("batched", "single"):
            raise ValueError(f"train.engine={self.engine!r}: use 'batched' or 'single'")
        if self.precision not in _DTYPES:
            raise ValueError(f"train.precision={self.precision!r}: use one of {tuple(_DTYPES)}")
        if self.margin not in MARGIN_KINDS:
            raise ValueError(f"train.margin={self.margin!r}: use one of {MARGIN_KINDS}")
        if self.loader not in ("resident", "ffcv"):
            raise ValueError(f"train.loader={self.loader!r}: use 'resident' or 'ffcv'")
        if self.loader == "ffcv":
            from workers import ffcv_loader
            ffcv_loader.require()
        for name in ("epochs", "batch_size", "models_per_step", "ffcv_workers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class TrainResult:
    margins: np.ndarray  # float32 [k, T]
    train_acc: np.ndarray  # float32 [k]  (accuracy on the model's own training subset)
    target_acc: np.ndarray  # float32 [k]
    loss: np.ndarray  # float32 [k]  final-epoch mean training loss
    seconds: float
    state_dicts: list | None = None  # CPU state dicts of plain (copies=1) models, if asked


# ============================================================================ recipe pieces
def lr_at(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Triangular schedule: 0 -> lr linearly until lr_peak_epoch, then linearly to 0 at the end."""
    s = float(steps_per_epoch)
    return float(cfg.lr * np.interp(step, [0.0, cfg.lr_peak_epoch * s, cfg.epochs * s], [0.0, 1.0, 0.0]))


def _batching(m: int, batch_size: int) -> tuple[int, int]:
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


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def _check_arrays(x_train, y_train, x_target, y_target) -> None:
    for name, x in (("x_train", x_train), ("x_target", x_target)):
        if x.dtype != np.uint8 or x.ndim != 4:
            raise ValueError(f"{name} must be uint8 [N, C, H, W], got {x.dtype} {x.shape}")
    if x_train.shape[1:] != x_target.shape[1:]:
        raise ValueError(f"x_train {x_train.shape[1:]} and x_target {x_target.shape[1:]} differ in shape")
    if len(y_train) != len(x_train) or len(y_target) != len(x_target):
        raise ValueError("labels and images differ in length")


# ============================================================================ the trainer
class Trainer:
    """Persistent: holds the dataset on the device and the model spec; trains many units.

    x_*: uint8 [N, C, H, W]; y_*: int64. The images are normalised once with the training
    set's per-channel statistics and kept on the device in the compute dtype. With
    train.loader=ffcv the training images stay off the device instead: they are written
    once to a .beton (workers.ffcv_loader) and each model streams its mask's examples,
    normalised and augmented on the device batch by batch; the targets stay resident.
    """

    def __init__(self, model_cfg: dict, train_cfg: TrainConfig, x_train, y_train, x_target, y_target):
        train_cfg.validate()
        _check_arrays(x_train, y_train, x_target, y_target)
        self.model_cfg, self.cfg = dict(model_cfg), train_cfg
        self.device = _resolve_device(train_cfg.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # shapes are fixed per unit: autotune once
        self.in_shape = tuple(int(s) for s in x_train.shape[1:])
        inferred = int(max(np.max(y_train), np.max(y_target))) + 1
        self.num_classes = int(self.model_cfg.pop("num_classes", inferred))
        self.n, self.T = len(x_train), len(x_target)
        self.dtype, self.acc = _DTYPES[train_cfg.precision]
        mean, std = channel_stats(x_train)
        dev = self.device
        self.mean, self.std = mean, std
        self.pad = ((0.0 - mean) / std).to(dev)  # normalised black, for translate
        self.streamed = train_cfg.loader == "ffcv"
        self.beton = None
        if self.streamed:
            from workers import ffcv_loader
            self.beton = ffcv_loader.write_beton(x_train, y_train, train_cfg.ffcv_dir, train_cfg.ffcv_workers)
            self.x_train = None
            self._mean_dev, self._std_dev = mean.to(dev), std.to(dev)  # for normalize() per batch
        else:  # resident data, normalised once in the compute dtype
            self.x_train = normalize(x_train, mean, std, self.dtype, dev)
        self.y_train = torch.from_numpy(np.asarray(y_train, dtype=np.int64)).to(dev)
        self.x_target = normalize(x_target, mean, std, self.dtype, dev)
        self.y_target = torch.from_numpy(np.asarray(y_target, dtype=np.int64)).to(dev)
        # CPU template that per-model initial weights are drawn into.
        self._template = build_model(self.model_cfg, self.in_shape, self.num_classes)
        self._modules: dict[int, torch.nn.Module] = {}  # copies -> module on device
        self._compiled: dict[int, object] = {}
        self._steppers: dict[tuple[int, int], _Stepper] = {}
        self._ffcv_loaders: dict[tuple, object] = {}
        # Images per evaluation forward pass (all copies together).
        self.eval_images = 16384 if dev.type == "cuda" else 4096

    # ------------------------------------------------------------------ plumbing
    def _module(self, k: int) -> torch.nn.Module:
        """The k-copy module (built once per k, reused across units: compile happens once)."""
        if k not in self._modules:
            mod = build_model(self.model_cfg, self.in_shape, self.num_classes, copies=k)
            mod = mod.to(self.device, dtype=self.acc)
            if self.cfg.channels_last:
                mod = mod.to(memory_format=torch.channels_last)
            self._modules[k] = mod
            self._compiled[k] = torch.compile(mod) if self.cfg.compile else mod
        return self._modules[k]

    def _autocast(self, cache_enabled: bool = True):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)
        return contextlib.nullcontext()

    def _prep(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """[k*B, C, H, W] (model-major) -> the module's input: [B, C, H, W] or [k, B, C, H, W]."""
        if k == 1:
            return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x
        return x.view(k, -1, *self.in_shape)

    def _optimizer(self, params, lr: torch.Tensor | None = None) -> torch.optim.Optimizer:
        cfg = self.cfg
        kw = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        return torch.optim.SGD(params, lr=0.0 if lr is None else lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0, **kw)

    def _losses(self, out: torch.Tensor, y: torch.Tensor, k: int, bs: int) -> torch.Tensor:
        """Per-model mean training loss [k] of outputs [k, bs, C] (or [bs, C]) against y [k*bs]."""
        return F.cross_entropy(out.to(self.acc).reshape(k * bs, self.num_classes), y, reduction="none",
                               label_smoothing=self.cfg.label_smoothing).view(k, bs).mean(1)

    def _init_states(self, gens: list[torch.Generator]) -> list[dict]:
        states = []
        for g in gens:
            init_weights(self._template, g)
            states.append({k: v.clone() for k, v in self._template.state_dict().items()})
        return states

    # ------------------------------------------------------------------ public
    def train(self, masks: np.ndarray, seeds: np.ndarray, return_weights: bool = False) -> TrainResult:
        """Train one model per row of `masks` (bool [k, n], equal row sums) with `seeds` [k]."""
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
        if (sizes != sizes[0]).any():
            raise ValueError(
                f"masks have unequal sizes (row sums {sorted(set(sizes.tolist()))[:5]}): every mask in a "
                "unit must select the same number of examples")
        if sizes[0] == 0:
            raise ValueError("masks select no training examples")

        idx = torch.from_numpy(np.stack([np.flatnonzero(r) for r in masks])).to(self.device)
        chunk = self.cfg.models_per_step if self.cfg.engine == "batched" else 1
        parts = []
        for a in range(0, len(masks), chunk):
            gens = [torch.Generator().manual_seed(int(s)) for s in seeds[a:a + chunk]]
            if self.streamed:
                parts.append(self._train_streamed(idx[a:a + chunk], gens, return_weights))
            elif self.cfg.engine == "batched":
                parts.append(self._train_batched(idx[a:a + chunk], gens, return_weights))
            else:
                parts.append(self._train_single(idx[a], gens[0], return_weights))
        res = TrainResult(
            margins=np.concatenate([p[0] for p in parts]),
            train_acc=np.concatenate([p[1] for p in parts]),
            target_acc=np.concatenate([p[2] for p in parts]),
            loss=np.concatenate([p[3] for p in parts]),
            seconds=time.perf_counter() - t0,
            state_dicts=[sd for p in parts for sd in p[4]] if return_weights else None,
        )
        log.debug("trained %d models in %.2f s", len(masks), res.seconds)
        return res

    # ------------------------------------------------------------------ batched engine
    def _stepper(self, k: int, bs: int) -> "_Stepper":
        key = (k, bs)
        if key not in self._steppers:
            self._steppers[key] = _Stepper(self, k, bs)
        return self._steppers[key]

    def _train_batched(self, idx: torch.Tensor, gens: list[torch.Generator], return_weights: bool):
        """k models in lockstep: one k-copy module; model j's batch is slice j of [k, bs, ...]."""
        cfg, dev = self.cfg, self.device
        k, m = idx.shape
        bs, steps = _batching(m, cfg.batch_size)
        stepper = self._stepper(k, bs)
        stepper.reset(stack_states(self._init_states(gens)))
        step = 0
        for epoch in range(cfg.epochs):
            ds = [draw_epoch(g, m, cfg, self.in_shape[1:]) for g in gens]
            d = {key: torch.stack([x[key] for x in ds]).to(dev, non_blocking=True) for key in ds[0]}
            stepper.loss_sum.zero_()
            for s in range(steps):
                sl = slice(s * bs, (s + 1) * bs)
                stepper.step(idx, {key: v[:, sl] for key, v in d.items()}, lr_at(step, steps, cfg))
                step += 1
        loss = (stepper.loss_sum / steps).cpu().numpy().astype(np.float32)
        margins, train_acc, target_acc = self._evaluate(stepper.module, idx)
        states = unstack_states(stepper.module.state_dict(), k) if return_weights else []
        return margins, train_acc, target_acc, loss, states

    # ------------------------------------------------------------------ single engine (reference)
    def _train_single(self, idx: torch.Tensor, gen: torch.Generator, return_weights: bool):
        """One model, written as the textbook loop; the batched engine must match it."""
        cfg = self.cfg
        m = idx.shape[0]
        model = self._module(1)
        fwd = self._compiled[1]
        model.load_state_dict(self._init_states([gen])[0])
        model.train()
        opt = self._optimizer(model.parameters())
        bs, steps = _batching(m, cfg.batch_size)
        step = 0
        for epoch in range(cfg.epochs):
            d = {key: v.to(self.device) for key, v in draw_epoch(gen, m, cfg, self.in_shape[1:]).items()}
            total = torch.zeros((), device=self.device)
            for s in range(steps):
                sl = slice(s * bs, (s + 1) * bs)
                ex = idx[d["perm"][sl]]
                aug = {key: v[sl] for key, v in d.items()}
                xb = self._prep(augment(self.x_train.index_select(0, ex), aug, cfg, self.pad), 1)
                with self._autocast():
                    out = fwd(xb)
                loss = F.cross_entropy(out.to(self.acc), self.y_train.index_select(0, ex),
                                       label_smoothing=cfg.label_smoothing)
                loss.backward()
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, steps, cfg)
                opt.step()
                opt.zero_grad(set_to_none=True)
                total += loss.detach()
                step += 1
        loss = (total / steps).cpu().numpy().astype(np.float32).reshape(1)
        margins, train_acc, target_acc = self._evaluate(model, idx.view(1, -1))
        states = unstack_states(model.state_dict(), 1) if return_weights else []
        return margins, train_acc, target_acc, loss, states

    # ------------------------------------------------------------------ streamed (FFCV) engine
    def _side_by_side(self, batches) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch from each model's loader -> (normalised images [k*b, C, H, W] in the compute
        dtype, labels [k*b]), model-major. Copies: FFCV reuses its batch buffers."""
        x = normalize(torch.cat([b[0] for b in batches]), self._mean_dev, self._std_dev, self.dtype, self.device)
        return x, torch.cat([b[1] for b in batches]).long()

    def _loader(self, slot: int, indices: np.ndarray, bs: int, seed: int, shuffle: bool):
        """The FFCV Loader of model slot `slot` (built once per slot / batch size / mode, then retargeted)."""
        from workers import ffcv_loader
        key = (slot, bs, shuffle, len(indices))
        if key not in self._ffcv_loaders:
            self._ffcv_loaders[key] = ffcv_loader.mask_loader(
                self.beton, indices, bs, seed, self.device, self.cfg.ffcv_workers, drop_last=shuffle, shuffle=shuffle)
            return self._ffcv_loaders[key]
        return ffcv_loader.retarget(self._ffcv_loaders[key], indices, seed)

    def _train_streamed(self, idx: torch.Tensor, gens: list[torch.Generator], return_weights: bool):
        """k >= 1 models in lockstep, each reading its mask's examples from the .beton.

        Same recipe as the resident engines, except the example order: FFCV shuffles each
        model's indices with its own seeded order (the seed is drawn from the model's
        generator), so the numbers are reproducible but not those of the resident path.
        Augmentation parameters still come from the model's generator, by position in the epoch.
        """
        cfg, dev = self.cfg, self.device
        k, m = idx.shape
        bs, steps = _batching(m, cfg.batch_size)
        module = self._module(k)
        fwd = self._compiled[k]
        module.load_state_dict(stack_states(self._init_states(gens)))
        module.train()
        opt = self._optimizer(module.parameters())
        rows = idx.cpu().numpy()
        seeds = [int(torch.randint(0, 2**31 - 1, (1,), generator=g)) for g in gens]
        loaders = [self._loader(j, rows[j], bs, seeds[j], True) for j in range(k)]
        step = 0
        for epoch in range(cfg.epochs):
            ds = [draw_epoch(g, m, cfg, self.in_shape[1:]) for g in gens]
            d = {key: torch.stack([x[key] for x in ds]).to(dev) for key in ds[0] if key != "perm"}
            total = torch.zeros(k, device=dev)
            for s, batches in enumerate(zip(*loaders)):
                xb, yb = self._side_by_side(batches)
                aug = {key: v[:, s * bs:(s + 1) * bs].reshape(k * bs, *v.shape[2:]) for key, v in d.items()}
                xb = self._prep(augment(xb, aug, cfg, self.pad), k)
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, steps, cfg)
                with self._autocast():
                    out = fwd(xb)
                losses = self._losses(out, yb, k, bs)
                losses.sum().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                total += losses.detach()
                step += 1
        loss = (total / steps).cpu().numpy().astype(np.float32)
        # train accuracy: each subset once, in order, all models' batches side by side
        plain = [self._loader(j, rows[j], min(m, 1024), 0, False) for j in range(k)]
        margins, train_acc, target_acc = self._evaluate(module, idx, train_batches=map(self._side_by_side, zip(*plain)))
        states = unstack_states(module.state_dict(), k) if return_weights else []
        return margins, train_acc, target_acc, loss, states

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _evaluate(self, module: torch.nn.Module, idx: torch.Tensor, train_batches=None):
        """Margins on the targets and accuracy on each model's own subset (eval mode, no aug).

        train_batches: for the streamed loader, an iterable of (x [k*b, C, H, W] normalised,
        y [k*b]) model-major batches covering each subset once; None reads the resident set.
        """
        module.eval()
        k, m = idx.shape
        nc = self.num_classes
        rows = max(1, self.eval_images // k)

        def forward(x):  # x [k*b, C, H, W] model-major (or [b, ...] shared by all copies)
            with self._autocast():
                if k == 1:
                    return module(self._prep(x, 1)).to(self.acc).view(1, -1, nc)
                return module(x.view(k, -1, *self.in_shape)).to(self.acc)

        logits = []
        for a in range(0, self.T, rows):
            x = self.x_target[a:a + rows]
            if k > 1:  # every copy sees the same targets
                x = x.unsqueeze(0).expand(k, *x.shape).reshape(-1, *self.in_shape)
            logits.append(forward(x))
        logits = torch.cat(logits, dim=1)  # [k, T, C]
        labels = self.y_target.expand(k, self.T)
        margins = margin(logits, labels, self.cfg.margin)
        target_acc = (logits.argmax(-1) == labels).float().mean(1)
        correct = torch.zeros(k, device=self.device)
        if train_batches is None:
            train_batches = ((self.x_train.index_select(0, ex), self.y_train.index_select(0, ex))
                             for ex in (idx[:, a:a + rows].reshape(-1) for a in range(0, m, rows)))
        for xb, yb in train_batches:
            correct += (forward(xb).argmax(-1) == yb.view(k, -1)).float().sum(1)
        module.train()
        return (margins.cpu().numpy().astype(np.float32), (correct / m).cpu().numpy().astype(np.float32),
                target_acc.cpu().numpy().astype(np.float32))


class _Stepper:
    """One training step of k copies at batch size bs, with static input buffers.

    Persistent per (k, bs): the module, the optimizer (momentum buffers zeroed at each new
    unit, which is exactly SGD's first step: buf = grad) and the buffers holding the step's
    example indices, augmentation parameters and learning rate. With cfg.cuda_graph on a
    GPU, the whole step (gather, augment, forward, backward, SGD) is captured once as a CUDA
    graph after three eager warm-up steps and replayed afterwards, removing per-kernel CPU
    launch cost; the numbers are those of the eager step.
    """

    WARMUP = 3

    def __init__(self, tr: Trainer, k: int, bs: int):
        self.tr, self.k, self.bs = tr, k, bs
        dev = tr.device
        self.module = tr._module(k)
        self.fwd = tr._compiled[k]
        self.use_graph = bool(tr.cfg.cuda_graph) and dev.type == "cuda"
        self.lr = torch.zeros((), device=dev) if self.use_graph else None
        self.opt = tr._optimizer(self.module.parameters(), lr=self.lr)
        self.ex = torch.zeros(k, bs, dtype=torch.long, device=dev)
        probe = draw_epoch(torch.Generator().manual_seed(0), 1, tr.cfg, tr.in_shape[1:])
        self.aug = {key: torch.zeros((k, bs, *v.shape[1:]), dtype=v.dtype, device=dev)
                    for key, v in probe.items() if key != "perm"}
        self.loss_sum = torch.zeros(k, device=dev)
        self.graph = None
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
        tr, k, bs = self.tr, self.k, self.bs
        ex = self.ex.view(-1)  # [k*bs], model-major
        aug = {key: v.view(k * bs, *v.shape[2:]) for key, v in self.aug.items()}
        xb = tr._prep(augment(tr.x_train.index_select(0, ex), aug, tr.cfg, tr.pad), k)
        with tr._autocast(cache_enabled=not self.use_graph):
            out = self.fwd(xb)  # [k, bs, nc] (or [bs, nc] for k = 1)
        losses = tr._losses(out, tr.y_train.index_select(0, ex), k, bs)
        losses.sum().backward()
        self.opt.step()
        self.loss_sum += losses.detach()

    def step(self, idx: torch.Tensor, draws: dict, lr: float) -> None:
        """One SGD step; draws hold this step's [k, bs, ...] slices of the epoch draws."""
        torch.gather(idx, 1, draws["perm"], out=self.ex)
        for key, buf in self.aug.items():
            buf.copy_(draws[key])
        if not self.use_graph:
            for group in self.opt.param_groups:
                group["lr"] = lr
            self._body()
            self.opt.zero_grad(set_to_none=True)
            return
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


# ============================================================================ naive baseline
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


def naive_train_one(model_cfg, train_cfg, x_train, y_train, x_target, y_target, mask, seed) -> TrainResult:
    """The "naive path" for benchmarks: one model, host DataLoader, nothing kept between calls.

    Same recipe and random streams as the single engine (so the same numbers up to rounding),
    but every item goes through a per-item Dataset transform and a torch DataLoader and is
    copied to the device each step.
    """
    t0 = time.perf_counter()
    cfg = train_cfg
    cfg.validate()
    _check_arrays(x_train, y_train, x_target, y_target)
    dev = _resolve_device(cfg.device)
    in_shape = tuple(x_train.shape[1:])
    model_cfg = dict(model_cfg)
    nc = int(model_cfg.pop("num_classes", int(max(np.max(y_train), np.max(y_target))) + 1))
    mean, std = channel_stats(x_train)
    gen = torch.Generator().manual_seed(int(seed))
    model = init_weights(build_model(model_cfg, in_shape, nc), gen).to(dev)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    idx = np.flatnonzero(np.asarray(mask))
    m = len(idx)
    bs, steps = _batching(m, cfg.batch_size)
    ds = _SubsetImages(x_train, y_train, idx, cfg, mean, std)
    loader = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=False, drop_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          nesterov=cfg.nesterov and cfg.momentum > 0)
    dtype, acc = _DTYPES[cfg.precision]
    model = model.to(acc)
    amp = (torch.autocast(dev.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
           else contextlib.nullcontext())

    def prep(x):
        x = x.to(dev).to(dtype)
        return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x

    step = 0
    model.train()
    for epoch in range(cfg.epochs):
        ds.draws = draw_epoch(gen, m, cfg, in_shape[1:])
        total = 0.0
        for xb, yb in loader:
            with amp:
                out = model(prep(xb))
            loss = F.cross_entropy(out.to(acc), yb.to(dev), label_smoothing=cfg.label_smoothing)
            loss.backward()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, cfg)
            opt.step()
            opt.zero_grad(set_to_none=True)
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
        margins = margin(logits_t, yt, cfg.margin)
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
