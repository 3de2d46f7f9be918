"""The evaluate stage's plots: LDS per method, LDS against compute and against the number
of models, and the top training examples of a few targets per method. Arrays in, PNG out.
"""
from __future__ import annotations

import numpy as np

from orchestrator.plots.style import (
    DPI,
    ci_errorbars,
    count_log_axis,
    drawn_text,
    method_colors,
    method_order,
    place_tags,
    plain_log_ticks,
    point_tags,
    pyplot,
    save,
    show,
    targets_note,
)


def plot_lds(results: dict, per_target: dict, path: str) -> dict:
    """One row per method (datamodels first, then the baselines alphabetically): a dot per
    target at its LDS, and the mean over targets with its 95% bootstrap CI; the right axis
    prints the mean, the CI and the number of targets."""
    plt = pyplot()
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
        ax.errorbar([r["mean"]], [y], xerr=ci_errorbars(r), fmt="D", color="black", markersize=7, capsize=6,
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
    return save(fig, path)


def plot_lds_vs_compute(results: dict, curve: dict, path: str, budgets: dict | None = None,
                        per_model: float | None = None) -> dict:
    """Mean LDS (95% CI) against the compute each method costs, log x (the TRAK paper's
    Figure 1 format). Counted: datamodels = training the m models used + fitting the lasso
    (`curve`: one point per prefix fit of the first m models); a baseline = training its k
    checkpoint models (k × seconds per trained model) + its own scoring seconds (`budgets`:
    method -> {k: {mean, ci95, seconds}}, one point per checkpoint budget; a method without
    budgets is its single point in `results`). Points without seconds are left out; the
    caption gives `per_model`, the seconds charged per trained model, when known."""
    plt = pyplot()
    names = method_order(results)
    colors = method_colors(names)
    budgets = budgets or {}
    fig, ax = plt.subplots(figsize=(9, 5.2))
    drawn, labels = 0, []
    for name in names:
        r = results[name]
        if name == "datamodels" and curve:
            pts = sorted((int(m), c) for m, c in curve.items() if c.get("seconds"))
            tags = point_tags("m", pts)
            label = f"datamodels: train m models + fit lasso (m = {', '.join(str(m) for m, _ in pts)})"
        elif name in budgets and budgets[name]:
            pts = sorted((int(k), c) for k, c in budgets[name].items() if c.get("seconds"))
            tags = point_tags("k", pts)
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
        err = np.array([ci_errorbars(c) for _, c in pts])[:, :, 0].T
        ax.errorbar(xs, ys, yerr=err, fmt="-o" if len(pts) > 1 else "o", color=colors[name], capsize=3,
                    markersize=6, linewidth=1.8, label=label)
        labels += [(x, y, tag, colors[name]) for x, y, tag in zip(xs, ys, tags) if tag]
        drawn += 1
    ax.set_xscale("log")
    plain_log_ticks(ax)
    place_tags(ax, labels)
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
    return save(fig, path)


def plot_lds_vs_models(curve: dict, path: str) -> dict:
    """The datamodels' mean LDS (95% CI) against the number of train models they were fit
    on, log x ticked at those counts; where the points average over different numbers of
    targets (a datamodel that is all zeros has no LDS), each tick says over how many."""
    plt = pyplot()
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
    return save(fig, path)


def plot_top_examples(weights: dict, images, target_images, targets, path: str, top: int = 5, *,
                      train_labels=None, target_labels=None, names=None) -> dict | None:
    """For each shown target, one row per method (datamodels first): the target image, then the
    `top` training images with the most positive scores (+1 the largest) and the `top` with the
    most negative (−1 the smallest). Every image is captioned with its class (the target's true
    class; a training image's label, green when it is the target's class) and a training image
    with its score; a header row per target names the columns."""
    if images is None:
        return None
    plt = pyplot()
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
            show(ax, target_images[t])
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
                show(ax, images[i])
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
