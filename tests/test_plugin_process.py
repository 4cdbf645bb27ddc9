"""``python -m main`` as the daemon runs it: JSON lines on stdin and stdout."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import API_KEY, PluginProcess, dify_body, go_raw_request


def test_plugin_process_answers_retrieval_over_the_daemon_stdio_protocol(demo_data_dir: Path):
    env = {**os.environ, "INSTALL_METHOD": "local"}
    plugin = PluginProcess(env)
    settings = {"api_key": API_KEY, "data_dir": str(demo_data_dir), "demo": True}
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    body = dify_body({"knowledge_id": "demo", "query": "hybrid search weights",
                      "retrieval_setting": {"top_k": 2, "score_threshold": 0.0}})
    try:
        answer = plugin.invoke("s-1", settings, go_raw_request("/retrieval", body, headers))
        assert answer["status"] == 200
        assert len(answer["json"]["records"]) == 2
        assert answer["json"]["records"][0]["metadata"]["file_name"] == "hybrid-search.md"

        wrong = {**headers, "Authorization": "Bearer wrong"}
        denied = plugin.invoke("s-2", settings, go_raw_request("/retrieval", body, wrong))
        assert (denied["status"], denied["json"]["error_code"]) == (403, 1002)
    finally:
        plugin.close()
