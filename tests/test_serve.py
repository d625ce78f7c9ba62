"""`fxprune serve`: the real server in a subprocess on a loopback port, spoken to over HTTP."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx", reason="the serve extra is not installed")
pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")

from fxprune.errors import FxpruneError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit:FutureWarning")

MAX_BODY_MB = 1.0
MAX_BATCH = 8
STARTUP_S = 90  # loopback only; httpx clients ignore proxy settings (trust_env=False)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """What `fxprune compile zoo:resnet20 --sparsity 0.5 --out small.ts` writes."""
    from fxprune.pipeline import CompileConfig, compile_source

    out = tmp_path_factory.mktemp("serve") / "small.ts"
    compile_source(CompileConfig(source="zoo:resnet20", out=out, sparsity=0.5, verify=1))
    return out


@pytest.fixture(scope="module")
def reference(artifact):
    """The artifact run in this process: what every /predict answer must equal."""
    module = torch.jit.load(str(artifact)).eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(np.asarray(x, dtype=np.float32))).numpy()

    return run


def fxprune_command() -> list[str]:
    """The installed entry point (as users run it), else the CLI module."""
    entry = shutil.which("fxprune", path=str(Path(sys.executable).parent))
    return [entry] if entry else [sys.executable, "-m", "fxprune.cli.main"]


class Server:
    """A `fxprune serve` subprocess; its stderr is collected by a reader thread."""

    def __init__(self, artifact: Path, *args: str) -> None:
        cmd = [*fxprune_command(), "serve", str(artifact), "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_for_url()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)
            self.lines.put(line)

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            if match:
                return match.group(1)
        self.stop()
        raise AssertionError(f"server did not start: {''.join(self.stderr)}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(artifact):
    args = ["--max-batch", str(MAX_BATCH), "--max-body-mb", str(MAX_BODY_MB)]
    running = Server(artifact, *args)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60, trust_env=False) as http:
        yield http


def test_health_and_metadata(client, artifact):
    health = client.get("/health")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and body["input_shape"] == [1, 3, 32, 32]
    assert body["max_batch"] == MAX_BATCH and body["threads"] >= 1
    assert body["fixed_batch"] is None  # the TorchScript artifact takes any batch size
    from fxprune.export import read_metadata

    metadata = client.get("/metadata").json()
    assert metadata == read_metadata(artifact)
    assert metadata["input_shape"] == [1, 3, 32, 32]
    assert metadata["params"]["after"] < metadata["params"]["before"]


def test_predict_json_and_npy_equal_the_artifact(client, reference):
    gen = np.random.default_rng(0)
    one = gen.standard_normal((3, 32, 32)).astype(np.float32)
    batch = gen.standard_normal((3, 3, 32, 32)).astype(np.float32)
    answer = client.post("/predict", json={"inputs": one.tolist()}).json()
    assert answer["shape"] == [1, 10] and answer["batch_size"] == 1
    expected = reference(one[None])
    np.testing.assert_allclose(answer["outputs"], expected, rtol=0, atol=1e-5)
    assert [e["index"] for e in answer["top_k"][0]] == list(np.argsort(-expected[0])[:5])
    probabilities = [e["probability"] for e in answer["top_k"][0]]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1

    answer = client.post("/predict?top_k=0", json={"inputs": batch.tolist()}).json()
    np.testing.assert_allclose(answer["outputs"], reference(batch), rtol=0, atol=1e-5)
    assert "top_k" not in answer

    buffer = io.BytesIO()
    np.save(buffer, batch.astype(np.float64))  # any numeric dtype; served as float32
    for content_type in ("application/octet-stream", "application/x-npy"):
        response = client.post("/predict", content=buffer.getvalue(),
                               headers={"content-type": content_type})  # fmt: skip
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(response.json()["outputs"], reference(batch), atol=1e-5)


def test_predict_image_uses_documented_preprocessing(client, reference):
    from PIL import Image

    pixels = (np.random.default_rng(1).random((48, 40, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    encoded = {}
    for fmt in ("PNG", "JPEG"):
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        encoded[fmt] = buffer.getvalue()
    # resize to the model's 32x32 (bilinear), scale to [0, 1], ImageNet mean/std, CHW
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for fmt, data in encoded.items():
        decoded = Image.open(io.BytesIO(data)).convert("RGB")
        resized = decoded.resize((32, 32), Image.Resampling.BILINEAR)
        x = ((np.asarray(resized, np.float32) / 255 - mean) / std).astype(np.float32)
        expected = reference(x.transpose(2, 0, 1)[None])
        payload = {"image": base64.b64encode(data).decode()}
        answer = client.post("/predict", json=payload).json()
        np.testing.assert_allclose(answer["outputs"], expected, atol=1e-5, err_msg=fmt)
    both = [base64.b64encode(d).decode() for d in encoded.values()]
    answer = client.post("/predict", json={"image": both}).json()
    assert answer["shape"] == [2, 10]


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


JSON = {"content-type": "application/json"}
NPY = {"content-type": "application/octet-stream"}
BAD_REQUESTS = {
    "wrong shape": (422, json.dumps({"inputs": [[1.0, 2.0]]}), JSON),
    "wrong channels": (422, json.dumps({"inputs": np.zeros((1, 32, 32)).tolist()}), JSON),
    "non-numeric": (422, json.dumps({"inputs": [[["a"] * 32] * 32] * 3}), JSON),
    "booleans": (422, json.dumps({"inputs": [[[True] * 32] * 32] * 3}), JSON),
    "ragged": (422, json.dumps({"inputs": [[1.0, 2.0], [3.0]]}), JSON),
    "NaN": (422, '{"inputs": ' + json.dumps(np.full((3, 32, 32), np.nan).tolist()) + "}", JSON),
    "overflows float32": (422, json.dumps({"inputs": np.full((3, 32, 32), 1e39).tolist()}), JSON),
    "no inputs key": (422, json.dumps({"x": 1}), JSON),
    "not JSON": (400, "{inputs: [1", JSON),
    "deeply nested": (400, "[" * 100_000, JSON),
    "bad base64": (400, json.dumps({"image": "!!not base64!!"}), JSON),
    "not an image": (422, json.dumps({"image": base64.b64encode(b"hello").decode()}), JSON),
    "not npy": (400, b"\x00\x01garbage", NPY),
    "npy of strings": (422, _npy(np.array([["a", "b"]])), NPY),
    "npy wrong shape": (422, _npy(np.zeros((2, 3, 16, 16), np.float32)), NPY),
    "text/plain": (415, "1,2,3", {"content-type": "text/plain"}),
    "oversize": (413, b"0" * int((MAX_BODY_MB + 0.5) * 2**20), NPY),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_4xx_with_a_message(client, case):
    status, body, headers = BAD_REQUESTS[case]
    response = client.post("/predict", content=body, headers=headers)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail and "Traceback" not in detail


def test_oversize_chunked_body_is_refused(client):
    chunks = (b" " * 2**16 for _ in range(int(MAX_BODY_MB * 16) + 8))  # no Content-Length
    response = client.post("/predict", content=chunks, headers=JSON)
    assert response.status_code == 413


def test_200_concurrent_requests_are_batched_without_errors(server, reference):
    inputs = np.random.default_rng(2).standard_normal((200, 3, 32, 32)).astype(np.float32)
    expected = reference(inputs)
    before = httpx.get(f"{server.url}/health", trust_env=False).json()

    async def send_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(
            base_url=server.url, timeout=60, limits=limits, trust_env=False
        ) as http:
            bounded = asyncio.Semaphore(50)

            async def one(i: int) -> httpx.Response:
                async with bounded:
                    return await http.post("/predict", json={"inputs": inputs[i].tolist()})

            return await asyncio.gather(*(one(i) for i in range(len(inputs))))

    start = time.perf_counter()
    responses = asyncio.run(send_all())
    elapsed = time.perf_counter() - start
    assert [r.status_code for r in responses] == [200] * len(inputs)
    outputs = np.array([r.json()["outputs"][0] for r in responses])
    np.testing.assert_allclose(outputs, expected, rtol=0, atol=1e-5)
    after = httpx.get(f"{server.url}/health", trust_env=False).json()
    assert after["requests"] - before["requests"] == len(inputs)
    batches = after["batches"] - before["batches"]
    assert batches < len(inputs), "concurrent requests were never batched"
    assert after["largest_batch"] <= MAX_BATCH
    print(f"200 requests in {elapsed:.2f} s ({len(inputs) / elapsed:.0f} req/s), {batches} batches")


def test_sigterm_exits_cleanly(server, client):
    assert client.get("/health").status_code == 200
    assert server.stop() == 0
    stderr = "".join(server.stderr)
    assert "server stopped" in stderr and "Traceback" not in stderr


def test_busy_port_is_one_line_error(artifact):
    from typer.testing import CliRunner

    from fxprune.cli.main import app

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", str(artifact), "--port", str(port)])
    assert isinstance(result.exception, FxpruneError)
    assert f"cannot listen on 127.0.0.1:{port}" in str(result.exception)


def test_missing_extra_is_one_line_error(monkeypatch):
    import importlib.util

    from fxprune import serve

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "uvicorn" else real(name, *a))  # fmt: skip
    with pytest.raises(FxpruneError, match=r"pip install 'fxprune\[serve\]'"):
        serve.require_serve_extra()
