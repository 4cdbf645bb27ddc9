"""Files → LlamaIndex ``Document``s, one small ``BaseReader`` per format.

``llama-index-readers-file`` was not used: it requires pandas (about 70 MB with its
wheels) for every format. The readers here wrap the same lean libraries it uses
(pypdf, docx2txt, BeautifulSoup) plus the standard library's csv and json.

How each format becomes documents:

- ``.txt .md .markdown .mdx``: one document, the text as written (UTF-8 with or
  without BOM, UTF-16 with BOM, else the encoding charset-normalizer detects).
- ``.html .htm``: one document; the ``<title>`` and the visible text, with block
  elements (paragraphs, headings, divs, tables…) separated by a blank line and
  list items, table rows and ``<br>`` by a line break, so the default ``"\\n\\n"``
  chunk delimiter falls on the page's own paragraphs. Scripts, styles and
  ``<nav>`` are dropped.
- ``.pdf``: one document per page that has text, each with ``metadata["page"]``
  (1-based). All of them belong to the same knowledge-base document (ingestion
  gives them one ``document_id``), so Dify sees one document per file and every
  chunk knows its page, for citations. Chunks never span a page break.
- ``.docx``: one document; paragraphs separated by a blank line.
- ``.csv``: one document; every row becomes a paragraph of ``column: value``
  lines (empty cells left out). Labelling each value with its column keeps a
  chunk from the middle of the table understandable on its own, and rows never
  get split across chunks unless one row alone exceeds the chunk size.
- ``.json .jsonl``: one document; flattened to ``key.path: value`` lines. Every
  object inside a list (a "record") becomes its own paragraph, as does every line
  of a JSON Lines file; lists of plain values become ``key: a, b, c``.

Any problem with a file becomes ``InvalidFieldError("file", ...)`` naming it: a bad
upload is reported to the caller, never an internal error.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
import tempfile
from pathlib import Path, PurePath
from typing import Any

from llama_index.core.readers.base import BaseReader
from llama_index.core.schema import Document

from .errors import InvalidFieldError

_FIELD = "file"
# Keeps a library's error text readable in an API answer.
_REASON_CHARS = 200
# C0 and C1 control characters other than tab, line feed, carriage return, form feed.
_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")


class _UnreadableFile(Exception):
    """What is wrong with a file, phrased to follow its name ("is not a valid PDF (…)")."""


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 1] + "…"


def _documents(text: str, extra_info: dict[str, Any] | None) -> list[Document]:
    return [Document(text=text, metadata=dict(extra_info or {}))]


def _decode_text(data: bytes) -> str:
    """Text from bytes: BOM first, then UTF-8, then the encoding charset-normalizer finds.

    Raises ``_UnreadableFile`` for binary data (NUL bytes, or more than 5% control
    characters after decoding), which is what an image or archive renamed .txt holds.
    """
    for bom, codec in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                       (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            try:
                return data.decode(codec)
            except UnicodeDecodeError as exc:
                raise _UnreadableFile(f"is not valid {codec} text ({_reason(exc)})") from exc
    if b"\x00" in data:
        raise _UnreadableFile("is not a text file (it contains binary data)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        # Imported here: only non-UTF-8 files pay for it.
        import charset_normalizer

        match = charset_normalizer.from_bytes(data).best()
        if match is None:
            raise _UnreadableFile("is not a text file (no text encoding fits its bytes)") from None
        text = str(match)
    if len(_CONTROLS.findall(text)) > 0.05 * len(text):
        raise _UnreadableFile("is not a text file (it contains binary data)")
    return text


class TextFileReader(BaseReader):
    """Plain text and Markdown, kept as written."""

    def load_data(self, file: Path, extra_info: dict[str, Any] | None = None) -> list[Document]:
        return _documents(_decode_text(Path(file).read_bytes()), extra_info)


# Private-use code points: never whitespace, never in real text, so they survive the
# whitespace normalisation below and then become the paragraph and line breaks.
_PARAGRAPH = "\ue000"
_LINE = "\ue001"
_BREAKS = re.compile(rf" ?[{_PARAGRAPH}{_LINE}][ {_PARAGRAPH}{_LINE}]*")
_DROPPED_TAGS = ["head", "script", "style", "noscript", "template", "svg", "canvas", "iframe",
                 "object", "nav"]
_LINE_TAGS = ["li", "tr", "dt", "dd"]
_BLOCK_TAGS = ["address", "article", "aside", "blockquote", "caption", "details", "div", "dl",
               "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4",
               "h5", "h6", "header", "hr", "main", "ol", "p", "pre", "section", "summary",
               "table", "ul"]


class HTMLReader(BaseReader):
    """Visible text of an HTML page, with its block structure kept as line breaks."""

    def load_data(self, file: Path, extra_info: dict[str, Any] | None = None) -> list[Document]:
        # Imported here: bs4 costs 0.2 s to import and only ingestion needs it.
        from bs4 import BeautifulSoup

        data = Path(file).read_bytes()
        _decode_text(data)  # refuses binary data; BeautifulSoup itself honours <meta charset>
        soup = BeautifulSoup(data, "html.parser")
        title = soup.title.get_text(" ", strip=True) if soup.title else ""
        for tag in soup(_DROPPED_TAGS):
            tag.decompose()
        for pre in soup("pre"):
            for string in pre.find_all(string=True):
                string.replace_with(string.replace("\n", _LINE))
        for br in soup("br"):
            br.replace_with(_LINE)
        for cell in soup(["td", "th"]):
            cell.insert_before(" ")
        for name, mark in ((_LINE_TAGS, _LINE), (_BLOCK_TAGS, _PARAGRAPH)):
            for tag in soup(name):
                tag.insert_before(mark)
                tag.insert_after(mark)
        # Source whitespace means nothing in HTML; only the marks inserted above do.
        text = re.sub(r"\s+", " ", soup.get_text())
        text = _BREAKS.sub(lambda m: "\n\n" if _PARAGRAPH in m.group() else "\n", text).strip()
        if title and not text.startswith(title):
            text = f"{title}\n\n{text}"
        return _documents(text, extra_info)


class PDFReader(BaseReader):
    """One document per PDF page with text, ``metadata["page"]`` numbered from 1."""

    def load_data(self, file: Path, extra_info: dict[str, Any] | None = None) -> list[Document]:
        # Imported here: pypdf costs 0.2 s to import and only ingestion needs it.
        from pypdf import PdfReader

        try:
            pdf = PdfReader(file)
        except Exception as exc:  # pypdf raises many types for damaged files
            raise _UnreadableFile(f"is not a valid PDF ({_reason(exc)})") from exc
        if pdf.is_encrypted:
            # Many PDFs are encrypted only to restrict printing or copying, with an
            # empty password for reading.
            try:
                readable = pdf.decrypt("")
            except Exception as exc:  # e.g. AES without the optional cryptography package
                problem = f"is encrypted and cannot be opened ({_reason(exc)})"
                raise _UnreadableFile(problem) from exc
            if not readable:
                raise _UnreadableFile("is password-protected")
        try:
            pages = [page.extract_text() or "" for page in pdf.pages]
        except Exception as exc:
            raise _UnreadableFile(f"is not a valid PDF ({_reason(exc)})") from exc
        documents = [
            Document(text=text, metadata={**(extra_info or {}), "page": number})
            for number, text in enumerate(pages, start=1)
            if text.strip()
        ]
        if not documents:
            raise _UnreadableFile(
                "has no text (its pages may be scanned images; OCR is not supported)"
            )
        return documents


class DocxReader(BaseReader):
    """The text of a Word (.docx) file: headers, body, footers."""

    def load_data(self, file: Path, extra_info: dict[str, Any] | None = None) -> list[Document]:
        import docx2txt

        try:
            # An open file rather than a path: docx2txt does not close its ZipFile when
            # the document is damaged, this `with` does.
            with open(file, "rb") as stream:
                text = docx2txt.process(stream)
        except Exception as exc:  # zipfile, KeyError (no document.xml), XML parse errors
            raise _UnreadableFile(f"is not a valid Word document ({_reason(exc)})") from exc
        # docx2txt starts every paragraph with a blank line, so empty paragraphs pile up.
        return _documents(re.sub(r"\n{3,}", "\n\n", text), extra_info)


class CSVReader(BaseReader):
    """A table: each row a paragraph of ``column: value`` lines under the header's names."""

    def load_data(self, file: Path, extra_info: dict[str, Any] | None = None) -> list[Document]:
        text = _decode_text(Path(file).read_bytes())
        try:
            dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(
                text[:8192], delimiters=",;\t|"
            )
        except csv.Error:  # one column, or too little text to tell: plain commas
            dialect = csv.excel
        try:
            rows = [row for row in csv.reader(io.StringIO(text, newline=""), dialect)
                    if any(cell.strip() for cell in row)]
        except csv.Error as exc:
            raise _UnreadableFile(f"is not a valid CSV file ({_reason(exc)})") from exc
        if not rows:
            return _documents("", extra_info)
        header = [name.strip() for name in rows[0]]
        paragraphs = []
        for row in rows[1:]:
            lines = []
            for index, value in enumerate(row):
                name = header[index] if index < len(header) and header[index] else None
                value = _single_paragraph(value)
                if value:
                    lines.append(f"{name or f'column {index + 1}'}: {value}")
            if lines:
                paragraphs.append("\n".join(lines))
        if not paragraphs:
            raise _UnreadableFile("has no data rows below its header")
        return _documents("\n\n".join(paragraphs), extra_info)


def _single_paragraph(value: str) -> str:
    """Blank lines inside one value would read as a record boundary: fold them."""
    return re.sub(r"\n\s*\n", "\n", value.strip())


def _json_scalar(value: Any) -> str:
    return _single_paragraph(value) if isinstance(value, str) else json.dumps(value)


def _json_paragraphs(value: Any, path: str) -> list[str]:
    """Readable paragraphs for a JSON value found at ``path`` (dotted keys)."""
    if isinstance(value, list) and any(isinstance(item, dict | list) for item in value):
        # A list of records: each is its own paragraph, all under the list's path.
        return [p for item in value for p in _json_paragraphs(item, path)]
    if isinstance(value, dict):
        lines: list[str] = []
        paragraphs: list[str] = []
        for key, item in value.items():
            parts = _json_paragraphs(item, f"{path}.{key}" if path else str(key))
            if len(parts) == 1:
                lines.append(parts[0])
            else:
                paragraphs.extend(parts)
        return (["\n".join(lines)] if lines else []) + paragraphs
    if isinstance(value, list):
        text = ", ".join(_json_scalar(item) for item in value if item is not None)
    elif value is None:
        text = ""
    else:
        text = _json_scalar(value)
    if not text:
        return []
    return [f"{path}: {text}" if path else text]


class JSONReader(BaseReader):
    """JSON (``.json``) or JSON Lines (``.jsonl``) flattened to ``key.path: value`` lines."""

    def __init__(self, *, lines: bool = False) -> None:
        self.lines = lines

    def load_data(self, file: Path, extra_info: dict[str, Any] | None = None) -> list[Document]:
        text = _decode_text(Path(file).read_bytes())
        if self.lines:
            records = []
            for number, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    records.append(_parse_json(line, f"line {number}: "))
        else:
            records = [_parse_json(text, "")]
        paragraphs = [p for record in records for p in _json_paragraphs(record, "")]
        return _documents("\n\n".join(paragraphs), extra_info)


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _UnreadableFile(f"is not valid JSON ({where}{_reason(exc)})") from exc


_TEXT_READER = TextFileReader()
_READERS: dict[str, BaseReader] = {
    ".txt": _TEXT_READER,
    ".md": _TEXT_READER,
    ".markdown": _TEXT_READER,
    ".mdx": _TEXT_READER,
    ".html": HTMLReader(),
    ".htm": HTMLReader(),
    ".pdf": PDFReader(),
    ".docx": DocxReader(),
    ".csv": CSVReader(),
    ".json": JSONReader(),
    ".jsonl": JSONReader(lines=True),
}
SUPPORTED_SUFFIXES: frozenset[str] = frozenset(_READERS)


def _invalid(name: str, problem: str) -> InvalidFieldError:
    return InvalidFieldError(_FIELD, f"{name} {problem}")


def read_file(path: Path, *, source_name: str | None = None) -> list[Document]:
    """The LlamaIndex documents in one file; the format is chosen by its suffix.

    ``source_name`` (default: the file's name) names the file in error messages; its
    last part becomes ``metadata["file_name"]``. Every document also gets
    ``metadata["file_type"]`` (the suffix without the dot) and PDF pages ``"page"``;
    all metadata is excluded from the embedded and LLM text. Newlines are
    normalised to ``\\n``.

    Raises ``InvalidFieldError("file", ...)`` naming the file for an unsupported
    suffix, an unreadable or damaged file, and a file with no text.
    """
    name = source_name or path.name
    suffix = path.suffix.lower()
    reader = _READERS.get(suffix)
    if reader is None:
        raise _invalid(name, _unsupported(suffix))
    metadata = {"file_name": PurePath(name).name, "file_type": suffix.lstrip(".")}
    try:
        documents = reader.load_data(path, extra_info=metadata)
    except _UnreadableFile as exc:
        raise _invalid(name, str(exc)) from exc
    except OSError as exc:  # strerror, not str(exc): the message must not show server paths
        raise _invalid(name, f"cannot be read ({exc.strerror or type(exc).__name__})") from exc
    except Exception as exc:  # a reader library failing on odd input: still the file's fault
        raise _invalid(name, f"could not be read as {suffix} ({_reason(exc)})") from exc
    kept = []
    for document in documents:
        text = document.text.replace("\r\n", "\n").replace("\r", "\n")
        if not text.strip():
            continue
        document.set_content(text)
        # Metadata is for filters and citations, not for the embedded text.
        document.excluded_embed_metadata_keys = list(document.metadata)
        document.excluded_llm_metadata_keys = list(document.metadata)
        kept.append(document)
    if not kept:
        raise _invalid(name, "has no text")
    return kept


def read_bytes(data: bytes, filename: str) -> list[Document]:
    """Like ``read_file`` for an upload: ``filename`` gives the format and the name.

    The bytes are spooled to a private temporary directory (the readers take paths)
    that is removed before this returns, whatever happens.
    """
    # Browsers and clients may send a path ("C:\\fakepath\\a.pdf"): keep the last part.
    name = re.split(r"[\\/]", filename)[-1].strip() or "upload"
    suffix = PurePath(name).suffix.lower()
    if suffix not in _READERS:
        raise _invalid(name, _unsupported(suffix))
    with tempfile.TemporaryDirectory(prefix="llamaindex-kb-upload-") as directory:
        path = Path(directory) / f"upload{suffix}"
        path.write_bytes(data)
        return read_file(path, source_name=name)


def _unsupported(suffix: str) -> str:
    return (f"has an unsupported file type ({suffix or 'no suffix'}); supported: "
            f"{', '.join(sorted(SUPPORTED_SUFFIXES))}")

