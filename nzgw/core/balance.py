"""Choice among backends of equal priority, and priority tiers. Pure; no I/O.

Backends are grouped into tiers by their `priority` (smaller first; the configuration's list
position is the default). Failover goes from tier to tier as before; within a tier nzgw picks,
among the backends with a free slot, the one that already has the model loaded, then the one
with the fewest requests in flight, then the first in configuration order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import groupby
from typing import TypeVar

import attrs

T = TypeVar("T")


@attrs.frozen
class Option:
    """One backend as the choice sees it."""

    position: int  # configuration order (the last tie-breaker)
    loaded: bool  # the model is loaded there (/api/ps, or nzgw routed it there)
    in_flight: int
    free: bool  # it has a free slot


def choose(options: Sequence[Option]) -> int | None:
    """The index of the option to use, or None when none has a free slot."""
    best: int | None = None
    best_key: tuple[bool, int, int] | None = None
    for index, option in enumerate(options):
        if not option.free:
            continue
        key = (not option.loaded, option.in_flight, option.position)
        if best_key is None or key < best_key:
            best, best_key = index, key
    return best


def tiers(items: Sequence[T], priority: Callable[[T], int]) -> list[list[T]]:
    """`items` (in configuration order) grouped by priority, smallest first; order kept inside."""
    ordered = sorted(items, key=priority)  # stable: configuration order within a priority
    return [list(group) for _, group in groupby(ordered, key=priority)]
