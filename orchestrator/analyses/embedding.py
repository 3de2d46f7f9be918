"""stage=embedding: PCA of the unit-norm datamodel weights, the targets at both ends of
the leading components, and the spectrum beside the model's own last-layer features.
"""
from __future__ import annotations

import logging

import numpy as np

from orchestrator.analyses.common import AnalysisError, datamodels, label, task_images
from orchestrator.metrics.geometry import extremes, pca
from orchestrator.plots.analyses import plot_rows, plot_spectra
from orchestrator.settings.schema import EmbeddingConf, make_conf
from orchestrator.storage.store import Layout
from workers.tasks import member

log = logging.getLogger(__name__)


def last_layer_features(plan, checkpoint: int, device: str) -> np.ndarray:
    """The targets' penultimate features (the input of the final linear layer) [T, d] from
    train-set checkpoint `checkpoint`."""
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
    if conf.features and member(plan.task, "attribution_inputs") is not None:
        feats = last_layer_features(plan, conf.checkpoint, conf.device)
        feats_evr = pca(feats, conf.spectrum, conf.device)[1]
        spectra[f"last-layer features (checkpoint {conf.checkpoint})"] = feats_evr
    imgs = task_images(plan, "embedding", needed=False)
    names, y_tg = (imgs[4], imgs[3]) if imgs is not None else (None, None)
    comps = []
    for c in range(k):
        entry: dict = {"component": c + 1, "explained_variance_ratio": float(evr[c])}
        for end in ("high", "low"):
            ts = ends[end][c]
            entry[end] = {"targets": ts.tolist(), "projections": proj[ts, c].tolist()}
            if y_tg is not None:
                labels = [label(names, y_tg[t]) for t in ts]
                entry[end]["classes"] = {n: labels.count(n) for n in dict.fromkeys(labels)}
        comps.append(entry)
    out = {"targets": int(len(W)), "zero_datamodels": int(len(W) - len(kept)), "datamodels": dm_dir,
           "explained_variance_ratio": [float(v) for v in evr[:conf.spectrum]],
           "features_explained_variance_ratio": None if feats_evr is None else [float(v) for v in feats_evr],
           "features_checkpoint": conf.checkpoint if feats_evr is not None else None, "components": comps}
    out["table"] = ctx.artifacts.json("embedding", out)
    plots = {}
    path = ctx.artifacts.local("embedding_spectrum.png")
    plot_spectra(spectra, path)
    plots["embedding_spectrum"] = ctx.artifacts.plot("embedding_spectrum", path)
    if imgs is not None:
        x_tg, y_tg = imgs[2], imgs[3]
        rows = [(f"PC{c + 1} {'+' if end == 'high' else '−'}",
                 [(x_tg[t], f"#{t} ({label(names, y_tg[t])})\n{proj[t, c]:+.3f}", "black") for t in ends[end][c]])
                for c in range(k) for end in ("high", "low")]
        path = ctx.artifacts.local("embedding_extremes.png")
        plot_rows(rows, "Targets with the most extreme projections on the leading principal components of the "
                        "unit-norm datamodel weights (+: the largest, −: the smallest); captions: #target "
                        "(class) and its projection", path)
        plots["embedding_extremes"] = ctx.artifacts.plot("embedding_extremes", path)
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


def run(ctx) -> dict:
    """stage=embedding, with its config section's settings."""
    from omegaconf import OmegaConf
    return embedding_stage(ctx, OmegaConf.to_container(ctx.plan.cfg.embedding, resolve=True))
