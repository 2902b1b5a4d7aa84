"""The delivery console (GET /admin/) in headless Chromium against the real kora-sidecar binary.

A small receiver in this process answers 500 while `failing` is set and 204 otherwise. The sidecar
(SQLite in a temporary folder, an admin token, retries 200 ms apart so that a failing delivery is
dead at once, a breaker that never pauses) gets one event while the receiver works (delivered) and
one while it fails (dead, with an HTML-looking externalId in its body). Then the browser signs in,
filters, opens the dead delivery, retries it through the confirmation dialog and sees it delivered.

Needs: pytest, selenium, Debian's `chromium` and `chromium-driver` (/usr/bin/chromium,
/usr/bin/chromedriver), the kora-sidecar binary ($KORA_SIDECAR_BINARY, default
.build/debug/kora-sidecar). Under CI=true a missing one is a failure, else the tests are skipped.

KORA_SIDECAR_CONSOLE_SCREENSHOT=1 also writes docs/images/console.png (the deliveries view).

Run: python3 -m pytest tests/console -q
"""

import hashlib
import hmac
import json
import os
import time
import re
import secrets
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kora_process import (DEADLINE_SECONDS, ROOT, SidecarProcess, run_send_test_event, sidecar_binary, stop,
                          unavailable, wait_for)

CONSOLE = ROOT / "Sources/KoraSidecar/Console"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
KORA_SECRET = "kora-webhook-secret-for-the-console"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
# Shown by the console as text; were it parsed as HTML, an <img> and a <script> would appear in the page.
HOSTILE = "<img src=x onerror=window.__xss=1><script>window.__xss=2</script>"


# ---------------------------------------------------------------------------------------------
# helpers (the ones shared with tests/examples are in tests/support/kora_process.py)


@pytest.fixture(scope="module")
def binary():
    return sidecar_binary()


class Receiver:
    """The service "app": 500 while `failing` is set, 204 otherwise; counts what it answered."""

    def __init__(self):
        self.failing = threading.Event()
        self.answers = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = 500 if receiver.failing.is_set() else 204
                receiver.answers.append(status)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *arguments):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Sidecar(SidecarProcess):
    """`kora-sidecar serve` delivering to `receiver`, ready (GET /readyz answered 200) on return."""

    def __init__(self, binary, folder, receiver, admin_token):
        self.admin_token = admin_token
        super().__init__(
            binary, folder,
            webhooks={"secrets": [KORA_SECRET]},
            internal={"adminToken": admin_token} if admin_token else {},
            services=[{"name": "app", "deliver": {
                "url": f"http://127.0.0.1:{receiver.port}/kora-events", "breaker": {"failures": 1000}}}],
            delivery={"retrySchedule": ["200ms"]})

    def admin(self, path):
        """GET on the admin API with the token, as a script would."""
        request = urllib.request.Request(self.base + path)
        if self.admin_token:
            request.add_header("Authorization", f"Bearer {self.admin_token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def send_event(self, external_id):
        sent = run_send_test_event(self.binary, self.webhook_port, KORA_SECRET, "--external-id", external_id)
        assert sent.returncode == 0 and sent.stdout.startswith("200"), sent.stdout + sent.stderr

    def deliveries(self, status):
        return self.admin(f"/admin/deliveries?status={status}")["deliveries"]


@pytest.fixture(scope="module")
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def sidecar(binary, receiver, tmp_path_factory):
    """A sidecar holding one delivered and one dead delivery for "app"."""
    sidecar = Sidecar(binary, tmp_path_factory.mktemp("console"), receiver, "console-" + secrets.token_urlsafe(24))
    try:
        sidecar.send_event("user-delivered")
        wait_for(lambda: sidecar.deliveries("delivered"), "the first event to be delivered")
        receiver.failing.set()
        try:
            sidecar.send_event(HOSTILE)
            wait_for(lambda: sidecar.deliveries("dead"), "the second event to be dead after its retry")
        finally:
            # Dead is final (no attempt follows): the receiver works again for every later test, whichever
            # of them fails, and the operator's retry is delivered.
            receiver.failing.clear()
        yield sidecar
    finally:
        stop(sidecar.process)


@pytest.fixture
def browser():
    """Headless Chromium through chromedriver; fails the test if the page broke its own CSP."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("selenium is not installed (pip install selenium)")
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            unavailable(f"{path} is absent (apt-get install -y {package})")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
        violations = [entry["message"] for entry in driver.get_log("browser")
                      if "Content Security Policy" in entry["message"] or "Uncaught" in entry["message"]]
        assert not violations, violations
    finally:
        driver.quit()


def until(driver, condition, what, timeout=DEADLINE_SECONDS):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, ignored_exceptions=[StaleElementReferenceException]).until(
        condition, f"timed out waiting for {what}")


def css(driver, selector):
    from selenium.webdriver.common.by import By
    return driver.find_elements(By.CSS_SELECTOR, selector)


def status_text(driver):
    return css(driver, "#status")[0].text


def table_rows(driver):
    """(id, status) of each delivery in the deliveries table."""
    rows = []
    for row in css(driver, "main tbody tr"):
        cells = row.find_elements("css selector", "td")
        if len(cells) >= 5:
            rows.append((cells[0].text, cells[4].text))
    return rows


def sign_in(driver, sidecar, token):
    until(driver, lambda d: css(d, "#token") and css(d, "#token")[0].is_displayed(), "the sign-in form")
    field = css(driver, "#token")[0]
    field.clear()
    field.send_keys(token)
    css(driver, "#signin-form button[type=submit]")[0].click()


def signed_webhook(sidecar, body):
    """`body` posted to the sidecar's webhook listener, signed as Kora signs (X-Signature)."""
    timestamp = str(int(time.time()))
    signature = hmac.new(KORA_SECRET.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return urllib.request.Request(
        f"http://127.0.0.1:{sidecar.webhook_port}/webhooks/koraidv", data=body, method="POST",
        headers={"Content-Type": "application/json", "X-Timestamp": timestamp, "X-Signature": signature,
                 "X-Signature-Algorithm": "sha256"})


def assert_token_hidden(driver, token):
    assert token not in driver.current_url
    assert token not in driver.execute_script("return document.cookie")
    assert token not in driver.execute_script("return location.href + history.length")


# ---------------------------------------------------------------------------------------------
# the tests


def test_the_console_files_are_strict_about_what_they_load():
    """No inline script, style or handler (the CSP would block them), no HTML built from strings."""
    html = (CONSOLE / "index.html").read_text()
    script = (CONSOLE / "console.js").read_text()
    assert sorted(path.name for path in CONSOLE.iterdir()) == ["console.css", "console.js", "index.html"]
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="/admin/console.js" defer>']
    assert '<link rel="stylesheet" href="/admin/console.css">' in html
    assert not re.search(r"<style\b|\sstyle\s*=|\son[a-z]+\s*=", html, re.IGNORECASE)
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", html + script)
    for forbidden in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function", "localStorage"):
        assert forbidden not in script, forbidden


def test_the_console_is_served_with_its_security_headers(sidecar):
    for path, kind, source in (("/admin/", "text/html", "index.html"), ("/admin/console.js", "javascript", "console.js"),
                               ("/admin/console.css", "text/css", "console.css")):
        try:
            response = urllib.request.urlopen(sidecar.base + path, timeout=10)  # no token: the files are public
        except urllib.error.HTTPError as error:
            pytest.fail(f"GET {path} answered {error.code}: this binary does not serve the console")
        with response:
            assert kind in response.headers["Content-Type"], (path, response.headers["Content-Type"])
            assert response.headers["Content-Security-Policy"] == CSP, path
            assert response.headers["X-Content-Type-Options"] == "nosniff", path
            assert response.headers["Referrer-Policy"] == "no-referrer", path
            assert response.headers["Cache-Control"] == "no-store", path
            assert response.headers["Cross-Origin-Opener-Policy"] == "same-origin", path
            assert response.read() == (CONSOLE / source).read_bytes(), \
                f"the binary serves another {source} than the repository's: rebuild it"
    with pytest.raises(urllib.error.HTTPError) as refused:  # while the API itself needs the token
        urllib.request.urlopen(sidecar.base + "/admin/overview", timeout=10)
    assert refused.value.code == 401


def test_a_wrong_token_shows_the_error_and_no_data(sidecar, browser):
    browser.get(sidecar.base + "/admin/#/deliveries")
    sign_in(browser, sidecar, "not-the-token")
    until(browser, lambda d: "UNAUTHORIZED" in status_text(d), "the API's refusal in the status area")
    assert css(browser, "#status")[0].get_attribute("role") == "status"
    assert css(browser, "#token")[0].is_displayed()
    assert not css(browser, "main tbody tr") and not css(browser, "main h1")
    assert browser.execute_script("return sessionStorage.length") == 0
    assert_token_hidden(browser, "not-the-token")


def test_an_operator_finds_a_dead_delivery_and_retries_it(sidecar, receiver, browser):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    token = sidecar.admin_token
    browser.get(sidecar.base + "/admin/")
    sign_in(browser, sidecar, token)
    until(browser, lambda d: css(d, "main figure.chart"), "the overview's chart")
    until(browser, lambda d: "delivering" in css(d, "main")[0].text, "the service's state on the overview")
    assert_token_hidden(browser, token)
    assert browser.execute_script("return Object.values(sessionStorage)") == [token]

    # Both deliveries in the table, reached through the navigation.
    css(browser, 'nav a[href="#/deliveries"]')[0].click()
    until(browser, lambda d: sorted(s for _, s in table_rows(d)) == ["dead", "delivered"], "a delivered and a dead row")
    if os.environ.get("KORA_SIDECAR_CONSOLE_SCREENSHOT"):
        browser.save_screenshot(str(ROOT / "docs/images/console.png"))

    # Only the dead one once filtered; the filter is in the URL, so reload keeps it.
    Select(css(browser, 'select[name="status"]')[0]).select_by_value("dead")
    css(browser, "form.filters button[type=submit]")[0].click()
    until(browser, lambda d: "status=dead" in d.current_url, "the filter in the URL")
    until(browser, lambda d: [s for _, s in table_rows(d)] == ["dead"], "only the dead delivery")
    browser.refresh()
    until(browser, lambda d: [s for _, s in table_rows(d)] == ["dead"], "the filter to survive a reload")
    dead_id = table_rows(browser)[0][0]

    # Its page: the attempts, and the body as text (the externalId looks like HTML).
    css(browser, f'main tbody a[href="#/deliveries/{dead_id}"]')[0].click()
    until(browser, lambda d: len(css(d, "main tbody tr")) == 2, "the delivery's two attempts")
    attempts = [row.text for row in css(browser, "main tbody tr")]
    assert all(" 500 " in f" {text} " for text in attempts), attempts
    body = until(browser, lambda d: css(d, "main pre.body"), "the delivery's body")[0]
    assert HOSTILE in body.text
    assert not css(browser, "main img, main script")
    assert browser.execute_script("return window.__xss") is None

    # The retry asks first: Escape cancels and nothing is sent.
    receiver.failing.clear()
    answers_before = len(receiver.answers)
    retry = css(browser, "main .toolbar button")[0]
    assert retry.text.startswith("Retry")
    retry.click()
    dialog = until(browser, lambda d: [x for x in css(d, "dialog#confirm") if x.is_displayed()], "the dialog")[0]
    assert browser.switch_to.active_element.get_attribute("id") == "confirm-cancel"
    browser.switch_to.active_element.send_keys(Keys.ESCAPE)
    until(browser, lambda d: not dialog.is_displayed(), "Escape to close the dialog")
    until(browser, lambda d: "Cancelled" in status_text(d), "the cancellation in the status area")
    assert sidecar.deliveries("dead") and len(receiver.answers) == answers_before

    # Confirmed, it is queued again and the page follows it until it is delivered.
    css(browser, "main .toolbar button")[0].click()
    until(browser, lambda d: dialog.is_displayed(), "the dialog again")
    css(browser, "#confirm-ok")[0].click()
    until(browser, lambda d: "queued again" in status_text(d), "the API's answer in the status area")
    until(browser, lambda d: css(d, "main h1 .badge") and css(d, "main h1 .badge")[0].text == "delivered",
          "the delivery to become delivered")
    assert not sidecar.deliveries("dead")
    assert_token_hidden(browser, token)


def test_the_table_is_reachable_on_a_narrow_screen(sidecar, browser):
    browser.set_window_size(390, 844)
    browser.get(sidecar.base + "/admin/#/deliveries")
    sign_in(browser, sidecar, sidecar.admin_token)
    until(browser, lambda d: table_rows(d), "the deliveries table")
    # The page itself does not scroll sideways; the table scrolls inside its own box.
    width, inner = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert width <= inner, (width, inner)
    link = css(browser, "main tbody a")[0]
    browser.execute_script("arguments[0].scrollIntoView()", link)
    assert link.is_displayed()
    link.click()
    until(browser, lambda d: css(d, "main h1") and css(d, "main h1")[0].text.startswith("Delivery"), "the delivery's page")


def test_without_an_admin_token_there_is_no_sign_in(binary, receiver, tmp_path, browser):
    open_sidecar = Sidecar(binary, tmp_path / "open", receiver, None)
    try:
        browser.get(open_sidecar.base + "/admin/")
        until(browser, lambda d: css(d, "main figure.chart"), "the overview without signing in")
        assert not css(browser, "#signin")[0].is_displayed()
        assert not css(browser, "#signout")[0].is_displayed()
    finally:
        stop(open_sidecar.process)


def test_a_body_is_shown_as_sent_and_a_broken_address_says_so(binary, receiver, tmp_path, browser):
    """The body's JSON is indented without being parsed into numbers, so an id beyond 2^53 and a
    repeated key are shown as Kora sent them; an address that does not decode shows a message,
    not a blank page."""
    open_sidecar = Sidecar(binary, tmp_path / "exact", receiver, None)
    try:
        body = (b'{"id":"evt_exact","type":"verification.completed","data":{"verificationId":"ver_exact",'
                b'"status":"approved","documentNumber":12345678901234567890,"note":"a","note":"b"}}')
        with urllib.request.urlopen(signed_webhook(open_sidecar, body), timeout=10) as answer:
            assert answer.status == 200
        wait_for(lambda: open_sidecar.deliveries("delivered"), "the event to be delivered")
        delivery_id = open_sidecar.deliveries("delivered")[0]["id"]

        browser.get(f"{open_sidecar.base}/admin/#/deliveries/{delivery_id}")
        shown = until(browser, lambda d: css(d, "main pre.body"), "the delivery's body")[0].text
        assert '"documentNumber": 12345678901234567890' in shown, shown
        assert '"note": "a",' in shown and '"note": "b"' in shown, shown

        browser.get(f"{open_sidecar.base}/admin/#/deliveries/%E0")
        until(browser, lambda d: css(d, "main h1") and css(d, "main h1")[0].text == "Could not load this view",
              "the broken address to be said, instead of the last view staying")
    finally:
        stop(open_sidecar.process)


def test_a_quarantined_body_stays_closed_until_it_is_opened(binary, receiver, tmp_path, browser):
    """The quarantine view lists a page of payloads; each body, which may hold identity data, is shown
    only when the operator opens it."""
    open_sidecar = Sidecar(binary, tmp_path / "quarantine", receiver, None)
    try:
        body = b'{"id": "evt_broken", "documentNumber": "Q-MARKER-123", '  # signed, but not JSON
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(signed_webhook(open_sidecar, body), timeout=10)
        assert refused.value.code == 400

        browser.get(f"{open_sidecar.base}/admin/#/quarantine")
        until(browser, lambda d: css(d, "main article.payload"), "the quarantined payload")
        assert "Q-MARKER-123" not in css(browser, "main")[0].text
        css(browser, "main details.payload-body summary")[0].click()
        until(browser, lambda d: "Q-MARKER-123" in css(d, "main pre.body")[0].text, "the body once opened")
    finally:
        stop(open_sidecar.process)
