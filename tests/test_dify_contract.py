"""Every **test** line of docs/dify-client-contract.md, through both doors:
the plugin SDK's executor (raw daemon bytes) and the standalone server (real HTTP)."""

from __future__ import annotations

# This module drives the Dify SDK in this process: import it first, as main.py does,
# since it gevent-patches threading and sockets on import (see conftest).
import dify_plugin  # noqa: F401  isort: skip

from typing import Any

import pytest
from conftest import API_KEY, Reply, dify_body

from llamaindex_kb.contract import DEFAULT_TOP_K
from llamaindex_kb.stores import registry
from llamaindex_kb.stores.base import FindingStore

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


def ask(transport: Any, payload: dict[str, Any], path: str = "/retrieval",
        headers: dict[str, str] | None = None) -> Reply:
    return transport.post(path, dify_body(payload), AUTH if headers is None else headers)


def query(text: str, top_k: int | None = 4, threshold: float | None = 0.0,
          **extra: Any) -> dict[str, Any]:
    return {
        "knowledge_id": "demo",
        "query": text,
        "retrieval_setting": {"top_k": top_k, "score_threshold": threshold},
        **extra,
    }


def records(reply: Reply) -> list[dict[str, Any]]:
    assert reply.status == 200, reply.body
    return reply.json()["records"]


def test_retrieval_answers_records_with_content_score_title_and_metadata(transport):
    found = records(ask(transport, query("How do I connect Dify to the knowledge base?")))
    assert found, "the demo knowledge base should answer a question about itself"
    for record in found:
        assert isinstance(record["content"], str) and record["content"]
        assert isinstance(record["title"], str) and record["title"]
        assert isinstance(record["metadata"], dict)
        assert {"document_id", "file_name", "file_path"} <= record["metadata"].keys()
    assert found[0]["metadata"]["file_name"] == "getting-started.md"


def test_document_id_is_stable_across_calls(transport):
    first = records(ask(transport, query("score threshold relevance")))
    second = records(ask(transport, query("score threshold relevance")))
    assert [r["metadata"]["document_id"] for r in first] == [
        r["metadata"]["document_id"] for r in second
    ]


@pytest.mark.parametrize("path", ["/retrieval", "//retrieval", "/retrieval/retrieval"])
def test_unnormalised_paths_from_dify_still_reach_retrieval(transport, path):
    assert records(ask(transport, query("hybrid search weights"), path=path))


@pytest.mark.parametrize(
    ("key", "status"), [(API_KEY, 200), ("wrong-key", 403)], ids=["right-key", "wrong-key"]
)
def test_save_time_probe_without_body_passes_only_with_the_right_key(transport, key, status):
    reply = transport.post("/retrieval", None, {"Authorization": f"Bearer {key}"})
    assert reply.status == status
    if status == 200:
        assert reply.json() == {"records": []}


@pytest.mark.parametrize(
    ("key", "status"), [(API_KEY, 200), ("wrong-key", 403)], ids=["right-key", "wrong-key"]
)
def test_save_time_probe_with_empty_knowledge_id_passes_only_with_the_right_key(
    transport, key, status
):
    probe = {"knowledge_id": "", "query": "",
             "retrieval_setting": {"top_k": 1, "score_threshold": 0.0}}
    reply = ask(transport, probe, headers={"Authorization": f"Bearer {key}",
                                           "Content-Type": "application/json"})
    assert reply.status == status
    if status == 200:
        assert reply.json() == {"records": []}


@pytest.mark.parametrize(
    "condition",
    [
        {},
        {"metadata_condition": None},
        {"metadata_condition": {}},
        {"metadata_condition": {"logical_operator": "and", "conditions": []}},
        {"metadata_condition": {"logical_operator": None, "conditions": []}},
    ],
    ids=["absent", "null", "empty-object", "no-conditions", "null-operator"],
)
def test_every_spelling_of_no_filter_means_no_filter(transport, condition):
    unfiltered = records(ask(transport, query("metadata filters operators")))
    assert records(ask(transport, query("metadata filters operators", **condition))) == unfiltered


@pytest.mark.parametrize("name", ["file_type", ["file_type"]], ids=["string", "list"])
def test_condition_name_may_be_a_string_or_a_one_element_list(transport, name):
    condition = {"logical_operator": "and", "conditions": [
        {"name": name, "comparison_operator": "is", "value": "txt"}]}
    found = records(ask(transport, query("where is my data stored", metadata_condition=condition)))
    assert found and all(r["metadata"]["file_type"] == "txt" for r in found)


def test_metadata_is_always_an_object_even_for_filtered_answers(transport):
    condition = {"conditions": [{"name": "file_type", "comparison_operator": "is", "value": "md"}]}
    for record in records(ask(transport, query("embedding", metadata_condition=condition))):
        assert isinstance(record["metadata"], dict) and record["metadata"]["document_id"]


def test_scores_are_in_unit_range_sorted_thresholded_and_cut_to_top_k(transport):
    everything = records(ask(transport, query("knowledge base", top_k=50, threshold=0.0)))
    scores = [r["score"] for r in everything]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores == sorted(scores, reverse=True)
    assert len(records(ask(transport, query("knowledge base", top_k=2)))) == 2
    middle = scores[len(scores) // 2]
    above = records(ask(transport, query("knowledge base", top_k=50, threshold=middle)))
    assert above and all(r["score"] >= middle for r in above)
    assert len(above) < len(everything)


def test_null_top_k_uses_the_documented_default(transport):
    found = records(ask(transport, query("knowledge base", top_k=None)))
    assert len(found) == DEFAULT_TOP_K


@pytest.mark.parametrize("threshold", [None, 0, 0.0], ids=["null", "int-zero", "float-zero"])
def test_disabled_threshold_spellings_return_results(transport, threshold):
    assert records(ask(transport, query("knowledge base", threshold=threshold)))


def test_integer_threshold_one_keeps_only_perfect_matches(transport):
    assert records(ask(transport, query("knowledge base", threshold=1))) == []


def test_chinese_query_arrives_as_unicode_escapes_and_matches(transport):
    body = dify_body(query("向量数据库 元数据过滤"))
    assert b"\\u5411" in body  # Dify's json.dumps escapes CJK
    found = records(transport.post("/retrieval", body, AUTH))
    assert found[0]["metadata"]["file_name"] == "混合检索.md"


def test_console_escaped_quotes_are_undone(transport):
    plain = records(ask(transport, query('"SSRF proxy" allow rule')))
    escaped = records(ask(transport, query('\\"SSRF proxy\\" allow rule')))
    assert escaped == plain
    assert plain[0]["metadata"]["file_name"] == "troubleshooting.md"


def test_key_typed_with_bearer_prefix_is_accepted(transport):
    headers = {"Authorization": f"Bearer Bearer {API_KEY}", "Content-Type": "application/json"}
    assert records(ask(transport, query("knowledge base"), headers=headers))


def test_the_bearer_scheme_is_read_in_any_case_as_http_says(transport):
    headers = {"Authorization": f"bearer {API_KEY}", "Content-Type": "application/json"}
    assert records(ask(transport, query("knowledge base"), headers=headers))


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({"Content-Type": "application/json"}, 403, 1001),
        ({"Authorization": f"Basic {API_KEY}", "Content-Type": "application/json"}, 403, 1001),
        ({"Authorization": "Bearer", "Content-Type": "application/json"}, 403, 1001),
        ({"Authorization": "Bearer nope", "Content-Type": "application/json"}, 403, 1002),
    ],
    ids=["missing", "not-bearer", "bearer-without-key", "wrong-key"],
)
def test_auth_failures_are_403_with_their_error_code(transport, headers, status, code):
    reply = ask(transport, query("knowledge base"), headers=headers)
    assert (reply.status, reply.json()["error_code"]) == (status, code)
    assert API_KEY not in reply.body.decode()


def test_unknown_knowledge_base_is_404_2001(transport):
    reply = ask(transport, {**query("anything"), "knowledge_id": "no-such-kb"})
    assert (reply.status, reply.json()["error_code"]) == (404, 2001)
    assert "no-such-kb" in reply.json()["error_msg"]


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        (b"{not json", 3001, "JSON"),
        (b"[1, 2]", 3001, "object"),
        (dify_body({"query": "x"}), 3002, "knowledge_id"),
        (dify_body({"knowledge_id": 7, "query": "x"}), 3002, "knowledge_id"),
        (dify_body({"knowledge_id": "demo", "query": ["x"]}), 3002, "query"),
        (dify_body(query("x", top_k=0)), 3002, "retrieval_setting.top_k"),
        (dify_body(query("x", top_k="5")), 3002, "retrieval_setting.top_k"),
        (dify_body(query("x", threshold=1.5)), 3002, "retrieval_setting.score_threshold"),
        (dify_body({**query("x"), "retrieval_setting": [1]}), 3002, "retrieval_setting"),
        (dify_body(query("x", metadata_condition={"conditions": [
            {"name": "a", "comparison_operator": "like", "value": "b"}]})),
         3003, "comparison_operator"),
    ],
    ids=["malformed-json", "not-object", "missing-kb", "kb-not-string", "query-not-string",
         "top-k-zero", "top-k-string", "threshold-too-big", "setting-not-object",
         "unknown-operator"],
)
def test_bad_input_is_400_naming_the_problem(transport, body, code, field):
    reply = transport.post("/retrieval", body, AUTH)
    assert reply.status == 400
    payload = reply.json()
    assert payload["error_code"] == code
    assert field in payload["error_msg"]


def test_errors_are_never_statuses_dify_misreads_or_retries(transport):
    statuses = {
        ask(transport, query("x"), headers={}).status,
        ask(transport, {**query("x"), "knowledge_id": "missing"}).status,
        transport.post("/retrieval", b"{", AUTH).status,
    }
    assert statuses.isdisjoint({401, 429, 500, 502, 503, 504})


def test_bad_plugin_settings_are_a_400_naming_the_setting(demo_data_dir):
    from conftest import PluginTransport

    plugin = PluginTransport({"api_key": API_KEY, "data_dir": str(demo_data_dir),
                              "semantic_weight": "heavy"})
    reply = ask(plugin, query("knowledge base"))
    assert (reply.status, reply.json()["error_code"]) == (400, 3005)
    assert "semantic_weight" in reply.json()["error_msg"]


def test_a_damaged_knowledge_base_is_a_500_naming_it_and_what_to_do(demo_data_dir, tmp_path,
                                                                   caplog):
    import shutil

    from conftest import PluginTransport

    broken = tmp_path / "broken"
    shutil.copytree(demo_data_dir, broken)
    for keyword_dir in broken.glob("kbs/demo/segments/*/postings"):
        shutil.rmtree(keyword_dir)
    plugin = PluginTransport({"api_key": API_KEY, "data_dir": str(broken)})
    with caplog.at_level("ERROR"):
        reply = ask(plugin, query("knowledge base"))
    answer = reply.json()
    assert (reply.status, answer["error_code"]) == (500, 5001)
    assert "'demo' is damaged" in answer["error_msg"]
    assert "ingest its documents again" in answer["error_msg"]
    assert str(broken) not in answer["error_msg"] and API_KEY not in reply.body.decode()
    assert any("'demo' is damaged" in record.getMessage() for record in caplog.records)


class ExplodingStore(FindingStore):
    """A store with a bug of ours: stands for any failure nothing maps."""

    url = "exploding://"
    searches_in_process = True

    def find(self, knowledge_id: str) -> None:
        raise RuntimeError(f"bug reading {self.url}{knowledge_id}")


def exploding_store(url: str, settings: object) -> ExplodingStore:
    return ExplodingStore()


def test_unexpected_failure_is_a_short_500_with_a_logged_traceback(tmp_path, caplog,
                                                                  monkeypatch):
    from conftest import PluginTransport

    monkeypatch.setitem(registry.FACTORIES, "exploding", f"{__name__}:exploding_store")
    plugin = PluginTransport({"api_key": API_KEY, "data_dir": str(tmp_path),
                              "store_url": "exploding://", "demo": False})
    with caplog.at_level("ERROR"):
        reply = ask(plugin, query("knowledge base"))
    assert (reply.status, reply.json()["error_code"]) == (500, 5000)
    assert "exploding://" not in reply.json()["error_msg"] and API_KEY not in reply.body.decode()
    assert any(record.exc_info for record in caplog.records), "the traceback must be logged"


def test_demo_is_built_even_when_an_endpoint_without_it_opened_the_store_first(tmp_path):
    from conftest import PluginTransport

    without = PluginTransport({"api_key": API_KEY, "data_dir": str(tmp_path), "demo": False})
    assert ask(without, query("knowledge base")).status == 404
    with_demo = PluginTransport({"api_key": API_KEY, "data_dir": str(tmp_path), "demo": True})
    assert records(ask(with_demo, query("knowledge base")))
