"""A map bounded by approximate bytes (and optionally by age): the memory bound behind the
label-embedding cache and the stored predictions."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Hashable

from .metrics import Eviction

# Bytes a stored entry costs besides its arrays' data (objects, array headers, the key, the dict
# slot): tracemalloc measured ~650 for a stored prediction.
ENTRY_OVERHEAD = 768


class BoundedStore:
    """A map whose entries are evicted oldest first once their total size passes ``max_bytes``
    or, with ``ttl_s``, once they are older than that.

    Args:
        max_bytes: budget for the sizes given to :meth:`put`.
        ttl_s: entries older than this are gone (None: no age limit).
        lru: a :meth:`get` hit makes the entry the newest (a cache); False keeps insertion
            order (a log whose TTL counts from insertion).
        clock: monotonic seconds (tests pass a fake).
        on_evict: called with the reason for each entry evicted (not for :meth:`pop`).
    """

    def __init__(self, max_bytes: int, ttl_s: float | None = None, lru: bool = True,
                 clock: Callable[[], float] = time.monotonic,
                 on_evict: Callable[[Eviction], None] | None = None):
        self.max_bytes = max_bytes
        self._ttl_s = ttl_s
        self._lru = lru
        self._clock = clock
        self._on_evict = on_evict
        self._entries: OrderedDict[Hashable, tuple[object, int, float]] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return self.get(key) is not None

    def put(self, key: Hashable, value: object, nbytes: int) -> None:
        """Store ``value`` as costing ``nbytes``; evicts the oldest entries to make room. A
        value larger than the whole budget is not stored."""
        self.pop(key)
        if nbytes > self.max_bytes:
            if self._on_evict:
                self._on_evict(Eviction.CAPACITY)
            return
        self._entries[key] = (value, nbytes, self._clock())
        self.nbytes += nbytes
        self._expire()
        while self.nbytes > self.max_bytes:
            self._evict_oldest(Eviction.CAPACITY)

    def get(self, key: Hashable) -> object | None:
        self._expire()
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._lru:
            self._entries.move_to_end(key)
        return entry[0]

    def pop(self, key: Hashable) -> object | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self.nbytes -= entry[1]
        return entry[0]

    def _evict_oldest(self, reason: Eviction) -> None:
        _, (_, nbytes, _) = self._entries.popitem(last=False)
        self.nbytes -= nbytes
        if self._on_evict:
            self._on_evict(reason)

    def _expire(self) -> None:
        if self._ttl_s is None:
            return
        horizon = self._clock() - self._ttl_s
        # With lru=False the front is the oldest insertion, so expired entries are a prefix.
        while self._entries and next(iter(self._entries.values()))[2] <= horizon:
            self._evict_oldest(Eviction.TTL)
