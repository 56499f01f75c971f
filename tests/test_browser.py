"""End to end in headless Chromium: load the page, upload an image, type an expression, submit, see the boxes.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages separated by
NUL bytes on file descriptors 3 and 4), so the test needs only the standard library. Skipped, with the reason, when
no ``chromium`` is installed (CI installs Debian's package in ``.ci/run``).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from grounding_helpers import make_model_folder, running_server, scene

from simvg.inference.grounder import Grounder
from simvg.serve.app import ServeLimits, create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")


class DevTools:
    """A minimal DevTools-protocol client over Chromium's debugging pipe."""

    def __init__(self, profile: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Chromium reads commands on fd 3 and writes replies on fd 4. Our ends first move to fds >= 10 (close-on-exec)
        # so that putting them on 3 and 4 in the child cannot clobber one with the other.
        high_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD_CLOEXEC, 10)
        high_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD_CLOEXEC, 10)

        def wire_fds() -> None:  # runs in the child; dup2 leaves 3 and 4 inheritable
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        args = [CHROMIUM, "--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--no-first-run", f"--user-data-dir={profile}", "about:blank"]  # fmt: skip
        # close_fds=False keeps the dup2-ed 3 and 4; Python's own fds are non-inheritable (PEP 446), so none leak.
        self.process = subprocess.Popen(
            args, close_fds=False, preexec_fn=wire_fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for fd in (to_chrome_r, from_chrome_w, high_r, high_w):
            os.close(fd)
        self._next_id, self._buffer, self.session = 0, b"", None

    def send(self, method: str, timeout: float = 30.0, **params) -> dict:
        """Send one command and wait for its reply (events that arrive meanwhile are dropped)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
        raise TimeoutError(method)

    def _read(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the debugging pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(expression)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


@pytest.fixture()
def browser(tmp_path):
    devtools = DevTools(tmp_path / "profile")
    target = devtools.send("Target.createTarget", url="about:blank")["targetId"]
    devtools.session = devtools.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    yield devtools
    devtools.close()


def test_upload_and_see_boxes(browser, tmp_path):
    grounder = Grounder.from_checkpoint(make_model_folder(tmp_path))
    image = tmp_path / "scene.png"
    scene(192, 128).save(image)
    with running_server(create_app(grounder, ServeLimits(max_text_chars=100))) as url:
        browser.send("Page.navigate", url=url + "/")
        browser.wait_for("document.readyState === 'complete' && !!document.getElementById('ground-form')")
        document = browser.send("DOM.getDocument")["root"]["nodeId"]
        file_input = browser.send("DOM.querySelector", nodeId=document, selector="#image")["nodeId"]
        browser.send("DOM.setFileInputFiles", nodeId=file_input, files=[str(image)])
        browser.evaluate("document.getElementById('image').dispatchEvent(new Event('change'))")
        browser.evaluate("document.getElementById('text').value = 'the red circle on the left'")
        browser.evaluate("document.getElementById('submit').click()")
        browser.wait_for("document.body.dataset.state === 'done'")
        boxes = browser.evaluate("document.querySelectorAll('#boxes .box').length")
        label = browser.evaluate("document.querySelector('#boxes .box-label').textContent")
        rows = browser.evaluate("document.querySelectorAll('#results tr.result').length")
        left = browser.evaluate("parseFloat(document.querySelector('#boxes .box').style.left)")
        assert boxes == 1 and rows == 1 and label.startswith("the red circle on the left")
        want = grounder.ground(image, "the red circle on the left").boxes[0]
        assert left == pytest.approx(100 * want[0] / 192, abs=0.01)

        # A bad request shows the server's one-line error on the page, and the page keeps working.
        browser.evaluate("document.getElementById('text').value = '?!.'")
        browser.evaluate("document.getElementById('submit').click()")
        browser.wait_for("document.body.dataset.state === 'error'")
        assert "empty after cleaning" in browser.evaluate("document.getElementById('status').textContent")
        assert browser.evaluate("document.querySelectorAll('#boxes .box').length") == 0
