"""What one client can cost `fxprune serve` (issue 14): the real server over loopback.

Malformed bodies get a 4xx (never a 500), per-request sample and pixel budgets are
checked from headers before decoding, and connections that never finish their
request head are closed.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import time
import zlib

import numpy as np
import pytest

httpx = pytest.importorskip("httpx", reason="the serve extra is not installed")
pytest.importorskip("fastapi", reason="the serve extra is not installed")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")

from test_serve import Server, artifact  # noqa: E402,F401  (the module-scoped artifact fixture)

from fxprune.errors import FxpruneError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit:FutureWarning")

MAX_SAMPLES = 16
HALF_OPEN = 20  # connections that send half a request head and go quiet
TIMEOUT_S = 1.0


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width×height RGB (the pixel data is a stub)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def lying_npy_header() -> bytes:
    """A .npy header claiming (1000000, 1000000) float64 in front of 1 KB of data."""
    header = npy(np.zeros((1, 1)))
    return header.replace(b"(1, 1)", b"(1000000, 1000000)").rstrip(b"\0") + b"\0" * 1024


def image_json(*images: bytes) -> str:
    return json.dumps({"image": [base64.b64encode(i).decode() for i in images]})


JSON = {"content-type": "application/json"}
NPY = {"content-type": "application/octet-stream"}
MALFORMED = {
    "npy header claims 10^12 elements": (400, lying_npy_header(), NPY),
    "empty image list": (422, json.dumps({"image": []}), JSON),
    "PNG header claims 100000x100000": (413, image_json(png_header(100_000, 100_000)), JSON),
    "8 images of 3000x3000 (72 MP)": (413, image_json(*[png_header(3000, 3000)] * 8), JSON),
    "too many images": (413, image_json(*[png_header(8, 8)] * (MAX_SAMPLES + 1)), JSON),
    "too many npy samples": (413, npy(np.zeros((MAX_SAMPLES + 1, 3, 32, 32), np.uint8)), NPY),
    "too many JSON samples": (
        413, json.dumps({"inputs": np.zeros((MAX_SAMPLES + 1, 3, 32, 32)).tolist()}), JSON,
    ),
    "truncated PNG data": (422, image_json(png_header(64, 64)), JSON),
    "npy object header": (422, npy(np.zeros(2)).replace(b"'<f8'", b"'|O' "), NPY),
}  # fmt: skip


@pytest.fixture(scope="module")
def server(artifact):  # noqa: F811
    running = Server(artifact, "--max-samples", str(MAX_SAMPLES), "--request-timeout",
                     str(TIMEOUT_S))  # fmt: skip
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60, trust_env=False) as http:
        yield http


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_bodies_and_budgets_get_4xx(client, case):
    status, body, headers = MALFORMED[case]
    response = client.post("/predict", content=body, headers=headers)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail and "Traceback" not in detail
    assert client.get("/health").status_code == 200


def test_budgets_leave_normal_requests_alone(client):
    ok = client.post("/predict", content=npy(np.zeros((MAX_SAMPLES, 3, 32, 32), np.float32)),
                     headers=NPY)  # fmt: skip
    assert ok.status_code == 200 and ok.json()["shape"] == [MAX_SAMPLES, 10]
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48)).save(buffer, "PNG")
    images = client.post("/predict", content=image_json(buffer.getvalue()), headers=JSON)
    assert images.status_code == 200, images.text


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_half_open_connections_are_closed(server, client):
    host, port = server.url.removeprefix("http://").split(":")
    sockets = []
    try:
        for i in range(HALF_OPEN):
            sock = socket.create_connection((host, int(port)), timeout=10)
            if i % 2:  # half the request head; the others send nothing at all
                sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
            sockets.append(sock)
        assert client.get("/health").status_code == 200  # the server still answers
        time.sleep(TIMEOUT_S)
        closed = [_closed_by_server(sock) for sock in sockets]  # recv waits ≤ 10 s each
        assert all(closed), f"{closed.count(False)} of {HALF_OPEN} half-open connections held"
    finally:
        for sock in sockets:
            sock.close()
    assert client.get("/health").status_code == 200


def test_artifact_with_broken_metadata_is_one_line(tmp_path):
    import torch

    from fxprune.serve.artifact import load_artifact

    scripted = torch.jit.script(torch.nn.Conv2d(3, 4, 1))
    for raw in ("{not json", "[1, 2]", '{"input_shape": [1, 3, 100000, 100000]}'):
        torch.jit.save(scripted, str(tmp_path / "a.ts"), _extra_files={"fxprune.json": raw})
        with pytest.raises(FxpruneError) as caught:
            load_artifact(tmp_path / "a.ts")
        assert "\n" not in str(caught.value)
