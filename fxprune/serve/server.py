"""Serve a compiled artifact over HTTP: FastAPI + uvicorn (the optional extra ``serve``).

Endpoints:

- ``GET /health``: status, artifact, input shape, batching counters.
- ``GET /metadata``: the artifact's embedded ``fxprune.json``.
- ``POST /predict``: one of
    * JSON ``{"inputs": nested lists}`` of shape (C, H, W) or (B, C, H, W);
    * JSON ``{"image": base64 PNG/JPEG}`` (or a list of them): converted to RGB (L for
      1-channel models), resized to the model's H×W (bilinear), scaled to [0, 1] and
      normalised with ``metadata["preprocessing"]["mean"/"std"]`` when the artifact
      records them, else the ImageNet mean/std;
    * a raw ``.npy`` body (``Content-Type: application/octet-stream`` or
      ``application/x-npy``).
  The answer holds ``outputs`` (always with the batch axis) and, for a single
  (B, K) output, ``top_k`` (softmax probabilities; ``?top_k=0`` turns it off).

Bad requests get a 4xx with a one-line ``detail``: 400 unreadable body, 413 too
large (body, samples per request, image pixels per request), 415 wrong content
type, 422 wrong shape, dtype or values; 503 when too many large bodies are being
decoded. What one client can cost is bounded in :mod:`fxprune.serve.limits`
(decoding pools, budgets, the request-head timeout). Concurrent
requests are batched up to ``max_batch`` samples by one asyncio queue feeding one
model thread: whatever is queued while the model runs becomes the next batch.
SIGTERM (and Ctrl-C) finish the requests in flight and exit with status 0.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations
# (Request, Query) at runtime, and they are imported inside create_app.

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fxprune.errors import FxpruneError, UsageError
from fxprune.serve import limits
from fxprune.serve.artifact import Artifact, load_artifact
from fxprune.serve.batching import Batcher
from fxprune.serve.decode import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NPY_TYPES,
    RequestError,
    check_input,
    decode_body,
    decode_image,
    decode_request,
)
from fxprune.serve.limits import DecodePools

ENV_CONFIG = "FXPRUNE_SERVE_CONFIG"  # how uvicorn worker processes get the config


@dataclass
class ServeConfig:
    """What `fxprune serve` was asked to do (defaults that work on a laptop)."""

    artifact: Path
    host: str = "127.0.0.1"
    port: int = 8080
    max_batch: int = 8
    workers: int = 1
    max_body_mb: float = 16.0
    input_shape: tuple[int, ...] | None = None
    log_level: str = "warning"
    max_samples: int = 64  # per request; more get a 413
    request_timeout: float = 10.0  # seconds to send the request head

    def __post_init__(self) -> None:
        self.artifact = Path(self.artifact)
        if self.max_batch < 1:
            raise UsageError(f"--max-batch must be ≥ 1, not {self.max_batch}")
        if self.workers < 1:
            raise UsageError(f"--workers must be ≥ 1, not {self.workers}")
        if not self.max_body_mb > 0:
            raise UsageError(f"--max-body-mb must be > 0, not {self.max_body_mb}")
        if self.max_samples < 1:
            raise UsageError(f"--max-samples must be ≥ 1, not {self.max_samples}")
        if not 0 < self.request_timeout < 3600:
            raise UsageError(
                f"--request-timeout must be in (0, 3600) s, not {self.request_timeout}"
            )
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be in 0..65535, not {self.port}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


def require_serve_extra() -> None:
    """Raise a one-line FxpruneError if FastAPI/uvicorn are missing."""
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise FxpruneError(
            f"fxprune serve needs {' and '.join(missing)}: pip install 'fxprune[serve]'"
        )


# --------------------------------------------------------------------------- HTTP


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, or a 413 RequestError as soon as it exceeds ``limit`` bytes."""
    length = request.headers.get("content-length", "")
    too_large = RequestError(413, f"request body exceeds the {limit / 2**20:g} MiB limit "
                                  "(--max-body-mb)")  # fmt: skip
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def render_outputs(
    outputs: list[torch.Tensor], top_k: int, classes: list[str] | None = None
) -> dict[str, Any]:
    """The JSON answer: outputs (batch axis first) and top-k for a (B, K) classifier."""
    answer: dict[str, Any] = {"batch_size": len(outputs[0]) if outputs[0].ndim else 1}
    if len(outputs) == 1:
        answer |= {"outputs": _json_values(outputs[0]), "shape": list(outputs[0].shape)}
    else:
        answer["outputs"] = [_json_values(out) for out in outputs]
        answer["shapes"] = [list(out.shape) for out in outputs]
    logits = outputs[0]
    if top_k > 0 and len(outputs) == 1 and logits.ndim == 2 and logits.shape[1] > 1:
        probs = torch.softmax(logits.double(), dim=1)
        values, indices = probs.topk(min(top_k, logits.shape[1]), dim=1)
        answer["top_k"] = [
            [_ranked(int(i), float(p), classes) for p, i in zip(row_p, row_i, strict=True)]
            for row_p, row_i in zip(values, indices, strict=True)
        ]
    return answer


def _ranked(index: int, probability: float, classes: list[str] | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"index": index, "probability": probability}
    if classes and index < len(classes):
        entry["label"] = classes[index]
    return entry


def _json_values(tensor: torch.Tensor) -> Any:
    values = tensor.detach().float().cpu()
    if torch.isfinite(values).all():
        return values.tolist()
    # JSON has no NaN/Infinity: non-finite outputs become null
    return np.where(np.isfinite(values.numpy()), values.numpy(), None).tolist()


def create_app(artifact: Artifact, config: ServeConfig) -> Any:
    """The FastAPI application serving ``artifact`` (see the module docstring)."""
    from fastapi import FastAPI, Query, Request
    from fastapi.responses import JSONResponse

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher = Batcher(artifact, config.max_batch)
        task = asyncio.create_task(batcher.run_forever())
        app.state.batcher, app.state.pools = batcher, DecodePools()
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        batcher.close()
        app.state.pools.close()

    app = FastAPI(title="fxprune serve", version="1", lifespan=lifespan)

    @app.exception_handler(RequestError)
    async def request_error(_request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse({"detail": err.message}, status_code=err.status)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = asdict(app.state.batcher.stats)
        return {"status": "ok", "artifact": artifact.path.name, "format": artifact.format,
                "input_shape": list(artifact.input_shape), "fixed_batch": artifact.fixed_batch,
                "max_batch": config.max_batch, "threads": torch.get_num_threads(),
                "pid": os.getpid(), **stats}  # fmt: skip

    @app.get("/metadata")
    async def metadata() -> dict[str, Any]:
        return artifact.metadata

    @app.post("/predict")
    async def predict(
        request: Request,
        top_k: int = Query(5, ge=0, le=1000, description="Top-k classes (0: off)"),
    ) -> JSONResponse:
        body = await read_body(request, config.max_body_bytes)
        content_type = request.headers.get("content-type", "")
        array = await decode_request(
            app.state.pools, body, content_type, artifact, config.max_samples
        )
        try:
            outputs = await app.state.batcher.predict(torch.from_numpy(array))
        except RuntimeError as err:
            return JSONResponse({"detail": str(err)}, status_code=500)
        answer = render_outputs(outputs, top_k, artifact.metadata.get("classes"))
        return JSONResponse(answer)

    return app


def app_from_env() -> Any:
    """uvicorn factory for worker processes: the config travels in ``FXPRUNE_SERVE_CONFIG``."""
    raw = json.loads(os.environ[ENV_CONFIG])
    config = ServeConfig(**{**raw, "input_shape": tuple(raw["input_shape"] or ()) or None})
    limits.REQUEST_TIMEOUT_S = config.request_timeout
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.workers))
    return create_app(load_artifact(config.artifact, config.input_shape), config)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket, or a one-line FxpruneError (port in use, bad host)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise FxpruneError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.set_inheritable(True)
    return sock


@contextlib.contextmanager
def _signals_end_cleanly() -> Any:
    """uvicorn re-raises the SIGTERM/SIGINT it shut down for; make that a clean return."""
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in handled}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(config: ServeConfig, on_ready: Any = None) -> None:
    """Load the artifact, bind, call ``on_ready(url)``, serve until SIGTERM/SIGINT."""
    require_serve_extra()
    import uvicorn

    artifact = load_artifact(config.artifact, config.input_shape)  # fail before binding
    limits.REQUEST_TIMEOUT_S = config.request_timeout
    options = dict(log_level=config.log_level, access_log=False, timeout_graceful_shutdown=30,
                   http=limits.TIMED_H11, timeout_keep_alive=5)  # fmt: skip
    if config.workers > 1:
        _serve_workers(config, options, artifact, on_ready)
        return
    sock = bind_socket(config.host, config.port)
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(create_app(artifact, config), **options))
    if on_ready is not None:
        on_ready(f"http://{host}:{port}", artifact)
    with sock, _signals_end_cleanly():
        server.run(sockets=[sock])


def _serve_workers(config: ServeConfig, options: dict, artifact: Artifact, on_ready: Any) -> None:
    """uvicorn's process supervisor: it binds the port itself, and each worker process
    rebuilds the app with :func:`app_from_env`."""
    import uvicorn

    if config.port == 0:
        raise UsageError("--port 0 (any free port) needs --workers 1: give a port number")
    bind_socket(config.host, config.port).close()  # a busy port fails here, in one line
    os.environ[ENV_CONFIG] = json.dumps(asdict(config), default=str)
    if on_ready is not None:
        on_ready(f"http://{config.host}:{config.port}", artifact)
    with _signals_end_cleanly():
        uvicorn.run(f"{__name__}:app_from_env", factory=True, host=config.host,
                    port=config.port, workers=config.workers, **options)  # fmt: skip


__all__ = [
    "Artifact",
    "ENV_CONFIG",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NPY_TYPES",
    "RequestError",
    "ServeConfig",
    "app_from_env",
    "bind_socket",
    "check_input",
    "create_app",
    "decode_body",
    "decode_image",
    "load_artifact",
    "read_body",
    "render_outputs",
    "require_serve_extra",
    "serve",
]
