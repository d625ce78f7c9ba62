"""What one client can cost `fxprune serve`: decoding pools, request budgets, timeouts.

- Decoding runs in two bounded thread pools of its own, never in asyncio's default
  pool: small bodies (a normal request) in the *light* pool, large bodies and every
  image in the *heavy* pool. A flood of heavy requests therefore cannot delay a
  normal one, and more than `HEAVY_QUEUE` heavy requests waiting get a 503.
- Per request: at most `max_samples` samples and `MAX_REQUEST_PIXELS` decoded image
  pixels (all images together), both checked from headers before anything is decoded.
- A connection must deliver its request line and headers within `request_timeout`
  seconds of connecting (or of its previous response); otherwise it is closed. Idle
  keep-alive connections are closed by uvicorn's `timeout_keep_alive`.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "HEAVY_QUEUE",
    "LIGHT_BODY_BYTES",
    "MAX_REQUEST_PIXELS",
    "DecodePools",
    "Overloaded",
    "TIMED_H11",
    "TimedH11Protocol",
    "npy_header",
]

MAX_REQUEST_PIXELS = 40_000_000  # decoded image pixels per request, all images together
LIGHT_BODY_BYTES = 256 * 1024  # bodies up to this size (and not images) decode in the light pool
HEAVY_QUEUE = 8  # heavy decodes waiting or running; more get a 503
REQUEST_TIMEOUT_S = 10.0  # set by serve() / app_from_env() before the server starts

T = TypeVar("T")


class Overloaded(Exception):
    """Too many heavy requests are being decoded: the caller answers 503."""


class DecodePools:
    """Two bounded decoding pools (light: small bodies; heavy: large bodies and images)."""

    def __init__(self, light_threads: int = 2, heavy_threads: int = 1) -> None:
        self.light = ThreadPoolExecutor(light_threads, thread_name_prefix="fxprune-decode")
        self.heavy = ThreadPoolExecutor(heavy_threads, thread_name_prefix="fxprune-decode-big")
        self.heavy_jobs = 0

    async def run(self, heavy: bool, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the light or heavy pool; Overloaded when the heavy queue is full."""
        loop = asyncio.get_running_loop()
        if not heavy:
            return await loop.run_in_executor(self.light, fn, *args)
        if self.heavy_jobs >= HEAVY_QUEUE:
            raise Overloaded(f"{self.heavy_jobs} large requests are being decoded: retry later")
        self.heavy_jobs += 1
        try:
            return await loop.run_in_executor(self.heavy, fn, *args)
        finally:
            self.heavy_jobs -= 1

    def close(self) -> None:
        self.light.shutdown(wait=True, cancel_futures=True)
        self.heavy.shutdown(wait=True, cancel_futures=True)


def npy_header(body: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset from a .npy header, without reading the data.

    Raises ValueError (the caller's 400) when the header is unreadable or claims more
    (or less) data than the body holds — e.g. a (1000000, 1000000) header on 1 KB.
    """
    stream = io.BytesIO(body)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    del fortran
    if dtype.hasobject:
        raise TypeError("the .npy holds Python objects")
    offset = stream.tell()
    expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if expected != len(body) - offset:
        raise ValueError(
            f"the header claims shape {tuple(shape)} of {dtype} ({expected} bytes), "
            f"the body holds {len(body) - offset}"
        )
    return tuple(shape), dtype, offset


try:  # the serve extra: without it `fxprune serve` stops earlier, with one line
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError:  # pragma: no cover - exercised only without the extra
    H11Protocol = object  # type: ignore[assignment,misc]

TIMED_H11 = f"{__name__}:TimedH11Protocol"  # uvicorn's `http=`: importable in worker processes too


class TimedH11Protocol(H11Protocol):  # type: ignore[misc,valid-type]
    """uvicorn's h11 protocol with a request-head deadline (`REQUEST_TIMEOUT_S`).

    uvicorn times out idle keep-alive connections, but not a connection that was
    opened (or sent half its headers) and then went quiet: such connections were held
    forever. Here a timer runs from the connection (and from each response) until a
    complete request head has arrived; when it fires the connection is closed.
    """

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request head is complete
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        if not self.transport.is_closing():
            self._head_timer = self.loop.call_later(REQUEST_TIMEOUT_S, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()
