"""``simvg serve``: a web page and a JSON API for grounding, on FastAPI + uvicorn, bound to 127.0.0.1 by default.

- ``GET /``: a static page (HTML + JS, no CDN) to upload an image, type an expression and see the boxes.
- ``POST /api/ground``: multipart ``image`` (file) + ``text`` [+ ``branch``] [+ ``attention=1``] -> the result as
  JSON (``GroundingResult.to_dict`` + ``elapsed_ms``); with ``attention=1`` also ``"attention": {"token": PNG data
  URL, "decoder": PNG data URL}``, the heat maps over the image at its original size (``attention_overlays``).
- ``GET /healthz``: liveness, the model's name (not its path), what it was trained on, and the queue's state.
- ``GET /api/model``: what the page shows of the loaded model (``describe_model``): name, task, default branch,
  score threshold, input size, provenance and, for a SynthRef-only model, the words it was trained on.

The model runs in one worker thread behind a bounded queue: a request that finds ``queue_size`` requests already
waiting or running is answered 503 at once, and one that waits longer than ``timeout_s`` gets 504, so no client
hangs however many arrive. The queue slot is freed when the model really finishes (not when a request times out),
so the bound holds for the work itself. Bad input is a 4xx with ``{"error": one line}``; the server keeps serving;
a client that disconnects mid-upload is logged in one line.

Every answer carries ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY``, a ``Content-Security-Policy``
that allows this server's own scripts, styles and images only, and ``Referrer-Policy: no-referrer``. ``simvg serve``
answers only requests whose ``Host`` is a loopback name, the address it listens on or one given with
``--allowed-host``: a web page on another site cannot reach a server on 127.0.0.1 by rebinding its own DNS name to
127.0.0.1 (DNS rebinding). The port is bound before the page's address is printed, so a port in use is a one-line
error.

No ``from __future__ import annotations`` here: FastAPI reads the route functions' annotations at run time, and
``Request`` is imported inside ``create_app`` so that importing this module never needs FastAPI. FastAPI, Starlette
and uvicorn are the optional extra ``simvg[serve]``: every import of them sits inside the function that needs it, so
that ``simvg`` without the extra still runs every other command (and ``simvg serve`` says what to install).

The text-length limit is the server's own (``ServeLimits.max_text_chars``), checked once per request before the
request takes a queue slot; the grounder ``simvg serve`` loads has no limit of its own.
"""

import argparse
import asyncio
import base64
import contextlib
import errno
import io
import json
import logging
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from simvg.artifact import ASSETS
from simvg.errors import UserError
from simvg.inference.commands import load_grounder, model_arguments
from simvg.inference.draw import heat_overlay
from simvg.inference.grounder import BRANCHES, DEFAULT_MAX_PIXELS, check_text
from simvg.synthref.lang import AXES
from simvg.synthref.scene import COLOURS, SHAPES, SIZES
from simvg.synthref.text import ORDINAL_WORDS, RELATION_WORDS

if TYPE_CHECKING:
    from fastapi import FastAPI, Request

STATIC_DIR = Path(__file__).parent / "static"
MIB = 2**20  # bytes in a MiB (--max-upload-mb)
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'; form-action 'self'"
    ),
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}
log = logging.getLogger("simvg.serve")


@dataclass
class ServeLimits:
    """Everything a client can make the server spend, bounded."""

    max_upload_bytes: int = 10 * MIB  # whole request body
    max_pixels: int = DEFAULT_MAX_PIXELS  # decoded image (pixel bombs), the Grounder's own default
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
    from fastapi.responses import JSONResponse  # deferred: the optional extra simvg[serve] (module docstring)

    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _limited(request: "Request", max_bytes: int) -> "Request":
    """The same request with a body reader that fails with 413 past ``max_bytes`` (covers chunked uploads)."""
    # deferred: the optional extra simvg[serve] (module docstring)
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


_FLAG_VALUES = {"1": True, "true": True, "on": True, "0": False, "false": False, "off": False, "": False}


async def _read_form(request: "Request", limits: ServeLimits) -> tuple[bytes, str, str | None, bool]:
    """(image bytes, text, branch or None, attention) from the multipart body; UserError for a malformed one."""
    from starlette.datastructures import UploadFile  # deferred: the optional extra simvg[serve] (module docstring)

    form = await _limited(request, limits.max_upload_bytes).form(max_files=1, max_fields=4)
    image, text, branch = form.get("image"), form.get("text"), form.get("branch") or None
    attention = form.get("attention", "")
    if not isinstance(image, UploadFile):
        raise UserError("missing form field 'image' (an image file)")
    if not isinstance(text, str):
        raise UserError("missing form field 'text' (the expression)")
    if branch is not None and not isinstance(branch, str):
        raise UserError("form field 'branch' must be text")
    if not isinstance(attention, str) or attention.strip().lower() not in _FLAG_VALUES:
        raise UserError("form field 'attention' must be 1 or 0")
    return await image.read(), text, branch, _FLAG_VALUES[attention.strip().lower()]


def attention_overlays(grounder: Any, image: bytes, text: str, branch: str | None) -> tuple[Any, dict[str, str]]:
    """Ground with attention maps (on the model thread) -> (result, {branch: PNG data URL}): per branch the heat map
    over the uploaded image at its original size (EXIF-rotated, as grounded; bounded by the pixel limit)."""
    picture = grounder.open_image(image)  # decoded once: the grounder takes the PIL image as it is
    result = grounder.ground(picture, text, branch, attention=True)
    urls = {}
    for name, values in result.attention.maps.items():
        buffer = io.BytesIO()
        heat_overlay(picture, values).save(buffer, format="PNG", compress_level=3)
        urls[name] = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return result, urls


def host_name(header: str) -> str:
    """The host of a ``Host`` header, lower case, without port or IPv6 brackets (``[::1]:8000`` -> ``::1``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def allowed_hosts_for(bind_host: str, extra: Collection[str] = ()) -> frozenset[str]:
    """The ``Host`` names a server bound to ``bind_host`` answers: loopback names, the address itself (unless a
    wildcard) and ``extra``."""
    names = set(LOOPBACK_HOSTS) | {host_name(h) for h in extra}
    if bind_host not in WILDCARD_HOSTS:
        names.add(host_name(bind_host) if not bind_host.count(":") > 1 else bind_host.lower())
    return frozenset(names)


class GuardMiddleware:
    """ASGI middleware: refuses a ``Host`` outside ``allowed_hosts`` (None: any) with 400 and adds
    ``SECURITY_HEADERS`` to every answer."""

    def __init__(self, app: Any, allowed_hosts: Collection[str] | None) -> None:
        self.app = app
        self.allowed = frozenset(allowed_hosts) if allowed_hosts is not None else None
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_secured(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if self.allowed is not None and host_name(host) not in self.allowed:
            name = host_name(host) or "(none)"
            body = json.dumps({"error": f"Host {name!r} is not allowed (DNS rebinding protection); to serve under "
                               f"this name, start the server with --allowed-host {name}"}).encode()  # fmt: skip
            await send_secured({"type": "http.response.start", "status": 400,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(body)).encode())]})  # fmt: skip
            await send_secured({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send_secured)


def model_name(source: str) -> str:
    """What ``/healthz`` shows of the model: a name, never the absolute path (the embedded defaults by name)."""
    path = Path(source)
    if path.is_relative_to(ASSETS):
        return f"embedded {path.relative_to(ASSETS).parts[0]}"
    return path.name if path.is_dir() or not path.parent.name else f"{path.parent.name}/{path.name}"


# An absolute path (POSIX or Windows) standing alone: at the start, or after a space, bracket, quote, "=" or ":".
_ABSOLUTE_PATH = re.compile(r"(?<![^\s(\"'=:])(?:/|[A-Za-z]:[\\/])[^\s()\"',;]+")


def without_paths(text: str) -> str:
    """``text`` with every absolute path cut to ``.../its last part`` (a provenance line may hold a data root)."""

    def last_part(match: re.Match) -> str:
        parts = [p for p in re.split(r"[\\/]", match.group()) if p]
        return f".../{parts[-1]}" if len(parts) > 1 else match.group()

    return _ABSOLUTE_PATH.sub(last_part, text)


def known_words(spec: Any) -> dict[str, list[str]]:
    """The words of a SynthRef-only model's training expressions, by kind ({} for any other model): all that such
    a model can have learned a meaning for."""
    if not getattr(spec, "synthetic_only", False):
        return {}
    return {"shapes": list(SHAPES), "colours": list(COLOURS), "sizes": list(SIZES),
            "places": [*AXES, "middle", *ORDINAL_WORDS.values()],
            "relations": [words[0] for words in RELATION_WORDS.values()]}  # fmt: skip


def describe_model(grounder: Any, max_text_chars: int | None = None) -> dict[str, Any]:
    """What ``GET /api/model`` says of the loaded model: name (never a path), task, default branch, score
    threshold (GREC keeps the boxes over it; REC always answers its one box), input size, provenance, vocabulary,
    and the server's text limit (the page's input takes it from here: the limit is written once)."""
    spec = getattr(grounder, "spec", None)
    preprocess = getattr(spec, "preprocess", None)
    return {
        "name": model_name(grounder.source),
        "task": getattr(spec, "task", None),
        "branch": grounder.branch,
        "branches": list(BRANCHES),
        "score_threshold": getattr(grounder, "score_threshold", None),
        "image_size": getattr(preprocess, "image_size", None),
        "max_tokens": getattr(preprocess, "max_tokens", None),
        "max_text_chars": max_text_chars,
        "trained_on": without_paths(getattr(spec, "trained_on", "")),
        "synthetic_only": bool(getattr(spec, "synthetic_only", False)),
        "vocabulary_size": getattr(getattr(grounder, "tokenizer", None), "vocab_size", None),
        "known_words": known_words(spec),
    }


def create_app(
    grounder: Any, limits: ServeLimits | None = None, allowed_hosts: Collection[str] | None = None
) -> "FastAPI":
    """The FastAPI app around ``grounder`` (anything with ``ground(image, text, branch=...)``, ``branch``,
    ``source``); every request goes through one ``ModelWorker``.

    ``allowed_hosts``: the ``Host`` names answered (``allowed_hosts_for``; ``simvg serve`` always sets them); None
    answers any ``Host`` (tests, or a server behind a proxy that checks it)."""
    # deferred: the optional extra simvg[serve] (module docstring)
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.requests import ClientDisconnect

    limits = limits or ServeLimits()
    worker = ModelWorker(limits.queue_size, limits.timeout_s)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        worker.shutdown()

    app = FastAPI(title="simvg", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.worker = worker
    app.add_middleware(GuardMiddleware, allowed_hosts=allowed_hosts)
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
        spec = getattr(grounder, "spec", None)
        return {"status": "ok", "model": model_name(grounder.source), "branch": grounder.branch,
                "trained_on": without_paths(getattr(spec, "trained_on", "")), "queue": queue}  # fmt: skip

    @app.get("/api/model")
    async def model() -> dict:
        return describe_model(grounder, limits.max_text_chars)

    @app.post("/api/ground")
    async def ground(request: Request):
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limits.max_upload_bytes:
            return _error(413, f"upload is larger than {limits.max_upload_bytes} bytes")
        start = time.perf_counter()
        try:
            image, text, branch, attention = await _read_form(request, limits)
            text = check_text(text, limits.max_text_chars)  # the one text check of a request (module docstring)
            if attention:
                result, overlays = await worker.run(attention_overlays, grounder, image, text, branch)
            else:
                result, overlays = await worker.run(grounder.ground, image, text, branch), None
        except ClientDisconnect:
            log.warning("a client disconnected during its upload; nothing to answer")
            return _error(400, "the upload was interrupted")
        except UserError as exc:
            # image_io names in-memory images "<bytes>"; here they are the upload
            return _error(400, str(exc).replace("<bytes>", "uploaded image"))
        except QueueFull:
            return _error(503, "the server is busy; try again shortly", {"Retry-After": "1"})
        except asyncio.TimeoutError:
            return _error(504, f"grounding took longer than {limits.timeout_s:g} s")
        body = result.to_dict()
        body["trained_on"] = without_paths(body.get("trained_on", ""))  # a real-data run records its absolute root
        if overlays is not None:
            body["attention"] = overlays
        body["elapsed_ms"] = round(1000 * (time.perf_counter() - start), 1)
        return body

    return app


def serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port, 0-65535 (0: any free port)")
    parser.add_argument("--allowed-host", dest="allowed_hosts", action="append", default=[], metavar="NAME",
                        help="also answer this Host name (repeatable; loopback and --host always)")  # fmt: skip
    model_arguments(parser)
    defaults = ServeLimits()
    parser.add_argument("--max-upload-mb", type=float, default=defaults.max_upload_bytes / MIB)
    parser.add_argument("--max-pixels", type=int, default=defaults.max_pixels)
    parser.add_argument("--max-text-chars", type=int, default=defaults.max_text_chars)
    parser.add_argument("--queue-size", type=int, default=defaults.queue_size, help="requests in flight before 503")
    parser.add_argument("--timeout", type=float, default=defaults.timeout_s, help="seconds per request before 504")


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port); a port out of range, a busy port or an unknown address is a UserError."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: a TCP port lies in 0-65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise UserError(f"--host {host}: not an address this machine can listen on ({exc.strerror or exc})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart right after a stop
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        hint = "; another server uses it: pick another --port" if exc.errno == errno.EADDRINUSE else ""
        raise UserError(f"{host}:{port}: cannot listen ({exc.strerror or exc}){hint}") from None
    return sock


def run_server(app: Any, sock: socket.socket) -> None:
    """Serve ``app`` with uvicorn on the bound ``sock`` until interrupted."""
    import uvicorn  # deferred: the optional extra simvg[serve] (module docstring)

    host, port = sock.getsockname()[:2]
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info")).run(sockets=[sock])


def serve_command(args: argparse.Namespace) -> int:
    try:  # the extra's modules, probed first so that a missing one is the pip hint, not a traceback
        import fastapi  # noqa: F401
        import multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UserError(f"simvg serve needs FastAPI, uvicorn and python-multipart ({exc.name} is missing): "
                        "pip install 'simvg[serve]'") from None  # fmt: skip
    if args.queue_size < 1 or args.timeout <= 0 or args.max_upload_mb <= 0:
        raise UserError("--queue-size, --timeout and --max-upload-mb must be positive")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: a TCP port lies in 0-65535")
    limits = ServeLimits(
        max_upload_bytes=int(args.max_upload_mb * MIB),
        max_pixels=args.max_pixels,
        max_text_chars=args.max_text_chars,
        queue_size=args.queue_size,
        timeout_s=args.timeout,
    )
    grounder = load_grounder(args, max_pixels=limits.max_pixels)  # the text limit is the server's (docstring)
    grounder.ground(Image.new("RGB", (64, 64)), "a")  # the first forward is slow; pay it before any user does
    sock = listen(args.host, args.port)
    port = sock.getsockname()[1]
    shown = f"[{args.host}]" if args.host.count(":") > 1 else args.host
    print(f"simvg serve: model {grounder.source}; open http://{shown}:{port}/")
    if args.host not in LOOPBACK_HOSTS:
        print(f"simvg serve: warning: listening on {args.host}, reachable from other machines, with no authentication")
    app = create_app(grounder, limits, allowed_hosts=allowed_hosts_for(args.host, args.allowed_hosts))
    try:
        run_server(app, sock)
    finally:
        sock.close()
    return 0
