"""tools/stress.py, the hostile-client, load and fault command: a tiny run of every scenario
against a real ``serve`` process, so the command cannot rot, and its torn-read and
traceback checks fed what they exist to catch, so a clean report means something."""

from __future__ import annotations

import importlib.util
import logging
import re
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "stress.py"


@pytest.fixture(scope="module")
def stress() -> ModuleType:
    spec = importlib.util.spec_from_file_location("stress", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["stress"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_every_scenario_runs_against_a_real_server_and_prints_its_figures():
    started = time.perf_counter()
    run = subprocess.run(
        [sys.executable, str(TOOL), "all", "--bodies", "15", "--heavy", "0", "--size-mb", "2",
         "--drip-clients", "2", "--idle-clients", "2", "--hold", "1", "--clients", "2",
         "--seconds", "1", "--warmup", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    out = run.stdout
    assert run.returncode == 0, run.stderr[-3000:] + out[-3000:]
    # Every generated request was sent and counted, on every route.
    assert out.count("15 requests in") == 5, out
    assert "== fuzz POST /retrieval" in out and "== fuzz POST /documents" in out
    for route in ("POST /knowledge-bases", "POST /keys", "POST /views"):
        assert f"== fuzz {route}" in out, out
    # What the admin routes made was deleted after them, so runs do not pile up.
    assert out.count("made by the run, then deleted") == 3, out
    assert "knowledge ids: create" in out
    assert re.search(r"whitespace to /retrieval\s+\S+\s+[\d.]+", out), out
    assert "slow-drip: 2 clients" in out and "idle: 2 clients" in out
    assert re.search(r"errors: \d+; torn reads: \d+", out), out
    # The base documents are read and checked whole under load, so the check had work.
    assert re.search(r"'records checked whole': [1-9]", out), out
    assert "manifest.json garbled, not yet open" in out
    assert "server: stopped by SIGTERM" in out
    assert time.perf_counter() - started < 120


def _state(stress: ModuleType):
    state = stress.LoadState(kb="k")
    state.chunks["churn-1"] = 3
    state.doc_ids["churn-1"] = "d1"
    return state


def _record(token: str, part: int, document_id: str = "d1",
            title: str | None = None) -> dict[str, object]:
    return {"content": f"stressdoc token={token} part={part}/3 words", "score": 0.5,
            "title": title or token, "metadata": {"token": token, "document_id": document_id}}


def test_a_document_seen_after_its_delete_returned_is_a_torn_read(stress):
    state = _state(stress)
    state.deleted["churn-1"] = 10.0
    stress._check_records(state, "churn", "churn-1", [_record("churn-1", 1)], 11.0, 11.5)
    assert state.torn == {"document seen after its DELETE returned": 1}
    # A read that began before the DELETE returned may still see it.
    late = _state(stress)
    late.deleted["churn-1"] = 10.0
    stress._check_records(late, "churn", "churn-1", [_record("churn-1", 1)], 9.0, 11.5)
    assert not late.torn


def test_part_of_a_document_or_a_record_of_two_documents_is_a_torn_read(stress):
    state = _state(stress)
    stress._check_records(state, "token", "churn-1",
                          [_record("churn-1", 1), _record("churn-1", 2)], 1.0, 2.0)
    assert state.torn == {"part of a document (half-published)": 1}
    mixed = _state(stress)
    stress._check_records(mixed, "churn", "churn-1",
                          [_record("churn-1", 1, title="churn-2")], 1.0, 2.0)
    assert mixed.torn == {"record mixes documents (content, title, metadata disagree)": 1}
    whole = _state(stress)
    stress._check_records(whole, "token", "churn-1",
                          [_record("churn-1", part) for part in (1, 2, 3)], 1.0, 2.0)
    assert not whole.torn


def test_a_base_document_missing_is_a_half_published_knowledge_base(stress):
    state = _state(stress)
    state.base_tokens = {"base-0", "base-1"}
    base = [{"content": "stressdoc token=base-0 part=1/1 x", "title": "base-0",
             "metadata": {"token": "base-0"}}]
    stress._check_records(state, "base", "none", base, 1.0, 2.0)
    assert state.torn == {"base documents missing (half-published knowledge base)": 1}


def test_a_logged_chained_traceback_is_reported_by_cause_and_product_frame(stress):
    stream = StringIO()
    logger = logging.getLogger("stress-test")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        from llamaindex_kb.contract import parse_retrieval_request
        try:
            try:
                parse_retrieval_request(b"[" * 100_000)
            except Exception as exc:
                raise OSError("outer") from exc
        except OSError:
            logger.exception("unexpected failure on POST /retrieval")
    finally:
        logger.removeHandler(handler)
    found = stress.logged_failures(stream.getvalue())
    assert len(found) == 1
    assert found[0].startswith("OSError: outer <- ")
    assert "[llamaindex_kb/" in found[0]
