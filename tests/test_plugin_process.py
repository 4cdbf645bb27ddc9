"""``python -m main`` as the daemon runs it: JSON lines on stdin and stdout."""

from __future__ import annotations

import binascii
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from conftest import API_KEY, PLUGIN_ROOT, dify_body, go_raw_request


class PluginProcess:
    """Plays the daemon's side of the stdio protocol."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "main"],
            cwd=PLUGIN_ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                self.lines.put(json.loads(raw))
            except json.JSONDecodeError:
                continue

    def invoke(self, session_id: str, settings: dict[str, Any], raw: bytes,
               timeout: float = 60.0) -> dict[str, Any]:
        request = {
            "session_id": session_id,
            "event": "request",
            "data": {
                "type": "endpoint",
                "action": "invoke_endpoint",
                "settings": settings,
                "raw_http_request": binascii.hexlify(raw).decode(),
            },
        }
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()
        head: dict[str, Any] = {}
        body = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line.get("event") != "session" or line.get("session_id") != session_id:
                continue
            data = line["data"]
            if data["type"] == "stream":
                head.update({k: v for k, v in data["data"].items() if k != "result"})
                body += binascii.unhexlify(data["data"].get("result", ""))
            elif data["type"] == "end":
                return {"status": head["status"], "json": json.loads(body)}
            elif data["type"] == "error":
                raise AssertionError(f"plugin reported an error: {data}")
        raise AssertionError("no answer from the plugin process in time")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


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
