"""The .difypkg builder and validator: the real tree packages cleanly, and every rule of the
daemon/SDK checklist is caught on a broken copy of the project, naming the file and field."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tools.difypkg import (
    IDENTITY_RE,
    MAX_PACKAGE_SIZE,
    PackagingError,
    Problem,
    build_package,
    collect_files,
    main_package,
    package_checksum,
    package_identity,
    validate_plugin,
)

PROJECT = Path(__file__).resolve().parents[1]
# libyaml only speeds up editing the copies; the validator parses like the SDK does.
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _load(rel: str) -> dict[str, Any]:
    return yaml.safe_load((PROJECT / rel).read_text(encoding="utf-8"))


MANIFEST = _load("manifest.yaml")
GROUP = MANIFEST["plugins"]["endpoints"][0]
ENDPOINT = _load(GROUP)["endpoints"][0]
SOURCE = _load(ENDPOINT)["extra"]["python"]["source"]
PACKAGE_NAME = f"{MANIFEST['name']}-{MANIFEST['version']}.difypkg"

MINIMAL_ENDPOINT = """from collections.abc import Mapping

from dify_plugin import Endpoint
from werkzeug import Request, Response


class RetrievalEndpoint(Endpoint):
    def _invoke(self, r: Request, values: Mapping, settings: Mapping) -> Response:
        return Response("{}", content_type="application/json")
"""

Mutation = Callable[[Path], None]


def errors(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]


def _not_copied(directory: str, names: list[str]) -> set[str]:
    """Skip .venv, .git, caches, local data, test suites and the bundled model/demo files:
    no rule depends on them and copying them for every case is what would make this slow."""
    skipped = {".env", "dist", "data", "tests", "scripts", "__pycache__", "_static", "demo"}
    return {
        name
        for name in names
        if name in skipped
        or name.endswith(".difypkg")
        or (name.startswith(".") and os.path.isdir(os.path.join(directory, name)))
    }


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    """A private copy of the project, completed where parallel work has not landed yet."""
    root = tmp_path / "plugin"
    shutil.copytree(
        PROJECT,
        root,
        ignore=_not_copied,
        copy_function=shutil.copyfile,
    )
    source = root / SOURCE
    if not source.exists():
        source.write_text(MINIMAL_ENDPOINT, encoding="utf-8")
    requirements = root / "requirements.txt"
    if not requirements.exists():
        requirements.write_text("dify_plugin>=0.10.2\n", encoding="utf-8")
    return root


# -- mutations ------------------------------------------------------------------------------


def edit_yaml(rel: str, change: Callable[[dict[str, Any]], None]) -> Mutation:
    def mutate(root: Path) -> None:
        path = root / rel
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=LOADER)
        change(data)
        text = yaml.dump(data, Dumper=DUMPER, sort_keys=False, allow_unicode=True)
        path.write_text(text, encoding="utf-8")

    return mutate


def _assign(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    data[last] = value


def _remove(data: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        data = data[key]
    del data[last]


def manifest_set(dotted: str, value: Any) -> Mutation:
    return edit_yaml("manifest.yaml", lambda data: _assign(data, dotted, value))


def manifest_del(dotted: str) -> Mutation:
    return edit_yaml("manifest.yaml", lambda data: _remove(data, dotted))


def endpoint_set(dotted: str, value: Any) -> Mutation:
    return edit_yaml(ENDPOINT, lambda data: _assign(data, dotted, value))


def add_setting(**fields: Any) -> Mutation:
    """Insert a setting at index 0 (text-input by default); a field set to None is left out."""
    spec = {"name": "extra", "type": "text-input", "label": {"en_US": "Extra"}, **fields}
    spec = {key: value for key, value in spec.items() if value is not None}
    return edit_yaml(GROUP, lambda data: data.setdefault("settings", []).insert(0, spec))


def write(rel: str, text: str) -> Mutation:
    def mutate(root: Path) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")

    return mutate


def append(rel: str, text: str) -> Mutation:
    def mutate(root: Path) -> None:
        with (root / rel).open("a", encoding="utf-8") as handle:
            handle.write(text)

    return mutate


def unignore(pattern: str) -> Mutation:
    def mutate(root: Path) -> None:
        path = root / ".difyignore"
        lines = path.read_text(encoding="utf-8").splitlines()
        path.write_text(
            "\n".join(line for line in lines if line.strip().lstrip("/") != pattern) + "\n",
            encoding="utf-8",
        )

    return mutate


def remove(rel: str) -> Mutation:
    def mutate(root: Path) -> None:
        target = root / rel
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)

    return mutate


def chain(*mutations: Mutation) -> Mutation:
    def mutate(root: Path) -> None:
        for mutation in mutations:
            mutation(root)

    return mutate


def symlink(rel: str, target: str) -> Mutation:
    return lambda root: os.symlink(target, root / rel)


def options(count: int) -> list[dict[str, Any]]:
    return [{"value": f"v{i}", "label": {"en_US": f"V{i}"}} for i in range(count)]


SECOND_ENDPOINT_CLASS = "\n\nclass OtherEndpoint(Endpoint):\n    pass\n"
NO_ENDPOINT_CLASS = "from dify_plugin import Endpoint\n\n\nclass Helper:\n    pass\n"
BASE_MODULE = "from dify_plugin import Endpoint\n\n\nclass BaseEndpoint(Endpoint):\n    pass\n"
BASE_IMPORT = "from endpoints.shared import BaseEndpoint\n"

BROKEN: list[Any] = [
    # manifest: root fields
    ("type is not plugin", manifest_set("type", "tool"), "manifest.yaml", "type"),
    ("version is not x.y.z", manifest_set("version", "1.0"), "manifest.yaml", "version"),
    (
        "version suffix over 16 chars",
        manifest_set("version", "1.0.0-" + "a" * 17),
        "manifest.yaml",
        "version",
    ),
    ("author has upper case", manifest_set("author", "Acme"), "manifest.yaml", "author"),
    (
        "author is a hyphenated UUID",
        manifest_set("author", "123e4567-e89b-12d3-a456-426614174000"),
        "manifest.yaml",
        "author",
    ),
    (
        "author is 32 hex characters",
        manifest_set("author", "0123456789abcdef0123456789abcdef"),
        "manifest.yaml",
        "author",
    ),
    ("name has spaces", manifest_set("name", "LlamaIndex KB"), "manifest.yaml", "name"),
    (
        "label without en_US",
        manifest_set("label", {"zh_Hans": "知识库"}),
        "manifest.yaml",
        "label.en_US",
    ),
    (
        "label en_US over 1023 chars",
        manifest_set("label.en_US", "x" * 1024),
        "manifest.yaml",
        "label.en_US",
    ),
    (
        "description zh_Hans over 1023 chars",
        manifest_set("description.zh_Hans", "长" * 1024),
        "manifest.yaml",
        "description.zh_Hans",
    ),
    ("description missing", manifest_del("description"), "manifest.yaml", "description"),
    ("icon not in _assets", manifest_set("icon", "missing.svg"), "manifest.yaml", "icon"),
    ("icon name over 128 chars", manifest_set("icon", "i" * 125 + ".svg"), "manifest.yaml", "icon"),
    (
        "icon_dark not in _assets",
        manifest_set("icon_dark", "dark.svg"),
        "manifest.yaml",
        "icon_dark",
    ),
    ("icon excluded by .difyignore", append(".difyignore", "\n*.svg\n"), "manifest.yaml", "icon"),
    (
        "created_at is not a timestamp",
        manifest_set("created_at", "yesterday"),
        "manifest.yaml",
        "created_at",
    ),
    (
        "created_at string is not RFC 3339",
        manifest_set("created_at", "2026-11-21 06:00"),
        "manifest.yaml",
        "created_at",
    ),
    (
        "created_at is the zero time",
        manifest_set("created_at", "0001-01-01T00:00:00Z"),
        "manifest.yaml",
        "created_at",
    ),
    ("created_at missing", manifest_del("created_at"), "manifest.yaml", "created_at"),
    ("repo is not a URL", manifest_set("repo", "github.com/acme/kb"), "manifest.yaml", "repo"),
    (
        "tag not in the allowed list",
        manifest_set("tags", ["knowledge"]),
        "manifest.yaml",
        "tags[0]",
    ),
    # manifest: resource
    ("memory is zero", manifest_set("resource.memory", 0), "manifest.yaml", "resource.memory"),
    (
        "memory is not an integer",
        manifest_set("resource.memory", "1G"),
        "manifest.yaml",
        "resource.memory",
    ),
    (
        "storage size under 1024",
        manifest_set("resource.permission.storage", {"enabled": True, "size": 100}),
        "manifest.yaml",
        "resource.permission.storage.size",
    ),
    (
        "storage declared without size",
        manifest_set("resource.permission.storage", {"enabled": True}),
        "manifest.yaml",
        "resource.permission.storage.size",
    ),
    (
        "endpoint permission disabled",
        manifest_set("resource.permission.endpoint.enabled", False),
        "manifest.yaml",
        "resource.permission.endpoint.enabled",
    ),
    (
        "permission flag is not a boolean",
        manifest_set("resource.permission.tool", {"enabled": "sure"}),
        "manifest.yaml",
        "resource.permission.tool.enabled",
    ),
    (
        "rerank invoked without permission",
        chain(
            manifest_set("resource.permission.model", {"enabled": True, "rerank": False}),
            write(
                "llamaindex_kb/uses_rerank.py",
                "def rerank(session, config, docs, query):\n"
                "    return session.model.rerank.invoke(config, docs, query)\n",
            ),
        ),
        "manifest.yaml",
        "resource.permission.model.rerank",
    ),
    (
        "storage invoked without permission",
        write(
            "llamaindex_kb/uses_storage.py",
            "class Cache:\n    def get(self):\n        return self.session.storage.get('k')\n",
        ),
        "manifest.yaml",
        "resource.permission.storage.enabled",
    ),
    # manifest: plugins
    (
        "no endpoint group",
        manifest_set("plugins.endpoints", []),
        "manifest.yaml",
        "plugins.endpoints",
    ),
    (
        "models declared with endpoints",
        manifest_set("plugins.models", [GROUP]),
        "manifest.yaml",
        "plugins.models",
    ),
    (
        "group path starts with ./",
        manifest_set("plugins.endpoints", [f"./{GROUP}"]),
        "manifest.yaml",
        "plugins.endpoints[0]",
    ),
    (
        "group path contains ..",
        manifest_set("plugins.endpoints", [f"x/../{GROUP}"]),
        "manifest.yaml",
        "plugins.endpoints[0]",
    ),
    (
        "group path is absolute",
        manifest_set("plugins.endpoints", [f"/{GROUP}"]),
        "manifest.yaml",
        "plugins.endpoints[0]",
    ),
    (
        "group path over 128 chars",
        manifest_set("plugins.endpoints", ["p/" + "x" * 127 + ".yaml"]),
        "manifest.yaml",
        "plugins.endpoints[0]",
    ),
    (
        "group file missing",
        manifest_set("plugins.endpoints", ["provider/missing.yaml"]),
        "manifest.yaml",
        "plugins.endpoints[0]",
    ),
    (
        "group file excluded by .difyignore",
        append(".difyignore", f"\n{GROUP}\n"),
        "manifest.yaml",
        "plugins.endpoints[0]",
    ),
    # manifest: meta
    (
        "meta.version is not x.y.z",
        manifest_set("meta.version", "1"),
        "manifest.yaml",
        "meta.version",
    ),
    ("meta.arch empty", manifest_set("meta.arch", []), "manifest.yaml", "meta.arch"),
    ("meta.arch unknown", manifest_set("meta.arch", ["x86"]), "manifest.yaml", "meta.arch[0]"),
    (
        "runner language is not python",
        manifest_set("meta.runner.language", "nodejs"),
        "manifest.yaml",
        "meta.runner.language",
    ),
    (
        "runner version is an unquoted float",
        manifest_set("meta.runner.version", 3.12),
        "manifest.yaml",
        "meta.runner.version",
    ),
    (
        "runner version over 128 chars",
        manifest_set("meta.runner.version", "3" * 129),
        "manifest.yaml",
        "meta.runner.version",
    ),
    (
        "entrypoint module missing",
        manifest_set("meta.runner.entrypoint", "app"),
        "manifest.yaml",
        "meta.runner.entrypoint",
    ),
    (
        "entrypoint over 256 chars",
        manifest_set("meta.runner.entrypoint", "m" * 257),
        "manifest.yaml",
        "meta.runner.entrypoint",
    ),
    (
        "minimum_dify_version not PEP 440",
        manifest_set("meta.minimum_dify_version", "latest"),
        "manifest.yaml",
        "meta.minimum_dify_version",
    ),
    (
        "minimum_dify_version is a float",
        manifest_set("meta.minimum_dify_version", 1.0),
        "manifest.yaml",
        "meta.minimum_dify_version",
    ),
    # endpoint group: settings
    ("setting name empty", add_setting(name=""), GROUP, "settings[0].name"),
    ("setting name over 1023 chars", add_setting(name="n" * 1024), GROUP, "settings[0].name"),
    (
        "setting name duplicated",
        chain(add_setting(name="dup"), add_setting(name="dup")),
        GROUP,
        "settings[1].name",
    ),
    ("setting type unknown", add_setting(type="string"), GROUP, "settings[0].type"),
    ("setting label missing", add_setting(label=None), GROUP, "settings[0].label"),
    ("scope on a text-input", add_setting(scope="llm"), GROUP, "settings[0].scope"),
    (
        "model-selector scope unknown",
        add_setting(type="model-selector", scope="all"),
        GROUP,
        "settings[0].scope",
    ),
    ("default is a list", add_setting(default=["a"]), GROUP, "settings[0].default"),
    ("128 options", add_setting(type="select", options=options(128)), GROUP, "settings[0].options"),
    (
        "option value empty",
        add_setting(type="select", options=[{"value": "", "label": {"en_US": "E"}}]),
        GROUP,
        "settings[0].options[0].value",
    ),
    (
        "option value over 127 chars",
        add_setting(type="select", options=[{"value": "v" * 128, "label": {"en_US": "V"}}]),
        GROUP,
        "settings[0].options[0].value",
    ),
    (
        "option value unquoted number",
        add_setting(type="select", options=[{"value": 1, "label": {"en_US": "One"}}]),
        GROUP,
        "settings[0].options[0].value",
    ),
    (
        "option label missing",
        add_setting(type="select", options=[{"value": "a"}]),
        GROUP,
        "settings[0].options[0].label",
    ),
    ("select without options", add_setting(type="select"), GROUP, "settings[0].options"),
    (
        "select default not an option",
        add_setting(type="select", options=options(2), default="v9"),
        GROUP,
        "settings[0].default",
    ),
    ("help is not an I18nObject", add_setting(help="plain text"), GROUP, "settings[0].help"),
    (
        "placeholder without en_US",
        add_setting(placeholder={"zh_Hans": "占位"}),
        GROUP,
        "settings[0].placeholder.en_US",
    ),
    ("url is not a string", add_setting(url=["https://example.com"]), GROUP, "settings[0].url"),
    ("required is not a boolean", add_setting(required="sure"), GROUP, "settings[0].required"),
    # endpoint group: endpoint list
    (
        "endpoint file missing",
        edit_yaml(GROUP, lambda d: _assign(d, "endpoints", ["endpoints/missing.yaml"])),
        GROUP,
        "endpoints[0]",
    ),
    (
        "endpoint path starts with ./",
        edit_yaml(GROUP, lambda d: _assign(d, "endpoints", [f"./{ENDPOINT}"])),
        GROUP,
        "endpoints[0]",
    ),
    (
        "endpoint file excluded by .difyignore",
        append(".difyignore", f"\n{ENDPOINT}\n"),
        GROUP,
        "endpoints[0]",
    ),
    # each endpoint YAML
    ("route path empty", endpoint_set("path", ""), ENDPOINT, "path"),
    ("route path without leading slash", endpoint_set("path", "retrieval"), ENDPOINT, "path"),
    ("route path malformed rule", endpoint_set("path", "/x/<int:"), ENDPOINT, "path"),
    ("route path unknown converter", endpoint_set("path", "/x/<uuid4:n>"), ENDPOINT, "path"),
    (
        "route declared twice",
        chain(
            write("endpoints/again.yaml", yaml.safe_dump(_load(ENDPOINT))),
            edit_yaml(GROUP, lambda d: d["endpoints"].append("endpoints/again.yaml")),
        ),
        "endpoints/again.yaml",
        "path",
    ),
    ("method lower case", endpoint_set("method", "post"), ENDPOINT, "method"),
    ("method PATCH", endpoint_set("method", "PATCH"), ENDPOINT, "method"),
    ("hidden is not a boolean", endpoint_set("hidden", "sometimes"), ENDPOINT, "hidden"),
    ("extra missing", edit_yaml(ENDPOINT, lambda d: _remove(d, "extra")), ENDPOINT, "extra"),
    (
        "source missing",
        endpoint_set("extra.python.source", "endpoints/missing.py"),
        ENDPOINT,
        "extra.python.source",
    ),
    (
        "source is not .py",
        endpoint_set("extra.python.source", "endpoints/retrieval.txt"),
        ENDPOINT,
        "extra.python.source",
    ),
    (
        "source excluded by .difyignore",
        append(".difyignore", f"\n{SOURCE}\n"),
        ENDPOINT,
        "extra.python.source",
    ),
    (
        "source has two Endpoint subclasses",
        append(SOURCE, SECOND_ENDPOINT_CLASS),
        ENDPOINT,
        "extra.python.source",
    ),
    (
        "source has no Endpoint subclass",
        write(SOURCE, NO_ENDPOINT_CLASS),
        ENDPOINT,
        "extra.python.source",
    ),
    (
        "source imports another Endpoint subclass",
        chain(
            write("endpoints/shared.py", BASE_MODULE),
            lambda root: (root / SOURCE).write_text(
                BASE_IMPORT + (root / SOURCE).read_text(encoding="utf-8"), encoding="utf-8"
            ),
        ),
        ENDPOINT,
        "extra.python.source",
    ),
    (
        "source aliases its Endpoint subclass",
        write(SOURCE, MINIMAL_ENDPOINT + "\n\nAlias = RetrievalEndpoint\n"),
        ENDPOINT,
        "extra.python.source",
    ),
    ("source does not compile", append(SOURCE, "\ndef broken(:\n"), SOURCE, "(python)"),
    # the YAML files themselves
    (
        "manifest is not YAML",
        write("manifest.yaml", "name: [unclosed\n"),
        "manifest.yaml",
        "(yaml)",
    ),
    (
        "manifest repeats a key",
        append("manifest.yaml", "\nname: other\n"),
        "manifest.yaml",
        "(yaml)",
    ),
    (
        "manifest excluded by .difyignore",
        append(".difyignore", "\nmanifest.yaml\n"),
        "manifest.yaml",
        "(file)",
    ),
    ("group is a list, not a mapping", write(GROUP, "- a\n- b\n"), GROUP, "(yaml)"),
    # package level
    ("_assets missing", remove("_assets"), "_assets", "(directory)"),
    (
        "no requirements.txt or pyproject.toml",
        chain(remove("requirements.txt"), remove("pyproject.toml")),
        "requirements.txt",
        "(file)",
    ),
    (
        ".env packaged",
        chain(unignore(".env"), write(".env", "REMOTE_INSTALL_KEY=secret\n")),
        ".env",
        "(file)",
    ),
    (
        ".venv packaged",
        chain(unignore(".venv"), write(".venv/pyvenv.cfg", "home = /usr\n")),
        ".venv",
        "(file)",
    ),
    (
        ".git packaged",
        chain(unignore(".git"), write(".git/HEAD", "ref: refs/heads/main\n")),
        ".git",
        "(file)",
    ),
    ("file cannot be read", symlink("dangling.txt", "nowhere.txt"), "dangling.txt", "(file)"),
    ("symlink to a directory", symlink("linked", "_assets"), "linked", "(file)"),
]


def test_the_prepared_copy_is_valid_before_it_is_broken(plugin: Path) -> None:
    assert errors(validate_plugin(plugin)) == []


@pytest.mark.parametrize(
    ("description", "mutate", "file", "field"),
    [pytest.param(*case, id=case[0]) for case in BROKEN],
)
def test_each_broken_rule_is_reported_with_its_file_and_field(
    plugin: Path, description: str, mutate: Mutation, file: str, field: str
) -> None:
    mutate(plugin)
    problems = errors(validate_plugin(plugin))
    assert any(p.file == file and field in p.field for p in problems), (
        f"{description}: expected an error on {file}: {field}, got {[str(p) for p in problems]}"
    )


ADVICE: list[Any] = [
    ("README.md missing", remove("README.md"), "README.md", "(file)"),
    (
        "two endpoint groups",
        edit_yaml("manifest.yaml", lambda d: d["plugins"]["endpoints"].append(GROUP)),
        "manifest.yaml",
        "plugins.endpoints",
    ),
    ("unknown language key", manifest_set("label.ja_Jp", "typo"), "manifest.yaml", "label.ja_Jp"),
    (
        "embedding model selected without permission",
        chain(
            # Without the code that invokes the model, only the selector is left to warn about.
            remove("llamaindex_kb/models/dify.py"),
            manifest_set("resource.permission.model.text_embedding", False),
            add_setting(type="model-selector", scope="text-embedding"),
        ),
        "manifest.yaml",
        "resource.permission.model.text_embedding",
    ),
    (
        "source module name is not an identifier",
        chain(
            write("endpoints/retrieval-v2.py", MINIMAL_ENDPOINT),
            endpoint_set("extra.python.source", "endpoints/retrieval-v2.py"),
        ),
        ENDPOINT,
        "extra.python.source",
    ),
    ("privacy file missing", manifest_set("privacy", "MISSING.md"), "manifest.yaml", "privacy"),
    (
        "group without endpoints",
        edit_yaml(GROUP, lambda d: _assign(d, "endpoints", [])),
        GROUP,
        "endpoints",
    ),
]


@pytest.mark.parametrize(
    ("description", "mutate", "file", "field"),
    [pytest.param(*case, id=case[0]) for case in ADVICE],
)
def test_recommendations_are_warnings_not_errors(
    plugin: Path, description: str, mutate: Mutation, file: str, field: str
) -> None:
    mutate(plugin)
    problems = validate_plugin(plugin)
    assert any(p.file == file and field in p.field and p.severity == "warning" for p in problems), (
        f"{description}: got {[str(p) for p in problems]}"
    )
    assert errors(problems) == []


def test_warnings_do_not_block_the_build(plugin: Path, tmp_path: Path) -> None:
    remove("README.md")(plugin)
    manifest_set("label.ja_Jp", "typo")(plugin)
    assert len(validate_plugin(plugin)) == 2
    assert build_package(plugin, tmp_path / "dist").is_file()


def test_problem_reads_as_file_field_message(plugin: Path) -> None:
    manifest_set("author", "Acme")(plugin)
    problems = [str(p) for p in validate_plugin(plugin)]
    assert "manifest.yaml: author: must match ^[a-z0-9_-]{1,64}$ (got 'Acme')" in problems


# -- the real tree --------------------------------------------------------------------------


def test_the_real_project_validates_clean() -> None:
    assert [str(p) for p in errors(validate_plugin(PROJECT))] == []


def test_the_real_project_packages_into_a_zip_the_daemon_accepts(tmp_path: Path) -> None:
    package = build_package(PROJECT, tmp_path / "dist")

    assert package == tmp_path / "dist" / PACKAGE_NAME
    with zipfile.ZipFile(package) as archive:
        infos = archive.infolist()
        names = [info.filename for info in infos]
        assert archive.comment == b""
    assert "manifest.yaml" in names
    assert not [name for name in names if name.endswith("/")]
    assert names == sorted(names)
    assert names == collect_files(PROJECT)
    assert {info.compress_type for info in infos} == {zipfile.ZIP_DEFLATED}
    assert sum(info.file_size for info in infos) <= MAX_PACKAGE_SIZE
    for name in names:
        parts = name.split("/")
        assert parts[0] not in {"tests", ".git", ".venv", "dist"}, name
        assert ".env" not in parts, name
    assert f"_assets/{MANIFEST['icon']}" in names
    assert {GROUP, ENDPOINT, SOURCE} <= set(names)
    identity = package_identity(package)
    assert IDENTITY_RE.fullmatch(identity), identity
    assert identity.startswith(f"{MANIFEST['author']}/{MANIFEST['name']}:{MANIFEST['version']}@")


@pytest.fixture(scope="module")
def built_by_the_cli(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m llamaindex_kb package` run from this checkout, as a developer runs it."""
    out = tmp_path_factory.mktemp("cli-dist")
    result = subprocess.run([sys.executable, "-m", "llamaindex_kb", "package", "--out", str(out)],
                            cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    package = out / PACKAGE_NAME
    assert f"{package} ({package.stat().st_size} bytes)" in result.stdout
    return package


def test_the_package_holds_only_what_runs_inside_dify(built_by_the_cli: Path) -> None:
    with zipfile.ZipFile(built_by_the_cli) as archive:
        names = archive.namelist()
    folders = {name.split("/")[0] for name in names if "/" in name}
    assert folders == {"_assets", "endpoints", "llamaindex_kb", "provider"}
    code = [name for name in names if name.endswith(".py")]
    assert "llamaindex_kb/server.py" in code
    assert [name for name in code if name != "main.py"
            and name.split("/")[0] not in {"llamaindex_kb", "endpoints"}] == []
    tools = {Path(name).name for name in (PROJECT / "tools").glob("*.py")}
    assert {"bench.py", "difypkg.py"} <= tools
    dev_files = [name for name in names
                 if Path(name).name in tools | {"conftest.py", "requirements-dev.txt"}
                 or Path(name).name.startswith("test_")]
    assert dev_files == []


def test_package_and_bench_in_an_installed_plugin_name_the_checkout_they_need(
    built_by_the_cli: Path, tmp_path: Path
) -> None:
    """The plugin as Dify unpacks it has the CLI but not tools/: a clear error, exit 2."""
    with zipfile.ZipFile(built_by_the_cli) as archive:
        archive.extractall(tmp_path / "installed")
    for command, tool in (("package", "difypkg"), ("bench", "bench")):
        result = subprocess.run([sys.executable, "-m", "llamaindex_kb", command],
                                cwd=tmp_path / "installed", capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 2, result.stderr
        assert (f"error: this command needs tools/{tool}.py from a checkout of the project; "
                "the plugin package does not ship it") in result.stderr


def test_building_twice_gives_identical_bytes(plugin: Path, tmp_path: Path) -> None:
    first = build_package(plugin, tmp_path / "one").read_bytes()
    second = build_package(plugin, tmp_path / "two").read_bytes()
    assert first == second


# -- checksum -------------------------------------------------------------------------------


def test_checksum_follows_the_daemon_formula_whatever_the_entry_order(tmp_path: Path) -> None:
    entries = {"manifest.yaml": b"name: x\n", "_assets/icon.svg": b"<svg/>"}
    forward, backward = tmp_path / "forward.zip", tmp_path / "backward.zip"
    with zipfile.ZipFile(forward, "w") as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    with zipfile.ZipFile(backward, "w") as archive:
        archive.writestr("_assets/", b"")  # directory entries are skipped by the daemon
        for name, content in reversed(entries.items()):
            archive.writestr(name, content)

    def sha(data: bytes) -> bytes:
        return hashlib.sha256(data).digest()

    expected = hashlib.sha256(
        b"".join(sha(name.encode()) + sha(entries[name]) for name in sorted(entries))
    ).hexdigest()
    assert package_checksum(forward) == expected
    assert package_checksum(backward) == expected


def test_checksum_changes_with_content(tmp_path: Path) -> None:
    sums = []
    for content in (b"a", b"b"):
        path = tmp_path / f"{content.decode()}.zip"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("manifest.yaml", content)
        sums.append(package_checksum(path))
    assert sums[0] != sums[1]
    assert all(len(s) == 64 for s in sums)


# -- ignore rules ---------------------------------------------------------------------------


def test_negated_patterns_in_difyignore_have_no_effect(plugin: Path) -> None:
    (plugin / ".difyignore").write_text("*.md\n!README.md\n!PRIVACY.md\n", encoding="utf-8")
    packaged = collect_files(plugin)
    assert "README.md" not in packaged
    assert "PRIVACY.md" not in packaged
    assert "manifest.yaml" in packaged


def test_gitignore_is_used_only_when_difyignore_is_absent(plugin: Path) -> None:
    (plugin / ".gitignore").write_text("secret.txt\n", encoding="utf-8")
    (plugin / "secret.txt").write_text("s3cret\n", encoding="utf-8")
    assert "secret.txt" in collect_files(plugin)

    (plugin / ".difyignore").unlink()
    write("tests/extra.txt", "x\n")(plugin)
    packaged = collect_files(plugin)
    assert "secret.txt" not in packaged
    assert "tests/extra.txt" in packaged  # only .gitignore's own patterns apply now


def test_trimmed_lines_comments_and_any_depth_names(plugin: Path) -> None:
    (plugin / ".difyignore").write_text(
        "# notes are private\n   notes   \r\n\n/top.txt\n", encoding="utf-8"
    )
    for rel in (
        "notes",
        "llamaindex_kb/notes/a.txt",
        "top.txt",
        "llamaindex_kb/top.txt",
        "# notes are private",
    ):
        write(rel, "x\n")(plugin)
    packaged = collect_files(plugin)
    assert "notes" not in packaged
    assert "llamaindex_kb/notes/a.txt" not in packaged
    assert "top.txt" not in packaged  # anchored to the root ...
    assert "llamaindex_kb/top.txt" in packaged  # ... so a deeper one stays
    assert "# notes are private" in packaged  # the comment line is not a pattern


def test_directory_only_patterns_prune_directories_but_keep_same_named_files(
    plugin: Path,
) -> None:
    (plugin / ".difyignore").write_text("build/\n", encoding="utf-8")
    write("build/out.txt", "x\n")(plugin)
    write("llamaindex_kb/build", "a file\n")(plugin)
    packaged = collect_files(plugin)
    assert "build/out.txt" not in packaged
    assert "llamaindex_kb/build" in packaged


# -- size and failures ----------------------------------------------------------------------


def test_oversized_package_is_rejected_naming_the_five_biggest_files(
    plugin: Path, tmp_path: Path
) -> None:
    big = plugin / "big"
    big.mkdir()
    chunk = MAX_PACKAGE_SIZE // 5
    for index in range(6):
        with (big / f"f{index}.bin").open("wb") as handle:
            handle.truncate(chunk + index)  # sparse: nothing is written to disk

    problems = errors(validate_plugin(plugin))
    size = [p for p in problems if (p.file, p.field) == ("(package)", "size")]
    assert len(size) == 1
    for index in range(1, 6):
        assert f"big/f{index}.bin" in size[0].message
    assert "big/f0.bin" not in size[0].message

    dist = tmp_path / "dist"
    with pytest.raises(PackagingError):
        build_package(plugin, dist)
    assert not dist.exists() or not any(dist.iterdir())


def test_failed_build_leaves_no_file_in_dist(plugin: Path, tmp_path: Path) -> None:
    manifest_set("author", "Acme")(plugin)
    dist = tmp_path / "dist"
    with pytest.raises(PackagingError) as caught:
        build_package(plugin, dist)
    assert any(p.field == "author" for p in caught.value.problems)
    assert not dist.exists() or not any(dist.iterdir())


def test_failed_build_keeps_the_previous_package(plugin: Path, tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    before = build_package(plugin, dist).read_bytes()
    endpoint_set("method", "PATCH")(plugin)
    with pytest.raises(PackagingError):
        build_package(plugin, dist)
    assert [p.name for p in dist.iterdir()] == [PACKAGE_NAME]
    assert (dist / PACKAGE_NAME).read_bytes() == before


def test_failure_while_writing_leaves_no_temporary_file(plugin: Path, tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    (dist / PACKAGE_NAME / "occupied").mkdir(parents=True)  # os.replace cannot overwrite it
    with pytest.raises(OSError):
        build_package(plugin, dist)
    assert [p.name for p in dist.iterdir()] == [PACKAGE_NAME]


def test_output_inside_the_plugin_must_be_ignored(plugin: Path) -> None:
    unignore("*.difypkg")(plugin)
    with pytest.raises(PackagingError) as caught:
        build_package(plugin, plugin / "out")
    assert [p.field for p in caught.value.problems] == [f"out/{PACKAGE_NAME}"]
    assert not (plugin / "out").exists()
    assert build_package(plugin, plugin / "dist").is_file()  # dist is in .difyignore


# -- CLI entry ------------------------------------------------------------------------------


def test_main_package_prints_the_package_and_returns_zero(
    plugin: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main_package(plugin, tmp_path / "dist") == 0
    out = capsys.readouterr().out
    package = tmp_path / "dist" / PACKAGE_NAME
    assert f"{package} ({package.stat().st_size} bytes)" in out


def test_main_package_prints_the_problems_and_returns_one(
    plugin: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest_set("meta.runner.version", 3.12)(plugin)
    assert main_package(plugin, tmp_path / "dist") == 1
    err = capsys.readouterr().err
    assert "manifest.yaml: meta.runner.version: must be a string" in err
