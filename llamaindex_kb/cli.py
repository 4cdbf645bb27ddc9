"""``python -m llamaindex_kb``: serve, ingest, list, package, bench. A thin layer over the core.

Every serve/ingest flag also reads ``LLAMAINDEX_KB_<FLAG>`` from the environment
(see ``config.load_settings``); flags win.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from llamaindex_kb.config import LOCAL_MODELS, RETRIEVAL_MODES, Settings, load_settings
from llamaindex_kb.errors import ConfigurationError, KBError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", dest="data_dir", help="knowledge base folder [./data]")
    parser.add_argument("--store", dest="store", metavar="URL",
                        help="where knowledge bases live: local:///path or "
                             "postgresql://user:password@host:5432/db [local://<data dir>]")
    parser.add_argument("--embedding-base-url", dest="embedding_base_url",
                        help="OpenAI-compatible embeddings server, e.g. http://localhost:11434/v1 "
                             "[the bundled local model]")
    parser.add_argument("--embedding-model-name", dest="embedding_model_name",
                        help="model name on that server")
    parser.add_argument("--embedding-api-key", dest="embedding_api_key",
                        help="API key for that server")
    parser.add_argument("--local-model", dest="local_model", choices=LOCAL_MODELS,
                        help="without an embeddings server: the bundled model for new knowledge "
                             "bases; auto picks multilingual for mostly Chinese/Japanese/Korean "
                             "documents [auto]")


def _server_flags(parser: argparse.ArgumentParser) -> None:
    def default(name: str) -> object:
        return Settings.model_fields[name].default

    parser.add_argument("--threads", type=int,
                        help=f"threads that run requests [{default('threads')}]")
    parser.add_argument("--connection-limit", dest="connection_limit", type=int,
                        help="open connections at most; more wait to be accepted "
                             f"[{default('connection_limit')}]")
    parser.add_argument("--idle-timeout", dest="idle_timeout", type=int, metavar="SECONDS",
                        help="close a connection that sends nothing for this long "
                             f"[{default('idle_timeout')}]")
    parser.add_argument("--request-timeout", dest="request_timeout", type=int, metavar="SECONDS",
                        help="disconnect a client that takes longer to send a request, plus "
                             f"1 s per 64 KiB of body [{default('request_timeout')}]")
    parser.add_argument("--shutdown-timeout", dest="shutdown_timeout", type=int,
                        metavar="SECONDS", help="on SIGTERM or SIGINT, wait this long for "
                        f"requests in flight [{default('shutdown_timeout')}]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llamaindex_kb", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the External Knowledge API server")
    _settings_flags(serve)
    serve.add_argument("--host", help="address to bind [127.0.0.1]")
    serve.add_argument("--port", type=int, help="port to bind [8000]")
    serve.add_argument("--api-key", dest="api_key",
                       help="the Bearer key clients must send (visible in the process list: "
                            "prefer --api-key-file or LLAMAINDEX_KB_API_KEY)")
    serve.add_argument("--api-key-file", dest="api_key_file", type=Path, metavar="FILE",
                       help="read the Bearer key from the first line of FILE")
    serve.add_argument(
        "--demo", action="store_true", default=None, help="serve the demo knowledge base as 'demo'"
    )
    serve.add_argument("--retrieval-mode", dest="retrieval_mode",
                       choices=RETRIEVAL_MODES,
                       help="override the mode each knowledge base was built with")
    serve.add_argument("--semantic-weight", dest="semantic_weight", type=float,
                       help="hybrid weight of the semantic score, 0..1 [as built, 0.7]")
    _server_flags(serve)

    ingest = commands.add_parser(
        "ingest", help="add files and folders to a knowledge base (only what changed)")
    _settings_flags(ingest)
    ingest.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    ingest.add_argument("--kb", required=True, help="knowledge_id of the knowledge base")
    ingest.add_argument("--sync", action="store_true",
                        help="also remove documents whose files disappeared from PATH")
    ingest.add_argument("--mode", choices=RETRIEVAL_MODES, default="hybrid",
                        help="retrieval mode recorded for a new knowledge base [hybrid]")
    ingest.add_argument("--semantic-weight", dest="semantic_weight", type=float, default=0.7,
                        help="hybrid weight recorded for a new knowledge base [0.7]")
    ingest.add_argument("--chunking", type=_json_argument, metavar="JSON",
                        help='chunking for a new knowledge base, e.g. \'{"mode": "parent_child"}\' '
                             "(see README, Chunking)")
    ingest.add_argument("--no-progress", action="store_true", help="no progress bar")

    listing = commands.add_parser("list", help="list knowledge bases, or one's documents")
    _settings_flags(listing)
    listing.add_argument("--kb", help="list this knowledge base's documents")

    delete = commands.add_parser("delete", help="delete a document from a knowledge base")
    _settings_flags(delete)
    delete.add_argument("--kb", required=True)
    delete.add_argument("document_id")

    drop = commands.add_parser("drop", help="delete a whole knowledge base")
    _settings_flags(drop)
    drop.add_argument("--kb", required=True)

    keys = commands.add_parser(
        "keys", help="named API keys for apps: read-only, or limited to knowledge bases")
    key_commands = keys.add_subparsers(dest="action", required=True)
    create_key = key_commands.add_parser("create", help="make a key; its secret is shown once")
    _settings_flags(create_key)
    create_key.add_argument("name")
    create_key.add_argument("--kb", action="append", dest="knowledge_ids", metavar="ID",
                            help="limit the key to this knowledge base or view (repeat for "
                                 "more) [all of them]")
    create_key.add_argument("--read-only", action="store_true",
                            help="the key can retrieve and list, not add or delete documents")
    list_keys = key_commands.add_parser("list", help="name, scope, creation and last use")
    _settings_flags(list_keys)
    revoke_key = key_commands.add_parser("revoke", help="the key stops working at once")
    _settings_flags(revoke_key)
    revoke_key.add_argument("name")

    views = commands.add_parser(
        "views", help="knowledge ids that read a knowledge base through a filter")
    view_commands = views.add_subparsers(dest="action", required=True)
    create_view = view_commands.add_parser("create", help="make a view")
    _settings_flags(create_view)
    create_view.add_argument("name", help="the view's knowledge_id")
    create_view.add_argument("--kb", required=True, dest="knowledge_base",
                             help="the knowledge base it reads")
    create_view.add_argument("--filter", type=_json_argument, metavar="JSON",
                             help="a metadata_condition in Dify's format, e.g. "
                                  '\'{"logical_operator": "and", "conditions": [{"name": '
                                  '"team", "comparison_operator": "is", "value": "hr"}]}\'')
    create_view.add_argument("--mode", choices=RETRIEVAL_MODES,
                             help="retrieval mode [the knowledge base's]")
    create_view.add_argument("--semantic-weight", dest="view_weight", type=float, metavar="W",
                             help="hybrid weight of the semantic score, 0..1 [the base's]")
    create_view.add_argument("--top-k-max", type=int, help="cap on a request's top_k")
    list_views = view_commands.add_parser("list", help="every view and what it reads")
    _settings_flags(list_views)
    delete_view = view_commands.add_parser("delete", help="delete a view (not its base)")
    _settings_flags(delete_view)
    delete_view.add_argument("name")

    package = commands.add_parser("package", help="build dist/<name>-<version>.difypkg")
    package.add_argument("--out", type=Path, default=PROJECT_ROOT / "dist")

    commands.add_parser("bench", add_help=False,
                        help="retrieval quality and latency benchmark (bench --help)")
    return parser


def _json_argument(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None


def _explicit(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (argparse leaves the others None)."""
    return {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command != "bench" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return _run(args)
    except KBError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        from llamaindex_kb.server import serve

        settings = load_settings(_explicit(args))
        if settings.api_key is None:
            print("error: an API key is required: --api-key-file FILE, LLAMAINDEX_KB_API_KEY "
                  "or --api-key KEY",
                  file=sys.stderr)
            return 2
        serve(settings)
        return 0
    if args.command == "ingest":
        return _ingest(args)
    if args.command == "list":
        return _list(args)
    if args.command == "delete":
        from llamaindex_kb.ingestion.pipeline import delete_document
        from llamaindex_kb.stores.registry import store_for

        settings = load_settings(_explicit(args))
        info = delete_document(store_for(settings), args.kb, args.document_id)
        print(f"deleted {info.document_id} ({info.file_path or info.title}, {info.chunks} chunks)")
        return 0
    if args.command == "drop":
        from llamaindex_kb.ingestion.pipeline import drop_knowledge_base
        from llamaindex_kb.stores.registry import store_for

        settings = load_settings(_explicit(args))
        drop_knowledge_base(store_for(settings), args.kb)
        print(f"dropped knowledge base {args.kb}")
        return 0
    if args.command == "keys":
        return _keys(args)
    if args.command == "views":
        return _views(args)
    if args.command == "package":
        return _tool("difypkg").main_package(PROJECT_ROOT, args.out)
    if args.command == "bench":
        return _tool("bench").main(args.rest)
    raise AssertionError(args.command)


def _tool(name: str) -> ModuleType:
    """A developer tool from the checkout's tools/, which the .difypkg leaves out."""
    if not (PROJECT_ROOT / "tools" / f"{name}.py").is_file():
        raise ConfigurationError(
            f"this command needs tools/{name}.py from a checkout of the project; "
            "the plugin package does not ship it")
    if str(PROJECT_ROOT) not in sys.path:
        sys.path.insert(0, str(PROJECT_ROOT))
    return importlib.import_module(f"tools.{name}")


def _ingest(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from llamaindex_kb.ingestion.chunking import ChunkingConfig
    from llamaindex_kb.ingestion.pipeline import ingest_paths
    from llamaindex_kb.models.base import Models
    from llamaindex_kb.models.choose import models_for
    from llamaindex_kb.stores.registry import store_for

    settings = load_settings(_explicit(args))
    chunking = None
    if args.chunking is not None:
        try:
            chunking = ChunkingConfig.model_validate(args.chunking)
        except ValueError as exc:
            print(f"error: --chunking: {exc}", file=sys.stderr)
            return 2
    bars: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if args.no_progress:
            return
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="chunk"
                                     if stage == "embedding" else "file", file=sys.stderr)
        bar.update(done - bar.n)

    store = store_for(settings)
    existing = store.find(args.kb)
    # A new keyword-only base reads no embedding settings, so none can fail its ingest;
    # --mode is ignored for an existing base, which keeps its model.
    keyword_only = (existing.manifest.embedding is None if existing is not None
                    else args.mode == "keyword")
    models = Models(None) if keyword_only else models_for(settings)
    summary = ingest_paths(store, args.kb, args.paths, models=models,
                           mode=args.mode, semantic_weight=args.semantic_weight,
                           chunking=chunking, sync=args.sync, progress=progress,
                           limits=settings.limits)
    for bar in bars.values():
        bar.close()
    print(f"{summary.knowledge_id}: {summary.documents} documents added or changed "
          f"({summary.chunks} chunks), {summary.unchanged} unchanged, {summary.removed} removed; "
          f"now {summary.total_documents} documents, {summary.total_chunks} chunks")
    for path in summary.skipped:
        print(f"  skipped (unsupported type): {path}")
    for path, reason in summary.failed.items():
        print(f"  FAILED {path}: {reason}", file=sys.stderr)
    return 1 if summary.failed else 0


def _list(args: argparse.Namespace) -> int:
    from llamaindex_kb.retrieval import Library

    library = Library(load_settings(_explicit(args)))
    if args.kb:
        for info in library.documents(args.kb):
            print(f"{info.document_id}\t{_count(info.chunks)} chunks\t"
                  f"{info.file_path or info.title}")
        return 0
    for manifest in library.manifests():
        model = (manifest.embedding.id if manifest.embedding is not None
                 else "no embedding" if manifest.retrieval_mode == "keyword" else "?")
        print(f"{manifest.knowledge_id}\t{_count(manifest.documents)} documents\t"
              f"{_count(manifest.chunks)} chunks\t{manifest.retrieval_mode}\t{model}")
    for view in library.views.list():
        print(f"{view.name}\tview of {view.knowledge_base}")
    return 0


def _keys(args: argparse.Namespace) -> int:
    """Run against the store directly: whoever can open the store has the admin key's
    power already, so no key is asked for."""
    from llamaindex_kb.keys import KeyRing
    from llamaindex_kb.retrieval import Library

    library = Library(load_settings(_explicit(args)))
    keys = KeyRing(library.records, admin_key=None)
    if args.action == "create":
        info, secret = keys.create(args.name, args.knowledge_ids, args.read_only)
        print(f"created API key {info.name!r} ({_scope(info.knowledge_ids, info.read_only)}); "
              "its secret, shown this once:", file=sys.stderr)
        print(secret)
    elif args.action == "list":
        for info in keys.list(library.knowledge_ids()):
            missing = f"\tnames what does not exist: {', '.join(info.missing)}" * bool(
                info.missing)
            print(f"{info.name}\t{_scope(info.knowledge_ids, info.read_only)}\t"
                  f"created {_when(info.created_at)}\tlast used {_when(info.last_used_at)}"
                  f"{missing}")
    else:
        keys.revoke(args.name)
        print(f"revoked API key {args.name!r}")
    return 0


def _views(args: argparse.Namespace) -> int:
    from llamaindex_kb.retrieval import Library

    views = Library(load_settings(_explicit(args))).views
    if args.action == "create":
        view = views.create(args.name, args.knowledge_base, metadata_condition=args.filter,
                            retrieval_mode=args.mode, semantic_weight=args.view_weight,
                            top_k_max=args.top_k_max)
        print(f"created view {view.name!r} of knowledge base {view.knowledge_base!r}")
    elif args.action == "list":
        for view in views.list():
            settings = ", ".join(f"{name}={value}" for name, value in (
                ("mode", view.retrieval_mode), ("semantic_weight", view.semantic_weight),
                ("top_k_max", view.top_k_max)) if value is not None)
            print(f"{view.name}\tof {view.knowledge_base}\t"
                  f"filter {json.dumps(view.metadata_condition, ensure_ascii=False)}\t"
                  f"{settings or 'as the base'}")
    else:
        views.delete(args.name)
        print(f"deleted view {args.name!r}")
    return 0


def _scope(knowledge_ids: list[str] | None, read_only: bool) -> str:
    where = "all knowledge bases" if knowledge_ids is None else ", ".join(knowledge_ids)
    return f"{'read-only' if read_only else 'read-write'}: {where}"


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _count(count: int | None) -> str:
    return "?" if count is None else str(count)  # None: the store cannot count them
