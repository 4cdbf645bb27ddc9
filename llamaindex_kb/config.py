"""One settings model for the plugin's settings form, CLI flags and environment variables.

``load_settings`` is the only way a ``Settings`` is built, so the three sources can
never disagree on names, defaults or validation. Precedence: explicit values (the
plugin form, or CLI flags) over environment variables over defaults.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from llamaindex_kb.errors import ConfigurationError
from llamaindex_kb.limits import DEFAULT_LIMITS, Limits

ENV_PREFIX = "LLAMAINDEX_KB_"

STANDALONE_DATA_DIR = Path("data")
PLUGIN_NAME = "llamaindex_kb"

# Defined here, the lowest module that needs them: settings take a mode, and the store
# contract (stores.base), ingestion, uploads and the CLI import them from here.
RetrievalMode = Literal["vector", "keyword", "hybrid"]
RETRIEVAL_MODES: tuple[RetrievalMode, ...] = ("hybrid", "vector", "keyword")
# The bundled embedding model a new knowledge base gets (models/bundled.py).
LocalModel = Literal["auto", "english", "multilingual"]
LOCAL_MODELS: tuple[LocalModel, ...] = ("auto", "english", "multilingual")


class Settings(BaseModel):
    """Everything the core needs to serve and build knowledge bases."""

    # A store URL may hold a password: keep it out of validation errors and repr().
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    api_key: SecretStr | None = None
    # A file holding the key (first line), so it appears in no process list or shell
    # history; read once by load_settings. An explicit api_key wins.
    api_key_file: Path | None = None
    data_dir: Path = STANDALONE_DATA_DIR
    # Where knowledge bases live (stores/registry.py): None means local://<data_dir>;
    # postgresql://user:password@host:5432/db shares them between processes.
    store: str | None = Field(default=None, repr=False)
    # A Qdrant server's API key (stores/qdrant.py), unless the store URL has ?api_key=.
    store_api_key: SecretStr | None = None
    demo: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)  # 0: any free port
    retrieval_mode: RetrievalMode | None = None
    semantic_weight: float | None = Field(default=None, ge=0.0, le=1.0)
    # Which models a request uses (models/choose.py): in the plugin, a Dify workspace
    # model; else an OpenAI-compatible embeddings server; else the bundled local model.
    # The plugin form's model-selector value: {"provider", "model", "model_type"}.
    embedding_model: dict[str, Any] | None = None
    # Text inputs, not a rerank model-selector: the daemon refuses to save a rerank
    # selector value without score_threshold and top_n, which Dify's form never adds.
    rerank_provider: str | None = None
    rerank_model: str | None = None
    embedding_base_url: str | None = None
    embedding_api_key: SecretStr | None = None
    embedding_model_name: str | None = None
    # When none of those is set: the bundled model for new knowledge bases. One built
    # with a bundled model keeps it, whatever this says later.
    local_model: LocalModel = "auto"
    # Request limits (limits.py); None keeps the default.
    max_body_bytes: int | None = None
    max_query_chars: int | None = None
    max_conditions: int | None = None
    max_condition_values: int | None = None
    max_upload_bytes: int | None = None
    max_inflated_bytes: int | None = None
    max_extracted_chars: int | None = None
    max_markup_depth: int | None = None
    max_chunks_per_document: int | None = None
    # The standalone server (server.py): threads that run requests, and how long a
    # client may hold a connection without sending, or take to send one request
    # (plus a second per 64 KiB of body, so a steady upload is never cut), in seconds.
    threads: int = Field(default=8, ge=1, le=256)
    connection_limit: int = Field(default=1000, ge=10)
    idle_timeout: int = Field(default=30, ge=1)
    request_timeout: int = Field(default=60, ge=1)
    # On SIGTERM or SIGINT: how long requests in flight may take to finish.
    shutdown_timeout: int = Field(default=20, ge=0)

    @property
    def limits(self) -> Limits:
        given = {name[len("max_"):]: getattr(self, name) for name in _LIMIT_FIELDS
                 if getattr(self, name) is not None}
        return Limits.model_validate(given) if given else DEFAULT_LIMITS

    @model_validator(mode="after")
    def _limits_in_range(self) -> Settings:
        try:
            self.limits  # noqa: B018  (validates the max_* values together)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ValueError(f"max_{first['loc'][0]}: {first['msg']}") from None
        return self

    @field_validator("retrieval_mode", mode="before")
    @classmethod
    def _as_built_means_unset(cls, value: object) -> object:
        return None if value == "as_built" else value

    @field_validator("store")
    @classmethod
    def _store_blank_means_default(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @field_validator("api_key")
    @classmethod
    def _key_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            return None
        return value


_LIMIT_FIELDS = tuple(f"max_{name}" for name in Limits.model_fields)


def _env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in Settings.model_fields:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = raw
    return values


def load_settings(
    explicit: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build settings from explicit values (form or flags) over ``LLAMAINDEX_KB_*`` variables.

    ``None`` and ``""`` in ``explicit`` mean "not given", as an empty optional field
    in Dify's settings form does.
    """
    values = _env_values(os.environ if environ is None else environ)
    given = {name: value for name, value in (explicit or {}).items()
             if value is not None and value != ""}
    # A key file counts as a key of its own source: --api-key-file beats an environment
    # key, an explicit --api-key beats both.
    if given.get("api_key_file") and not given.get("api_key"):
        values.pop("api_key", None)
    values.update(given)
    if values.get("api_key_file") and not values.get("api_key"):
        values["api_key"] = _read_key_file(Path(values["api_key_file"]))
    try:
        return Settings(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        if not field and first["type"] == "value_error":  # a check across fields
            raise ConfigurationError(f"setting {first['ctx']['error']}") from exc
        raise ConfigurationError(f"setting {field or 'settings'}: {first['msg']}") from exc


def _read_key_file(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a BOM is no part of a key
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(
            f"setting api_key_file: cannot read {str(path)!r} ({type(exc).__name__})") from exc
    key = lines[0].strip() if lines else ""
    if not key:
        raise ConfigurationError(f"setting api_key_file: {str(path)!r} is empty")
    return key


def default_plugin_data_dir(environ: Mapping[str, str]) -> Path:
    """Where the plugin keeps knowledge bases when the settings form leaves it empty.

    The daemon runs a plugin in ``$PLUGIN_WORKING_PATH/<author>/<name>-<version>@<hash>``
    and unpacks every upgrade into a new folder, so data kept there would be lost.
    ``PLUGIN_WORKING_PATH`` (default ``/app/storage/cwd``) sits on the daemon's
    storage volume (``./volumes/plugin_daemon`` in Dify's docker compose), so its
    sibling ``plugin_data/`` survives upgrades and restarts. Remote debugging runs
    outside that layout and falls back to the user's data directory.
    """
    working = Path(environ.get("PLUGIN_WORKING_PATH") or "/app/storage/cwd")
    if working.is_dir() and os.access(working.parent, os.W_OK):
        return working.parent / "plugin_data" / PLUGIN_NAME
    data_home = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / PLUGIN_NAME


def _names_code(store: object) -> bool:
    """Whether a store URL is python://module:factory (stores/llamaindex/factory.py)."""
    if not isinstance(store, str):
        return False
    try:
        return urlsplit(store).scheme.lower() == "python"
    except ValueError:  # not a URL at all: the store registry says what is wrong
        return False


def plugin_settings(form: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the plugin's settings form; only the data-dir default reads the env."""
    known = {name: form.get(name) for name in Settings.model_fields if name in form}
    # The form says store_url: "store" alone reads ambiguously in Dify's settings dialog.
    if form.get("store_url"):
        known["store"] = form["store_url"]
    if _names_code(known.get("store")):
        raise ConfigurationError(
            "setting store_url: python:// names Python code to import and run, so it is "
            "for the standalone server and the CLI only: a store URL in a settings form "
            "must never run code")
    if not known.get("data_dir"):
        known["data_dir"] = default_plugin_data_dir(os.environ if environ is None else environ)
    return load_settings(known, environ={})
