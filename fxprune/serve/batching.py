"""Concurrent requests batched: one asyncio queue feeding one model thread;
whatever is queued while the model runs becomes the next batch (up to
`max_batch` samples, or the artifact's fixed batch)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from fxprune.errors import describe
from fxprune.serve.artifact import Artifact


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


__all__ = ["BatchStats", "Batcher"]
