"""Files → LlamaIndex ``Document``s, one small ``BaseReader`` per format.

``llama-index-readers-file`` was not used: it requires pandas (about 70 MB with its
wheels) for every format. The readers here use pypdf, the standard library's zip,
expat, html.parser, csv and json, and charset-normalizer for text of unknown
encoding.

How each format becomes documents:

- ``.txt .md .markdown .mdx``: one document, the text as written (UTF-8 with or
  without BOM, UTF-16 with BOM, else the encoding charset-normalizer detects).
- ``.html .htm``: one document; the ``<title>`` and the visible text, with block
  elements (paragraphs, headings, divs, tables…) separated by a blank line and
  list items, table rows and ``<br>`` by a line break, so the default ``"\\n\\n"``
  chunk delimiter falls on the page's own paragraphs. Scripts, styles and
  ``<nav>`` are dropped. Read as a stream of tags, never built into a tree, so
  the time grows with the size of the page, not with how deep its tags nest.
- ``.pdf``: one document per page that has text, each with ``metadata["page"]``
  (1-based). All of them belong to the same knowledge-base document (ingestion
  gives them one ``document_id``), so Dify sees one document per file and every
  chunk knows its page, for citations. Chunks never span a page break.
- ``.docx``: one document; headers, body and footers, paragraphs separated by a
  blank line (what docx2txt gives), read as a stream from the zip.
- ``.csv``: one document; every row becomes a paragraph of ``column: value``
  lines (empty cells left out). Labelling each value with its column keeps a
  chunk from the middle of the table understandable on its own, and rows never
  get split across chunks unless one row alone exceeds the chunk size.
- ``.json .jsonl``: one document; flattened to ``key.path: value`` lines. Every
  object inside a list (a "record") becomes its own paragraph, as does every line
  of a JSON Lines file; lists of plain values become ``key: a, b, c``.

What a file may expand to is bounded by ``Limits`` and checked before or while the
work it bounds is done, never after: the bytes a .docx or a PDF inflates to
(``inflated_bytes``: the declared sizes first, then the bytes really inflated), the
text extracted (``extracted_chars``), the nesting of JSON (``markup_depth``) and a
PDF's pages (``chunks_per_document``: a page with text is at least one chunk).

Any problem with a file becomes ``InvalidFieldError("file", ...)`` naming it, and a
limit passed ``PayloadTooLargeError`` naming the limit and its setting: a bad upload
is reported to the caller, never an internal error.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import re
import struct
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path, PurePath
from typing import IO, Any
from xml.parsers import expat

from llama_index.core.readers.base import BaseReader
from llama_index.core.schema import Document

from llamaindex_kb.errors import InvalidFieldError, KBError
from llamaindex_kb.limits import DEFAULT_LIMITS, Limits, MiB, too_large

_FIELD = "file"
# Keeps a library's error text readable in an API answer.
_REASON_CHARS = 200
# C0 and C1 control characters other than tab, line feed, carriage return, form feed.
_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")
# Work is done in pieces of this size, so a limit or a cancellation is noticed soon.
_PIECE = 1 << 20

Checkpoint = Callable[[], None]


def format_bytes(count: int) -> str:
    for unit, size in (("MiB", MiB), ("KiB", 1024)):
        if count >= size:
            return f"{count / size:,.4g} {unit}"
    return f"{count:,} bytes"


class _UnreadableFile(Exception):
    """What is wrong with a file, phrased to follow its name ("is not a valid PDF (…)")."""


class _OverLimit(Exception):
    """The file passed ``limit``; ``problem`` follows its name ("inflates to more than…")."""

    def __init__(self, problem: str, limit: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.limit = limit


class Budget:
    """What reading one file may still use: the ``Limits`` in force, the text
    extracted so far, and a ``checkpoint`` called between pieces of work (it raises
    to stop them, e.g. when the client has gone)."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS, checkpoint: Checkpoint | None = None):
        self.limits = limits
        self.checkpoint = checkpoint or (lambda: None)
        self.chars = 0
        self.inflated = 0

    def text(self, text: str) -> str:
        """Count ``text`` as extracted; past ``extracted_chars`` the file is refused."""
        self.chars += len(text)
        if self.chars > self.limits.extracted_chars:
            raise _OverLimit(
                f"holds more than {self.limits.extracted_chars:,} characters of text",
                "extracted_chars")
        return text

    def inflate(self, count: int, declared: bool = False) -> None:
        """Count ``count`` bytes inflated (or, ``declared``, about to be)."""
        total = self.inflated + count
        if total > self.limits.inflated_bytes:
            verb = "declares parts that inflate" if declared else "inflates"
            raise _OverLimit(f"{verb} to more than {format_bytes(self.limits.inflated_bytes)}",
                             "inflated_bytes")
        if not declared:
            self.inflated = total


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 1] + "…"


def _documents(text: str, extra_info: dict[str, Any] | None) -> list[Document]:
    return [Document(text=text, metadata=dict(extra_info or {}))]


def _decode_text(data: bytes, declared: str | None = None) -> str:
    """Text from bytes: BOM first, then the ``declared`` encoding (an HTML page's
    ``<meta charset>``), then UTF-8, then the encoding charset-normalizer finds.

    Raises ``_UnreadableFile`` for binary data (NUL bytes, or more than 5% control
    characters after decoding), which is what an image or archive renamed .txt holds.
    """
    text = None
    for bom, codec in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                       (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            try:
                text = data.decode(codec)
            except UnicodeDecodeError as exc:
                raise _UnreadableFile(f"is not valid {codec} text ({_reason(exc)})") from exc
            break
    if text is None and b"\x00" in data:
        raise _UnreadableFile("is not a text file (it contains binary data)")
    for codec in (declared, "utf-8"):
        if text is None and codec is not None:
            try:
                text = data.decode(codec)
            except UnicodeDecodeError:
                pass
    if text is None:
        # Imported here: only non-UTF-8 files pay for it.
        import charset_normalizer

        match = charset_normalizer.from_bytes(data).best()
        if match is None:
            raise _UnreadableFile("is not a text file (no text encoding fits its bytes)")
        text = str(match)
    if _CONTROLS.subn("", text)[1] > 0.05 * len(text):
        raise _UnreadableFile("is not a text file (it contains binary data)")
    return text


class TextFileReader(BaseReader):
    """Plain text and Markdown, kept as written."""

    def load_data(self, file: Path, extra_info: dict[str, Any] | None = None,
                  budget: Budget | None = None) -> list[Document]:
        text = (budget or Budget()).text(_decode_text(Path(file).read_bytes()))
        return _documents(text, extra_info)


# Private-use code points: never whitespace, never in real text, so they survive the
# whitespace normalisation below and then become the paragraph and line breaks.
_PARAGRAPH = "\ue000"
_LINE = "\ue001"
_BREAKS = re.compile(rf" ?[{_PARAGRAPH}{_LINE}][ {_PARAGRAPH}{_LINE}]*")
_DROPPED_TAGS = frozenset({"head", "script", "style", "noscript", "template", "svg", "canvas",
                           "iframe", "object", "nav"})
_LINE_TAGS = frozenset({"li", "tr", "dt", "dd"})
_BLOCK_TAGS = frozenset({"address", "article", "aside", "blockquote", "caption", "details",
                         "div", "dl", "fieldset", "figcaption", "figure", "footer", "form", "h1",
                         "h2", "h3", "h4", "h5", "h6", "header", "hr", "main", "ol", "p", "pre",
                         "section", "summary", "table", "ul"})
# Elements that never have content or an end tag: never opened, so never left open.
_VOID_TAGS = frozenset({"area", "base", "basefont", "bgsound", "br", "col", "embed", "frame",
                        "hr", "img", "input", "keygen", "link", "meta", "param", "source",
                        "spacer", "track", "wbr"})
_MARKS = {**dict.fromkeys(_LINE_TAGS, _LINE), **dict.fromkeys(_BLOCK_TAGS, _PARAGRAPH)}
# Where a page declares its encoding: <meta charset=…> or http-equiv content, near the top.
_DECLARED_CHARSET = re.compile(rb"<meta[^>]{0,512}?charset\s*=\s*[\"']?\s*([-\w.:]+)", re.I)


class _VisibleText(HTMLParser):
    """Collects the visible text of a page from the parser's events, with marks.

    Open elements are a stack, closed the way BeautifulSoup's html.parser builder
    closes them (an end tag closes its most recent namesake and everything opened
    after it; one with no open namesake is ignored), but a per-name count of open
    elements makes each end tag cost only what it closes: linear in the page.
    """

    def __init__(self, budget: Budget) -> None:
        super().__init__(convert_charrefs=True)
        self.budget = budget
        self.parts: list[str] = []
        self.stack: list[str] = []
        self.open: Counter[str] = Counter()
        self.dropped = 0  # open elements whose content is not shown
        self.events = 0
        # The text runs of the first <title>, while it is read ("" separates runs).
        self.title: list[str] | None = None
        self.title_done = False
        self.title_dropped = 0  # self.dropped where the title opened

    def _emit(self, text: str) -> None:
        if not (self.open["pre"] and text):
            self.parts.append(self.budget.text(text))
            return
        self.parts.append(self.budget.text(text.replace("\n", _LINE)))

    def _event(self) -> None:
        self.events += 1
        if self.events % 4096 == 0:
            self.budget.checkpoint()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._event()
        self._title_run_ends()
        visible = not self.dropped
        if visible and tag in ("td", "th"):
            self._emit(" ")
        if visible and tag in _MARKS:
            self._emit(_MARKS[tag])
        if tag == "br" and visible:
            self._emit(_LINE)
        if tag in _VOID_TAGS:
            if visible and tag in _MARKS:
                self._emit(_MARKS[tag])
            return
        if tag == "title" and not self.title_done and self.title is None:
            self.title, self.title_dropped = [], self.dropped
        self.stack.append(tag)
        self.open[tag] += 1
        self.dropped += tag in _DROPPED_TAGS

    def handle_endtag(self, tag: str) -> None:
        self._title_run_ends()
        if not self.open[tag]:
            return
        while self.stack:
            closed = self.stack.pop()
            self._close(closed)
            if closed == tag:
                break

    def _close(self, tag: str) -> None:
        self.open[tag] -= 1
        self.dropped -= tag in _DROPPED_TAGS
        if tag == "title" and self.title is not None and not self.open["title"]:
            self.title_done = True
        if tag in _MARKS and not self.dropped:
            self._emit(_MARKS[tag])

    def handle_comment(self, data: str) -> None:
        self._title_run_ends()

    def _title_run_ends(self) -> None:
        if self.title and not self.title_done:
            self.title.append("")

    def handle_data(self, data: str) -> None:
        self._event()
        if self.title is not None and not self.title_done and self.dropped == self.title_dropped:
            self.title[-1:] = ["".join(self.title[-1:]) + data]
        if not self.dropped:
            self._emit(data)

    def close(self) -> None:
        # What is left unparsed at the end starts with an unterminated comment, tag or
        # declaration, which a browser would not show either. Left to html.parser, each
        # "<" in it would cost a scan to the end of the page: quadratic (before 3.13.4).
        if self.rawdata.startswith("<"):
            self.rawdata = ""
        super().close()
        while self.stack:
            self._close(self.stack.pop())


class HTMLReader(BaseReader):
    """Visible text of an HTML page, with its block structure kept as line breaks."""

    def load_data(self, file: Path, extra_info: dict[str, Any] | None = None,
                  budget: Budget | None = None) -> list[Document]:
        budget = budget or Budget()
        data = Path(file).read_bytes()
        declared = _DECLARED_CHARSET.search(data[:4096])
        encoding = declared.group(1).decode("ascii", "replace") if declared else None
        try:
            encoding = codecs.lookup(encoding).name if encoding else None
        except LookupError:
            encoding = None
        markup = _decode_text(data, encoding)
        del data
        parser = _VisibleText(budget)
        # Fed whole: html.parser rescans an unterminated construct on every feed.
        parser.feed(markup)
        parser.close()
        # As BeautifulSoup's get_text(" ", strip=True), with its whitespace collapsed.
        title = " ".join(" ".join(run.split()) for run in parser.title or [] if run.strip())
        # Source whitespace means nothing in HTML; only the marks inserted above do.
        text = re.sub(r"\s+", " ", "".join(parser.parts))
        text = _BREAKS.sub(lambda m: "\n\n" if _PARAGRAPH in m.group() else "\n", text).strip()
        if title and not text.startswith(title):
            text = f"{title}\n\n{text}"
        return _documents(text, extra_info)


class PDFReader(BaseReader):
    """One document per PDF page with text, ``metadata["page"]`` numbered from 1."""

    def load_data(self, file: Path, extra_info: dict[str, Any] | None = None,
                  budget: Budget | None = None) -> list[Document]:
        # Imported here: pypdf costs 0.2 s to import and only ingestion needs it.
        from pypdf import PdfReader

        budget = budget or Budget()
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
        documents = []
        try:
            pages = len(pdf.pages)
            if pages > budget.limits.chunks_per_document:
                raise _OverLimit(f"has {pages:,} pages, more than a document may have chunks "
                                 "(a page with text is at least one)", "chunks_per_document")
            for number, page in enumerate(pdf.pages, start=1):
                budget.checkpoint()
                # pypdf bounds each stream (75 MB); this bounds them all together.
                contents = page.get_contents()
                budget.inflate(len(contents.get_data()) if contents is not None else 0)
                text = budget.text(page.extract_text() or "")
                if text.strip():
                    documents.append(Document(text=text,
                                              metadata={**(extra_info or {}), "page": number}))
        except (_OverLimit, _UnreadableFile, KBError):
            raise
        except Exception as exc:
            raise _UnreadableFile(f"is not a valid PDF ({_reason(exc)})") from exc
        if not documents:
            raise _UnreadableFile(
                "has no text (its pages may be scanned images; OCR is not supported)"
            )
        return documents


_WORD_NS = "http://schemas.openxmlformats.org/wordprocessingml/2006/main}"
_DOCX_BREAKS = {f"{_WORD_NS}tab": "\t", f"{_WORD_NS}br": "\n", f"{_WORD_NS}cr": "\n",
                f"{_WORD_NS}p": "\n\n"}
_DOCX_HEADERS = re.compile(r"word/header[0-9]*.xml")
_DOCX_FOOTERS = re.compile(r"word/footer[0-9]*.xml")
# Opening a zip reads its whole directory into memory, about 10 bytes for each byte.
_ZIP_DIRECTORY_COST = 10


def _zip_directory_size(stream: IO[bytes]) -> int:
    """The size of a zip's central directory, from its end record (zip64 too), read
    before zipfile loads that directory; 0 if there is no end record (zipfile will
    then say what is wrong)."""
    end = stream.seek(0, io.SEEK_END)
    stream.seek(max(0, end - 22 - 0xFFFF - 20))
    tail = stream.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        return 0
    (size,) = struct.unpack_from("<I", tail, at + 12)
    if size == 0xFFFFFFFF and at >= 20 and tail[at - 20 : at - 16] == b"PK\x06\x07":
        (offset,) = struct.unpack_from("<Q", tail, at - 20 + 8)
        stream.seek(offset)
        record = stream.read(56)
        if len(record) == 56 and record[:4] == b"PK\x06\x06":
            (size,) = struct.unpack_from("<Q", record, 40)
    return size


class DocxReader(BaseReader):
    """The text of a Word (.docx) file: headers, body, footers, as docx2txt reads them.

    The parts are inflated a piece at a time into expat, never whole into memory or
    into a tree: the declared sizes are checked before inflating and the bytes really
    inflated while inflating (a declared size can lie), both against ``inflated_bytes``.
    """

    def load_data(self, file: Path, extra_info: dict[str, Any] | None = None,
                  budget: Budget | None = None) -> list[Document]:
        budget = budget or Budget()
        try:
            with open(file, "rb") as stream:
                directory = _zip_directory_size(stream)
                if directory * _ZIP_DIRECTORY_COST > budget.limits.inflated_bytes:
                    raise _OverLimit(
                        f"has a zip directory of {format_bytes(directory)}, which would take "
                        f"more than {format_bytes(budget.limits.inflated_bytes)} to open",
                        "inflated_bytes")
                with zipfile.ZipFile(stream) as archive:
                    names = archive.namelist()
                    parts = ([n for n in names if _DOCX_HEADERS.match(n)] + ["word/document.xml"]
                             + [n for n in names if _DOCX_FOOTERS.match(n)])
                    infos = [archive.getinfo(name) for name in parts]
                    budget.inflate(sum(info.file_size for info in infos), declared=True)
                    pieces: list[str] = []
                    for info in infos:
                        _docx_part_text(archive, info, budget, pieces)
        except (_OverLimit, _UnreadableFile, KBError):
            raise
        except Exception as exc:  # zipfile, KeyError (no document.xml), expat errors
            raise _UnreadableFile(f"is not a valid Word document ({_reason(exc)})") from exc
        # Every paragraph starts with a blank line, so empty paragraphs pile up.
        return _documents(re.sub(r"\n{3,}", "\n\n", "".join(pieces).strip()), extra_info)


def _refuse_entities(*_: object) -> None:
    raise _UnreadableFile("is not a valid Word document (it declares XML entities)")


def _docx_part_text(archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: Budget,
                    pieces: list[str]) -> None:
    parser = expat.ParserCreate(namespace_separator="}")
    # Word never declares entities; refusing them rules out entity expansion bombs.
    parser.EntityDeclHandler = _refuse_entities
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    in_text = 0

    def start(name: str, _attrs: object) -> None:
        nonlocal in_text
        if name == f"{_WORD_NS}t":
            in_text += 1
        elif name in _DOCX_BREAKS:
            pieces.append(budget.text(_DOCX_BREAKS[name]))

    def end(name: str) -> None:
        nonlocal in_text
        if name == f"{_WORD_NS}t":
            in_text -= 1

    def data(text: str) -> None:
        if in_text:
            pieces.append(budget.text(text))

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = data
    parser.buffer_text = True
    with archive.open(info) as member:
        while piece := member.read(_PIECE):
            budget.inflate(len(piece))
            budget.checkpoint()
            parser.Parse(piece, False)
    parser.Parse(b"", True)


class CSVReader(BaseReader):
    """A table: each row a paragraph of ``column: value`` lines under the header's names."""

    def load_data(self, file: Path, extra_info: dict[str, Any] | None = None,
                  budget: Budget | None = None) -> list[Document]:
        budget = budget or Budget()
        text = _decode_text(Path(file).read_bytes())
        try:
            dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(
                text[:8192], delimiters=",;\t|"
            )
        except csv.Error:  # one column, or too little text to tell: plain commas
            dialect = csv.excel
        # Rows are read one at a time: a table held whole as lists of cells takes
        # ~30 times its size in memory.
        rows = (row for row in csv.reader(io.StringIO(text, newline=""), dialect)
                if any(cell.strip() for cell in row))
        header: list[str] | None = None
        paragraphs = []
        try:
            for number, row in enumerate(rows):
                if header is None:
                    header = [name.strip() for name in row]
                    continue
                if number % 10_000 == 0:
                    budget.checkpoint()
                lines = []
                for index, value in enumerate(row):
                    name = header[index] if index < len(header) and header[index] else None
                    value = _single_paragraph(value)
                    if value:
                        lines.append(f"{name or f'column {index + 1}'}: {value}")
                if lines:
                    paragraphs.append(budget.text("\n".join(lines)))
        except csv.Error as exc:
            raise _UnreadableFile(f"is not a valid CSV file ({_reason(exc)})") from exc
        if header is None:
            return _documents("", extra_info)
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


# Parsed JSON takes far more memory than its text: ~200 bytes for a one-key object
# written in 8. Each "," "[" and "{" (an upper bound on the values) is counted as this
# many bytes toward inflated_bytes before parsing.
JSON_VALUE_COST = 100


class JSONReader(BaseReader):
    """JSON (``.json``) or JSON Lines (``.jsonl``) flattened to ``key.path: value`` lines."""

    def __init__(self, *, lines: bool = False) -> None:
        self.lines = lines

    def load_data(self, file: Path, extra_info: dict[str, Any] | None = None,
                  budget: Budget | None = None) -> list[Document]:
        budget = budget or Budget()
        text = _decode_text(Path(file).read_bytes())
        values = text.count(",") + text.count("[") + text.count("{")
        if values * JSON_VALUE_COST > budget.limits.inflated_bytes:
            raise _OverLimit(f"has up to {values:,} values, which would take more than "
                             f"{format_bytes(budget.limits.inflated_bytes)} once parsed",
                             "inflated_bytes")
        if self.lines:
            records = []
            for number, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    records.append(_parse_json(line, f"line {number}: ", budget))
        else:
            records = [_parse_json(text, "", budget)]
        paragraphs = [p for record in records for p in _json_paragraphs(record, "")]
        return _documents(budget.text("\n\n".join(paragraphs)), extra_info)


def _json_number(text: str) -> int | str:
    # Past Python's 4,300 digits int() refuses; such a number is kept as written,
    # which is also how it reads in the extracted text.
    return int(text) if len(text) <= 4000 else text


def _parse_json(text: str, where: str, budget: Budget) -> Any:
    at = f" ({where.rstrip(': ')})" if where else ""
    too_deep = _OverLimit(f"is nested more than {budget.limits.markup_depth} levels deep{at}",
                          "markup_depth")
    try:
        value = json.loads(text, parse_int=_json_number)
    except RecursionError:
        raise too_deep from None
    except json.JSONDecodeError as exc:
        raise _UnreadableFile(f"is not valid JSON ({where}{_reason(exc)})") from exc
    if _json_depth(value) > budget.limits.markup_depth:
        raise too_deep
    return value


def _json_depth(value: Any) -> int:
    """How deep lists and objects nest in ``value``, without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, depth)
        todo.extend((child, depth + 1) for child in item)
    return deepest


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


def upload_name(filename: str) -> str:
    """The name an uploaded file is known by: browsers and clients may send a path
    ("C:\\\\fakepath\\\\a.pdf", "../../a.pdf"), of which the last part is kept."""
    return re.split(r"[\\/]", filename)[-1].strip()


def read_file(path: Path, *, source_name: str | None = None, limits: Limits = DEFAULT_LIMITS,
              checkpoint: Checkpoint | None = None) -> list[Document]:
    """The LlamaIndex documents in one file; the format is chosen by its suffix.

    ``source_name`` (default: the file's name) names the file in error messages; its
    last part becomes ``metadata["file_name"]``. Every document also gets
    ``metadata["file_type"]`` (the suffix without the dot) and PDF pages ``"page"``;
    all metadata is excluded from the embedded and LLM text. Newlines are
    normalised to ``\\n``. ``checkpoint`` is called between pieces of work; whatever
    it raises stops the reading and passes through.

    Raises ``InvalidFieldError("file", ...)`` naming the file for an unsupported
    suffix, an unreadable or damaged file, and a file with no text;
    ``PayloadTooLargeError`` naming the limit for a file over one of ``limits``.
    """
    name = source_name or path.name
    suffix = path.suffix.lower()
    reader = _READERS.get(suffix)
    if reader is None:
        raise _invalid(name, _unsupported(suffix))
    metadata = {"file_name": PurePath(name).name, "file_type": suffix.lstrip(".")}
    budget = Budget(limits, checkpoint)
    try:
        size = path.stat().st_size
        if size > limits.upload_bytes:
            raise _OverLimit(f"is larger than {format_bytes(limits.upload_bytes)}", "upload_bytes")
        budget.checkpoint()
        documents = reader.load_data(path, extra_info=metadata, budget=budget)
    except _OverLimit as exc:
        raise too_large(f"{_FIELD}: {name}", exc.problem, exc.limit) from None
    except _UnreadableFile as exc:
        raise _invalid(name, str(exc)) from exc
    except OSError as exc:  # strerror, not str(exc): the message must not show server paths
        raise _invalid(name, f"cannot be read ({exc.strerror or type(exc).__name__})") from exc
    except KBError:
        raise
    except RecursionError as exc:
        raise _invalid(name, f"is nested too deeply to read as {suffix}") from exc
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


def read_bytes(data: bytes, filename: str, *, limits: Limits = DEFAULT_LIMITS,
               checkpoint: Checkpoint | None = None) -> list[Document]:
    """Like ``read_file`` for the bytes of an upload: ``filename`` gives the format and
    the name (its last part, see ``upload_name``)."""
    with spool(io.BytesIO(data), filename, limits) as path:
        return read_file(path, source_name=upload_name(filename), limits=limits,
                         checkpoint=checkpoint)


@contextlib.contextmanager
def spool(stream: IO[bytes], filename: str, limits: Limits = DEFAULT_LIMITS,
          seen: Callable[[bytes], object] | None = None) -> Iterator[Path]:
    """``stream`` copied a piece at a time to a file with ``filename``'s suffix in a
    private temporary directory (the readers take paths), removed when the block ends.

    ``seen`` gets every piece (to hash the upload without holding it). An unsupported
    suffix is refused before anything is copied, a stream longer than
    ``upload_bytes`` as soon as it passes that.
    """
    name = upload_name(filename)
    if not name:
        raise InvalidFieldError(_FIELD, "the upload has no file name")
    suffix = PurePath(name).suffix.lower()
    if suffix not in _READERS:
        raise _invalid(name, _unsupported(suffix))
    with tempfile.TemporaryDirectory(prefix="llamaindex-kb-upload-") as directory:
        path = Path(directory) / f"upload{suffix}"
        copied = 0
        with open(path, "wb") as target:
            while piece := stream.read(_PIECE):
                copied += len(piece)
                if copied > limits.upload_bytes:
                    raise too_large(f"{_FIELD}: {name}", "is larger than "
                                     f"{format_bytes(limits.upload_bytes)}", "upload_bytes")
                if seen is not None:
                    seen(piece)
                target.write(piece)
        yield path


def _unsupported(suffix: str) -> str:
    return (f"has an unsupported file type ({suffix or 'no suffix'}); supported: "
            f"{', '.join(sorted(SUPPORTED_SUFFIXES))}")
