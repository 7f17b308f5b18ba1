"""Browser tests of the visitor chat page, the widget and the agent console (server/static/).

A real kefu server (tests/web/serve.py: shop bot, engine delays and models off, a temp data dir)
runs in a subprocess on a free loopback port; headless Chromium from Debian drives the pages via
Playwright.  Every page is also checked for CSP violations (the server sends a strict
Content-Security-Policy) and uncaught script errors.

Needs /usr/bin/chromium (`apt-get install chromium`) and the `playwright` Python package; the
browser download of `playwright install` is never used.  Without a browser the tests skip,
unless CI is set, where that is a failure.
"""
from __future__ import annotations

import hashlib
import hmac
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.web.serve import IDENTITY_SECRET

CHROMIUM = os.environ.get("KEFU_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ROOT = Path(__file__).resolve().parents[2]
XSS = "<img src=x onerror=alert(1)>"
WAIT_MS = 10_000

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but there is no browser at {CHROMIUM} (apt-get install chromium)",
                    pytrace=False)
    pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium to run the browser tests",
                allow_module_level=True)
try:
    from playwright.sync_api import Page, expect, sync_playwright
except ImportError:  # pragma: no cover - the [dev] extra installs it
    if os.environ.get("CI"):
        raise
    pytest.skip("the playwright package is not installed (pip install playwright)", allow_module_level=True)


# ------------------------------------------------------------------ the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class KefuServer:
    """``python -m tests.web.serve`` in a subprocess; kill() and start() again keep the data."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir, self.port = data_dir, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = data_dir / "server.log"

    def start(self, timeout: float = 40.0) -> None:
        env = dict(os.environ, KEFU_ENGINE_DELAYS="false", KEFU_ENGINE_USE_MODELS="false", PYTHONUNBUFFERED="1",
                   KEFU_WEB_HOST_ORIGINS=SHOP)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.web.serve", str(self.data_dir), str(self.port)],
                                         cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.base + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"the server did not start in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


SHOP_PORT = free_port()
SHOP = f"http://127.0.0.1:{SHOP_PORT}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = KefuServer(tmp_path_factory.mktemp("kefu-web"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def shop(server):
    """A shop's page on another origin (a real loopback server: Chromium's private-network rules
    refuse a page from a fake public origin loading from loopback) with a strict CSP of its own
    and hostile CSS; it embeds the widget with the one documented script line."""
    ts = int(time.time())       # the shop's backend signs its logged-in user's id
    digest = hmac.new(IDENTITY_SECRET.encode(), f"user-42:{ts}".encode(), hashlib.sha256).hexdigest()
    page = (f'<!doctype html><html><head><title>Shop</title><link rel="stylesheet" href="/host.css"></head>'
            f'<body><h1>Shop</h1><script src="{server.base}/static/widget.js" '
            f'data-kefu-url="{server.base}" data-bot="shop" data-visitor-id="user-42" '
            f'data-visitor-ts="{ts}" data-visitor-hash="{digest}" async></script></body></html>').encode()
    css = b"button, iframe, div, kefu-widget { background: red !important; display: none !important; }"
    csp = (f"default-src 'self'; script-src {server.base}; style-src 'self'; frame-src {server.base}")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body, ctype = (css, "text/css") if self.path == "/host.css" else (page, "text/html; charset=utf-8")
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Security-Policy", csp)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", SHOP_PORT), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield SHOP
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


class Watch:
    """Everything a page must not do: fire a dialog, violate the CSP, throw."""

    def __init__(self) -> None:
        self.dialogs: list[str] = []
        self.csp: list[str] = []
        self.errors: list[str] = []

    def attach(self, page: Page) -> Page:
        def on_dialog(d):
            self.dialogs.append(d.message)
            d.dismiss()

        def on_console(m):
            if "Content Security Policy" in m.text or "Content-Security-Policy" in m.text:
                self.csp.append(m.text)

        page.on("dialog", on_dialog)
        page.on("console", on_console)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        return page

    def check(self) -> None:
        assert not self.dialogs, f"a dialog fired: {self.dialogs}"
        assert not self.csp, f"CSP violations: {self.csp}"
        assert not self.errors, f"uncaught script errors: {self.errors}"


@pytest.fixture
def watch():
    w = Watch()
    yield w
    w.check()


@pytest.fixture
def contexts(browser):
    made = []

    def make(**kw):
        ctx = browser.new_context(**kw)
        ctx.set_default_timeout(WAIT_MS)
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        ctx.close()


def open_visitor(contexts, watch: Watch, server: KefuServer, **kw) -> Page:
    page = watch.attach(contexts(**kw).new_page())
    page.goto(server.base + "/?bot=shop")
    expect(page.locator("#log .msg-bot").first).to_contain_text("Kingfisher")   # the greeting
    page.wait_for_function("() => window.kefuChat && window.kefuChat.connected")
    return page


def send(page: Page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def login_agent(contexts, watch: Watch, server: KefuServer, username: str) -> Page:
    page = watch.attach(contexts(viewport={"width": 1200, "height": 800}).new_page())
    page.goto(server.base + "/console")
    page.fill("#login-user", username)
    page.fill("#login-pass", "password123")
    page.click("#login-form button[type=submit]")
    expect(page.locator("#conn-label")).to_have_text("connected")
    return page


def hand_off(visitor: Page, agent: Page) -> str:
    """Visitor clicks "Talk to a person"; the (only online) agent gets it; returns its id."""
    cid = visitor.evaluate("window.kefuChat.conversation")
    visitor.click("#human-btn")
    expect(visitor.locator(".msg-system").last).to_contain_text("You are now chatting with")
    item = agent.locator(f"#mine-list li[data-id='{cid}']")
    expect(item).to_be_visible()
    item.click()
    return cid


def shown_seqs(page: Page, selector: str) -> list[int]:
    return [int(s) for s in page.eval_on_selector_all(selector, "els => els.map(e => e.dataset.seq)")]


# ------------------------------------------------------------------ tests


def test_visitor_asks_the_shop_bot_and_sees_the_answer(server, contexts, watch):
    page = open_visitor(contexts, watch, server)
    send(page, "where is my order KF-10023")
    mine = page.locator("#log .msg-visitor").last
    expect(mine.locator(".bubble")).to_have_text("where is my order KF-10023")
    expect(mine.locator(".meta")).to_contain_text("Sent")           # acked: no longer pending
    answer = page.locator("#log .msg-bot").nth(1)
    expect(answer).to_contain_text("KF-10023")
    expect(answer).to_contain_text("shipped")
    expect(page.locator("#typing")).to_be_hidden()
    assert page.locator(".msg-pending").count() == 0


def test_xss_payload_is_literal_text_in_the_chat_page_and_the_console(server, contexts, watch):
    agent = login_agent(contexts, watch, server, "alice")
    visitor = open_visitor(contexts, watch, server)
    send(visitor, XSS)
    bubble = visitor.locator("#log .msg-visitor .bubble").last
    expect(bubble).to_have_text(XSS)
    expect(visitor.locator("#log .msg-visitor .meta").last).to_contain_text("Sent")
    cid = hand_off(visitor, agent)

    line = agent.locator("#transcript .m-visitor .b").filter(has_text="onerror")
    expect(line).to_have_text(XSS)
    expect(agent.locator(f"#mine-list li[data-id='{cid}'] .conv-preview")).to_have_text(XSS)
    # The agent answers with markup of their own: inert on the visitor's side too.
    agent.fill("#reply", "<b>bold</b><script>alert(2)</script>")
    agent.press("#reply", "Enter")
    expect(visitor.locator("#log .msg-agent .bubble").last).to_have_text("<b>bold</b><script>alert(2)</script>")

    for page, area in ((visitor, "#log"), (agent, "#transcript")):
        assert page.locator(f"{area} img, {area} script, {area} b").count() == 0
    visitor.wait_for_timeout(300)          # a broken image's onerror would have fired by now
    assert not watch.dialogs


def test_visitor_asks_for_a_person_and_the_agent_sees_the_bot_transcript_and_replies(server, contexts, watch):
    agent = login_agent(contexts, watch, server, "bob")
    visitor = open_visitor(contexts, watch, server)
    send(visitor, "how do I return an item")
    expect(visitor.locator("#log .msg-bot")).to_have_count(2)
    bot_answer = visitor.locator("#log .msg-bot .bubble").nth(1).text_content()
    hand_off(visitor, agent)
    expect(visitor.locator("#human-btn")).to_be_hidden()

    transcript = agent.locator("#transcript")
    expect(transcript.locator(".m-bot .b").first).to_contain_text("Kingfisher")     # the greeting
    expect(transcript.locator(".m-visitor .b")).to_have_text(["how do I return an item"])
    expect(transcript.locator(".m-bot .b").nth(1)).to_have_text(bot_answer)
    expect(transcript.locator(".m-system").last).to_contain_text("You are now chatting with Bob")

    agent.fill("#reply", "Hi, I'm Bob. Which item would you like to return?")
    agent.press("#reply", "Enter")
    reply = visitor.locator("#log .msg-agent").last
    expect(reply.locator(".bubble")).to_have_text("Hi, I'm Bob. Which item would you like to return?")
    expect(reply.locator(".who")).to_have_text("Bob")
    expect(agent.locator("#transcript .m-pending")).to_have_count(0)              # acked

    # typing both ways, then a reply and a read receipt
    agent.type("#reply", "one moment")
    expect(visitor.locator("#typing")).to_be_visible()
    visitor.type("#input", "the blue")
    expect(agent.locator("#typing")).to_be_visible()
    visitor.press("#input", "Enter")
    expect(agent.locator("#transcript .m-visitor .b").last).to_have_text("the blue")
    expect(visitor.locator("#log .msg-visitor .meta").last).to_contain_text("Read")
    expect(agent.locator("#transcript .m-agent.m-read")).to_have_count(1)      # the visitor read Bob's reply
    agent.screenshot(path="/tmp/kefu-console.png")
    visitor.screenshot(path="/tmp/kefu-chat-human.png")


def test_page_reconnects_after_the_socket_drops_and_shows_no_duplicates(server, contexts, watch):
    agent = login_agent(contexts, watch, server, "carol")
    vctx = contexts()
    visitor = watch.attach(vctx.new_page())
    visitor.goto(server.base + "/?bot=shop")
    visitor.wait_for_function("() => window.kefuChat && window.kefuChat.connected")
    send(visitor, "hello")
    expect(visitor.locator("#log .msg-bot")).to_have_count(2)
    hand_off(visitor, agent)

    # 1. The visitor's network goes away while the agent keeps writing.
    vctx.set_offline(True)
    visitor.wait_for_function("() => !window.kefuChat.connected")
    expect(visitor.locator("#conn-status")).to_be_visible()
    for text in ("missed one", "missed two"):
        agent.fill("#reply", text)
        agent.press("#reply", "Enter")
    expect(agent.locator("#transcript .m-agent .b")).to_have_text(["missed one", "missed two"])
    send(visitor, "written offline")                     # pending until it can be sent
    expect(visitor.locator("#log .msg-pending")).to_have_count(1)
    vctx.set_offline(False)
    visitor.wait_for_function("() => window.kefuChat.connected")
    expect(visitor.locator("#log .msg-agent .bubble")).to_have_text(["missed one", "missed two"])
    expect(visitor.locator("#log .msg-pending")).to_have_count(0)
    expect(agent.locator("#transcript .m-visitor .b").last).to_have_text("written offline")

    # 2. The socket drops again (closed under the page): it resumes from its last seq.
    visitor.evaluate("window.kefuChat.dropConnection()")
    visitor.wait_for_function("() => window.kefuChat.connected")

    # 3. The server is killed and restarted: both pages come back by themselves.
    server.kill()
    visitor.wait_for_function("() => !window.kefuChat.connected")
    server.start()
    visitor.wait_for_function("() => window.kefuChat.connected", timeout=30_000)
    agent.wait_for_function("() => window.kefuConsole.connected", timeout=30_000)
    agent.fill("#reply", "back again")
    agent.press("#reply", "Enter")
    send(visitor, "me too")
    expect(visitor.locator("#log .msg-agent .bubble").last).to_have_text("back again")
    expect(agent.locator("#transcript .m-visitor .b").last).to_have_text("me too")

    texts = visitor.locator("#log .bubble").all_text_contents()
    for text in ("missed one", "missed two", "written offline", "back again", "me too"):
        assert texts.count(text) == 1, (text, texts)
    seqs = shown_seqs(visitor, "#log [data-seq]")
    assert len(seqs) == len(set(seqs)) and seqs == sorted(seqs), seqs
    assert seqs == list(range(1, len(seqs) + 1)), f"a gap in what the visitor sees: {seqs}"
    agent_seqs = shown_seqs(agent, "#transcript [data-seq]")
    assert agent_seqs == list(range(1, len(agent_seqs) + 1)), agent_seqs
    assert agent.locator("#transcript .m-agent .b").all_text_contents().count("missed one") == 1

    # 4. A reload resumes the same conversation (token and id in localStorage): same transcript.
    visitor.reload()
    visitor.wait_for_function("() => window.kefuChat && window.kefuChat.connected")
    expect(visitor.locator("#log .bubble")).to_have_text(texts)
    assert shown_seqs(visitor, "#log [data-seq]") == seqs


def test_page_works_on_a_375_by_667_phone_screen(server, contexts, watch):
    page = open_visitor(contexts, watch, server, viewport={"width": 375, "height": 667}, is_mobile=True,
                        has_touch=True, device_scale_factor=2)
    send(page, "how long does delivery take")
    expect(page.locator("#log .msg-bot")).to_have_count(2)
    send(page, "x" * 300)                           # one unbroken word must wrap, not widen the page
    expect(page.locator("#log .msg-visitor .meta").last).to_contain_text("Sent")
    page.screenshot(path="/tmp/kefu-chat-375x667.png")

    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 375, f"horizontal overflow: the page is {width}px wide"
    for sel in ("#input", "#send", "#human-btn", ".bar"):
        box = page.locator(sel).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375 and box["y"] + box["height"] <= 667, (sel, box)
    assert page.evaluate("parseFloat(getComputedStyle(document.getElementById('input')).fontSize)") >= 16
    for bubble in page.locator("#log .bubble").all():
        box = bubble.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 375, box


def test_agents_accept_from_the_queue_transfer_and_close(tmp_path, contexts, watch):
    srv = KefuServer(tmp_path)                   # its own server: a known routing state
    srv.start()
    try:
        erin = login_agent(contexts, watch, srv, "erin")       # capacity 1
        frank = login_agent(contexts, watch, srv, "frank")
        frank.select_option("#presence", "away")               # away: gets nothing by routing
        v1 = open_visitor(contexts, watch, srv)
        c1 = hand_off(v1, erin)
        # erin is full, frank away: the second visitor waits in the queue
        v2 = open_visitor(contexts, watch, srv)
        send(v2, "my parcel is damaged")
        expect(v2.locator("#log .msg-bot")).to_have_count(2)
        c2 = v2.evaluate("window.kefuChat.conversation")
        v2.click("#human-btn")
        expect(v2.locator(".msg-system").last).to_contain_text("in the queue")
        queued = frank.locator(f"#queue-list li[data-id='{c2}']")
        expect(queued).to_contain_text("my parcel is damaged")
        queued.click()
        expect(frank.locator("#transcript .m-visitor .b")).to_have_text(["my parcel is damaged"])  # before accepting
        frank.click("#accept")
        expect(frank.locator(f"#mine-list li[data-id='{c2}']")).to_be_visible()
        expect(frank.locator("#queue-list li")).to_have_count(0)
        expect(v2.locator(".msg-system").last).to_contain_text("You are now chatting with Frank")

        # erin hands her visitor to frank (online again)
        frank.select_option("#presence", "online")
        erin.locator(f"#mine-list li[data-id='{c1}']").click()
        expect(erin.locator(f"#transfer-to option[value]")).not_to_have_count(0)
        erin.locator("#transfer").scroll_into_view_if_needed()
        frank_id = frank.evaluate("window.kefuConsole.me.id")
        erin.select_option("#transfer-to", frank_id)
        erin.click("#transfer")
        expect(erin.locator(f"#mine-list li[data-id='{c1}']")).to_have_count(0)
        expect(frank.locator(f"#mine-list li[data-id='{c1}']")).to_be_visible()
        expect(v1.locator(".msg-system").last).to_contain_text("Frank is taking over")
        frank.locator(f"#mine-list li[data-id='{c1}']").click()
        expect(frank.locator("#transcript .m-bot .b").first).to_contain_text("Kingfisher")   # whole transcript

        # frank closes the second conversation; the visitor's next message starts a new one
        frank.locator(f"#mine-list li[data-id='{c2}']").click()
        frank.click("#close-conv")
        expect(frank.locator(f"#mine-list li[data-id='{c2}']")).to_have_count(0)
        expect(v2.locator(".msg-system").last).to_contain_text("closed")
        send(v2, "where is my order KF-10023")
        expect(v2.locator("#log .msg-bot")).to_have_count(2)                 # fresh greeting + answer
        assert v2.evaluate("window.kefuChat.conversation") != c2
    finally:
        srv.stop()


def test_no_agent_online_shows_the_leave_a_message_form(tmp_path, contexts, watch):
    srv = KefuServer(tmp_path)                   # its own server: nobody has ever logged in
    srv.start()
    try:
        page = open_visitor(contexts, watch, srv, viewport={"width": 375, "height": 667})
        page.click("#human-btn")
        expect(page.locator(".msg-system").last).to_contain_text("No agent is online")
        expect(page.locator("#leave-form")).to_be_visible()
        page.screenshot(path="/tmp/kefu-chat-leave-375x667.png")
        page.fill("#leave-name", "Ann <script>")
        page.fill("#leave-contact", "ann@example.com")
        page.fill("#leave-text", "Please call me about order KF-10023")
        page.click("#leave-form button[type=submit]")
        expect(page.locator("#leave-form")).to_be_hidden()
        expect(page.locator("#log .msg-visitor .meta").last).to_contain_text("Sent")
        # An agent logging in later gets the conversation with the message.
        agent = login_agent(contexts, watch, srv, "dave")
        cid = page.evaluate("window.kefuChat.conversation")
        agent.locator(f"#mine-list li[data-id='{cid}']").click()
        expect(agent.locator("#transcript .m-visitor .b").last).to_have_text(
            "Name: Ann <script>\nContact: ann@example.com\nPlease call me about order KF-10023")
    finally:
        srv.stop()


def test_widget_opens_the_chat_in_an_iframe_on_a_host_page(server, shop, contexts, watch):
    page = watch.attach(contexts(viewport={"width": 1000, "height": 800}).new_page())
    page.goto(shop + "/")
    button = page.locator("[data-kefu-widget] button")
    expect(button).to_be_visible()
    assert page.locator("iframe").count() == 0          # nothing loaded until it is opened
    button.click()
    frame = page.frame_locator("[data-kefu-widget] iframe")
    expect(frame.locator("#log .msg-bot").first).to_contain_text("Kingfisher")
    frame.locator("#input").fill("what are your opening hours")
    frame.locator("#input").press("Enter")
    expect(frame.locator("#log .msg-bot")).to_have_count(2)
    page.screenshot(path="/tmp/kefu-widget.png")
    chat = next(f for f in page.frames if "/static/chat.html" in f.url)
    assert chat.evaluate("window.kefuChat.verified") is True      # the signed identity passed through
    assert "hash" not in chat.evaluate("location.href")           # and left the address bar
    # the chat runs on the kefu origin: the host page cannot reach into it
    assert page.evaluate("document.querySelector('[data-kefu-widget]').shadowRoot"
                         ".querySelector('iframe').contentDocument") is None
    frame.locator(".btn-close").click()
    expect(page.locator("[data-kefu-widget] iframe")).to_be_hidden()
    expect(button).to_be_visible()
