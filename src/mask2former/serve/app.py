"""A local web demo and JSON API for a checkpoint, on the standard library's threading HTTP server.

Routes:

- ``GET /`` — the demo page (``static/index.html`` + ``app.js`` + ``style.css``, no build step, nothing external);
- ``GET /api/health`` — ``{"status": "ok", "num_classes", "tasks", "device", "limits"}``;
- ``GET /api/classes`` — ``{"classes": [{label, category_id, name, isthing, color}]}``;
- ``POST /api/predict?task=panoptic`` — the image as the raw body (``Content-Type: image/*`` or
  ``application/octet-stream``) or as the ``image`` field of a ``multipart/form-data`` form (which may also carry
  ``task``); optional ``score_threshold`` (instance task, default 0.5), ``overlay=0`` (leave the PNG out) and
  ``legend=0`` (draw the PNG without its legend panel; the page shows the legend itself).
  Answers ``{task, width, height, segments | instances | classes, legend, overlay_png (a data: URL), inference_ms}``.

``label`` is the model's contiguous class id, ``category_id`` the data set id (as ``mask2former predict`` writes).
Errors are ``{"error": one line, "status": code}`` with 400 (bad request, broken image, unknown task), 403 (a Host
header that is not loopback while bound to loopback), 404, 405, 408, 411 (no Content-Length), 413 (upload or image
too large), 415 (not an image), 500 or 501 (unsupported method).
One model is shared by all request threads, so inference runs under a lock; decoding and drawing run in parallel.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import threading
import time
from email.parser import BytesParser
from email.policy import HTTP
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..data.image_io import one_line, to_rgb_array
from ..data.label_space import LabelSpace
from ..inference.predictor import Predictor
from ..modeling.model import Mask2Former
from ..viz import class_color, visualize

__all__ = ["ApiError", "SegmentationService", "SegmentationServer", "make_server", "serve", "TASKS"]

TASKS = ("semantic", "instance", "panoptic")
DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
# Inference runs at the uploaded size (as `mask2former predict` does without --min-size), so memory and time grow
# with the pixel count: 4 MP keeps a CPU demo responsive.
DEFAULT_MAX_PIXELS = 2048 * 2048
# An oversized upload is read and thrown away up to this many bytes so the client gets its 413 rather than a reset
# connection; beyond it the connection is just closed.
_DRAIN_LIMIT = 256 * 1024 * 1024
_STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                 "style.css": "text/css; charset=utf-8"}
_LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered as JSON ``{"error": message, "status": status}`` with that HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = " ".join(message.split())


def _label_space(predictor: Predictor) -> LabelSpace:
    if predictor.label_space is not None:
        return predictor.label_space
    count = predictor.model.num_classes
    return LabelSpace([f"class_{i}" for i in range(count)], [True] * count)


def decode_image(data: bytes, max_pixels: int) -> torch.Tensor:
    """Upload bytes -> ``uint8 [3, H, W]`` RGB (EXIF-oriented); ApiError 400 for broken bytes, 413 for too many pixels.

    The pixel count is checked from the header, before the pixels are decoded.
    """
    if not data:
        raise ApiError(400, "empty upload: no image bytes received")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise ApiError(413, f"image too large: {one_line(error)}") from None
    except UnidentifiedImageError:
        raise ApiError(400, "cannot decode image: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ApiError(400, f"cannot decode image: {one_line(error)}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ApiError(413, f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels")
    if width == 0 or height == 0:
        raise ApiError(400, f"image has no pixels ({width}x{height})")
    try:
        image.load()
        array = to_rgb_array(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as error:
        raise ApiError(413, f"image too large: {one_line(error)}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ApiError(400, f"truncated or corrupt image: {one_line(error)}") from None
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()


def _png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class SegmentationService:
    """The server's state: one predictor shared by all requests, its label space and the upload limits."""

    def __init__(self, predictor: Predictor, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if max_upload_bytes <= 0 or max_pixels <= 0:
            raise ValueError(f"max_upload_bytes and max_pixels must be > 0, got {max_upload_bytes}, {max_pixels}")
        self.predictor = predictor
        self.label_space = _label_space(predictor)
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_pixels = int(max_pixels)
        # The model and its buffers are shared; one forward pass at a time keeps results and peak memory per request.
        self._inference_lock = threading.Lock()

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "num_classes": self.label_space.num_classes,
            "tasks": list(TASKS),
            "device": str(self.predictor.device),
            "limits": {"max_upload_bytes": self.max_upload_bytes, "max_pixels": self.max_pixels},
        }

    def _class_entry(self, label: int) -> dict[str, Any]:
        space = self.label_space
        return {"label": label, "category_id": space.to_dataset(label), "category": space.names[label],
                "isthing": space.is_thing[label], "color": list(class_color(space, label))}

    def classes(self) -> dict[str, Any]:
        # COCO-categories style: "name" here, "category" in the per-segment entries of /api/predict
        entries = [self._class_entry(label) for label in range(self.label_space.num_classes)]
        return {"classes": [{"name" if key == "category" else key: value for key, value in entry.items()}
                            for entry in entries]}

    def run_model(self, image: torch.Tensor, task: str) -> Any:
        """The predictor's result for one decoded image (exactly what ``Predictor(task=task)(image)`` gives)."""
        with self._inference_lock:
            return self.predictor.predict_tasks([image], (task,))[0][task]

    def predict(self, data: bytes, task: str, score_threshold: float = 0.5, overlay: bool = True,
                legend: bool = True) -> dict[str, Any]:
        """Decode, run, describe and (optionally) draw one upload."""
        if task not in TASKS:
            raise ApiError(400, f"unknown task {task!r}; use one of {', '.join(TASKS)}")
        if not 0.0 <= score_threshold <= 1.0:
            raise ApiError(400, f"score_threshold must be in [0, 1], got {score_threshold}")
        image = decode_image(data, self.max_pixels)
        start = time.perf_counter()
        result = self.run_model(image, task)
        inference_ms = (time.perf_counter() - start) * 1000.0
        response: dict[str, Any] = {"task": task, "width": int(image.shape[2]), "height": int(image.shape[1])}
        if task == "panoptic":
            _, segments_info = result
            response["segments"] = [
                {"id": int(info["id"]), **self._class_entry(int(info["category_id"])),
                 "isthing": bool(info["isthing"]), "score": float(info["score"]), "area": int(info["area"])}
                for info in segments_info
            ]
            shown = [s["label"] for s in response["segments"]]
        elif task == "instance":
            keep = [i for i, score in enumerate(result["scores"].tolist()) if score >= score_threshold]
            areas = result["masks"].flatten(1).sum(1).tolist() if keep else []
            response["score_threshold"] = score_threshold
            response["instances"] = [
                {**self._class_entry(int(result["labels"][i])), "score": float(result["scores"][i]),
                 "box": [float(v) for v in result["boxes"][i].tolist()], "area": int(areas[i])}
                for i in keep
            ]
            shown = [s["label"] for s in response["instances"]]
        else:
            counts = torch.bincount(result.flatten(), minlength=self.label_space.num_classes).tolist()
            total = int(result.numel())
            response["classes"] = [
                {**self._class_entry(label), "area": count, "fraction": count / total}
                for label, count in enumerate(counts) if count
            ]
            shown = [s["label"] for s in response["classes"]]
        response["legend"] = [self._class_entry(label) for label in sorted(set(shown))]
        response["inference_ms"] = inference_ms
        if overlay:
            options = {"score_threshold": score_threshold} if task == "instance" else {}
            drawn = visualize(image, result, task, self.label_space, legend=legend, **options)
            response["overlay_png"] = _png_data_url(drawn)
        return response


def _upload_from_body(content_type: str | None, body: bytes) -> tuple[bytes, dict[str, str]]:
    """The image bytes and the other form fields of a request body; ApiError 415 when it does not carry an image."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type.startswith("image/") or media_type == "application/octet-stream":
        return body, {}
    if media_type != "multipart/form-data":
        shown = media_type or "none"
        raise ApiError(415, f"unsupported Content-Type {shown}: send the image as image/*, application/octet-stream "
                            f"or the 'image' field of multipart/form-data")
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart() or message.defects:
        raise ApiError(400, "malformed multipart/form-data body")
    image: bytes | None = None
    fields: dict[str, str] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if name == "image":
            part_type = part.get_content_type() if part.get("Content-Type") else "application/octet-stream"
            if not (part_type.startswith("image/") or part_type == "application/octet-stream"):
                raise ApiError(415, f"form field 'image' has Content-Type {part_type}, not an image")
            image = payload
        elif name:
            fields[name] = payload.decode("utf-8", errors="replace")
    if image is None:
        raise ApiError(400, "multipart/form-data body has no 'image' field")
    return image, fields


class _Handler(BaseHTTPRequestHandler):
    server: "SegmentationServer"
    server_version = "mask2former-serve"
    protocol_version = "HTTP/1.1"  # so that clients sending "Expect: 100-continue" can be refused before uploading
    timeout = 60  # seconds a stalled client may hold a thread

    # ----------------------------------------------------------------------------------------- routing
    def do_GET(self) -> None:
        self._dispatch(self._get)

    def do_HEAD(self) -> None:
        self._dispatch(self._get)

    def do_POST(self) -> None:
        self._dispatch(self._post)

    def _dispatch(self, route) -> None:
        self.close_connection = True  # one request per connection: simple, and a drained error body cannot leak
        try:
            self._check_host()
            route(urlsplit(self.path))
        except ApiError as error:
            self._send_error(error)
        except (BrokenPipeError, ConnectionResetError):
            logger.info("%s %s: client went away", self.command, self.path)
        except Exception as error:  # a bug must not kill the server thread silently
            logger.exception("request %s %s failed", self.command, self.path)
            self._send_error(ApiError(500, f"internal error: {type(error).__name__}: {one_line(error)}"))

    def _check_host(self) -> None:
        # A page elsewhere may point a name at 127.0.0.1 (DNS rebinding); a loopback-bound demo only answers its names.
        if not self.server.loopback_only:
            return
        host = (self.headers.get("Host") or "").strip().lower()
        name = host[1:].split("]", 1)[0] if host.startswith("[") else host.split(":", 1)[0]  # "[::1]:80", "a:80"
        if name not in _LOOPBACK_NAMES:
            raise ApiError(403, f"Host {host or '(none)'} not allowed; open the page as http://127.0.0.1:<port>/")

    def _get(self, url) -> None:
        service = self.server.service
        if url.path == "/api/health":
            self._send_json(200, service.health())
        elif url.path == "/api/classes":
            self._send_json(200, service.classes())
        elif url.path == "/api/predict":
            raise ApiError(405, "use POST for /api/predict")
        elif url.path in ("/", "/index.html"):
            self._send_static("index.html")
        elif url.path.startswith("/static/") and url.path[len("/static/"):] in _STATIC_FILES:
            self._send_static(url.path[len("/static/"):])
        else:
            raise ApiError(404, f"not found: {url.path}")

    def _post(self, url) -> None:
        if url.path != "/api/predict":
            raise ApiError(405 if url.path in ("/api/health", "/api/classes") else 404,
                           f"POST is not supported for {url.path}")
        body = self._read_body()
        query = {key: values[-1] for key, values in parse_qs(url.query, keep_blank_values=True).items()}
        data, fields = _upload_from_body(self.headers.get("Content-Type"), body)
        options = {**fields, **query}  # the query string wins over form fields
        task = options.get("task", "panoptic")
        try:
            score_threshold = float(options.get("score_threshold", 0.5))
        except ValueError:
            raise ApiError(400, f"score_threshold must be a number, got {options['score_threshold']!r}") from None
        overlay, legend = (options.get(flag, "1").lower() not in ("0", "false", "no") for flag in ("overlay", "legend"))
        self._send_json(200, self.server.service.predict(data, task, score_threshold, overlay, legend))

    # ----------------------------------------------------------------------------------------- request bodies
    def _content_length(self) -> int:
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "chunked uploads are not supported; send a Content-Length header")
        header = self.headers.get("Content-Length")
        if header is None:
            raise ApiError(411, "a Content-Length header is required")
        try:
            length = int(header)
        except ValueError:
            raise ApiError(400, f"bad Content-Length {header!r}") from None
        if length < 0:
            raise ApiError(400, f"bad Content-Length {header!r}")
        return length

    def _too_large(self, length: int) -> ApiError:
        limit = self.server.service.max_upload_bytes
        return ApiError(413, f"upload is {length} bytes; the limit is {limit} bytes")

    def handle_expect_100(self) -> bool:
        try:
            length = self._content_length()
        except ApiError:
            length = 0  # reported when the body is read
        if length > self.server.service.max_upload_bytes:
            self.close_connection = True
            self._send_error(self._too_large(length))
            return False
        return super().handle_expect_100()

    def _read_body(self) -> bytes:
        length = self._content_length()
        if length > self.server.service.max_upload_bytes:
            if length <= _DRAIN_LIMIT:
                remaining = length
                while remaining > 0:
                    chunk = self.rfile.read(min(remaining, 1 << 16))
                    if not chunk:
                        break
                    remaining -= len(chunk)
            raise self._too_large(length)
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise ApiError(408, f"upload of {length} bytes timed out") from None
        if len(body) != length:
            raise ApiError(400, f"upload ended after {len(body)} of {length} bytes")
        return body

    # ----------------------------------------------------------------------------------------- responses
    def _send_bytes(self, status: int, payload: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Connection", "close")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        self._send_bytes(status, json.dumps(payload).encode("utf-8"), "application/json")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own errors (malformed request, unsupported method) are JSON too.
        self.close_connection = True
        self._send_error(ApiError(code, message or HTTPStatus(code).phrase))

    def _send_error(self, error: ApiError) -> None:
        if error.status >= 500:
            logger.error("%s %s -> %d %s", self.command, self.path, error.status, error.message)
        self._send_json(error.status, {"error": error.message, "status": error.status})

    def _send_static(self, name: str) -> None:
        payload = (resources.files(__package__) / "static" / name).read_bytes()
        # Everything the page needs comes from this server; images are data: URLs.
        policy = "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'"
        self._send_bytes(200, payload, _STATIC_FILES[name], {"Content-Security-Policy": policy})

    def log_message(self, format: str, *args: Any) -> None:
        logger.info("%s - %s", self.address_string(), format % args)


class SegmentationServer(ThreadingHTTPServer):
    """A threading HTTP server holding a :class:`SegmentationService`; ``url`` is where it listens."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], service: SegmentationService) -> None:
        self.service = service
        self.loopback_only = address[0] in _LOOPBACK_NAMES
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"


def make_server(
    predictor_or_checkpoint: Predictor | Mask2Former | str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "cpu",
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> SegmentationServer:
    """A bound, not yet running server (``port=0`` picks a free port; see ``server.url``).

    Run it with ``server.serve_forever()`` (in a thread for tests); stop with ``shutdown()`` + ``server_close()``.
    """
    if isinstance(predictor_or_checkpoint, Predictor):
        predictor = predictor_or_checkpoint
    else:
        predictor = Predictor(predictor_or_checkpoint, device=device)
    service = SegmentationService(predictor, max_upload_bytes=max_upload_bytes, max_pixels=max_pixels)
    return SegmentationServer((host, port), service)


def serve(
    checkpoint: Predictor | Mask2Former | str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "cpu",
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> None:
    """Serve the demo page and API until interrupted (Ctrl+C); prints the URL."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    server = make_server(checkpoint, host=host, port=port, device=device, max_upload_bytes=max_upload_bytes,
                         max_pixels=max_pixels)
    print(f"mask2former serve: open {server.url} (Ctrl+C to stop)", flush=True)
    if not server.loopback_only:
        print(f"note: listening on {host}, reachable from other machines; there is no authentication", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        server.server_close()
