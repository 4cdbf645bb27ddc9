"""Where a knowledge base lives on disk, and how a new version replaces the old one.

::

    <data_dir>/kbs/<dir>/            one folder per knowledge base (<dir> derived from knowledge_id)
        CURRENT                      name of the live version folder (replaced atomically)
        .lock                        held by writers (several processes may ingest)
        v<ns>-<pid>/                 an immutable version: manifest.json + indices

A writer builds a complete new version folder, fsyncs it, then renames a temp file
over CURRENT. Readers only ever see a whole old or a whole new version, so a crash
(even kill -9) mid-build leaves the knowledge base answering as before; stale
version folders are removed by the next writer.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import InvalidFieldError

_SAFE_DIR = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
KB_ID_MAX = 200


def validate_knowledge_id(knowledge_id: str, field: str = "knowledge_id") -> str:
    if not knowledge_id or len(knowledge_id) > KB_ID_MAX or not knowledge_id.isprintable():
        raise InvalidFieldError(
            field, f"must be 1 to {KB_ID_MAX} printable characters, got {knowledge_id!r}"
        )
    return knowledge_id


def kb_dir_name(knowledge_id: str) -> str:
    """A file-system-safe folder name; never the raw id (it may contain '/' or '..')."""
    if _SAFE_DIR.fullmatch(knowledge_id) and knowledge_id not in {".", ".."}:
        return knowledge_id
    digest = hashlib.sha256(knowledge_id.encode()).hexdigest()[:24]
    return f"kb-{digest}"


class KBLayout:
    """Paths and the version pointer of one knowledge base."""

    def __init__(self, data_dir: Path, knowledge_id: str) -> None:
        self.knowledge_id = knowledge_id
        self.root = Path(data_dir) / "kbs" / kb_dir_name(knowledge_id)

    @property
    def current_file(self) -> Path:
        return self.root / "CURRENT"

    def current_version(self) -> Path | None:
        return current_version(self.root)

    def new_version_dir(self) -> Path:
        path = self.root / f"v{time.time_ns()}-{os.getpid()}"
        path.mkdir(parents=True)
        return path

    def publish(self, version: Path) -> None:
        """Make ``version`` live in one atomic rename, after its files are on disk."""
        for file in version.rglob("*"):
            if file.is_file():
                _fsync(file)
        _fsync(version)
        tmp = self.root / f".CURRENT.{os.getpid()}"
        tmp.write_text(version.name)
        _fsync(tmp)
        os.replace(tmp, self.current_file)
        _fsync(self.root)

    def remove_stale_versions(self, keep: set[Path]) -> None:
        """Delete versions not in ``keep``.

        Writers keep the version that was live before theirs, so a query that
        opened it just before the switch can finish reading it.
        """
        for child in self.root.iterdir():
            if child.is_dir() and child.name.startswith("v") and child not in keep:
                shutil.rmtree(child, ignore_errors=True)

    def drop(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    @contextlib.contextmanager
    def write_lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def current_version(root: Path) -> Path | None:
    """The live version folder of the knowledge base at ``root``, if it has one."""
    try:
        name = (root / "CURRENT").read_text().strip()
    except FileNotFoundError:
        return None
    version = root / name
    return version if name and version.is_dir() else None


def all_layouts(data_dir: Path) -> list[Path]:
    kbs = Path(data_dir) / "kbs"
    return sorted(p for p in kbs.iterdir() if p.is_dir()) if kbs.is_dir() else []


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
