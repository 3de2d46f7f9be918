"""Interchange with MadryLab's published datamodels data (the `datamodels-data` layout).

What that layout is, as its own repositories describe it (MadryLab/datamodels-data README.md;
MadryLab/datamodels README.md, datamodels/regression/write_dataset.py and
compute_datamodels.py, examples/cifar10/example.sh):
- Per dataset and subset fraction α (PCT = 100·α, e.g. 50), `data/train_masks_{PCT}pct.npy`
  is a bool matrix [models, n_train] (row i: which training examples model i saw), and
  `data/{split}_margins_{PCT}pct.npy` the float16 margins [models, targets] of the same models
  on the `test` (or `train`) examples. The README says that 10,000 more models than used for
  fitting are in each matrix, held out for evaluation; it does not say which rows. Their
  regression takes its fit and validation models from the first rows (`num_train`, then
  `num_val`), so the held-out models are read here as the last rows (`eval_rows`).
- `datamodels/{split}_{PCT}pct.pt` is a torch-saved dict: `weight` [n_train, targets] (one
  column per target, the transpose of ours), `bias` [targets], `lam` [targets]; their own
  regression script writes the same three keys to `datamodels.pt`. Their training store (one
  experiment) is flat: `masks.npy`, `margins.npy` (and `_completed.npy`); that form is read too.

`export` writes one of our experiments in the published form (train models, then eval models,
margins float32, not float16, so that nothing is rounded) with `manifest.json` saying how many
rows are eval models; `load_published` reads either form and checks every file's shape
against the others; `evaluate_published` scores the published datamodels by LDS on the
published eval models, or on one of our experiments' eval set, with evaluate.score_method.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import re
import sys
from dataclasses import dataclass

import numpy as np

from orchestrator import api
from orchestrator.metrics.lds import score_method
from orchestrator.storage.store import Store

MANIFEST = "manifest.json"
PCT = re.compile(r"train_masks_(.+)pct\.npy$")


class InterchangeError(api.ApiError):
    """A published directory or file that cannot be read as asked: one line naming the file and the fix."""


@dataclass
class Published:
    """Datamodels data in MadryLab's layout: every model's mask and margins, the datamodels."""
    root: str
    masks: np.ndarray            # bool [M, n]: fit models first, eval models last
    margins: np.ndarray          # float32 [M, T]
    weight: np.ndarray | None    # float32 [n, T] (their orientation), None without datamodels
    bias: np.ndarray | None      # float32 [T]
    lam: np.ndarray | None       # [T] where the file has it
    eval_rows: int               # the last eval_rows rows are held-out eval models

    @property
    def n(self) -> int:
        return int(self.masks.shape[1])

    @property
    def n_targets(self) -> int:
        return int(self.margins.shape[1])

    def train(self) -> tuple[np.ndarray, np.ndarray]:
        """(masks, margins) of the models for fitting."""
        k = len(self.masks) - self.eval_rows
        return self.masks[:k], self.margins[:k]

    def eval(self) -> tuple[np.ndarray, np.ndarray]:
        """(masks, margins) of the held-out models, one row per model."""
        k = len(self.masks) - self.eval_rows
        return self.masks[k:], self.margins[k:]


def pct_name(alpha: float) -> str:
    """α as the layout's file names write it: 0.5 -> "50"."""
    return f"{100 * float(alpha):g}"


# ----------------------------------------------------------------------------- export
def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def export(exp_or_path, out_dir: str, datamodels: str | None = None) -> dict:
    """Write the experiment (an api.Experiment or its run directory / store URI) in the
    published layout under `out_dir` (a directory or a store URI); returns the manifest."""
    import torch
    exp = exp_or_path if isinstance(exp_or_path, api.Experiment) else api.open(str(exp_or_path), datamodels)
    pct = pct_name(exp.summary["alpha"])
    split = str((exp.config.get("task") or {}).get("target_split") or "test")
    X, Y, ids = exp.ledger("train")
    Xe, Ye, ide = exp.ledger("eval")
    W, b, lam = exp.datamodel_arrays()
    out = Store(out_dir)
    rel_masks, rel_margins = f"data/train_masks_{pct}pct.npy", f"data/{split}_margins_{pct}pct.npy"
    rel_dm = f"datamodels/{split}_{pct}pct.pt"
    out.write_bytes(rel_masks, _npy(np.concatenate([X, Xe])))
    out.write_bytes(rel_margins, _npy(np.concatenate([Y, Ye]).astype(np.float32)))
    buf = io.BytesIO()
    torch.save({"weight": torch.from_numpy(np.ascontiguousarray(W.T)), "bias": torch.from_numpy(b.copy()),
                "lam": torch.from_numpy(lam.copy())}, buf)
    out.write_bytes(rel_dm, buf.getvalue())
    manifest = {"layout": "MadryLab datamodels-data", "pct": pct, "split": split, "n": exp.n,
                "n_targets": exp.n_targets, "train_rows": int(len(X)), "eval_rows": int(len(Xe)),
                "train_model_ids": ids.tolist(), "eval_model_ids": ide.tolist(),
                "files": {"masks": rel_masks, "margins": rel_margins, "datamodels": rel_dm},
                "experiment": exp.store.where(), "datamodels_dir": exp.datamodels_dir}
    out.write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


# ----------------------------------------------------------------------------- reading
def _files(root: str, pct: str | None, split: str) -> tuple[str, str, str | None]:
    """(masks, margins, datamodels or None) of a published directory: the dataset form
    (data/, datamodels/) or the flat form of their training store (masks.npy, margins.npy)."""
    if os.path.exists(os.path.join(root, "masks.npy")):
        dm = os.path.join(root, "datamodels.pt")
        return os.path.join(root, "masks.npy"), os.path.join(root, "margins.npy"), dm if os.path.exists(dm) else None
    found = sorted(m.group(1) for p in glob.glob(os.path.join(root, "data", "train_masks_*pct.npy"))
                   if (m := PCT.search(p)))
    if not found:
        raise InterchangeError(f"{root}: no data/train_masks_<PCT>pct.npy or masks.npy; pass a directory in "
                               f"MadryLab's datamodels-data layout (e.g. the output of `interchange export`)")
    if pct is None:
        if len(found) > 1:
            raise InterchangeError(f"{root}: masks for α = {found} percent; pick one with pct=")
        pct = found[0]
    elif str(pct) not in found:
        raise InterchangeError(f"pct={pct}: {root}/data has masks for {found} percent; pick one of those")
    dm = os.path.join(root, "datamodels", f"{split}_{pct}pct.pt")
    return (os.path.join(root, "data", f"train_masks_{pct}pct.npy"),
            os.path.join(root, "data", f"{split}_margins_{pct}pct.npy"), dm if os.path.exists(dm) else None)


def _load_npy(path: str, root: str) -> np.ndarray:
    rel = os.path.relpath(path, root)
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise InterchangeError(f"{rel}: missing in {root}; it belongs beside the masks") from None
    except ValueError as err:
        raise InterchangeError(f"{rel}: not a numpy .npy array ({err})") from None


def _shape(rel: str, what: str, arr, want: tuple) -> None:
    """Refuse `arr` unless its shape is `want` (None: any size there)."""
    shape = tuple(arr.shape)
    if len(shape) != len(want) or any(w is not None and s != w for s, w in zip(shape, want)):
        shown = "(" + ", ".join("*" if w is None else str(w) for w in want) + ("," if len(want) == 1 else "") + ")"
        raise InterchangeError(f"{rel}: {what} has shape {shape}, expected {shown}")


def load_published(root: str, pct: str | None = None, split: str = "test", eval_rows: int | None = None) -> Published:
    """Read a directory in MadryLab's layout, checking the files' shapes against each other.
    `eval_rows`: how many of the last models are held out for evaluation; from manifest.json
    where `export` wrote one, else it must be given (the published CIFAR-10 and FMoW data
    hold 10,000 of them)."""
    root = str(root)
    if not os.path.isdir(root):
        raise InterchangeError(f"{root}: not a directory; pass a directory in MadryLab's datamodels-data layout")
    masks_p, margins_p, dm_p = _files(root, None if pct is None else str(pct), split)
    rel = lambda p: os.path.relpath(p, root)  # noqa: E731
    masks = _load_npy(masks_p, root)
    _shape(rel(masks_p), "the masks", masks, (None, None))
    if masks.dtype != bool:
        raise InterchangeError(f"{rel(masks_p)}: masks of dtype {masks.dtype}, expected bool")
    M, n = masks.shape
    margins = _load_npy(margins_p, root)
    _shape(rel(margins_p), "the margins (a row per model of the masks)", margins,
           (M, margins.shape[1] if margins.ndim == 2 else None))
    T = int(margins.shape[1])
    weight = bias = lam = None
    if dm_p is not None:
        weight, bias, lam = _load_datamodels(dm_p, rel(dm_p), n, T)
    if eval_rows is None:
        manifest = os.path.join(root, MANIFEST)
        if not os.path.exists(manifest):
            raise InterchangeError(f"{root}: no {MANIFEST} says which models are held out; pass eval_rows= "
                                   f"(the number of last rows that are eval models, e.g. 10000)")
        eval_rows = int(json.load(open(manifest))["eval_rows"])
    if isinstance(eval_rows, bool) or not 0 <= int(eval_rows) <= M:
        raise InterchangeError(f"eval_rows={eval_rows}: {rel(masks_p)} holds {M} models; pick 0..{M}")
    return Published(root, np.asarray(masks), np.asarray(margins, dtype=np.float32), weight, bias, lam,
                     int(eval_rows))


def _load_datamodels(path: str, rel: str, n: int, T: int):
    """(weight [n, T], bias [T], lam [T] or None) of a datamodels .pt, shapes checked."""
    import torch
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
        raise InterchangeError(f"{rel}: not a torch-saved dict of tensors ({str(err).splitlines()[0][:160]})") \
            from None
    if not isinstance(d, dict) or "weight" not in d or "bias" not in d:
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise InterchangeError(f"{rel}: holds {keys}, expected a dict with 'weight' [n, T] and 'bias' [T]")
    as_np = lambda v: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)  # noqa: E731
    weight, bias = as_np(d["weight"]).astype(np.float32), as_np(d["bias"]).astype(np.float32)
    _shape(rel, f"weight ([n training examples, T targets], n={n} and T={T} from the masks and margins)",
           weight, (n, T))
    _shape(rel, "bias", bias.reshape(-1) if bias.size == T else bias, (T,))
    lam = as_np(d["lam"]).reshape(-1) if "lam" in d else None
    if lam is not None and lam.size not in (1, T):
        _shape(rel, "lam", lam, (T,))
    return weight, bias.reshape(-1), lam


# ----------------------------------------------------------------------------- evaluation
def average_replicas(masks: np.ndarray, margins: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct masks, their rows' mean margins, rows per mask): models trained on one mask
    with different seeds count once, with their margins averaged, as evaluate.eval_set does."""
    _, first, inverse, counts = np.unique(np.packbits(masks, axis=1), axis=0, return_index=True,
                                          return_inverse=True, return_counts=True)
    sums = np.zeros((len(counts), margins.shape[1]), np.float64)
    np.add.at(sums, inverse.reshape(-1), margins.astype(np.float64))
    return masks[first], (sums / counts[:, None]).astype(np.float32), counts


def evaluate_published(pub, on=None, n_boot: int = 1000, seed: int = 0, **load) -> dict:
    """LDS (evaluate.score_method) of published datamodels (a Published or its directory; `load`
    goes to load_published) on the published eval models, or, with `on` (an api.Experiment
    or its run directory), on that experiment's eval set and with its bootstrap settings."""
    pub = pub if isinstance(pub, Published) else load_published(pub, **load)
    if pub.weight is None:
        raise InterchangeError(f"{pub.root}: no datamodels .pt beside the masks; nothing to evaluate")
    if on is not None:
        exp = on if isinstance(on, api.Experiment) else api.open(str(on))
        if (pub.n, pub.n_targets) != (exp.n, exp.n_targets):
            raise InterchangeError(f"on={exp.store.where()}: it has n={exp.n}, T={exp.n_targets}, the published "
                                   f"datamodels n={pub.n}, T={pub.n_targets}; they must agree")
        X, Y, counts = exp.eval_set()
        n_boot, seed = exp.bootstrap
    else:
        X, Y, counts = average_replicas(*pub.eval())
    if len(X) < 3:
        raise InterchangeError(f"{pub.root}: {len(X)} eval masks; LDS needs at least 3 (set eval_rows=)")
    out, _ = score_method(X, Y, pub.weight.T, pub.bias, n_boot, seed)
    return out | {"eval_masks": int(len(X)), "eval_models": int(counts.sum())}


def lds_line(name: str, r: dict) -> str:
    """One line: the LDS, its 95% interval, the eval masks and the MSE."""
    return (f"{name}: LDS {r['mean']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] on {r['eval_masks']} eval masks "
            f"({r['eval_models']} models), MSE {r['mse']:.4f}")


# ----------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.api.interchange",
                                     description="Interchange with MadryLab's datamodels-data layout.")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write an experiment in the published layout")
    ex.add_argument("run_dir", help="the experiment's run directory or store URI")
    ex.add_argument("out_dir", help="where to write data/, datamodels/ and manifest.json")
    ex.add_argument("--datamodels", help="a datamodels directory by name (default: the last fit's)")
    ev = sub.add_parser("evaluate", help="LDS of published datamodels")
    ev.add_argument("dir", help="a directory in the published layout")
    ev.add_argument("--pct", help="which α, in percent, when the directory holds several")
    ev.add_argument("--split", default="test", help="the target group: test (default) or train")
    ev.add_argument("--eval-rows", type=int, help="how many of the last models are held out (default: manifest.json)")
    ev.add_argument("--on", help="score them on this experiment's eval set instead (a run directory or store URI)")
    ev.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% interval")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            m = export(args.run_dir, args.out_dir, args.datamodels)
            print(f"exported {m['train_rows']} train + {m['eval_rows']} eval models, n={m['n']}, T={m['n_targets']} "
                  f"to {args.out_dir}")
        else:
            r = evaluate_published(args.dir, on=args.on, n_boot=args.bootstrap, pct=args.pct, split=args.split,
                                   eval_rows=args.eval_rows)
            print(lds_line("datamodels (published)", r))
    except api.ApiError as err:
        print(f"interchange: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
