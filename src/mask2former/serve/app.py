"""A local web demo and JSON API for a checkpoint: a Starlette app served by uvicorn.

Routes:

- ``GET /`` — the demo page (``static/index.html`` + ``app.js`` + ``style.css``, no build step, nothing external);
- ``GET /api/health`` — ``{"status": "ok", "num_classes", "tasks", "device", "limits"}``;
- ``GET /api/classes`` — ``{"classes": [{label, category_id, name, isthing, color}]}``;
- ``POST /api/predict?task=panoptic`` — the image as the raw body (``Content-Type: image/*`` or
  ``application/octet-stream``) or as the ``image`` file field of a ``multipart/form-data`` form (which may also carry
  ``task``); optional ``score_threshold`` (instance task, default 0.5), ``overlay=0`` (leave the PNG out) and
  ``legend=0`` (draw the PNG without its legend panel), ``layers=1`` (add what the page draws itself:
  ``regions_png``, each pixel's table row + 1 in red + 256 x green, and ``labels``, the overlay's label layout) and
  ``record=FILE_NAME`` (add ``record``: the summary and results entries ``mask2former predict`` writes for that file).
  Answers ``{task, width, height, segments | instances | classes, legend, overlay_png (a data: URL), inference_ms,
  batch_size}``;
- ``GET /api/openapi.json`` — the OpenAPI description of the three API routes.
- ``GET /favicon.ico`` — the page's icon (drawn at start-up).

``label`` is the model's contiguous class id, ``category_id`` the data set id (as ``mask2former predict`` writes).
Errors are ``{"error": one line, "status": code}`` with 400 (bad request, broken image, unknown task), 403 (a Host
header that is not loopback while bound to loopback), 404, 405 (method not allowed), 408 (upload stalled), 411 (no
Content-Length and not chunked), 413 (upload or image too large), 415 (not an image) or 500.
Requests that arrive together share one forward pass (``batching.BatchingPredictor``); decoding, drawing and JSON
encoding run in worker threads, off the event loop.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import socket
import threading
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.schemas import SchemaGenerator

from ..data.json_io import dumps
from ..inference.predictor import Predictor
from ..modeling.model import Mask2Former
from .batching import BatchingPredictor
from .service import (
    DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD_BYTES, ApiError, SegmentationService, parse_options, parse_page_options,
)
from .uploads import DEFAULT_BODY_TIMEOUT_S, read_body, upload_from_body

__all__ = ["ApiError", "SegmentationService", "SegmentationServer", "create_app", "make_server", "serve"]

_STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                 "style.css": "text/css; charset=utf-8"}
_LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}
_COMMON_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
# Everything the page needs comes from this server; images are data: URLs.
_PAGE_POLICY = "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'"

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- responses
def _json_bytes(status: int, payload: bytes, headers: dict[str, str] | None = None) -> Response:
    return Response(payload, status, headers={**_COMMON_HEADERS, **(headers or {})}, media_type="application/json")


def _error_response(error: ApiError) -> Response:
    if error.status >= 500:
        logger.error("-> %d %s", error.status, error.message)
    body = json.dumps({"error": error.message, "status": error.status}).encode("utf-8")
    return _json_bytes(error.status, body, error.headers)


async def _on_api_error(request: Request, error: Exception) -> Response:
    return _error_response(error)


async def _on_http_exception(request: Request, error: Exception) -> Response:
    # Starlette's router raises these for unknown paths and methods; answer them in the API's error format.
    path = request.url.path
    if error.status_code == 404:
        message = f"not found: {path}"
    elif error.status_code == 405:
        message = f"{request.method} is not supported for {path}" + ("; use POST" if path == "/api/predict" else "")
    else:
        message = str(error.detail)
    return _error_response(ApiError(error.status_code, message, error.headers))


async def _on_unexpected(request: Request, error: Exception) -> Response:
    # uvicorn logs the traceback; the client gets one line
    message = " ".join(str(error).split()) or "(no message)"
    return _error_response(ApiError(500, f"internal error: {type(error).__name__}: {message}"))


class _LoopbackHostGuard:
    """A page elsewhere may point a name at 127.0.0.1 (DNS rebinding); a loopback-bound demo only answers its names."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host = (Headers(scope=scope).get("host") or "").strip().lower()
            name = host[1:].split("]", 1)[0] if host.startswith("[") else host.split(":", 1)[0]  # "[::1]:80", "a:80"
            if name not in _LOOPBACK_NAMES:
                error = ApiError(403, f"Host {host or '(none)'} not allowed; open the page as http://127.0.0.1:<port>/")
                await _error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --------------------------------------------------------------------------------------------------- endpoints
async def health(request: Request) -> Response:
    """
    ---
    summary: Model and server limits.
    responses:
      200: {description: '{"status": "ok", "num_classes", "tasks", "device", "limits": {max_upload_bytes, max_pixels}}'}
    """
    return _json_bytes(200, json.dumps(request.app.state.service.health()).encode("utf-8"))


async def classes(request: Request) -> Response:
    """
    ---
    summary: The model's classes.
    responses:
      200: {description: '{"classes": [{label, category_id, name, isthing, color}]}'}
    """
    return _json_bytes(200, json.dumps(request.app.state.service.classes()).encode("utf-8"))


def _render(service: SegmentationService, image: Any, outcome: Any, task: str, score_threshold: float,
            overlay: bool, legend: bool, layers: bool = False, record: str | None = None) -> bytes:
    response = service.describe(image, outcome.result, task, score_threshold, overlay, legend, layers, record)
    response["inference_ms"] = outcome.inference_ms
    response["batch_size"] = outcome.batch_size
    return dumps(response).encode("utf-8")


async def predict(request: Request) -> Response:
    """
    ---
    summary: Segment one image.
    description: >-
      The image as the raw body (image/* or application/octet-stream) or as the 'image' file field of a
      multipart/form-data form, which may also carry the query options as fields (the query string wins).
    parameters:
      - {name: task, in: query, schema: {type: string, enum: [semantic, instance, panoptic], default: panoptic}}
      - {name: score_threshold, in: query, schema: {type: number, minimum: 0, maximum: 1, default: 0.5}}
      - {name: overlay, in: query, description: 0 leaves the overlay PNG out, schema: {type: string, default: '1'}}
      - {name: legend, in: query, description: 0 draws the PNG without a legend, schema: {type: string, default: '1'}}
      - {name: layers, in: query, description: 1 adds regions_png and labels, schema: {type: string, default: '0'}}
      - {name: record, in: query, description: the file name for predict's record, schema: {type: string}}
    requestBody:
      required: true
      content:
        image/*: {schema: {type: string, format: binary}}
        application/octet-stream: {schema: {type: string, format: binary}}
        multipart/form-data:
          schema:
            type: object
            required: [image]
            properties: {image: {type: string, format: binary}, task: {type: string}}
    responses:
      200:
        description: '{task, width, height, segments | instances | classes, legend, overlay_png, inference_ms,
          batch_size}'
      400: {description: 'bad request, broken image or unknown task: {"error", "status"}'}
      408: {description: upload stalled}
      411: {description: no Content-Length}
      413: {description: upload or image too large}
      415: {description: not an image}
    """
    state = request.app.state
    service: SegmentationService = state.service
    body = await read_body(request, service.max_upload_bytes, state.body_timeout_s)
    data, fields = await upload_from_body(request, body)
    options = {**fields, **dict(request.query_params)}  # the query string wins over form fields
    task, score_threshold, overlay, legend = parse_options(options)
    layers, record = parse_page_options(options)
    image = await run_in_threadpool(service.decode, data)
    outcome = await state.batcher.predict(image, task)
    payload = await run_in_threadpool(_render, service, image, outcome, task, score_threshold, overlay, legend,
                                      layers, record)
    return _json_bytes(200, payload)


_SCHEMAS = SchemaGenerator({"openapi": "3.0.0", "info": {"title": "mask2former serve", "version": "1"}})


async def openapi(request: Request) -> Response:
    return _json_bytes(200, json.dumps(_SCHEMAS.get_schema(request.app.routes)).encode("utf-8"))


def _favicon() -> bytes:
    """A 32x32 icon drawn here (no binary file in the package): four coloured segments, as the overlays show them."""
    from PIL import Image, ImageDraw

    icon = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    draw = ImageDraw.Draw(icon)
    for box, color in (((1, 1, 15, 15), (220, 20, 60)), ((17, 1, 31, 15), (0, 130, 200)),
                       ((1, 17, 15, 31), (60, 180, 75)), ((17, 17, 31, 31), (255, 180, 0))):
        draw.rounded_rectangle(box, radius=3, fill=color + (255,))
    buffer = io.BytesIO()
    icon.save(buffer, format="ICO", sizes=[(32, 32)])
    return buffer.getvalue()


def create_app(
    service: SegmentationService,
    loopback_only: bool = True,
    max_batch_size: int | None = None,
    batch_wait_ms: float = 5.0,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
) -> Starlette:
    """The ASGI app for ``service`` (run its lifespan: the batching worker starts and stops with it)."""
    static = {name: (resources.files(__package__) / "static" / name).read_bytes() for name in _STATIC_FILES}

    def static_response(name: str) -> Response:
        return Response(static[name], headers={**_COMMON_HEADERS, "Content-Security-Policy": _PAGE_POLICY},
                        media_type=_STATIC_FILES[name])

    async def page(request: Request) -> Response:
        return static_response("index.html")

    icon = _favicon()

    async def favicon(request: Request) -> Response:
        return Response(icon, headers={"Cache-Control": "max-age=86400", "X-Content-Type-Options": "nosniff"},
                        media_type="image/x-icon")

    async def static_file(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in static:
            raise ApiError(404, f"not found: {request.url.path}")
        return static_response(name)

    batcher = BatchingPredictor(service.predictor, max_batch_size=max_batch_size, max_wait_ms=batch_wait_ms)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    routes = [
        Route("/", page, methods=["GET"], include_in_schema=False),
        Route("/index.html", page, methods=["GET"], include_in_schema=False),
        Route("/static/{name}", static_file, methods=["GET"], include_in_schema=False),
        Route("/favicon.ico", favicon, methods=["GET"], include_in_schema=False),
        Route("/api/health", health, methods=["GET"]),
        Route("/api/classes", classes, methods=["GET"]),
        Route("/api/predict", predict, methods=["POST"]),
        Route("/api/openapi.json", openapi, methods=["GET"], include_in_schema=False),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(_LoopbackHostGuard)] if loopback_only else [],
        exception_handlers={ApiError: _on_api_error, HTTPException: _on_http_exception, Exception: _on_unexpected},
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.batcher = batcher
    app.state.body_timeout_s = float(body_timeout_s)
    return app


# --------------------------------------------------------------------------------------------------- the server
class SegmentationServer:
    """uvicorn serving :func:`create_app` on a socket bound (and listening) at construction; ``url`` is where.

    ``serve_forever()`` runs until ``shutdown()`` (from another thread) or Ctrl+C; then ``server_close()``.
    """

    def __init__(self, address: tuple[str, int], service: SegmentationService, max_batch_size: int | None = None,
                 batch_wait_ms: float = 5.0, body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> None:
        self.service = service
        self.loopback_only = address[0] in _LOOPBACK_NAMES
        self.app = create_app(service, loopback_only=self.loopback_only, max_batch_size=max_batch_size,
                              batch_wait_ms=batch_wait_ms, body_timeout_s=body_timeout_s)
        self.socket = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(address[:2])
            self.socket.listen(128)  # connections made before serve_forever() wait in the backlog
        except OSError:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()
        # h11 and the asyncio loop: pure Python, the same behaviour everywhere; logging is left to the caller.
        config = uvicorn.Config(self.app, http="h11", loop="asyncio", lifespan="on", log_config=None,
                                server_header=False, timeout_graceful_shutdown=10)
        self._server = uvicorn.Server(config)
        self._running = threading.Event()
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"

    def serve_forever(self) -> None:
        self._running.set()
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop serving (requests in progress finish) and wait until ``serve_forever`` has returned."""
        self._server.should_exit = True
        if self._running.is_set():
            self._stopped.wait()

    def server_close(self) -> None:
        self.socket.close()


def make_server(
    predictor_or_checkpoint: Predictor | Mask2Former | str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "cpu",
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_batch_size: int | None = None,
    batch_wait_ms: float = 5.0,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    precision: str = "fp32",
) -> SegmentationServer:
    """A bound, not yet running server (``port=0`` picks a free port; see ``server.url``).

    Run it with ``server.serve_forever()`` (in a thread for tests); stop with ``shutdown()`` + ``server_close()``.
    ``max_batch_size`` (default: the predictor's ``batch_size``) and ``batch_wait_ms`` shape the request batches.
    ``precision``: the PyTorch model's test-time precision (an exported model runs at the one it was loaded with).
    """
    if isinstance(predictor_or_checkpoint, Predictor):
        predictor = predictor_or_checkpoint
    else:
        exported = getattr(predictor_or_checkpoint, "runtime", None)  # inference.runtimes: no autocast around it
        predictor = Predictor(predictor_or_checkpoint, device=device, precision="fp32" if exported else precision)
    service = SegmentationService(predictor, max_upload_bytes=max_upload_bytes, max_pixels=max_pixels)
    return SegmentationServer((host, port), service, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
                              body_timeout_s=body_timeout_s)


def serve(
    checkpoint: Predictor | Mask2Former | str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "cpu",
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_batch_size: int | None = None,
    batch_wait_ms: float = 5.0,
    threads: int | None = None,
    precision: str = "fp32",
) -> None:
    """Serve the demo page and API until interrupted (Ctrl+C); prints the URL.

    ``threads``: torch intra-op threads for the forward pass (None: torch's default, the cores; measured on 2 cores
    with batching, 2 threads serve ~1.3x the requests/s of 1, see benchmarks/serve_throughput.py).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if threads is not None:
        torch.set_num_threads(threads)
    server = make_server(checkpoint, host=host, port=port, device=device, max_upload_bytes=max_upload_bytes,
                         max_pixels=max_pixels, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
                         precision=precision)
    print(f"mask2former serve: open {server.url} (Ctrl+C to stop; {torch.get_num_threads()} model threads)", flush=True)
    if not server.loopback_only:
        print(f"note: listening on {host}, reachable from other machines; there is no authentication", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        server.server_close()
