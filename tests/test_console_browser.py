"""The browser console in a real browser: Debian's chromium driven by Playwright, against
``serve`` in its own process, as an admin would use it.

Set ``CONSOLE_SCREENSHOTS=<folder>`` to keep the screenshots (the README's come
from this run: ``_assets/console-*.png``).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from reportlab.pdfgen import canvas
from test_server import KEY, ServeProcess, serving

playwright = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As the machine's probe runs it: no sandbox as root, nothing phoning home.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    data = tmp_path_factory.mktemp("console-data")
    with serving(tmp_path_factory.mktemp("console-serve"), "--demo", "--data-dir",
                 str(data)) as proc:
        yield proc


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed: apt-get install chromium "
                    "(.ci/run installs it)")
    with playwright.sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


def write_pdf(path: Path, lines: list[str]) -> Path:
    pdf = canvas.Canvas(str(path))
    for number, line in enumerate(lines):
        pdf.drawString(72, 760 - 18 * number, line)
    pdf.save()
    return path


def shoot(page: object, name: str) -> None:
    folder = os.environ.get("CONSOLE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"console-{name}.png"), full_page=True)


def watched_page(browser: object, server: ServeProcess, locale: str = "en-US"
                 ) -> tuple[object, list[str]]:
    context = browser.new_context(locale=locale, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.on("dialog", lambda dialog: dialog.accept())  # the drop and delete confirmations
    return page, requested


def sign_in(page: object, server: ServeProcess, key: str) -> None:
    page.goto(f"{server.url}/console")
    page.fill("input[name=api_key]", key)
    page.click("#sign-in-form button[type=submit]")
    page.wait_for_selector("#app:not([hidden])")


def test_an_admin_manages_documents_and_tests_a_filtered_retrieval(browser, server, tmp_path):
    page, requested = watched_page(browser, server)
    reply = page.goto(f"{server.url}/console")
    policy = reply.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert "demo" not in page.content()  # nothing but the sign-in form without a key

    page.fill("input[name=api_key]", "wrong")
    page.click("#sign-in-form button[type=submit]")
    page.wait_for_selector("#sign-in-error:not(:empty)")
    assert "does not match" in page.inner_text("#sign-in-error")

    page.fill("input[name=api_key]", KEY)
    page.click("#sign-in-form button[type=submit]")
    page.wait_for_selector("#bases-table tr[data-id=demo]")

    # A knowledge base made in the page, with parent-child chunking.
    page.fill("#create-base [name=knowledge_id]", "handbook")
    page.check("#create-base [name=chunk_mode][value=parent_child]")
    page.click("#create-base button[type=submit]")
    row = page.wait_for_selector("#bases-table tr[data-id=handbook]")
    assert "Parent-child" in row.inner_text()
    assert page.is_visible("#create-base .general-only")  # the emptied form: general again
    shoot(page, "bases")

    # Two uploads with different metadata: a real PDF, then a Markdown file.
    pdf = write_pdf(tmp_path / "leave-policy.pdf", [
        "Leave policy", "Employees get 25 days of paid annual leave.",
        "Unused leave days carry over until March."])
    markdown = tmp_path / "vpn.md"
    markdown.write_text("# VPN\n\nConnect to the office VPN with the IT desk's client.\n")
    page.click("nav button[data-tab=documents]")
    page.select_option("#documents-base", "handbook")
    for file, team in ((pdf, "hr"), (markdown, "it")):
        page.click("#add-metadata") if not page.query_selector("#metadata-rows .row") else None
        page.fill("#metadata-rows [name=meta_key]", "department")
        page.fill("#metadata-rows [name=meta_value]", team)
        page.set_input_files("#file-input", str(file))
        page.click("#upload-button")
        status = page.wait_for_selector(f"#upload-progress li[data-file='{file.name}'] .status.ok")
        assert re.fullmatch(r"\d+ chunks?", status.inner_text())
    page.wait_for_selector("#documents-table tbody tr >> nth=1")
    listed = page.inner_text("#documents-table")
    assert "leave-policy.pdf" in listed and "vpn.md" in listed and '"department":"it"' in listed
    shoot(page, "documents")

    # A filtered retrieval finds the Markdown file's record only, with its score's parts.
    page.click("nav button[data-tab=retrieval]")
    page.select_option("#retrieval-base", "handbook")
    page.fill("#retrieval-form [name=query]", "office VPN client leave days")
    page.click("#filter-builder .add-condition")
    page.fill("#filter-builder .condition [name=name]", "department")
    page.select_option("#filter-builder .condition [name=comparison_operator]", "is")
    page.fill("#filter-builder .condition [name=value]", "it")
    page.click("#retrieval-form button[type=submit]")
    page.wait_for_selector("#results li.record")
    results = page.query_selector_all("#results li.record")
    assert len(results) == 1
    assert "VPN" in results[0].inner_text() and "semantic" in results[0].inner_text()
    shoot(page, "retrieval")

    # Deleting the PDF removes it from the listing.
    page.click("nav button[data-tab=documents]")
    # A locator, not a handle: the tab re-renders its table as it opens.
    page.locator("#documents-table tr", has_text="leave-policy.pdf").locator(
        "button.danger").click()
    page.wait_for_selector("#documents-table tr:has-text('leave-policy.pdf')", state="detached")
    page.wait_for_selector("#documents-table tr:has-text('vpn.md')")
    assert "vpn.md" in page.inner_text("#documents-table")

    # A view and a read-only key for an app; the key is shown once.
    page.click("nav button[data-tab=access]")
    page.fill("#create-view [name=name]", "handbook-it")
    page.select_option("#create-view [name=knowledge_base]", "handbook")
    page.fill("#create-view [name=metadata_condition]",
              '{"conditions": [{"name": "department", "comparison_operator": "is", '
              '"value": "it"}]}')
    page.click("#create-view button[type=submit]")
    page.wait_for_selector("#views-table tr[data-view=handbook-it]")
    page.fill("#create-key [name=name]", "it-bot")
    page.fill("#create-key [name=knowledge_ids]", "handbook-it")
    page.click("#create-key button[type=submit]")
    page.wait_for_selector("#keys-table tr[data-key=it-bot]")
    secret = page.inner_text("#new-key-secret")
    assert secret.startswith("lkb_")
    shoot(page, "access")

    page.click("nav button[data-tab=connect]")
    assert page.inner_text("#endpoint-url") == server.url
    assert "handbook-it" in page.inner_text("#connect-ids")
    assert "/retrieval" not in page.inner_text("#endpoint-url")

    # Everything the page loaded or called was this server: no CDN, no font, no beacon.
    assert requested and all(url.startswith(server.url + "/") for url in requested), requested
    assert not any(KEY in url or secret in url for url in requested)

    # The read-only key sees its view only, and no way to change anything.
    reader, _ = watched_page(browser, server)
    sign_in(reader, server, secret)
    reader.wait_for_selector("#bases-table tr[data-id=handbook-it]")
    assert reader.query_selector_all("#bases-table tbody tr[data-id]").__len__() == 1
    assert reader.is_hidden("nav button[data-tab=access]")
    assert reader.is_hidden("#create-base")
    reader.click("nav button[data-tab=documents]")
    assert reader.is_hidden("#upload-form")

    # Revoked meanwhile: the reader's next request sends it back to the sign-in form.
    revoked = httpx.delete(f"{server.url}/keys/it-bot", headers={"Authorization": f"Bearer {KEY}"})
    assert revoked.status_code == 200
    reader.click("nav button[data-tab=retrieval]")
    reader.fill("#retrieval-form [name=query]", "VPN")
    reader.click("#retrieval-form button[type=submit]")
    reader.wait_for_selector("#sign-in:not([hidden])")
    assert "sign in again" in reader.inner_text("#sign-in-error")


def test_the_console_speaks_chinese_to_a_chinese_browser(browser, server):
    auth = {"Authorization": f"Bearer {KEY}"}
    made = httpx.post(f"{server.url}/documents", headers=auth, timeout=120, json={
        "knowledge_id": "zh-handbook", "title": "年假制度",
        "text": "员工每年享有二十五天带薪年假，未休完的年假可以顺延到次年三月。",
        "metadata": {"部门": "人事"}})
    assert made.status_code == 201, made.text
    page, _ = watched_page(browser, server, locale="zh-CN")
    sign_in(page, server, KEY)
    assert page.inner_text("nav button[data-tab=retrieval]") == "召回测试"
    assert page.inner_text("#create-base h2") == "创建知识库"
    assert page.evaluate("document.documentElement.lang") == "zh-Hans"
    page.click("nav button[data-tab=retrieval]")
    page.click("#filter-builder .add-condition")
    operators = page.inner_text("#filter-builder .condition [name=comparison_operator]")
    assert "包含" in operators and "不为空" in operators
    page.click("#filter-builder .condition button")  # removed again: no filter
    page.select_option("#retrieval-base", "zh-handbook")
    page.fill("#retrieval-form [name=query]", "年假可以顺延吗")
    page.click("#retrieval-form button[type=submit]")
    record = page.wait_for_selector("#results li.record")
    assert "年假制度" in record.inner_text() and "语义" in record.inner_text()
    shoot(page, "zh")
