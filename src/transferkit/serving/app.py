"""The HTTP routes: ``POST /predict``, ``GET /health``, ``GET /info`` and the page at ``/``.

Every refusal is a JSON ``{"error": "<one line>"}`` with a 4xx status: 413 for a body or image
too large, 415 for a body neither multipart nor JSON, 422 for a file that is not an image or a
field the service does not know, 400 for JSON or base64 that does not parse. The request fails;
the service goes on.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from .batching import Batcher
from .service import ImageService, RequestProblem, Upload, check_image

MAX_IMAGES_PER_REQUEST = 256
MAX_TOP_K = 1000
FILE_FIELDS = ("files", "file")
JSON_FORMAT = '{"images": ["<base64>", ...] or [{"name": "a.jpg", "data": "<base64>"}, ...], "top_k": 3}'


def create_app(
    service: ImageService, *, top_k: int = 3, batching: bool = True, max_batch: int = 32, max_wait_ms: float = 5.0,
    max_upload_mb: float = 20.0,
) -> FastAPI:  # fmt: skip
    """The FastAPI application serving ``service``; ``uvicorn.run(app)`` starts it."""
    batcher = Batcher(service.predict, max_batch, max_wait_ms / 1000, enabled=batching)
    limit = int(max_upload_mb * 2**20)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="transferkit", summary="An image classifier trained by transferkit", lifespan=lifespan)
    app.state.batcher = batcher
    page = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")

    @app.exception_handler(RequestProblem)
    async def refused(request: Request, exc: RequestProblem) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # Unknown routes and methods answer in the same one-line shape as the service's own refusals.
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    async def info() -> dict[str, Any]:
        stats = batcher.stats
        return {
            **service.info,
            "top_k": top_k,
            "batching": {"enabled": batching, "max_batch": max_batch, "max_wait_ms": max_wait_ms,
                         "batches": stats.batches, "requests": stats.requests, "images": stats.images,
                         "largest_batch": stats.largest_batch},  # fmt: skip
            "limits": {"max_upload_mb": max_upload_mb, "max_images_per_request": MAX_IMAGES_PER_REQUEST},
        }

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        """Multipart files (field ``files``) or JSON base64 images → ``predict --json``'s list."""
        uploads = await read_uploads(request, limit, top_k)
        results = await batcher.submit(uploads)
        failed = [r["path"] for r in results if r.get("error")]
        if failed:
            raise RequestProblem(422, f"{', '.join(failed)}: cannot decode image (the file is damaged or truncated)")
        return JSONResponse(results)

    return app


async def read_uploads(request: Request, limit: int, default_top_k: int) -> list[Upload]:
    """The images of a ``/predict`` request, each checked to be one, or a :class:`RequestProblem`."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in ("multipart/form-data", "application/json"):
        raise RequestProblem(415, f"send multipart/form-data (field 'files') or application/json ({JSON_FORMAT}), "
                                  f"not {kind or 'a body without a Content-Type'}")  # fmt: skip
    body = await _read_body(request, limit)
    if kind == "application/json":
        named, top_k = _json_images(body)
    else:
        named, top_k = await _form_images(Request(request.scope, _replay(body)))
    top_k = _top_k(request.query_params.get("top_k", top_k), default_top_k)
    if not named:
        raise RequestProblem(422, "no images in the request; send multipart field 'files' or JSON 'images'")
    if len(named) > MAX_IMAGES_PER_REQUEST:
        raise RequestProblem(413, f"{len(named)} images in one request; send at most {MAX_IMAGES_PER_REQUEST}")
    return [Upload(name, data, check_image(name, data), top_k) for name, data in named]


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestProblem(413, f"request of {int(declared) / 2**20:.1f} MB is over the limit of "
                                  f"{limit / 2**20:g} MB (transferkit serve --max-upload-mb)")  # fmt: skip
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it comes: a body may be chunked or lie about its length
        size += len(chunk)
        if size > limit:
            raise RequestProblem(413, f"request is over the limit of {limit / 2**20:g} MB "
                                      "(transferkit serve --max-upload-mb)")  # fmt: skip
        chunks.append(chunk)
    return b"".join(chunks)


def _replay(body: bytes) -> Any:
    """An ASGI ``receive`` that hands ``body`` over again, for Starlette's form parser."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _form_images(request: Request) -> tuple[list[tuple[str, bytes]], Any]:
    try:
        form = await request.form(max_files=MAX_IMAGES_PER_REQUEST + 1, max_fields=16)
    except HTTPException as exc:  # Starlette's word for a malformed or oversized form
        if "Too many files" in str(exc.detail):  # past max_files it stops counting: the limit's own answer
            raise RequestProblem(413, f"more than {MAX_IMAGES_PER_REQUEST} images in one request; send at most "
                                      f"{MAX_IMAGES_PER_REQUEST}") from None  # fmt: skip
        raise RequestProblem(400, f"unreadable multipart form ({exc.detail})") from None
    images, top_k = [], None
    for field, value in form.multi_items():
        if field == "top_k":
            top_k = value
        elif field not in FILE_FIELDS:
            raise RequestProblem(422, f"unexpected form field {field!r}; send images as field 'files' "
                                      "(and optionally 'top_k')")  # fmt: skip
        elif not isinstance(value, UploadFile):
            raise RequestProblem(422, f"form field {field!r} holds text, not a file; attach the image file")
        else:
            images.append((value.filename or f"image-{len(images)}", await value.read()))
    return images, top_k


def _json_images(body: bytes) -> tuple[list[tuple[str, bytes]], Any]:
    try:
        payload = json.loads(body)
    except RecursionError:  # "[[[[…" nested deeper than Python's stack
        raise RequestProblem(400, f"the body's JSON is nested too deeply; send {JSON_FORMAT}") from None
    except ValueError as exc:
        raise RequestProblem(400, f"the body is not valid JSON ({exc}); send {JSON_FORMAT}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("images"), list):
        raise RequestProblem(422, f"expected a JSON object with a list 'images': {JSON_FORMAT}")
    unknown = sorted(set(payload) - {"images", "top_k"})
    if unknown:
        raise RequestProblem(422, f"unexpected JSON field {unknown[0]!r}; send {JSON_FORMAT}")
    images = []
    for i, item in enumerate(payload["images"]):
        name, data = f"image-{i}", item
        if isinstance(item, dict):
            name, data = item.get("name") or name, item.get("data")
        if not isinstance(data, str) or not isinstance(name, str):
            raise RequestProblem(422, f"images[{i}] must be a base64 string or {{\"name\": ..., \"data\": <base64>}}")
        images.append((name, _base64(name, data)))
    return images, payload.get("top_k")


def _base64(name: str, data: str) -> bytes:
    if data.startswith("data:") and "," in data:  # a data URL, as a browser's FileReader makes
        data = data.split(",", 1)[1]
    data = "".join(data.split())  # line breaks, as `base64 FILE` wraps its output
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestProblem(400, f"{name}: 'data' is not valid base64") from None


def _top_k(value: Any, default: int) -> int:
    if value is None:
        return default
    whole = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer()) or (
        isinstance(value, str) and re.fullmatch(r"\s*\+?[0-9]+\s*", value))  # a form's field  # fmt: skip
    k = int(value) if whole else 0  # refused below: true, 1.9 (int() would take both as 1), "two"
    if not 1 <= k <= MAX_TOP_K:
        raise RequestProblem(422, f"top_k must be a whole number from 1 to {MAX_TOP_K}, got {value!r}")
    return k
