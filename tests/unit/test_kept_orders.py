"""ext-TSP orders kept between runs (kbuild_bolt.layout.kept): found again under
the digest of their input, written back atomically, never trusted when they are
not an order of the function's blocks."""

import numpy as np

from kbuild_bolt.layout import kept as kept_module
from kbuild_bolt.layout.kept import KeptOrders, input_digest


def _digest(k):
    return input_digest([4, 8, k], [10, 0, 3], [(0, 2, 7)], [True, False, False])


def test_orders_come_back_from_the_directory(tmp_path):
    store = KeptOrders.load(tmp_path)
    assert store.get(_digest(1), 3) is None
    store.add(_digest(1), [0, 2, 1])
    store.add(_digest(2), [0, 1, 2])
    store.save()
    again = KeptOrders.load(tmp_path)
    assert again.get(_digest(1), 3) == [0, 2, 1]
    assert again.get(_digest(2), 3) == [0, 1, 2]
    assert again.get(_digest(3), 3) is None
    assert again.hits == 2
    assert len(list(tmp_path.glob("orders-*.npz"))) == 1


def test_digest_tells_inputs_apart():
    base = ([4, 8], [10, 3], [(0, 1, 7)], [True, False])
    assert input_digest(*base) == input_digest(*base)
    for changed in (([4, 9], [10, 3], [(0, 1, 7)], [True, False]),
                    ([4, 8], [10, 4], [(0, 1, 7)], [True, False]),
                    ([4, 8], [10, 3], [(0, 1, 7.0)], [True, False]),   # (int vs float)
                    ([4, 8], [10, 3], [(1, 0, 7)], [True, False]),
                    ([4, 8], [10, 3], [(0, 1, 7)], [False, False])):
        assert input_digest(*changed) != input_digest(*base)
    # Edge order breaks ties in ext-TSP: it is part of the input.
    two = [(0, 1, 5), (1, 2, 5)]
    assert input_digest([1, 1, 1], [5, 5, 5], two, [False] * 3) != \
        input_digest([1, 1, 1], [5, 5, 5], two[::-1], [False] * 3)


def test_an_order_that_is_not_one_of_the_blocks_is_not_trusted(tmp_path):
    store = KeptOrders(tmp_path)
    for k, bad in enumerate(([1, 0, 2], [0, 1], [0, 1, 1], [0, 1, 3])):
        store.add(_digest(k), bad)
    store.save()
    again = KeptOrders.load(tmp_path)
    for k in range(4):
        assert again.get(_digest(k), 3) is None
    assert again.hits == 0


def test_a_damaged_or_foreign_file_is_ignored_and_replaced(tmp_path):
    store = KeptOrders(tmp_path)
    store.add(_digest(1), [0, 2, 1])
    store.save()
    path = next(tmp_path.glob("orders-*.npz"))
    path.write_bytes(path.read_bytes()[:200])
    again = KeptOrders.load(tmp_path)
    assert again.get(_digest(1), 3) is None
    with open(path, "wb") as f:   # (well formed, but not what the store writes)
        np.savez(f, digests=np.zeros((2, 3), np.uint8), starts=np.zeros(3), positions=[0])
    assert KeptOrders.load(tmp_path).get(_digest(1), 3) is None
    again.add(_digest(1), [0, 2, 1])
    again.save()
    assert KeptOrders.load(tmp_path).get(_digest(1), 3) == [0, 2, 1]
    # Another version of ext-TSP's code: its file is dropped, not read.
    (tmp_path / "orders-000000000000.npz").write_bytes(path.read_bytes())
    again.add(_digest(2), [0, 1, 2])
    again.save()
    assert [p.name for p in tmp_path.glob("orders-*.npz")] == [path.name]


def test_no_directory_keeps_nothing(tmp_path):
    store = KeptOrders.load(None)
    store.add(_digest(1), [0, 2, 1])
    store.save()
    assert store.get(_digest(1), 3) is None   # (orders of earlier runs only)
    assert not list(tmp_path.iterdir())


def test_the_newest_run_s_orders_are_kept_first(tmp_path, monkeypatch):
    monkeypatch.setattr(kept_module, "LIMIT", 3)
    store = KeptOrders(tmp_path)
    for k in range(3):
        store.add(_digest(k), [0, 1, 2])
    store.save()
    newer = KeptOrders.load(tmp_path)
    assert newer.get(_digest(2), 3) == [0, 1, 2]   # used again
    newer.add(_digest(7), [0, 2, 1])
    newer.save()
    last = KeptOrders.load(tmp_path)
    found = {k for k in (0, 1, 2, 7) if last.get(_digest(k), 3) is not None}
    assert found == {0, 2, 7}    # the used and the new, then the oldest first in the file


def test_a_forked_share_s_orders_are_merged(tmp_path):
    parent = KeptOrders(tmp_path)
    child = KeptOrders(tmp_path)
    child.add(_digest(5), [0, 2, 1])
    parent.merge(child.delta())
    parent.merge(None)
    parent.save()
    assert KeptOrders.load(tmp_path).get(_digest(5), 3) == [0, 2, 1]
