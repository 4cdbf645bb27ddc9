"""The per-process caches' LRU map."""

from __future__ import annotations

from llamaindex_kb.lru import LRU


def test_lru_forgets_the_least_recently_used_entry_past_its_count():
    cache: LRU[str, int] = LRU(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # now "b" is the least recently used
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)


def test_lru_keeps_the_total_weight_within_its_budget():
    cache: LRU[str, bytes] = LRU(10, weigh=len)
    cache.put("six", b"x" * 6)
    cache.put("four", b"x" * 4)
    cache.put("four", b"x" * 3)  # replacing an entry counts its new weight only
    cache.put("two", b"x" * 2)
    assert cache.get("six") is None
    assert (cache.get("four"), cache.get("two")) == (b"xxx", b"xx")
    cache.put("huge", b"x" * 11)  # heavier than the whole budget: not kept...
    assert cache.get("huge") is None
    assert cache.get("two") == b"xx"  # ...and nothing is pushed out for it


