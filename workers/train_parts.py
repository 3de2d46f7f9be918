"""What the training engine (workers.train) and the reference engines (workers.train_reference)
both use: the recipe's pieces (learning-rate schedule, batching, each epoch's random draws,
augmentation, normalisation, input checks; `Recipe` binds them to a device and input shape),
the training set resident on the device (`ResidentBatches`) and the result (`TrainResult`).
It imports neither engine: workers.train imports workers.train_reference, never the reverse.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from workers.recipe import PRECISIONS, TrainConfig

__all__ = ["DTYPES", "CopywiseSGD", "Recipe", "ResidentBatches", "TrainResult", "augment", "batching", "channel_stats",
           "check_arrays", "draw_epoch", "lr_at", "normalize"]


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
    self_margins: np.ndarray | None = None   # float32 [k, n]: margins on the training examples themselves
    self_correct: np.ndarray | None = None   # bool [k, n]: whether each is classified right (its own label)

    @classmethod
    def concat(cls, parts: list[TrainResult], seconds: float) -> TrainResult:
        """The results of consecutive groups of models as one (state dicts kept if every part
        has them, and so the margins on the training examples)."""
        weights = all(p.state_dicts is not None for p in parts)
        own = all(p.self_margins is not None for p in parts)
        return cls(margins=np.concatenate([p.margins for p in parts]),
                   train_acc=np.concatenate([p.train_acc for p in parts]),
                   target_acc=np.concatenate([p.target_acc for p in parts]),
                   loss=np.concatenate([p.loss for p in parts]), seconds=seconds,
                   state_dicts=[sd for p in parts for sd in p.state_dicts or []] if weights else None,
                   self_margins=np.concatenate([p.self_margins for p in parts]) if own else None,  # type: ignore[misc]
                   self_correct=np.concatenate([p.self_correct for p in parts]) if own else None)  # type: ignore[misc]

    def take(self, order: np.ndarray) -> TrainResult:
        """The models in `order` (indices into this result)."""
        sds = None if self.state_dicts is None else [self.state_dicts[int(i)] for i in order]
        return TrainResult(self.margins[order], self.train_acc[order], self.target_acc[order], self.loss[order],
                           self.seconds, sds,
                           None if self.self_margins is None else self.self_margins[order],
                           None if self.self_correct is None else self.self_correct[order])


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


class CopywiseSGD(torch.optim.SGD):
    """The fused SGD on the CPU, applied to each copy's slice of a k-copy parameter as a
    tensor of its own, so that a model's bits do not depend on which models shared its unit.

    The CPU fused kernel computes the vectorised body of a tensor and its last few elements
    (numel mod the vector width) in different code, whose roundings differ (FMA or not): run
    over the whole [k*...] parameter, the copy that fell in that tail came out otherwise than
    when trained beside other models (3e-8 after the tiny recipe; retraining a lost model
    must give back the same bytes). Per copy, the split falls at the same place whatever k
    is (k >= 2; a model trained alone runs other GEMM kernels and agrees to rounding). With
    the views of parameters and buffers made once, it runs at 0.995x the speed of the fused
    SGD over whole parameters on the CPU preset (bench/train_throughput.py --preset; 0.911x
    when the views were made every step). Momentum buffers exist from the start, zero: SGD's
    first step (buf = grad) is then the general one.
    """

    def __init__(self, params, copies: int, **kw) -> None:
        super().__init__(params, fused=True, **kw)
        self.copies = copies
        self._views: dict[torch.Tensor, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.numel() % copies:
                    raise ValueError(f"a parameter of shape {tuple(p.shape)} is not laid out per copy (k={copies})")
                bufs: list[torch.Tensor] = []
                if self.defaults["momentum"]:
                    buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    bufs = self._split(buf)
                self._views[p] = (self._split(p), bufs)

    def _split(self, t: torch.Tensor) -> list[torch.Tensor]:
        return list(t.view(self.copies, -1).unbind(0))

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None
        for group in self.param_groups:
            ps: list[torch.Tensor] = []
            gs: list[torch.Tensor] = []
            bufs: list[torch.Tensor] = []
            for p in group["params"]:
                if p.grad is not None:
                    views, buf_views = self._views[p]
                    ps += views
                    gs += self._split(p.grad)
                    bufs += buf_views
            if ps:     # one device, one dtype: torch's kernel directly, without the functional's grouping
                torch._fused_sgd_(ps, gs, bufs, weight_decay=group["weight_decay"], momentum=group["momentum"],
                                  lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                                  maximize=group["maximize"], is_first_step=False)
        return None


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

    def optimizer(self, params, lr: torch.Tensor | None = None, copies: int = 1) -> torch.optim.Optimizer:
        """SGD over a module's parameters; `copies` > 1: the k-copy module, every parameter
        laid out copy-major ([k*...]). Fused (one pass over each parameter per step: weight
        decay, momentum, update) on CUDA and the CPU; on the CPU demo MLP the multi-tensor
        form's passes were 19% of a step (bench/RESULTS.md, issue 28)."""
        cfg = self.cfg
        kw: dict = dict(lr=0.0 if lr is None else lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                        nesterov=cfg.nesterov and cfg.momentum > 0)
        if self.device.type == "cpu":
            return CopywiseSGD(params, copies, **kw)
        return torch.optim.SGD(params, **kw, **({"fused": True} if self.device.type == "cuda" else {"foreach": True}))

    def losses(self, out: torch.Tensor, y: torch.Tensor, k: int, bs: int) -> torch.Tensor:
        """Per-model mean training loss [k] of outputs [k, bs, C] (or [bs, C]) against y [k*bs]."""
        return F.cross_entropy(out.to(self.acc).reshape(k * bs, self.num_classes), y, reduction="none",
                               label_smoothing=self.cfg.label_smoothing).view(k, bs).mean(1)


# ============================================================================ the resident training set
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
