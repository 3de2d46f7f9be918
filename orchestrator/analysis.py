"""Analyses of a fitted experiment that need no Ray: stage=leakage, stage=embedding, stage=compare.

leakage    each target's top-weight training examples beside it, and the (target, training
           example) pairs that are near-duplicates in input space (train/test leakage);
embedding  PCA of the unit-norm datamodel weights of all targets, the targets at both ends of
           the leading components, and its spectrum beside that of the model's own last layer;
compare    the per-target cosine similarity of this experiment's datamodels and another's (a
           second recipe on the same training set and targets), and where they disagree most.
Each stage's settings are a dataclass here (`setting(...)` with its rules); the heavy parts are
vectorised over targets in torch, and the nearest-neighbour search runs in bounded blocks.
The settings' dataclasses import neither torch nor the orchestrator, so the schema can take them.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from workers.settings import SettingError, check, setting

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
ROWS = 1024          # rows of a weight matrix per block where a computation copies them

__all__ = ["AnalysisError", "CompareConf", "EmbeddingConf", "LeakageConf", "compare_stage", "cosine_rows",
           "embedding_stage", "find_leakage", "leakage_stage", "nearest", "pca", "robust_threshold"]


class AnalysisError(RuntimeError):
    """An input an analysis stage cannot use: one line naming the setting or the missing output."""


# ----------------------------------------------------------------------------- settings

@dataclass
class LeakageConf:
    """stage=leakage. The measure is the cosine similarity of the centred, normalised pixel
    vectors (each image minus its own mean, over its norm: Pearson's r between two images,
    blind to brightness and contrast, 1 for a copy). `threshold` None: the robust rule of
    `robust_threshold` with `spread`."""
    targets: int = setting(200, lo=1, example=200)            # the first `targets` targets are analysed
    top: int = setting(5, lo=1, example=5)                    # top-weight examples per target
    neighbours: int = setting(5, lo=1, example=5)             # nearest training examples kept per target
    threshold: float | None = setting(None, lo=-1.0, hi=1.0, example=0.98)
    spread: float = setting(4.0, lo=0.0, lo_open=True, example=4.0)
    show: int = setting(24, lo=0, example=24)                 # flagged pairs drawn
    show_targets: int = setting(6, lo=0, example=6)           # targets drawn beside their top examples
    block: int = setting(4096, lo=1, example=4096)            # rows per block of the neighbour search
    device: str = setting("auto", example="cpu")


@dataclass
class EmbeddingConf:
    """stage=embedding: PCA of the unit-norm datamodel weights (and of the targets'
    penultimate features from train checkpoint `checkpoint`, when `features`); all-zero
    datamodels are left out of it."""
    components: int = setting(3, lo=1, example=3)             # leading components drawn and described
    extremes: int = setting(6, lo=1, example=6)               # targets drawn at each end of a component
    spectrum: int = setting(20, lo=1, example=20)             # explained-variance ratios reported
    features: bool = setting(True)
    checkpoint: int = setting(0, lo=0, example=0)
    device: str = setting("auto", example="cpu")


@dataclass
class CompareConf:
    """stage=compare: this experiment's datamodels against those of `other` (its run
    directory or store URI), target by target."""
    other: str | None = setting(None, example="runs/fmnist_mlp-<hash>")
    show: int = setting(4, lo=0, example=4)                   # most-disagreeing targets drawn
    top: int = setting(5, lo=1, example=5)                    # top examples per datamodel drawn and overlapped


def make_conf(cls, settings: dict | None, section: str):
    """The `cls` dataclass of a stage's settings (a plain dict, as the schema gives it), with
    every rule checked: ConfigError naming `<section>.<key>` otherwise."""
    from orchestrator.config import ConfigError
    settings = dict(settings or {})
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]} is not a setting of stage={section}; its settings are "
                          f"{', '.join(names)}")
    conf = cls(**settings)
    try:
        check(conf, f"{section}.")
    except SettingError as err:
        raise ConfigError(str(err)) from None
    return conf


# ----------------------------------------------------------------------------- inputs

def _images(plan, stage: str, needed: bool = True):
    """(x_train, y_train, x_target, y_target, class names) of the task, or None (a task
    without images) where `needed` is false."""
    from orchestrator.evaluate import task_class_names
    try:
        x_tr, y_tr, x_tg, y_tg, num_classes = plan.task.arrays()
    except (AttributeError, TypeError, ValueError):
        if needed:
            raise AnalysisError(f"{stage}: the task has no images (task.arrays()); {stage} compares training "
                                f"examples in input space, so it needs an image task (e.g. task=fmnist_mlp)") from None
        return None
    return x_tr, y_tr, x_tg, y_tg, task_class_names(plan.task, int(num_classes))


def _label(names, y) -> str:
    return names[int(y)] if names is not None and 0 <= int(y) < len(names) else str(int(y))


def _write_csv(ctx, rel: str, header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    ctx.plan.store.write_bytes(rel, buf.getvalue().encode())
    path = os.path.join(ctx.scratch, rel)
    with open(path, "w") as f:
        f.write(buf.getvalue())
    ctx.tracker.log_artifact(path)
    return rel


# ----------------------------------------------------------------------------- plots

def plot_rows(rows: list[tuple[str, list]], title: str, path: str) -> dict:
    """A grid of images, one row per (label, cells); a cell is (image, caption, colour),
    (None, text, colour) (a note in place of an image) or None (an empty gap). Every image is
    captioned; the row's label is left of its first cell; the title is wrapped to the width."""
    import textwrap

    from orchestrator.evaluate import _plt, _save, _show
    plt = _plt()
    cols = max([len(c) for _, c in rows] + [1])
    width = 1.2 * cols + 1.8
    lines = max([1] + [len(cell[1].split("\n")) for _, cells in rows for cell in cells if cell is not None])
    fig, axes = plt.subplots(max(len(rows), 1), cols, squeeze=False, layout="constrained",
                             figsize=(width, (1.25 + 0.14 * lines) * max(len(rows), 1) + 0.8))
    for r, (label, cells) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            cell = cells[c] if c < len(cells) else None
            if cell is None:
                ax.axis("off")
                continue
            img, caption, color = cell
            if img is None:
                ax.axis("off")
                ax.text(0.5, 0.5, caption, ha="center", va="center", fontsize=8, color=color, wrap=True,
                        transform=ax.transAxes)
                continue
            _show(ax, img)
            ax.set_title(caption, fontsize=8, pad=2, color=color)
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9, labelpad=8)
    chars = max(40, int(width * 72 / (0.55 * 9)))
    fig.suptitle("\n".join(line for para in title.split("\n") for line in textwrap.wrap(para, chars)), fontsize=9)
    return _save(fig, path)


def plot_spectra(spectra: dict[str, np.ndarray], path: str) -> dict:
    """Explained variance ratio against component (integer ticks), one line per
    representation (log y)."""
    from matplotlib.ticker import MaxNLocator

    from orchestrator.evaluate import _plt, _save
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.8, 4.3))
    for (name, evr), color in zip(spectra.items(), ("tab:blue", "tab:orange", "tab:green")):
        evr = np.asarray(evr)
        ax.plot(np.arange(1, len(evr) + 1), evr, "-o", markersize=4, color=color,
                label=f"{name} (first {len(evr)}: {evr.sum():.2f} of the variance)")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=10, steps=[1, 2, 5, 10]))
    ax.set_xlabel("principal component", fontsize=10)
    ax.set_ylabel("explained variance ratio", fontsize=10)
    ax.tick_params(labelsize=9)
    ax.set_title("Spectrum of the targets: datamodel weights and the model's last layer", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8.5)
    return _save(fig, path)


# ----------------------------------------------------------------------------- leakage

def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row flattened, minus its own mean, over its norm (float32); a constant row is 0."""
    x = x.reshape(len(x), -1).float()
    x = x - x.mean(1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def nearest(x_target, x_train, k: int, block: int = 4096, device: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(similarity float32 [T, k], training ids int64 [T, k]) of each target's k nearest
    training examples by the cosine similarity of the centred, normalised pixel vectors,
    most similar first. Blocks of `block` targets against blocks of `block` training
    examples, with a running top-k: memory O(block² + T·k), never T × n."""
    import torch

    from workers.devices import resolve_device
    dev = resolve_device(device)
    x_target, x_train = np.asarray(x_target), np.asarray(x_train)
    k = min(int(k), len(x_train))
    sims, ids = [], []
    for a in range(0, len(x_target), block):
        q = unit_rows(torch.tensor(np.ascontiguousarray(x_target[a:a + block]), device=dev))
        best_s = torch.empty((len(q), 0), device=dev)
        best_i = torch.empty((len(q), 0), dtype=torch.int64, device=dev)
        for b in range(0, len(x_train), block):
            s = q @ unit_rows(torch.tensor(np.ascontiguousarray(x_train[b:b + block]), device=dev)).T
            top_s, top_i = s.topk(min(k, s.shape[1]), dim=1)
            cat_s, cat_i = torch.cat([best_s, top_s], 1), torch.cat([best_i, top_i + b], 1)
            best_s, pos = cat_s.topk(min(k, cat_s.shape[1]), dim=1)
            best_i = cat_i.gather(1, pos)
        sims.append(best_s.cpu().numpy())
        ids.append(best_i.cpu().numpy())
    return np.concatenate(sims).astype(np.float32), np.concatenate(ids).astype(np.int64)


def robust_threshold(nearest_similarity: np.ndarray, spread: float = 4.0) -> float:
    """The similarity above which a pair is a near-duplicate, from the distribution itself.

    A near-duplicate is an outlier of the targets' nearest-neighbour similarities: its
    dissimilarity d = 1 − s is many times smaller than a typical target's. On log d (where a
    copy, d ≈ 0, and a natural look-alike, d ≈ 0.02-0.1, are far apart) the rule is the robust
    z-score: flag log d < median − spread · MAD (MAD scaled by 1.4826 to a standard deviation),
    i.e. s > 1 − exp(median(log d) − spread · MAD). It holds while fewer than half the targets
    are leaked. A fixed cosine does not carry across datasets: with spread 4, Fashion-MNIST
    (n=1000, 200 targets) gets 0.993 and flags none of its natural look-alikes (nearest
    similarity at most 0.979, 18 above 0.95), digits (n=300, 50 targets) gets 0.982 (at most
    0.964); a copy with pixel noise of sd 3 (of 255) stays above 0.99 on both."""
    d = np.clip(1.0 - np.asarray(nearest_similarity, np.float64), 1e-6, None)
    ld = np.log(d)
    med = float(np.median(ld))
    mad = 1.4826 * float(np.median(np.abs(ld - med)))
    return float(1.0 - np.exp(med - spread * mad))


def weight_ranks(W: np.ndarray, targets: np.ndarray, train_ids: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Rank of training example train_ids[j] in the datamodel of targets[j] by weight (1 = the
    largest weight; ties share the best rank), in chunks of pairs."""
    out = np.empty(len(targets), np.int64)
    for a in range(0, len(targets), chunk):
        t, i = targets[a:a + chunk], train_ids[a:a + chunk]
        out[a:a + chunk] = (W[t] > W[t, i][:, None]).sum(1) + 1
    return out


def top_weights(W: np.ndarray, k: int) -> np.ndarray:
    """Training ids [T, k] of each row's k largest weights, the largest first (in blocks of
    rows: a read-only W is copied a block at a time)."""
    import torch
    k = min(k, W.shape[1])
    return np.concatenate([torch.tensor(np.ascontiguousarray(W[a:a + ROWS])).topk(k, dim=1).indices.numpy()
                           for a in range(0, len(W), ROWS)] or [np.empty((0, k), np.int64)])


def positive_top(W: np.ndarray, k: int) -> np.ndarray:
    """top_weights, with -1 in place of an example whose weight is not positive: a lasso
    datamodel has few non-zero weights, and a zero weight is not a top-weight example."""
    top = top_weights(W, k)
    return np.where(np.take_along_axis(W, top, axis=1) > 0, top, -1) if top.size else top


def find_leakage(x_train, x_target, W: np.ndarray, conf: LeakageConf) -> dict:
    """Near-duplicate (target, training example) pairs among each target's nearest
    neighbours, with each pair's datamodel weight and rank, and how often a target's
    top-weight examples (its largest positive weights: `top`, -1 past the last positive one)
    are its nearest neighbour in input space. W: [T, n] for these targets."""
    sims, ids = nearest(x_target, x_train, conf.neighbours, conf.block, conf.device)
    thr = float(conf.threshold) if conf.threshold is not None else robust_threshold(sims[:, 0], conf.spread)
    t_of, j_of = np.nonzero(sims >= thr)
    i_of = ids[t_of, j_of]
    top = positive_top(W, conf.top)
    nn1 = ids[:, 0]
    return {"threshold": thr, "nearest_similarity": sims[:, 0], "nearest_ids": ids, "nearest_sims": sims,
            "top": top, "pairs": {"target": t_of, "train_id": i_of, "neighbour": j_of + 1,
                                  "similarity": sims[t_of, j_of], "weight": W[t_of, i_of],
                                  "rank": weight_ranks(W, t_of, i_of)},
            "top1_is_nearest": int((top[:, 0] == nn1).sum()),
            "nearest_in_top": int((top == nn1[:, None]).any(1).sum())}


def leakage_stage(ctx, settings: dict) -> dict:
    """Near-duplicates of the targets in the training set and their datamodel weights:
    leakage.json and leakage_pairs.csv (one row per flagged pair), leakage_pairs.png (the flagged
    pairs) and leakage_top.png (targets beside their top-weight examples and nearest neighbour)."""
    from orchestrator.counterfactual import _store_plot, _write_json, datamodels
    conf = make_conf(LeakageConf, settings, "leakage")
    plan = ctx.plan
    W, _, dm_dir = datamodels(ctx)
    x_tr, y_tr, x_tg, y_tg, names = _images(plan, "leakage")
    T = min(int(conf.targets), plan.n_targets)
    res = find_leakage(x_tr, x_tg[:T], W[:T], conf)
    p = res["pairs"]
    order = np.lexsort((-p["similarity"], p["target"]))
    rows = [[int(p["target"][j]), int(p["train_id"][j]), float(p["similarity"][j]), float(p["weight"][j]),
             int(p["rank"][j]), int(p["neighbour"][j]), _label(names, y_tg[p["target"][j]]),
             _label(names, y_tr[p["train_id"][j]])] for j in order]
    header = ["target", "train_id", "similarity", "weight", "rank", "neighbour", "target_class", "train_class"]
    nn = res["nearest_similarity"]
    out = {"measure": "cosine similarity of the centred, normalised pixel vectors (Pearson's r of two images)",
           "threshold": res["threshold"],
           "threshold_rule": ("fixed (leakage.threshold)" if conf.threshold is not None else
                              f"robust: 1 - exp(median(log d) - {conf.spread:g} MAD(log d)), "
                              f"d = 1 - nearest similarity"),
           "targets": T, "neighbours": int(conf.neighbours), "top": int(conf.top), "datamodels": dm_dir,
           "nearest_similarity": {f"q{int(q * 100)}": float(np.quantile(nn, q)) for q in (0, 0.5, 0.9, 0.99, 1)},
           "flagged_pairs": len(rows), "flagged_targets": int(len(np.unique(p["target"]))),
           "top1_is_nearest": res["top1_is_nearest"], "nearest_in_top": res["nearest_in_top"],
           "flagged_in_top": int(((p["rank"] <= conf.top) & (p["weight"] > 0)).sum())}
    out["table"] = _write_json(ctx, "leakage", {**out, "pairs": [dict(zip(header, r)) for r in rows]})
    out["csv"] = _write_csv(ctx, "leakage_pairs.csv", header, rows)
    plots = {}
    if rows and conf.show:
        path = os.path.join(ctx.scratch, "leakage_pairs.png")
        per_row = 4
        cells: list = []
        for r in rows[:conf.show]:
            t, i, s, w, rank = r[:5]
            cells.append([(x_tg[t], f"target #{t}\n{_label(names, y_tg[t])}", "black"),
                          (x_tr[i], f"train #{i}, s={s:.3f}\nw={w:+.3g} rank {rank}", "darkred")])
        grid = [(f"pairs {a + 1}-{min(a + per_row, len(cells))}",
                 [c for pair in cells[a:a + per_row] for c in pair + [None]][:-1])
                for a in range(0, len(cells), per_row)]
        plot_rows(grid, f"Near-duplicate pairs: similarity s ≥ {res['threshold']:.4f} ({len(rows)} pairs; "
                        f"the first {min(conf.show, len(rows))}); w: the train example's weight in the target's "
                        f"datamodel, rank 1 = the largest", path)
        plots["leakage_pairs"] = _store_plot(ctx, "leakage_pairs", path)
    if conf.show_targets:
        path = os.path.join(ctx.scratch, "leakage_top.png")
        flagged = list(dict.fromkeys(int(t) for t in p["target"][order]))
        shown = (flagged + [t for t in range(T) if t not in set(flagged)])[:conf.show_targets]
        plot_rows([(f"target #{t}", _top_cells(t, res, W, x_tr, y_tr, x_tg, y_tg, names)) for t in shown],
                  f"Each target, the training examples with its {conf.top} largest positive datamodel "
                  f"weights (+k, weight w; zero weights are not shown) and its nearest neighbour in input "
                  f"space (s: similarity; red: s ≥ {res['threshold']:.4f}; rank: of its weight)", path)
        plots["leakage_top"] = _store_plot(ctx, "leakage_top", path)
    out["plots"] = plots
    out["files"] = [out["table"], out["csv"], *plots.values()]
    out["headline"] = [f"{len(rows)} near-duplicate (target, training example) pairs with similarity >= "
                       f"{res['threshold']:.4f} among {T} targets; the largest-weight example is the target's "
                       f"nearest neighbour for {res['top1_is_nearest']} of them"]
    ctx.tracker.log_metrics({"leakage_flagged_pairs": len(rows), "leakage_threshold": res["threshold"],
                             "leakage_top1_is_nearest": res["top1_is_nearest"]})
    log.info("leakage: %d pairs with similarity >= %.4f among %d targets; the top-weight example is the nearest "
             "neighbour for %d targets", len(rows), res["threshold"], T, res["top1_is_nearest"])
    return out


def _top_cells(t: int, res: dict, W, x_tr, y_tr, x_tg, y_tg, names) -> list:
    """A leakage_top.png row: the target, its top-weight examples (positive weights only: a
    note where there are fewer), a gap, its nearest neighbour."""
    thr = res["threshold"]
    sim_of = dict(zip(res["nearest_ids"][t].tolist(), res["nearest_sims"][t].tolist()))
    cells: list = [(x_tg[t], f"target\n{_label(names, y_tg[t])}", "black")]
    top = [int(i) for i in res["top"][t] if i >= 0]
    for j, i in enumerate(top):
        s = sim_of.get(i)
        cells.append((x_tr[i], f"+{j + 1} {_label(names, y_tr[i])}\nw={W[t, i]:+.3g}"
                      + (f"\ns={s:.3f}" if s is not None else ""),
                      "darkred" if s is not None and s >= thr else "black"))
    cells += _no_more_weights(len(top), len(res["top"][t]))
    i, s = int(res["nearest_ids"][t, 0]), float(res["nearest_sims"][t, 0])
    if W[t, i] > 0:
        weight = f"rank {int(weight_ranks(W, np.array([t]), np.array([i]))[0])}"
    else:
        weight = "weight 0" if W[t, i] == 0 else f"w={W[t, i]:+.3g}"
    cells += [None, (x_tr[i], f"nearest\ns={s:.3f}\n{weight}", "darkred" if s >= thr else "black")]
    return cells


def _no_more_weights(shown: int, wanted: int) -> list:
    """The cells after a datamodel's `shown` positive-weight examples, up to `wanted`: a note,
    then gaps."""
    if shown >= wanted:
        return []
    note = "no positive\nweight in this\ndatamodel" if shown == 0 else "no more\npositive\nweights"
    return [(None, note, "dimgray")] + [None] * (wanted - shown - 1)


# ----------------------------------------------------------------------------- embedding

def pca(M, k: int, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(projections float32 [T, k'], explained variance ratios [k']) of the rows of M [T, d],
    each scaled to unit norm (a zero row stays zero), then centred; k' = min(k, T, d). Exact SVD
    when min(T, d) <= 1000, else a randomized one (torch.svd_lowrank, k + 10 columns, 6 power
    iterations: T = 10 000 targets of n = 50 000 in seconds, where the exact one takes minutes).
    Each component's sign puts its largest-magnitude projection on the positive side."""
    import torch

    from workers.devices import resolve_device
    A = torch.tensor(np.ascontiguousarray(M), dtype=torch.float32, device=resolve_device(device))
    A.div_(A.norm(dim=1, keepdim=True).clamp_min(1e-12))
    A.sub_(A.mean(0, keepdim=True))
    total = float((A.double() ** 2).sum())
    k = min(int(k), *A.shape)
    if min(A.shape) <= 1000:
        U, S, _ = torch.linalg.svd(A, full_matrices=False)
    else:
        U, S, _ = torch.svd_lowrank(A, q=min(k + 10, *A.shape), niter=6)
    proj = (U[:, :k] * S[:k]).cpu().numpy()
    ext = np.abs(proj).argmax(0)
    proj = proj * np.sign(proj[ext, np.arange(k)] + (proj[ext, np.arange(k)] == 0))
    evr = (S[:k].double() ** 2).cpu().numpy() / max(total, 1e-300)
    return proj.astype(np.float32), evr


def extremes(proj: np.ndarray, count: int) -> dict[str, np.ndarray]:
    """Per component (columns of proj): the `count` targets with the largest projection ("high",
    the largest first) and the smallest ("low", the smallest first): [k, count] each."""
    order = np.argsort(proj, axis=0, kind="stable")
    c = min(count, len(proj))
    return {"high": order[::-1][:c].T, "low": order[:c].T}


def last_layer_features(plan, checkpoint: int, device: str) -> np.ndarray:
    """The targets' penultimate features (the input of the final linear layer) [T, d] from
    train-set checkpoint `checkpoint`."""
    from orchestrator.store import Layout
    from workers.attribution.common import forward_all, load_checkpoint
    from workers.checkpoints import CheckpointError, checkpoint_identity, from_bytes
    from workers.devices import resolve_device
    rel = Layout.checkpoint("train", checkpoint, 0)
    try:
        blob = plan.store.read_bytes(rel)
    except FileNotFoundError:
        raise AnalysisError(f"embedding.checkpoint={checkpoint}: no checkpoint at {plan.store.where(rel)}; run "
                            f"stage=train with train.checkpoints>={checkpoint + 1} (or set "
                            f"embedding.features=false)") from None
    try:       # its digest, and this experiment's train model `checkpoint`, before anything is unpickled
        state = from_bytes(blob, checkpoint_identity(plan.identity.config_hash, "train", checkpoint, 0))
    except CheckpointError as err:
        raise AnalysisError(f"embedding.checkpoint={checkpoint}: checkpoint {plan.store.where(rel)} fails "
                            f"verification ({err.reason}); run stage=train to retrain it (the bad file is "
                            f"moved to {Layout.CHECKPOINTS}/_quarantine/)") from None
    model_fn, _, _, x_tg, _ = plan.task.attribution_inputs()
    fm = load_checkpoint(model_fn, state, "last", str(resolve_device(device)))
    _, feats = forward_all(fm, x_tg, 512, features=True)
    return feats.cpu().numpy()  # type: ignore[union-attr]  # features=True


def embedding_stage(ctx, settings: dict) -> dict:
    """PCA of the unit-norm datamodel weights: explained variance ratios (beside those of the
    last-layer features), the extreme targets of each leading component and their classes;
    embedding.json, embedding_extremes.png and embedding_spectrum.png."""
    from orchestrator.counterfactual import _store_plot, _write_json, datamodels
    conf = make_conf(EmbeddingConf, settings, "embedding")
    plan = ctx.plan
    W, _, dm_dir = datamodels(ctx)
    kept = np.flatnonzero(np.abs(W).sum(1) > 0)       # an all-zero datamodel has no direction: left out
    if len(kept) < 2:
        raise AnalysisError(f"embedding: {len(kept)} of {len(W)} datamodels have a non-zero weight; PCA needs two "
                            f"(fit more models, or lower the lasso's λ: fit.*)")
    part, evr = pca(W[kept], max(conf.spectrum, conf.components), conf.device)
    proj = np.zeros((len(W), part.shape[1]), np.float32)
    proj[kept] = part
    k = min(conf.components, part.shape[1])
    ends = {end: kept[ids] for end, ids in extremes(part[:, :k], conf.extremes).items()}
    spectra = {"datamodel weights": evr[:conf.spectrum]}
    feats_evr = None
    if conf.features and hasattr(plan.task, "attribution_inputs"):
        feats = last_layer_features(plan, conf.checkpoint, conf.device)
        feats_evr = pca(feats, conf.spectrum, conf.device)[1]
        spectra[f"last-layer features (checkpoint {conf.checkpoint})"] = feats_evr
    imgs = _images(plan, "embedding", needed=False)
    names, y_tg = (imgs[4], imgs[3]) if imgs is not None else (None, None)
    comps = []
    for c in range(k):
        entry: dict = {"component": c + 1, "explained_variance_ratio": float(evr[c])}
        for end in ("high", "low"):
            ts = ends[end][c]
            entry[end] = {"targets": ts.tolist(), "projections": proj[ts, c].tolist()}
            if y_tg is not None:
                labels = [_label(names, y_tg[t]) for t in ts]
                entry[end]["classes"] = {n: labels.count(n) for n in dict.fromkeys(labels)}
        comps.append(entry)
    out = {"targets": int(len(W)), "zero_datamodels": int(len(W) - len(kept)), "datamodels": dm_dir,
           "explained_variance_ratio": [float(v) for v in evr[:conf.spectrum]],
           "features_explained_variance_ratio": None if feats_evr is None else [float(v) for v in feats_evr],
           "features_checkpoint": conf.checkpoint if feats_evr is not None else None, "components": comps}
    out["table"] = _write_json(ctx, "embedding", out)
    plots = {}
    path = os.path.join(ctx.scratch, "embedding_spectrum.png")
    plot_spectra(spectra, path)
    plots["embedding_spectrum"] = _store_plot(ctx, "embedding_spectrum", path)
    if imgs is not None:
        x_tg, y_tg = imgs[2], imgs[3]
        rows = [(f"PC{c + 1} {'+' if end == 'high' else '−'}",
                 [(x_tg[t], f"#{t} ({_label(names, y_tg[t])})\n{proj[t, c]:+.3f}", "black") for t in ends[end][c]])
                for c in range(k) for end in ("high", "low")]
        path = os.path.join(ctx.scratch, "embedding_extremes.png")
        plot_rows(rows, "Targets with the most extreme projections on the leading principal components of the "
                        "unit-norm datamodel weights (+: the largest, −: the smallest); captions: #target "
                        "(class) and its projection", path)
        plots["embedding_extremes"] = _store_plot(ctx, "embedding_extremes", path)
    out["plots"] = plots
    out["files"] = [out["table"], *plots.values()]
    out["headline"] = [f"the first {k} principal components of the {len(kept)} non-zero datamodels explain "
                       + ", ".join(f"{v:.3f}" for v in evr[:k]) + " of their variance"
                       + ("" if feats_evr is None else "; of the last-layer features: "
                          + ", ".join(f"{v:.3f}" for v in feats_evr[:k]))]
    ctx.tracker.log_metrics({f"embedding_evr_{c + 1}": float(evr[c]) for c in range(k)})
    log.info("embedding: the first %d components explain %s of the datamodels' variance", k,
             ", ".join(f"{v:.3f}" for v in evr[:k]))
    return out


# ----------------------------------------------------------------------------- compare

def cosine_rows(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of A with the same row of B; NaN where either is zero."""
    import torch
    out = []
    for r in range(0, len(A), ROWS):
        a = torch.tensor(np.ascontiguousarray(A[r:r + ROWS]), dtype=torch.float64)
        b = torch.tensor(np.ascontiguousarray(B[r:r + ROWS]), dtype=torch.float64)
        den = a.norm(dim=1) * b.norm(dim=1)
        out.append(torch.where(den > 0, (a * b).sum(1) / den.clamp_min(1e-300), torch.nan).numpy())
    return np.concatenate(out) if out else np.empty(0)


def top_overlap(A: np.ndarray, B: np.ndarray, k: int) -> np.ndarray:
    """Per row, the fraction of A's k largest weights' examples that are among B's k largest."""
    import torch
    ta, tb = torch.as_tensor(top_weights(A, k)), torch.as_tensor(top_weights(B, k))
    return (ta[:, :, None] == tb[:, None, :]).any(2).double().mean(1).numpy()


def other_experiment(other: str | None, plan):
    """The experiment at compare.other (api.Experiment), checked against this one without
    reading its weights (the stage's precheck, before Ray starts): one line naming
    compare.other and the fix otherwise."""
    from orchestrator import api
    from orchestrator.config import ConfigError
    if not other:
        raise ConfigError("compare.other must be set: the run directory or store URI of the experiment to compare "
                          "with (e.g. compare.other=runs/fmnist_mlp-<hash>)")
    try:
        exp = api.open(other)
    except api.ApiError as err:
        raise ConfigError(f"compare.other={other!r}: {err}") from None
    if exp.store.where() == plan.store.where():
        raise ConfigError(f"compare.other={other!r} is this experiment itself; pass another experiment's directory")
    if (exp.n, exp.n_targets) != (plan.n, plan.n_targets):
        raise ConfigError(f"compare.other={other!r} has n={exp.n} training examples and {exp.n_targets} targets, "
                          f"this experiment n={plan.n} and {plan.n_targets}; compare experiments on the same training "
                          f"set and targets")
    from omegaconf import OmegaConf
    mine = OmegaConf.to_container(plan.cfg.task, resolve=True)
    theirs = exp.config.get("task") or {}
    for key in ("_target_", "data.name", "subset_seed", "target_split", "train_subset"):
        a, b = _get(mine, key), _get(theirs, key)
        if a is not None and b is not None and a != b:
            raise ConfigError(f"compare.other={other!r} has task.{key}={b!r}, this experiment {a!r}: not the same "
                              f"training set and targets; compare experiments of the same task")
    if exp.datamodels_dir is None:
        raise ConfigError(f"compare.other={other!r}: {exp.store.where()} has no datamodels; run stage=fit there")
    return exp


def other_datamodels(other: str | None, plan) -> tuple[np.ndarray, str]:
    """(weights [T, n], where) of the experiment at compare.other, checked against this one."""
    from orchestrator import api
    from orchestrator.config import ConfigError
    exp = other_experiment(other, plan)
    try:
        W, _, _ = exp.datamodel_arrays()
    except api.ApiError as err:
        raise ConfigError(f"compare.other={other!r}: {err} there") from None
    return W, f"{exp.store.where()}/{exp.datamodels_dir}"


def _short(where: str) -> str:
    """<experiment>/datamodels/<fit> of a datamodels location, for a plot's title."""
    return "/".join(where.rstrip("/").split("/")[-3:])


def _get(d, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def compare_stage(ctx, settings: dict) -> dict:
    """Per-target cosine similarity of this experiment's datamodels and compare.other's, its
    distribution, the overlap of their top examples, and the targets where they disagree most
    (lowest cosine) drawn with both datamodels' top examples: compare.json, compare.png."""
    from orchestrator.counterfactual import _store_plot, _write_json, datamodels
    conf = make_conf(CompareConf, settings, "compare")
    plan = ctx.plan
    WB, where_b = other_datamodels(conf.other, plan)
    WA, _, dm_dir = datamodels(ctx)
    cos = cosine_rows(WA, WB)
    overlap = top_overlap(WA, WB, conf.top)
    ok = np.isfinite(cos)
    v = cos[ok]
    worst = np.flatnonzero(ok)[np.argsort(v, kind="stable")][:conf.show]
    dist = ({"mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std()),
             **{f"q{q:02d}": float(np.percentile(v, q)) for q in (0, 5, 25, 75, 95, 100)}} if len(v) else {})
    where_a = f"{plan.store.where()}/{dm_dir}"
    out = {"this": where_a, "other": where_b, "targets": int(len(cos)),
           "undefined": int((~ok).sum()), "cosine": dist, f"top{conf.top}_overlap": float(overlap.mean()),
           "disagree_most": [{"target": int(t), "cosine": float(cos[t]), "top_overlap": float(overlap[t])}
                             for t in worst]}
    out["table"] = _write_json(ctx, "compare", {**out, "per_target": {"cosine": [None if not np.isfinite(c) else
                                                                                   float(c) for c in cos],
                                                                        "top_overlap": overlap.tolist()}})
    imgs = _images(plan, "compare", needed=False)
    plots = {}
    if imgs is not None and len(worst):
        x_tr, y_tr, x_tg, y_tg, names = imgs
        rows = []
        for t in worst:
            for tag, W in (("this", WA), ("other", WB)):
                cells: list = [(x_tg[t], f"target #{t} ({_label(names, y_tg[t])})\ncos {cos[t]:.3f}", "black")]
                top = [int(i) for i in positive_top(W[t:t + 1], conf.top)[0] if i >= 0]
                for j, i in enumerate(top):
                    cells.append((x_tr[i], f"+{j + 1} {_label(names, y_tr[i])}\nw={W[t, i]:+.3g}",
                                  "darkgreen" if int(y_tr[i]) == int(y_tg[t]) else "black"))
                rows.append((tag, cells + _no_more_weights(len(top), conf.top)))
        path = os.path.join(ctx.scratch, "compare.png")
        plot_rows(rows, f"Targets where the two experiments' datamodels disagree most (lowest cosine): the "
                        f"training examples of each one's {conf.top} largest positive weights (+k, weight w; zero "
                        f"weights are not shown; green: the target's class).\nthis: {_short(where_a)}\nother: "
                        f"{_short(where_b)}",
                  path)
        plots["compare"] = _store_plot(ctx, "compare", path)
    out["plots"] = plots
    out["files"] = [out["table"], *plots.values()]
    out["headline"] = ([f"cosine of the two datamodels per target: mean {dist['mean']:.3f}, median "
                        f"{dist['median']:.3f} over {len(v)} targets; top-{conf.top} overlap "
                        f"{float(overlap.mean()):.3f}; other: {where_b}"] if dist else
                       [f"no target has a non-zero datamodel in both experiments; other: {where_b}"])
    if dist:
        ctx.tracker.log_metrics({"compare_cosine_mean": dist["mean"], "compare_cosine_median": dist["median"]})
        log.info("compare: cosine of the datamodels per target: mean %.3f, median %.3f, 5%% %.3f",
                 dist["mean"], dist["median"], dist["q05"])
    return out
