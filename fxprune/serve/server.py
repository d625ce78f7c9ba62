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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fxprune.errors import ExportError, FxpruneError, UsageError, describe
from fxprune.export import METADATA_NAME
from fxprune.export.metadata import quiet_torch
from fxprune.load import check_input_shape
from fxprune.serve import limits
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
from fxprune.verify import flatten_outputs

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


# --------------------------------------------------------------------------- the artifact


@dataclass
class Artifact:
    """A loaded TorchScript or .pt2 artifact with what the server needs to feed it."""

    path: Path
    format: str  # "torchscript" | "pt2"
    module: Any
    metadata: dict[str, Any]
    input_shape: tuple[int, ...]  # (N, C, H, W) the artifact was exported with
    fixed_batch: int | None  # None: any batch size; else inputs must come in chunks of it
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.input_shape[1:]

    def run(self, x: torch.Tensor) -> list[torch.Tensor]:
        """All output tensors for the batch ``x`` (chunked for fixed-batch artifacts)."""
        with torch.inference_mode():
            if self.fixed_batch is None:
                return flatten_outputs(self.module(x))
            chunks = [flatten_outputs(self.module(c)) for c in x.split(self.fixed_batch)]
            return [torch.cat(parts) for parts in zip(*chunks, strict=True)]


def load_artifact(path: Path, input_shape: tuple[int, ...] | None = None) -> Artifact:
    """Load ``path`` (.pt2 via torch.export, anything else as TorchScript) for serving.

    The input shape comes from ``input_shape`` or the embedded metadata. A probe with
    a batch of two tells whether the artifact accepts other batch sizes.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such artifact file (write one with fxprune compile)")
    fmt = "pt2" if path.suffix == ".pt2" else "torchscript"
    module, metadata = _load_pt2(path) if fmt == "pt2" else _load_torchscript(path)
    if not (input_shape or metadata.get("input_shape")):
        raise UsageError(f"{path} records no input shape (no fxprune.json): pass --input-shape")
    shape = input_shape or check_input_shape(metadata["input_shape"], f"{path}'s input_shape")
    pre = metadata.get("preprocessing") or {}
    artifact = Artifact(path, fmt, module, metadata, shape, None)
    artifact.mean = tuple(pre.get("mean", IMAGENET_MEAN))
    artifact.std = tuple(pre.get("std", IMAGENET_STD))
    artifact.fixed_batch = _probe_fixed_batch(artifact)
    return artifact


def _load_torchscript(path: Path) -> tuple[Any, dict[str, Any]]:
    extra = {METADATA_NAME: ""}
    try:
        with quiet_torch():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as err:
        raise ExportError(f"{path} is not a loadable TorchScript file: {describe(err)}") from None
    raw = extra[METADATA_NAME]
    raw = raw.decode() if isinstance(raw, bytes) else raw
    return module.eval(), _metadata(path, raw)


def _load_pt2(path: Path) -> tuple[Any, dict[str, Any]]:
    extra = {METADATA_NAME: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as err:
        raise ExportError(f"{path} is not a loadable torch.export file: {describe(err)}") from None
    return program.module(), _metadata(path, extra[METADATA_NAME])


def _metadata(path: Path, raw: str | bytes) -> dict[str, Any]:
    """The embedded fxprune.json as a dict ({} when absent), or a one-line ExportError."""
    try:
        metadata = json.loads(raw) if raw else {}
    except (ValueError, RecursionError) as err:
        raise ExportError(
            f"{path}: its {METADATA_NAME} is not valid JSON: {describe(err)}"
        ) from None
    if not isinstance(metadata, dict):
        raise ExportError(f"{path}: its {METADATA_NAME} is not a JSON object")
    return metadata


def _probe_fixed_batch(artifact: Artifact) -> int | None:
    """None if a batch of two equals two single runs, else the exported batch size."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(artifact.input_shape, generator=gen)
    try:
        artifact.run(base)
    except Exception as err:
        raise ExportError(
            f"{artifact.path} does not run on its input shape {artifact.input_shape}: "
            f"{describe(err)}"
        ) from None
    pair = torch.randn((2, *artifact.sample_shape), generator=gen)
    try:
        together = artifact.run(pair)
        alone = [torch.cat(parts) for parts in zip(*map(artifact.run, pair.split(1)), strict=True)]
        same = all(
            torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(together, alone, strict=True)
        )
    except Exception:  # static shapes (torch.export, traced views): keep the exported batch
        same = False
    return None if same else artifact.input_shape[0]


# --------------------------------------------------------------------------- batching


@dataclass
class _Job:
    inputs: torch.Tensor
    future: asyncio.Future


@dataclass
class BatchStats:
    requests: int = 0
    batches: int = 0
    largest_batch: int = 0


class Batcher:
    """One asyncio queue, one model thread: queued requests are run together up to
    ``max_batch`` samples (a request larger than that runs alone)."""

    def __init__(self, artifact: Artifact, max_batch: int) -> None:
        self.artifact, self.max_batch = artifact, max_batch
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="fxprune-model")
        self.stats = BatchStats()
        self._carry: _Job | None = None

    async def predict(self, inputs: torch.Tensor) -> list[torch.Tensor]:
        job = _Job(inputs, asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        return await job.future

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [self._carry or await self.queue.get()]
            self._carry = None
            size = len(jobs[0].inputs)
            while not self.queue.empty():
                job = self.queue.get_nowait()
                if size + len(job.inputs) > self.max_batch:
                    self._carry = job
                    break
                jobs.append(job)
                size += len(job.inputs)
            results = await loop.run_in_executor(self.executor, self._run, jobs)
            for job, result in zip(jobs, results, strict=True):
                if job.future.done():  # the client went away
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
            self.stats.batches += 1
            self.stats.requests += len(jobs)
            self.stats.largest_batch = max(self.stats.largest_batch, size)

    def _run(self, jobs: list[_Job]) -> list[list[torch.Tensor] | BaseException]:
        """Run the jobs as one batch; if that fails, alone, so one bad input fails alone."""
        sizes = [len(job.inputs) for job in jobs]
        try:
            outputs = self.artifact.run(torch.cat([job.inputs for job in jobs]))
            split = [out.split(sizes) for out in outputs]
            return [[parts[i] for parts in split] for i in range(len(jobs))]
        except Exception:
            if len(jobs) == 1:
                return [self._run_alone(jobs[0])]
            return [self._run_alone(job) for job in jobs]

    def _run_alone(self, job: _Job) -> list[torch.Tensor] | BaseException:
        try:
            return self.artifact.run(job.inputs)
        except Exception as err:
            return RuntimeError(f"the model failed on this input: {describe(err)}")

    def close(self) -> None:
        pending = [self._carry] if self._carry else []
        while not self.queue.empty():
            pending.append(self.queue.get_nowait())
        for job in pending:
            if not job.future.done():
                job.future.set_exception(RuntimeError("server is shutting down"))
        self.executor.shutdown(wait=True)


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
    "BatchStats",
    "Batcher",
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
