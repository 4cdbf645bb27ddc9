"""What the tests of indexes built by LlamaIndex itself share: a small handbook (English
and Chinese) and an FAQ as (id, text, metadata) rows, LlamaIndex documents from them, and
the Dify requests sent through the real server."""

from __future__ import annotations

import json
from typing import Any

import httpx
from conftest import API_KEY, ServerTransport, dify_body, expect_error
from llama_index.core import Document

AUTH = {"Authorization": f"Bearer {API_KEY}"}
JSON = {**AUTH, "Content-Type": "application/json"}

# (doc_id, text, metadata): "year" is a string, as LlamaIndex readers often leave it,
# so a numeric comparison on it is Dify's (numeric forms) and not MetadataFilters'.
HANDBOOK = [
    ("leave", "Employees get twenty-five days of paid leave every year.",
     {"title": "Leave policy", "category": "hr", "year": "2021", "tags": "policy,leave"}),
    ("expenses", "Travel expenses are reimbursed within thirty days of the receipt.",
     {"title": "Expenses", "category": "finance", "year": "2023", "tags": "policy,travel"}),
    ("laptops", "Every new employee receives a laptop on the first working day.",
     {"title": "Laptops", "category": "it", "year": "2019", "tags": "hardware"}),
    ("vpn", "Connect to the office network from home through the VPN client.",
     {"title": "VPN", "category": "it", "year": "2024", "tags": "network,remote"}),
    ("remote", "Remote work is allowed two days a week after the probation period.",
     {"title": "Remote work", "category": "hr", "year": "2022", "tags": "policy,remote"}),
    ("vector-zh", "向量检索通过比较嵌入向量的余弦相似度来查找相关的文本片段。",
     {"title": "向量检索", "category": "search", "year": "2024", "tags": "中文"}),
    ("keyword-zh", "关键词检索根据词频和稀有程度对文本片段进行排序。",
     {"title": "关键词检索", "category": "search", "year": "2020", "tags": "中文"}),
    ("security", "Passwords must be rotated every ninety days and never shared.",
     {"title": "Security", "category": "it", "file_name": "security.md", "year": "2023",
      "tags": "policy,security"}),
]
FAQ = [
    ("faq-wifi", "The guest Wi-Fi password is printed at the reception desk.",
     {"title": "Guest Wi-Fi", "category": "faq"}),
    ("faq-parking", "Parking spaces are assigned by the facilities team.",
     {"title": "Parking", "category": "faq"}),
]
QUERIES = ["how many days of paid leave", "reimbursing travel costs", "working from home",
           "password rules", "new laptop for employees"]


def documents(rows: list[tuple[str, str, dict[str, Any]]]) -> list[Document]:
    return [Document(text=text, metadata=dict(metadata), doc_id=doc_id)
            for doc_id, text, metadata in rows]


def retrieval(api: ServerTransport, knowledge_id: str, query: str, *, top_k: int = 5,
              threshold: float = 0.0, condition: dict[str, Any] | None = None) -> Any:
    payload: dict[str, Any] = {
        "knowledge_id": knowledge_id, "query": query,
        "retrieval_setting": {"top_k": top_k, "score_threshold": threshold}}
    if condition is not None:
        payload["metadata_condition"] = condition
    return api.post("/retrieval", dify_body(payload), JSON)


def records(api: ServerTransport, knowledge_id: str, query: str, **kwargs: Any) -> list[dict]:
    reply = retrieval(api, knowledge_id, query, **kwargs)
    assert reply.status == 200, reply.body
    return reply.json()["records"]


def assert_handbook_listed(api: ServerTransport,
                           rows: list[tuple[str, str, dict[str, Any]]] = HANDBOOK) -> None:
    """The handbook (``rows``) is listed, one document per LlamaIndex document, with the
    file name and title its metadata gives."""
    reply = api.send("GET", "/knowledge-bases/handbook/documents", None, AUTH)
    assert reply.status == 200, reply.body
    listed = {doc["document_id"]: doc for doc in reply.json()["documents"]}
    assert set(listed) == {doc_id for doc_id, _, _ in rows}
    assert listed["security"]["file_name"] == "security.md"
    assert listed["vpn"]["title"] == "VPN" and listed["vpn"]["chunks"] == 1


def assert_writes_refused(api: ServerTransport, knowledge_id: str, document_id: str) -> None:
    """Upload (multipart and JSON) and delete answer 400 (3007) and change nothing."""
    request = httpx.Request("POST", "http://x/documents", data={"knowledge_id": knowledge_id},
                            files={"file": ("note.md", b"# Note\n\nA new note.")})
    reply = api.post("/documents", request.read(),
                     {**AUTH, "Content-Type": request.headers["Content-Type"]})
    expect_error(reply, 400, 3007, "your own LlamaIndex code")
    posted = api.post("/documents", json.dumps({"knowledge_id": knowledge_id, "title": "t",
                                                "text": "A new note."}).encode(), JSON)
    expect_error(posted, 400, 3007)
    deleted = api.send("DELETE", f"/knowledge-bases/{knowledge_id}/documents/{document_id}",
                       None, AUTH)
    expect_error(deleted, 400, 3007, "your own LlamaIndex code")
