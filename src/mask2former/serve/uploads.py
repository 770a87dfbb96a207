"""Request bodies within limits: the upload size (413), a stalled upload (408), no length (411), and the image in a
raw body or a ``multipart/form-data`` form (Starlette's parser on python-multipart; 415 when it is not an image).
"""

from __future__ import annotations

import asyncio

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from .service import ApiError

__all__ = ["read_body", "upload_from_body", "DEFAULT_BODY_TIMEOUT_S"]

# An oversized upload is read and thrown away up to this many bytes so the client gets its 413 rather than a reset
# connection; beyond it (or when the client waits for "100 Continue") nothing is read and the connection is closed.
_DRAIN_LIMIT = 256 * 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 60.0  # seconds a stalled upload may hold a connection between two chunks


async def _receive(request: Request, timeout_s: float, received: int) -> dict:
    try:
        message = await asyncio.wait_for(request.receive(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"upload timed out after {received} bytes (no data for {timeout_s:g} s)") from None
    if message["type"] == "http.disconnect":
        raise ApiError(400, f"upload ended after {received} bytes: the client closed the connection")
    return message


async def _drain(request: Request, timeout_s: float, received: int) -> None:
    """Read and drop the rest of a refused upload (up to the drain limit) so the client reads its answer."""
    while received <= _DRAIN_LIMIT:
        message = await _receive(request, timeout_s, received)
        received += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The request body, at most ``max_bytes``: ApiError 411 (no length), 413 (too large), 408 (stalled upload)."""
    declared = request.headers.get("content-length")
    chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
    if declared is None and not chunked:
        raise ApiError(411, "a Content-Length header is required (or Transfer-Encoding: chunked)")
    if declared is not None:
        length = int(declared)  # uvicorn has already refused a malformed Content-Length
        if length > max_bytes:
            message = f"upload is {length} bytes; the limit is {max_bytes} bytes"
            if "100-continue" not in request.headers.get("expect", "").lower() and length <= _DRAIN_LIMIT:
                await _drain(request, timeout_s, 0)
                raise ApiError(413, message)
            raise ApiError(413, message, {"Connection": "close"})  # the body is not read: no further requests
    chunks: list[bytes] = []
    received = 0
    while True:
        message = await _receive(request, timeout_s, received)
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > max_bytes:  # chunked: the size is only known as it arrives
            if message.get("more_body", False):
                await _drain(request, timeout_s, received)
            raise ApiError(413, f"upload is more than {max_bytes} bytes; the limit is {max_bytes} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _is_image_type(media_type: str) -> bool:
    return media_type.startswith("image/") or media_type == "application/octet-stream"


async def upload_from_body(request: Request, body: bytes) -> tuple[bytes, dict[str, str]]:
    """The image bytes and the other form fields of a request body; ApiError 415 when it does not carry an image."""
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if _is_image_type(media_type):
        return body, {}
    if media_type != "multipart/form-data":
        raise ApiError(415, f"unsupported Content-Type {media_type or 'none'}: send the image as image/*, "
                            f"application/octet-stream or the 'image' field of multipart/form-data")

    async def replay() -> dict:  # the body was read (within the limits) already; the form parser reads it again
        return {"type": "http.request", "body": body, "more_body": False}

    form_request = Request(request.scope, receive=replay)
    try:
        form = await form_request.form(max_files=1, max_fields=16, max_part_size=64 * 1024)
    except (MultiPartException, HTTPException, ValueError, KeyError) as error:
        detail = getattr(error, "detail", None) or getattr(error, "message", None) or str(error)
        raise ApiError(400, f"malformed multipart/form-data body: {detail}") from None
    try:
        image = form.get("image")
        if image is None:
            raise ApiError(400, "multipart/form-data body has no 'image' field")
        if not isinstance(image, UploadFile):
            raise ApiError(400, "form field 'image' must be a file part (with a filename)")
        part_type = (image.content_type or "application/octet-stream").split(";", 1)[0].strip().lower()
        if not _is_image_type(part_type):
            raise ApiError(415, f"form field 'image' has Content-Type {part_type}, not an image")
        data = await image.read()
        fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
    finally:
        await form.close()
    return data, fields
