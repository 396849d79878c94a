"""The example app's page in a real browser: headless Chromium, driven over
the DevTools protocol on a pipe. Changes made by another connection and by
the page's own buttons show up live, without a reload: drawn like the rows
the page loaded with, highlighted, and listed in the log."""

from __future__ import annotations

import base64
import fcntl
import itertools
import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing, suppress
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, request
from werkzeug.serving import make_server

from flask_dbnotify import DBNotify

from ._helpers import WAIT, Backend, Proxy, not_here
from .test_example_app import (
    Writer,
    next_event,
    open_stream,
    running_example,
)

# Triggers mode and SQLite only: the example app chooses its capture itself.
pytestmark = pytest.mark.backends("postgresql", "sqlite")

CHROMIUM = "/usr/bin/chromium"

# Installed in the page once it has loaded; a reload would lose it.
PROBE = """window.probe = {
  rows: () => [...document.querySelectorAll("#orders > li")].map((li) => {
    const shape = (el) => [el.tagName, [...el.classList].filter((c) => c !== "changed").join(" "),
                           [...el.children].map(shape)];
    const leaves = [...li.querySelectorAll("*")].filter((el) => !el.children.length);
    return {
      id: li.id, text: li.innerText.replace(/\\s+/g, " ").trim(), shape: shape(li),
      bold: leaves.filter((el) => +getComputedStyle(el).fontWeight >= 600)
        .map((el) => el.textContent),
      animations: li.getAnimations().filter((a) => a.playState === "running")
        .map((a) => a.animationName),
      background: getComputedStyle(li).backgroundColor,
    };
  }),
  button: (text, within = document) =>
    [...within.querySelectorAll("button")].find((b) => b.textContent === text),
  log: () => [...document.querySelectorAll("#log li")].map((li) => li.textContent),
}"""
NO_BACKGROUND = "rgba(0, 0, 0, 0)"
INSERT = (
    "INSERT INTO orders (item, status, created_at) "
    "VALUES (%s, 'new', CURRENT_TIMESTAMP) RETURNING id"
)


def above_4(fd: int) -> int:
    """``fd`` renumbered 5 or above, so that placing pipe ends at 3 and 4 in
    Chromium cannot overwrite one with the other."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5)
    os.close(fd)
    return moved


class Chromium:
    """Headless Chromium showing one page. It reads DevTools commands (JSON,
    each ending in a NUL byte) on its fd 3 and answers, and sends events, on
    its fd 4."""

    def __init__(self, profile: Path) -> None:
        commands_in, commands_out = map(above_4, os.pipe())
        answers_in, answers_out = map(above_4, os.pipe())
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe"]
        flags += [f"--user-data-dir={profile}", "--no-first-run", "--window-size=800,1000"]
        self.log = profile.parent / "chromium.log"
        # Not Popen: its pass_fds keeps our numbers, and Chromium wants 3 and 4.
        self.pid = os.posix_spawn(
            CHROMIUM,
            [CHROMIUM, *flags, "about:blank"],
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, commands_in, 3),
                (os.POSIX_SPAWN_DUP2, answers_out, 4),
                (os.POSIX_SPAWN_OPEN, 1, str(self.log), os.O_WRONLY | os.O_CREAT, 0o644),
                (os.POSIX_SPAWN_DUP2, 1, 2),
            ],
            setsid=True,
        )
        os.close(commands_in)
        os.close(answers_out)
        self.commands = os.fdopen(commands_out, "wb")
        self.answers = answers_in
        self.buf = b""
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Run ``method``, in the page once one is open; its result."""
        number = next(self.ids)
        command: dict[str, Any] = {"id": number, "method": method, "params": params}
        if self.session is not None:
            command["sessionId"] = self.session
        self.commands.write(json.dumps(command).encode() + b"\0")
        self.commands.flush()
        deadline = time.monotonic() + WAIT
        while True:
            while b"\0" not in self.buf:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.answers], [], [], left)[0]:
                    raise AssertionError(f"Chromium did not answer {method} within {WAIT}s")
                chunk = os.read(self.answers, 1 << 20)
                if not chunk:
                    raise AssertionError(f"Chromium quit: {self.log.read_text()[-2000:]}")
                self.buf += chunk
            raw, _, self.buf = self.buf.partition(b"\0")
            message = json.loads(raw)
            if message.get("id") != number:
                self.events.append(message)
            elif "error" in message:
                raise AssertionError(f"{method} failed: {message['error']}")
            else:
                return message["result"]  # type: ignore[no-any-return]

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        for domain in ("Runtime", "Log", "Network", "Page"):
            self.send(f"{domain}.enable")
        # Answered once the new document has replaced about:blank.
        navigated = self.send("Page.navigate", url=url)
        assert "errorText" not in navigated, f"{url}: {navigated['errorText']}"

    def js(self, expression: str) -> Any:
        """The value of ``expression`` in the page (a promise is awaited)."""
        result = self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            error = details.get("exception", {}).get("description", details["text"])
            if "probe is not defined" in error:
                raise AssertionError("the page reloaded: the probe installed at load is gone")
            raise AssertionError(f"{expression} threw {error}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, shown: str = "document.body?.innerText") -> Any:
        """Poll ``expression`` until it is true; its value. On failure, say
        what ``shown`` gives."""
        deadline = time.monotonic() + WAIT
        while not (value := self.js(expression)):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the page did not show {what} within {WAIT}s; it shows {self.js(shown)!r}"
                )
            time.sleep(0.02)
        return value

    def click(self, element: str) -> None:
        """Click the middle of the element that JavaScript ``element`` finds."""
        box = f"(({element}).scrollIntoView(), ({element}).getBoundingClientRect().toJSON())"
        where = self.js(box)
        x, y = where["x"] + where["width"] / 2, where["y"] + where["height"] / 2
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot")["data"]))

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions and failed requests so far."""
        self.js("0")  # take in the events sent before now
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append(f"console.error {[a.get('value') for a in params['args']]}")
            elif method == "Runtime.exceptionThrown":
                found.append(f"uncaught {params['exceptionDetails']}")
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(f"{params['entry']['text']} {params['entry'].get('url', '')}")
            elif method == "Network.responseReceived" and params["response"]["status"] >= 400:
                found.append(f"HTTP {params['response']['status']} {params['response']['url']}")
            elif method == "Network.loadingFailed" and not params.get("canceled"):
                found.append(f"request failed: {params['errorText']}")
        return found

    def close(self) -> None:
        with suppress(ProcessLookupError):  # it may have quit already
            os.killpg(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        self.commands.close()
        os.close(self.answers)


@pytest.fixture()
def page(tmp_path: Path) -> Iterator[Chromium]:
    if not os.access(CHROMIUM, os.X_OK):
        not_here(f"browser tests NOT RUN: no {CHROMIUM} (`apt-get install chromium`)")
    browser = Chromium(tmp_path / "profile")
    try:
        yield browser
    finally:
        browser.close()


def row(page: Chromium, order_id: int, text: str, what: str) -> dict[str, Any]:
    """What the page shows of order ``order_id``, once its row reads ``text``."""
    find = f"probe.rows().find((r) => r.id === 'order-{order_id}' && r.text === {json.dumps(text)})"
    rows = "probe.rows().map((r) => r.text)"
    return page.wait_for(find, f"{what}, {text!r}", rows)  # type: ignore[no-any-return]


def assert_drawn_live(drawn: dict[str, Any], like: dict[str, Any], status: str) -> None:
    """A row the page drew for a change looks like one it loaded with, and
    is highlighted."""
    assert drawn["shape"] == like["shape"], "a live row is drawn unlike a loaded one"
    assert drawn["bold"] == [status]
    assert drawn["animations"], "no highlight animation runs on the changed row"
    assert drawn["background"] != NO_BACKGROUND, "the changed row is not highlighted"


def test_the_board_shows_every_change_live(
    backend: Backend, page: Chromium, tmp_path: Path
) -> None:
    database = backend.url
    with running_example(database) as example, closing(Writer(database)) as writer:

        def insert(item: str) -> int:
            return int(writer(INSERT, item)[0][0])

        # Two orders the page loads with, out of the app's stream before it opens.
        sock, stream = open_stream(example["port"])
        with sock:
            tea, coffee = insert("tea"), insert("coffee")
            writer("UPDATE orders SET status = 'shipped' WHERE id = %s", coffee)
            for _ in range(3):
                next_event(stream)
        page.open(f"http://127.0.0.1:{example['port']}/")
        page.wait_for("document.body?.dataset.live === 'connected'", "its event stream open")
        page.js(PROBE)
        assert page.js("document.getElementById('live').innerText") == "● live"
        loaded_new = row(page, tea, f"#{tea} tea — new ship", "the order it loaded with")
        loaded_shipped = row(page, coffee, f"#{coffee} coffee — shipped", "the shipped order")
        assert loaded_new["bold"] == ["new"] and loaded_shipped["bold"] == ["shipped"]
        assert [r["id"] for r in page.js("probe.rows()")] == [f"order-{coffee}", f"order-{tea}"]

        # Another connection inserts, ships, deletes, then inserts three at once.
        cake = insert("cake")
        drawn = row(page, cake, f"#{cake} cake — new ship", "the inserted order")
        assert_drawn_live(drawn, like=loaded_new, status="new")
        page.screenshot(tmp_path / "1-inserted.png")
        writer("UPDATE orders SET status = 'shipped' WHERE id = %s", cake)
        drawn = row(page, cake, f"#{cake} cake — shipped", "the shipped order, without ship")
        assert_drawn_live(drawn, like=loaded_shipped, status="shipped")
        writer("DELETE FROM orders WHERE id = %s", tea)
        page.wait_for(f"!document.getElementById('order-{tea}')", "the deleted order gone")
        writer("BEGIN")
        buns = [insert(f"bun {n}") for n in (1, 2, 3)]
        writer("COMMIT")
        for n, bun in enumerate(buns, 1):
            drawn = row(page, bun, f"#{bun} bun {n} — new ship", "an order of the transaction")
            assert_drawn_live(drawn, like=loaded_new, status="new")
        page.screenshot(tmp_path / "2-three-in-one-transaction.png")

        # The page's own form and button: no reload, and the change comes back live.
        page.click("document.querySelector('input[name=item]')")
        page.send("Input.insertText", text="scone")
        page.click("probe.button('Add order')")
        scone = buns[-1] + 1  # the next id: nothing was inserted in between
        drawn = row(page, scone, f"#{scone} scone — new ship", "the order added on the page")
        assert_drawn_live(drawn, like=loaded_new, status="new")
        page.wait_for("document.querySelector('input[name=item]').value === ''", "the input reset")
        page.click(f"probe.button('ship', document.getElementById('order-{scone}'))")
        drawn = row(page, scone, f"#{scone} scone — shipped", "the order shipped on the page")
        assert_drawn_live(drawn, like=loaded_shipped, status="shipped")
        page.screenshot(tmp_path / "3-shipped-on-the-page.png")

        assert page.js("typeof window.probe") == "object", "the page reloaded"
        assert page.js("probe.log()") == [
            f"UPDATE #{scone} scone (shipped) changed: status",
            f"INSERT #{scone} scone (new)",
            *[f"INSERT #{bun} bun {n} (new)" for n, bun in reversed(list(enumerate(buns, 1)))],
            f"DELETE #{tea} tea (new)",
            f"UPDATE #{cake} cake (shipped) changed: status",
            f"INSERT #{cake} cake (new)",
        ]
        assert page.problems() == []


# -- dbnotify.stream() in a browser: EventSource resumes with Last-Event-ID -------

STREAM_PAGE = """<!doctype html><title>stream</title><ul id="got"></ul><script>
window.got = []; window.opened = 0;
const source = new EventSource("/stream");
source.onopen = () => { window.opened += 1; };
for (const kind of ["insert", "update", "delete"]) {
  source.addEventListener(kind, (message) => {
    const data = JSON.parse(message.data);
    window.got.push(`${message.lastEventId} ${kind} ${data.pk}`);
  });
}
</script>"""
WRITE = "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute(sys.argv[2]); c.commit()"


def test_a_page_resumes_its_stream_after_the_link_drops(page: Chromium, tmp_path: Path) -> None:
    """A page's EventSource reads dbnotify.stream() through a proxy; rows
    written by another process appear. The link is cut, and rows change
    while the page cannot reconnect; once it can, it reconnects by
    itself, sends the last id it got, and ends with every change once,
    in order."""
    path = tmp_path / "shop.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT)")
    app = Flask(__name__)
    app.config.update(DBNOTIFY_DATABASE_URI=f"sqlite:///{path}", DBNOTIFY_AUTOSTART=False)
    ext = DBNotify(app)
    ext.watch("orders")
    asked: list[str | None] = []

    @app.get("/")
    def index() -> str:
        return STREAM_PAGE

    @app.get("/stream")
    def stream() -> Any:
        asked.append(request.headers.get("Last-Event-ID"))
        return ext.stream("orders")

    def write(statement: str) -> None:
        subprocess.run([sys.executable, "-c", WRITE, str(path), statement], check=True)

    ext.install_triggers(app)
    ext.start(app)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    proxy = Proxy(("127.0.0.1", server.server_port))
    try:
        page.open(f"http://127.0.0.1:{proxy.port}/")
        page.wait_for("window.opened === 1", "its stream open")
        for item in ("tea", "coffee"):
            write(f"INSERT INTO orders (item) VALUES ('{item}')")
        write("UPDATE orders SET item = 'green tea' WHERE id = 1")
        page.wait_for("window.got.length === 3", "three changes", "JSON.stringify(window.got)")

        proxy.refuse()
        proxy.cut()
        write("INSERT INTO orders (item) VALUES ('cake')")
        write("DELETE FROM orders WHERE id = 2")
        proxy.forward()
        page.wait_for("window.opened === 2", "its stream open again", "window.opened")
        write("INSERT INTO orders (item) VALUES ('scone')")
        page.wait_for("window.got.length >= 6", "six changes", "JSON.stringify(window.got)")
        got = page.js("window.got")
    finally:
        proxy.close()
        server.shutdown()
        ext.close(app)
    assert got == [
        "1 insert 1",
        "2 insert 2",
        "3 update 1",
        "4 insert 3",
        "5 delete 2",
        "6 insert 4",
    ]
    assert asked[0] is None and "3" in asked[1:], asked
