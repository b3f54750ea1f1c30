"""The run report in a real browser: headless Chromium (Debian's `chromium`), driven over the
DevTools protocol on a pipe (`--remote-debugging-pipe`: no port, no websocket library).

A page fails on any console error, uncaught exception or failed resource load, if its load
event takes 2 s or more, or if a section the run's stages produce is missing; a screenshot of
the viewport (1366 x 900, a laptop screen) is saved under the test's tmp dir. The report is
built from the real small run of tests/unit/test_report.py. `.ci/run` installs chromium, so
in CI a missing browser is a failure, not a skip.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

WIDTH, HEIGHT = 1366, 900
LOAD_LIMIT_MS = 2000
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--disable-extensions", "--remote-debugging-pipe"]


def chromium_or_skip() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs it: apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return path


def _wire_fds(read_end: int, write_end: int) -> None:
    """In the child: the pipe ends as fds 3 and 4, inheritable (via fds >= 10 first, so that
    an end already numbered 3 or 4 is neither clobbered nor left close-on-exec)."""
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (read_end, write_end)]
    os.dup2(high[0], 3)
    os.dup2(high[1], 4)


class Chromium:
    """One headless browser; `call` sends a DevTools command and returns its result, keeping
    the events that arrive meanwhile in `events`."""

    def __init__(self, binary: str, profile: Path):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # the browser reads commands on fd 3 and writes replies and events on fd 4
        self.proc = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=False,
            preexec_fn=lambda: _wire_fds(to_browser_r, from_browser_w))
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer, self._next_id, self.events = b"", 0, []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._next_id += 1
        body = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            body["sessionId"] = session
        os.write(self._to_browser, json.dumps(body).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            msg = self._read_message(deadline)
            if msg.get("id") == self._next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        while True:
            msg = self._read_message(deadline)
            if msg.get("method") == method:
                return msg
            self.events.append(msg)

    def close(self):
        try:
            self.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._to_browser)
        os.close(self._from_browser)


def _errors(events: list[dict]) -> list[str]:
    """Console errors, uncaught exceptions, and error-level browser log entries (failed loads)."""
    out = []
    for e in events:
        p = e.get("params", {})
        if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif e.get("method") == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append("exception: " + d.get("exception", {}).get("description", d.get("text", "")))
        elif e.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
    return out


def render_in_chromium(page: Path, screenshot: Path, tmp: Path) -> dict:
    """Open `page` in headless Chromium at 1366x900: {"errors", "load_ms", "sections"}; the
    viewport is saved as a PNG at `screenshot`."""
    browser = Chromium(chromium_or_skip(), tmp / "chromium-profile")
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            browser.call(f"{domain}.enable", session=session)
        browser.call("Emulation.setDeviceMetricsOverride",
                     {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False}, session=session)
        browser.call("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")
        probe = ("JSON.stringify({load: performance.getEntriesByType('navigation')[0].loadEventEnd,"
                 " sections: [...document.querySelectorAll('section[data-section]')].map(s => s.dataset.section)})")
        for _ in range(50):  # loadEventEnd is set once the load handlers have returned
            state = json.loads(browser.call("Runtime.evaluate", {"expression": probe, "returnByValue": True},
                                            session=session)["result"]["value"])
            if state["load"] > 0:
                break
            time.sleep(0.02)
        shot = browser.call("Page.captureScreenshot", {"format": "png"}, session=session)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        time.sleep(0.2)  # let late console messages arrive
        browser.call("Runtime.evaluate", {"expression": "1"}, session=session)
        return {"errors": _errors(browser.events), "load_ms": state["load"], "sections": state["sections"]}
    finally:
        browser.close()


def test_console_errors_and_failed_loads_are_caught(tmp_path):
    """The check can fail: a page with a console error, an uncaught exception and a missing image."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><section data-section="x">x</section><img src="missing.png">'
                   '<script>console.error("boom"); undefinedFunction();</script></body></html>')
    result = render_in_chromium(bad, tmp_path / "bad.png", tmp_path)
    text = "\n".join(result["errors"])
    assert "boom" in text and "undefinedFunction" in text and "missing.png" in text, text
    assert result["sections"] == ["x"]


def test_report_opens_offline_without_errors_in_under_2s(local_ray, tmp_path_factory, hf_bpe_dir, tmp_path):
    from pipeline.report import write_report
    from tests.unit.test_report import build_small_run
    run_dir = build_small_run(tmp_path_factory, hf_bpe_dir)
    page = Path(write_report(str(run_dir), str(tmp_path / "report.html")))
    shot = tmp_path / "report.png"
    result = render_in_chromium(page, shot, tmp_path)
    assert result["errors"] == []
    assert result["sections"] == ["funnel", "quarantine", "domains", "mixture", "selection", "shards"]
    assert 0 < result["load_ms"] < LOAD_LIMIT_MS, f"load event after {result['load_ms']:.0f} ms"
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (WIDTH, HEIGHT)
    print(f"report: load event at {result['load_ms']:.0f} ms; screenshot {shot}")
