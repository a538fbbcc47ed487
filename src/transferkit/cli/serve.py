"""The ``serve`` command: a trained model as an HTTP service with a drag-and-drop page."""

from __future__ import annotations

import argparse

from .common import ApiChoices, Command, bounded, cache_dir_option


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory, its model.pt, or an ONNX export (.onnx, fp32 or int8)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=bounded(int, 0, 65535), default=8000, help="port to listen on (0: any free one, printed)")
    p.add_argument("--runtime", default="auto", choices=ApiChoices("RUNTIMES"), metavar="RUNTIME",
                   help="%(choices)s; auto chooses as predict does for many images")  # fmt: skip
    p.add_argument("--top-k", type=bounded(int, 1), default=3, help="labels per image unless a request asks for top_k")
    p.add_argument("--max-batch", type=bounded(int, 1), default=32, help="most images run in one batch")
    p.add_argument("--max-wait-ms", type=bounded(float, 0), default=5.0,
                   help="how long a request waits for others to join its batch")  # fmt: skip
    p.add_argument("--no-batching", action="store_true",
                   help="run each request on its own instead of joining concurrent ones")  # fmt: skip
    p.add_argument("--max-upload-mb", type=bounded(float, 0, low_open=True), default=20.0, help="largest request body accepted")
    p.add_argument("--access-log", action="store_true", help="log every request, a line each on stdout "
                   "(uvicorn's format)")


def _serve(args: argparse.Namespace) -> int:
    from .. import TransferkitError

    try:
        from ..serving import serve
    except ImportError as exc:
        raise TransferkitError(f"transferkit serve needs FastAPI, uvicorn and python-multipart ({exc.name} is "
                               'missing): pip install "transferkit[serve]"') from None  # fmt: skip

    serve(args.run, args.host, args.port, runtime=args.runtime, top_k=args.top_k, batching=not args.no_batching,
          max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_upload_mb=args.max_upload_mb,
          access_log=args.access_log)  # fmt: skip
    return 0


COMMANDS = (
    Command("serve", "Serve a trained model over HTTP: POST /predict, GET /info, /health, and a page at /.", """
transferkit serve runs/my-run                        # then open http://127.0.0.1:8000/ and drop photos
transferkit serve runs/my-run/model.int8.onnx --port 9000
curl -F files=@photo.jpg http://127.0.0.1:8000/predict
""", _serve_arguments, _serve, parents=(cache_dir_option,)),
)  # fmt: skip
