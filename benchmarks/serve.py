"""Requests/s and p50/p95 latency of ``transferkit serve`` at 1, 4 and 16 concurrent clients, batching on and off.

The service runs as a user starts it (``transferkit serve RUN --port 0``, its own process, listening
on 127.0.0.1 only; nothing else is contacted). Each client posts one photo per request as multipart,
as the page does, round robin over the run's validation images, on a kept-alive connection. Per
configuration: a warm-up of 2 requests per client, then requests until ``--requests`` or
``--seconds``, whichever comes first: the load is bounded in count and in time. The service is
restarted with ``--no-batching`` for the second half. The clients share the machine's cores with
the service (Python threads, so mostly one core): on a 2-core machine the absolute numbers are
the service's and the clients' together, and the batching on/off ratio is the point.

    .venv/bin/python benchmarks/serve.py [--run RUN] [--clients 1,4,16] [--seconds 10] [--requests 300]

Without ``--run``, a run is trained first: efficientnet_lite0 (real weights, offline), feature-extract,
1 epoch, on ../shared/datasets/hymenoptera (about a minute).
"""

from __future__ import annotations

import argparse
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera"


def train_run(out: Path) -> Path:
    import transferkit

    print(f"training efficientnet_lite0 on {SHARED} (feature-extract, 1 epoch)...", file=sys.stderr)
    return transferkit.train(str(SHARED), model="efficientnet_lite0", epochs=1, quiet=True, out=str(out)).run_dir


def start(run: Path, *options: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "transferkit", "serve", str(run), "--port", "0", *options],
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:  # the first line says where it listens
        found = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
        if found:
            url = found.group(1)
            break
    else:
        raise SystemExit(f"the service did not start (exit {proc.wait()})")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # drained, so the service never blocks on it
    for _ in range(600):
        try:
            if requests.get(url + "health", timeout=2).ok:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.1)
    raise SystemExit("the service did not answer /health")


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def load(url: str, photos: list[tuple[str, bytes]], clients: int, seconds: float, limit: int) -> dict[str, float]:
    """``clients`` threads posting one photo each request; latencies of the measured requests."""
    latencies: list[float] = []
    lock = threading.Lock()
    issued = [0]
    barrier = threading.Barrier(clients + 1)
    deadline = [0.0]
    go = threading.Event()  # set once the deadline is

    def client(index: int) -> None:
        session = requests.Session()

        def post(n: int) -> float:
            name, data = photos[n % len(photos)]
            t0 = time.perf_counter()
            response = session.post(url + "predict", files={"files": (name, data)}, timeout=120)
            response.raise_for_status()
            return time.perf_counter() - t0

        for n in range(2):  # warm-up: connections open, the service's first batches planned
            post(index + n)
        barrier.wait()
        go.wait()
        while True:
            with lock:
                if issued[0] >= limit or time.perf_counter() > deadline[0]:
                    return
                issued[0] += 1
                n = issued[0]
            latency = post(index * 7919 + n)
            with lock:
                latencies.append(latency)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    begin = time.perf_counter()
    deadline[0] = begin + seconds
    go.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - begin
    q = statistics.quantiles(latencies, n=20, method="inclusive")
    return {"requests": len(latencies), "rps": len(latencies) / elapsed, "p50": statistics.median(latencies) * 1000,
            "p95": q[18] * 1000}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="run directory or .onnx export (default: train one on hymenoptera)")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=10.0, help="most seconds measured per configuration")
    parser.add_argument("--requests", type=int, default=300, help="most requests measured per configuration")
    parser.add_argument("--max-wait-ms", default="5", help="the service's --max-wait-ms with batching on")
    parser.add_argument("--no-off", action="store_true", help="measure batching on only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or train_run(Path(tmp) / "run")
        photos = [(p.name, p.read_bytes()) for p in sorted((SHARED / "val").rglob("*.jpg"))[:64]]
        rows = []
        for batching in (True,) if args.no_off else (True, False):
            proc, url = start(run, *(("--max-wait-ms", args.max_wait_ms) if batching else ("--no-batching",)))
            try:
                info = requests.get(url + "info", timeout=10).json()
                for clients in (int(c) for c in args.clients.split(",")):
                    before = requests.get(url + "info", timeout=10).json()["batching"]
                    result = load(url, photos, clients, args.seconds, args.requests)
                    after = requests.get(url + "info", timeout=10).json()["batching"]
                    per_batch = (after["images"] - before["images"]) / max(1, after["batches"] - before["batches"])
                    rows.append((batching, clients, result, per_batch))
                    print(f"batching {'on ' if batching else 'off'} clients {clients:2d}: {result['rps']:6.1f} req/s  "
                          f"p50 {result['p50']:6.0f} ms  p95 {result['p95']:6.0f} ms  ({result['requests']} requests, "
                          f"{per_batch:.1f} images/batch)", file=sys.stderr, flush=True)  # fmt: skip
            finally:
                stop(proc)
    print(f"\n{info['model']['backbone']} served by {info['runtime']} ({info['precision']}), "
          f"one JPEG per request (mean {statistics.mean(len(d) for _, d in photos) / 1000:.0f} kB); max batch {info['batching']['max_batch']}, "
          f"max wait {info['batching']['max_wait_ms']} ms\n")  # fmt: skip
    print("| clients | batching | requests/s | p50 ms | p95 ms | images/batch |")
    print("|---|---|---|---|---|---|")
    for batching, clients, r, per_batch in rows:
        print(f"| {clients} | {'on' if batching else 'off'} | {r['rps']:.1f} | {r['p50']:.0f} | {r['p95']:.0f} | "
              f"{per_batch:.1f} |")
    on = {c: r["rps"] for b, c, r, _ in rows if b}
    off = {c: r["rps"] for b, c, r, _ in rows if not b}
    print("\nbatching on / off, requests/s: " + ", ".join(f"{c} clients {on[c] / off[c]:.2f}x" for c in on if c in off))


if __name__ == "__main__":
    main()
