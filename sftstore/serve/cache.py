"""Validated deltas kept on the serving device, bounded by bytes: the least recently used go first."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable

from ..delta import SparseDelta


def delta_bytes(delta: SparseDelta) -> int:
    """Bytes the delta's tensors occupy (indices, values and head)."""
    sparse = sum(e.indices.nbytes + e.values.nbytes for e in delta.params.values())
    return sparse + sum(t.nbytes for t in delta.head.values())


class DeltaCache:
    """`get(key)` returns the cached delta or calls `load(key)`; entries beyond `max_bytes` are evicted,
    least recently used first, except those `pinned` (the resident pair's, which the model holds anyway).
    `on_event` hears every `hit`, `miss` and `eviction`."""

    def __init__(self, max_bytes: int, load: Callable[[Hashable], SparseDelta],
                 on_event: Callable[[str], None] = lambda event: None) -> None:
        self.max_bytes = max_bytes
        self._load = load
        self._on_event = on_event
        self._entries: OrderedDict[Hashable, tuple[SparseDelta, int]] = OrderedDict()
        self.bytes = 0  # kept as a total, so other threads read it without walking the entries

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable, pinned: Collection[Hashable] = ()) -> SparseDelta:
        """The delta for `key`, loaded on a miss (a failing load caches nothing and raises)."""
        if key in self._entries:
            self._on_event("hit")
            self._entries.move_to_end(key)
            return self._entries[key][0]
        self._on_event("miss")
        delta = self._load(key)
        self._entries[key] = (delta, delta_bytes(delta))
        self.bytes += self._entries[key][1]
        self._evict({*pinned, key})
        return delta

    def _evict(self, pinned: Collection[Hashable]) -> None:
        for key in [k for k in self._entries if k not in pinned]:
            if self.bytes <= self.max_bytes:
                return
            self.bytes -= self._entries.pop(key)[1]
            self._on_event("eviction")
