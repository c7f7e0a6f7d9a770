"""Simple block orders: none, reverse and random.

``reverse`` and ``random`` exist to prove the rewriter correct: they move
nearly every block and so exercise every fixup. The entry block always stays
first (the function's address is its entry point).
"""

from __future__ import annotations

import random as _random

STRATEGIES = ("none", "reverse", "random", "ext-tsp")


def order_none(blocks: list[int]) -> list[int]:
    return list(blocks)


def order_reverse(blocks: list[int]) -> list[int]:
    return blocks[:1] + blocks[:0:-1]


def order_random(blocks: list[int], rng: _random.Random) -> list[int]:
    rest = blocks[1:]
    rng.shuffle(rest)
    return blocks[:1] + rest
