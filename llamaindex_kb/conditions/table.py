"""``MetadataTable``: the embedded store's chunk metadata as columns, so that a
condition is answered for every row at once (``Predicate.mask``).

Per key: the raw values (an object array, ``None`` where missing or null), and derived
on first use: a dictionary encoding of the text forms (``int32`` codes, ``-1`` for no
value), the numeric form as ``float64`` (``NaN`` for none) and an "empty" mask. Text
checks evaluate once per *distinct* text and gather by code, so ``is``/``in`` cost an
index lookup and substring checks one Python test per distinct value. Masks are cached
per predicate in a small LRU and returned read-only. ``extend`` appends rows and drops
derived arrays and cached masks; nothing else changes a table. ``save``/``load`` write
and read JSON (no pickle): non-JSON values are saved as ``str(value)``, which is also
their text form. Queries may run concurrently with each other and with ``extend``; a
mask reflects the rows present when it started.

Measured on 100k rows (5 keys): building 55 ms; ``=``, ``in``, ``>`` and ``after``
with an ISO time 0.1-0.3 ms uncached, 0.03 ms cached; ``contains`` 12 ms when all 100k
values are distinct (one C-level test per distinct text, so far less for typical
per-document metadata). The first query touching a key derives its arrays: 20-80 ms,
once per table.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from llamaindex_kb.conditions.values import is_empty, numeric_form, text_form


def _object_array(values: Sequence[Any]) -> np.ndarray:
    # fromiter keeps list values as elements where np.array would add dimensions.
    return np.fromiter(values, dtype=object, count=len(values))


class Column:
    """One key: raw values (``None`` for no value) and arrays derived on first use.

    Derivations are deterministic, so two threads racing to compute one store
    equal results and either may win.
    """

    __slots__ = ("raw", "_codes", "_texts", "_code_of", "_numeric", "_empty")

    def __init__(self, raw: np.ndarray) -> None:
        self.raw = raw
        self._codes: np.ndarray | None = None
        self._texts: list[str] = []
        self._code_of: dict[str, int] = {}
        self._numeric: np.ndarray | None = None
        self._empty: np.ndarray | None = None

    def encoding(self) -> tuple[np.ndarray, list[str], dict[str, int]]:
        """int32 codes into the distinct text forms (-1: no value), and the lookup."""
        if self._codes is None:
            code_of: dict[str, int] = {}

            def code(value: Any) -> int:
                text = text_form(value)
                return -1 if text is None else code_of.setdefault(text, len(code_of))

            codes = np.fromiter(map(code, self.raw), dtype=np.int32, count=len(self.raw))
            self._texts, self._code_of = list(code_of), code_of
            self._codes = codes
        return self._codes, self._texts, self._code_of

    def numeric(self) -> np.ndarray:
        """float64 numeric forms, NaN where there is none."""
        if self._numeric is None:
            codes, texts, _ = self.encoding()
            per_text = [numeric_form(text) for text in texts]
            # The extra last slot is what code -1 (no value) picks.
            lookup = np.array([np.nan if n is None else n for n in per_text] + [np.nan])
            self._numeric = lookup[codes]
        return self._numeric

    def empty(self) -> np.ndarray:
        """Which rows ``empty`` matches."""
        if self._empty is None:
            self._empty = np.fromiter(
                (is_empty(value) for value in self.raw), dtype=bool, count=len(self.raw)
            )
        return self._empty


class Columns(NamedTuple):
    """A table's rows at one moment: what a mask is computed from."""

    rows: int
    by_key: dict[str, Column]


class MetadataTable:
    """Row-aligned metadata of a chunk store, answering conditions as boolean masks."""

    def __init__(
        self, metadatas: Iterable[Mapping[str, Any]] = (), *, cache_size: int = 32
    ) -> None:
        self._state = Columns(0, {})
        self._cache: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()
        self._extend_lock = threading.Lock()
        self.extend(metadatas)

    def __len__(self) -> int:
        return self._state.rows

    def extend(self, metadatas: Iterable[Mapping[str, Any]]) -> None:
        """Append rows; derived arrays and cached masks are dropped."""
        added = list(metadatas)
        with self._extend_lock:
            old = self._state
            columns: dict[str, Column] = {}
            for key in old.by_key.keys() | set().union(*added):
                head = (
                    old.by_key[key].raw
                    if key in old.by_key
                    else np.full(old.rows, None, dtype=object)
                )
                tail = _object_array([metadata.get(key) for metadata in added])
                columns[key] = Column(np.concatenate([head, tail]))
            with self._cache_lock:
                self._state = Columns(old.rows + len(added), columns)
                self._cache.clear()

    def cached_mask(
        self, key: Hashable, compute: Callable[[Columns], np.ndarray]
    ) -> np.ndarray:
        """``compute(columns)`` over the rows present now, as a read-only bool array,
        cached under ``key``: equal keys must mean equal masks (``Predicate.mask``)."""
        with self._cache_lock:
            state = self._state
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        result = compute(state)
        result.setflags(write=False)
        with self._cache_lock:
            if self._state is state:  # an extend() meanwhile makes this mask stale
                self._cache[key] = result
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return result

    def to_columns(self) -> tuple[int, dict[str, list[Any]]]:
        """(row count, {key: one value per row, None where missing}) for persisting."""
        state = self._state
        return state.rows, {key: column.raw.tolist() for key, column in state.by_key.items()}

    @classmethod
    def from_columns(
        cls, rows: int, columns: Mapping[str, Sequence[Any]], *, cache_size: int = 32
    ) -> MetadataTable:
        """The inverse of ``to_columns``."""
        for key, values in columns.items():
            if len(values) != rows:
                raise ValueError(f"column {key!r} has {len(values)} values for {rows} rows")
        table = cls(cache_size=cache_size)
        table._state = Columns(
            rows, {key: Column(_object_array(values)) for key, values in columns.items()}
        )
        return table

    def save(self, path: Path) -> None:
        """Write ``to_columns()`` as JSON (no pickle; non-JSON values as ``str``)."""
        rows, columns = self.to_columns()
        document = {"format": 1, "rows": rows, "columns": columns}
        path.write_text(json.dumps(document, ensure_ascii=False, default=str), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> MetadataTable:
        document = json.loads(path.read_text(encoding="utf-8"))
        return cls.from_columns(document["rows"], document["columns"])
