"""The page, end to end in headless Chromium, and what it reads from the server (``/api/model``, the examples).

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages separated by
NUL bytes on file descriptors 3 and 4), so the tests need only the standard library. The browser tests are skipped,
with the reason, when no ``chromium`` is installed (CI installs Debian's package in ``.ci/run``); the tests of the
model description and of the example scenes run everywhere.

Screenshots for docs/: ``SIMVG_SCREENSHOTS=docs .venv/bin/pytest tests/test_browser.py`` writes
``page_grounded.png`` (an example grounded by the embedded default) and, when the server returns attention maps,
``page_attention.png`` into that folder; without the variable nothing is written.
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from grounding_helpers import make_model_folder, running_server, scene
from PIL import Image

from simvg.artifact import ASSETS
from simvg.inference.grounder import Grounder
from simvg.serve.app import STATIC_DIR, ServeLimits, create_app
from simvg.synthref.generator import generate_synthref

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
SCREENSHOTS = os.environ.get("SIMVG_SCREENSHOTS")  # a folder: write the docs' screenshots there
EXAMPLES = json.loads((STATIC_DIR / "examples.json").read_text(encoding="utf-8"))
VIEWPORT = {"width": 1000, "height": 900}


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
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(expression)

    def open(self, url: str) -> None:
        """Load ``url`` at the test viewport and wait until the page asked the server about its model."""
        self.send("Emulation.setDeviceMetricsOverride", deviceScaleFactor=1, mobile=False, **VIEWPORT)
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && !!document.getElementById('ground-form')")
        self.wait_for(
            "document.getElementById('model').dataset.state !== 'loading' && "
            "document.getElementById('examples').dataset.state !== 'loading'"
        )

    def set_file(self, path: Path) -> None:
        """Pick ``path`` in the page's file input, as a user would (the change event included)."""
        document = self.send("DOM.getDocument")["root"]["nodeId"]
        file_input = self.send("DOM.querySelector", nodeId=document, selector="#image")["nodeId"]
        self.send("DOM.setFileInputFiles", nodeId=file_input, files=[str(path)])
        self.evaluate("document.getElementById('image').dispatchEvent(new Event('change'))")

    def ground(self) -> str:
        """Press Ground and wait for the answer; the page's state afterwards ("done" or "error")."""
        self.evaluate("document.body.dataset.state = 'busy'; document.getElementById('submit').click()")
        return self.wait_for("['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state")

    def screenshot(self, path: Path) -> None:
        """The whole page as a PNG at ``path``."""
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": VIEWPORT["width"], "height": size["height"], "scale": 1}
        shot = self.send("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))

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


@pytest.fixture(scope="module")
def embedded():
    """The embedded default REC model, as ``simvg serve`` loads it."""
    return Grounder.from_checkpoint()


# Every box and label of the overlay against the image: [left, top, right, bottom] margins in CSS px (>= 0: inside).
MARGINS = """(() => {
  const img = document.getElementById('preview').getBoundingClientRect();
  return [...document.querySelectorAll('#boxes .box, #boxes .box-label')].map((e) => {
    const r = e.getBoundingClientRect();
    return [r.left - img.left, r.top - img.top, img.right - r.right, img.bottom - r.bottom];
  });
})()"""
# The first box's corners in CSS px from the image's top left corner: [x1, y1, x2, y2].
BOX_IN_IMAGE = """(() => {
  const img = document.getElementById('preview').getBoundingClientRect();
  const box = document.querySelector('#boxes .box').getBoundingClientRect();
  return [box.left - img.left, box.top - img.top, box.right - img.left, box.bottom - img.top];
})()"""
# No image on the page shows as a broken image: each one rendered has decoded pixels.
# Shown, done loading, and nothing to draw: the broken-image icon (an example still loading on a busy machine is not).
BROKEN_IMAGES = """[...document.images].filter((img) => img.getClientRects().length > 0
  && img.complete && img.naturalWidth === 0).map((img) => img.id || img.src)"""


def iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two xyxy boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union


# ---- the server's side: /api/model, /healthz and the example scenes ----------------------------------------------


def test_model_endpoint_describes_the_embedded_default(embedded):
    with TestClient(create_app(embedded)) as client:
        model = client.get("/api/model")
    assert model.status_code == 200
    body = model.json()
    # simvg/assets/default/model.yaml: a one-query (REC) model answering with the decoder, 128 px, 20 tokens
    assert body["name"] == "embedded default" and body["task"] == "rec" and body["branch"] == "decoder"
    assert body["score_threshold"] == 0.7 and body["image_size"] == 128 and body["max_tokens"] == 20
    assert body["synthetic_only"] is True and body["trained_on"].startswith("SynthRef synthetic shapes only")
    assert body["vocabulary_size"] == embedded.tokenizer.vocab_size and body["branches"] == ["token", "decoder"]
    words = body["known_words"]
    assert "circle" in words["shapes"] and "purple" in words["colours"]
    assert words["sizes"] == ["small", "medium", "large"]
    assert "second" in words["places"] and "next to" in words["relations"]
    assert str(ASSETS) not in model.text and str(ASSETS.parent) not in model.text


def test_no_absolute_path_in_healthz_or_model(embedded):
    """A run trained on real data records its data root (absolute since runs store absolute paths)."""
    spec = dataclasses.replace(embedded.spec, trained_on="refcoco (data root /srv/private/data/refcoco)")
    grounder = Grounder(embedded.runner, embedded.tokenizer, spec, source="/home/someone/models/refcoco_b32")
    with TestClient(create_app(grounder)) as client:
        health, model = client.get("/healthz"), client.get("/api/model")
        image = io.BytesIO()
        Image.new("RGB", (32, 32), "white").save(image, format="PNG")
        grounded = client.post("/api/ground", files={"image": ("a.png", image.getvalue(), "image/png")},
                               data={"text": "the red square"})  # fmt: skip
    for response in (health, model, grounded):
        assert "/srv/private" not in response.text and "/home/someone" not in response.text
        assert response.json()["trained_on"] == "refcoco (data root .../refcoco)"
    assert model.json()["name"] == "models/refcoco_b32" and model.json()["known_words"] == {}  # not SynthRef-only


def test_examples_are_the_synthref_scenes_of_their_recipe(tmp_path):
    """The committed scenes are what the generator makes at the recorded seed, with the expression and box it
    recorded for them."""
    recipe = EXAMPLES["recipe"]
    generate_synthref(tmp_path, recipe["task"], recipe["num_images"], recipe["image_size"], recipe["seed"],
                      splits=recipe["splits"], max_objects=recipe["max_objects"],
                      background=recipe["background"])  # fmt: skip
    entries = json.loads((tmp_path / "instances.json").read_text())["val"]
    assert len(EXAMPLES["examples"]) >= 3
    for example in EXAMPLES["examples"]:
        committed = STATIC_DIR / example["image"]
        assert committed.stat().st_size < 4096  # small files in the package
        image_id = int(example["image"].removeprefix("example_synthref_").removesuffix(".png"))
        fresh = np.asarray(Image.open(tmp_path / "images" / f"{image_id}.png"))
        assert np.array_equal(np.asarray(Image.open(committed)), fresh)
        entry = next(e for e in entries if e["image_id"] == image_id and example["text"] in e["expressions"])
        x, y, w, h = entry["bbox"]
        assert example["truth"] == [x, y, x + w, y + h]


def test_the_embedded_default_grounds_every_example(embedded):
    for example in EXAMPLES["examples"]:
        result = embedded.ground(STATIC_DIR / example["image"], example["text"])
        assert result.branch == "decoder" and iou(result.boxes[0], example["truth"]) >= 0.5, example


# ---- the page in Chromium -----------------------------------------------------------------------------------------


@needs_chromium
def test_upload_and_see_boxes(browser, tmp_path):
    grounder = Grounder.from_checkpoint(make_model_folder(tmp_path))
    image = tmp_path / "scene.png"
    scene(192, 128).save(image)
    with running_server(create_app(grounder, ServeLimits(max_text_chars=100))) as url:
        browser.open(url + "/")
        browser.set_file(image)
        browser.evaluate("document.getElementById('text').value = 'the red circle on the left'")
        assert browser.ground() == "done"
        boxes = browser.evaluate("document.querySelectorAll('#boxes .box').length")
        label = browser.evaluate("document.querySelector('#boxes .box-label').textContent")
        rows = browser.evaluate("document.querySelectorAll('#results tr.result').length")
        left = browser.evaluate("parseFloat(document.querySelector('#boxes .box').style.left)")
        assert boxes == 1 and rows == 1 and label.startswith("the red circle on the left")
        want = grounder.ground(image, "the red circle on the left").boxes[0]
        assert left == pytest.approx(100 * want[0] / 192, abs=0.01)
        # 192 px is under 384: shown at twice its size (a whole factor), pixelated
        assert browser.evaluate("document.getElementById('preview').getBoundingClientRect().width") == 384
        # this model's default is the token branch (its training config): the page sends none, the server picks it
        assert "token branch" in browser.evaluate("document.getElementById('status').textContent")
        assert browser.evaluate("document.getElementById('branch-default').textContent") == (
            "the model's default (token)"
        )

        # A bad request shows the server's one-line error on the page, and the page keeps working.
        browser.evaluate("document.getElementById('text').value = '?!.'")
        assert browser.ground() == "error"
        assert "empty after cleaning" in browser.evaluate("document.getElementById('status').textContent")
        assert browser.evaluate("document.querySelectorAll('#boxes .box').length") == 0


@needs_chromium
def test_model_panel_examples_scaled_image_and_labels_inside(browser, embedded, tmp_path):
    with running_server(create_app(embedded)) as url:
        browser.open(url + "/")
        assert browser.evaluate("document.getElementById('model').dataset.state") == "ready"
        text = {key: browser.evaluate(f"document.getElementById('model-{key}').textContent")
                for key in ("name", "task", "branch", "threshold", "trained-on", "words")}  # fmt: skip
        assert text["name"] == "embedded default" and text["task"].startswith("REC")
        assert text["branch"].startswith("decoder") and text["threshold"].startswith("0.70")
        assert text["trained-on"].startswith("SynthRef") and "circle" in text["words"]
        assert not browser.evaluate("document.getElementById('model-synthetic').hidden")
        assert browser.evaluate("document.querySelectorAll('.example').length") == len(EXAMPLES["examples"])
        assert browser.wait_for(f"({BROKEN_IMAGES}).length === 0 && [...document.images].every((i) => i.complete)")

        for index, example in enumerate(EXAMPLES["examples"]):
            browser.evaluate(f"document.querySelectorAll('.example')[{index}].click()")
            browser.wait_for("document.body.dataset.state === 'example' && "
                             "!document.getElementById('stage-figure').hidden")  # fmt: skip
            assert browser.evaluate("document.getElementById('text').value") == example["text"]
            assert browser.evaluate("document.getElementById('image').files[0].name") == example["image"]
            assert browser.ground() == "done"
            # 128 px scenes are shown at 3 x 128 = 384 px with square pixels
            shown = browser.evaluate("(() => { const r = document.getElementById('preview').getBoundingClientRect();"
                                     " return [r.width, r.height]; })()")  # fmt: skip
            assert shown == [384, 384]
            assert browser.evaluate("getComputedStyle(document.getElementById('preview')).imageRendering") == (
                "pixelated"
            )
            # the box lies where the model put it, scaled by 3, and nothing of the overlay leaves the image
            want = embedded.ground(STATIC_DIR / example["image"], example["text"]).boxes[0]
            got = browser.evaluate(BOX_IN_IMAGE)
            assert got == pytest.approx([3 * v for v in want], abs=1.0)
            margins = browser.evaluate(MARGINS)
            assert len(margins) == 2 and min(min(m) for m in margins) >= -0.5, (example["text"], margins)
            assert "decoder branch" in browser.evaluate("document.getElementById('status').textContent")
            assert browser.evaluate("document.querySelectorAll('#boxes .truth').length") == 1
            if SCREENSHOTS and index == 1:
                browser.screenshot(Path(SCREENSHOTS) / "page_grounded.png")


@needs_chromium
def test_a_bad_upload_leaves_no_broken_image(browser, tmp_path):
    grounder = Grounder.from_checkpoint(make_model_folder(tmp_path))
    good, bad = tmp_path / "scene.png", tmp_path / "notes.png"
    scene(96, 64).save(good)
    bad.write_text("not an image at all\n")
    visible = "!document.getElementById('stage-figure').hidden"
    with running_server(create_app(grounder)) as url:
        browser.open(url + "/")
        browser.set_file(good)
        browser.wait_for(visible)
        browser.set_file(bad)
        browser.wait_for(f"document.body.dataset.state === 'error' || ({BROKEN_IMAGES}).length > 0")
        assert browser.evaluate(BROKEN_IMAGES) == []
        assert "notes.png: not an image" in browser.evaluate("document.getElementById('status').textContent")
        assert browser.evaluate(f"{visible} || document.getElementById('preview').hasAttribute('src')") is False
        # Ground anyway: the server's one-line refusal is shown, and still no broken image
        browser.evaluate("document.getElementById('text').value = 'the red circle'")
        assert browser.ground() == "error"
        assert "uploaded image" in browser.evaluate("document.getElementById('status').textContent")
        assert browser.evaluate(BROKEN_IMAGES) == [] and browser.evaluate(visible) is False
        # a good image afterwards is shown again
        browser.set_file(good)
        browser.wait_for(visible)
        assert browser.evaluate("document.getElementById('preview').naturalWidth") == 96


def _png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# Wraps the page's fetch of /api/ground: mode "strip" removes the optional fields, "add" fills in any the server
# does not send yet (a confidence of 0.25 per box; with attention=1 in the form, the two maps given here), and
# records the form fields the page sent.
FETCH_HOOK = """(mode, maps) => {
  const real = window.fetch;
  window.sentForms = [];
  window.fetch = async (url, options) => {
    if (url !== '/api/ground') return real(url, options);
    window.sentForms.push(Object.fromEntries([...options.body.entries()].filter(([k]) => k !== 'image')));
    const response = await real(url, options);
    const body = await response.json();
    if (mode === 'strip') { delete body.attention; body.boxes.forEach((b) => delete b.confidence); }
    if (mode === 'add') {
      body.boxes.forEach((b) => { if (!('confidence' in b)) b.confidence = 0.25; });
      if (options.body.get('attention') === '1' && !('attention' in body)) body.attention = maps;
    }
    return new Response(JSON.stringify(body), {status: response.status, headers: {'content-type': 'application/json'}});
  };
}"""


@needs_chromium
def test_confidence_and_attention_are_shown_when_present_and_nothing_when_absent(browser, embedded):
    example = EXAMPLES["examples"][0]
    image = Image.open(STATIC_DIR / example["image"]).convert("RGB")
    # stand-in overlays at the image's size, told apart by colour
    maps = {"token": _png_data_url(Image.new("RGB", image.size, (250, 0, 0))),
            "decoder": _png_data_url(Image.new("RGB", image.size, (0, 0, 250)))}  # fmt: skip
    attention_shown = "!document.getElementById('attention-figure').hidden"
    with running_server(create_app(embedded)) as url:
        browser.open(url + "/")
        browser.evaluate(f"({FETCH_HOOK})('strip', null)")
        browser.evaluate("document.querySelector('.example').click()")
        browser.wait_for("document.body.dataset.state === 'example'")
        browser.evaluate("document.getElementById('attention').checked = true")
        assert browser.ground() == "done"
        assert browser.evaluate("window.sentForms[0]") == {"text": example["text"], "branch": "", "attention": "1"}
        assert browser.evaluate(attention_shown) is False  # absent: nothing, not an empty frame
        assert browser.evaluate("document.getElementById('confidence-head').hidden") is True
        assert browser.evaluate("document.querySelector('#results tr.result').cells.length") == 3

        browser.open(url + "/")
        browser.evaluate(f"({FETCH_HOOK})('add', {json.dumps(maps)})")
        browser.evaluate("document.querySelector('.example').click()")
        browser.wait_for("document.body.dataset.state === 'example'")
        assert browser.ground() == "done"  # attention unchecked: not asked for, not shown
        assert browser.evaluate("window.sentForms[0]") == {"text": example["text"], "branch": ""}
        assert browser.evaluate(attention_shown) is False
        assert browser.evaluate("document.getElementById('confidence-head').hidden") is False
        row = browser.evaluate("[...document.querySelector('#results tr.result').cells].map((c) => c.textContent)")
        label = browser.evaluate("document.querySelector('#boxes .box-label').textContent")
        assert len(row) == 4 and 0.0 <= float(row[2]) <= 1.0  # the server's confidence, or the hook's 0.25
        assert " \u00b7 conf " in label and float(label.rsplit(" ", 1)[1]) == pytest.approx(float(row[2]), abs=0.006)

        browser.evaluate("document.getElementById('attention').checked = true")
        browser.evaluate("document.getElementById('branch').value = 'token'")
        assert browser.ground() == "done"
        browser.wait_for(f"{attention_shown} && document.getElementById('attention-image').complete")
        overlay = browser.evaluate("(() => { const a = document.getElementById('attention-image');"
                                   " return [a.naturalWidth, a.getBoundingClientRect().width,"
                                   " document.getElementById('attention-caption').textContent, a.src.slice(0, 22)];"
                                   " })()")  # fmt: skip
        assert overlay[:2] == [image.width, 384]  # the original size, shown as large as the image
        assert "token branch" in overlay[2] and overlay[3] == "data:image/png;base64,"
        stubbed = browser.evaluate("document.getElementById('attention-image').src") == maps["token"]
        if SCREENSHOTS and not stubbed:  # only a real attention map goes into the docs
            browser.screenshot(Path(SCREENSHOTS) / "page_attention.png")
