"""Networks the shipped tasks train: the datamodels/ffcv ResNet-9 and a small MLP.

Every network takes `copies=k`: k independent models laid side by side as one module
(grouped convolutions, per-copy BatchNorm channels, batched matmuls) that maps
[k, B, C, H, W] to [k, B, classes], so k models train in lockstep with ordinary autograd
and optimizers. Copy j owns slice j of dim 0 of every parameter and buffer;
`stack_states` / `unstack_states` convert to and from k plain (copies=1) models.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GroupedLinear",
    "MLP",
    "ResNet9",
    "build_model",
    "forward_flops",
    "init_weights",
    "stack_states",
    "unstack_states",
]


# ----------------------------------------------------------------------------- layers
class GroupedLinear(nn.Module):
    """k independent affine maps y_j = x_j W_j^T + b_j applied to input [k, B, in] -> [k, B, out].

    The weight is stored as [k*out, in] (copy j = rows j*out:(j+1)*out), so with k = 1 the
    state dict is exactly nn.Linear's and the forward is F.linear on [B, in].
    """

    def __init__(self, in_features: int, out_features: int, groups: int = 1, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.weight = nn.Parameter(torch.empty(groups * out_features, in_features))
        self.bias = nn.Parameter(torch.empty(groups * out_features)) if bias else None
        with torch.no_grad():
            init_weights(self, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups == 1 and x.dim() == 2:
            return F.linear(x, self.weight, self.bias)
        if not torch.is_autocast_enabled(x.device.type):
            return _GroupedAffine.apply(x, self.weight, self.bias, self.groups)
        # under autocast (bf16 on a GPU) autograd's own backward, which follows the casts
        k, o = self.groups, self.out_features
        w = self.weight.view(k, o, self.in_features).transpose(1, 2)  # [k, in, out]
        if self.bias is None:
            return torch.bmm(x, w)
        return torch.baddbmm(self.bias.view(k, 1, o), x, w)


class _GroupedAffine(torch.autograd.Function):
    """y = x W_jᵀ + b_j per copy, with a backward that writes the weight's gradient in the
    weight's own layout [k*out, in]. Autograd's backward of the batched matmul computes it
    transposed, as [k, in, out], and then copies it into that layout on every step: on the
    CPU demo MLP that copy was 18% of a training step (bench/RESULTS.md, issue 28)."""

    @staticmethod
    def forward(ctx, x, weight, bias, k):
        w = weight.view(k, -1, weight.shape[1])                  # [k, out, in]
        ctx.save_for_backward(x, w)
        ctx.has_bias = bias is not None
        if bias is None:
            return torch.bmm(x, w.transpose(1, 2))
        return torch.baddbmm(bias.view(k, 1, -1), x, w.transpose(1, 2))

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx = torch.bmm(g, w) if ctx.needs_input_grad[0] else None
        gw = torch.bmm(g.transpose(1, 2), x).view(-1, w.shape[2]) if ctx.needs_input_grad[1] else None
        gb = g.sum(1).view(-1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


class _Residual(nn.Module):
    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _conv_bn(cin: int, cout: int, k: int, kernel: int = 3, stride: int = 1, padding: int = 1):
    """conv (no bias) -> BatchNorm -> ReLU, for `k` copies side by side (groups=k)."""
    return nn.Sequential(
        nn.Conv2d(k * cin, k * cout, kernel, stride=stride, padding=padding, groups=k, bias=False),
        nn.BatchNorm2d(k * cout),
        nn.ReLU(inplace=True),
    )


# ----------------------------------------------------------------------------- networks
class ResNet9(nn.Module):
    """The datamodels/ffcv ResNet-9 (KakaoBrain lineage), optionally k copies side by side.

    conv-bn-relu C->64 k3 | conv-bn-relu 64->128 k5 s2 p2 | residual(2 x conv-bn-relu 128)
    | conv-bn-relu 128->256 k3 + max-pool 2 | residual(2 x conv-bn-relu 256)
    | conv-bn-relu 256->128 k3 p0 | adaptive max-pool 1 | flatten | linear 128->10 (no bias)
    | x 0.2.  Channel counts scale with `width`; 2 274 880 parameters at width 1 (C=3).
    Input [B, C, H, W] -> [B, classes] for one copy; [k, B, C, H, W] -> [k, B, classes]
    for k copies (run as grouped convolutions on [B, k*C, H, W]).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, copies: int = 1):
        super().__init__()
        c1, c2, c3 = (max(1, round(c * width)) for c in (64, 128, 256))
        k = copies
        self.copies, self.num_classes, self.features = k, num_classes, c2
        self.body = nn.Sequential(
            _conv_bn(in_channels, c1, k, 3, 1, 1),
            _conv_bn(c1, c2, k, 5, 2, 2),
            _Residual(_conv_bn(c2, c2, k), _conv_bn(c2, c2, k)),
            _conv_bn(c2, c3, k, 3, 1, 1),
            nn.MaxPool2d(2),
            _Residual(_conv_bn(c3, c3, k), _conv_bn(c3, c3, k)),
            _conv_bn(c3, c2, k, 3, 1, 0),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.linear = GroupedLinear(c2, num_classes, groups=k, bias=False)
        self.scale = 0.2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.copies == 1:
            return self.linear(self.body(x)) * self.scale
        k, b, c, hh, ww = x.shape
        # [k, B, C, H, W] -> [B, k*C, H, W] (copy j on channels j*C:(j+1)*C), written
        # directly in the memory format the parameters use.
        if self.body[0][0].weight.is_contiguous(memory_format=torch.channels_last):  # type: ignore[index]
            x = x.permute(1, 3, 4, 0, 2).reshape(b, hh, ww, k * c).permute(0, 3, 1, 2)
        else:
            x = x.transpose(0, 1).reshape(b, k * c, hh, ww)
        h = self.body(x).view(b, k, self.features).transpose(0, 1)  # [k, B, c2]
        return self.linear(h) * self.scale  # [k, B, classes]


class MLP(nn.Module):
    """Flatten -> (linear -> ReLU) per hidden width -> linear, optionally k copies side by side.

    Input [B, ...] -> [B, classes] for one copy; [k, B, ...] -> [k, B, classes] for k copies.
    """

    def __init__(self, in_features: int, hidden=(64,), num_classes: int = 10, copies: int = 1):
        super().__init__()
        self.copies, self.in_features, self.num_classes = copies, in_features, num_classes
        widths = [in_features, *[int(h) for h in hidden], num_classes]
        self.layers = nn.ModuleList(
            GroupedLinear(a, b, groups=copies) for a, b in zip(widths[:-1], widths[1:])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.copies == 1:
            h = x.reshape(x.shape[0], self.in_features)
        else:
            h = x.reshape(self.copies, x.shape[1], self.in_features)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = F.relu(h)
        return h


def build_model(cfg: dict, in_shape: tuple[int, int, int], num_classes: int, copies: int = 1) -> nn.Module:
    """Build the network named by cfg["name"] ("mlp" | "resnet9"); other keys are its kwargs."""
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    c, h, w = in_shape
    if name == "mlp":
        return MLP(c * h * w, hidden=tuple(cfg.pop("hidden", (64,))), num_classes=num_classes,
                   copies=copies, **cfg)
    if name == "resnet9":
        return ResNet9(num_classes=num_classes, in_channels=c, copies=copies, **cfg)
    raise ValueError(f"model name {name!r} is unknown: set model.name to 'mlp' or 'resnet9'")


# ----------------------------------------------------------------------------- weights
@torch.no_grad()
def init_weights(module: nn.Module, generator: torch.Generator | None) -> nn.Module:
    """PyTorch's default initialisation, drawn from `generator` in module order.

    Conv / linear weights: kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), +);
    biases U(-1/sqrt(fan_in), +); BatchNorm weight 1, bias 0, running stats reset.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, GroupedLinear)):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
            if m.bias is not None:
                fan_in = m.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


def stack_states(states: list[dict]) -> dict:
    """k single-model state dicts -> the state dict of the k-copy module (concat on dim 0)."""
    out = {}
    for key, v in states[0].items():
        if v.dim() == 0:  # BatchNorm num_batches_tracked: shared counter
            out[key] = v.clone()
        else:
            out[key] = torch.cat([s[key] for s in states], dim=0)
    return out


def unstack_states(state: dict, k: int) -> list[dict]:
    """The state dict of a k-copy module -> k single-model state dicts (CPU, contiguous)."""
    outs: list[dict] = [{} for _ in range(k)]
    for key, v in state.items():
        v = v.detach().to("cpu")
        parts = [v.clone()] * k if v.dim() == 0 else v.chunk(k, dim=0)
        for j in range(k):
            outs[j][key] = parts[j].clone().contiguous()
    return outs


def forward_flops(model: nn.Module, in_shape: tuple[int, int, int]) -> float:
    """FLOPs (2 x multiply-adds of conv and linear layers) of one forward pass, one example."""
    total = 0

    def conv_hook(m, inp, out):
        nonlocal total
        total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def lin_hook(m, inp, out):
        nonlocal total
        total += out.numel() * m.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, GroupedLinear):
            hooks.append(m.register_forward_hook(lin_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            k = getattr(model, "copies", 1)
            p = next(model.parameters())
            shape = (1, *in_shape) if k == 1 else (k, 1, *in_shape)
            model(torch.zeros(shape, device=p.device, dtype=p.dtype))
    finally:
        for hk in hooks:
            hk.remove()
        model.train(was_training)
    return 2.0 * total / getattr(model, "copies", 1)
