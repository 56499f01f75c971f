"""``simvg serve``: a web page and a JSON API for grounding, on FastAPI + uvicorn, bound to 127.0.0.1 by default.

- ``GET /``: a static page (HTML + JS, no CDN) to upload an image, type an expression and see the boxes.
- ``POST /api/ground``: multipart ``image`` (file) + ``text`` [+ ``branch``] -> the result as JSON.
- ``GET /healthz``: liveness, the model's source and the queue's state.

The model runs in one worker thread behind a bounded queue: a request that finds ``queue_size`` requests already
waiting or running is answered 503 at once, and one that waits longer than ``timeout_s`` gets 504, so no client
hangs however many arrive. The queue slot is freed when the model really finishes (not when a request times out),
so the bound holds for the work itself. Bad input is a 4xx with ``{"error": one line}``; the server keeps serving.

No ``from __future__ import annotations`` here: FastAPI reads the route functions' annotations at run time, and
``Request`` is imported inside ``create_app`` so that importing this module never needs FastAPI.
"""

import argparse
import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simvg.errors import UserError
from simvg.inference.commands import load_grounder, model_arguments

if TYPE_CHECKING:
    from fastapi import FastAPI, Request

STATIC_DIR = Path(__file__).parent / "static"


@dataclass
class ServeLimits:
    """Everything a client can make the server spend, bounded."""

    max_upload_bytes: int = 10 * 2**20  # whole request body
    max_pixels: int = 40_000_000  # decoded image (pixel bombs)
    max_text_chars: int = 1000
    queue_size: int = 8  # requests waiting or running at once; one more is a 503
    timeout_s: float = 60.0  # per request, queueing included; over it is a 504


class QueueFull(Exception):
    """Raised when the bounded queue has no free slot."""


class ModelWorker:
    """One model thread behind a bounded queue (a counter of admitted, unfinished jobs)."""

    def __init__(self, queue_size: int, timeout_s: float) -> None:
        self.queue_size = queue_size
        self.timeout_s = timeout_s
        self.pending = 0
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="simvg-model")

    def _release(self, _: Future) -> None:
        with self._lock:
            self.pending -= 1

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the model thread; QueueFull or asyncio.TimeoutError when it cannot."""
        with self._lock:
            if self.pending >= self.queue_size:
                raise QueueFull
            self.pending += 1
        future = self._executor.submit(fn, *args)
        future.add_done_callback(self._release)
        # A queued job whose request timed out is cancelled (frees its slot); a running one finishes on its own.
        return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _error(status: int, message: str, headers: dict[str, str] | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _limited(request: "Request", max_bytes: int) -> "Request":
    """The same request with a body reader that fails with 413 past ``max_bytes`` (covers chunked uploads)."""
    from fastapi import HTTPException
    from starlette.requests import Request as StarletteRequest

    received = 0

    async def receive() -> dict:
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > max_bytes:
            raise HTTPException(413, f"upload is larger than {max_bytes} bytes")
        return message

    return StarletteRequest(request.scope, receive)


async def _read_form(request: "Request", limits: ServeLimits) -> tuple[bytes, str, str | None]:
    """(image bytes, text, branch or None) from the multipart body; UserError for a malformed one."""
    from starlette.datastructures import UploadFile

    form = await _limited(request, limits.max_upload_bytes).form(max_files=1, max_fields=4)
    image, text, branch = form.get("image"), form.get("text"), form.get("branch") or None
    if not isinstance(image, UploadFile):
        raise UserError("missing form field 'image' (an image file)")
    if not isinstance(text, str):
        raise UserError("missing form field 'text' (the expression)")
    if branch is not None and not isinstance(branch, str):
        raise UserError("form field 'branch' must be text")
    return await image.read(), text, branch


def create_app(grounder: Any, limits: ServeLimits | None = None) -> "FastAPI":
    """The FastAPI app around ``grounder`` (anything with ``ground(image, text, branch=...)``, ``branch``,
    ``source``); every request goes through one ``ModelWorker``."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    limits = limits or ServeLimits()
    worker = ModelWorker(limits.queue_size, limits.timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        worker.shutdown()

    app = FastAPI(title="simvg", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.worker = worker
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/healthz")
    async def healthz() -> dict:
        queue = {"pending": worker.pending, "size": worker.queue_size}
        return {"status": "ok", "model": grounder.source, "branch": grounder.branch, "queue": queue}

    @app.post("/api/ground")
    async def ground(request: Request):
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limits.max_upload_bytes:
            return _error(413, f"upload is larger than {limits.max_upload_bytes} bytes")
        start = time.perf_counter()
        try:
            image, text, branch = await _read_form(request, limits)
            result = await worker.run(grounder.ground, image, text, branch)
        except UserError as exc:
            # image_io names in-memory images "<bytes>"; here they are the upload
            return _error(400, str(exc).replace("<bytes>", "uploaded image"))
        except QueueFull:
            return _error(503, "the server is busy; try again shortly", {"Retry-After": "1"})
        except asyncio.TimeoutError:
            return _error(504, f"grounding took longer than {limits.timeout_s:g} s")
        body = result.to_dict()
        body["elapsed_ms"] = round(1000 * (time.perf_counter() - start), 1)
        return body

    return app


def serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    model_arguments(parser)
    defaults = ServeLimits()
    parser.add_argument("--max-upload-mb", type=float, default=defaults.max_upload_bytes / 2**20)
    parser.add_argument("--max-pixels", type=int, default=defaults.max_pixels)
    parser.add_argument("--max-text-chars", type=int, default=defaults.max_text_chars)
    parser.add_argument("--queue-size", type=int, default=defaults.queue_size, help="requests in flight before 503")
    parser.add_argument("--timeout", type=float, default=defaults.timeout_s, help="seconds per request before 504")


def serve_command(args: argparse.Namespace) -> int:
    import uvicorn

    if args.queue_size < 1 or args.timeout <= 0 or args.max_upload_mb <= 0:
        raise UserError("--queue-size, --timeout and --max-upload-mb must be positive")
    limits = ServeLimits(
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_pixels=args.max_pixels,
        max_text_chars=args.max_text_chars,
        queue_size=args.queue_size,
        timeout_s=args.timeout,
    )
    grounder = load_grounder(args, max_pixels=limits.max_pixels, max_text_chars=limits.max_text_chars)
    from PIL import Image

    grounder.ground(Image.new("RGB", (64, 64)), "a")  # the first forward is slow; pay it before any user does
    print(f"simvg serve: model {grounder.source}; open http://{args.host}:{args.port}/")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"simvg serve: warning: listening on {args.host}, reachable from other machines, with no authentication")
    uvicorn.run(create_app(grounder, limits), host=args.host, port=args.port, log_level="info")
    return 0
