"""Evaluation: the Linear Datamodeling Score of every method on the held-out eval masks.

LDS(τ, x) = Spearman correlation, over eval masks S_j, between the predicted output
Σ_{i∈S_j} τ(x)_i + b_x and the actual margin averaged over the mask's replicas. Reported as
the mean over targets with a bootstrap 95% interval (resampling targets), plus the mean
squared error of the predicted margins where a method predicts margins (datamodels).
"""
from __future__ import annotations

import logging
import os

import numpy as np

from orchestrator.ledger import Ledger, LedgerError
from workers import bits

log = logging.getLogger(__name__)


def eval_set(ledger: Ledger, n: int, n_targets: int, index=None):
    """(masks bool [e, n], replica-averaged margins float32 [e, T], replicas per mask [e]).
    Only the eval rows are read (O(eval masks x replicas) memory, whatever the train set's
    size); `index`, the ledger's index when the caller has it, spares rebuilding it."""
    data = ledger.load("eval", n=n, n_targets=n_targets, index=index)
    ids, start, counts = np.unique(data.model_id, return_index=True, return_counts=True)
    sums = np.add.reduceat(data.margins.astype(np.float64), start, axis=0)
    Y = (sums / counts[:, None]).astype(np.float32)
    X = bits.unpack(data.packed[start], n)
    # every replica of a mask must carry the same mask
    first = np.repeat(start, counts)
    if not np.array_equal(data.packed, data.packed[first]):
        raise LedgerError("eval masks differ between replicas of one model id: the ledger mixes experiments")
    return X, Y, counts


def rank_columns(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata
    return rankdata(a, axis=0)


def lds_per_target(pred: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Spearman correlation per column of pred/actual [e, T]; NaN where a column is constant."""
    rp = rank_columns(pred)
    ra = rank_columns(actual)
    rp = rp - rp.mean(0)
    ra = ra - ra.mean(0)
    denom = np.sqrt((rp ** 2).sum(0) * (ra ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (rp * ra).sum(0) / denom, np.nan)


def bootstrap_ci(values: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if len(v) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def score_method(X: np.ndarray, Y: np.ndarray, weights: np.ndarray, intercept, n_boot: int,
                 seed: int) -> tuple[dict, np.ndarray]:
    """LDS (and MSE if an intercept is given) of weights [T, n] on eval masks X [e, n]."""
    return score_blocks(X, Y, [(0, Y.shape[1], weights, intercept)], intercept is not None, n_boot, seed)


def score_blocks(X: np.ndarray, Y: np.ndarray, blocks, with_intercept: bool, n_boot: int,
                 seed: int) -> tuple[dict, np.ndarray]:
    """score_method over target blocks: `blocks` yields (a, b, weights [b - a, n], intercept
    [b - a] or None) covering targets 0..T-1 in order, so that one block of a method's
    weights is held at a time. The figures are score_method's on the whole array."""
    Xf = X.astype(np.float32)
    T = Y.shape[1]
    per_target = np.full(T, np.nan)
    sq, covered = 0.0, 0
    for a, b, weights, intercept in blocks:
        if a != covered:
            raise ValueError(f"target blocks out of order: [{a}, {b}) after {covered}")
        pred = Xf @ np.asarray(weights, np.float32).T
        if with_intercept:
            pred = pred + np.asarray(intercept, np.float32)[None, :]
            sq += float(np.sum((pred - Y[:, a:b]) ** 2, dtype=np.float64))
        per_target[a:b] = lds_per_target(pred, Y[:, a:b])
        covered = b
    if covered != T:
        raise ValueError(f"target blocks cover {covered} of {T} targets")
    lo, hi = bootstrap_ci(per_target, n_boot, seed)
    out = {"mean": float(np.nanmean(per_target)), "ci95": [lo, hi],
           "median": float(np.nanmedian(per_target)), "targets": int(np.isfinite(per_target).sum())}
    if with_intercept:
        out["mse"] = sq / Y.size
        out["margin_var"] = float(np.mean(Y.var(0)))
    return out, per_target


# ----------------------------------------------------------------------------- names and order

# Class names of the shipped datasets (workers.data.DATASETS), by label index.
CLASS_NAMES = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                      "Bag", "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "digits": ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9"),
}


def class_names(dataset: str | None, num_classes: int) -> list[str]:
    """Names of labels 0..num_classes-1 of `dataset` (a workers.data name); the integer
    labels themselves for a dataset without known names."""
    names = CLASS_NAMES.get(dataset or "")
    if names is None or len(names) != num_classes:
        return [str(i) for i in range(num_classes)]
    return list(names)


def task_class_names(task, num_classes: int) -> list[str]:
    """Class names of a task's labels: its own `class_names` if it has them (a user task),
    else those of its dataset (task.data_cfg["name"]), else the integer labels."""
    own = getattr(task, "class_names", None)
    own = own() if callable(own) else own
    if own is not None and len(own) == num_classes:
        return [str(c) for c in own]
    data = getattr(task, "data_cfg", None) or {}
    return class_names(data.get("name") if isinstance(data, dict) else None, num_classes)


def method_order(names) -> list[str]:
    """datamodels first, then the other methods alphabetically: the order of every plot."""
    names = list(names)
    return (["datamodels"] if "datamodels" in names else []) + sorted(n for n in names if n != "datamodels")


def method_colors(names) -> dict[str, str]:
    """One colour per method, by its place in method_order (the same in every plot)."""
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
               "tab:olive", "tab:cyan", "tab:gray"]
    return {n: palette[i % len(palette)] for i, n in enumerate(method_order(names))}


# ----------------------------------------------------------------------------- plots

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


DPI = 100          # every plot is saved at this dpi; no text is smaller than 8 pt


def _save(fig, path: str) -> dict:
    """Save at DPI (tight bounding box) and close; return what a reader of the PNG sees
    (`drawn_text`): every text drawn and the pairs of texts that overlap."""
    fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.15)
    report = drawn_text(fig)
    _plt().close(fig)
    return report


def drawn_text(fig) -> dict:
    """{"texts": the visible, non-empty texts of a drawn figure (tick labels inside the view,
    titles, axis labels, legends, annotations), "ticks": {"x"/"y": the tick labels drawn, per
    axes}, "overlaps": [(a, b)] pairs of texts whose boxes overlap by more than a pixel}."""
    from matplotlib.text import Text
    fig.canvas.draw()            # every position as drawn on the figure's own canvas (savefig's may be shifted)
    renderer = fig.canvas.get_renderer()
    skip: set[int] = set()
    shown: list = []
    ticks: dict[str, list[list[str]]] = {"x": [], "y": []}
    for ax in fig.axes:
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                skip.update((id(tick.label1), id(tick.label2)))
            if not ax.axison or not axis.get_visible():
                skip.update((id(axis.label), id(axis.offsetText)))
                continue
            labels = []
            for tick in axis._update_ticks():        # the ticks drawn: those inside the view
                for lab in (tick.label1, tick.label2):
                    if tick.get_visible() and lab.get_visible() and lab.get_text().strip():
                        shown.append(lab)
                        labels.append(lab.get_text())
            ticks[name].append(labels)
    for t in fig.findobj(Text):
        if id(t) not in skip and t.get_visible() and t.get_text().strip() and t.figure is not None:
            shown.append(t)
    shown = list({id(t): t for t in shown}.values())
    boxes = np.array([[b.x0, b.y0, b.x1, b.y1] for b in (t.get_window_extent(renderer) for t in shown)]
                     ).reshape(-1, 4)
    overlaps = []
    if len(boxes):
        w = np.minimum(boxes[:, None, 2], boxes[None, :, 2]) - np.maximum(boxes[:, None, 0], boxes[None, :, 0])
        h = np.minimum(boxes[:, None, 3], boxes[None, :, 3]) - np.maximum(boxes[:, None, 1], boxes[None, :, 1])
        for a, b in zip(*np.nonzero(np.triu((w > 1) & (h > 1), 1))):
            overlaps.append((shown[a].get_text(), shown[b].get_text()))
    return {"texts": [t.get_text() for t in shown], "ticks": ticks, "overlaps": overlaps}


def plain_number(v: float) -> str:
    """A count or a tick value as a reader writes it: 150, 0.5, 2000 (never 1.5×10²)."""
    v = float(v)
    return str(int(round(v))) if v.is_integer() or (abs(v) >= 10 and abs(v - round(v)) < 1e-9) else f"{v:g}"


def sig(v: float | None, digits: int = 3) -> str:
    """`v` with `digits` significant digits in plain decimals (0.00292, 1.83, 3676), '-' for
    None or NaN; scientific only outside [1e-4, 1e6)."""
    if v is None or not np.isfinite(v):
        return "-"
    v = float(v)
    if v == 0:
        return "0"
    mag = int(np.floor(np.log10(abs(v))))
    if not -4 <= mag < 6:
        return f"{v:.{digits}g}"
    return f"{v:.{max(0, digits - 1 - mag)}f}"


def count_log_axis(ax, values, axis: str = "x", label_inches: float = 0.35, under: list[str] | None = None) -> None:
    """A log axis of counts ticked at `values` only, labelled as plain integers (5, 10, 150):
    matplotlib's default puts labels such as 3×10¹ between them. Values too close to a
    labelled neighbour for `label_inches` keep their tick without a label. `under`: a second
    line under each value's label (in the order of the sorted values)."""
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator
    vals = sorted({float(v) for v in values if v and v > 0})
    if not vals:
        return
    set_scale, set_lim = (ax.set_xscale, ax.set_xlim) if axis == "x" else (ax.set_yscale, ax.set_ylim)
    which = ax.xaxis if axis == "x" else ax.yaxis
    set_scale("log")
    lo, hi = np.log10(vals[0]), np.log10(vals[-1])
    pad = 0.06 * (hi - lo) if hi > lo else 0.18
    set_lim(10 ** (lo - pad), 10 ** (hi + pad))
    fig = ax.figure
    pos = ax.get_position()
    inches = pos.width * fig.get_figwidth() if axis == "x" else pos.height * fig.get_figheight()
    min_gap = (hi - lo + 2 * pad) * label_inches / max(inches, 1e-6)
    logs = np.log10(vals)
    keep = [0]                         # the first and the last are always labelled
    for j in range(1, len(vals)):
        if logs[j] - logs[keep[-1]] >= min_gap:
            keep.append(j)
    if keep[-1] != len(vals) - 1:
        while len(keep) > 1 and logs[-1] - logs[keep[-1]] < min_gap:
            keep.pop()
        keep.append(len(vals) - 1)
    labels = [plain_number(v) if j in keep else "" for j, v in enumerate(vals)]
    if under:
        labels = [f"{lab}\n{u}" if lab and u else lab for lab, u in zip(labels, under)]
    which.set_major_locator(FixedLocator(vals))
    which.set_major_formatter(FixedFormatter(labels))
    which.set_minor_locator(NullLocator())


def _ci_err(r: dict) -> list[list[float]]:
    lo, hi = r["ci95"]
    return [[max(r["mean"] - lo, 0.0)], [max(hi - r["mean"], 0.0)]]


def plot_lds(results: dict, per_target: dict, path: str) -> dict:
    """One row per method (datamodels first, then the baselines alphabetically): a dot per
    target at its LDS, and the mean over targets with its 95% bootstrap CI; the right axis
    prints the mean, the CI and the number of targets."""
    plt = _plt()
    names = method_order(results)
    colors = method_colors(names)
    fig, ax = plt.subplots(figsize=(9, 1.4 + 0.75 * len(names)))
    rng = np.random.default_rng(0)
    rows = {k: len(names) - 1 - i for i, k in enumerate(names)}    # the first method on top
    for k in names:
        v = np.asarray(per_target[k], dtype=float)
        v = v[np.isfinite(v)]
        y = rows[k]
        ax.scatter(v, y + rng.uniform(-0.25, 0.25, len(v)), s=12, color=colors[k], alpha=0.5, linewidths=0,
                   zorder=2)
        r = results[k]
        ax.errorbar([r["mean"]], [y], xerr=_ci_err(r), fmt="D", color="black", markersize=7, capsize=6,
                    elinewidth=2, zorder=4)
    ax.axvline(0, color="gray", linestyle="--", linewidth=1, zorder=1)
    ax.set_yticks([rows[k] for k in names])
    ax.set_yticklabels(names, fontsize=10)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.set_ylabel("method", fontsize=10)
    ax.set_xlabel("LDS of one target (Spearman correlation over the eval masks)", fontsize=10)
    ax.tick_params(axis="x", labelsize=9)
    ax.grid(axis="x", alpha=0.3)
    right = ax.twinx()
    right.set_ylim(ax.get_ylim())
    right.set_yticks([rows[k] for k in names])
    right.set_yticklabels([f"{results[k]['mean']:.3f}  [{results[k]['ci95'][0]:.3f}, {results[k]['ci95'][1]:.3f}]"
                           f"  n={results[k].get('targets', len(per_target[k]))}" for k in names], fontsize=9)
    right.set_ylabel("mean LDS  [95% CI],  targets", fontsize=10)
    from matplotlib.lines import Line2D
    ax.legend(handles=[Line2D([], [], marker="o", linestyle="", color="gray", alpha=0.6, label="one target"),
                       Line2D([], [], marker="D", color="black", label="mean over targets, 95% bootstrap CI")],
              fontsize=9, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    ax.set_title("Linear Datamodeling Score per method", fontsize=11, pad=24)
    return _save(fig, path)


def plot_lds_vs_compute(results: dict, curve: dict, path: str, budgets: dict | None = None,
                        per_model: float | None = None) -> dict:
    """Mean LDS (95% CI) against the compute each method costs, log x (the TRAK paper's
    Figure 1 format). Counted: datamodels = training the m models used + fitting the lasso
    (`curve`: one point per prefix fit of the first m models); a baseline = training its k
    checkpoint models (k × seconds per trained model) + its own scoring seconds (`budgets`:
    method -> {k: {mean, ci95, seconds}}, one point per checkpoint budget; a method without
    budgets is its single point in `results`). Points without seconds are left out; the
    caption gives `per_model`, the seconds charged per trained model, when known."""
    plt = _plt()
    names = method_order(results)
    colors = method_colors(names)
    budgets = budgets or {}
    fig, ax = plt.subplots(figsize=(9, 5.2))
    drawn, labels = 0, []
    for name in names:
        r = results[name]
        if name == "datamodels" and curve:
            pts = sorted((int(m), c) for m, c in curve.items() if c.get("seconds"))
            tags = _point_tags("m", pts)
            label = f"datamodels: train m models + fit lasso (m = {', '.join(str(m) for m, _ in pts)})"
        elif name in budgets and budgets[name]:
            pts = sorted((int(k), c) for k, c in budgets[name].items() if c.get("seconds"))
            tags = _point_tags("k", pts)
            label = f"{name}: train k checkpoints + score (k = {', '.join(str(k) for k, _ in pts)})"
        else:
            if not r.get("seconds"):
                continue
            k = r.get("checkpoints")
            pts = [(k, r)]
            tags = [f"k={k}" if k else ""]
            label = (f"{name}: train {k} checkpoints + score" if k else
                     "datamodels: train m models + fit lasso" if name == "datamodels" else name)
        if not pts:
            continue
        xs = [c["seconds"] for _, c in pts]
        ys = [c["mean"] for _, c in pts]
        err = np.array([_ci_err(c) for _, c in pts])[:, :, 0].T
        ax.errorbar(xs, ys, yerr=err, fmt="-o" if len(pts) > 1 else "o", color=colors[name], capsize=3,
                    markersize=6, linewidth=1.8, label=label)
        labels += [(x, y, tag, colors[name]) for x, y, tag in zip(xs, ys, tags) if tag]
        drawn += 1
    ax.set_xscale("log")
    _plain_log_ticks(ax)
    _place_tags(ax, labels)
    ax.set_xlabel("compute (seconds on this machine: training counted models + fitting/scoring)", fontsize=10)
    ax.set_ylabel("LDS (mean over targets, 95% CI)", fontsize=10)
    ax.tick_params(labelsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.set_title("LDS against compute", fontsize=11)
    if drawn:
        note = ("Compute counted: training seconds = trained models × mean seconds per trained model"
                + (f" ({per_model:.3g} s)" if per_model else "")
                + ";\nm = models the datamodels were fit on, k = checkpoints (trained models) a baseline uses; "
                  "fitting and scoring seconds as measured."
                + ("\nn = the targets a point averages over (those with a defined LDS), where the points of a "
                   "curve differ." if any("n=" in tag for *_, tag, _ in labels) else ""))
        ax.legend(fontsize=8.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, frameon=False,
                  title=note, title_fontsize=8.5)
    return _save(fig, path)


def _point_tags(key: str, pts: list) -> list[str]:
    """"m=38" per (m, point) of a curve, with ", n=35 targets" where the points' target counts differ."""
    return [f"{key}={v}" + (f", {n}" if n else "") for (v, _), n in zip(pts, targets_note([c for _, c in pts])[1])]


def _place_tags(ax, tags, fontsize: float = 8) -> None:
    """Annotate points (x, y, text, colour) to their right (to their left where the tag would
    run past the axes' right edge, into a legend beside them), each tag moved down until it
    overlaps no tag placed before it (points of one method often lie close together)."""
    ax.set_xlim(ax.get_xlim())
    ax.set_ylim(ax.get_ylim())
    scale = 72.0 / ax.figure.dpi                 # display pixels -> points
    right = ax.get_window_extent().x1 * scale
    placed: list[tuple[float, float, float]] = []   # (x0, x1, y) of placed tags, in points
    for x, y, text, color in sorted(tags, key=lambda t: -t[1]):
        px, py = (v * scale for v in ax.transData.transform((x, y)))
        width = 0.62 * fontsize * len(text)
        left = px + 6 + width > right
        x0, x1 = (px - 6 - width, px - 6) if left else (px + 6, px + 6 + width)
        dy = 3.0
        while any(a < x1 and x0 < b and abs(py + dy - q) < fontsize + 2 for a, b, q in placed):
            dy -= fontsize + 2
        placed.append((x0, x1, py + dy))
        ax.annotate(text, (x, y), xytext=(-6 if left else 6, dy), textcoords="offset points", fontsize=fontsize,
                    color=color, ha="right" if left else "left", va="bottom" if dy > 0 else "center")


def _plain_log_ticks(ax) -> None:
    """Log-x tick labels as plain numbers (0.5, 2, 30, 1000), minor ones too over a short range."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    fmt = FuncFormatter(lambda v, _: plain_number(v))
    lo, hi = ax.get_xlim()
    if lo > 0 and hi / lo < 1000:      # up to three decades: ticks at 1, 2, 5 × 10^j
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(fmt)
    ax.xaxis.set_minor_formatter(NullFormatter())


def targets_note(points) -> tuple[str, list[str]]:
    """(an axis-label phrase, a tag per point) for a curve whose points each average over
    `targets` targets (a point's dict key): "over 50 targets" and no tags when the count is the
    same everywhere; else "over the targets with a defined value (n per point)" and "n=35" tags."""
    counts = [p.get("targets") for p in points]
    if not counts or any(c is None for c in counts):
        return "", [""] * len(counts)
    if len(set(counts)) == 1:
        return f"over {counts[0]} targets", [""] * len(counts)
    return "over the targets with a defined LDS (n per point)", [f"n={c} targets" for c in counts]


def plot_lds_vs_models(curve: dict, path: str) -> dict:
    """The datamodels' mean LDS (95% CI) against the number of train models they were fit
    on, log x ticked at those counts; where the points average over different numbers of
    targets (a datamodel that is all zeros has no LDS), each tick says over how many."""
    plt = _plt()
    ms = sorted(int(m) for m in curve)
    pts = [curve[m] if m in curve else curve[str(m)] for m in ms]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    mean = [p["mean"] for p in pts]
    lo = [p["ci95"][0] for p in pts]
    hi = [p["ci95"][1] for p in pts]
    ax.plot(ms, mean, "o-", color="tab:blue", label="mean LDS over targets")
    ax.fill_between(ms, lo, hi, alpha=0.3, color="tab:blue", label="95% bootstrap CI")
    phrase, tags = targets_note(pts)
    varying = any(tags)
    count_log_axis(ax, ms, under=[t.replace(" targets", "") for t in tags] if varying else None)
    ax.set_xlabel("train models the datamodels were fit on (m)"
                  + ("\nn: targets with a defined LDS (a datamodel of all zeros has none)" if varying else ""),
                  fontsize=10)
    ax.set_ylabel("LDS" + (f" (mean {phrase})" if phrase and not varying else ""), fontsize=10)
    ax.tick_params(labelsize=9)
    ax.grid(alpha=0.3)
    ax.set_title("Datamodels: LDS against number of models", fontsize=11)
    ax.legend(fontsize=8.5, loc="lower right")
    return _save(fig, path)


def _show(ax, img) -> None:
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[0] in (1, 3):
        img = img.transpose(1, 2, 0)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        ax.imshow(img, cmap="gray", vmin=0, vmax=255 if img.dtype == np.uint8 else None, interpolation="nearest")
    else:
        ax.imshow(img, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_top_examples(weights: dict, images, target_images, targets, path: str, top: int = 5, *,
                      train_labels=None, target_labels=None, names=None) -> dict | None:
    """For each shown target, one row per method (datamodels first): the target image, then the
    `top` training images with the most positive scores (+1 the largest) and the `top` with the
    most negative (−1 the smallest). Every image is captioned with its class (the target's true
    class; a training image's label, green when it is the target's class) and a training image
    with its score; a header row per target names the columns."""
    if images is None:
        return None
    plt = _plt()
    methods = method_order(weights)
    label = (lambda y: names[int(y)] if names is not None and 0 <= int(y) < len(names) else str(int(y)))
    cell_w, cell_h, head_h = 1.05, 1.32, 0.42
    widths = [1.0, 0.3] + [1.0] * top + [0.3] + [1.0] * top
    heights = []
    for _ in targets:
        heights += [head_h / cell_h] + [1.0] * len(methods)
    fig = plt.figure(figsize=(cell_w * sum(widths) + 1.2, cell_h * sum(heights) + 0.6))
    gs = fig.add_gridspec(len(heights), len(widths), width_ratios=widths, height_ratios=heights,
                          wspace=0.08, hspace=0.12, left=1.2 / (cell_w * sum(widths) + 1.2), right=0.99,
                          top=1 - 0.5 / (cell_h * sum(heights) + 0.6), bottom=0.01)
    col_of = [0] + [2 + j for j in range(top)] + [3 + top + j for j in range(top)]
    fig.suptitle(f"Top {top} training images by score, per target and method.  +k: k-th most positive score "
                 f"(including the image raises the target's margin); −k: k-th most negative.\n"
                 f"Captions: the image's class (green: the target's class) and its score; a zero score is not "
                 f"shown.", fontsize=9,
                 y=1 - 0.08 / (cell_h * sum(heights) + 0.6), va="top")
    r = 0
    for t in targets:
        tclass = label(target_labels[t]) if target_labels is not None else None
        heads = ["target"] + [f"+{j + 1}" for j in range(top)] + [f"−{j + 1}" for j in range(top)]
        for c, text in zip(col_of, heads):
            hax = fig.add_subplot(gs[r, c])
            hax.axis("off")
            hax.text(0.5, 0.15, text, ha="center", va="bottom", fontsize=10, fontweight="bold",
                     transform=hax.transAxes)
        hax = fig.add_subplot(gs[r, 0])
        hax.axis("off")
        hax.text(-0.12, 0.15, f"target #{t}", ha="right", va="bottom", fontsize=10, fontweight="bold",
                 transform=hax.transAxes)
        r += 1
        for name in methods:
            w = np.asarray(weights[name][t])
            order = np.argsort(w, kind="stable")
            ax = fig.add_subplot(gs[r, 0])
            _show(ax, target_images[t])
            ax.set_title(tclass if tclass is not None else "", fontsize=8.5, fontweight="bold", pad=2)
            ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=10, labelpad=8)
            pos = [int(i) for i in order[::-1][:top] if w[i] > 0]      # a zero score is neither: not shown
            neg = [int(i) for i in order[:top] if w[i] < 0]
            shown = pos + [None] * (top - len(pos)) + neg + [None] * (top - len(neg))
            for j, (c, i) in enumerate(zip(col_of[1:], shown)):
                ax = fig.add_subplot(gs[r, c])
                if i is None:
                    ax.axis("off")
                    if j in (len(pos), top + len(neg)):               # the first empty cell of a side says why
                        side = "positive" if j < top else "negative"
                        ax.text(0.5, 0.5, f"no{' more' if j % top else ''}\n{side}\nscores", ha="center",
                                va="center", fontsize=8, color="dimgray", transform=ax.transAxes)
                    continue
                _show(ax, images[i])
                cls = label(train_labels[i]) if train_labels is not None else ""
                same = train_labels is not None and target_labels is not None and \
                    int(train_labels[i]) == int(target_labels[t])
                ax.set_title(f"{cls}\n{w[i]:+.3g}".strip(), fontsize=8, pad=2,
                             color="darkgreen" if same else "black", fontweight="bold" if same else "normal")
            r += 1
    fig.savefig(path, dpi=DPI)
    report = drawn_text(fig)
    plt.close(fig)
    return report


# ----------------------------------------------------------------------------- compute accounting

def baseline_compute(scoring_seconds, checkpoints, per_model) -> tuple[float | None, dict]:
    """(total seconds, parts) of a baseline scored from `checkpoints` trained models: training
    them (checkpoints × per_model, the mean seconds of one trained model) + its own scoring
    seconds. The total is None when either part is unknown."""
    train = None if per_model is None or checkpoints is None else float(per_model) * int(checkpoints)
    parts = {"checkpoints": train, "scoring": None if scoring_seconds is None else float(scoring_seconds)}
    total = None if train is None or parts["scoring"] is None else train + parts["scoring"]
    return total, parts


def datamodels_compute(models, per_model, fitting_seconds) -> tuple[float | None, dict]:
    """(total seconds, parts) of datamodels fit on `models` trained models: training them
    (models × per_model) + fitting the lasso (worker-seconds of the fit)."""
    train = None if per_model is None or models is None else float(per_model) * int(models)
    parts = {"training": train, "fitting": None if fitting_seconds is None else float(fitting_seconds)}
    total = None if train is None or parts["fitting"] is None else train + parts["fitting"]
    return total, parts


def run(plan, tracker, datamodels_dir: str, prefix_dirs: dict | None = None, compute: dict | None = None) -> dict:
    """LDS of the datamodels, of each datamodels prefix and of every configured baseline
    (and of each checkpoint budget of the checkpoint ensembles, baselines.budget_checkpoints).
    Plots are drawn in a local scratch directory, then written to the store and MLflow.

    compute: {"models": m, "per_model": seconds per trained model, "datamodels": per_model·m +
    fit seconds}. The compute counted for each method (result["seconds"], its parts in
    result["seconds_parts"]):
      datamodels (and each prefix of m models): m × per_model (training) + the fit's seconds;
      a baseline with k checkpoints: k × per_model (training the checkpoint models, which
        are train-set models like the others) + its measured scoring seconds (for a budget
        k < K, the seconds of those k checkpoints' share of the scoring pass).
    """
    import tempfile

    from orchestrator.baselines_stage import BaselinesError, ScoresFile, budget_files, expected_files
    from orchestrator.fit_stage import DatamodelsError, fit_seconds, iter_datamodels
    from orchestrator.store import CorruptFile, Layout
    cfg, store = plan.cfg, plan.store
    compute = compute or {}
    per_model = compute.get("per_model")
    X, Y, counts = eval_set(plan.ledger, plan.n, plan.n_targets)
    if len(X) < 3:
        raise LedgerError(f"only {len(X)} eval masks in the ledger; LDS needs more (masks.n_eval)")
    n_boot, seed = int(cfg.eval.bootstrap), int(cfg.eval.bootstrap_seed)
    # Every method is scored one target block at a time (a datamodels chunk, a scores column),
    # so that the driver holds one block of one method's [T, n] weights, whatever T and n; the
    # plot of the top examples keeps the rows of its targets only.
    shown = min(int(cfg.eval.get("show_targets") or 0), plan.n_targets)
    weights: dict[str, np.ndarray] = {}

    def kept(name, blocks):
        for a, b, w, icpt in blocks:
            if a < shown:
                weights[name] = np.concatenate([weights.get(name, np.zeros((0, w.shape[1]), np.float32)),
                                                np.asarray(w[:shown - a], np.float32)])
            yield a, b, w, icpt

    def datamodels(rel_dir):
        """The datamodels' target blocks; a chunk that fails verification is one line naming it."""
        try:
            yield from iter_datamodels(store, rel_dir, plan.n_targets)
        except CorruptFile as err:
            raise DatamodelsError(f"evaluate: {store.where(err.rel)} fails verification ({err.reason}); "
                                  f"run stage=fit to refit it") from None

    results, per_target = {}, {}
    results["datamodels"], per_target["datamodels"] = score_blocks(
        X, Y, kept("datamodels", datamodels(datamodels_dir)), True, n_boot, seed)
    dm_fit = None
    if compute.get("datamodels") is not None and per_model is not None and compute.get("models") is not None:
        dm_fit = float(compute["datamodels"]) - float(per_model) * int(compute["models"])
    _, dm_parts = datamodels_compute(compute.get("models"), per_model, dm_fit)
    results["datamodels"].update(seconds=compute.get("datamodels"), seconds_parts=dm_parts)

    curve = {}
    for m, d in sorted((prefix_dirs or {}).items()):
        curve[int(m)], _ = score_blocks(X, Y, datamodels(d), True, n_boot, seed)
        total, parts = datamodels_compute(int(m), compute.get("per_model", 0.0), fit_seconds(store, d))
        curve[int(m)].update(seconds=total, seconds_parts=parts)
    if curve and compute.get("models"):
        curve[int(compute["models"])] = dict(results["datamodels"])

    def missing(name, rel, what, err):
        return BaselinesError(f"evaluate: baseline {name} has no valid scores{what} at {store.where(rel)} "
                              f"({type(err).__name__}); run stage=baselines")

    now: dict[int, str | None] = {}      # checkpoint i -> the digest of the checkpoint in the store

    def stale_checkpoints(meta: dict) -> str | None:
        """What is wrong with the checkpoints a scores file was computed from, compared with
        those in the store now (a checkpoint retrained since, or one it does not record); None
        when they agree. A checkpoint that is gone or fails verification now is the train and
        baselines stages' to mend: it does not make the scores stale."""
        from orchestrator.train_stage import check_checkpoint
        used = meta.get("checkpoint_digests")
        if not isinstance(used, list):
            return "checkpoints it does not record (it was written before scores recorded them)"
        for i, digest in enumerate(used):
            if i not in now:
                now[i] = check_checkpoint(store, i, plan.config_hash)[0]
            if now[i] is not None and now[i] != digest:
                return f"another checkpoint {i} than the one in {store.where(Layout.CHECKPOINTS)} now"
        return None

    def scores(name, rel, what=""):
        """(the metadata, the target blocks (a, b, scores [b - a, n], None)) of a scores file."""
        try:
            f = ScoresFile(store, rel)
            shape, meta = f.shape, f.meta
        except (FileNotFoundError, CorruptFile) as err:
            raise missing(name, rel, what, err) from None
        if shape != (plan.n, plan.n_targets):
            raise BaselinesError(f"evaluate: {store.where(rel)} ({name}{what}) has shape {shape}, expected "
                                 f"({plan.n}, {plan.n_targets}); run stage=baselines")
        stale = stale_checkpoints(meta)
        if stale is not None:
            raise BaselinesError(f"evaluate: {store.where(rel)} ({name}{what}) was computed from {stale}; "
                                 f"run stage=baselines to score them again")

        def blocks():
            try:
                for a, b, S in f.blocks():
                    yield a, b, S.T, None
            except (FileNotFoundError, CorruptFile) as err:
                raise missing(name, rel, what, err) from None
        return meta, blocks()

    budget_rel = budget_files(cfg)
    lds_budget = {}
    for name, rel in sorted(expected_files(cfg).items()):
        meta, blocks = scores(name, rel)
        results[name], per_target[name] = score_blocks(X, Y, kept(name, blocks), False, n_boot, seed)
        total, parts = baseline_compute(meta.get("seconds"), meta.get("checkpoints"), per_model)
        results[name].update(seconds=total, seconds_parts=parts, params=meta.get("params"),
                             checkpoints=meta.get("checkpoints"))
        if name in budget_rel:
            curve_k = {}
            for k, brel in sorted(budget_rel[name].items()):
                mk, blocks_k = scores(name, brel, f" for its first {k} checkpoints (baselines.budget_checkpoints)")
                rk, _ = score_blocks(X, Y, blocks_k, False, n_boot, seed)
                total_k, parts_k = baseline_compute(mk.get("seconds"), k, per_model)
                curve_k[k] = {**rk, "seconds": total_k, "seconds_parts": parts_k}
            r = results[name]
            curve_k[int(meta.get("checkpoints") or 0)] = {key: r[key] for key in
                                                          ("mean", "ci95", "median", "targets", "seconds",
                                                           "seconds_parts")}
            lds_budget[name] = {str(k): v for k, v in sorted(curve_k.items())}
            results[name]["budget"] = lds_budget[name]

    scratch = tempfile.mkdtemp(prefix="datamodels-plots-")
    plots = {"lds": os.path.join(scratch, "lds.png"), "lds_vs_compute": os.path.join(scratch, "lds_vs_compute.png")}
    plot_lds(results, per_target, plots["lds"])
    plot_lds_vs_compute(results, curve, plots["lds_vs_compute"], lds_budget, per_model)
    if len(curve) > 1:
        plots["lds_vs_models"] = os.path.join(scratch, "lds_vs_models.png")
        plot_lds_vs_models(curve, plots["lds_vs_models"])
    try:
        x_tr, y_tr, x_tg, y_tg, num_classes = plan.task.arrays()
    except (AttributeError, TypeError, ValueError):
        x_tr = x_tg = None
    if x_tr is not None and shown > 0:
        plots["top_examples"] = os.path.join(scratch, "top_examples.png")
        plot_top_examples(weights, x_tr, x_tg, list(range(shown)), plots["top_examples"], train_labels=y_tr,
                          target_labels=y_tg, names=task_class_names(plan.task, int(num_classes)))
    npz = os.path.join(scratch, "lds_per_target.npz")
    np.savez(npz, **per_target)  # type: ignore[arg-type]  # numpy's stub takes allow_pickle for **kwds
    stored = {}
    for name, path in plots.items():
        with open(path, "rb") as f:
            store.write_bytes(Layout.plot(name), f.read())
        stored[name] = Layout.plot(name)
    with open(npz, "rb") as f:
        store.write_bytes(Layout.LDS_PER_TARGET, f.read())

    method_metrics = {}
    for name, r in results.items():
        metrics = {"lds": r["mean"], "lds_ci_lo": r["ci95"][0], "lds_ci_hi": r["ci95"][1]}
        if r.get("seconds") is not None:
            metrics["compute_seconds"] = r["seconds"]
        for part, v in (r.get("seconds_parts") or {}).items():
            if v is not None:
                metrics[f"compute_seconds_{part}"] = v
        if "mse" in r:
            metrics["mse"] = r["mse"]
        method_metrics[name] = metrics
        tracker.log_metrics({f"lds_{name}": r["mean"]})
    for m, r in sorted(curve.items()):
        tracker.log_metrics({"lds_datamodels_curve": r["mean"]}, step=m)
    for name, bk in lds_budget.items():
        for k, r in bk.items():  # type: ignore[assignment]  # k: str here, int above
            tracker.log_metrics({f"lds_{name}_budget": r["mean"]}, step=int(k))
    for path in plots.values():
        tracker.log_artifact(path)
    return {"lds": results, "lds_curve": {str(m): r for m, r in curve.items()}, "lds_budget": lds_budget,
            "method_metrics": method_metrics, "eval_masks": int(len(X)), "replicas_mean": float(counts.mean()),
            "plots": stored, "scratch": scratch}
