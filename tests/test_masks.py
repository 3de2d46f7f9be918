import numpy as np
import pytest

from orchestrator.storage import masks as M


@pytest.mark.parametrize("n,alpha", [(1000, 0.5), (101, 0.1), (7, 0.75), (50000, 0.25)])
def test_exact_size(n, alpha):
    for i in range(5):
        m = M.make_mask(3, "train", i, n, alpha)
        assert m.dtype == bool and m.shape == (n,)
        assert m.sum() == round(alpha * n)


def test_reproducible_and_distinct():
    a = M.make_masks(0, "train", range(20), 300, 0.5)
    b = M.make_masks(0, "train", range(20), 300, 0.5)
    assert np.array_equal(a, b)
    # distinct across ids, across sets, across seeds
    assert len({row.tobytes() for row in a}) == 20
    e = M.make_masks(0, "eval", range(20), 300, 0.5)
    assert not any(np.array_equal(a[i], e[i]) for i in range(20))
    s = M.make_masks(1, "train", range(20), 300, 0.5)
    assert not any(np.array_equal(a[i], s[i]) for i in range(20))


def test_mask_depends_only_on_its_id():
    batch = M.make_masks(0, "train", [5, 9, 2], 200, 0.3)
    assert np.array_equal(batch[1], M.make_mask(0, "train", 9, 200, 0.3))


def test_masks_are_uniform_over_examples():
    X = M.make_masks(0, "train", range(2000), 50, 0.5)
    freq = X.mean(0)
    assert np.all(np.abs(freq - 0.5) < 0.06)


def test_model_seeds_distinct_and_stable():
    seeds = {M.model_seed(0, s, i, r) for s in ("train", "eval") for i in range(50) for r in range(3)}
    assert len(seeds) == 300
    assert M.model_seed(0, "eval", 3, 1) == M.model_seed(0, "eval", 3, 1)
    assert 0 <= M.model_seed(0, "eval", 3, 1) < 2 ** 63


def test_packed_masks_built_in_blocks_equal_packing_them_whole():
    from workers import bits
    ids = np.arange(3, 40)
    whole = bits.pack(M.make_masks(5, "train", ids, 301, 0.3))
    for block in (1, 7, 64):
        assert np.array_equal(M.make_packed_masks(5, "train", ids, 301, 0.3, block=block), whole)
