"""Knowledge and document ids: what can be created can be listed and deleted, over HTTP."""

from __future__ import annotations

# This module drives the Dify SDK in this process: import it first, as main.py does,
# since it gevent-patches threading and sockets on import (see conftest).
import dify_plugin  # noqa: F401  isort: skip

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import API_KEY, PluginTransport, Reply, ServerTransport, standalone_server

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


@pytest.fixture(params=["plugin", "server"])
def api(request: pytest.FixtureRequest, tmp_path: Path
        ) -> Iterator[PluginTransport | ServerTransport]:
    if request.param == "plugin":
        yield PluginTransport({"api_key": API_KEY, "data_dir": str(tmp_path)})
        return
    with standalone_server(tmp_path) as url:
        yield ServerTransport(url)


def post_text(api: Any, kb: str, document_id: str, text: str) -> Reply:
    payload = {"knowledge_id": kb, "title": "t", "text": text, "document_id": document_id,
               "mode": "keyword"}
    return api.post("/documents", json.dumps(payload).encode(), AUTH)


@pytest.mark.parametrize("document_id", ["guides/setup.md", "a/b/c", "100%", "名前 with space",
                                         "..hidden", "a?b#c"])
def test_a_document_id_with_slashes_or_odd_characters_is_listed_and_deleted(api, document_id):
    assert post_text(api, "handbook", document_id, "orchids need bright light").status == 201
    listed = api.send("GET", "/knowledge-bases/handbook/documents", None, AUTH).json()
    assert [d["document_id"] for d in listed["documents"]] == [document_id]
    path = f"/knowledge-bases/handbook/documents/{quote(document_id, safe='/')}"
    reply = api.send("DELETE", path, None, AUTH)
    assert reply.status == 200, reply.body
    assert reply.json()["deleted"] == document_id
    listed = api.send("GET", "/knowledge-bases/handbook/documents", None, AUTH).json()
    assert listed["documents"] == []


@pytest.mark.parametrize("document_id", ["a/../b", "a//b", "/lead", "trail/", ".", "..", "./x",
                                         "tab\there"])
def test_a_document_id_no_url_could_address_is_refused_naming_the_rule(api, document_id):
    reply = post_text(api, "handbook", document_id, "orchids need bright light")
    assert reply.status == 400
    answer = reply.json()
    assert answer["error_code"] == 3002
    assert answer["error_msg"].startswith("document_id: must be 1 to 200 printable characters")
    assert api.send("GET", "/knowledge-bases", None, AUTH).json()["knowledge_bases"] == []
