"""The ingestion CLI as a user runs it: real processes, real files, kill -9 included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PLUGIN_ROOT

from llamaindex_kb import load_settings
from llamaindex_kb.contract import RetrievalRequest
from llamaindex_kb.models.base import Models
from llamaindex_kb.retrieval import Library
from llamaindex_kb.stores.local.layout import KBLayout


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "llamaindex_kb", *args], cwd=PLUGIN_ROOT,
                            capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def hits(data: Path, kb: str, query: str) -> list[str]:
    library = Library(load_settings({"data_dir": data, "retrieval_mode": "keyword"}, environ={}))
    found = library.retrieve(RetrievalRequest(knowledge_id=kb, query=query, top_k=50),
                             Models(embed_model=None))
    return [r.metadata["file_name"] for r in found]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "alpha.md").write_text("# Alpha\n\nAlpha particles are helium nuclei.")
    (docs / "sub" / "beta.txt").write_text("Beta decay emits an electron.")
    (docs / "page.html").write_text("<html><body><p>Gamma rays are photons.</p></body></html>")
    (docs / "image.png").write_bytes(b"\x89PNG\r\n")
    return docs


def test_ingest_reports_a_summary_and_skips_unsupported_files(tmp_path, folder):
    data = tmp_path / "data"
    result = cli("ingest", str(folder), "--kb", "physics", "--data-dir", str(data),
                 "--mode", "keyword", "--no-progress")
    assert "3 documents added or changed" in result.stdout
    assert "skipped (unsupported type): docs/image.png" in result.stdout
    assert hits(data, "physics", "electron decay") == ["beta.txt"]
    assert hits(data, "physics", "gamma photons") == ["page.html"]


def test_rerun_processes_only_what_changed_and_sync_removes_vanished_files(tmp_path, folder):
    data = tmp_path / "data"
    args = ("--kb", "physics", "--data-dir", str(data), "--mode", "keyword", "--no-progress")
    cli("ingest", str(folder), *args)
    assert "0 documents added or changed" in cli("ingest", str(folder), *args).stdout
    (folder / "alpha.md").write_text("Alpha Centauri is a star system.")
    (folder / "sub" / "beta.txt").unlink()
    changed = cli("ingest", str(folder), *args).stdout
    assert "1 documents added or changed" in changed and "1 unchanged" in changed
    assert hits(data, "physics", "electron decay") == ["beta.txt"]  # still there without --sync
    synced = cli("ingest", str(folder), "--sync", *args).stdout
    assert "1 removed" in synced
    assert hits(data, "physics", "electron decay") == []
    assert hits(data, "physics", "star system") == ["alpha.md"]


def test_a_failed_file_is_reported_with_non_zero_exit_and_the_rest_indexed(tmp_path, folder):
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    data = tmp_path / "data"
    result = cli("ingest", str(folder), "--kb", "k", "--data-dir", str(data), "--mode",
                 "keyword", "--no-progress", check=False)
    assert result.returncode == 1
    assert "FAILED docs/broken.pdf" in result.stderr
    assert hits(data, "k", "electron decay") == ["beta.txt"]


def test_list_delete_and_drop(tmp_path, folder):
    data = tmp_path / "data"
    cli("ingest", str(folder), "--kb", "k", "--data-dir", str(data), "--mode", "keyword",
        "--no-progress")
    assert cli("list", "--data-dir", str(data)).stdout.startswith("k\t3 documents")
    assert cli("list", "--data-dir", str(data)).stdout.rstrip().endswith("\tno embedding")
    listing = cli("list", "--kb", "k", "--data-dir", str(data)).stdout.splitlines()
    beta = next(line.split("\t")[0] for line in listing if line.endswith("docs/sub/beta.txt"))
    cli("delete", "--kb", "k", beta, "--data-dir", str(data))
    assert hits(data, "k", "electron decay") == []
    missing = cli("delete", "--kb", "k", beta, "--data-dir", str(data), check=False)
    assert missing.returncode == 2 and "not in knowledge base" in missing.stderr
    cli("drop", "--kb", "k", "--data-dir", str(data))
    assert cli("list", "--data-dir", str(data)).stdout == ""


def test_hybrid_ingest_shows_progress_and_embeds(tmp_path, folder):
    data = tmp_path / "data"
    result = cli("ingest", str(folder), "--kb", "k", "--data-dir", str(data))
    assert "embedding" in result.stderr and "reading" in result.stderr
    assert "now 3 documents" in result.stdout


def test_kill_9_during_ingestion_leaves_the_old_version_answering_then_rerun_completes(
    tmp_path, folder
):
    data = tmp_path / "data"
    args = ("--kb", "k", "--data-dir", str(data), "--mode", "keyword", "--no-progress")
    cli("ingest", str(folder), *args)
    before = hits(data, "k", "electron decay")
    big = tmp_path / "big"
    big.mkdir()
    for i in range(1500):
        (big / f"note{i}.txt").write_text(f"Zebra note {i} about striped animals and savannas.")
    layout = KBLayout(data, "k")
    live = layout.current_version()
    written = set(layout.root.glob("segments/*")) | set(layout.root.glob("v*"))
    proc = subprocess.Popen([sys.executable, "-m", "llamaindex_kb", "ingest", str(big), *args],
                            cwd=PLUGIN_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    # Kill as soon as the change's new segment appears: the writer is mid-write, well
    # before its version folder (written last, just before the switch) could be published.
    while time.monotonic() < deadline and proc.poll() is None:
        if (set(layout.root.glob("segments/*")) | set(layout.root.glob("v*"))) - written:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.001)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the writer finished before it could be killed"
    assert layout.current_version() == live
    assert hits(data, "k", "electron decay") == before
    assert hits(data, "k", "zebra striped") == []

    cli("ingest", str(big), *args)
    assert len(hits(data, "k", "zebra striped")) == 50
    assert hits(data, "k", "electron decay") == before
    assert len([p for p in layout.root.glob("v*") if p.is_dir()]) <= 2


def test_ingest_applies_the_limits_from_the_environment_and_keeps_the_other_files(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "small.txt").write_text("orchids need bright indirect light")
    (docs / "large.txt").write_text("tulips " * 1000)
    data = tmp_path / "data"
    result = subprocess.run(
        [sys.executable, "-m", "llamaindex_kb", "ingest", str(docs), "--kb", "garden",
         "--data-dir", str(data), "--mode", "keyword", "--no-progress"],
        cwd=PLUGIN_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "LLAMAINDEX_KB_MAX_EXTRACTED_CHARS": "2000"})
    assert result.returncode == 1
    assert "FAILED" in result.stderr and "large.txt" in result.stderr
    assert "LLAMAINDEX_KB_MAX_EXTRACTED_CHARS" in result.stderr
    assert hits(data, "garden", "orchids") == ["small.txt"]
