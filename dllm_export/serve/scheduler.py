"""One model, one worker thread, batches of requests that share sampler settings.

The artifact's fixed batch is the unit: the worker takes the oldest waiting request and
every other waiting one with identical sampler settings (up to ``max_batch``), waits
``batch_wait`` seconds for more to arrive when the batch is not full, and runs them as the
rows of one ``denoise`` call. After every step each row's committed prefix goes to its
request (streaming). A bounded queue of waiting requests refuses more (429). A request that
is cancelled (its timeout, or its client gone) leaves the queue at once; in a running
batch its row is dropped from the stream, and the batch stops at the next step once every
row in it is cancelled.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from dllm_export import families
from dllm_export.errors import DllmExportError
from dllm_export.runtime import Generator, denoise
from dllm_export.serve.protocol import ApiError, ParsedRequest


class QueueFull(Exception):
    pass


class _Stopped(Exception):
    """Raised from the step callback when every row of the batch was cancelled."""


@dataclass
class Job:
    request: ParsedRequest
    deliver: callable  # deliver(event: tuple) from the worker thread, thread-safe
    arrived: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    last: list = field(default_factory=list)  # committed prefix tokens last delivered

    def cancel(self):
        self.cancelled.set()


@dataclass
class BatchStats:
    rows: int
    forwards: int
    tokens: int
    seconds: float
    step_seconds: list


class Scheduler:
    """Owns the Generator; ``submit`` is called from the event loop, the rest runs in a thread."""

    def __init__(self, generator: Generator, max_batch: int, max_queue: int,
                 batch_wait: float = 0.01, on_batch=None, on_queue=None):
        self.generator = generator
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batch_wait = batch_wait
        self.on_batch = on_batch or (lambda stats: None)
        self.on_queue = on_queue or (lambda depth: None)
        self.family = families.family(generator.family)
        self.waiting: deque[Job] = deque()
        self.running = 0
        self.lock = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._work, name="dllm-serve-worker", daemon=True)

    def start(self):
        self.thread.start()

    def close(self):
        with self.lock:
            self.closed = True
            self.lock.notify_all()
        self.thread.join(timeout=30)

    @property
    def depth(self) -> int:
        return len(self.waiting)

    def submit(self, job: Job) -> None:
        with self.lock:
            self._drop_cancelled()
            if len(self.waiting) >= self.max_queue:
                raise QueueFull
            self.waiting.append(job)
            self.on_queue(len(self.waiting))
            self.lock.notify_all()

    def _drop_cancelled(self):
        if any(j.cancelled.is_set() for j in self.waiting):
            self.waiting = deque(j for j in self.waiting if not j.cancelled.is_set())
            self.on_queue(len(self.waiting))

    def _take_batch(self) -> list[Job]:
        """Wait for work; the oldest request and those that can share its batch."""
        with self.lock:
            while True:
                self._drop_cancelled()
                if self.closed:
                    return []
                if self.waiting:
                    break
                self.lock.wait(timeout=0.5)
            key = self.waiting[0].request.batch_key
            deadline = time.monotonic() + self.batch_wait
            while True:
                batch = [j for j in self.waiting if j.request.batch_key == key][: self.max_batch]
                left = deadline - time.monotonic()
                if len(batch) >= self.max_batch or left <= 0 or self.closed:
                    break
                self.lock.wait(timeout=left)
                self._drop_cancelled()
                if not any(j.request.batch_key == key for j in self.waiting):
                    return []
            for job in batch:
                self.waiting.remove(job)
            self.on_queue(len(self.waiting))
            return batch

    def _work(self):
        while True:
            batch = self._take_batch()
            if not batch:
                if self.closed:
                    return
                continue
            self.running = len(batch)
            try:
                self._run(batch)
            except _Stopped:
                pass
            except DllmExportError as err:
                for job in batch:
                    job.deliver(("error", ApiError(400, str(err))))
            except Exception as err:  # a bug: answer 500 rather than hang the clients
                for job in batch:
                    job.deliver(("error", ApiError(500, f"{type(err).__name__}: {err}",
                                                   kind="server_error")))
            finally:
                self.running = 0

    def _run(self, batch: list[Job]):
        gen = self.generator
        config = batch[0].request.config
        mask = gen.special.mask_id
        streaming = [j for j in batch if j.request.stream]

        def on_step(info):
            if all(j.cancelled.is_set() for j in batch):
                raise _Stopped
            if not streaming:
                return
            answer = info.canvas[:, info.canvas.shape[1] - config.gen_length:]
            for row, job in enumerate(batch):
                if not job.request.stream or job.cancelled.is_set():
                    continue
                generated = answer[row]
                masked = generated == mask
                ready = generated[: masked.argmax()] if masked.any() else generated
                tokens = gen.answer_tokens(ready)
                if len(tokens) > len(job.last):
                    job.last = tokens
                    job.deliver(("tokens", tokens))

        result = denoise(gen.backend, [j.request.prompt_ids for j in batch], config,
                         gen.special, on_step=on_step, family=self.family)
        rows = [gen.answer_tokens(r[result.prompt_length:]) for r in result.sequences]
        stats = BatchStats(rows=len(batch), forwards=result.forwards,
                           tokens=sum(min(len(r), j.request.max_tokens)
                                      for r, j in zip(rows, batch, strict=True)),
                           seconds=result.seconds, step_seconds=list(result.step_seconds))
        self.on_batch(stats)
        for job, tokens in zip(batch, rows, strict=True):
            if not job.cancelled.is_set():
                job.deliver(("done", tokens, result.forwards, config.gen_length))
