"""How much one request may ask of the server: the one place each limit is defined.

Every limit is checked before the work it bounds (a body before it is read, an
archive member before it is inflated), answers 413 (3006) or 400 naming the limit
and its setting, and can be changed with a setting (``LLAMAINDEX_KB_MAX_…``),
listed in the README under "Limits".
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from llamaindex_kb.errors import PayloadTooLargeError

MiB = 1024 * 1024


class Limits(BaseModel):
    """The limits in force; ``Settings.limits`` builds them from the settings."""

    model_config = ConfigDict(frozen=True)

    # POST /retrieval and the JSON bodies of other routes. Dify's own body is < 1 KiB
    # plus the query; a filter with long "in" lists stays far below this.
    body_bytes: int = Field(default=1 * MiB, ge=1024)
    # jieba and the tokenizer are linear but not fast: 1 MB of Chinese took > 5 s.
    # Dify's console caps its test query at 250 characters.
    query_chars: int = Field(default=10_000, ge=1)
    # Conditions in one metadata_condition, and values in one condition's list.
    conditions: int = Field(default=100, ge=1)
    condition_values: int = Field(default=1_000, ge=1)
    # A file sent to POST /documents, as sent.
    upload_bytes: int = Field(default=50 * MiB, ge=1024)
    # What an upload may expand to: the inflated members of a .docx (a zip), the
    # text extracted from any file, the nesting depth of HTML or JSON, and chunks.
    inflated_bytes: int = Field(default=200 * MiB, ge=1024)
    extracted_chars: int = Field(default=20_000_000, ge=1024)
    markup_depth: int = Field(default=256, ge=8)
    chunks_per_document: int = Field(default=20_000, ge=1)


DEFAULT_LIMITS = Limits()


def too_large(subject: str, problem: str, limit: str) -> PayloadTooLargeError:
    """The 413 for ``subject`` (e.g. "file: a.pdf") over ``Limits.<limit>``: ``problem``
    says by how much, and the message adds the setting that changes the limit."""
    return PayloadTooLargeError(
        f"{subject} {problem} (setting LLAMAINDEX_KB_MAX_{limit.upper()})")


def over_limit(what: str, size: int | None, limit: str, value: int, unit: str = "bytes"
               ) -> PayloadTooLargeError:
    """``too_large`` for a measured ``size`` against ``Limits.<limit>`` (= ``value``).

    ``size`` is None when only "more than the limit" is known (a body without a length).
    """
    measured = f"{size:,} {unit}" if size is not None else f"more than {value:,} {unit}"
    return too_large(what, f"is {measured}, over the limit of {value:,} {unit}", limit)
