"""``transferkit serve``: a trained model as an HTTP service, with a page where a person drops photos.

Built on FastAPI with uvicorn rather than LitServe. LitServe's batching is the reason to pick it,
but it runs the model in worker processes of its own (a second copy of the model, images pickled
across a queue: a cost on a 2-core CPU) and fixes its own ``/predict``, ``/health`` and ``/info``
shapes; the service must answer exactly as ``predict --json`` does, take multipart uploads and
base64 JSON, refuse bad input with one-line 4xx reasons and serve a page, which on LitServe means
reaching into its FastAPI app anyway. Here the model stays in the server's process and batching is
a small asyncio queue (:mod:`.batching`) in front of the one prediction path.

>>> from transferkit.serving import create_app, ImageService
>>> app = create_app(ImageService("runs/my-run"))  # doctest: +SKIP  (then uvicorn.run(app))
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from ..errors import TransferkitError
from .app import create_app
from .batching import Batcher, BatchStats
from .service import ImageService, RequestProblem, Upload, choose_runner

__all__ = ["Batcher", "BatchStats", "ImageService", "RequestProblem", "Upload", "choose_runner", "create_app", "serve"]


def serve(
    run: str | Path, host: str = "127.0.0.1", port: int = 8000, *, runtime: str = "auto", top_k: int = 3,
    batching: bool = True, max_batch: int = 32, max_wait_ms: float = 5.0, max_upload_mb: float = 20.0,
    access_log: bool = False,
) -> None:  # fmt: skip
    """Serve ``run`` (a run directory, its model.pt, or an ONNX export) until interrupted."""
    try:
        import uvicorn
        import python_multipart  # noqa: F401  (Starlette's form parser: without it every upload would fail)
    except ImportError as exc:
        raise TransferkitError(f"transferkit serve needs FastAPI, uvicorn and python-multipart ({exc.name} is "
                               'missing): pip install "transferkit[serve]"') from None  # fmt: skip
    for name, value, low in (("--max-batch", max_batch, 1), ("--top-k", top_k, 1), ("--port", port, 0)):
        if value < low:
            raise TransferkitError(f"{name} must be at least {low}, got {value}")
    if not max_upload_mb > 0 or not max_wait_ms >= 0:
        raise TransferkitError("--max-upload-mb must be above 0 and --max-wait-ms at least 0")
    service = ImageService(run, runtime, batch_size=max_batch)
    app = create_app(service, top_k=top_k, batching=batching, max_batch=max_batch, max_wait_ms=max_wait_ms,
                     max_upload_mb=max_upload_mb)  # fmt: skip
    sock = _listen(host, port)
    # uvicorn logs each request at INFO: its access log shows only at that level.
    config = uvicorn.Config(app, log_level="info" if access_log else "warning", access_log=access_log)
    url = f"http://{host}:{sock.getsockname()[1]}/"
    print(f"serving {run} ({service.info['runtime']}, {len(service.info['classes'])} classes) at {url}  "
          "(Ctrl+C stops)", file=sys.stderr, flush=True)  # fmt: skip
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down cleanly, then re-raised the Ctrl+C: the normal end of a service
        print("transferkit serve: stopped", file=sys.stderr)


def _listen(host: str, port: int) -> socket.socket:
    """A bound socket (port 0: one the system picks), so the address printed is the one served."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise TransferkitError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port "
                               "or --host") from None  # fmt: skip
    return sock
