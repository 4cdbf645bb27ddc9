"""What the package imports: the core and the standalone server run without the Dify SDK
(whose import gevent-patches the process), imports point one way with no cycle, and the
facade ``llamaindex_kb`` is exactly the public API and loads nothing it does not need.

Each check that depends on what is imported runs in a fresh interpreter: this test process
may already hold the SDK and anything other tests imported.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

PROJECT = Path(__file__).resolve().parents[1]
PACKAGE = PROJECT / "llamaindex_kb"
SDK = ("dify_plugin", "gevent")
# The one module allowed to import the SDK: the Dify workspace's models.
SDK_DOOR = "llamaindex_kb.models.dify"

PUBLIC_API = {
    "IngestSummary", "KBError", "KnowledgeAPI", "Library", "Record", "RetrievalRequest",
    "Settings", "api_for", "error_status", "handle_plugin_request", "ingest_paths",
    "library_for", "load_settings", "parse_retrieval_request", "plugin_settings",
}


def fresh_python(code: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=PROJECT, text=True,
                          capture_output=True, timeout=300, check=True)


def loaded_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    result = fresh_python(code + "\nimport json, sys; print(json.dumps(sorted(sys.modules)))")
    return set(json.loads(result.stdout.splitlines()[-1]))


def sdk_modules(names: set[str]) -> list[str]:
    return sorted(name for name in names if name.split(".")[0] in SDK)


# -- the module graph -----------------------------------------------------------------------


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PROJECT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def _known(name: str) -> str:
    """The innermost package module that ``name`` (a module or a module's attribute) is in."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports_of(module: str) -> set[str]:
    """Every package module ``module`` imports, wherever the import statement is (functions
    included), plus modules named by a string such as ``"llamaindex_kb.stores.postgres:f"``,
    which the store registry and the facade import with importlib."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {_known(a.name) for a in node.names if a.name.startswith("llamaindex_kb")}
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{source}" if source else base
            if source.split(".")[0] == "llamaindex_kb":
                # `from pkg import module` imports that module; `from mod import name`, mod.
                found |= {_known(f"{source}.{a.name}") for a in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            named = node.value.split(":")[0]
            if named in MODULES and named.startswith("llamaindex_kb."):
                found.add(named)
    return found - {module}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for target in sorted(graph[node]):
            if target in on_path:
                return path[path.index(target):] + [target]
            if target not in done and (cycle := visit(target)):
                return cycle
        on_path.discard(path.pop())
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle_among_the_package_modules_function_level_imports_included() -> None:
    graph = {module: imports_of(module) for module in MODULES}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# The layers of README "Development", lowest first: a module may import its own layer and
# those below it, never one above. Each module's layer is its longest matching prefix.
LAYERS = [
    ("errors", "limits", "config", "ids", "redaction", "lru"),
    ("contract", "conditions", "text", "scoring"),
    ("models",),
    ("stores",),
    ("keys", "views"),
    ("retrieval", "ingestion"),
    ("http",),
    ("service",),
    ("server", "cli", "__main__", ""),  # "" is the facade, llamaindex_kb itself
]


def layer_of(module: str) -> int:
    inner = module.removeprefix("llamaindex_kb").removeprefix(".")
    for rank, prefixes in enumerate(LAYERS):
        if any(inner == p or (p and inner.startswith(p + ".")) for p in prefixes):
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS and the README")


def test_imports_point_down_the_layers() -> None:
    upward = sorted(f"{module} -> {target}" for module in MODULES
                    for target in imports_of(module) if layer_of(target) > layer_of(module))
    assert upward == []


def test_the_graph_sees_imports_in_functions_relative_imports_and_registry_strings() -> None:
    # The cycle test is only as good as the graph: pin edges of each kind it must see.
    assert "llamaindex_kb.server" in imports_of("llamaindex_kb.cli")  # inside _run
    assert "llamaindex_kb.models.dify" in imports_of("llamaindex_kb.models.choose")
    assert "llamaindex_kb.stores.postgres" in imports_of("llamaindex_kb.stores.registry")
    assert "llamaindex_kb.service" in imports_of("llamaindex_kb")  # the facade's map
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    assert [layer_of(m) for m in ("llamaindex_kb.errors", "llamaindex_kb.stores.local.store",
                                  "llamaindex_kb.server", "llamaindex_kb")] == [0, 3, 8, 8]


def test_package_modules_import_the_defining_module_not_the_facade() -> None:
    # The facade imports everything lazily; a module importing it back would close a circle
    # as soon as a public name is touched.
    users = sorted(m for m in MODULES if m != "llamaindex_kb" and "llamaindex_kb" in imports_of(m))
    assert users == []


# -- without the Dify SDK -------------------------------------------------------------------


def test_the_core_imports_without_the_dify_sdk_or_gevent() -> None:
    others = sorted(set(MODULES) - {SDK_DOOR, "llamaindex_kb.__main__"})
    loaded = loaded_after(
        "import importlib, llamaindex_kb\n"
        "[getattr(llamaindex_kb, name) for name in llamaindex_kb.__all__]\n"
        f"for name in {others!r}: importlib.import_module(name)\n"
    )
    assert {"llamaindex_kb.cli", "llamaindex_kb.service", "llamaindex_kb.stores.postgres"} <= loaded
    assert sdk_modules(loaded) == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_standalone_server_serves_without_the_dify_sdk_or_gevent(tmp_path: Path) -> None:
    """`serve` as users run it; -X importtime names every module the process imported, on
    the way up and while it answered."""
    port = _free_port()
    imports = tmp_path / "importtime.txt"
    with imports.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "llamaindex_kb", "serve",
             "--data-dir", str(tmp_path / "data"), "--api-key", "k", "--port", str(port)],
            cwd=PROJECT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.DEVNULL, stderr=stderr,
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                    break
                except httpx.TransportError:
                    assert proc.poll() is None, imports.read_text()[-2000:]
                    assert time.monotonic() < deadline, "serve did not answer /health in time"
                    time.sleep(0.1)
            assert health.status_code == 200
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    loaded = {line.split("|")[-1].strip() for line in imports.read_text().splitlines()
              if line.startswith("import time:")}
    assert {"waitress", "llamaindex_kb.server", "llamaindex_kb.service"} <= loaded
    assert sdk_modules(loaded) == []


# -- the facade -----------------------------------------------------------------------------


def test_the_facade_is_exactly_the_public_api_and_every_name_resolves() -> None:
    import llamaindex_kb

    assert set(llamaindex_kb.__all__) == PUBLIC_API
    assert len(llamaindex_kb.__all__) == len(PUBLIC_API)
    for name in llamaindex_kb.__all__:
        value = getattr(llamaindex_kb, name)
        assert value.__name__ == name
        assert value.__module__.startswith("llamaindex_kb.")
    assert set(llamaindex_kb.__all__) <= set(dir(llamaindex_kb))
    with pytest.raises(AttributeError, match="no_such_name"):
        llamaindex_kb.no_such_name  # noqa: B018


def test_importing_one_module_does_not_load_the_server_stack() -> None:
    loaded = loaded_after("import llamaindex_kb.errors")
    assert "llamaindex_kb.errors" in loaded
    assert not {"llamaindex_kb.service", "llamaindex_kb.http.app", "llama_index.core",
                "numpy"} & loaded


def test_a_public_name_loads_its_module_on_first_use() -> None:
    loaded = loaded_after("import llamaindex_kb\nllamaindex_kb.load_settings")
    assert "llamaindex_kb.config" in loaded
    assert "llamaindex_kb.service" not in loaded
