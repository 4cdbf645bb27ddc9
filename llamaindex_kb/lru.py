"""A small thread-safe LRU map with a budget, for the per-process caches."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable


class LRU[K: Hashable, V]:
    """Forgets the least recently used entries once their total ``weigh`` passes ``budget``
    (by default every entry weighs 1, so the budget is a count)."""

    def __init__(self, budget: int, weigh: Callable[[V], int] = lambda _: 1) -> None:
        self._budget = budget
        self._weigh = weigh
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._total = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._total = 0

    def put(self, key: K, value: V) -> None:
        weight = self._weigh(value)
        with self._lock:
            previous = self._items.pop(key, None)
            if previous is not None:
                self._total -= previous[1]
            if weight > self._budget:
                return  # kept, it would push out everything else and then itself
            self._items[key] = (value, weight)
            self._total += weight
            while self._total > self._budget and self._items:
                _, (_, dropped) = self._items.popitem(last=False)
                self._total -= dropped
