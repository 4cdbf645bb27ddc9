"""Validate the plugin tree and build its ``.difypkg`` the way the Dify plugin daemon does.

``dify plugin package`` (Go) checks only a fraction of what the daemon later refuses at install
time or at remote-debug registration, and what the SDK refuses at start-up. ``validate_plugin``
enforces the union of those rules, so a package that passes here fails neither ``dify plugin
package``, nor the upload, nor ``python -m main`` inside the daemon.

Sources of each rule: the daemon's struct tags and ``ManifestValidate`` (manifest), the
``credential_type``/``is_scope``/``is_basic_type`` tags (endpoint settings), the SDK's pydantic
models (string-typed fields, endpoint class loading), and the packager itself (ignore rules, zip
layout, size cap, checksum). ``build_package`` then writes the zip exactly as the packager does.
"""

from __future__ import annotations

import ast
import copy
import functools
import hashlib
import keyword
import os
import re
import stat
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import yaml
from packaging.version import InvalidVersion, Version
from werkzeug.routing import Map, Rule

from llamaindex_kb.errors import ConfigurationError

MAX_PACKAGE_SIZE = 52_428_800  # the packager's --max-size default and MAX_PLUGIN_PACKAGE_SIZE

# Go's regexp has ASCII-only \d and \w; re.ASCII keeps Python from accepting e.g. Arabic digits.
VERSION_RE = re.compile(r"^\d{1,4}(\.\d{1,4}){2}(-\w{1,16})?$", re.ASCII)
AUTHOR_RE = re.compile(r"^[a-z0-9_-]{1,64}$")
NAME_RE = re.compile(r"^[a-z0-9_-]{1,128}$")
IDENTITY_RE = re.compile(
    r"^(?:([a-z0-9_-]{1,64})\/)?([a-z0-9_-]{1,255}):([0-9]{1,4})(\.[0-9]{1,4}){1,3}(-\w{1,16})?"
    r"@[a-f0-9]{32,64}$",
    re.ASCII,
)
# time.Time.UnmarshalText (used by yaml.v3 for quoted timestamps) accepts RFC 3339 only.
_RFC3339_RE = re.compile(
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$", re.ASCII
)

I18N_LANGUAGES = ("en_US", "zh_Hans", "ja_JP", "pt_BR")
PLUGIN_TAGS = frozenset(
    "search image videos weather finance design travel social news medical productivity "
    "education business entertainment utilities agent rag other trigger".split()
)
ARCHES = frozenset({"amd64", "arm64"})
ENDPOINT_METHODS = frozenset({"HEAD", "GET", "POST", "PUT", "DELETE", "OPTIONS"})
SETTING_TYPES = frozenset(
    {
        "secret-input",
        "text-input",
        "select",
        "boolean",
        "app-selector",
        "model-selector",
        "array[tools]",
    }
)
# model-selector: the is_scope tag also allows document/tool-call, but ValidateProviderConfigs
# then rejects every value at endpoint creation, so only the intersection is usable.
SETTING_SCOPES = {
    "app-selector": frozenset({"all", "chat", "workflow", "completion"}),
    "model-selector": frozenset(
        {"llm", "text-embedding", "rerank", "tts", "speech2text", "moderation", "vision"}
    ),
}
# The `plugins` keys that ManifestValidate forbids next to `endpoints` (tools are allowed).
EXCLUSIVE_CATEGORIES = ("models", "agent_strategies", "datasources", "triggers")
PLUGIN_CATEGORIES = ("tools", "endpoints", *EXCLUSIVE_CATEGORIES)
PERMISSION_SECTIONS = ("tool", "model", "node", "endpoint", "app", "storage")
# session.model.<attr> -> the resource.permission.model flag the daemon checks for it.
MODEL_INVOCATIONS = {
    "llm": "llm",
    "llm_structured_output": "llm",
    "text_embedding": "text_embedding",
    "rerank": "rerank",
    "tts": "tts",
    "speech2text": "speech2text",
    "moderation": "moderation",
}
SCOPE_PERMISSIONS = {
    "llm": "llm",
    "text-embedding": "text_embedding",
    "rerank": "rerank",
    "tts": "tts",
    "speech2text": "speech2text",
    "moderation": "moderation",
}
# The daemon packages these only because the template .difyignore lists them; leaking them ships
# secrets (.env) or hundreds of MB (.venv).
FORBIDDEN_COMPONENTS = frozenset({".git", ".env", ".venv", "venv"})
_INT64_MAX = 2**63 - 1

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One rule broken by one file; ``field`` is a dotted path into the YAML, or ``(file)``."""

    file: str
    field: str
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        text = f"{self.file}: {self.field}: {self.message}"
        return text if self.severity == "error" else f"{text} [warning]"


class PackagingError(ConfigurationError):
    """The plugin cannot be packaged; ``problems`` lists every blocking rule at once."""

    def __init__(self, problems: list[Problem]) -> None:
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"the plugin cannot be packaged ({len(problems)} problems):\n{lines}")
        self.problems = problems


# --------------------------------------------------------------------------------------------
# Ignore rules
#
# A port of go-git's plumbing/format/gitignore/pattern.go (ParsePattern, simpleNameMatch,
# globMatch, and its port of git's wildmatch for one path segment), not pathspec: the daemon
# evaluates each pattern on its own and any Exclude wins, which differs from gitignore's
# last-match-wins that pathspec implements, and go-git's segment-wise matching has its own
# corner cases (e.g. a pattern without '/' matches any path component). Negated patterns are
# parsed by go-git but can only return Include, which the daemon's loop ignores, so they are
# dropped here.
# --------------------------------------------------------------------------------------------

_POSIX_CLASSES = {
    "alnum": r"0-9A-Za-z",
    "alpha": r"A-Za-z",
    "blank": r" \t",
    "cntrl": r"\x00-\x1f\x7f",
    "digit": r"0-9",
    "graph": r"\x21-\x7e",
    "lower": r"a-z",
    "print": r"\x20-\x7e",
    "punct": r"\x21-\x2f\x3a-\x40\x5b-\x60\x7b-\x7e",
    "space": r" \t\n\r\x0b\x0c",
    "upper": r"A-Z",
    "xdigit": r"0-9A-Fa-f",
}


def _char(ch: str) -> str:
    return f"\\U{ord(ch):08x}"  # safe both inside and outside a character class


def _bracket(glob: str, i: int) -> tuple[str, int] | None:
    """Translate the class starting after '[' at ``i``; None where wildmatch aborts."""
    n = len(glob)
    if i >= n:
        return None
    negated = glob[i] in "!^"
    if negated:
        i += 1
        if i >= n:
            return None
    items: list[str] = []
    prev: str | None = None  # wildmatch's prev_ch: the last literal, reset after a range/class
    ch = glob[i]
    while True:  # a do-while in wildmatch: the first member may be ']'
        if ch == "\\":
            i += 1
            if i >= n:
                return None
            prev = glob[i]
            items.append(_char(prev))
        elif ch == "-" and prev is not None and i + 1 < n and glob[i + 1] != "]":
            i += 1
            high = glob[i]
            if high == "\\":
                i += 1
                if i >= n:
                    return None
                high = glob[i]
            if prev <= high:
                items.append(f"{_char(prev)}-{_char(high)}")
            prev = None
        elif ch == "[" and i + 1 < n and glob[i + 1] == ":":
            start = i + 2
            end = glob.find("]", start)
            if end < 0:
                return None
            if end - start - 1 < 0 or glob[end - 1] != ":":
                prev = "["  # not a [:class:]; the '[' is a literal member
                items.append(_char(prev))
            else:
                posix = _POSIX_CLASSES.get(glob[start : end - 1])
                if posix is None:
                    return None
                items.append(posix)
                prev = None
                i = end
        else:
            prev = ch
            items.append(_char(ch))
        i += 1
        if i >= n:
            return None
        if glob[i] == "]":
            break
        ch = glob[i]
    return "[" + ("^" if negated else "") + "".join(items) + "]", i + 1


def _segment_matcher(glob: str) -> re.Pattern[str] | None:
    """wildmatch(glob, segment) with flags=0 as a regex; None if the glob can never match."""
    out: list[str] = []
    i, n = 0, len(glob)
    while i < n:
        ch = glob[i]
        if ch == "\\":
            if i + 1 >= n:
                return None
            out.append(_char(glob[i + 1]))
            i += 2
        elif ch == "*":
            while i < n and glob[i] == "*":
                i += 1
            out.append(".*")
        elif ch == "?":
            out.append(".")
            i += 1
        elif ch == "[":
            translated = _bracket(glob, i + 1)
            if translated is None:
                return None
            cls, i = translated
            out.append(cls)
        else:
            out.append(_char(ch))
            i += 1
    return re.compile("".join(out), re.DOTALL)


@dataclass(frozen=True)
class _Pattern:
    text: str
    segments: tuple[str, ...]
    matchers: tuple[re.Pattern[str] | None, ...]
    dir_only: bool
    is_glob: bool

    @classmethod
    def parse(cls, line: str) -> _Pattern:
        body = line
        if not body.endswith("\\ "):
            body = body.rstrip(" ")
        dir_only = body.endswith("/")
        if dir_only:
            body = body[:-1]
        segments = tuple(body.split("/"))
        return cls(
            text=line,
            segments=segments,
            matchers=tuple(_segment_matcher(s) for s in segments),
            dir_only=dir_only,
            is_glob="/" in body,
        )

    def _wild(self, index: int, name: str) -> bool:
        matcher = self.matchers[index]
        return matcher is not None and matcher.fullmatch(name) is not None

    def matches(self, parts: list[str], is_dir: bool) -> bool:
        if not self.is_glob:
            for i, name in enumerate(parts):
                if not self._wild(0, name):
                    continue
                return not (self.dir_only and not is_dir and i == len(parts) - 1)
            return False
        path = list(parts)
        matched = can_traverse = trailing_star = False
        last = len(self.segments) - 1
        for i, segment in enumerate(self.segments):
            if segment == "":
                can_traverse = False
                continue
            if segment == "**":
                if i == last:
                    matched = trailing_star = bool(path) or is_dir
                    break
                can_traverse = True
                continue
            if not path:
                return False
            if can_traverse:
                can_traverse = False
                while path:
                    head = path.pop(0)
                    if self._wild(i, head):
                        matched = True
                        break
                    if not path:
                        return False
            else:
                if not self._wild(i, path[0]):
                    return False
                matched = True
                path = path[1:]
                if not path and i < last:
                    matched = False
        if matched and (not path or trailing_star) and self.dir_only and not is_dir:
            return False
        return matched


@dataclass(frozen=True)
class IgnoreRules:
    """The root ignore file as the daemon reads it: .difyignore, else .gitignore, else nothing."""

    source: str | None
    patterns: tuple[_Pattern, ...]

    @classmethod
    def load(cls, root: Path) -> IgnoreRules:
        for name in (".difyignore", ".gitignore"):
            path = root / name
            if path.is_file():
                text = path.read_bytes().decode("utf-8", errors="replace")
                patterns = tuple(
                    _Pattern.parse(line)
                    for line in (raw.strip() for raw in text.split("\n"))
                    if line and not line.startswith("#") and not line.startswith("!")
                )
                return cls(source=name, patterns=patterns)
        return cls(source=None, patterns=())

    def excluded_by(self, parts: list[str], is_dir: bool) -> str | None:
        """The first pattern that excludes this exact entry (its parents are not consulted)."""
        for pattern in self.patterns:
            if pattern.matches(parts, is_dir):
                return pattern.text
        return None

    def why_excluded(self, rel: str) -> str | None:
        """Why a path is not packaged: the pattern hitting it or the first pruned parent."""
        parts = rel.split("/")
        for depth in range(1, len(parts) + 1):
            is_dir = depth < len(parts)
            pattern = self.excluded_by(parts[:depth], is_dir)
            if pattern is not None:
                prefix = "/".join(parts[:depth])
                where = "" if depth == len(parts) else f" (via its parent {prefix}/)"
                return f"{self.source} pattern {pattern!r}{where}"
        return None


def collect_files(root: Path) -> list[str]:
    """Every file the package will contain, as sorted '/'-separated paths relative to ``root``."""
    return _collect(root, IgnoreRules.load(root))


def _raise(error: OSError) -> None:
    raise error


def _collect(root: Path, rules: IgnoreRules) -> list[str]:
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
        rel_dir = Path(dirpath).relative_to(root).parts
        # Go's WalkDir reports a symlink to a directory as a non-directory entry and the packager
        # then fails to read it; treat it as a file so validation reports the same failure.
        linked = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        dirnames[:] = [
            name
            for name in dirnames
            if name not in linked and rules.excluded_by([*rel_dir, name], True) is None
        ]
        for name in [*filenames, *linked]:
            parts = [*rel_dir, name]
            if rules.excluded_by(parts, False) is None:
                files.append("/".join(parts))
    return sorted(files)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, plus the duplicate-key error yaml.v3 raises where PyYAML keeps the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key; construct_mapping reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def _one_of(value: Any, allowed: frozenset[str]) -> bool:
    """Membership that also survives YAML lists and mappings (unhashable) in scalar fields."""
    return isinstance(value, str) and value in allowed


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _valid_path(path: str) -> bool:
    """Go's fs.ValidPath, minus '.', plus no backslashes: what zip.Reader.Open can find."""
    if not path or "\\" in path:
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


def _is_uuid_like(value: str) -> bool:
    """What Go's uuid.Parse accepts: the daemon refuses such authors ("cannot set author...")."""
    hexdigits = set("0123456789abcdefABCDEF")
    if len(value) == 32:
        return set(value) <= hexdigits
    if len(value) == 45 and value[:9].lower() == "urn:uuid:":
        value = value[9:]
    elif len(value) == 38 and value[0] == "{" and value[-1] == "}":
        value = value[1:-1]
    if len(value) != 36:
        return False
    if any(value[i] != "-" for i in (8, 13, 18, 23)):
        return False
    return set(value.replace("-", "")) <= hexdigits


def _is_zero_time(moment: datetime) -> bool:
    offset = moment.utcoffset() or timedelta(0)
    try:
        return moment.replace(tzinfo=None) - offset == datetime(1, 1, 1)
    except OverflowError:  # before year 1 in UTC: a real, non-zero Go time
        return False


def _module_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements that bind module globals, including those under if/try/with."""
    for stmt in body:
        yield stmt
        if isinstance(stmt, ast.If):
            yield from _module_level(stmt.body)
            yield from _module_level(stmt.orelse)
        elif isinstance(stmt, ast.With):
            yield from _module_level(stmt.body)
        elif isinstance(stmt, ast.Try):
            yield from _module_level(stmt.body)
            yield from _module_level(stmt.orelse)
            yield from _module_level(stmt.finalbody)
            for handler in stmt.handlers:
                yield from _module_level(handler.body)


def _names_session(node: ast.expr) -> bool:
    """``session``, ``self.session``, ``self._session``: the SDK Session passed around."""
    if isinstance(node, ast.Name):
        return node.id.endswith("session")
    return isinstance(node, ast.Attribute) and node.attr.endswith("session")


# These caches are keyed by file content: a validation parses every packaged module and YAML
# file, and tests and repeated runs see the same unchanged files again and again.
@functools.lru_cache(maxsize=1024)
def _parse_python(source: bytes) -> ast.Module:
    return ast.parse(source)


@functools.lru_cache(maxsize=256)
def _parse_yaml(data: bytes) -> Any:
    # Pure-Python SafeLoader like the SDK's yaml.safe_load, not libyaml: same errors, same values.
    return yaml.load(data, Loader=_StrictLoader)


@functools.lru_cache(maxsize=1024)
def _session_invocations(source: bytes) -> tuple[tuple[str, int, str], ...]:
    """(permission flag, line, call) for each backwards invocation made through a Session."""
    found: list[tuple[str, int, str]] = []
    for node in ast.walk(_parse_python(source)):
        if not isinstance(node, ast.Attribute):
            continue
        if (
            node.attr in MODEL_INVOCATIONS
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "model"
            and _names_session(node.value.value)
        ):
            flag = f"model.{MODEL_INVOCATIONS[node.attr]}"
            found.append((flag, node.lineno, f"calls session.model.{node.attr}"))
        elif node.attr == "storage" and _names_session(node.value):
            found.append(("storage.enabled", node.lineno, "uses session.storage"))
    return tuple(found)


class _Validator:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.rules = IgnoreRules.load(root)
        self.files = _collect(root, self.rules)
        self.packaged = set(self.files)
        self.problems: list[Problem] = []
        self._sources: dict[str, bytes | None] = {}  # None: unreadable or not Python
        self._routes: dict[tuple[str, str], str] = {}
        self._model_selectors: list[tuple[str, str, str]] = []  # (file, field, scope)

    # -- reporting and primitive checks ------------------------------------------------------

    def add(self, file: str, field: str, message: str, severity: Severity = "error") -> None:
        self.problems.append(Problem(file, field, message, severity))

    def string(
        self, file: str, field: str, value: Any, *, max_len: int, required: bool = True
    ) -> str | None:
        """A non-empty str of at most ``max_len`` characters (the SDK rejects non-strings)."""
        if value is None:
            if required:
                self.add(file, field, "is required")
            return None
        if not isinstance(value, str):
            self.add(
                file, field, f"must be a string; quote it (got {value!r}, a {_type_name(value)})"
            )
            return None
        if not value:
            self.add(file, field, "must not be empty")
            return None
        if len(value) > max_len:
            self.add(file, field, f"must be at most {max_len} characters (got {len(value)})")
            return None
        return value

    def pattern(self, file: str, field: str, value: Any, regex: re.Pattern[str]) -> str | None:
        if value is None:
            self.add(file, field, f"is required and must match {regex.pattern}")
            return None
        if not isinstance(value, str) or regex.fullmatch(value) is None:
            self.add(file, field, f"must match {regex.pattern} (got {value!r})")
            return None
        return value

    def mapping(self, file: str, field: str, value: Any, *, required: bool) -> dict[str, Any]:
        if value is None:
            if required:
                self.add(file, field, "is required")
            return {}
        if not isinstance(value, dict):
            self.add(file, field, f"must be a mapping (got {_type_name(value)})")
            return {}
        return value

    def listing(self, file: str, field: str, value: Any) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.add(file, field, f"must be a list (got {_type_name(value)})")
            return []
        return value

    def boolean(self, file: str, field: str, value: Any) -> None:
        if value is not None and not isinstance(value, bool):
            self.add(file, field, f"must be true or false (got {value!r})")

    def i18n(self, file: str, field: str, value: Any, *, required: bool) -> None:
        if value is None:
            if required:
                self.add(file, field, "is required: a mapping with at least en_US")
            return
        if not isinstance(value, dict):
            self.add(
                file,
                field,
                f"must be a mapping of language to text, with at least en_US "
                f"(got {_type_name(value)})",
            )
            return
        for language in I18N_LANGUAGES:
            text = value.get(language)
            if text is None and language != "en_US":
                continue
            self.string(file, f"{field}.{language}", text, max_len=1023)
        for key in value:
            if key not in I18N_LANGUAGES:
                self.add(
                    file,
                    f"{field}.{key}",
                    f"unknown language key, ignored by Dify (known: {', '.join(I18N_LANGUAGES)})",
                    "warning",
                )

    def reference(
        self, file: str, field: str, value: Any, *, max_len: int | None = None, suffix: str = ""
    ) -> str | None:
        """A root-relative path that the installed package can open: valid, present, packaged."""
        if not isinstance(value, str) or not value:
            self.add(file, field, f"must be a non-empty path string (got {value!r})")
            return None
        if max_len is not None and len(value) > max_len:
            self.add(file, field, f"must be at most {max_len} characters (got {len(value)})")
            return None
        if not _valid_path(value):
            self.add(
                file,
                field,
                "must be a plain relative path with '/' separators: no leading "
                f"'/', no './', no '..', no empty segments (got {value!r})",
            )
            return None
        if suffix and not value.endswith(suffix):
            self.add(file, field, f"must name a {suffix} file (got {value!r})")
            return None
        return self.packaged_file(file, field, value)

    def packaged_file(self, file: str, field: str, rel: str) -> str | None:
        if not (self.root / rel).is_file():
            self.add(file, field, f"{rel!r} does not exist")
            return None
        if rel not in self.packaged:
            reason = self.rules.why_excluded(rel) or "the ignore rules"
            self.add(file, field, f"{rel!r} is left out of the package by {reason}")
            return None
        return rel

    def load_yaml(self, rel: str) -> dict[str, Any] | None:
        try:
            data = copy.deepcopy(_parse_yaml((self.root / rel).read_bytes()))  # cache stays intact
        except OSError as exc:
            self.add(rel, "(file)", f"cannot be read: {exc.strerror or exc}")
            return None
        except yaml.YAMLError as exc:
            self.add(rel, "(yaml)", f"is not valid YAML: {' '.join(str(exc).split())}")
            return None
        if not isinstance(data, dict):
            self.add(rel, "(yaml)", f"must be a YAML mapping (got {_type_name(data)})")
            return None
        return data

    def source(self, rel: str) -> bytes | None:
        """The module's source if it compiles; otherwise None, after reporting it once."""
        if rel not in self._sources:
            self._sources[rel] = None
            try:
                source = (self.root / rel).read_bytes()
                _parse_python(source)
            except OSError as exc:
                self.add(rel, "(python)", f"cannot be read: {exc.strerror or exc}")
            except SyntaxError as exc:
                self.add(rel, "(python)", f"does not compile: {exc.msg} (line {exc.lineno})")
            except ValueError as exc:  # e.g. null bytes
                self.add(rel, "(python)", f"does not compile: {exc}")
            else:
                self._sources[rel] = source
        return self._sources[rel]

    # -- manifest ------------------------------------------------------------------------------

    def run(self) -> list[Problem]:
        manifest = None
        if self.packaged_file("manifest.yaml", "(file)", "manifest.yaml"):
            manifest = self.load_yaml("manifest.yaml")
        if manifest is not None:
            self.check_root(manifest)
            permission = self.check_resource(manifest)
            checked: set[str] = set()
            for index, group in self.check_plugins(manifest):
                if group not in checked:
                    checked.add(group)
                    self.check_group(group, f"plugins.endpoints[{index}]")
            self.check_meta(manifest)
            self.check_permissions_used(permission)
        self.check_package()
        return self.problems

    def check_root(self, m: dict[str, Any]) -> None:
        f = "manifest.yaml"
        if m.get("type") != "plugin":
            self.add(f, "type", f"must be 'plugin' (got {m.get('type')!r})")
        self.pattern(f, "version", m.get("version"), VERSION_RE)
        author = self.pattern(f, "author", m.get("author"), AUTHOR_RE)
        if author is not None and _is_uuid_like(author):
            self.add(
                f, "author", f"must not look like a UUID: the daemon refuses it (got {author!r})"
            )
        self.pattern(f, "name", m.get("name"), NAME_RE)
        self.i18n(f, "label", m.get("label"), required=True)
        self.i18n(f, "description", m.get("description"), required=True)
        for key, required in (("icon", True), ("icon_dark", False)):
            icon = self.string(f, key, m.get(key), max_len=128, required=required)
            if icon is not None:
                self.reference(f, key, f"_assets/{icon}")
        self.check_created_at(m.get("created_at"))
        repo = m.get("repo")
        if repo is not None:
            parsed = urlparse(repo) if isinstance(repo, str) else None
            if parsed is None or not parsed.scheme or not (parsed.netloc or parsed.path):
                self.add(
                    f, "repo", f"must be a URL such as https://github.com/org/repo (got {repo!r})"
                )
        for index, tag in enumerate(self.listing(f, "tags", m.get("tags"))):
            if not _one_of(tag, PLUGIN_TAGS):
                self.add(
                    f,
                    f"tags[{index}]",
                    f"must be one of {', '.join(sorted(PLUGIN_TAGS))} (got {tag!r})",
                )
        privacy = m.get("privacy")
        if privacy is not None and (not isinstance(privacy, str) or privacy not in self.packaged):
            self.add(
                f,
                "privacy",
                f"should name a packaged file; the Marketplace shows it (got {privacy!r})",
                "warning",
            )

    def check_created_at(self, value: Any) -> None:
        f, field = "manifest.yaml", "created_at"
        expected = "must be an RFC 3339 timestamp such as 2026-01-31T12:00:00Z"
        if value is None:
            self.add(f, field, f"is required and {expected}")
            return
        # PyYAML turns an unquoted timestamp into datetime/date, as yaml.v3 does into time.Time.
        if isinstance(value, str):
            if _RFC3339_RE.fullmatch(value) is None:
                self.add(f, field, f"{expected} (got {value!r})")
                return
            try:
                value = datetime.fromisoformat(value)
            except ValueError as exc:
                self.add(f, field, f"{expected} (got {value!r}: {exc})")
                return
        if isinstance(value, datetime):
            if _is_zero_time(value):
                self.add(f, field, f"must not be the zero time (got {value.isoformat()})")
        elif isinstance(value, date):
            if value == date(1, 1, 1):
                self.add(f, field, f"must not be the zero time (got {value.isoformat()})")
        else:
            self.add(f, field, f"{expected} (got {value!r})")

    def check_resource(self, m: dict[str, Any]) -> dict[str, Any]:
        f = "manifest.yaml"
        resource = self.mapping(f, "resource", m.get("resource"), required=True)
        memory = resource.get("memory")
        if not isinstance(memory, int) or isinstance(memory, bool) or not 0 < memory <= _INT64_MAX:
            self.add(
                f, "resource.memory", f"must be a positive integer number of bytes (got {memory!r})"
            )
        permission = self.mapping(
            f, "resource.permission", resource.get("permission"), required=False
        )
        for section in PERMISSION_SECTIONS:
            block = self.mapping(
                f, f"resource.permission.{section}", permission.get(section), required=False
            )
            for flag, value in block.items():
                if flag != "size":
                    self.boolean(f, f"resource.permission.{section}.{flag}", value)
        storage = permission.get("storage")
        if isinstance(storage, dict):
            size = storage.get("size")
            if (
                not isinstance(size, int)
                or isinstance(size, bool)
                or not 1024 <= size <= 1_073_741_824
            ):
                self.add(
                    f,
                    "resource.permission.storage.size",
                    f"must be an integer from 1024 to 1073741824 bytes when storage is "
                    f"declared (got {size!r})",
                )
        endpoint = permission.get("endpoint")
        if not isinstance(endpoint, dict) or endpoint.get("enabled") is not True:
            self.add(
                f,
                "resource.permission.endpoint.enabled",
                "must be true: otherwise Dify refuses to create the endpoint ('permission "
                "denied, you need to enable endpoint access in plugin manifest')",
            )
        return permission

    def check_plugins(self, m: dict[str, Any]) -> list[tuple[int, str]]:
        """Check ``plugins``; return the endpoint group files that can be read."""
        f = "manifest.yaml"
        plugins = self.mapping(f, "plugins", m.get("plugins"), required=True)
        groups: list[tuple[int, str]] = []
        for category in PLUGIN_CATEGORIES:
            entries = self.listing(f, f"plugins.{category}", plugins.get(category))
            for index, entry in enumerate(entries):
                rel = self.reference(f, f"plugins.{category}[{index}]", entry, max_len=128)
                if rel is not None and category == "endpoints":
                    groups.append((index, rel))
            if entries and category in EXCLUSIVE_CATEGORIES:
                self.add(
                    f,
                    f"plugins.{category}",
                    "cannot be declared together with endpoints: "
                    "the daemon allows only tools next to them",
                )
        declared = plugins.get("endpoints")
        if not declared:
            self.add(
                f, "plugins.endpoints", "must list the endpoint group file of this endpoint plugin"
            )
        elif isinstance(declared, list) and len(declared) > 1:
            self.add(
                f,
                "plugins.endpoints",
                f"declares {len(declared)} groups: install keeps "
                "the last and remote debugging the first; declare "
                "one",
                "warning",
            )
        return groups

    def check_meta(self, m: dict[str, Any]) -> None:
        f = "manifest.yaml"
        meta = self.mapping(f, "meta", m.get("meta"), required=True)
        self.pattern(f, "meta.version", meta.get("version"), VERSION_RE)
        arch = meta.get("arch")
        if not isinstance(arch, list) or not arch:
            self.add(
                f,
                "meta.arch",
                f"must be a non-empty list of {', '.join(sorted(ARCHES))} (got {arch!r})",
            )
        else:
            for index, value in enumerate(arch):
                if not _one_of(value, ARCHES):
                    self.add(f, f"meta.arch[{index}]", f"must be amd64 or arm64 (got {value!r})")
        runner = self.mapping(f, "meta.runner", meta.get("runner"), required=True)
        if runner.get("language") != "python":
            self.add(
                f, "meta.runner.language", f"must be 'python' (got {runner.get('language')!r})"
            )
        self.string(f, "meta.runner.version", runner.get("version"), max_len=128)
        entrypoint = self.string(f, "meta.runner.entrypoint", runner.get("entrypoint"), max_len=256)
        if entrypoint is not None:
            if all(part.isidentifier() for part in entrypoint.split(".")):
                # the daemon runs `python -m <entrypoint>` from the plugin root
                self.packaged_file(
                    f, "meta.runner.entrypoint", entrypoint.replace(".", "/") + ".py"
                )
            else:
                self.add(
                    f,
                    "meta.runner.entrypoint",
                    f"must be a module name for `python -m` (got {entrypoint!r})",
                )
        minimum = meta.get("minimum_dify_version")
        if minimum is not None:
            try:
                if not isinstance(minimum, str):
                    raise InvalidVersion
                Version(minimum)
            except InvalidVersion:
                self.add(
                    f,
                    "meta.minimum_dify_version",
                    f"must be a quoted PEP 440 version such as '1.0.0' (got {minimum!r})",
                )

    # -- endpoint group and endpoints ------------------------------------------------------------

    def check_group(self, rel: str, manifest_field: str) -> None:
        group = self.load_yaml(rel)
        if group is None:
            return
        names: set[str] = set()
        for index, setting in enumerate(self.listing(rel, "settings", group.get("settings"))):
            field = f"settings[{index}]"
            if not isinstance(setting, dict):
                self.add(rel, field, f"must be a mapping (got {_type_name(setting)})")
                continue
            name = self.string(rel, f"{field}.name", setting.get("name"), max_len=1023)
            if name is not None:
                if name in names:
                    self.add(rel, f"{field}.name", f"duplicates the setting name {name!r}")
                names.add(name)
            self.check_setting(rel, field, setting)
        endpoints = self.listing(rel, "endpoints", group.get("endpoints"))
        if not endpoints:
            self.add(
                rel,
                "endpoints",
                f"declares no endpoint, so {manifest_field} serves nothing",
                "warning",
            )
        for index, entry in enumerate(endpoints):
            field = f"endpoints[{index}]"
            if isinstance(entry, dict):
                self.check_endpoint(rel, f"{field}.", entry)
                continue
            endpoint_rel = self.reference(rel, field, entry)
            if endpoint_rel is not None:
                declaration = self.load_yaml(endpoint_rel)
                if declaration is not None:
                    self.check_endpoint(endpoint_rel, "", declaration)

    def check_setting(self, rel: str, field: str, setting: dict[str, Any]) -> None:
        kind = setting.get("type")
        if not _one_of(kind, SETTING_TYPES):
            self.add(
                rel,
                f"{field}.type",
                f"must be one of {', '.join(sorted(SETTING_TYPES))} (got {kind!r})",
            )
        self.i18n(rel, f"{field}.label", setting.get("label"), required=True)
        for key in ("help", "placeholder"):
            self.i18n(rel, f"{field}.{key}", setting.get(key), required=False)
        if setting.get("url") is not None and not isinstance(setting.get("url"), str):
            self.add(rel, f"{field}.url", f"must be a string (got {setting.get('url')!r})")
        for key in ("required", "multiple"):
            self.boolean(rel, f"{field}.{key}", setting.get(key))
        scope = setting.get("scope")
        if scope is not None:
            allowed = SETTING_SCOPES.get(kind) if isinstance(kind, str) else None
            if allowed is None:
                self.add(
                    rel,
                    f"{field}.scope",
                    "is only allowed on app-selector and "
                    f"model-selector settings (type is {kind!r})",
                )
            elif not isinstance(scope, str) or not all(
                part in allowed for part in scope.split("&")
            ):
                self.add(
                    rel,
                    f"{field}.scope",
                    f"must be one of {', '.join(sorted(allowed))}, "
                    f"optionally joined with '&' (got {scope!r})",
                )
            elif kind == "model-selector":
                self._model_selectors.append((rel, f"{field}.scope", scope))
        default = setting.get("default")
        if default is not None and not isinstance(default, str | int | float | bool):
            self.add(
                rel,
                f"{field}.default",
                f"must be a string, number or boolean (got {_type_name(default)})",
            )
        values = self.check_options(rel, field, setting.get("options"))
        if kind == "select":
            if not values:
                self.add(
                    rel,
                    f"{field}.options",
                    "a select setting needs options: every value is checked against them",
                )
            elif default is not None and not _one_of(default, frozenset(values)):
                self.add(
                    rel,
                    f"{field}.default",
                    f"must be one of the option values {sorted(values)} (got {default!r})",
                )

    def check_options(self, rel: str, field: str, options: Any) -> set[str]:
        values: set[str] = set()
        entries = self.listing(rel, f"{field}.options", options)
        if len(entries) >= 128:
            self.add(
                rel, f"{field}.options", f"must have fewer than 128 entries (got {len(entries)})"
            )
        for index, option in enumerate(entries):
            option_field = f"{field}.options[{index}]"
            if not isinstance(option, dict):
                self.add(
                    rel,
                    option_field,
                    f"must be a mapping with value and label (got {_type_name(option)})",
                )
                continue
            value = self.string(rel, f"{option_field}.value", option.get("value"), max_len=127)
            if value is not None:
                values.add(value)
            self.i18n(rel, f"{option_field}.label", option.get("label"), required=True)
        return values

    def check_endpoint(self, rel: str, prefix: str, declaration: dict[str, Any]) -> None:
        path = declaration.get("path")
        method = declaration.get("method")
        if not isinstance(path, str) or not path.startswith("/"):
            self.add(rel, f"{prefix}path", f"must be a URL rule starting with '/' (got {path!r})")
            path = None
        if not _one_of(method, ENDPOINT_METHODS):
            self.add(
                rel,
                f"{prefix}method",
                f"must be one of {', '.join(sorted(ENDPOINT_METHODS))}"
                f" in upper case (got {method!r})",
            )
            method = None
        if path is not None:
            try:
                # The SDK routes requests through exactly this werkzeug Map.
                Map([Rule(path, methods=[method or "GET"])])
            except (ValueError, LookupError, SyntaxError) as exc:
                self.add(rel, f"{prefix}path", f"is not a valid werkzeug URL rule: {exc}")
            else:
                if method is not None:
                    where = f"{rel} {prefix.rstrip('.')}".rstrip()
                    earlier = self._routes.setdefault((method, path), where)
                    if earlier != where:
                        self.add(
                            rel,
                            f"{prefix}path",
                            f"{method} {path} is already declared in "
                            f"{earlier}; only the first is reachable",
                        )
        self.boolean(rel, f"{prefix}hidden", declaration.get("hidden"))
        extra = self.mapping(rel, f"{prefix}extra", declaration.get("extra"), required=True)
        python = self.mapping(rel, f"{prefix}extra.python", extra.get("python"), required=True)
        field = f"{prefix}extra.python.source"
        source = self.reference(rel, field, python.get("source"), suffix=".py")
        if source is not None:
            self.check_endpoint_source(rel, field, source)

    def check_endpoint_source(self, rel: str, field: str, source: str) -> None:
        module = Path(source).with_suffix("").parts
        if not all(part.isidentifier() and not keyword.iskeyword(part) for part in module):
            self.add(
                rel,
                field,
                f"{source!r} becomes the module {'.'.join(module)!r}; use identifier-safe names",
                "warning",
            )
        found = self.endpoint_classes(source, follow_imports=True)
        if found is None:
            return
        if len(found) != 1:
            listed = f" ({', '.join(found)})" if found else ""
            self.add(
                rel,
                field,
                f"{source} exposes {len(found)} subclasses of dify_plugin's "
                f"Endpoint{listed}; the SDK requires exactly one in the module "
                "namespace (import shared code as a module or use a mixin)",
            )

    def endpoint_classes(self, rel: str, *, follow_imports: bool) -> list[str] | None:
        """Module-level names bound to an Endpoint subclass, found statically.

        Counts class definitions whose bases name ``Endpoint`` (or an earlier such class), plain
        aliases of them, and, one level deep, names imported from another packaged module of
        the plugin that defines them there: the SDK counts every one of these.
        """
        source = self.source(rel)
        if source is None:
            return None
        subclasses = {"Endpoint"}
        found: list[str] = []
        for stmt in _module_level(_parse_python(source).body):
            if isinstance(stmt, ast.ImportFrom) and follow_imports:
                imported = self.imported_endpoints(rel, stmt)
                subclasses.update(imported)
                found.extend(imported)
            elif isinstance(stmt, ast.ClassDef) and any(
                (isinstance(base, ast.Name) and base.id in subclasses)
                or (isinstance(base, ast.Attribute) and base.attr == "Endpoint")
                for base in stmt.bases
            ):
                subclasses.add(stmt.name)
                found.append(stmt.name)
            elif (
                isinstance(stmt, ast.Assign)
                and isinstance(stmt.value, ast.Name)
                and stmt.value.id in subclasses - {"Endpoint"}
            ):
                for target in stmt.targets:
                    if isinstance(target, ast.Name):
                        subclasses.add(target.id)
                        found.append(target.id)
        return found

    def imported_endpoints(self, rel: str, stmt: ast.ImportFrom) -> list[str]:
        package = list(Path(rel).parent.parts)
        if stmt.level:
            if stmt.level - 1 > len(package):
                return []
            package = package[: len(package) - (stmt.level - 1)]
        else:
            package = []
        parts = [*package, *(stmt.module.split(".") if stmt.module else [])]
        base = "/".join(parts)
        for candidate in (f"{base}.py", f"{base}/__init__.py"):
            if candidate in self.packaged and candidate != rel:
                defined = self.endpoint_classes(candidate, follow_imports=False) or []
                imported: list[str] = []
                for alias in stmt.names:
                    if alias.name == "*":
                        imported.extend(name for name in defined if not name.startswith("_"))
                    elif alias.name in defined:
                        imported.append(alias.asname or alias.name)
                return imported
        return []

    # -- permissions the code needs --------------------------------------------------------------

    def check_permissions_used(self, permission: dict[str, Any]) -> None:
        """Backwards invocations the code makes must be enabled, or the daemon denies them."""
        needs: dict[str, tuple[str, Severity]] = {}  # flag -> (reason, severity)
        for rel in self.files:
            source = self.source(rel) if rel.endswith(".py") else None
            if source is not None:
                for flag, line, call in _session_invocations(source):
                    needs.setdefault(flag, (f"{rel}:{line} {call}", "error"))
        for rel, field, scope in self._model_selectors:
            for part in scope.split("&"):
                if part in SCOPE_PERMISSIONS:
                    needs.setdefault(
                        f"model.{SCOPE_PERMISSIONS[part]}",
                        (f"{rel} {field} selects a {part} model", "warning"),
                    )
        for flag, (reason, severity) in sorted(needs.items()):
            section, key = flag.split(".")
            block = permission.get(section)
            block = block if isinstance(block, dict) else {}
            missing = [k for k in dict.fromkeys(("enabled", key)) if block.get(k) is not True]
            for k in missing:
                self.add(
                    "manifest.yaml",
                    f"resource.permission.{section}.{k}",
                    f"must be true because {reason}; otherwise the daemon answers "
                    "'permission denied'",
                    severity,
                )

    # -- package ---------------------------------------------------------------------------------

    def check_package(self) -> None:
        assets = self.root / "_assets"
        if not assets.is_dir():
            self.add(
                "_assets",
                "(directory)",
                "must exist: the SDK scans it at start-up and the icon lives in it",
            )
        elif not any(rel.startswith("_assets/") for rel in self.files):
            reason = self.rules.why_excluded("_assets/icon.svg") or "it is empty"
            self.add("_assets", "(directory)", f"no file under it is packaged: {reason}")
        if not {"requirements.txt", "pyproject.toml"} & self.packaged:
            self.add(
                "requirements.txt",
                "(file)",
                "neither requirements.txt nor pyproject.toml "
                "is packaged, so the daemon cannot install "
                "the plugin's dependencies",
            )
        if "README.md" not in self.packaged:
            self.add(
                "README.md",
                "(file)",
                "is recommended: Dify shows it as the plugin's readme",
                "warning",
            )
        leaked: dict[str, None] = {}
        for rel in self.files:
            parts = rel.split("/")
            for depth, part in enumerate(parts, start=1):
                if part in FORBIDDEN_COMPONENTS:
                    leaked["/".join(parts[:depth])] = None
                    break
        for rel in leaked:
            self.add(
                rel,
                "(file)",
                f"must not be packaged (secrets or local environment); add "
                f"it to {self.rules.source or '.difyignore'}",
            )
        self.check_size()

    def check_size(self) -> None:
        sizes: list[tuple[int, str]] = []
        for rel in self.files:
            try:
                status = (self.root / rel).stat()
            except OSError as exc:
                self.add(rel, "(file)", f"cannot be read: {exc.strerror or exc}")
                continue
            if stat.S_ISDIR(status.st_mode):
                self.add(
                    rel,
                    "(file)",
                    "is a symlink to a directory, which the daemon's packager cannot read",
                )
            else:
                sizes.append((status.st_size, rel))
        total = sum(size for size, _ in sizes)
        if total > MAX_PACKAGE_SIZE:
            self.add("(package)", "size", _size_message(total, sizes))


def _size_message(total: int, sizes: list[tuple[int, str]]) -> str:
    biggest = sorted(sizes, key=lambda item: (-item[0], item[1]))[:5]
    listing = "; ".join(
        f"{i}. {rel} ({size} bytes)" for i, (size, rel) in enumerate(biggest, start=1)
    )
    return (
        f"the uncompressed size {total} bytes exceeds {MAX_PACKAGE_SIZE}; biggest files: {listing}"
    )


def validate_plugin(root: Path) -> list[Problem]:
    """Every broken package-time, install-time, remote-debug or SDK start-up rule under ``root``.

    Warnings (``severity == "warning"``) are advice and do not block ``build_package``.
    """
    return _Validator(root).run()


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def package_checksum(zip_path: Path) -> str:
    """The daemon's ``CalculateChecksum``: sha256 over sorted (sha256(path) + sha256(content))."""
    digests: dict[str, bytes] = {}
    with zipfile.ZipFile(zip_path) as archive:
        for info in archive.infolist():
            if not info.is_dir():
                digests[info.filename] = hashlib.sha256(archive.read(info)).digest()
    data = b"".join(
        hashlib.sha256(name.encode()).digest() + digests[name] for name in sorted(digests)
    )
    return hashlib.sha256(data).hexdigest()


def package_identity(zip_path: Path) -> str:
    """``author/name:version@checksum``, the plugin's unique identifier once uploaded."""
    with zipfile.ZipFile(zip_path) as archive:
        manifest = yaml.safe_load(archive.read("manifest.yaml"))
    return (
        f"{manifest['author']}/{manifest['name']}:{manifest['version']}"
        f"@{package_checksum(zip_path)}"
    )


@dataclass(frozen=True)
class _BuildResult:
    path: Path
    size: int
    identity: str
    warnings: list[Problem]


def _output_problems(root: Path, final: Path, rules: IgnoreRules) -> list[Problem]:
    try:
        rel = final.relative_to(root).as_posix()
    except ValueError:
        return []
    if rules.why_excluded(rel) is None:
        return [
            Problem(
                rules.source or ".difyignore",
                rel,
                "the package would be written inside the plugin without being ignored, "
                "so the next package would contain this one; ignore it (e.g. 'dist')",
            )
        ]
    return []


def _write_zip(root: Path, files: list[str], target: Path) -> None:
    total = 0
    sizes: list[tuple[int, str]] = []
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for rel in files:  # already sorted by path, as the daemon's packager sorts them
            content = (root / rel).read_bytes()
            sizes.append((len(content), rel))
            total += len(content)
            if total > MAX_PACKAGE_SIZE:  # a file grew since validation
                raise PackagingError([Problem("(package)", "size", _size_message(total, sizes))])
            # A fixed timestamp makes builds of the same tree byte-identical.
            info = zipfile.ZipInfo(rel, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, content)


def _build(root: Path, out_dir: Path) -> _BuildResult:
    root = root.resolve()
    out_dir = out_dir.resolve()
    validator = _Validator(root)
    problems = validator.run()
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise PackagingError(errors)
    manifest = yaml.safe_load((root / "manifest.yaml").read_bytes())
    final = out_dir / f"{manifest['name']}-{manifest['version']}.difypkg"
    output_problems = _output_problems(root, final, validator.rules)
    if output_problems:
        raise PackagingError(output_problems)
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=out_dir)
    os.close(fd)
    temp = Path(temp_name)
    try:
        _write_zip(root, validator.files, temp)
        identity = package_identity(temp)
        if IDENTITY_RE.fullmatch(identity) is None:
            raise PackagingError(
                [
                    Problem(
                        "manifest.yaml",
                        "author, name, version",
                        f"the package identity {identity!r} does not match "
                        f"the daemon's {IDENTITY_RE.pattern}",
                    )
                ]
            )
        temp.chmod(0o644)  # mkstemp creates 0600
        os.replace(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    warnings = [p for p in problems if p.severity == "warning"]
    return _BuildResult(final, final.stat().st_size, identity, warnings)


def build_package(root: Path, out_dir: Path) -> Path:
    """Validate ``root`` and write ``out_dir/<name>-<version>.difypkg`` atomically.

    Raises PackagingError listing every blocking problem; nothing is written in that case.
    """
    return _build(root, out_dir).path


def main_package(root: Path, out_dir: Path) -> int:
    """``python -m llamaindex_kb package``: print the package or the problems; the exit code."""
    try:
        result = _build(root, out_dir)
    except PackagingError as exc:
        print(f"cannot package {root}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cannot package {root}: {exc}", file=sys.stderr)
        return 1
    for warning in result.warnings:
        print(f"  {warning}", file=sys.stderr)
    print(f"{result.path} ({result.size} bytes)")
    print(f"identity: {result.identity}")
    return 0


__all__ = [
    "MAX_PACKAGE_SIZE",
    "IDENTITY_RE",
    "IgnoreRules",
    "PackagingError",
    "Problem",
    "build_package",
    "collect_files",
    "main_package",
    "package_checksum",
    "package_identity",
    "validate_plugin",
]
