"""What every replica has served, for every router replica: the affinity keys of a replica's
recent requests, as a Bloom filter in its routing stats.

Each router keeps its own prefix index (rayllm_app.routing.prefix_affinity), which knows only
the requests that router sent. With several routers (HAProxy spreads connections over them),
a conversation's next turn often reaches a router that did not route its earlier turns, and a
restarted router knows nothing. So each replica also remembers the keys of the requests it
served (``ServedKeys``, least recently used out past ``capacity``) and reports them as a Bloom
filter with its routing stats; Ray Serve polls those every few seconds (the request router's
``request_routing_stats_period_s``) and hands them to every router, where ``served_depth``
reads how deep a request's prefix goes on that replica. Routers then agree on where a prefix
is within one poll period, after a restart too, with no store of their own.

The filter is 128 KiB: 2^20 bits and 4 probes per key, so 32,768 keys (about 2M prompt tokens
at 64 tokens a block, more than a replica's KV cache holds) read back with about 1 in 5,000
false positives. A key's probes come from its own bits (the keys are 64-bit hashes already).
Depth is found by bisection: a replica that served a prefix up to key i served every key
before it, and keeps them at least as recently used, so the keys it holds are a prefix of the
request's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np

BITS_LOG2 = 20
BITS = 1 << BITS_LOG2
PROBES = 4
CAPACITY = 32_768
_MASK = BITS - 1
_STEPS = np.arange(PROBES, dtype=np.uint64)


def _probes(key: int) -> list[int]:
    low, high = key & 0xFFFFFFFF, (key >> 32) | 1
    return [(low + i * high) & _MASK for i in range(PROBES)]


class ServedKeys:
    """A replica's recently served affinity keys, and their filter (rebuilt only when they changed)."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[int, None] = OrderedDict()
        self._filter: bytes | None = None

    def add(self, keys: Iterable[int]) -> None:
        held = self._keys
        for key in keys:
            held[key] = None
            held.move_to_end(key)
        while len(held) > self.capacity:
            held.popitem(last=False)
        self._filter = None

    def filter(self) -> bytes:
        if self._filter is None:
            keys = np.fromiter(self._keys, dtype=np.uint64, count=len(self._keys))
            low, high = keys & np.uint64(0xFFFFFFFF), (keys >> np.uint64(32)) | np.uint64(1)
            positions = (low[:, None] + _STEPS[None, :] * high[:, None]) & np.uint64(_MASK)
            bits = np.zeros(BITS, dtype=np.uint8)
            bits[positions.ravel()] = 1
            self._filter = np.packbits(bits, bitorder="little").tobytes()
        return self._filter

    def __len__(self) -> int:
        return len(self._keys)


def contains(bits: bytes, key: int) -> bool:
    return all(bits[p >> 3] >> (p & 7) & 1 for p in _probes(key))


def served_depth(bits: bytes | None, keys: Sequence[int]) -> int:
    """How many of ``keys`` (a request's chained prefix keys) the replica with filter ``bits``
    served: the depth of its longest prefix there, 0 for none (or no filter)."""
    if not bits or len(bits) != BITS // 8:
        return 0
    low, high = 0, len(keys)  # keys[:low] served; keys[high:] not (bar false positives)
    while low < high:
        middle = (low + high + 1) // 2
        if contains(bits, keys[middle - 1]):
            low = middle
        else:
            high = middle - 1
    return low
