"""Knowledge and document ids: what can be created can be listed and deleted, over HTTP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import API_KEY, PluginTransport, Reply

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


@pytest.fixture
def api(tmp_path: Path) -> PluginTransport:
    return PluginTransport({"api_key": API_KEY, "data_dir": str(tmp_path)})


def post_text(api: Any, kb: str, document_id: str, text: str) -> Reply:
    payload = {"knowledge_id": kb, "title": "t", "text": text, "document_id": document_id,
               "mode": "keyword"}
    return api.post("/documents", json.dumps(payload).encode(), AUTH)


@pytest.mark.parametrize("document_id", ["guides/setup.md", "a/../b", "100%", "名前 with space"])
def test_a_document_id_with_slashes_or_odd_characters_is_listed_and_deleted(api, document_id):
    assert post_text(api, "handbook", document_id, "orchids need bright light").status == 201
    listed = api.send("GET", "/knowledge-bases/handbook/documents", None, AUTH).json()
    assert [d["document_id"] for d in listed["documents"]] == [document_id]
    reply = api.send("DELETE", f"/knowledge-bases/handbook/documents/{quote(document_id)}",
                     None, AUTH)
    assert reply.status == 200, reply.body
    assert reply.json()["deleted"] == document_id
    listed = api.send("GET", "/knowledge-bases/handbook/documents", None, AUTH).json()
    assert listed["documents"] == []
