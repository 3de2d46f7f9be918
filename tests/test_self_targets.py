"""task.targets=both: each model's margins on the training examples themselves, beside the
targets', in the ledger's `self_*` columns; an experiment without it keeps its schema, hash
and records."""
from __future__ import annotations

import numpy as np
import pytest

from orchestrator.storage.ledger import Identity, Ledger, LedgerError, schema
from orchestrator.storage.store import Store
from tests.test_ledger import IDENT, rows
from workers import bits

BOTH = Identity(config_hash="h0", alpha=0.5, seed=7, n=20, n_targets=5, n_self=20)


def own_rows(ids, ident=BOTH):
    masks, margins, r = rows(ids, ident)
    rng = np.random.default_rng(list(ids))
    own = rng.normal(size=(len(ids), ident.n_self)).astype(np.float32)
    right = rng.random((len(ids), ident.n_self)) < 0.5
    return masks, own, right, {**r, "self_margins": own, "self_correct": right}


def test_the_schema_without_self_targets_is_the_one_before():
    assert schema(3, 5) == schema(3, 5, 0)
    assert not [f for f in schema(3, 5).names if f.startswith("self")]
    names = schema(3, 5, 2000).names
    assert {"self_0", "self_1", "self_correct"} <= set(names)


def test_margins_on_the_training_examples_round_trip(tmp_path):
    led = Ledger(Store(str(tmp_path)), BOTH)
    m1, y1, c1, r1 = own_rows([2, 0])
    m2, y2, c2, r2 = own_rows([1])
    led.write_unit("u1", r1)
    led.write_unit("u2", r2)
    led = Ledger(Store(str(tmp_path)), BOTH)
    index = led.index()
    pos, _, _ = led.good_models("train", index)
    packed, own, right = led.read_self(index, pos, 3, 17)
    truth = {2: (m1[0], y1[0], c1[0]), 0: (m1[1], y1[1], c1[1]), 1: (m2[0], y2[0], c2[0])}
    for row, mid in enumerate(index.model_id[pos]):
        assert np.array_equal(bits.unpack(packed[row:row + 1], 20)[0], truth[mid][0])
        assert np.array_equal(own[row], truth[mid][1][3:17])
        assert np.array_equal(right[row], truth[mid][2][3:17])
    # the targets' margins are where they always were
    assert led.load("train", n=20, n_targets=5).margins.shape == (3, 5)


def test_a_ledger_without_them_says_how_to_get_them(tmp_path):
    led = Ledger(Store(str(tmp_path)), IDENT)
    led.write_unit("u1", rows([0, 1])[2])
    index = led.index()
    with pytest.raises(LedgerError, match="task.targets=both"):
        led.read_self(index, index.select("train"), 0, 20)


def test_rows_without_them_are_refused_in_an_experiment_that_records_them(tmp_path):
    led = Ledger(Store(str(tmp_path)), BOTH)
    with pytest.raises(LedgerError, match="training examples"):
        led.write_unit("u1", rows([0], BOTH)[2])


def test_the_trainer_returns_each_models_margins_on_its_training_examples():
    """The self margins are the margins of the trained model on the training set, with the
    labels it trained on; the target margins are those a trainer without them gives."""
    import torch

    from workers.margins import margin
    from workers.models import build_model
    from workers.tasks import ImageClassificationTask
    kw = dict(name="digits_mlp", data={"name": "digits"}, n_train=120, n_targets=30,
              model={"name": "mlp", "hidden": [16]}, label_noise=0.1)
    train_cfg = {"epochs": 3, "batch_size": 20, "lr": 0.05, "lr_peak_epoch": 1, "device": "cpu",
                 "models_per_step": 3}
    plain, both = ImageClassificationTask(**kw), ImageClassificationTask(**kw, targets="both")
    plain.setup(train_cfg)
    both.setup(train_cfg)
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 120), bool)
    for j in range(4):
        masks[j, rng.permutation(120)[:60]] = True
    seeds = np.arange(4) + 11
    a, b = plain.train(masks, seeds), both.train(masks, seeds, return_weights=True)
    assert a.self_margins is None
    np.testing.assert_array_equal(a.margins, b.margins)
    assert b.self_margins.shape == (4, 120) and b.self_correct.shape == (4, 120)
    tr = both._trainer
    for j in range(4):
        model = build_model({"name": "mlp", "hidden": [16]}, tr.in_shape, tr.num_classes)
        model.load_state_dict(b.state_dicts[j])
        model.eval()
        with torch.no_grad():
            logits = model(tr.x_train)
        want = margin(logits.unsqueeze(0), tr.y_train.unsqueeze(0), tr.margin)[0].numpy()
        np.testing.assert_allclose(b.self_margins[j], want, atol=1e-4)
        np.testing.assert_array_equal(b.self_correct[j], (logits.argmax(-1) == tr.y_train).numpy())
        # its own training examples: correct as often as train_acc says
        assert b.self_correct[j][masks[j]].mean() == pytest.approx(float(b.train_acc[j]), abs=1e-6)
    with pytest.raises(ValueError, match="task.targets"):
        ImageClassificationTask(**{**kw, "label_noise": 0.0}, targets="train").check()


def test_training_examples_as_the_targets():
    """task.targets=train: target i is training example i, with the label the models train on
    (the flipped one where label noise flipped it); task.n_targets must say n_train."""
    from workers.tasks import ImageClassificationTask
    kw = dict(name="digits_mlp", data={"name": "digits"}, n_train=120, model={"name": "mlp", "hidden": [16]},
              label_noise=0.1, targets="train")
    task = ImageClassificationTask(**kw, n_targets=120)
    task.check()
    x_tr, y_tr, x_tg, y_tg, _ = task.arrays()
    np.testing.assert_array_equal(x_tg, x_tr)
    np.testing.assert_array_equal(y_tg, y_tr)
    y_true, flipped = task.true_labels()
    assert (y_tg[flipped] != y_true[flipped]).all()
    test_kind = ImageClassificationTask(**{**kw, "targets": "test"}, n_targets=30)
    np.testing.assert_array_equal(test_kind.arrays()[0], x_tr)       # the same training subset
    with pytest.raises(ValueError) as err:
        ImageClassificationTask(**kw, n_targets=30).check()
    assert "task.n_targets=120" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_datamodels_of_the_training_examples_on_tiny(tmp_path, ray_local):
    """experiment=tiny with task.targets=train: 300 datamodels, one per training example, an
    LDS on them, and self-weights (w_ii) that are positive for most examples (a model is surer
    of an example it trained on) and largest for the flipped labels."""
    from orchestrator import api, pipeline
    from orchestrator.settings.task import build_task
    from tests.conftest import compose
    cfg = compose(["experiment=tiny", "task.targets=train", "task.n_targets=300", "task.label_noise=0.1",
                   "baselines.methods=[]", "fit.prefixes=[]"], tmp_path)
    out = pipeline.run(cfg)
    assert out["lds"]["datamodels"]["mean"] > 0.3
    W, _, _ = api.open(out["experiment_dir"]).datamodel_arrays()
    assert W.shape == (300, 300)
    own = np.diag(W)
    assert (own > 0).mean() > 0.8
    _, flipped = build_task(cfg.task).true_labels()
    assert np.median(own[flipped]) > np.quantile(own[~flipped], 0.9)
