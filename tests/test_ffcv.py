"""The optional FFCV loader (train.loader=ffcv): .beton written once, each mask read exactly.

Tests that need ffcv are skipped with the install line when it is absent (it is an
optional extra: `pip install '.[ffcv]'`, which compiles against libturbojpeg and OpenCV);
the refusal of train.loader=ffcv without it runs wherever ffcv is missing.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from workers import ffcv_loader as FL

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_ffcv = pytest.mark.skipif(not FL.available(),
                                reason=f"ffcv is an optional extra and is not installed: {FL.INSTALL_HINT}")


def images(n=600, seed=0):
    """Random uint8 images whose first two pixels spell the example's index (so reads are checkable)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = np.arange(n) // 256, np.arange(n) % 256
    y = rng.integers(0, 10, n)
    return x, y


@needs_ffcv
def test_beton_written_once_and_named_by_content(tmp_path):
    x, y = images()
    path = FL.write_beton(x, y, str(tmp_path))
    assert os.path.exists(path) and path.endswith(".beton")
    stamp = os.stat(path).st_mtime_ns
    assert FL.write_beton(x, y, str(tmp_path)) == path
    assert os.stat(path).st_mtime_ns == stamp  # found, not rewritten
    y2 = y.copy()
    y2[0] = (y2[0] + 1) % 10
    assert FL.write_beton(x, y2, str(tmp_path)) != path  # other contents, other file
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


@needs_ffcv
def test_concurrent_writers_leave_one_complete_file(tmp_path):
    x, y = images(n=2000)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    code = (f"import numpy as np, sys; sys.path.insert(0, {REPO!r}); from workers import ffcv_loader as FL; "
            f"print(FL.write_beton(np.load({str(tmp_path / 'x.npy')!r}), np.load({str(tmp_path / 'y.npy')!r}), "
            f"{str(tmp_path / 'cache')!r}))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300)[0].strip().splitlines()[-1] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outs)) == 1
    assert sorted(f for f in os.listdir(tmp_path / "cache") if f.endswith(".beton")) == [os.path.basename(outs[0])]
    loader = FL.mask_loader(outs[0], np.arange(2000), 500, 0, "cpu", shuffle=False, drop_last=False)
    got = np.concatenate([b[0].numpy().copy() for b in loader])  # FFCV reuses its batch buffers
    assert np.array_equal(got, x)


@needs_ffcv
def test_mask_loader_reads_exactly_the_mask_each_epoch(tmp_path):
    x, y = images()
    path = FL.write_beton(x, y, str(tmp_path))
    mask = np.sort(np.random.default_rng(1).choice(len(x), 300, replace=False))
    loader = FL.mask_loader(path, mask, 50, seed=7, device="cpu")
    orders = []
    for _ in range(2):
        seen = []
        for xb, yb, ib in loader:
            ib = ib.numpy().copy()  # FFCV reuses its batch buffers: keep a copy
            assert xb.dtype.is_floating_point is False and tuple(xb.shape) == (50, 1, 8, 8)
            assert np.array_equal(xb.numpy(), x[ib]) and np.array_equal(yb.numpy(), y[ib])
            ids = xb.numpy()[:, 0, 0, 0].astype(int) * 256 + xb.numpy()[:, 0, 0, 1]
            assert np.array_equal(ids, ib)
            seen.append(ib)
        order = np.concatenate(seen)
        assert len(order) == 300 and np.array_equal(np.sort(order), mask)
        orders.append(order)
    assert not np.array_equal(orders[0], orders[1])  # reshuffled each epoch
    again = np.concatenate([b[2].numpy().copy() for b in FL.mask_loader(path, mask, 50, seed=7, device="cpu")])
    assert np.array_equal(again, orders[0])  # same seed, same order

    # a retargeted loader reads exactly what a fresh one for that mask and seed reads
    other = np.sort(np.random.default_rng(2).choice(len(x), 300, replace=False))
    fresh = FL.mask_loader(path, other, 50, seed=11, device="cpu")
    FL.retarget(loader, other, 11)
    for _ in range(2):
        a = np.concatenate([b[2].numpy().copy() for b in loader])
        b = np.concatenate([b[2].numpy().copy() for b in fresh])
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="mask size"):
        FL.retarget(loader, other[:10], 1)


@needs_ffcv
def test_trainer_streamed_from_ffcv_matches_resident_accuracy(tmp_path):
    from workers import data as D
    from workers.train import TrainConfig, Trainer

    ds = D.load_dataset("digits", None)
    x, y, xt, yt = D.select(ds, 1000, 200, seed=0, target_split="test")
    rng = np.random.default_rng(1)
    masks = np.zeros((4, 1000), bool)
    for j in range(4):
        masks[j, rng.choice(1000, 500, replace=False)] = True
    seeds = np.arange(4)
    common = dict(epochs=8, batch_size=50, lr=0.05, lr_peak_epoch=2, device="cpu", models_per_step=4,
                  flip=False, translate=1, cutout=2, ffcv_dir=str(tmp_path))
    res = Trainer({"name": "mlp", "hidden": [64]}, TrainConfig(**common), x, y, xt, yt).train(masks, seeds)
    streamed = {}
    for engine in ("single", "batched"):
        tr = Trainer({"name": "mlp", "hidden": [64]}, TrainConfig(loader="ffcv", engine=engine, **common),
                     x, y, xt, yt)
        assert tr.x_train is None  # the training images are not held by the trainer
        streamed[engine] = tr.train(masks, seeds)
        again = tr.train(masks, seeds)  # loaders reused (retargeted): same numbers
        np.testing.assert_allclose(again.margins, streamed[engine].margins, atol=1e-5)
    # one model at a time or four in lockstep: the same models
    np.testing.assert_allclose(streamed["single"].margins, streamed["batched"].margins, atol=1e-4)
    s = streamed["batched"]
    assert s.margins.shape == (4, 200) and np.isfinite(s.margins).all()
    # another example order, the same recipe: equal accuracy up to seed noise
    assert abs(float(s.target_acc.mean()) - float(res.target_acc.mean())) < 0.03, (s.target_acc, res.target_acc)
    assert abs(float(s.train_acc.mean()) - float(res.train_acc.mean())) < 0.03, (s.train_acc, res.train_acc)
    assert float(s.target_acc.mean()) > 0.75  # chance is 0.1
    # the margins differ from the resident path's (the order differs) but agree in what they say
    assert not np.allclose(s.margins, res.margins)
    assert np.corrcoef(s.margins.mean(0), res.margins.mean(0))[0, 1] > 0.9


@pytest.mark.skipif(FL.available(), reason="ffcv is installed: the refusal is for machines without it")
def test_cli_refuses_ffcv_loader_when_not_installed(tmp_path):
    from tests.test_cli import run_cli
    proc = run_cli(["task=digits_mlp", "train.loader=ffcv"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "train.loader=ffcv" in lines[0] and "pip install" in lines[0], proc.stderr
    assert os.listdir(tmp_path) == []


@needs_ffcv
def test_train_stage_on_ray_with_ffcv_loader(tmp_path):
    """Persistent Ray actors stream from one shared .beton: the ledger fills, a re-run trains nothing."""
    from orchestrator.storage.ledger import Ledger
    from orchestrator.storage.store import Store
    from tests.test_cli import run_cli
    args = ["experiment=tiny", "stage=train", "masks.n_train=20", "masks.n_eval=4", "train.models_per_unit=10",
            "train.models_per_step=5", "train.loader=ffcv", f"train.ffcv_dir={tmp_path}/beton",
            "tracking.enabled=false"]
    proc = run_cli(args, tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (exp,) = [d for d in os.listdir(tmp_path / "runs") if d.startswith("tiny-")]
    led = Ledger(Store(str(tmp_path / "runs" / exp)))
    assert led.count("train") == 20 and led.count("eval") == 4 * 2  # eval.replicas=2 in tiny
    assert len([f for f in os.listdir(tmp_path / "beton") if f.endswith(".beton")]) == 1
    data = led.load("train")
    assert np.isfinite(data.margins).all() and data.extra["target_acc"].mean() > 0.5  # digits, 150 examples
    again = run_cli(args, tmp_path, timeout=600)
    assert again.returncode == 0 and led.count("train") == 20
