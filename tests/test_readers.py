"""Reading real files of every supported type into LlamaIndex documents, and reporting
bad ones as InvalidFieldError naming the file."""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import docx
import pytest
from llama_index.core.schema import MetadataMode
from reportlab.lib.pdfencrypt import StandardEncryption
from reportlab.pdfgen import canvas

from llamaindex_kb.errors import InvalidFieldError, error_status
from llamaindex_kb.ingestion.readers import SUPPORTED_SUFFIXES, read_bytes, read_file


def write_pdf(path: Path, pages: list[list[str]], *, password: str | None = None) -> Path:
    """A real PDF with one text line per string; an empty list makes a page without text."""
    pdf = canvas.Canvas(
        str(path), encrypt=StandardEncryption(password) if password is not None else None
    )
    for lines in pages:
        for row, line in enumerate(lines):
            pdf.drawString(72, 720 - 20 * row, line)
        if not lines:
            pdf.rect(72, 600, 200, 100)  # a drawing, as on a scanned page: no text
        pdf.showPage()
    pdf.save()
    return path


def write_docx(path: Path) -> Path:
    document = docx.Document()
    document.add_heading("Quarterly report", level=1)
    document.add_paragraph("Revenue grew by twelve percent.")
    document.add_paragraph("")
    document.add_paragraph("Costs stayed flat.")
    table = document.add_table(rows=1, cols=2)
    table.cell(0, 0).text = "Region"
    table.cell(0, 1).text = "North"
    document.save(str(path))
    return path


def texts(path: Path) -> list[str]:
    return [document.text for document in read_file(path)]


def test_pdf_becomes_one_document_per_page_with_text_numbered_from_one(tmp_path: Path) -> None:
    path = write_pdf(tmp_path / "manual.pdf", [
        ["Llamas are domesticated camelids.", "They live in the Andes."],
        [],
        ["Alpacas are smaller than llamas."],
    ])

    documents = read_file(path)

    assert [d.metadata["page"] for d in documents] == [1, 3]
    assert "Llamas are domesticated camelids." in documents[0].text
    assert "They live in the Andes." in documents[0].text
    assert "Alpacas are smaller" in documents[1].text
    assert all(d.metadata["file_name"] == "manual.pdf" for d in documents)
    assert all(d.metadata["file_type"] == "pdf" for d in documents)


def test_pdf_with_an_empty_user_password_is_read(tmp_path: Path) -> None:
    path = write_pdf(tmp_path / "owner-locked.pdf", [["Printing is restricted."]], password="")

    assert "Printing is restricted." in texts(path)[0]


def test_docx_paragraphs_are_separated_by_one_blank_line(tmp_path: Path) -> None:
    (text,) = texts(write_docx(tmp_path / "report.docx"))

    assert text == (
        "Quarterly report\n\nRevenue grew by twelve percent.\n\nCosts stayed flat.\n\n"
        "Region\n\nNorth"
    )


def test_html_keeps_visible_text_with_paragraphs_and_lines(tmp_path: Path) -> None:
    path = tmp_path / "page.html"
    path.write_text(
        "<html><head><title>Llama care</title><style>p {color: red}</style>"
        "<script>track()</script></head><body><nav>Home | About</nav>"
        "<h1>Feeding</h1><p>Llamas eat <b>grass</b>\n   and hay.</p>"
        "<ul><li>Water daily</li><li>Salt block</li></ul>"
        "<table><tr><th>Age</th><th>Hay</th></tr><tr><td>1</td><td>2 kg</td></tr></table>"
        "<!-- a comment -->Call us<br>today</body></html>",
        encoding="utf-8",
    )

    (text,) = texts(path)

    assert text == (
        "Llama care\n\nFeeding\n\nLlamas eat grass and hay.\n\nWater daily\nSalt block"
        "\n\nAge Hay\n1 2 kg\n\nCall us\ntoday"
    )


def test_html_honours_its_declared_charset(tmp_path: Path) -> None:
    path = tmp_path / "legacy.htm"
    path.write_bytes(
        '<html><head><meta charset="gbk"></head><body><p>羊驼吃草。</p></body></html>'
        .encode("gbk")
    )

    assert texts(path) == ["羊驼吃草。"]


def test_csv_rows_become_paragraphs_of_column_value_lines(tmp_path: Path) -> None:
    path = tmp_path / "animals.csv"
    path.write_text(
        'name,habitat,notes\nLlama,Andes,"Carries loads,\nup to 30 kg"\nAlpaca,,Fleece\n,,\n',
        encoding="utf-8",
    )

    assert texts(path) == [
        "name: Llama\nhabitat: Andes\nnotes: Carries loads,\nup to 30 kg"
        "\n\nname: Alpaca\nnotes: Fleece"
    ]


def test_csv_delimiter_is_detected_and_unnamed_columns_are_numbered(tmp_path: Path) -> None:
    path = tmp_path / "semicolons.csv"
    path.write_text("city;;country\nLima;12;Peru\nQuito;7;Ecuador\n", encoding="utf-8")

    assert texts(path) == [
        "city: Lima\ncolumn 2: 12\ncountry: Peru\n\ncity: Quito\ncolumn 2: 7\ncountry: Ecuador"
    ]


def test_json_is_flattened_with_every_record_in_its_own_paragraph(tmp_path: Path) -> None:
    path = tmp_path / "faq.json"
    path.write_text(json.dumps({
        "title": "Llama FAQ",
        "tags": ["animals", "andes"],
        "meta": {"version": 2, "public": True, "owner": None},
        "items": [
            {"q": "Do llamas spit?", "a": "Rarely at people."},
            {"q": "What do they eat?", "a": "Grass.", "source": {"page": 4}},
        ],
    }), encoding="utf-8")

    assert texts(path) == [
        "title: Llama FAQ\ntags: animals, andes\nmeta.version: 2\nmeta.public: true"
        "\n\nitems.q: Do llamas spit?\nitems.a: Rarely at people."
        "\n\nitems.q: What do they eat?\nitems.a: Grass.\nitems.source.page: 4"
    ]


def test_jsonl_gives_each_line_its_own_paragraph(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"event": "shearing", "month": 11}\n\n{"event": "birth"}\n"note"\n')

    assert texts(path) == ["event: shearing\nmonth: 11\n\nevent: birth\n\nnote"]


@pytest.mark.parametrize(("encoded", "expected"), [
    ("Café au lait\r\nwith foam".encode("utf-8-sig"), "Café au lait\nwith foam"),
    ("Größe: 12\n".encode("utf-16"), "Größe: 12\n"),
    ("羊驼是一种家养的骆驼科动物，生活在安第斯山脉。".encode("gbk"),
     "羊驼是一种家养的骆驼科动物，生活在安第斯山脉。"),
], ids=["utf-8-bom-crlf", "utf-16-bom", "gbk"])
def test_text_in_other_encodings_is_decoded(tmp_path: Path, encoded: bytes,
                                            expected: str) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(encoded)

    assert texts(path) == [expected]


def test_markdown_is_kept_as_written_with_metadata_out_of_the_embedded_text(
    tmp_path: Path,
) -> None:
    path = tmp_path / "guide.md"
    path.write_text("# Guide\n\nLlamas hum.\n", encoding="utf-8")

    (document,) = read_file(path, source_name="docs/guide.md")

    assert document.text == "# Guide\n\nLlamas hum.\n"
    assert document.metadata == {"file_name": "guide.md", "file_type": "md"}
    assert document.get_content(metadata_mode=MetadataMode.EMBED) == document.text
    assert set(document.excluded_llm_metadata_keys) == {"file_name", "file_type"}


def test_every_supported_suffix_reads_an_upload(tmp_path: Path) -> None:
    samples = {
        ".txt": b"plain words", ".md": b"# words", ".markdown": b"words", ".mdx": b"words",
        ".html": b"<p>words</p>", ".htm": b"<p>words</p>", ".csv": b"a\nwords",
        ".json": b'{"a": "words"}', ".jsonl": b'{"a": "words"}',
        ".pdf": write_pdf(tmp_path / "w.pdf", [["words"]]).read_bytes(),
        ".docx": write_docx(tmp_path / "w.docx").read_bytes(),
    }
    assert set(samples) == SUPPORTED_SUFFIXES

    for suffix, data in samples.items():
        documents = read_bytes(data, f"upload{suffix.upper()}")
        assert documents and all(d.text.strip() for d in documents), suffix


def test_read_bytes_reads_like_read_file_and_removes_its_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    path = write_pdf(tmp_path / "manual.pdf", [["Page one text."], ["Page two text."]])

    uploaded = read_bytes(path.read_bytes(), "C:\\fakepath\\manual.pdf")

    assert [(d.text, d.metadata) for d in uploaded] == [
        (d.text, d.metadata) for d in read_file(path)
    ]
    assert list(spool.iterdir()) == []
    with pytest.raises(InvalidFieldError):
        read_bytes(b"%PDF-1.4 broken", "broken.pdf")
    assert list(spool.iterdir()) == []


def _random_bytes(size: int) -> bytes:
    return random.Random(7).randbytes(size)


BAD_FILES = [
    ("report.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog >>\ngarbage", "is not a valid PDF"),
    ("noise.pdf", _random_bytes(4096), "is not a valid PDF"),
    ("empty.txt", b"", "has no text"),
    ("blank.md", b"  \n\t\n\n", "has no text"),
    ("photo.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + _random_bytes(512), "binary data"),
    ("setup.exe", b"MZ\x90\x00", "unsupported file type (.exe); supported: .csv, .docx"),
    ("README", b"no suffix", "unsupported file type (no suffix)"),
    ("letter.docx", b"PK\x03\x04 not really a zip", "is not a valid Word document"),
    ("config.json", b'{"name": }', "is not valid JSON"),
    ("log.jsonl", b'{"ok": 1}\n{broken\n', "is not valid JSON (line 2:"),
    ("header.csv", b"name,age\n", "has no data rows"),
    ("script.html", b"<html><script>alert(1)</script></html>", "has no text"),
]


@pytest.mark.parametrize(("name", "data", "problem"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_a_bad_file_is_an_invalid_field_error_naming_it(
    tmp_path: Path, name: str, data: bytes, problem: str
) -> None:
    path = tmp_path / name
    path.write_bytes(data)

    for read in (lambda: read_file(path), lambda: read_bytes(data, name)):
        with pytest.raises(InvalidFieldError) as caught:
            read()
        assert caught.value.field == "file"
        assert caught.value.message.startswith(f"file: {name} ")
        assert problem in caught.value.message
        assert error_status(caught.value)[0] == 400


def test_truncated_pdf_is_reported_not_raised(tmp_path: Path) -> None:
    whole = write_pdf(tmp_path / "whole.pdf", [["Some text."]]).read_bytes()

    with pytest.raises(InvalidFieldError, match=r"cut\.pdf is not a valid PDF"):
        read_bytes(whole[: len(whole) // 3], "cut.pdf")


def test_password_protected_pdf_is_reported(tmp_path: Path) -> None:
    path = write_pdf(tmp_path / "secret.pdf", [["Hidden."]], password="s3cret")

    with pytest.raises(InvalidFieldError, match=r"secret\.pdf is password-protected"):
        read_file(path)


def test_pdf_without_any_text_says_ocr_is_not_supported(tmp_path: Path) -> None:
    path = write_pdf(tmp_path / "scan.pdf", [[], []])

    with pytest.raises(InvalidFieldError, match=r"scan\.pdf has no text .*OCR"):
        read_file(path)


def test_missing_file_is_reported_without_the_server_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidFieldError) as caught:
        read_file(tmp_path / "gone.txt", source_name="docs/gone.txt")

    assert caught.value.message == "file: docs/gone.txt cannot be read (No such file or directory)"


def test_html_is_read_as_a_stream_of_tags_with_the_old_output(tmp_path: Path) -> None:
    """Unclosed, stray and mismatched tags close as BeautifulSoup's html.parser
    builder closed them; comments are never text, not even inside <pre>."""
    path = tmp_path / "sloppy.html"
    path.write_text(
        "<title>Herd <b>notes</b></title><nav>skip</nav><p>one<p>two</span>"
        "<pre>a\nb<!-- hidden --></pre><div>left open<table><tr><td>x<td>y</table>",
        encoding="utf-8",
    )

    (text,) = texts(path)

    assert text == "Herd notes\n\none\n\ntwo\n\na\nb\n\nleft open\n\nx y"


@pytest.mark.parametrize("depth", [32_000, 320_000])
def test_html_nesting_costs_time_in_proportion_to_its_size(tmp_path: Path, depth: int) -> None:
    path = tmp_path / "deep.html"
    path.write_bytes(b"<div><span>" * depth + b"deep text")

    assert texts(path) == ["deep text"]


def test_html_encoding_declared_in_a_meta_tag_wins_over_a_guess(tmp_path: Path) -> None:
    path = tmp_path / "latin.html"
    path.write_bytes('<meta http-equiv="Content-Type" content="text/html; charset=iso-8859-1">'
                     "<p>Café crème</p>".encode("latin-1"))

    assert texts(path) == ["Café crème"]


def test_docx_headers_body_and_footers_are_read_in_order(tmp_path: Path) -> None:
    path = write_docx(tmp_path / "report.docx")
    document = docx.Document(str(path))
    document.sections[0].header.paragraphs[0].text = "Confidential"
    document.sections[0].footer.paragraphs[0].text = "Page footer"
    document.save(str(path))

    (text,) = texts(path)

    assert text.startswith("Confidential\n\nQuarterly report") and text.endswith("Page footer")


def test_json_numbers_longer_than_python_converts_are_kept_as_written(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_text('{"id": ' + "7" * 5000 + "}", encoding="utf-8")

    assert texts(path) == ["id: " + "7" * 5000]


def test_limits_are_checked_while_reading_and_name_their_setting(tmp_path: Path) -> None:
    from llamaindex_kb.errors import PayloadTooLargeError
    from llamaindex_kb.limits import Limits

    path = tmp_path / "nested.json"
    path.write_text("[" * 9 + "1" + "]" * 9, encoding="utf-8")

    with pytest.raises(PayloadTooLargeError) as caught:
        read_file(path, limits=Limits(markup_depth=8))

    assert caught.value.message == (
        "file: nested.json is nested more than 8 levels deep "
        "(setting LLAMAINDEX_KB_MAX_MARKUP_DEPTH)")
    assert error_status(caught.value)[:2] == (413, 3006)
    assert len(read_file(path, limits=Limits(markup_depth=9))) == 1


def test_a_checkpoint_stops_reading_and_its_error_passes_through(tmp_path: Path) -> None:
    from llamaindex_kb.errors import BadRequestError

    path = write_pdf(tmp_path / "long.pdf", [["Page text."]] * 5)
    calls = []

    def checkpoint() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise BadRequestError("stopped")

    with pytest.raises(BadRequestError, match="stopped"):
        read_file(path, checkpoint=checkpoint)
    assert len(calls) == 3  # one before reading, then one per page
