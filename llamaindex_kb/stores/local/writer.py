"""Write segments and versions, and publish a version atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from llama_index.core.schema import BaseNode

from llamaindex_kb.errors import DISK_FULL_ERRNOS, DiskFullError
from llamaindex_kb.stores.base import DocumentInfo, KBManifest
from llamaindex_kb.stores.local.layout import KBLayout, sync
from llamaindex_kb.stores.local.segment import write_segment
from llamaindex_kb.stores.local.version import (
    SEGMENTS_FILE,
    Listing,
    write_listing,
    write_manifest,
)


def new_segment(layout: KBLayout, nodes: Sequence[BaseNode], vectors: np.ndarray | None,
                documents: dict[str, DocumentInfo], parents: Sequence[BaseNode] = (),
                readable: np.ndarray | None = None) -> str:
    """Write a segment (``segment.write_segment``) and sync it; its name.

    Call with ``layout.write_lock()`` held. On any failure the half-written folder
    is removed."""
    folder = layout.new_segment_dir()
    folder.mkdir()  # outside the cleanup: a name in use is never removed
    with cleaned_on_failure(layout, folder):
        write_segment(folder, nodes, vectors, documents, parents, readable)
        sync(folder)
    return folder.name


def write_version(layout: KBLayout, manifest: KBManifest, listing: Listing, *,
                  touch: bool = True) -> Path:
    """Make a version of these segments live: the manifest gets the chunk count, and
    with ``touch`` the time (a merge changes nothing a user sees).

    Call with ``layout.write_lock()`` held. On any failure the half-built folder is
    removed and the previous version stays live. Versions and segments left behind
    are removed by the caller (``remove_unused``) once it no longer reads them itself.
    """
    version = layout.new_version_dir()
    with cleaned_on_failure(layout, version):
        write_listing(version, listing)
        update: dict[str, object] = {"chunks": listing.chunks}
        if touch:
            update["updated_at"] = time.time()
        write_manifest(version, manifest.model_copy(update=update))
        layout.publish(version)
    return version


def remove_unused(layout: KBLayout) -> None:
    """Remove the versions no reader holds but the live one, then the segments that no
    remaining version lists. Call with ``layout.write_lock()`` held."""
    layout.remove_stale_versions()
    listed: set[str] = set()
    for child in layout.root.iterdir():
        if not (child.is_dir() and child.name.startswith("v")
                and (child / SEGMENTS_FILE).exists()):
            continue
        try:
            listing = Listing.model_validate_json((child / SEGMENTS_FILE).read_bytes())
        except (OSError, ValueError):
            # A version whose list cannot be read keeps every segment: removing one it
            # may list would damage it further.
            return
        listed.update(entry.name for entry in listing.segments)
    layout.remove_unused_segments(listed)


@contextlib.contextmanager
def cleaned_on_failure(layout: KBLayout, folder: Path) -> Iterator[None]:
    """Remove ``folder`` (a segment or version being written) if the block fails, unless
    it became live; a full disk becomes ``DiskFullError`` naming the data directory."""
    try:
        yield
    except BaseException as exc:
        # Asked before the cleanup frees the space the failed write filled.
        full = isinstance(exc, Exception) and disk_full(exc, folder.parent)
        # Only the final fsync of the folder follows the switch: if that failed, the
        # version is live and must stay.
        if layout.current_version() != folder:
            shutil.rmtree(folder, ignore_errors=True)
        if full:
            raise _disk_full_error(layout) from exc
        raise


def disk_full(exc: Exception, folder: Path) -> bool:
    """Whether ``exc``, raised writing in ``folder``, means the disk or quota is full.

    Some writers do not say so: numpy reports a short write ("N requested and M
    written") with no errno, SQLite a "disk I/O error" when its WAL index cannot grow.
    For those a small write beside them asks the file system.
    """
    if isinstance(exc, OSError):
        if exc.errno is not None:
            return exc.errno in DISK_FULL_ERRNOS
    elif isinstance(exc, sqlite3.OperationalError):
        code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
        if code != sqlite3.SQLITE_IOERR:
            return code == sqlite3.SQLITE_FULL
    else:
        return False
    probe = folder / ".space-probe"
    try:
        with open(probe, "wb") as handle:
            handle.write(bytes(1 << 20))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as probed:
        return probed.errno in DISK_FULL_ERRNOS
    finally:
        probe.unlink(missing_ok=True)
    return False


def _disk_full_error(layout: KBLayout) -> DiskFullError:
    return DiskFullError(
        f"no space left on the disk holding the data directory {layout.root.parent.parent} "
        f"while writing knowledge base {layout.knowledge_id!r}; nothing was changed: free "
        "some space (or raise the quota) and try again"
    )


@contextlib.contextmanager
def disk_space(layout: KBLayout) -> Iterator[None]:
    """A full disk or quota while writing ``layout`` (outside ``write_version``, which
    says so itself) becomes ``DiskFullError`` naming the data directory."""
    try:
        yield
    except (OSError, sqlite3.OperationalError) as exc:
        if not disk_full(exc, layout.root):
            raise
        raise _disk_full_error(layout) from exc
