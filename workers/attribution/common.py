"""Shared machinery of the attribution baselines: a functional view of one checkpoint,
per-example gradients of the model output (margin) or the training loss (torch.func:
functional_call + vmap + grad), seeded random projections, penultimate-layer features,
and the parameter selection (all parameters, or the final linear layer only).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from workers.devices import resolve_device
from workers.margins import MARGIN_KINDS, margin

log = logging.getLogger(__name__)

Tensor = torch.Tensor
DTYPES = {"float32": torch.float32, "float64": torch.float64}

# Settings every method accepts.
COMMON_DEFAULTS = {"device": None, "batch_size": 128, "seed": 0}


# --------------------------------------------------------------------------- params

def resolve_params(method: str, params: dict | None, defaults: dict) -> dict:
    """`defaults` (plus COMMON_DEFAULTS) overridden by `params`; unknown keys are a user
    mistake and raise one line naming the key and the accepted ones."""
    merged = {**COMMON_DEFAULTS, **defaults}
    params = dict(params or {})
    unknown = sorted(set(params) - set(merged))
    if unknown:
        raise ValueError(
            f"attribution method {method!r}: unknown param(s) {unknown}; accepted: {sorted(merged)}")
    merged.update(params)
    if merged["device"] is None:
        merged["device"] = str(resolve_device("auto"))
    return merged


def resolve_dtype(name: str, method: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"attribution method {method!r}: params.dtype={name!r} is not one of "
                         f"{sorted(DTYPES)}")
    return DTYPES[name]


def progress(iterable, desc: str, total: int | None = None):
    """tqdm bar that stays quiet when stderr is not a terminal."""
    return tqdm(iterable, desc=desc, total=total, disable=None, leave=False)


# --------------------------------------------------------------------------- outputs

def output_values(logits: Tensor, labels: Tensor, what: str, margin_kind: str) -> Tensor:
    """Per-example scalar [B] of `logits` [B, C].

    what="margin": the model output f of workers.margins.margin. That function computes in
    float32; for float64 models the same formula is evaluated here in float64 (so exact
    influence on float64 logistic regressions is not limited by float32 rounding).
    what="loss": the per-example training loss, cross-entropy.
    """
    if what == "loss":
        return F.cross_entropy(logits, labels, reduction="none")
    if what != "margin":
        raise ValueError(f"output {what!r} is not 'margin' or 'loss'")
    if logits.dtype != torch.float64:
        return margin(logits, labels, margin_kind)
    if margin_kind not in MARGIN_KINDS:
        raise ValueError(f"margin kind {margin_kind!r} is not one of {MARGIN_KINDS}")
    labels = labels.long().unsqueeze(-1)
    correct = logits.gather(-1, labels).squeeze(-1)
    others = logits.scatter(-1, labels, float("-inf"))
    if margin_kind == "logsumexp":
        rest = torch.logsumexp(others, dim=-1)
    else:
        rest = others.max(dim=-1).values
    return correct - rest


# --------------------------------------------------------------------------- model view

def last_linear(module: nn.Module) -> tuple[str, nn.Linear]:
    """The final nn.Linear of `module` in registration order (its "last layer")."""
    # nn.Linear, or a one-copy affine layer with the same parameters (workers.models.GroupedLinear)
    found = [(name, m) for name, m in module.named_modules()
             if isinstance(m, nn.Linear) or (getattr(m, "groups", None) == 1 and hasattr(m, "in_features")
                                             and getattr(m, "weight", None) is not None and m.weight.dim() == 2)]
    if not found:
        raise ValueError("params.layer='last' (and representer points) need an nn.Linear "
                         "final layer; the model has none")
    return found[-1]


def select_names(module: nn.Module, layer) -> list[str]:
    """Names of the parameters θ that gradients are taken with respect to.

    layer: "all" (every parameter), "last" (weight and bias of the final nn.Linear), or a
    list of parameter names / module-name prefixes.
    """
    names = [n for n, p in module.named_parameters()]
    if layer in (None, "all"):
        return names
    if layer == "last":
        prefix, lin = last_linear(module)
        return [f"{prefix}.{n}" if prefix else n for n, _ in lin.named_parameters()]
    if isinstance(layer, (list, tuple)):
        chosen = [n for n in names if any(n == s or n.startswith(s + ".") for s in layer)]
        if not chosen:
            raise ValueError(f"params.layer={layer!r} matches no parameter; names: {names}")
        return chosen
    raise ValueError(f"params.layer={layer!r} is not 'all', 'last' or a list of names")


@dataclass
class FunctionalModel:
    """One checkpoint as a pure function of the selected parameters θ.

    `params`/`buffers` hold every tensor of the checkpoint on `device` (in the
    checkpoint's floating dtype); `names` are the selected parameters. The module runs in
    eval mode, so BatchNorm uses its stored running statistics and dropout is off.
    """

    module: nn.Module
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    names: list[str]
    device: torch.device
    dtype: torch.dtype

    @property
    def shapes(self) -> list[torch.Size]:
        return [self.params[n].shape for n in self.names]

    @property
    def num_params(self) -> int:
        return sum(self.params[n].numel() for n in self.names)

    def theta(self) -> dict[str, Tensor]:
        return {n: self.params[n] for n in self.names}

    def theta_flat(self) -> Tensor:
        return torch.cat([self.params[n].reshape(-1) for n in self.names])

    def flat_slices(self) -> dict[str, slice]:
        """Where each selected parameter lies in theta_flat() and in a gradient row [P]."""
        at, start = {}, 0
        for n, shape in zip(self.names, self.shapes):
            at[n] = slice(start, start + math.prod(shape))
            start = at[n].stop
        return at

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        return {n: flat[at].view(self.params[n].shape) for n, at in self.flat_slices().items()}

    def flatten_batched(self, tensors: dict[str, Tensor]) -> Tensor:
        """{name: [B, *shape]} -> [B, P] in the order of `names`."""
        return torch.cat([tensors[n].reshape(tensors[n].shape[0], -1) for n in self.names], 1)

    def logits(self, theta: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.module, ({**self.params, **theta}, self.buffers), (x,))

    def prep(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return x.to(self.device, self.dtype), y.to(self.device).long()


def load_checkpoint(model_fn: Callable[[], nn.Module], state: dict, layer, device) -> FunctionalModel:
    """Functional view of `model_fn()` with every parameter and buffer taken from `state`."""
    module = model_fn().to(device).eval()
    pnames = [n for n, _ in module.named_parameters()]
    missing = [n for n in pnames if n not in state]
    if missing:
        raise ValueError(f"checkpoint lacks parameters {missing[:5]} of the model_fn() architecture")
    params = {n: state[n].detach().to(device) for n in pnames}
    dtype = next(iter(params.values())).dtype
    params = {n: t.to(dtype) if t.is_floating_point() else t for n, t in params.items()}
    buffers = {}
    for n, b in module.named_buffers():
        b = state.get(n, b).detach().to(device)
        buffers[n] = b.to(dtype) if b.is_floating_point() else b
    return FunctionalModel(module, params, buffers, select_names(module, layer),
                           torch.device(device), dtype)


# --------------------------------------------------------------------------- gradients

def batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def per_example_grads(fm: FunctionalModel, x: Tensor, y: Tensor, what: str,
                      margin_kind: str, batch_size: int, desc: str = "grads",
                      factored: bool = True) -> Iterator[tuple[slice, Tensor]]:
    """Yields (rows, G) with G [B, P] = ∇_θ out(z_i; θ) for the rows of (x, y).

    out is the margin (what="margin") or the cross-entropy training loss (what="loss").
    When the selected parameters are all affine layers (an MLP) and `factored`, G is built
    from the factored gradients (linear_factors: ∇_W = δ aᵀ, ∇_b = δ) into one buffer that
    every batch reuses: the same numbers as vmap's up to rounding, at P writes per example and
    no new [B, P] allocation per batch. G is valid until the next step: use or copy it first.
    """
    layers = _affine_layers(fm) if factored else None
    if layers is not None:
        steps = _built_grads(fm, layers, x, y, what, margin_kind, batch_size, desc)
        first = next(steps, None)
        if first is not None:          # None: the layers do not factor (linear_factors' cases)
            yield first
            yield from steps
            return

    def single(theta, xi, yi):
        logits = fm.logits(theta, xi.unsqueeze(0))
        return output_values(logits, yi.unsqueeze(0), what, margin_kind).squeeze(0)

    g = vmap(grad(single), in_dims=(None, 0, 0))
    theta = fm.theta()
    n = len(x)
    for rows in progress(batches(n, batch_size), desc, total=math.ceil(n / batch_size)):
        xb, yb = fm.prep(x[rows], y[rows])
        yield rows, fm.flatten_batched(g(theta, xb, yb)).detach()


def _built_grads(fm: FunctionalModel, layers: list[tuple[nn.Module, str | None, str | None]],
                 x: Tensor, y: Tensor, what: str, margin_kind: str, batch_size: int,
                 desc: str) -> Iterator[tuple[slice, Tensor]]:
    """per_example_grads' factored path over `layers` (_affine_layers'); yields nothing if the
    first batch does not factor."""
    at = fm.flat_slices()
    G = torch.empty(min(batch_size, len(x)), fm.num_params, dtype=fm.dtype, device=fm.device)
    out = output_fn(fm, y, what, margin_kind)
    for rows in progress(batches(len(x), batch_size), desc, total=math.ceil(len(x) / batch_size)):
        f = linear_factors(fm, x[rows], partial(_rows_of, out, rows), batch_size, layers)
        if f is None and rows.start == 0:
            return
        if f is None:       # never silently short: the caller has used the first batches already
            raise RuntimeError(f"per-example gradients: rows {rows.start}-{rows.stop} do not factor "
                               f"although the first batch did; set params.factored=false (trak, tracin)")
        B = rows.stop - rows.start
        for (_, w, b), (a, d) in zip(layers, f):
            if w is not None:
                i = a.shape[1] - (b is not None)
                torch.mul(d.unsqueeze(2), a[:, :i].unsqueeze(1), out=G[:B, at[w]].view(B, d.shape[1], i))
            if b is not None:
                G[:B, at[b]] = d
        yield rows, G[:B]


def _rows_of(out: Callable[[Tensor, slice], Tensor], rows: slice, logits: Tensor, r: slice) -> Tensor:
    """out(logits, rows r of the batch `rows`), r given as rows of the whole array."""
    return out(logits, slice(rows.start + r.start, rows.start + r.stop))


def stacked_grads(fm: FunctionalModel, x: Tensor, y: Tensor, what: str, margin_kind: str,
                  batch_size: int, project: Callable[[Tensor], Tensor] | None = None,
                  factored: bool = True) -> Tensor:
    """All per-example gradients [n, P] (or projected, [n, k]) on fm.device."""
    out = None
    for rows, G in per_example_grads(fm, x, y, what, margin_kind, batch_size, factored=factored):
        G = project(G) if project else G
        if out is None:
            out = torch.empty(len(x), G.shape[1], dtype=G.dtype, device=G.device)
        out[rows] = G
    assert out is not None, "no examples"
    return out


# Per-example gradients of affine layers in factored form: for a layer applied to one input
# vector a_i per example, ∇_W out(z_i) = δ_i a_iᵀ and ∇_b out(z_i) = δ_i (δ_i = ∂out/∂ layer output),
# so inner products of two sets of gradients need no [B, P] gradient at all:
#     G1 G2ᵀ = Σ_layers (Δ1 Δ2ᵀ) ∘ (Ã1 Ã2ᵀ),   ã = [a, 1] (weight and bias), a, or 1.
# That is exact (the same numbers as the dense product up to rounding), at Σ (in + out) instead
# of P multiply-adds per pair.

Factors = list[tuple[Tensor, Tensor]]   # per selected layer (Ã [n, in(+1)], Δ [n, out])


def _affine_layers(fm: FunctionalModel) -> list[tuple[nn.Module, str | None, str | None]] | None:
    """(module, name of its weight, name of its bias; None where not selected) for every module
    owning a selected parameter, if each is an affine layer (nn.Linear, or a one-copy
    GroupedLinear) and the selected parameters are its weight/bias only; else None."""
    chosen = set(fm.names)
    out, covered = [], set()
    for prefix, m in fm.module.named_modules():
        own = {f"{prefix}.{n}" if prefix else n for n, _ in m.named_parameters(recurse=False)}
        if not own & chosen:
            continue
        affine = isinstance(m, nn.Linear) or (getattr(m, "groups", None) == 1 and hasattr(m, "in_features"))
        w, b = f"{prefix}.weight" if prefix else "weight", f"{prefix}.bias" if prefix else "bias"
        if not affine or own & chosen - {w, b}:
            return None
        out.append((m, w if w in chosen else None, b if b in chosen else None))
        covered |= own & chosen
    return out if covered == chosen else None


def _capture(store: list, module, inp, output) -> None:
    """Forward hook: keeps (layer input, layer output), the output made to require grad (a
    leaf when no parameter does) so that ∂out/∂output can be taken."""
    if not output.requires_grad:
        output.requires_grad_(True)
    store.append((inp[0], output))


def output_fn(fm: FunctionalModel, y: Tensor, what: str, margin_kind: str) -> Callable[[Tensor, slice], Tensor]:
    """(logits of rows, rows) -> per-example out [B] (output_values' margin or loss)."""
    return lambda logits, rows: output_values(logits, y[rows].to(fm.device).long(), what, margin_kind)


def linear_factors(fm: FunctionalModel, x: Tensor, out: Callable[[Tensor, slice], Tensor],
                   batch_size: int, layers: list[tuple[nn.Module, str | None, str | None]] | None = None
                   ) -> Factors | None:
    """The per-example gradients of out(logits, rows) ([B], or [B, K]: K outputs per example,
    gradient rows ordered (example, k)) w.r.t. the selected parameters in factored form,
    [(Ã, Δ)] per layer; None when they do not factor (a selected parameter outside an affine
    layer, a layer used more than once or on an input that is not one vector per example).
    `layers`: _affine_layers(fm), when the caller has it already."""
    layers = _affine_layers(fm) if layers is None else layers
    if layers is None:
        return None
    parts: list[list[tuple[Tensor, Tensor]]] = [[] for _ in layers]
    for rows in batches(len(x), batch_size):
        seen: list[list[tuple[Tensor, Tensor]]] = [[] for _ in layers]
        handles = [m.register_forward_hook(partial(_capture, seen[i])) for i, (m, _, _) in enumerate(layers)]
        try:
            with torch.enable_grad():
                values = out(fm.logits(fm.theta(), x[rows].to(fm.device, fm.dtype)), rows)
                if any(len(s) != 1 or s[0][0].dim() != 2 for s in seen):
                    return None
                values = values.reshape(len(values), -1)                       # [B, K]
                K = values.shape[1]
                outs = [s[0][1] for s in seen]
                per_k = [torch.autograd.grad(values[:, k].sum(), outs, retain_graph=k < K - 1,
                                             allow_unused=True) for k in range(K)]
        finally:
            for h in handles:
                h.remove()
        for i, ((_, w, b), s) in enumerate(zip(layers, seen)):
            a = s[0][0].detach()
            d = torch.stack([torch.zeros_like(s[0][1]) if g[i] is None else g[i].detach() for g in per_k], 1)
            ones = torch.ones(len(a), 1, dtype=a.dtype, device=a.device)
            a = torch.cat([a, ones], 1) if w and b else a if w else ones   # names, or None
            parts[i].append((a.repeat_interleave(K, 0), d.reshape(-1, d.shape[-1])))
    return [(torch.cat([p[0] for p in ps]), torch.cat([p[1] for p in ps])) for ps in parts]


def factor_dots(f1: Factors, f2: Factors) -> Tensor:
    """G1 G2ᵀ [n1, n2] from the factored gradients of linear_factors."""
    return sum(((d1 @ d2.T) * (a1 @ a2.T) for (a1, d1), (a2, d2) in zip(f1, f2)),
               torch.zeros(len(f1[0][0]), len(f2[0][0]), dtype=f1[0][0].dtype, device=f1[0][0].device))


@torch.no_grad()
def forward_all(fm: FunctionalModel, x: Tensor, batch_size: int,
                features: bool = False) -> tuple[Tensor, Tensor | None]:
    """Logits [n, C] and, if asked, the input of the final nn.Linear [n, d]."""
    captured = []
    handle = None
    if features:
        _, lin = last_linear(fm.module)
        handle = lin.register_forward_hook(lambda m, inp, out: captured.append(inp[0].reshape(inp[0].shape[0], -1)))
    try:
        logits = [fm.logits(fm.theta(), x[r].to(fm.device, fm.dtype)) for r in batches(len(x), batch_size)]
    finally:
        if handle is not None:
            handle.remove()
    return torch.cat(logits), (torch.cat(captured) if features else None)


# --------------------------------------------------------------------------- projection

class Projector:
    """x ↦ x R / √k with R ∈ R^{P×k} i.i.d. N(0, 1) ("gaussian") or ±1 ("rademacher").

    The 1/√k scale makes inner products unbiased (E[RRᵀ]/k = I), so projected TracIn
    dot products estimate the exact ones; TRAK's score with λ = 0 does not depend on it.
    R is generated in row blocks of ⌊block_entries/k⌋ rows, block b from a generator seeded
    with (seed, b), in float32 on `device`: the same (seed, block_entries, device) gives the
    same R. The whole R is kept when it fits in `cache_bytes`, else blocks are regenerated
    for every batch (same R either way).
    """

    def __init__(self, num_params: int, dim: int, kind: str, seed: int, device,
                 cache_bytes: int = 1 << 30, block_entries: int = 1 << 24):
        if kind not in ("gaussian", "rademacher"):
            raise ValueError(f"params.proj_type={kind!r} is not 'gaussian' or 'rademacher'")
        if dim < 1:
            raise ValueError(f"params.proj_dim={dim} must be a positive integer (or None)")
        self.P, self.k, self.kind, self.seed = num_params, dim, kind, seed
        self.device = torch.device(device)
        self.rows = max(1, min(num_params, block_entries // dim))
        self.cache = None
        if num_params * dim * 4 <= cache_bytes:
            self.cache = torch.cat([self._block(b) for b in range(self.num_blocks)])

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.P / self.rows)

    def _block(self, b: int) -> Tensor:
        r0, r1 = b * self.rows, min(self.P, (b + 1) * self.rows)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(self.seed) * 1_000_003 + b)
        if self.kind == "gaussian":
            R = torch.randn(r1 - r0, self.k, generator=gen, device=self.device)
        else:
            R = torch.randint(0, 2, (r1 - r0, self.k), generator=gen, device=self.device).float() * 2 - 1
        return R / math.sqrt(self.k)

    def matrix(self) -> Tensor:
        """R / √k as one [P, k] tensor (for tests and cross-checks)."""
        return self.cache if self.cache is not None else torch.cat(
            [self._block(b) for b in range(self.num_blocks)])

    def __call__(self, G: Tensor) -> Tensor:
        if self.cache is not None:
            return G @ self.cache.to(G.dtype)
        out = torch.zeros(G.shape[0], self.k, dtype=G.dtype, device=G.device)
        for b in range(self.num_blocks):
            r0, r1 = b * self.rows, min(self.P, (b + 1) * self.rows)
            out += G[:, r0:r1] @ self._block(b).to(G.dtype)
        return out


def projection_seed(seed: int, checkpoint: int) -> int:
    """Seed of checkpoint k's projection: each checkpoint gets its own matrix."""
    return int(seed) * 10_007 + checkpoint


def make_projector(p: dict, num_params: int, checkpoint: int) -> Projector | None:
    """Checkpoint `checkpoint`'s projector; params.proj_dim None -> no projection."""
    if p.get("proj_dim") is None:
        return None
    return Projector(num_params, int(p["proj_dim"]), p["proj_type"],
                     projection_seed(p["seed"], checkpoint), p["device"])


def to_numpy_scores(scores: Tensor) -> np.ndarray:
    return scores.detach().to("cpu", torch.float32).numpy()
