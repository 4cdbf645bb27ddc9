"""Where a knowledge base lives on disk, and how a new version replaces the old one.

::

    <data_dir>/kbs/<dir>/            one folder per knowledge base (<dir> derived from knowledge_id)
        CURRENT                      name of the live version folder (replaced atomically)
        .lock                        held by writers (several processes may ingest)
        v<ns>-<pid>/                 an immutable version: manifest.json + segments.json
        segments/s<ns>-<pid>/        an immutable segment of chunks with their indices

A writer writes the new segment a change needs, then a new version folder listing
the segments, fsyncs both, then renames a temp file over CURRENT. Readers only ever
see a whole old or a whole new version, so a crash (even kill -9) mid-change leaves
the knowledge base answering as before; what the crash left is removed by the next
writer. (Versions written before segments hold their one segment's files themselves.)

Every reader of a version (in any process) holds a shared ``flock`` on its
``manifest.json`` for as long as it uses it; the kernel drops the lock when the reader
closes it or its process dies. A writer removes a version that is no longer live only
if it can lock that file exclusively without waiting, so a query is never broken by
publishes that happen while it runs: a version still read stays for a later writer.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import math
import mmap
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST_FILE = "manifest.json"
SEGMENTS_DIR = "segments"

_SAFE_DIR = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
# The folder name of a hashed id. An id spelled like one is hashed too, so the direct
# and the hashed name spaces never meet: two ids never share a folder.
_HASHED_DIR = re.compile(r"kb-[0-9a-f]{24}")


def kb_dir_name(knowledge_id: str) -> str:
    """A file-system-safe folder name; never the raw id (it may contain '/' or '..')."""
    if (_SAFE_DIR.fullmatch(knowledge_id) and knowledge_id not in {".", ".."}
            and not _HASHED_DIR.fullmatch(knowledge_id)):
        return knowledge_id
    # surrogatepass: an id read from a request may hold a lone surrogate; it must
    # still name a folder (one that does not exist), not fail.
    digest = hashlib.sha256(knowledge_id.encode("utf-8", "surrogatepass")).hexdigest()[:24]
    return f"kb-{digest}"


class KBLayout:
    """Paths and the version pointer of one knowledge base."""

    def __init__(self, data_dir: Path, knowledge_id: str) -> None:
        self.knowledge_id = knowledge_id
        kbs = Path(data_dir) / "kbs"
        self.root = kbs / kb_dir_name(knowledge_id)
        if _HASHED_DIR.fullmatch(knowledge_id) and not self.root.exists():
            # Made before ids spelled like hashed names were hashed: still its own.
            legacy = kbs / knowledge_id
            if owner(legacy) == knowledge_id:
                self.root = legacy

    @property
    def current_file(self) -> Path:
        return self.root / "CURRENT"

    def current_version(self) -> Path | None:
        return current_version(self.root)

    def foreign_owner(self) -> str | None:
        """The other knowledge id whose base holds this folder, if one does.

        Only a hashed folder can: one an id spelled like its name wrote into before
        such ids were hashed.
        """
        if not _HASHED_DIR.fullmatch(self.root.name):
            return None
        found = owner(self.root)
        return found if found not in (None, self.knowledge_id) else None

    def new_version_dir(self) -> Path:
        path = self.root / f"v{time.time_ns()}-{os.getpid()}"
        path.mkdir(parents=True)
        return path

    def new_segment_dir(self) -> Path:
        """A name for a new segment; the caller creates it."""
        (self.root / SEGMENTS_DIR).mkdir(parents=True, exist_ok=True)
        return self.root / SEGMENTS_DIR / f"s{time.time_ns()}-{os.getpid()}"

    def publish(self, version: Path) -> None:
        """Make ``version`` live in one atomic rename, after its files are on disk
        (those of the segments it lists: ``sync`` them first)."""
        sync(version)
        tmp = self.root / f".CURRENT.{os.getpid()}"
        try:
            tmp.write_text(version.name)
            _fsync(tmp)
            os.replace(tmp, self.current_file)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync(self.root)

    def remove_stale_versions(self) -> list[Path]:
        """Delete every version but the live one that no reader holds; the rest are kept."""
        live = self.current_version()
        kept = []
        for child in self.root.iterdir():
            if child.is_dir() and child.name.startswith("v") and child != live:
                if not _remove_unless_held(child):
                    kept.append(child)
        return kept

    def remove_unused_segments(self, listed: set[str]) -> None:
        """Delete every segment no version on disk lists (``listed``, read by the caller
        under the write lock after ``remove_stale_versions``): left by a writer that
        died, or by versions since removed."""
        folder = self.root / SEGMENTS_DIR
        if folder.is_dir():
            for child in folder.iterdir():
                if child.name not in listed:
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


class VersionGone(Exception):
    """The version was removed (no longer live) before it could be held."""


@dataclass(frozen=True)
class HeldVersion:
    """A version's manifest, read through the descriptor whose lock keeps its files."""

    fd: int
    manifest: bytes


def hold_version(version: Path) -> HeldVersion:
    """Share-lock ``version``: its files stay until ``os.close(held.fd)``.

    Never waits: only a writer removing a stale version locks exclusively, so a
    version being removed is one that CURRENT has left; ``VersionGone`` says to
    read CURRENT again.
    """
    path = version / MANIFEST_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise VersionGone(str(version)) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            # A remover unlinks the manifest first, under its lock: if it did so
            # between our open and our lock, the name is gone or names another file.
            named, held = os.stat(path), os.fstat(fd)
        except (BlockingIOError, FileNotFoundError) as exc:
            raise VersionGone(str(version)) from exc
        if (named.st_dev, named.st_ino) != (held.st_dev, held.st_ino):
            raise VersionGone(str(version))
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return HeldVersion(fd, b"".join(chunks))
    except BaseException:
        os.close(fd)
        raise


def _remove_unless_held(version: Path) -> bool:
    manifest = version / MANIFEST_FILE
    try:
        fd = os.open(manifest, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        # Never complete (a writer died mid-build) or half removed: no reader holds it.
        shutil.rmtree(version, ignore_errors=True)
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        os.unlink(manifest)
        shutil.rmtree(version, ignore_errors=True)
        return True
    finally:
        os.close(fd)


def current_version(root: Path) -> Path | None:
    """The live version folder of the knowledge base at ``root``, if it has one."""
    try:
        name = (root / "CURRENT").read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    version = root / name
    return version if name and version.is_dir() else None


def owner(root: Path) -> str | None:
    """The knowledge id the live version at ``root`` was written for, if readable."""
    version = current_version(root)
    if version is None:
        return None
    try:
        found = json.loads((version / MANIFEST_FILE).read_bytes()).get("knowledge_id")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, str) else None


def all_layouts(data_dir: Path) -> list[Path]:
    kbs = Path(data_dir) / "kbs"
    return sorted(p for p in kbs.iterdir() if p.is_dir()) if kbs.is_dir() else []


def read_array(path: Path) -> np.ndarray:
    """A ``.npy`` file read whole into memory, read-only; ``ValueError`` naming the file
    if its size is not what its header says (checked before anything of the size a
    header claims is allocated).

    Not memory-mapped: a mapped file truncated under a running search raises SIGBUS,
    which kills the process and every knowledge base it serves. The copy lives in an
    anonymous mapping of its own, handed back to the system when the array goes: from
    malloc's heap, memory freed by replaced versions was kept, and grew with each one.
    """
    with open(path, "rb", buffering=0) as handle:
        shape, dtype = _checked_header(handle, path)
        count = math.prod(shape)
        size = count * dtype.itemsize
        memory = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE)
        with memoryview(memory) as view:
            filled = 0
            while filled < size:
                got = handle.readinto(view[filled:size])
                if not got:
                    raise ValueError(f"{path.name} ended while being read")
                filled += got
    array = np.frombuffer(memory, dtype=dtype, count=count).reshape(shape)
    array.flags.writeable = False
    return array


def _checked_header(handle: io.FileIO, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise ValueError(f"format version {version}, never written here")
    except ValueError as exc:
        raise ValueError(f"{path.name} is not an array file ({exc})") from exc
    if dtype.hasobject or fortran:
        raise ValueError(f"{path.name} holds an array this program never writes")
    expected = handle.tell() + math.prod(shape) * dtype.itemsize
    size = os.fstat(handle.fileno()).st_size
    if size != expected:
        raise ValueError(f"{path.name} is {size} bytes, its header promises {expected}")
    return shape, dtype


def sync(folder: Path) -> None:
    """Every file of ``folder``, the folder itself, and its entry in its parent on disk."""
    for file in folder.rglob("*"):
        if file.is_file():
            _fsync(file)
    for child in (*(p for p in folder.rglob("*") if p.is_dir()), folder, folder.parent):
        _fsync(child)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
