"""Stale matching decides per changed function whether its counts can be trusted."""

from kbuild_bolt.profile.shapes import FunctionShape
from kbuild_bolt.profile.stale import AdaptReport, MIN_MATCHED_SHARE, match_blocks, unsure_reason


def shape(hashes, start=0x1000):
    blocks, off = [], 0
    for h in hashes:
        blocks.append((off, 8, h))
        off += 8
    return FunctionShape("f", start, off, hash(tuple(hashes)), blocks)


def straight(n):
    """Successors of a straight-line function of n blocks."""
    return lambda k: [k + 1] if k + 1 < n else []


def test_blocks_match_in_order_even_when_their_code_repeats():
    old = shape([1, 7, 2, 7, 3])          # block 7 (say, a lone ret) twice
    new = shape([1, 7, 2, 9, 7, 3])       # a block inserted before the second one
    assert match_blocks(old, new) == [(0, 0), (1, 1), (2, 2), (3, 4), (4, 5)]


def test_a_function_whose_hot_code_matched_is_applied():
    old = shape([1, 2, 3, 4])
    new = shape([1, 2, 3, 5])             # only a block that never ran changed
    pairs = match_blocks(old, new)
    assert unsure_reason(old, new, pairs, [100, 100, 100, 0], lambda k: []) is None


def test_too_little_matched_code_is_left_as_compiled():
    old = shape([1, 2, 3, 4])
    new = shape([1, 2, 8, 9])
    weights = [10, 10, 40, 40]            # 20% of the executed bytes matched
    reason = unsure_reason(old, new, match_blocks(old, new), weights, lambda k: [])
    assert reason and f"{100 * MIN_MATCHED_SHARE:.0f}%" in reason
    # The same change where the unmatched block hardly ran: applied.
    matched = int(1000 * MIN_MATCHED_SHARE)
    old, new = shape([1, 2, 3, 4]), shape([1, 9, 3, 4])
    assert unsure_reason(old, new, match_blocks(old, new), [matched, 1000 - matched, 0, 0],
                         lambda k: []) is None
    assert unsure_reason(old, new, match_blocks(old, new),
                         [matched - 10, 1000 - matched + 10, 0, 0], lambda k: []) is not None


def test_new_code_on_a_path_that_ran_is_not_trusted():
    old = shape([1, 2, 3])
    new = shape([1, 6, 2, 3])             # new block 1 between two hot blocks
    pairs = match_blocks(old, new)
    assert unsure_reason(old, new, pairs, [100, 100, 100], straight(4)) == \
        "new code on a path that ran"
    # The same insertion after a block that never ran is harmless.
    assert unsure_reason(old, new, pairs, [100, 0, 0], lambda k: [k + 1] if k else []) is None


def test_a_changed_entry_is_not_trusted():
    old = shape([1, 2, 3])
    new = shape([5, 2, 3])
    assert unsure_reason(old, new, match_blocks(old, new), [1, 500, 500], straight(3)) == \
        "its entry changed"


def test_report_names_what_was_left_as_compiled():
    report = AdaptReport(total=100, exact=40, fuzzy=10, functions_same=3, functions_changed=1,
                         functions_missing=2)
    report.functions_unsure = {"its entry changed": ["b", "a"], "x": ["c"]}
    assert "2 changed and left as compiled" not in report.summary()
    assert "3 changed and left as compiled" in report.summary()
    assert report.details()[0] == "left as compiled: its entry changed: 2 e.g. a, b"
    assert report.used == 0.5


def test_a_range_counts_in_every_block_it_runs_through():
    """A block entered by falling into it ran: a range is spread over the blocks it
    covers (else changed code behind a fall-through would pass as never run)."""
    import numpy as np

    from kbuild_bolt.profile.model import Profile
    from kbuild_bolt.profile.stale import _executed_bytes

    start = 0xffffffff81000000
    old = shape([1, 2, 3], start)
    old.blocks = [(0, 16, 1), (16, 16, 2), (32, 32, 3)]
    new = shape([1, 2, 4], start)
    new.blocks = [(0, 16, 1), (16, 16, 2), (32, 32, 4)]
    profile = Profile(np.array([start], np.uint64), np.array([start + 63], np.uint64),
                      np.array([100], np.int64))
    weights = _executed_bytes(profile)(start, old.blocks)
    assert weights == [1600, 1600, 3200]
    assert unsure_reason(old, new, match_blocks(old, new), weights, lambda k: []) is not None
