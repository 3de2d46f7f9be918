"""One style for every plot: method order and colours, class names, significant digits,
plain tick labels on log axes, tags placed without overlaps, and the one saver (`save`),
which also reports the text drawn so that tests can check it.
"""
from __future__ import annotations

import numpy as np


def class_names(dataset: str | None, num_classes: int) -> list[str]:
    """Names of labels 0..num_classes-1 of `dataset` (a workers.data name); the integer
    labels themselves for a dataset without known names."""
    from workers.data import CLASS_NAMES
    names = CLASS_NAMES.get(dataset or "")
    if names is None or len(names) != num_classes:
        return [str(i) for i in range(num_classes)]
    return list(names)


def task_class_names(task, num_classes: int) -> list[str]:
    """Class names of a task's labels: its `class_names` (workers.tasks.OPTIONAL) when they
    name num_classes labels, else the integer labels."""
    from workers.tasks import member
    own = member(task, "class_names")
    own = own() if callable(own) else own
    if own is not None and len(own) == num_classes:
        return [str(c) for c in own]
    return [str(i) for i in range(num_classes)]


def method_order(names) -> list[str]:
    """datamodels first, then the other methods alphabetically: the order of every plot."""
    names = list(names)
    return (["datamodels"] if "datamodels" in names else []) + sorted(n for n in names if n != "datamodels")


def method_colors(names) -> dict[str, str]:
    """One colour per method, by its place in method_order (the same in every plot)."""
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
               "tab:olive", "tab:cyan", "tab:gray"]
    return {n: palette[i % len(palette)] for i, n in enumerate(method_order(names))}


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


DPI = 100          # every plot is saved at this dpi; no text is smaller than 8 pt


def save(fig, path: str) -> dict:
    """Save at DPI (tight bounding box) and close; return what a reader of the PNG sees
    (`drawn_text`): every text drawn and the pairs of texts that overlap."""
    fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.15)
    report = drawn_text(fig)
    pyplot().close(fig)
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


def ci_errorbars(r: dict) -> list[list[float]]:
    lo, hi = r["ci95"]
    return [[max(r["mean"] - lo, 0.0)], [max(hi - r["mean"], 0.0)]]


def point_tags(key: str, pts: list) -> list[str]:
    """"m=38" per (m, point) of a curve, with ", n=35 targets" where the points' target counts differ."""
    return [f"{key}={v}" + (f", {n}" if n else "") for (v, _), n in zip(pts, targets_note([c for _, c in pts])[1])]


def place_tags(ax, tags, fontsize: float = 8) -> None:
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


def plain_log_ticks(ax) -> None:
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


def show(ax, img) -> None:
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
