"""Secrets out of everything shown: store URLs in log lines, error messages and answers.

What counts as a secret in a URL, decided here only:

* the password of any URL with userinfo: ``postgresql://kb:***@db:5432/kb``;
* the whole userinfo of a ``llamacloud://`` URL, whose user part is the API key;
* the value of any query or fragment parameter whose name looks secret (``api_key``,
  ``apikey``, ``key``, ``token``, ``password``, ``secret``, ``auth``, ``sig``...).

Scheme, host, port, path, database and the other parameters stay readable, so a
message still says which server it means. A URL too broken to parse is masked more,
never less: everything between the scheme and the last ``@`` that could end a
userinfo is treated as one.

Messages of the libraries we call (libpq, httpx, a server's own error text) can
echo a URL or a secret (libpq quotes a password it cannot percent-decode);
``redact_text`` scrubs both before such a message is shown.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote, unquote_plus

MASK = "***"
# Schemes whose user part is itself the key.
_KEY_AS_USER = frozenset({"llamacloud"})
# A parameter is secret when its name, lower-cased without separators, holds one of
# these: over-masking a harmless parameter (sslkey, a file path) costs nothing.
_SECRET_WORDS = ("key", "pass", "pwd", "secret", "token", "auth", "sig", "credential")
# A secret shorter than this is not scrubbed from free text: replacing every "ab" in a
# message would garble it, and such a secret is no secret anyway.
_MIN_SCRUBBED = 4
_PARAMETER = re.compile(r"([?&;#])([^=&;#?]*)=([^&;#?]*)")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+")
# key=value settings outside a URL (libpq's "host=db password=x" form).
_SETTING = re.compile(r"(?<![\w.-])([\w.-]+)(\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s'&;]+)")


def is_secret_name(name: str) -> bool:
    """Whether a parameter called ``name`` holds a secret."""
    plain = re.sub(r"[^a-z0-9]", "", unquote_plus(name).lower())
    return any(word in plain for word in _SECRET_WORDS)


def redact_url(url: str) -> str:
    """``url`` with its secrets replaced by ``***``; the rest as given."""
    return _split(url)[0]


def url_secrets(url: str) -> tuple[str, ...]:
    """The secrets ``url`` holds, as written and percent-decoded: what ``redact_text``
    must scrub from a message about it."""
    return _split(url)[1]


def redact_text(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with every URL in it redacted and every one of ``secrets`` masked."""
    scrubbed = _URL_IN_TEXT.sub(lambda found: redact_url(found.group(0)), text)
    for secret in sorted({s for s in secrets if s and len(s) >= _MIN_SCRUBBED},
                         key=len, reverse=True):
        scrubbed = scrubbed.replace(secret, MASK)
    return scrubbed


def _split(url: str) -> tuple[str, tuple[str, ...]]:
    scheme, separator, rest = url.partition("://")
    if not separator:
        return _masked_settings(url)
    found: list[str] = []
    first_at = rest.find("@")
    if first_at >= 0:
        # The userinfo ends at the last "@" before the query: a password holding an
        # unencoded "/", "?" or "@" then still counts as userinfo, never as host.
        query_at = min((i for i in (rest.find("?", first_at), rest.find("#", first_at))
                        if i >= 0), default=len(rest))
        at = rest.rfind("@", 0, query_at)
        userinfo, rest = rest[:at], rest[at:]
        if scheme.lower() in _KEY_AS_USER:
            found.append(userinfo)
            userinfo = MASK
        else:
            user, colon, password = userinfo.partition(":")
            if colon:
                found.append(password)
                userinfo = f"{user}:{MASK}"
        rest = userinfo + rest

    def mask(parameter: re.Match[str]) -> str:
        mark, name, value = parameter.groups()
        if not is_secret_name(name) or not value:
            return parameter.group(0)
        found.append(value)
        return f"{mark}{name}={MASK}"

    rest = _PARAMETER.sub(mask, rest)
    return f"{scheme}://{rest}", _with_decoded(found)


def _masked_settings(text: str) -> tuple[str, tuple[str, ...]]:
    found: list[str] = []

    def mask(setting: re.Match[str]) -> str:
        name, equals, value = setting.groups()
        if not is_secret_name(name):
            return setting.group(0)
        found.append(value.strip("'"))
        return f"{name}{equals}{MASK}"

    return _SETTING.sub(mask, text), _with_decoded(found)


def _with_decoded(found: list[str]) -> tuple[str, ...]:
    secrets = [value for raw in found if raw
               for value in (raw, unquote(raw), unquote_plus(raw))]
    return tuple(dict.fromkeys(secrets))
