"""POST /documents under hostile uploads: every answer a 4xx naming the problem, nothing
half-written, limits on what a file expands to, uploads taking turns and stopping
when their client has gone. In-process through ``KnowledgeAPI.handle``, with raw bodies."""

from __future__ import annotations

import io
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY, PLUGIN_ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug import Request
from werkzeug.test import EnvironBuilder

from llamaindex_kb import load_settings
from llamaindex_kb.errors import BadRequestError
from llamaindex_kb.http import upload as documents
from llamaindex_kb.http.app import KnowledgeAPI
from llamaindex_kb.service import api_for

AUTH = {"Authorization": f"Bearer {API_KEY}"}
BOUNDARY = "fuzzboundary7f3a"
W_NS = 'xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"'


# ---------------------------------------------------------------- files, built by hand


def pdf_file(pages: list[bytes]) -> bytes:
    """A PDF whose page i draws ``pages[i]``, a content stream stored Flate-compressed."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for content in pages:
        packed = zlib.compress(content, 9)
        kids.append(f"{len(objects) + 1} 0 R".encode())
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents "
                       + f"{len(objects) + 2} 0 R".encode()
                       + b" /Resources << /Font << /F1 3 0 R >> >> >>")
        objects.append(b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(packed)
                       + packed + b"\nendstream")
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(kids), len(pages))
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)
    return bytes(out)


def pdf_text(line: str) -> bytes:
    return b"BT /F1 12 Tf 72 720 Td (%s) Tj ET" % line.encode()


def docx_file(body_xml: bytes, **parts: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        archive.writestr("word/document.xml", body_xml)
        for name, data in parts.items():
            archive.writestr(name.replace("__", "/"), data)
    return buffer.getvalue()


def word_xml(text: bytes) -> bytes:
    return (b'<?xml version="1.0"?><w:document ' + W_NS.encode() + b"><w:body><w:p><w:r><w:t>"
            + text + b"</w:t></w:r></w:p></w:body></w:document>")


def declaring(archive: bytes, member: str, size: int) -> bytes:
    """``archive`` with the central directory declaring ``member`` to inflate to ``size``."""
    out = bytearray(archive)
    at = out.find(b"PK\x01\x02")
    while at >= 0:
        length = int.from_bytes(out[at + 28 : at + 30], "little")
        if out[at + 46 : at + 46 + length] == member.encode():
            out[at + 24 : at + 28] = size.to_bytes(4, "little")
        at = out.find(b"PK\x01\x02", at + 4)
    return bytes(out)


GOOD_FILES = {
    "notes.txt": b"Llamas hum when they are content.",
    "guide.md": b"# Guide\n\nAlpacas are shorn once a year.",
    "page.html": b"<html><title>Herd</title><body><p>Llamas guard sheep.</p></body></html>",
    "table.csv": b"animal,food\nllama,hay\nalpaca,grass\n",
    "faq.json": b'{"q": "Do llamas spit?", "a": "Rarely at people."}',
    "log.jsonl": b'{"event": "shearing"}\n{"event": "birth"}\n',
    "manual.pdf": pdf_file([pdf_text("Llamas live in the Andes.")]),
    "report.docx": docx_file(word_xml(b"Revenue grew by twelve percent.")),
}


# ---------------------------------------------------------------- requests


def multipart(parts: list[tuple[bytes, bytes | None, bytes]], boundary: str = BOUNDARY) -> bytes:
    """A multipart body from raw (name, filename or None, content) parts."""
    out = bytearray()
    for name, filename, content in parts:
        out += b"--" + boundary.encode() + b"\r\nContent-Disposition: form-data; name=\"" + name
        if filename is not None:
            out += b"\"; filename=\"" + filename
        out += b"\"\r\n\r\n" + content + b"\r\n"
    return bytes(out + b"--" + boundary.encode() + b"--\r\n")


def form(knowledge_id: str, name: str, content: bytes, **fields: str) -> tuple[bytes, str]:
    parts = [(b"knowledge_id", None, knowledge_id.encode())]
    parts += [(key.encode(), None, value.encode()) for key, value in fields.items()]
    parts.append((b"file", name.encode(), content))
    return multipart(parts), f"multipart/form-data; boundary={BOUNDARY}"


def environ(body: bytes, content_type: str | None,
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    headers = dict(AUTH)
    if content_type is not None:
        headers["Content-Type"] = content_type
    built = EnvironBuilder(method="POST", path="/documents", headers=headers,
                           input_stream=io.BytesIO(body), content_length=len(body)).get_environ()
    built.update(extra or {})
    return built


def post(api: KnowledgeAPI, body: bytes, content_type: str | None,
         extra: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    response = api.handle(Request(environ(body, content_type, extra)))
    return response.status_code, json.loads(response.get_data())


def api_with(data_dir: Path, **limits: int) -> KnowledgeAPI:
    return api_for(load_settings({"api_key": API_KEY, "data_dir": data_dir, **limits},
                                 environ={}))


def written(data_dir: Path) -> list[str]:
    """Every file and folder under ``data_dir``: what a failed upload must not change."""
    return sorted(str(path.relative_to(data_dir)) for path in data_dir.rglob("*"))


def spools() -> list[str]:
    return [name for name in os.listdir(tempfile.gettempdir())
            if name.startswith("llamaindex-kb-upload-")]


@pytest.fixture(autouse=True, scope="module")
def _private_tempdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Uploads spool here, so a test sees exactly what they leave behind."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(tmp_path_factory.mktemp("spool")))
        yield


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


# ---------------------------------------------------------------- the fuzzer

ODD_IDS = ["kb", "..", ".", "a/b", "kb-d6b96a97d147daaae49eb87a", "x" * 201, "\x00", "sp ace",
           "\u202e", "tab\t", "\ud800", "知识库", "", "   "]
ODD_NAMES = ["../../etc/passwd.txt", "C:\\fakepath\\a.pdf", "", ".", "..", "a/", "dir/.md",
             "nul\x00.txt", "x" * 300 + ".md", "no-suffix", "UPPER.DOCX", "é.json", "a.exe",
             "\ufffd.txt", "cr\r\n.txt"]
ODD_JSON = ["", "{}", "[1]", "{not json", "[" * 5000, '{"a": NaN}', '{"a": 1e999}',
            '{"a": ' + "9" * 5000 + "}", '{"a": {"b": 1}}', '{"a": [{"b": 1}]}',
            '{"document_id": 1}', '{"k": "\\ud800"}', '{"k": "a\\u0000b"}', '{"": 1}',
            '{"a": 9223372036854775808}', '{"max_tokens": -5}',
            '{"max_tokens": 100, "overlap": 100}', '{"delimiter": "\\u0000"}',
            '{"mode": "parent_child", "child_max_tokens": 300}', '{"unknown": 1}']


@st.composite
def file_content(draw: st.DrawFn) -> tuple[str, bytes]:
    name, data = draw(st.sampled_from(sorted(GOOD_FILES.items())))
    damage = draw(st.sampled_from(["none"] * 5 + ["truncate", "flip", "noise", "empty",
                                                  "prefix"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif damage == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    elif damage == "noise":
        data = draw(st.binary(max_size=300))
    elif damage == "empty":
        data = b""
    elif damage == "prefix":
        data = b"\xff\xfe\x00" + data
    if draw(st.integers(0, 3)) == 0:
        name = draw(st.sampled_from(ODD_NAMES))
    return name, data


@st.composite
def multipart_body(draw: st.DrawFn) -> tuple[bytes, str | None]:
    parts: list[tuple[bytes, bytes | None, bytes]] = []
    knowledge_id = draw(st.sampled_from(["kb", "kb2"]) | st.sampled_from(ODD_IDS)
                        | st.text(max_size=20))
    if draw(st.integers(0, 9)):
        parts.append((b"knowledge_id", None, knowledge_id.encode("utf-8", "surrogatepass")))
    for field in ("metadata", "chunking", "mode"):
        if draw(st.integers(0, 4)) == 0:
            value = draw(st.sampled_from(ODD_JSON) if field != "mode"
                         else st.sampled_from(["", "keyword", "vector", "hybrid", "x"]))
            parts.append((field.encode(), None, value.encode()))
    name, data = draw(file_content())
    if draw(st.integers(0, 9)):
        parts.append((b"file", name.encode("utf-8", "surrogatepass"), data))
    if draw(st.integers(0, 5)) == 0:  # a field sent as raw bytes that are not UTF-8
        parts.append((draw(st.sampled_from([b"knowledge_id", b"metadata", b"x\xff"])), None,
                      draw(st.binary(max_size=20))))
    body = multipart(draw(st.permutations(parts)))
    shape = draw(st.sampled_from(["ok"] * 12 + ["cut", "no-boundary", "other-boundary",
                                               "no-type", "text/plain", "json-type"]))
    content_type: str | None = f"multipart/form-data; boundary={BOUNDARY}"
    if shape == "cut":
        body = body[: draw(st.integers(0, len(body)))]
    elif shape == "no-boundary":
        content_type = "multipart/form-data"
    elif shape == "other-boundary":
        content_type = "multipart/form-data; boundary=elsewhere"
    elif shape == "no-type":
        content_type = None
    elif shape == "text/plain":
        content_type = "text/plain"
    elif shape == "json-type":
        content_type = "application/json"
    return body, content_type


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=8)


@st.composite
def json_body(draw: st.DrawFn) -> tuple[bytes, str | None]:
    payload: dict[str, Any] = {}
    def usually(good: Any, odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.just(good) | st.just(good) | odd

    for field, values, present in (
            ("knowledge_id", usually("kb", st.sampled_from(ODD_IDS) | JSON_VALUES), 9),
            ("title", usually("Wi-Fi", st.sampled_from(["", "\ud800", "t\x00"]) | JSON_VALUES), 9),
            ("text", usually("Guest Wi-Fi rotates monthly.",
                             st.sampled_from(["", " ", "a\x00b", "\udfff"]) | JSON_VALUES), 9),
            ("document_id", usually("doc-1", st.sampled_from(["../x", "a/b", ".", ""])
                                    | JSON_VALUES), 3),
            ("metadata", usually({"team": "it"}, JSON_VALUES), 3),
            ("chunking", usually({"max_tokens": 100}, JSON_VALUES), 2),
            ("mode", usually("keyword", st.sampled_from(["x", "vector"])), 3)):
        if draw(st.integers(0, 9)) < present:
            payload[field] = draw(values)
    raw = json.dumps(payload, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    shape = draw(st.sampled_from(["ok"] * 8 + ["cut", "not-utf8", "deep", "scalar"]))
    if shape == "cut":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif shape == "not-utf8":
        raw = raw.replace(b"W", b"\xff")
    elif shape == "deep":
        raw = b'{"knowledge_id": "kb", "metadata": ' + b"[" * 100_000 + b"}"
    elif shape == "scalar":
        raw = draw(st.sampled_from([b"null", b"1", b'"x"', b"[]", b"NaN", b"1" * 5000]))
    return raw, "application/json"


@pytest.fixture(scope="module")
def fuzzed_api(tmp_path_factory: pytest.TempPathFactory) -> tuple[KnowledgeAPI, Path]:
    data_dir = tmp_path_factory.mktemp("fuzz") / "data"
    return api_with(data_dir), data_dir


@settings(max_examples=int(os.environ.get("UPLOAD_FUZZ_EXAMPLES", "120")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=multipart_body() | json_body())
def test_every_generated_upload_is_answered_without_a_5xx_and_a_failure_writes_nothing(
    fuzzed_api: tuple[KnowledgeAPI, Path], request: tuple[bytes, str | None]
) -> None:
    api, data_dir = fuzzed_api
    before = written(data_dir)

    status, answer = post(api, *request)

    assert status < 500, answer
    if status >= 400:
        assert isinstance(answer["error_code"], int) and 1000 <= answer["error_code"] < 5000
        assert isinstance(answer["error_msg"], str) and answer["error_msg"]
        assert "internal error" not in answer["error_msg"]
        assert written(data_dir) == before
    else:
        assert status == 201 and answer["document"]["chunks"] >= 1
    assert spools() == []


# ---------------------------------------------------------------- limits


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_docx_that_inflates_past_the_limit_is_refused_before_inflating(data_dir: Path) -> None:
    api = api_with(data_dir)
    bomb = docx_file(word_xml(b"<w:p/>" * 50_000_000))  # 300 MB of XML in a ~0.4 MB file
    peak = peak_rss_mb()
    started = time.monotonic()

    status, answer = post(api, *form("kb", "bomb.docx", bomb))

    assert time.monotonic() - started < 5
    assert (status, answer["error_code"]) == (413, 3006)
    assert answer["error_msg"] == (
        "file: bomb.docx declares parts that inflate to more than 200 MiB "
        "(setting LLAMAINDEX_KB_MAX_INFLATED_BYTES)")
    assert peak_rss_mb() - peak < 50
    assert written(data_dir) == []


def test_docx_whose_declared_sizes_lie_is_stopped_while_inflating(data_dir: Path) -> None:
    api = api_with(data_dir, max_inflated_bytes=1024 * 1024)
    honest = docx_file(word_xml(b"<w:p/>" * 1_000_000))  # 6 MB of XML
    lying = declaring(honest, "word/document.xml", 1000)

    status, answer = post(api, *form("kb", "small.docx", lying))
    assert (status, answer["error_code"]) == (400, 3002)
    assert "small.docx is not a valid Word document" in answer["error_msg"]

    status, answer = post(api, *form("kb", "big.docx", honest))
    assert (status, answer["error_code"]) == (413, 3006)
    assert "LLAMAINDEX_KB_MAX_INFLATED_BYTES" in answer["error_msg"]
    assert written(data_dir) == []


def test_docx_declaring_xml_entities_is_refused(data_dir: Path) -> None:
    laughs = (b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaaaaaaaa">'
              b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]><w:document ' + W_NS.encode()
              + b"><w:body><w:p><w:r><w:t>&b;</w:t></w:r></w:p></w:body></w:document>")

    status, answer = post(api_with(data_dir), *form("kb", "laughs.docx", docx_file(laughs)))

    assert (status, answer["error_msg"]) == (
        400, "file: laughs.docx is not a valid Word document (it declares XML entities)")


def test_html_nested_32000_deep_is_read_in_linear_time(data_dir: Path) -> None:
    """It took 42 s, growing with the square of the depth, when read into a tree."""
    api = api_with(data_dir)
    timings = []
    for depth in (32_000, 128_000):
        page = b"<div>" * depth + b"deep text" + b"</div>" * depth
        started = time.monotonic()
        status, answer = post(api, *form("kb", f"deep{depth}.html", page, mode="keyword"))
        timings.append(time.monotonic() - started)
        assert status == 201, answer
    assert timings[0] < 5
    assert timings[1] < 4 * timings[0] * 2  # 4 times deeper: about 4 times longer


def test_html_ending_in_unterminated_comments_is_read_in_linear_time(data_dir: Path) -> None:
    """html.parser before Python 3.13.4 rescans the rest of the page for each of them."""
    page = b"<p>Llamas hum.</p>" + b"<!--" * 300_000
    started = time.monotonic()

    status, answer = post(api_with(data_dir), *form("kb", "open.html", page, mode="keyword"))

    assert status == 201, answer
    assert time.monotonic() - started < 5


def test_json_nested_deeper_than_the_limit_is_refused_naming_it(data_dir: Path) -> None:
    api = api_with(data_dir, max_markup_depth=10)
    for depth, expected in ((10, 201), (11, 413), (100_000, 413)):
        nested = b"[" * depth + b'"llama"' + b"]" * depth
        status, answer = post(api, *form("kb", f"d{depth}.json", nested, mode="keyword"))
        assert status == expected, (depth, answer)
    assert answer["error_msg"] == (
        "file: d100000.json is nested more than 10 levels deep "
        "(setting LLAMAINDEX_KB_MAX_MARKUP_DEPTH)")


def test_json_whose_values_would_fill_memory_is_refused_before_parsing(data_dir: Path) -> None:
    many = b"[" + b",".join([b"{}"] * 3_000_000) + b"]"  # 9 MB, over 1 GB once parsed

    status, answer = post(api_with(data_dir), *form("kb", "many.json", many))

    assert (status, answer["error_code"]) == (413, 3006)
    assert "LLAMAINDEX_KB_MAX_INFLATED_BYTES" in answer["error_msg"]


def test_text_over_the_extracted_characters_limit_is_refused(data_dir: Path) -> None:
    api = api_with(data_dir, max_extracted_chars=2000)
    text = "Llamas hum. " * 200

    for name, data in (("long.txt", text.encode()),
                       ("long.html", f"<p>{text}</p>".encode()),
                       ("long.docx", docx_file(word_xml(text.encode()))),
                       ("long.pdf", pdf_file([pdf_text(text)]))):
        status, answer = post(api, *form("kb", name, data, mode="keyword"))
        assert (status, answer["error_code"]) == (413, 3006), name
        assert answer["error_msg"] == (
            f"file: {name} holds more than 2,000 characters of text "
            "(setting LLAMAINDEX_KB_MAX_EXTRACTED_CHARS)")
    posted = json.dumps({"knowledge_id": "kb", "title": "t", "text": text}).encode()
    status, answer = post(api, posted, "application/json")
    assert (status, answer["error_code"]) == (413, 3006)
    assert "LLAMAINDEX_KB_MAX_EXTRACTED_CHARS" in answer["error_msg"]
    assert written(data_dir) == []


def test_document_with_more_chunks_than_the_limit_is_refused(data_dir: Path) -> None:
    api = api_with(data_dir, max_chunks_per_document=3)
    paragraphs = "\n\n".join(f"Paragraph {n} about llamas. " * 30 for n in range(10))

    status, answer = post(api, *form("kb", "many.md", paragraphs.encode(), mode="keyword"))

    assert (status, answer["error_msg"]) == (413, (
        "file: many.md gives more than 3 chunks "
        "(setting LLAMAINDEX_KB_MAX_CHUNKS_PER_DOCUMENT)"))
    assert written(data_dir) == []


def test_pdf_over_the_page_or_inflated_limits_is_refused(data_dir: Path) -> None:
    api = api_with(data_dir, max_chunks_per_document=2, max_inflated_bytes=64 * 1024)

    pages = pdf_file([pdf_text("Llamas.")] * 3)
    status, answer = post(api, *form("kb", "pages.pdf", pages, mode="keyword"))
    assert (status, answer["error_code"]) == (413, 3006)
    assert "has 3 pages" in answer["error_msg"]
    assert "LLAMAINDEX_KB_MAX_CHUNKS_PER_DOCUMENT" in answer["error_msg"]

    padded = pdf_file([pdf_text("Llamas.") + b" " * 100_000])
    status, answer = post(api, *form("kb", "padded.pdf", padded, mode="keyword"))
    assert (status, answer["error_msg"]) == (413, (
        "file: padded.pdf inflates to more than 64 KiB "
        "(setting LLAMAINDEX_KB_MAX_INFLATED_BYTES)"))


def test_upload_larger_than_the_limit_is_refused_without_reading_it(data_dir: Path) -> None:
    api = api_with(data_dir, max_upload_bytes=4096)

    status, answer = post(api, *form("kb", "big.txt", b"llama " * 1000))

    assert (status, answer["error_msg"]) == (413, (
        "file: big.txt is larger than 4 KiB "
        "(setting LLAMAINDEX_KB_MAX_UPLOAD_BYTES)"))
    assert written(data_dir) == [] and spools() == []


def test_metadata_copied_onto_every_chunk_counts_toward_the_inflated_limit(
    data_dir: Path,
) -> None:
    api = api_with(data_dir, max_inflated_bytes=64 * 1024)
    text = "\n\n".join(f"Paragraph {n} about llamas. " * 30 for n in range(20))

    status, answer = post(api, *form("kb", "tagged.md", text.encode(), mode="keyword",
                                     metadata=json.dumps({"note": "x" * 5000})))

    assert (status, answer["error_code"]) == (413, 3006)
    assert "metadata" in answer["error_msg"]
    assert "LLAMAINDEX_KB_MAX_INFLATED_BYTES" in answer["error_msg"]


# ---------------------------------------------------------------- turns and cancellation


def upload_request(knowledge_id: str, text: str, **extra: Any) -> Request:
    body = json.dumps({"knowledge_id": knowledge_id, "title": "long", "text": text}).encode()
    return Request(environ(body, "application/json", extra))


def long_text(paragraphs: int) -> str:
    words = "llama alpaca andes wool grass hay water salt herd spit".split()
    rng = random.Random(3)
    return "\n\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(paragraphs))


def counting(flip_at: int | None) -> tuple[Callable[[], bool], list[int]]:
    """A ``cancelled`` that turns True on its ``flip_at``-th call, and its call count."""
    calls = [0]

    def cancelled() -> bool:
        calls[0] += 1
        return flip_at is not None and calls[0] >= flip_at

    return cancelled, calls


def test_upload_stops_with_nothing_written_when_its_client_has_gone(data_dir: Path) -> None:
    api = api_with(data_dir)
    text = long_text(140)  # ~70 chunks: two embedding batches
    cancelled, calls = counting(None)
    documents.upload(upload_request("full", text), api.library.store, api.models,
                     cancelled=cancelled)
    # Before reading, while chunking (every few hundred token counts), before each
    # embedding batch and before publishing.
    checks = calls[0]
    assert checks >= 5
    before = written(data_dir)

    for flip_at in (1, checks - 1, checks):  # at once, before the last batch, before publishing
        cancelled, calls = counting(flip_at)
        with pytest.raises(BadRequestError, match="client disconnected") as caught:
            documents.upload(upload_request("cancelled", text), api.library.store, api.models,
                             cancelled=cancelled)
        assert calls[0] == flip_at and caught.value.status == 400
        assert written(data_dir) == before


def test_waitress_disconnect_flag_in_the_environ_stops_an_upload(data_dir: Path) -> None:
    api = api_with(data_dir)
    body = json.dumps({"knowledge_id": "kb", "title": "t", "text": long_text(50)}).encode()

    status, answer = post(api, body, "application/json",
                          {"waitress.client_disconnected": lambda: True})

    assert (status, answer["error_code"]) == (400, 3000)
    assert written(data_dir) == []


# Run apart: a whole test run is gevent-patched by the Dify SDK's test modules, where
# threads are greenlets that never preempt each other, as in the plugin. The
# standalone server has real threads, and so does this script.
TAKING_TURNS = """
import json, sys, threading, time
from werkzeug import Request
from werkzeug.test import EnvironBuilder
from llamaindex_kb.http import upload as documents; from llamaindex_kb import load_settings
from llamaindex_kb.errors import ServerBusyError
from llamaindex_kb.service import api_for

api = api_for(load_settings({"api_key": "k", "data_dir": sys.argv[1]}, environ={}))
started, stop, outcome = threading.Event(), threading.Event(), {}

def request(knowledge_id, text):
    body = json.dumps({"knowledge_id": knowledge_id, "title": "t", "text": text}).encode()
    return Request(EnvironBuilder(method="POST", path="/documents", data=body,
        content_type="application/json", headers={"Authorization": "Bearer k"}).get_environ())

def cancelled():
    started.set()
    return stop.is_set()

def slow():
    try:
        text = "\\n\\n".join(f"Paragraph {n} tells of llamas and alpacas in the Andes." * 8
                             for n in range(3000))
        documents.upload(request("slow", text), api.library.store, api.models,
                         cancelled=cancelled)
    except Exception as exc:
        outcome["slow"] = str(exc)

worker = threading.Thread(target=slow)
worker.start()
started.wait(60)
began = time.monotonic()
answer = api.handle(request("other", "Llamas hum."))
waited = time.monotonic() - began
try:
    documents.upload(request("other", "Llamas hum."), api.library.store, api.models)
except ServerBusyError as exc:
    outcome["retry_after"] = exc.retry_after
stop.set()
worker.join(60)
print(json.dumps({"status": answer.status_code, "answer": json.loads(answer.get_data()),
                  "waited": waited, **outcome}))
"""


def test_an_upload_that_cannot_get_a_turn_soon_answers_429(data_dir: Path) -> None:
    result = subprocess.run([sys.executable, "-c", TAKING_TURNS, str(data_dir)],
                            cwd=PLUGIN_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])

    assert (seen["status"], seen["answer"]["error_code"]) == (429, 5029)
    assert "try again in 30 s" in seen["answer"]["error_msg"]
    assert documents.SLOT_WAIT_SECONDS <= seen["waited"] < documents.SLOT_WAIT_SECONDS + 2
    assert seen["retry_after"] == documents.RETRY_AFTER_SECONDS
    assert "client disconnected" in seen["slow"]  # the first stopped when told to
    assert not (data_dir / "kbs").exists() or written(data_dir / "kbs") == []
