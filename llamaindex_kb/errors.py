"""Every error the product reports, and the one table that maps them to HTTP.

The hierarchy::

    KBError                      safe message, shown to the caller
    ├── AuthError                403 (never 401: Dify would accept a wrong key at save time)
    │   ├── MissingAuthError     1001  Authorization header missing or not "Bearer <key>"
    │   └── WrongKeyError        1002  key does not match
    │       └── KeyNotAllowed    1002  a named key that may not do this (read-only; admin only);
    │                                  outside its knowledge ids it gets 404 (2001) instead
    ├── NotFoundError            404
    │   ├── KnowledgeBaseNotFound 2001
    │   ├── DocumentNotFound     2002
    │   ├── RouteNotFound        2003
    │   └── KeyNotFound          2005  no API key of that name
    ├── MethodNotAllowed         405  2004
    ├── BadRequestError          400
    │   ├── MalformedBodyError   3001  not JSON, or not a JSON object
    │   ├── InvalidFieldError    3002  a field has the wrong type or value (names the field)
    │   ├── InvalidFilterError   3003  metadata_condition cannot be evaluated (names the condition)
    │   ├── EmbeddingMismatchError 3004  knowledge base was built with another embedding
    │   ├── ReadOnlyStoreError   3007  a write to a store managed elsewhere (LlamaCloud)
    │   └── ReadOnlyViewError    3009  a write to a view (change its knowledge base)
    ├── AlreadyExistsError       409  3008  a key, view or knowledge base of that name exists
    ├── ConfigurationError       400  3005  settings or store URL are wrong (actionable message)
    ├── PayloadTooLargeError     413  3006  over a limit (body, query, file, what it expands to)
    ├── ServerBusyError          429  5029  too much work in flight (uploads); Retry-After says when
    ├── StoreUnavailableError    503  5003  a transient outage, after retries
    ├── KnowledgeBaseDamaged     500  5001  a knowledge base's files are damaged (names it)
    └── DiskFullError            507  5007  no space left to write; nothing was changed

Running out of open files or memory (``out_of_resources``) answers 503 / 5003: it
passes. Anything else is an unexpected failure: 500 / 5000 with a generic message and a
logged traceback. Dify retries 429, 500, 502, 503 and 504 three times, so nothing a
client sent may map there: the table test keeps that true. ``KnowledgeBaseDamaged``
is a deterministic failure of ours that Dify will retry; it still answers 500, with
a message that tells the operator what to do. A full disk answers 507, which Dify
does not retry.
"""

from __future__ import annotations

import errno


def first_line(exc: BaseException) -> str:
    """What an exception says, in one line (a driver's message can run to many)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def shown(value: object, limit: int = 80) -> str:
    """A client's value inside a message: its repr, escaped, and cut to ``limit``."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class KBError(Exception):
    """Base class: the message is written for the person who reads the answer."""

    status: int = 500
    error_code: int = 5000

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class AuthError(KBError):
    status = 403


class MissingAuthError(AuthError):
    error_code = 1001


class WrongKeyError(AuthError):
    error_code = 1002


class KeyNotAllowed(WrongKeyError):
    """The key is one of ours, but its scope does not cover this: the same code as a
    wrong key, so a client that handles one handles both."""


class NotFoundError(KBError):
    status = 404


class KnowledgeBaseNotFound(NotFoundError):
    error_code = 2001

    @classmethod
    def missing(cls, knowledge_id: str) -> KnowledgeBaseNotFound:
        return cls(f"knowledge base {shown(knowledge_id)} does not exist")


class DocumentNotFound(NotFoundError):
    error_code = 2002


class RouteNotFound(NotFoundError):
    error_code = 2003


class KeyNotFound(NotFoundError):
    error_code = 2005


class MethodNotAllowed(KBError):
    status = 405
    error_code = 2004


class BadRequestError(KBError):
    status = 400
    error_code = 3000


class MalformedBodyError(BadRequestError):
    error_code = 3001


class InvalidFieldError(BadRequestError):
    error_code = 3002

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class InvalidFilterError(BadRequestError):
    error_code = 3003


class EmbeddingMismatchError(BadRequestError):
    error_code = 3004


class ReadOnlyStoreError(BadRequestError):
    """A write (ingest, upload, delete, drop) to a store whose knowledge bases are
    changed elsewhere: the request is fine, this store cannot do it."""

    error_code = 3007

    @classmethod
    def refusing(cls, knowledge_id: str, where: str) -> ReadOnlyStoreError:
        return cls(f"knowledge base {shown(knowledge_id)} cannot be changed here: {where}")


class ReadOnlyViewError(BadRequestError):
    error_code = 3009


class AlreadyExistsError(KBError):
    status = 409
    error_code = 3008


class ConfigurationError(KBError):
    status = 400
    error_code = 3005


class PayloadTooLargeError(KBError):
    status = 413
    error_code = 3006


class ServerBusyError(KBError):
    """Not the request's fault: the server is busy; ``retry_after`` seconds is a fair wait."""

    status = 429
    error_code = 5029

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StoreUnavailableError(KBError):
    status = 503
    error_code = 5003


class KnowledgeBaseDamaged(KBError):
    status = 500
    error_code = 5001

    @classmethod
    def naming(cls, knowledge_id: str, problem: str) -> KnowledgeBaseDamaged:
        return cls(
            f"knowledge base {knowledge_id!r} is damaged ({problem}); the other knowledge "
            "bases are unaffected: drop it and ingest its documents again, or restore its "
            "folder from a backup"
        )


class DiskFullError(KBError):
    status = 507
    error_code = 5007


INTERNAL_ERROR_CODE = 5000
INTERNAL_ERROR_MESSAGE = "internal error: the server logged the details"


OUT_OF_RESOURCES_MESSAGE = "the server has run out of open files or memory; try again"
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
DISK_FULL_MESSAGE = ("no space is left on the server's disk (its temporary files or data); "
                     "nothing was changed: free space and try again")


def out_of_resources(exc: BaseException) -> bool:
    """The process ran out of descriptors or memory: transient, and nobody's input."""
    return isinstance(exc, MemoryError) or (
        isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS)


def error_status(exc: BaseException) -> tuple[int, int, str]:
    """(HTTP status, error_code, error_msg) for any exception; the single mapping."""
    if isinstance(exc, KBError):
        return exc.status, exc.error_code, exc.message
    if out_of_resources(exc):
        return StoreUnavailableError.status, StoreUnavailableError.error_code, \
            OUT_OF_RESOURCES_MESSAGE
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        # Where the store's writer knows the data directory it says so (DiskFullError);
        # this is any other write, such as an upload spooled to a temporary file.
        return DiskFullError.status, DiskFullError.error_code, DISK_FULL_MESSAGE
    return 500, INTERNAL_ERROR_CODE, INTERNAL_ERROR_MESSAGE
