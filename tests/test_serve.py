"""The web server: page, JSON API, limits (upload, text, pixels), bounded queue (503), timeout (504), load."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from grounding_helpers import make_model_folder, running_server, scene

from simvg.inference.grounder import Grounder
from simvg.serve.app import ServeLimits, create_app


def png(image=None) -> bytes:
    buffer = io.BytesIO()
    (image or scene()).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def grounder(tmp_path_factory):
    return Grounder.from_checkpoint(make_model_folder(tmp_path_factory.mktemp("serve")), max_text_chars=200)


@pytest.fixture(scope="module")
def client(grounder):
    with TestClient(create_app(grounder, ServeLimits(max_upload_bytes=200_000, max_text_chars=200))) as c:
        yield c


class SlowGrounder:
    """Wraps a grounder, sleeping ``delay`` seconds before each answer (to fill the queue or hit the timeout)."""

    def __init__(self, inner: Grounder, delay: float) -> None:
        self.inner, self.delay = inner, delay
        self.source, self.branch = inner.source, inner.branch

    def ground(self, image, text, branch=None):
        time.sleep(self.delay)
        return self.inner.ground(image, text, branch)


def post(client, image=b"", text="the red circle", **extra):
    files = {"image": ("scene.png", image, "image/png")} if image is not None else None
    return client.post("/api/ground", files=files, data={"text": text, **extra} if text is not None else extra)


def test_page_and_assets_are_served_without_external_urls(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="ground-form"' in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        response = client.get(asset)
        assert response.status_code == 200 and "http://" not in response.text and "https://" not in response.text
    assert "https://" not in page.text and "cdn" not in page.text.lower()


def test_healthz(client, grounder):
    body = client.get("/healthz").json()
    assert body["status"] == "ok" and body["model"] == Path(grounder.source).name
    assert body["queue"] == {"pending": 0, "size": ServeLimits().queue_size}


def test_ground_returns_the_grounder_result(client, grounder):
    response = post(client, png())
    assert response.status_code == 200, response.text
    body = response.json()
    want = grounder.ground(png(), "the red circle").to_dict()
    assert body["boxes"] == want["boxes"] and body["image_size"] == {"width": 96, "height": 64}
    assert body["branch"] == "token" and body["elapsed_ms"] > 0
    assert post(client, png(), branch="decoder").json()["branch"] == "decoder"


@pytest.mark.parametrize(
    ("image", "text", "extra", "status", "message"),
    [
        (None, "the red circle", {}, 400, "missing form field 'image'"),
        (b"png", None, {}, 400, "missing form field 'text'"),
        (b"", "the red circle", {}, 400, "empty image"),
        (b"this is not an image", "the red circle", {}, 400, "not an image"),
        (b"PNG", "", {}, 400, "text is empty"),
        (b"PNG", "x" * 201, {}, 400, "limit is 200"),
        (b"PNG", "the red circle", {"branch": "both"}, 400, "branch must be one of"),
        (b"x" * 300_000, "the red circle", {}, 413, "larger than 200000 bytes"),
    ],
)
def test_bad_requests_get_4xx_and_the_server_keeps_serving(client, image, text, extra, status, message):
    image = png() if image == b"PNG" else image
    response = post(client, image, text, **extra)
    assert response.status_code == status and message in response.json()["error"]
    assert post(client, png()).status_code == 200


def test_chunked_upload_over_the_limit_is_refused(client):
    boundary = "simvgboundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode()  # fmt: skip

    def body():  # a generator body is sent chunked, without a Content-Length the server could check first
        yield head
        for _ in range(10):
            yield b"x" * 50_000

    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    response = client.post("/api/ground", content=body(), headers=headers)
    assert response.status_code == 413


def test_timeout_answers_504_and_the_server_recovers(grounder):
    app = create_app(SlowGrounder(grounder, 0.6), ServeLimits(timeout_s=0.2, queue_size=4))
    with TestClient(app) as client:
        response = post(client, png())
        assert response.status_code == 504 and "longer than 0.2 s" in response.json()["error"]
        deadline = time.monotonic() + 10  # the stuck job finishes on its own and frees its slot
        while client.get("/healthz").json()["queue"]["pending"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/healthz").json()["queue"]["pending"] == 0
        assert post(client, png()).status_code == 504  # still slow, but answered


def test_full_queue_answers_503_at_once(grounder):
    app = create_app(SlowGrounder(grounder, 2.0), ServeLimits(queue_size=1))
    with running_server(app) as url:
        first = threading.Thread(target=lambda: httpx.post(f"{url}/api/ground", files={"image": png()},
                                                           data={"text": "a"}, timeout=30))  # fmt: skip
        first.start()
        deadline = time.monotonic() + 10  # wait until the first request holds the only slot (a loaded CI is slow)
        while httpx.get(f"{url}/healthz").json()["queue"]["pending"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        start = time.monotonic()
        busy = httpx.post(f"{url}/api/ground", files={"image": png()}, data={"text": "a"}, timeout=30)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert time.monotonic() - start < 1.0  # at once, not after the first request's 2 s
        first.join()


def test_load_50_concurrent_requests_all_answered(grounder):
    """50 clients at once against a queue of 4: each gets 200 or 503 quickly; none hangs, none errors."""
    app = create_app(SlowGrounder(grounder, 0.05), ServeLimits(queue_size=4, timeout_s=30))
    image = png()
    with running_server(app) as url, httpx.Client(timeout=30) as http:

        def one(i: int) -> int:
            return http.post(f"{url}/api/ground", files={"image": image}, data={"text": f"shape {i}"}).status_code

        with ThreadPoolExecutor(max_workers=50) as pool:
            codes = list(pool.map(one, range(50)))
        assert set(codes) <= {200, 503}
        assert codes.count(200) >= 4 and codes.count(503) >= 1
        assert http.get(f"{url}/healthz").json()["queue"]["pending"] == 0
        assert http.post(f"{url}/api/ground", files={"image": image}, data={"text": "a"}).status_code == 200


def test_serve_command_builds_the_app_from_its_options(grounder, monkeypatch, capsys):
    from simvg.cli import main
    from simvg.serve import app as serve_app

    started = {}
    monkeypatch.setattr(serve_app, "run_server", lambda app, sock: started.update(app=app, address=sock.getsockname()))
    argv = ["serve", "--checkpoint", grounder.source, "--port", "0", "--max-text-chars", "5", "--queue-size", "2"]
    assert main(argv) == 0
    host, port = started["address"]
    assert host == "127.0.0.1" and port > 0
    assert f"open http://127.0.0.1:{port}/" in capsys.readouterr().out
    with TestClient(started["app"], base_url=f"http://127.0.0.1:{port}") as client:
        assert client.get("/healthz").json()["queue"]["size"] == 2
        assert "limit is 5" in post(client, png(), "the red circle").json()["error"]
    assert main(["serve", "--checkpoint", grounder.source, "--queue-size", "0"]) == 2
