"""API keys: the admin key from the settings, and the named keys it creates.

The admin key (the plugin form's API key, ``--api-key``) may do everything and is
never stored. A named key is made for one app: it may be read-only (retrieve and
list), and limited to some knowledge bases and views, outside which everything
answers exactly as a missing knowledge base does (404, 2001), so a key cannot learn
what else the store holds. Named keys are kept hashed in the store's records
(``stores/records.py``), read on every request that presents one, so a key created or
revoked in one process counts at once in all of them.

A named key is 32 random bytes: SHA-256 is then as safe as a slow password hash, and
costs nothing per request.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import BaseModel, Field, SecretStr

from llamaindex_kb.errors import (
    AlreadyExistsError,
    InvalidFieldError,
    KBError,
    KeyNotAllowed,
    KeyNotFound,
    KnowledgeBaseNotFound,
    MissingAuthError,
    WrongKeyError,
    error_status,
    shown,
)
from llamaindex_kb.ids import validate_knowledge_id
from llamaindex_kb.stores.records import Record, Records

log = logging.getLogger(__name__)

KIND = "key"
SECRET_PREFIX = "lkb_"
NAME_RULE = "1 to 64 letters, digits, '.', '_' or '-'"
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# What secrets.token_urlsafe(32) gives after the prefix: only a token of this shape costs
# a read of the store (a guess such as "Bearer lkb_x" answers without one).
_SECRET = re.compile(re.escape(SECRET_PREFIX) + r"[A-Za-z0-9_-]{43}")
# Recording every use would write on every retrieval; a minute is precise enough to
# tell a key in use from a forgotten one.
LAST_USE_PRECISION_S = 60.0
MAX_SCOPE = 100


class KeyInfo(BaseModel):
    """A named key as listed: never its secret, nor the secret's hash."""

    name: str
    # None: every knowledge base and view, present and future.
    knowledge_ids: list[str] | None = None
    read_only: bool = False
    created_at: float
    last_used_at: float | None = None
    # Names in the scope that are neither a knowledge base nor a view now: a typo, or
    # one deleted (a read-write key may create a base of such a name). Filled in when
    # listed (``KeyRing.list``), never stored.
    missing: list[str] = Field(default_factory=list)


@dataclass(frozen=True)
class Caller:
    """Who sent a request, and so what it may do."""

    name: str | None  # None: the admin key
    knowledge_ids: frozenset[str] | None = None  # None: all of them
    read_only: bool = False

    @property
    def admin(self) -> bool:
        return self.name is None

    def may_see(self, knowledge_id: str) -> bool:
        return self.knowledge_ids is None or knowledge_id in self.knowledge_ids

    def check_visible(self, knowledge_id: str) -> None:
        """A knowledge base or view outside the key's scope does not exist for it."""
        if not self.may_see(knowledge_id):
            raise KnowledgeBaseNotFound.missing(knowledge_id)

    def check_writer(self) -> None:
        """Refuse a read-only key any write, before anything else is looked at: the
        answer is then the same whether or not the knowledge base exists."""
        if self.read_only:
            raise KeyNotAllowed(
                f"API key {self.name!r} is read-only: it can retrieve and list, not add or "
                "delete documents")

    def check_write(self, knowledge_id: str) -> None:
        self.check_writer()
        self.check_visible(knowledge_id)

    def check_admin(self) -> None:
        if not self.admin:
            raise KeyNotAllowed(
                f"only the admin key (the endpoint's API key setting) manages API keys and "
                f"views; API key {self.name!r} cannot")


ADMIN = Caller(name=None)


def bearer_tokens(header: str | None) -> list[str]:
    """The key(s) an ``Authorization`` header may carry; ``MissingAuthError`` if none.

    A key typed into Dify as "Bearer xyz" arrives as "Bearer Bearer xyz": both count.
    """
    if not header or not _bearer(header):
        raise MissingAuthError(
            "missing or malformed Authorization header; expected 'Bearer <api key>'")
    token = header[len("Bearer "):].strip()
    tokens = [token]
    if _bearer(token):
        tokens.append(token[len("Bearer "):].strip())
    return tokens


def _bearer(text: str) -> bool:
    """Whether ``text`` starts with the scheme, in any case (HTTP's schemes are)."""
    return text[:len("Bearer ")].lower() == "bearer "


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyRing:
    """The admin key and the named keys kept in ``records``."""

    def __init__(self, records: Records, admin_key: SecretStr | None) -> None:
        self.records = records
        self.admin_key = admin_key

    def authenticate(self, header: str | None) -> Caller:
        """Who the header's key belongs to; 403 for anything else (never 401: Dify would
        save a wrong key)."""
        if self.admin_key is None:
            raise WrongKeyError("no API key is configured on the server; set one first")
        tokens = bearer_tokens(header)
        admin = self.admin_key.get_secret_value().encode()
        matched = False
        for token in tokens:
            matched |= hmac.compare_digest(token.encode(), admin)
        if matched:
            return ADMIN  # the admin key never costs a read of the records
        caller = self._named(tokens)
        if caller is None:
            raise WrongKeyError("the API key does not match the one configured for this endpoint")
        return caller

    def _named(self, tokens: list[str]) -> Caller | None:
        if not any(_SECRET.fullmatch(token) for token in tokens):
            return None
        digests = [digest(token).encode() for token in tokens]
        found: tuple[str, Record] | None = None
        # Every stored hash is compared, in constant time each, whichever matches.
        for name, record in self.records.records(KIND).items():
            stored = str(record.get("hash", "")).encode()
            for candidate in digests:
                if hmac.compare_digest(candidate, stored):
                    found = (name, record)
        if found is None:
            return None
        name, record = found
        now = time.time()
        last = record.get("last_used_at")
        if last is None or now - float(last) >= LAST_USE_PRECISION_S:
            try:
                self.records.update_record(KIND, name, {"last_used_at": now})
            except (KBError, OSError) as exc:
                # A bookkeeping write (a read-only data folder, a store that refuses
                # writes now) must not turn away a request the key may make.
                log.warning("could not record the use of API key %r: %s", name,
                            error_status(exc)[2])
        scope = record.get("knowledge_ids")
        return Caller(name=name, knowledge_ids=None if scope is None else frozenset(scope),
                      read_only=bool(record.get("read_only")))

    def create(self, name: str, knowledge_ids: Iterable[str] | None = None,
               read_only: bool = False) -> tuple[KeyInfo, str]:
        """A new named key and its secret, which is shown this once and never stored."""
        check_name(name, "name")
        scope = None
        if knowledge_ids is not None:
            scope = sorted({validate_knowledge_id(k, "knowledge_ids", creating=False)
                            for k in knowledge_ids})
            if not scope:
                raise InvalidFieldError(
                    "knowledge_ids", "is empty, which would allow nothing: leave it out (or "
                    "null) for every knowledge base, or name at least one")
            if len(scope) > MAX_SCOPE:
                raise InvalidFieldError(
                    "knowledge_ids", f"names {len(scope)} knowledge bases; at most {MAX_SCOPE}")
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        info = KeyInfo(name=name, knowledge_ids=scope, read_only=read_only,
                       created_at=time.time())
        stored = {**info.model_dump(exclude={"missing"}), "hash": digest(secret)}
        if not self.records.add_record(KIND, name, stored):
            raise AlreadyExistsError(
                f"an API key named {name!r} exists: revoke it first, or choose another name")
        return info, secret

    def list(self, existing: set[str]) -> list[KeyInfo]:
        """Every named key, each with the names in its scope missing from ``existing``
        (the knowledge bases' and views' ids)."""
        infos = [KeyInfo.model_validate(record) for record in self.records.records(KIND).values()]
        return sorted((info.model_copy(update={"missing": [
            k for k in info.knowledge_ids or [] if k not in existing]}) for info in infos),
            key=lambda info: info.name)

    def revoke(self, name: str) -> None:
        if not self.records.remove_record(KIND, name):
            raise KeyNotFound(f"no API key is named {shown(name)}")


def check_name(name: object, field: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidFieldError(field, f"must be {NAME_RULE}; got {shown(name)}")
    return name
