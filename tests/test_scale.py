"""The driver at the ledger's full size holds metadata only: fit tasks read their own block
of the ledger from the store (and the fit is bitwise what it was when the driver loaded
everything), fit.gpus_per_task resolves from the cluster, and the masks .npy is written in
blocks."""
import dataclasses
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from orchestrator.scheduling.serve import StoreHandle
from orchestrator.stages import fit as fit_stage_fit
from orchestrator.storage import datamodels as fit_stage
from orchestrator.storage import masks as M
from orchestrator.storage.ledger import MARGIN_BLOCK, Identity, Ledger, LedgerError, block_columns
from orchestrator.storage.store import CorruptFile, Layout, Store
from tests.conftest import compose
from tests.test_ledger import rows
from tests.test_pipeline import planted_overrides

IDENT = Identity(config_hash="h0", alpha=0.5, seed=7, n=20, n_targets=MARGIN_BLOCK + 6)


def planted_ledger(path, ident=IDENT, units=((0, 30), (30, 60))) -> Ledger:
    """A real ledger of train models whose margins are a planted linear map of the masks."""
    led = Ledger(Store(str(path)), ident)
    w = np.random.default_rng(0).normal(size=(ident.n, ident.n_targets)).astype(np.float32)
    for a, b in units:
        masks, _, r = rows(np.arange(a, b), ident)
        r["margins"] = (masks @ w + 0.1 * np.random.default_rng(a).normal(size=(b - a, ident.n_targets)))
        r["margins"] = r["margins"].astype(np.float32)
        led.write_unit(f"train-{a:06d}", r)
    return led


def glmnet_cfg() -> dict:
    from workers.lasso import LassoConfig
    return {**dataclasses.asdict(LassoConfig(backend="glmnet", device="cpu", n_lambdas=20)), "cpus_per_task": 1}


def test_a_block_read_is_the_slice_of_the_whole_load(tmp_path):
    led = planted_ledger(tmp_path)
    index = led.index()
    whole = led.load("train", index=index)
    pos = index.select("train")
    assert block_columns(0, MARGIN_BLOCK) == ["margins_0"]
    assert block_columns(1000, MARGIN_BLOCK + 6) == ["margins_0", "margins_1"]
    for a, b in [(0, 4), (1000, MARGIN_BLOCK + 6), (MARGIN_BLOCK, MARGIN_BLOCK + 6)]:
        packed, Y = led.read_block(index, pos, a, b)
        assert np.array_equal(packed, whole.packed) and np.array_equal(Y, whole.margins[:, a:b])
    packed, Y = led.read_block(index, pos[:7], 2, 5)       # a prefix: the first models by id
    assert np.array_equal(packed, whole.packed[:7]) and np.array_equal(Y, whole.margins[:7, 2:5])


def test_fit_task_reads_its_block_and_names_a_file_changed_after_the_index(tmp_path):
    from workers.lasso import fit_lasso
    led = planted_ledger(tmp_path)
    index = led.index()
    pos = index.select("train")
    cfg, handle = glmnet_cfg(), StoreHandle(str(tmp_path))
    rel = Layout.chunk("datamodels/test", 0, 3)
    fit_stage_fit.fit_chunk(index, pos, led.root, 0, 3, IDENT.n, cfg, rel, handle)
    # bitwise what the fit was when the driver loaded every mask and margin and sent slices
    whole = led.load("train", index=index)
    want = fit_lasso(whole.packed, np.ascontiguousarray(whole.margins[:, 0:3]), fit_stage_fit.lasso_config(cfg),
                     n=IDENT.n)
    got = pq.read_table(os.path.join(tmp_path, rel))["weights"].combine_chunks().flatten().to_numpy()
    assert np.array_equal(got.view(np.uint32), want.weights.reshape(-1).view(np.uint32))
    assert np.count_nonzero(got) > 0

    # a unit file that changes after the driver's index was built: one line naming it
    changed = os.path.join(tmp_path, index.files[1])
    data = bytearray(open(changed, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(changed, "wb").write(bytes(data))
    with pytest.raises(LedgerError, match=os.path.basename(changed)) as err:
        fit_stage_fit.fit_chunk(index, pos, led.root, 3, 6, IDENT.n, cfg, Layout.chunk("datamodels/test", 3, 6), handle)
    assert "\n" not in str(err.value)
    assert fit_stage.chunk_ok(Store(str(tmp_path)), rel, 0, 3, IDENT.n)     # nothing written is lost


def test_gpus_per_task_resolves_from_the_cluster():
    gpus = fit_stage_fit.gpus_per_task
    assert gpus({"gpus_per_task": None, "device": "auto"}, {"CPU": 16.0, "GPU": 8.0}) == 1.0
    assert gpus({"gpus_per_task": None, "device": "cuda"}, {"CPU": 16.0, "GPU": 1.0}) == 1.0
    assert gpus({"gpus_per_task": None, "device": "cpu"}, {"CPU": 16.0, "GPU": 8.0}) == 0.0
    assert gpus({"gpus_per_task": None, "device": "auto"}, {"CPU": 2.0}) == 0.0
    assert gpus({"gpus_per_task": None, "device": "auto"}, {"CPU": 2.0, "GPU": 0.5}) == 0.0
    assert gpus({"gpus_per_task": 0.5, "device": "auto"}, {"GPU": 8.0}) == 0.5      # set: kept
    assert gpus({"gpus_per_task": 0, "device": "auto"}, {"GPU": 8.0}) == 0.0
    from orchestrator.settings.schema import FitConf
    assert FitConf().gpus_per_task is None


def test_masks_npy_written_in_blocks_is_make_packed_masks(tmp_path):
    import io

    from orchestrator.runtime.context import Context
    from orchestrator.runtime.plan import validate
    from orchestrator.stages import masks
    n, n_train = 20000, 4000            # blocks of 2**26 // n = 3355 masks: two of them
    cfg = compose(planted_overrides(tmp_path, n=n, extra=[f"masks.n_train={n_train}"]), tmp_path)
    plan = validate(cfg)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = masks.run(Context(plan, None, {}, "test", {}, str(scratch)))
    assert out["train"] == n_train and not os.listdir(scratch)
    for mask_set, count in (("train", n_train), ("eval", int(cfg.masks.n_eval))):
        want = M.make_packed_masks(int(cfg.exp.seed), mask_set, np.arange(count), plan.n, float(cfg.masks.alpha))
        data = plan.store.read_bytes(Layout.masks(mask_set))
        assert np.array_equal(np.load(io.BytesIO(data)), want)
        buf = io.BytesIO()
        np.save(buf, want)
        assert data == buf.getvalue()          # the same bytes np.save writes


@pytest.mark.slow
def test_fit_stage_driver_loads_no_train_rows_and_fits_what_it_did(tmp_path, ray_local, monkeypatch):
    """A real pipeline run: the driver never loads the train set's masks or margins, and every
    chunk (the full fit and a prefix) is bitwise the lasso of the rows the old driver sent."""
    from orchestrator import pipeline
    from orchestrator.runtime import plan as config
    from workers.lasso import fit_lasso
    loaded = []
    real_load = Ledger.load

    def load(self, mask_set, *args, **kwargs):
        loaded.append(mask_set)
        return real_load(self, mask_set, *args, **kwargs)

    monkeypatch.setattr(Ledger, "load", load)
    over = planted_overrides(tmp_path, extra=["fit=glmnet", "fit.targets_per_task=4", "fit.prefixes=[0.5]"])
    cfg = compose(over, tmp_path)
    summary = pipeline.run(cfg)
    assert "train" not in loaded and "eval" in loaded
    assert summary["fit"]["chunks_fit"] == 2 and list(summary["fit"]["prefixes"]) == [200]

    plan = config.validate(cfg)
    whole = real_load(plan.ledger, "train")
    from omegaconf import OmegaConf
    fit_cfg = OmegaConf.to_container(cfg.fit, resolve=True)
    for m, rel_dir in ((400, summary["fit"]["dir"]), (200, summary["fit"]["prefixes"][200])):
        for a, b in fit_stage.chunks(8, 4):
            want = fit_lasso(whole.packed[:m], np.ascontiguousarray(whole.margins[:m, a:b]),
                             fit_stage_fit.lasso_config(fit_cfg), n=plan.n)
            got = plan.store.read_table(Layout.chunk(rel_dir, a, b))["weights"].combine_chunks()
            assert np.array_equal(got.flatten().to_numpy().view(np.uint32),
                                  want.weights.reshape(-1).view(np.uint32)), (m, a, b)

    # a task on a node that cannot see this disk reads its block through the store's server
    from orchestrator.scheduling.serve import RemoteStore, serve
    handle = serve(plan.store)
    try:
        remote = Ledger(RemoteStore(handle.server, handle.uri), root=plan.ledger.root)
        index = plan.ledger.index()
        packed, Y = remote.read_block(index, index.select("train")[:200], 4, 8)
        assert np.array_equal(packed, whole.packed[:200]) and np.array_equal(Y, whole.margins[:200, 4:8])
    finally:
        handle.close()


def test_summaries_read_one_file_at_a_time_and_agree_with_the_whole_load(tmp_path):
    from types import SimpleNamespace

    from orchestrator.pipeline import accuracy_summary
    led = planted_ledger(tmp_path, units=((0, 30), (30, 60), (60, 75)))
    index = led.index()
    whole = led.load("train", index=index)
    table = led.read_columns(index, index.select("train"), ["target_acc", "train_acc", "model_id"])
    assert np.array_equal(table["model_id"].to_numpy(), whole.model_id)
    # any order of positions, files interleaved: the rows come back in that order
    pos = np.random.default_rng(1).permutation(index.select("train"))
    got = led.read_columns(index, pos, ["model_id"])["model_id"].to_numpy()
    assert np.array_equal(got, index.model_id[pos])
    assert sorted(len(sel) for sel, _ in led.iter_columns(index, pos, ["model_id"])) == [15, 30, 30]
    acc = table["target_acc"].to_numpy()
    s = accuracy_summary(SimpleNamespace(ledger=led), index)["train.target_acc"]
    assert s["min"] == float(acc.min()) and s["max"] == float(acc.max())
    assert abs(s["mean"] - float(acc.astype(np.float64).mean())) < 1e-12


def test_scores_files_are_read_by_target_block_and_checked_block_by_block(tmp_path):
    import pyarrow as pa

    from orchestrator.storage import scores as B
    store = Store(str(tmp_path))
    n, T = 30, MARGIN_BLOCK + 6
    S = np.random.default_rng(0).normal(size=(n, T)).astype(np.float32)
    store.write_table("scores/x.parquet", B.scores_table(S, {"method": "trak", "checkpoints": 1}))
    names = store.read_schema("scores/x.parquet").names
    assert names == ["train_index", "scores_0", "scores_1"]
    got, meta = B.read_scores(store, "scores/x.parquet")
    assert np.array_equal(got, S) and meta["method"] == "trak"
    for a, b in [(0, 5), (MARGIN_BLOCK - 2, MARGIN_BLOCK + 3), (MARGIN_BLOCK, T)]:
        assert np.array_equal(B.read_scores(store, "scores/x.parquet", a, b)[0], S[:, a:b])
    assert B.scores_info(store, "scores/x.parquet")[0] == (n, T)

    class Counting(Store):          # the real store, counting its footer reads
        schemas = 0

        def read_schema(self, rel):
            Counting.schemas += 1
            return super().read_schema(rel)
    assert B.scores_ok(Counting(str(tmp_path)), "scores/x.parquet", n, T) == meta
    assert Counting.schemas == 1    # once for the file, not once per target block
    f = B.ScoresFile(Counting(str(tmp_path)), "scores/x.parquet")
    assert f.shape == (n, T) and f.ranges() == [(0, MARGIN_BLOCK), (MARGIN_BLOCK, T)]
    assert np.array_equal(np.concatenate([S_ab for _, _, S_ab in f.blocks()], 1), S)
    assert Counting.schemas == 2
    # files of the single-column layout written before the blocks still read, whole or sliced
    old = pa.table({"train_index": pa.array(np.arange(n, dtype=np.int32)),
                    "scores": pa.FixedSizeListArray.from_arrays(pa.array(S.reshape(-1)), T)})
    store.write_table("scores/old.parquet", old.replace_schema_metadata({"datamodels": '{"method": "trak"}'}))
    assert np.array_equal(B.read_scores(store, "scores/old.parquet")[0], S)
    assert np.array_equal(B.read_scores(store, "scores/old.parquet", 3, 9)[0], S[:, 3:9])
    assert B.scores_ok(store, "scores/old.parquet", n, T) == {"method": "trak"}
    assert B.ScoresFile(store, "scores/old.parquet").ranges() == [(0, T)]   # read whole, once
    # the footer of another Parquet file in its place: corrupt (deleted, to be recomputed),
    # whether it lacks the metadata, holds no JSON there, or has no train_index
    others = [pa.table({"train_index": pa.array([0], pa.int32())}),
              pa.table({"train_index": pa.array([0], pa.int32())}).replace_schema_metadata({"datamodels": "{"}),
              pa.table({"x": pa.array([0.0])}).replace_schema_metadata({"datamodels": "{}"})]
    for other in others:
        store.write_table("scores/other.parquet", other)
        with pytest.raises(CorruptFile, match="not a scores file"):
            B.ScoresFile(store, "scores/other.parquet")
        with pytest.raises(CorruptFile, match="not a scores file"):
            B.read_scores(store, "scores/other.parquet")
        assert B.scores_ok(store, "scores/other.parquet", n, T) is None
        assert not store.exists("scores/other.parquet")
    # a wrong shape is deleted, to be recomputed
    assert B.scores_ok(store, "scores/x.parquet", n, T + 1) is None and not store.exists("scores/x.parquet")


def test_evaluate_by_target_blocks_gives_the_whole_arrays_figures(tmp_path):
    from orchestrator.metrics.lds import score_blocks, score_method
    from workers.lasso.problem import FitResult
    rng = np.random.default_rng(2)
    e, n, T = 40, 25, 70
    X = rng.random((e, n)) < 0.5
    W = rng.normal(size=(T, n)).astype(np.float32)
    b = rng.normal(size=T).astype(np.float32)
    Y = (X @ W.T + b + rng.normal(size=(e, T))).astype(np.float32)
    whole, per_whole = score_method(X, Y, W, b, 300, 4)
    store = Store(str(tmp_path))
    for a, z in [(30, 70), (0, 12), (12, 30)]:            # chunks of unequal size, listed out of order
        res = FitResult.zeros(z - a, n)
        res.weights[:], res.intercept[:] = W[a:z], b[a:z]
        store.write_table(Layout.chunk("dm", a, z), fit_stage.datamodel_table(np.arange(a, z), res, 1.0))
    spans = [(a, z) for a, z, _, _ in fit_stage.iter_datamodels(store, "dm", T)]
    assert spans == [(0, 12), (12, 30), (30, 70)]
    blocked, per_blocked = score_blocks(X, Y, fit_stage.iter_datamodels(store, "dm", T), True, 300, 4)
    assert np.allclose(per_blocked, per_whole, equal_nan=True)
    assert blocked["mean"] == pytest.approx(whole["mean"]) and blocked["ci95"] == pytest.approx(whole["ci95"])
    assert blocked["mse"] == pytest.approx(whole["mse"], rel=1e-5) and blocked["targets"] == whole["targets"]
    store.delete(Layout.chunk("dm", 12, 30))
    with pytest.raises(FileNotFoundError, match="cover 52 of 70 targets"):
        list(fit_stage.iter_datamodels(store, "dm", T))


def test_counterfactual_reads_only_the_score_blocks_of_its_targets(tmp_path):
    from types import SimpleNamespace

    from orchestrator.analyses.counterfactual import method_scores
    from orchestrator.storage import scores as B
    cfg = compose([], tmp_path)
    n, T = 20, MARGIN_BLOCK + 6
    plan = SimpleNamespace(cfg=cfg, store=Store(str(tmp_path / "exp")), n=n, n_targets=T)
    S = np.random.default_rng(3).normal(size=(n, T)).astype(np.float32)
    rel = B.expected_files(cfg)["trak"]
    plan.store.write_table(rel, B.scores_table(S, {"method": "trak"}))
    targets = np.array([3, MARGIN_BLOCK + 1, MARGIN_BLOCK + 5])
    W = np.ones((3, n), np.float32)
    out = method_scores(SimpleNamespace(plan=plan), ["datamodels", "trak", "random"], W, targets)
    assert out["datamodels"] is W and out["random"] is None
    assert np.array_equal(out["trak"], S[:, targets].T)
