"""The admin web page in a real headless Chromium (Debian's), driven by Playwright.

What an administrator with only a browser does: sign in with the token, see
the state and the figures, change the provider (and see a field error beside
the field), save a good configuration, test the provider, send a test mail
and find it in the delivery log, retry a failed delivery, stop and start
SMTP.  Without Chromium or Playwright these tests are skipped with the
reason, unless SMTPRELAY_REQUIRE_BROWSER=1 (CI) makes that a failure.

``SMTPRELAY_UPDATE_SCREENSHOT=1`` also writes the main view to
docs/admin-page.png (the README shows it).
"""

import os
import re
import shutil
import smtplib
import socket
import tomllib
import uuid
from pathlib import Path

import pytest

from tests.admin_client import AdminClient
from tests.relay import RelayProcess

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("SMTPRELAY_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "browser-admin-token-42"
USER_PASSWORD = "scanner-password-secret-9"
DOCS = Path(__file__).resolve().parents[1] / "docs"


def _need_browser():
    reason = None
    if not os.path.exists(CHROMIUM):
        reason = f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "the playwright package is not installed (pip install -e '.[test]')"
    if reason:
        if os.environ.get("SMTPRELAY_REQUIRE_BROWSER"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    _need_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    base = tmp_path_factory.mktemp("browser")
    (base / "blocker").write_text("a file where a folder should be")
    r = RelayProcess(base / "relay", {
        "admin": {"listen": "127.0.0.1:0", "token": TOKEN},
        "smtp": {"auth": {"users": {"scanner": USER_PASSWORD}}},
        "delivery": {"retry": ["1h"]},
    })
    r.base = base
    r.start()
    r.original = AdminClient(r.admin_port, TOKEN).ok("GET", "/api/config")
    yield r
    r.stop()


@pytest.fixture
def api(relay):
    return AdminClient(relay.admin_port, TOKEN)


@pytest.fixture(autouse=True)
def restore(relay, api):
    """Each test starts from the relay's first configuration, SMTP running."""
    yield
    if api.ok("GET", "/api/status")["state"] == "stopped":
        api.ok("POST", "/api/smtp/start")
    if api.ok("GET", "/api/config") != relay.original:
        api.ok("PUT", "/api/config", relay.original)


def smtp_port(api):
    return int(api.ok("GET", "/api/status")["listen"][0].rsplit(":", 1)[1])


def send(api, subject, sender="app@example.com"):
    with smtplib.SMTP("127.0.0.1", smtp_port(api), timeout=30) as s:
        s.sendmail(sender, ["someone@example.org"],
                   f"From: {sender}\r\nSubject: {subject}\r\n\r\nbody\r\n")


@pytest.fixture
def page(browser, relay):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.set_default_timeout(15000)
    pg.goto(f"http://127.0.0.1:{relay.admin_port}/")
    yield pg
    context.close()
    assert pg.errors == []


def sign_in(page, token=TOKEN):
    page.locator("#token").fill(token)
    page.locator("#token").press("Enter")


@pytest.fixture
def signed_in(page):
    sign_in(page)
    page.locator("#app").wait_for(state="visible")
    page.locator("#state", has_text="running").wait_for()
    return page


# --- signing in -----------------------------------------------------------------------------------


def test_sign_in_with_the_token(page):
    page.locator("#login").wait_for(state="visible")
    assert page.locator("#app").is_hidden()
    sign_in(page, "not-the-token")
    page.locator("#login-error", has_text="not accepted").wait_for()
    assert page.locator("#app").is_hidden()
    sign_in(page)
    page.locator("#app").wait_for(state="visible")
    assert page.locator("#login").is_hidden()
    assert page.locator("#state").inner_text() == "running"
    # kept for the tab: a reload does not ask again
    page.reload()
    page.locator("#state", has_text="running").wait_for()
    assert page.locator("#login").is_hidden()
    page.locator("#logout").click()
    page.locator("#login").wait_for(state="visible")


def test_no_secret_is_rendered(signed_in, relay):
    page = signed_in
    page.locator("#users-body tr").first.wait_for()
    html = page.content()
    assert TOKEN not in html and USER_PASSWORD not in html
    values = page.eval_on_selector_all("input", "els => els.map(e => e.value)")
    assert TOKEN not in values and USER_PASSWORD not in values
    pw = page.locator("#users-body .user-password").first
    assert pw.input_value() == "" and "set" in pw.get_attribute("placeholder")
    assert pw.get_attribute("type") == "password"


def test_every_control_has_a_name_and_the_keyboard_reaches_it(signed_in):
    page = signed_in
    unnamed = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea, button')]
        .filter(e => e.offsetParent !== null)
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                     && !(e.tagName === 'BUTTON' && e.textContent.trim()))
        .map(e => e.outerHTML)""")
    assert unnamed == []
    # Tab from the top reaches "Stop SMTP", and Enter there works
    page.locator("body").focus()
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "smtp-stop":
            break
    else:
        raise AssertionError("Tab never reached the Stop SMTP button")
    page.keyboard.press("Enter")
    page.locator("#state", has_text="stopped").wait_for()


# --- state, figures, screenshot ---


def test_main_view_shows_true_figures(signed_in, relay, api, tmp_path):
    page = signed_in
    for i in range(3):
        send(api, f"figures {i}")
    relay.wait_status(relay.query("SELECT id FROM messages ORDER BY id DESC LIMIT 1")[0][0],
                      ("sent",))
    page.locator("#log-refresh").click()
    page.locator("#log-body tr", has_text="figures 2").wait_for()
    stats = api.ok("GET", "/api/stats")
    counts = dict(relay.query("SELECT status, COUNT(*) FROM messages GROUP BY status"))
    assert stats["received"] == sum(counts.values())
    for key in ("received", "sent", "failed", "queued", "deferred"):
        page.locator(f"#stat-{key}", has_text=re.compile(rf"^{stats[key]}$")).wait_for()
    status = api.ok("GET", "/api/status")
    assert page.locator("#listen").inner_text() == ", ".join(status["listen"])
    assert "outbox, sending as relay@example.com" in page.locator("#provider-summary").inner_text()
    shot = tmp_path / "admin-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("SMTPRELAY_UPDATE_SCREENSHOT"):
        DOCS.mkdir(exist_ok=True)
        shutil.copy(shot, DOCS / "admin-page.png")


def test_the_readme_screenshot_is_kept():
    data = (DOCS / "admin-page.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_a_warning_banner_per_warning(signed_in, relay, api):
    page = signed_in
    cfg = api.ok("GET", "/api/config")
    cfg["provider"]["directory"] = str(relay.base / "blocker" / "outbox")
    api.ok("PUT", "/api/config", cfg)
    send(api, "into a broken outbox")
    api.wait(lambda: api.ok("GET", "/api/status")["warnings"])
    page.reload()
    banner = page.locator("#warnings .banner", has_text="failing since")
    banner.wait_for()
    assert banner.get_attribute("role") == "alert"
    assert (page.locator("#warnings .banner").count()
            == len(api.ok("GET", "/api/status")["warnings"]))


def test_stop_and_start_smtp(signed_in, api):
    page = signed_in
    port = smtp_port(api)
    page.locator("#smtp-stop").click()
    page.locator("#state", has_text="stopped").wait_for()
    page.locator("#header-state", has_text="SMTP stopped").wait_for()
    assert page.locator("#smtp-stop").is_disabled()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    page.locator("#smtp-start").click()
    page.locator("#state", has_text="running").wait_for()
    page.locator("#state-message", has_text="SMTP started.").wait_for()
    new_port = smtp_port(api)
    assert page.locator("#listen").inner_text() == f"127.0.0.1:{new_port}"
    send(api, "after start")


# --- configuration ---


def test_bad_port_shows_a_field_error_then_a_good_configuration_saves(signed_in, relay, api):
    page = signed_in
    before = relay.config_path.read_bytes()
    page.locator("#provider-type").select_option("smtp")
    page.get_by_label("Server host name").fill("mail.example.com")
    page.get_by_label("Port").fill("99999")
    page.get_by_role("button", name="Save configuration").click()
    error = page.locator('[id="err-provider.port"]')
    error.wait_for(state="visible")
    assert "65535" in error.inner_text()
    assert page.locator("#provider-port").get_attribute("aria-invalid") == "true"
    assert page.evaluate("document.activeElement.id") == "provider-port"
    assert "Not saved" in page.locator("#config-error").inner_text()
    assert relay.config_path.read_bytes() == before
    assert api.ok("GET", "/api/status")["provider"]["type"] == "outbox"

    # a good configuration: the outbox in a new folder, two allowed senders
    page.locator("#provider-type").select_option("outbox")
    new_dir = str(relay.base / "outbox-from-the-page")
    page.get_by_label("Outbox folder").fill(new_dir)
    page.get_by_label("Allowed senders (one per line)").fill("app@example.com\n@example.org")
    page.get_by_role("button", name="Save configuration").click()
    page.locator("#config-status", has_text="Saved").wait_for()
    assert page.locator('[id="err-provider.port"]').is_hidden()
    cfg = api.ok("GET", "/api/config")
    assert cfg["provider"] == {"type": "outbox", "directory": new_dir}
    assert cfg["sender"]["allowed"] == ["app@example.com", "@example.org"]
    assert cfg["smtp"]["auth"]["users"]["scanner"] == {"set": True}  # kept
    doc = tomllib.loads(relay.config_path.read_text())
    assert doc["provider"]["directory"] == new_dir
    assert doc["smtp"]["auth"]["users"]["scanner"] == USER_PASSWORD
    # applied: a message lands in the new folder
    send(api, "to the new folder")
    api.wait(lambda: list(Path(new_dir, "new").glob("*")) if Path(new_dir, "new").exists() else [])


def test_a_new_smtp_user_from_the_page(signed_in, relay, api):
    page = signed_in
    page.get_by_role("button", name="Add user").click()
    row = page.locator("#users-body tr").last
    row.locator(".user-name").fill("printer")
    row.locator(".user-password").fill("printer-pass-77")
    row.locator(".user-allowed").fill("printer@example.com")
    page.get_by_role("button", name="Save configuration").click()
    page.locator("#config-status", has_text="Saved").wait_for()
    doc = tomllib.loads(relay.config_path.read_text())
    printer = doc["smtp"]["auth"]["users"]["printer"]
    assert (printer["password"].startswith("$scrypt$")
            and printer["allowed"] == ["printer@example.com"])
    assert "printer-pass-77" not in relay.config_path.read_text()
    with smtplib.SMTP("127.0.0.1", smtp_port(api), timeout=30) as s:
        s.login("printer", "printer-pass-77")
        s.sendmail("printer@example.com", ["x@example.org"], "Subject: p\r\n\r\nhi\r\n")


# --- tests and the delivery log ---


def test_test_connection_shows_its_steps(signed_in):
    page = signed_in
    page.get_by_role("button", name="Test connection").click()
    page.locator("#provider-test-summary", has_text="The provider works.").wait_for()
    assert "outbox writable: ok" in page.locator("#provider-steps").inner_text()


def test_send_a_test_mail_and_find_it_in_the_log(signed_in, api):
    page = signed_in
    subject = f"From the page {uuid.uuid4().hex[:6]}"
    page.get_by_label("To", exact=True).fill("admin@example.org")
    page.get_by_label("Subject (optional)").fill(subject)
    page.get_by_role("button", name="Send test mail").click()
    result = page.locator("#test-mail-result", has_text="Sent:")
    result.wait_for()
    row = page.locator("#log-body tr", has_text=subject)
    row.wait_for()
    assert "sent" in row.inner_text() and "admin@example.org" in row.inner_text()
    # the row opens its attempts
    row.get_by_role("button", name=re.compile("Details")).click()
    detail = page.locator("#delivery-detail")
    detail.wait_for(state="visible")
    assert subject in detail.inner_text()
    assert page.locator("#detail-attempts tr").count() == 1
    assert "sent" in page.locator("#detail-attempts").inner_text()
    assert page.evaluate("document.activeElement.id") == "detail-title"
    # a bad address is refused beside the field
    page.get_by_label("To", exact=True).fill("not an address")
    page.get_by_role("button", name="Send test mail").click()
    page.locator("#err-to", has_text="not an e-mail address").wait_for()


def test_retry_a_failed_delivery(signed_in, relay, api):
    page = signed_in
    cfg = api.ok("GET", "/api/config")
    cfg["provider"]["directory"] = str(relay.base / "blocker" / "outbox")
    api.ok("PUT", "/api/config", cfg)
    subject = f"Retry me {uuid.uuid4().hex[:6]}"
    page.get_by_label("To", exact=True).fill("admin@example.org")
    page.get_by_label("Subject (optional)").fill(subject)
    page.get_by_role("button", name="Send test mail").click()
    page.locator("#test-mail-result", has_text="Not sent:").wait_for()
    row = page.locator("#log-body tr", has_text=subject)
    row.wait_for()
    assert "failed" in row.inner_text()
    api.ok("PUT", "/api/config", relay.original)  # the outbox works again
    row.get_by_role("button", name=re.compile("^Retry")).click()
    page.locator("#log-body tr", has_text=subject).filter(has_text="sent").wait_for()
    (status,) = relay.query("SELECT status FROM messages WHERE subject = ?", (subject,))[0]
    assert status == "sent"


def test_filters_and_pages(signed_in, relay, api):
    page = signed_in
    tag = uuid.uuid4().hex[:6]
    for i in range(27):
        send(api, f"page {tag} {i:02d}")
    relay.wait_status(relay.query("SELECT id FROM messages ORDER BY id DESC LIMIT 1")[0][0],
                      ("sent",))
    page.get_by_label("Subject or Message-ID contains").fill(f"page {tag}")
    page.get_by_role("button", name="Apply filters").click()
    page.locator("#log-body tr", has_text=f"page {tag} 26").wait_for()
    assert page.locator("#log-body tr").count() == 25
    page.get_by_role("button", name="Next page").click()
    page.locator("#log-body tr", has_text=f"page {tag} 01").wait_for()
    assert page.locator("#log-body tr").count() == 2
    assert page.locator("#log-next").is_disabled()
    page.get_by_role("button", name="Previous page").click()
    page.locator("#log-body tr", has_text=f"page {tag} 26").wait_for()
    page.get_by_label("Status").select_option("failed")
    page.get_by_role("button", name="Apply filters").click()
    page.locator("#log-body td.empty", has_text="No delivery matches.").wait_for()
