"""``transferkit serve``: the service in its own process on a free localhost port, real image files,
the page driven in headless Chromium, and the batcher on its own."""

from __future__ import annotations

import asyncio
import base64
import io
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

import transferkit
from transferkit.checkpoint import read_metadata
from transferkit.cli import main
from transferkit.performance import pick_device
from transferkit.prediction import inference_precision

requests = pytest.importorskip("requests", reason="the service tests talk HTTP with requests (the dev extra)")
pytest.importorskip("fastapi", reason='serve needs FastAPI and uvicorn: pip install -e ".[serve]"')
pytest.importorskip("python_multipart", reason='serve needs python-multipart: pip install -e ".[serve]"')

from transferkit.serving import Batcher  # noqa: E402  (after the skip: it imports FastAPI's app module)
from transferkit.serving.service import ImageService, RequestProblem, Upload, check_image  # noqa: E402

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
UPLOAD_LIMIT_MB = 1
STARTUP_SECONDS = 120


@pytest.fixture(scope="module")
def run_dir(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "run"
    transferkit.train(str(tiny_dataset), model="resnet18", weights="none", image_size=32, epochs=1, quiet=True,
                      out=str(out))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def images(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Real files of both classes and formats (JPEG and PNG), each with a name of its own."""
    folder = tmp_path_factory.mktemp("uploads")
    copies = []
    for path in sorted((tiny_dataset / "val").rglob("*.*")):
        copies.append(folder / f"{path.parent.name}-{path.name}")
        copies[-1].write_bytes(path.read_bytes())
    return copies[:3] + copies[4:7]


def start_service(*args: str) -> tuple[subprocess.Popen[str], str]:
    """``transferkit serve ARGS --port 0`` in its own process; its URL once ``/health`` answers."""
    proc = subprocess.Popen([sys.executable, "-m", "transferkit", "serve", *args, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines: list[str] = []
    found: list[str] = []

    def read() -> None:  # its output is drained all along, so a chatty service never blocks on a full pipe
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            found.extend(re.findall(r"at (http://127\.0\.0\.1:\d+/)", line))

    threading.Thread(target=read, daemon=True).start()
    proc.lines = lines  # type: ignore[attr-defined]  # what it has printed so far
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline and proc.poll() is None:
        if found:
            try:
                if requests.get(found[0] + "health", timeout=5).ok:
                    return proc, found[0]
            except requests.ConnectionError:
                pass
        time.sleep(0.2)
    stop_service(proc)
    raise AssertionError(f"the service did not start: {''.join(lines)[-2000:]}")


def stop_service(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGINT)  # as Ctrl+C: uvicorn shuts down cleanly
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


@pytest.fixture(scope="module")
def service(run_dir: Path) -> Iterator[str]:
    proc, url = start_service(str(run_dir), "--max-upload-mb", str(UPLOAD_LIMIT_MB))
    yield url
    assert stop_service(proc) == 0


def post_files(url: str, paths: list[Path], **params: object) -> requests.Response:
    files = [("files", (p.name, p.read_bytes())) for p in paths]
    return requests.post(url + "predict", files=files, params=params, timeout=60)


def expected_predictions(url: str, run_dir: Path, paths: list[Path], top_k: int = 3) -> list[dict]:
    """``transferkit predict --json`` on the files, by the runtime the service says it runs."""
    info = requests.get(url + "info", timeout=10).json()
    if info["runtime"] == "onnxruntime":
        results = transferkit.predict(info["model"]["file"], paths, top_k=top_k)
    else:
        results = transferkit.predict(run_dir, paths, top_k=top_k, runtime="torch")
    return [{**r, "path": Path(r["path"]).name} for r in results]


# --------------------------------------------------------------------------- the batcher, in this process


def run_batcher(jobs: list[list[int]], **options: object) -> tuple[list[list[int]], list[list[str]]]:
    """Submit all ``jobs`` at once; the batches the model saw, and each job's answer."""
    seen: list[list[int]] = []

    def model(items: list[int]) -> list[str]:
        seen.append(list(items))
        return [f"answer {i}" for i in items]

    async def go() -> list[list[str]]:
        batcher = Batcher(model, **options)  # type: ignore[arg-type]
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(job) for job in jobs))
        finally:
            await batcher.stop()

    return seen, asyncio.run(go())


def test_concurrent_requests_share_batches_and_get_their_own_answers() -> None:
    jobs = [[i] for i in range(10)] + [[10, 11, 12]]
    seen, answers = run_batcher(jobs, max_batch=4, max_wait_s=0.01)
    assert answers == [[f"answer {i}" for i in job] for job in jobs]
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12]]  # the job of 3 did not fit beside 8, 9


def test_a_lone_request_is_not_kept_waiting_for_company() -> None:
    async def go() -> list[list[int]]:
        batcher = Batcher(lambda items: items, max_batch=8, max_wait_s=3600)
        await batcher.start()
        try:  # an hour's wait would be spent only after a batch that joined several requests
            return [await asyncio.wait_for(batcher.submit([i]), 60) for i in range(3)]
        finally:
            await batcher.stop()

    assert asyncio.run(go()) == [[0], [1], [2]]


def test_without_batching_each_request_is_its_own_batch() -> None:
    jobs = [[i] for i in range(5)]
    seen, answers = run_batcher(jobs, max_batch=32, enabled=False)
    assert seen == jobs and answers == [[f"answer {i}"] for i in range(5)]


def test_a_failing_batch_fails_its_requests_and_the_next_batch_is_answered() -> None:
    def model(items: list[int]) -> list[int]:
        if 0 in items:
            raise ValueError("cannot")
        return items

    async def go() -> tuple[BaseException | list[int], list[int]]:
        batcher = Batcher(model, max_batch=1)
        await batcher.start()
        failed, ok = await asyncio.gather(batcher.submit([0]), batcher.submit([5]), return_exceptions=True)
        await batcher.stop()
        return failed, ok

    failed, ok = asyncio.run(go())
    assert isinstance(failed, ValueError) and ok == [5]


def test_check_image_reads_headers(images: list[Path]) -> None:
    assert {check_image(p.name, p.read_bytes()) for p in images} == {"JPEG", "PNG"}
    needle = io.BytesIO()
    Image.new("RGB", (1, 400)).save(needle, "PNG")  # 1 x 400: resized to 256 wide, 102,400 pixels tall
    postscript = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"  # PIL would run Ghostscript
    for data in (b"", b"not an image at all", postscript, needle.getvalue()):
        with pytest.raises(RequestProblem, match="x.jpg is") as problem:
            check_image("x.jpg", data)
        assert problem.value.status == 422


# --------------------------------------------------------------------------- the service, in its own process


class _PausedRunner:
    """The service's runner, holding a request in the model's forward until released."""

    def __init__(self, runner: object) -> None:
        self.runner, self.inside, self.release = runner, threading.Event(), threading.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self.runner, name)

    def __call__(self, batch: object) -> object:
        self.inside.set()
        self.release.wait(30)
        return self.runner(batch)  # type: ignore[operator]


def test_a_request_leaves_the_warning_filters_as_the_event_loops_thread_sets_them(
    run_dir: Path, images: list[Path]
) -> None:
    """A request's model runs on a worker thread while the event loop checks the next uploads (with a
    catch_warnings of its own): the request must not save and later restore the filters that check set."""
    service = ImageService(run_dir, runtime="torch")
    paused = service.runner = _PausedRunner(service.runner)
    upload = Upload(images[0].name, images[0].read_bytes(), "JPEG" if images[0].suffix == ".jpg" else "PNG", 1)
    before = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        request = threading.Thread(target=service.predict, args=([upload],))
        request.start()
        assert paused.inside.wait(30)
    paused.release.set()
    request.join(30)
    assert warnings.filters == before


@pytest.mark.slow
@pytest.mark.precision
def test_predict_answers_as_predict_json(service: str, run_dir: Path, images: list[Path]) -> None:
    response = post_files(service, images)
    assert response.status_code == 200, response.text
    assert response.json() == expected_predictions(service, run_dir, images)
    one = post_files(service, images[:1], top_k=1).json()
    assert one == expected_predictions(service, run_dir, images[:1], top_k=1)


@pytest.mark.slow
def test_json_with_base64_images_answers_as_multipart(service: str, images: list[Path]) -> None:
    # The last as `base64 FILE` writes it: wrapped at 76 characters.
    payload = {"images": [{"name": p.name, "data": base64.b64encode(p.read_bytes()).decode()} for p in images[:2]]
               + [base64.encodebytes(images[2].read_bytes()).decode()], "top_k": 2}  # fmt: skip
    answer = requests.post(service + "predict", json=payload, timeout=60)
    assert answer.status_code == 200, answer.text
    multipart = post_files(service, images[:3], top_k=2).json()
    assert answer.json() == [*multipart[:2], {**multipart[2], "path": "image-2"}]


@pytest.mark.slow
@pytest.mark.precision
def test_health_and_info(service: str, run_dir: Path) -> None:
    assert requests.get(service + "health", timeout=10).json() == {"status": "ok"}
    info = requests.get(service + "info", timeout=10).json()
    model = transferkit.load_checkpoint(run_dir)
    assert info["classes"] == model.class_names == ["blue", "red"]
    assert info["model"]["backbone"] == "resnet18"
    assert transferkit.Preprocessing.from_dict(info["preprocessing"]) == model.preprocessing
    assert info["batching"]["enabled"] is True
    # As predict --runtime auto chooses for a large job: ONNX Runtime where the run answers in fp32 here.
    fp32 = inference_precision(read_metadata(run_dir / "model.pt"), pick_device()) == "32"
    has_ort = importlib.util.find_spec("onnxruntime") is not None
    assert info["runtime"] == ("onnxruntime" if fp32 and has_ort else "torch")
    assert info["precision"] == ("32" if fp32 else "bf16")


@pytest.mark.slow
def test_concurrent_requests_are_all_answered_correctly(service: str, images: list[Path]) -> None:
    alone = {p.name: post_files(service, [p]).json() for p in images}
    before = requests.get(service + "info", timeout=10).json()["batching"]
    answers: dict[str, object] = {}

    def client(path: Path) -> None:
        for _ in range(3):
            answers[path.name] = post_files(service, [path]).json()

    threads = [threading.Thread(target=client, args=(p,)) for p in images]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert answers == alone  # batched with others, each request still gets its own images' answers
    after = requests.get(service + "info", timeout=10).json()["batching"]
    assert after["requests"] - before["requests"] == 3 * len(images)
    assert after["images"] - before["images"] == 3 * len(images)


def _refusal(response: requests.Response, status: int, says: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert "\n" not in error and says in error


@pytest.mark.slow
def test_bad_requests_get_a_4xx_with_a_reason_and_the_service_goes_on(
    service: str, images: list[Path], tmp_path: Path
) -> None:
    url = service + "predict"
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    truncated = tmp_path / "truncated.png"
    png = next(p for p in images if p.suffix == ".png").read_bytes()
    truncated.write_bytes(png[: len(png) // 2])
    big = os.urandom(UPLOAD_LIMIT_MB * 2**20 + 1000)
    image = images[0].read_bytes()
    _refusal(post_files(service, [text]), 422, "notes.jpg is not an image")
    _refusal(post_files(service, [truncated]), 422, "truncated.png: cannot decode image")
    _refusal(requests.post(url, files={"photo": ("a.jpg", image)}, timeout=30), 422, "unexpected form field 'photo'")
    _refusal(requests.post(url, data={"files": "a.jpg"}, files={"x": ("", b"")}, timeout=30), 422, "field")
    _refusal(requests.post(url, data=b"raw", headers={"Content-Type": "image/jpeg"}, timeout=30), 415, "multipart")
    _refusal(requests.post(url, data=b"{", headers={"Content-Type": "application/json"}, timeout=30), 400, "JSON")
    _refusal(requests.post(url, json={"images": ["%%%"]}, timeout=30), 400, "not valid base64")
    _refusal(requests.post(url, json={"pictures": []}, timeout=30), 422, "'images'")
    _refusal(requests.post(url, json={"images": []}, timeout=30), 422, "no images")
    _refusal(post_files(service, images[:1], top_k="many"), 422, "top_k")
    b64 = base64.b64encode(image).decode()
    for top_k in (1.9, True, "1.5", "++1"):  # int() would take the first three as 1, and fail on the last
        _refusal(requests.post(url, json={"images": [b64], "top_k": top_k}, timeout=30), 422, "top_k")
    deep = b"[" * 100_000  # deeper than Python's stack: json.loads raises RecursionError, not ValueError
    _refusal(requests.post(url, data=deep, headers={"Content-Type": "application/json"}, timeout=30), 400, "nested")
    _refusal(requests.post(url, files={"files": ("big.jpg", big)}, timeout=30), 413, "over the limit")
    for count in (257, 300):  # one past the limit, and more than the form parser counts
        many = [("files", (f"{i}.jpg", b"x")) for i in range(count)]  # counted before they are read
        _refusal(requests.post(url, files=many, timeout=30), 413, "images in one request; send at most 256")
    _refusal(requests.get(service + "nowhere", timeout=30), 404, "Not Found")
    assert requests.get(service + "health", timeout=10).ok
    assert post_files(service, images[:1]).status_code == 200


@pytest.mark.slow
def test_serve_an_int8_export_and_refuse_a_busy_port(run_dir: Path, images: list[Path], tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="ONNX exports need ONNX Runtime (the onnx extra)")
    # Random weights: int8 may lose their chance-level accuracy, so the limit is wide (the test is the serving).
    onnx = transferkit.export(run_dir, "onnx", out=tmp_path / "m.int8.onnx", quantize="int8", max_drop=100).path
    proc, url = start_service(str(onnx), "--access-log")
    try:
        info = requests.get(url + "info", timeout=10).json()
        assert info["runtime"] == "onnxruntime" and info["model"]["file"] == str(onnx)
        assert info["model"]["quantization"]["quantization"] == "int8" and info["precision"] == "int8"
        answer = post_files(url, images)
        assert answer.json() == [{**r, "path": Path(r["path"]).name} for r in transferkit.predict(onnx, images)]
        deadline = time.monotonic() + 10  # --access-log: a line per request, as uvicorn writes them
        while not any('"POST /predict HTTP/1.1" 200' in line for line in proc.lines) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert any('"POST /predict HTTP/1.1" 200' in line for line in proc.lines), proc.lines
        port = url.rsplit(":", 1)[1].strip("/")
        busy = subprocess.run([sys.executable, "-m", "transferkit", "serve", str(onnx), "--port", port],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert busy.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr
    finally:
        assert stop_service(proc) == 0


def test_without_fastapi_serve_says_what_to_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m.startswith("transferkit.serving")]:
        monkeypatch.delitem(sys.modules, name)  # imported again, as in a fresh process
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as on a machine without it
    assert main(["serve", str(tmp_path)]) == 2
    assert 'fastapi is missing): pip install "transferkit[serve]"' in capsys.readouterr().err


def test_serve_a_missing_run_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing" in err


# --------------------------------------------------------------------------- the page, in headless Chromium


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="the page test drives Chromium with selenium (dev)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # Without the background-networking flags Chromium stalls on this closed network.
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-proxy-server", "--window-size=1200,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def shown_predictions(driver: object, count: int) -> dict[str, list[tuple[str, str]]]:
    """Each card's file name → the (label, percentage) rows its bars show, once ``count`` cards are answered."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 60).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result[data-state]")) >= count
    )  # fmt: skip
    shown = {}
    for card in driver.find_elements(By.CSS_SELECTOR, ".result"):  # type: ignore[attr-defined]
        assert card.get_attribute("data-state") == "done", card.text
        rows = card.find_elements(By.CSS_SELECTOR, ".row")
        shown[card.find_element(By.CSS_SELECTOR, ".name").text] = [
            (r.find_element(By.CSS_SELECTOR, ".label").text, r.find_element(By.CSS_SELECTOR, ".probability").text)
            for r in rows
        ]
        widths = [float(r.find_element(By.CSS_SELECTOR, ".bar").value_of_css_property("width")[:-2]) for r in rows]
        assert widths == sorted(widths, reverse=True) and widths[0] > 0  # the bars follow the probabilities
    return shown


@pytest.mark.slow
def test_the_page_shows_the_labels_of_picked_and_dropped_photos(
    browser: object, service: str, run_dir: Path, images: list[Path]
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    driver.get(service)  # type: ignore[attr-defined]
    WebDriverWait(driver, 30).until(lambda d: "2 classes: blue, red" in d.find_element(By.ID, "about").text)
    picked, dropped = images[:4], images[4]
    driver.find_element(By.ID, "picker").send_keys("\n".join(str(p) for p in picked))  # type: ignore[attr-defined]
    # A drop as the browser delivers it: a DragEvent whose DataTransfer holds the file.
    driver.execute_script(  # type: ignore[attr-defined]
        """const [name, data] = arguments;
        const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: "image/png"}));
        const drop = new DragEvent("drop", {dataTransfer: transfer, bubbles: true});
        document.getElementById("drop").dispatchEvent(drop);""",
        dropped.name, base64.b64encode(dropped.read_bytes()).decode(),
    )  # fmt: skip
    shown = shown_predictions(driver, len(picked) + 1)
    expected = {
        r["path"]: [(p["label"], f"{100 * p['probability']:.1f} %") for p in r["predictions"]]
        for r in expected_predictions(service, run_dir, [*picked, dropped])
    }
    assert shown == expected
    assert all(len(rows) == 2 for rows in shown.values())  # top 3 of 2 classes: both, most probable first
