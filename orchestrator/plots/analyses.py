"""The opt-in analyses' plots: counterfactual drops and calibration, brittleness, image
rows (leakage, embedding extremes) and spectra. Arrays in, PNG out.
"""
from __future__ import annotations

import numpy as np

from orchestrator.plots.style import count_log_axis, place_tags, pyplot, save, show, sig


def plot_drops(rows: dict, ks: list[int], names: list[str], colors: dict, path: str, masks: int | None = None) -> dict:
    """Each method's actual margin drop (95% CI) against k, log x ticked at the ks. A point
    that averages over fewer targets than the others (a target whose retrained models all
    failed has no drop) is tagged with its count, "n=7 targets"."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.2, 4.8))
    counts = [rows[name][str(k)].get("targets") for name in names for k in ks]
    full = max([c for c in counts if c is not None], default=None)
    tags = []
    for i, name in enumerate(names):
        r = rows[name]
        x = np.array(ks, float) * (1 + 0.02 * (i - (len(names) - 1) / 2))     # a little apart
        y = np.array([r[str(k)]["actual"] for k in ks])
        lo = np.array([r[str(k)]["ci95"][0] for k in ks])
        hi = np.array([r[str(k)]["ci95"][1] for k in ks])
        err = np.nan_to_num(np.clip([y - lo, hi - y], 0, None))
        ax.errorbar(x, y, yerr=err, fmt="-o", color=colors[name], capsize=3, label=name)
        tags += [(xi, yi, f"n={r[str(k)]['targets']} targets", colors[name]) for xi, yi, k in zip(x, y, ks)
                 if r[str(k)].get("targets") is not None and r[str(k)]["targets"] < full]
    ax.axhline(0, color="gray", linewidth=1, linestyle="--")
    count_log_axis(ax, ks)
    if tags:
        place_tags(ax, tags)
    ax.set_xlabel("k: training examples removed (the method's top k for the target)", fontsize=10)
    over = f"{full} targets" if full is not None else "targets"
    ax.set_ylabel(f"actual margin drop after retraining\n(mean over {over}" + (f" × {masks} masks" if masks else "")
                  + ", 95% CI)", fontsize=10)
    ax.tick_params(labelsize=9)
    ax.set_title("Counterfactual: removing each method's top-k examples", fontsize=11)
    ax.grid(alpha=0.3)
    note = ("n=…: the targets a point averages\nover, fewer where every retrained\nmodel of a target failed"
            if tags else None)
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method", title_fontsize=9)
    if note:
        ax.text(1.02, 0.0, note, transform=ax.transAxes, fontsize=8, va="bottom", ha="left", color="dimgray")
    return save(fig, path)


def plot_calibration(cells: list[dict], fit_line: dict, names: list[str], colors: dict, path: str) -> dict:
    """Predicted against actual drop, one panel per method with scores (at most three
    panels a row), each titled with the correlation and the calibration slope in significant
    digits (a baseline's scores have their own units: its slope may be 0.0029 or 3700)."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    shown = [m for m in names if m in fit_line]
    cols = min(3, max(1, len(shown)))
    nrows = max(1, -(-len(shown) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.9 * cols, 3.5 * nrows + 0.5), squeeze=False,
                             layout="constrained")
    for ax, name in zip(axes.flat, shown):
        p = np.array([c["predicted"] for c in cells if c["method"] == name], float)
        a = np.array([c["actual"] for c in cells if c["method"] == name], float)
        ax.scatter(p, a, s=14, color=colors[name], alpha=0.7)
        f = fit_line[name]
        if f["slope"] is not None and np.isfinite(p).any():
            xs = np.array([min(np.nanmin(p), 0), np.nanmax(p)])
            ax.plot(xs, f["slope"] * xs, color=colors[name], linewidth=1, label="fitted slope")
        if name == "datamodels":
            lim = [min(np.nanmin(p), np.nanmin(a), 0), max(np.nanmax(p), np.nanmax(a), 0)]
            ax.plot(lim, lim, color="gray", linestyle="--", linewidth=1, label="actual = predicted")
        ax.legend(fontsize=8, loc="best")
        held = f.get("held_out_slope")
        ax.set_title(f"{name}\nr = {sig(f['correlation'], 2)}, slope = {sig(f['slope'])}"
                     + (f" (held out: {sig(held)})" if held is not None else ""), fontsize=9.5)
        ax.set_xlabel("predicted drop (sum of scores removed)", fontsize=9)
        ax.set_ylabel("actual drop (retrained)", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.tick_params(labelsize=8.5)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle("Predicted against actual margin drop, one point per (target, k); slope: actual per unit of "
                 "predicted drop\n(held out: the slope once each target is scaled by the other targets' fit)",
                 fontsize=10)
    return save(fig, path)


def plot_brittleness(curve: dict, ks: list[int], targets: int, masks: int, path: str) -> dict:
    """The fraction of the targets flipped by removing at most k examples against k (log x
    ticked at the ks), predicted and verified: two styles, so that equal curves both show."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    ax.plot(ks, [curve[str(k)]["predicted"] for k in ks], "--o", color="tab:blue", markersize=9,
            markerfacecolor="none", linewidth=2, label="predicted by the datamodels (greedy by weight)")
    ax.plot(ks, [curve[str(k)]["verified"] for k in ks], "-s", color="tab:orange", markersize=5,
            label=f"verified: mean margin < 0 after retraining ({masks} masks)")
    count_log_axis(ax, ks)
    ax.set_ylim(0, 1)
    ax.set_xlabel("k: training examples removed (at most)", fontsize=10)
    ax.set_ylabel(f"fraction of the {targets} correctly\nclassified targets flipped", fontsize=10)
    ax.tick_params(labelsize=9)
    ax.set_title("Brittleness: targets flipped by removing at most k examples", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="upper left")
    return save(fig, path)


def plot_rows(rows: list[tuple[str, list]], title: str, path: str) -> dict:
    """A grid of images, one row per (label, cells); a cell is (image, caption, colour),
    (None, text, colour) (a note in place of an image) or None (an empty gap). Every image is
    captioned; the row's label is left of its first cell; the title is wrapped to the width."""
    import textwrap

    plt = pyplot()
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
            show(ax, img)
            ax.set_title(caption, fontsize=8, pad=2, color=color)
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9, labelpad=8)
    chars = max(40, int(width * 72 / (0.55 * 9)))
    fig.suptitle("\n".join(line for para in title.split("\n") for line in textwrap.wrap(para, chars)), fontsize=9)
    return save(fig, path)


def plot_spectra(spectra: dict[str, np.ndarray], path: str) -> dict:
    """Explained variance ratio against component (integer ticks), one line per
    representation (log y)."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
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
    return save(fig, path)


def plot_found(curves: dict[str, np.ndarray], aucs: dict[str, float], flipped: int, path: str) -> dict:
    """The share of the flipped labels found against the share of the training set inspected in
    each method's order (found_curve), with chance (the diagonal) and the best possible."""
    from orchestrator.plots.style import method_colors
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.6, 4.8))
    colors = method_colors(list(curves))
    for name, curve in curves.items():
        x = np.arange(len(curve)) / max(len(curve) - 1, 1)
        ax.plot(x, curve, color=colors[name], linewidth=1.6, label=f"{name} (AUC {sig(aucs[name])})")
    n = max(len(c) for c in curves.values()) - 1 if curves else 1
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="chance")
    ax.plot([0, flipped / max(n, 1), 1], [0, 1, 1], color="black", linestyle=":", linewidth=1, label="perfect")
    for q in (0.05, 0.1, 0.2):
        ax.axvline(q, color="lightgray", linewidth=0.8, zorder=0)
    ax.set_xlabel("share of the training set inspected, in the method's order", fontsize=10)
    ax.set_ylabel(f"share of the {flipped} flipped labels found", fontsize=10)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.tick_params(labelsize=9)
    ax.set_title("Finding the flipped labels: found against inspected", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8.5, loc="lower right")
    return save(fig, path)


def plot_repair(repair: dict, path: str) -> dict:
    """Mean test accuracy (95% CI over models) of every repair variant, with the noisy and the
    clean training sets as reference lines."""
    plt = pyplot()
    rows = repair["variants"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(7.8, 0.34 * len(names) + 2.0))
    y = np.arange(len(names))[::-1]
    acc = np.array([rows[v]["test_acc"] for v in names])
    lo = np.array([rows[v]["test_acc_ci95"][0] if rows[v]["test_acc_ci95"][0] is not None else a
                   for v, a in zip(names, acc)])
    hi = np.array([rows[v]["test_acc_ci95"][1] if rows[v]["test_acc_ci95"][1] is not None else a
                   for v, a in zip(names, acc)])
    ax.errorbar(acc, y, xerr=np.clip([acc - lo, hi - acc], 0, None), fmt="o", color="tab:blue", capsize=3)
    for ref, color in (("noisy", "tab:red"), ("clean", "tab:green")):
        ax.axvline(rows[ref]["test_acc"], color=color, linestyle="--", linewidth=1, label=f"{ref} training set")
    ax.set_yticks(y)
    def recovered(v):
        r = rows[v]["recovered"]
        return "" if v in ("noisy", "clean") or r is None else f" (recovers {100 * r:.0f}%)"
    ax.set_yticklabels([f"{v}{recovered(v)}" for v in names], fontsize=8.5)
    ax.set_xlabel(f"test accuracy, mean over {repair['models_per_variant']} models (95% CI)", fontsize=10)
    ax.set_title(f"Repair by retraining: each method's top {repair['k']} removed or relabelled", fontsize=11)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8.5, loc="upper center", bbox_to_anchor=(0.5, -0.07 - 0.6 / (0.34 * len(names) + 2.0)),
              ncol=2, frameon=False)
    return save(fig, path)
