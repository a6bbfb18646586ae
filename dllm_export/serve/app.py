"""The OpenAI-compatible HTTP API (FastAPI) over one ``Generator`` and its ``Scheduler``.

``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream``:
server-sent events in OpenAI's chunk format, carrying the committed prefix as it grows),
``GET /health``, ``GET /metrics`` (Prometheus text). Errors are OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from dllm_export.runtime import Generator
from dllm_export.serve.protocol import (
    ApiError,
    ParsedRequest,
    chunk_body,
    parse_request,
    response_body,
    usage,
)
from dllm_export.serve.scheduler import BatchStats, Job, QueueFull, Scheduler
from dllm_export.serve.text import AnswerText


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dllm_requests", "HTTP requests answered", ["path", "status"],
                                registry=r)
        self.queue_depth = Gauge("dllm_queue_depth", "Requests waiting for a batch", registry=r)
        self.running = Gauge("dllm_running_requests", "Rows of the batch now denoising",
                             registry=r)
        self.tokens = Counter("dllm_generated_tokens", "Answer tokens generated", registry=r)
        self.forwards = Counter("dllm_forwards", "Denoiser forward passes", registry=r)
        self.tokens_per_second = Gauge(
            "dllm_tokens_per_second", "Answer tokens per second of the last batch", registry=r)
        self.step_seconds = Histogram(
            "dllm_step_seconds", "Wall time of one denoising step (all rows of a batch)",
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5), registry=r)
        self.batch_rows = Histogram("dllm_batch_rows", "Requests per denoise call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.request_seconds = Histogram(
            "dllm_request_seconds", "Time from arrival to the last byte of a generation",
            buckets=(.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)

    def batch(self, stats: BatchStats):
        self.tokens.inc(stats.tokens)
        self.forwards.inc(stats.forwards)
        self.batch_rows.observe(stats.rows)
        if stats.seconds:
            self.tokens_per_second.set(stats.tokens / stats.seconds)
        for seconds in stats.step_seconds:
            self.step_seconds.observe(seconds)


def _finish_reason(tokens: list[int], max_tokens: int, gen_length: int) -> str:
    """"length" when the answer was cut or filled the canvas without an end token."""
    return "length" if len(tokens) > max_tokens or len(tokens) >= gen_length else "stop"


async def _wait_disconnect(request: Request):
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _next_event(events: asyncio.Queue, deadline: float, disconnect: asyncio.Task):
    """The worker's next event, or ("disconnect",) / ("timeout",)."""
    get = asyncio.ensure_future(events.get())
    done, _ = await asyncio.wait({get, disconnect}, timeout=max(deadline - time.monotonic(), 0),
                                 return_when=asyncio.FIRST_COMPLETED)
    if get in done:
        return get.result()
    get.cancel()
    return ("disconnect",) if disconnect in done else ("timeout",)


ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


def _sse(body) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def create_app(generator: Generator, model_name: str, max_batch: int, max_queue: int,
               timeout: float, batch_wait: float = 0.01) -> FastAPI:
    """The app over a loaded Generator; the worker starts with the app and stops with it."""
    metrics = Metrics()
    scheduler = Scheduler(generator, max_batch, max_queue, batch_wait,
                          on_batch=metrics.batch, on_queue=metrics.queue_depth.set)

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.close()

    app = FastAPI(title="dllm-export", lifespan=lifespan)
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    timeout_message = (f"the request ran past the server's --timeout {timeout:g} s and was "
                       "cancelled; ask for fewer tokens or retry later")

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        path = request.url.path if request.url.path in ROUTES else "other"
        metrics.requests.labels(path, str(response.status_code)).inc()
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "queue_depth": scheduler.depth,
                "running": scheduler.running, "max_batch": max_batch, "max_queue": max_queue}

    @app.get("/metrics")
    async def metrics_text():
        metrics.running.set(scheduler.running)
        metrics.queue_depth.set(scheduler.depth)
        return PlainTextResponse(generate_latest(metrics.registry),
                                 media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": 0, "owned_by": "dllm-export"}]}

    async def handle(request: Request, kind: str):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(400, f"request body: not valid JSON ({err})") from None
        parsed = parse_request(generator, model_name, body, kind)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        def deliver(event):  # from the worker thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop has closed (shutdown): nobody is waiting
                pass

        job = Job(parsed, deliver)
        try:
            scheduler.submit(job)
        except QueueFull:
            raise ApiError(429, f"the queue is full ({max_queue} waiting requests, the "
                                "server's --max-queue); retry later", None, "queue_full",
                           "rate_limit_error") from None
        deadline = job.arrived + timeout
        if parsed.stream:
            return StreamingResponse(_stream(request, parsed, job, events, deadline),
                                     media_type="text/event-stream")
        disconnect = asyncio.ensure_future(_wait_disconnect(request))
        try:
            event = await _next_event(events, deadline, disconnect)
        finally:
            disconnect.cancel()
        if event[0] != "done":
            job.cancel()
        if event[0] == "timeout":
            raise ApiError(504, timeout_message, None, "timeout", "timeout_error")
        if event[0] == "disconnect":
            return JSONResponse({}, status_code=499)  # nobody reads it
        if event[0] == "error":
            raise event[1]
        _, tokens, forwards, gen_length = event
        text = AnswerText(generator.tokenizer.decode, parsed.stop, parsed.max_tokens)
        text.update(tokens, final=True)
        finish = text.finish or _finish_reason(tokens, parsed.max_tokens, gen_length)
        metrics.request_seconds.observe(time.monotonic() - job.arrived)
        return response_body(parsed, text.sent, finish,
                             usage(parsed, min(len(tokens), parsed.max_tokens), forwards))

    async def _stream(request: Request, parsed: ParsedRequest, job: Job,
                      events: asyncio.Queue, deadline: float):
        text = AnswerText(generator.tokenizer.decode, parsed.stop, parsed.max_tokens)
        disconnect = asyncio.ensure_future(_wait_disconnect(request))
        first = parsed.kind == "chat"
        steps = 0

        def end(finish, completion, forwards):
            out = [_sse(chunk_body(parsed, None, finish))]
            if parsed.include_usage:
                out.append(_sse(chunk_body(parsed, None, usage_=usage(parsed, completion,
                                                                       forwards))))
            out.append("data: [DONE]\n\n")
            metrics.request_seconds.observe(time.monotonic() - job.arrived)
            return "".join(out)

        try:
            if first:  # OpenAI's first chat chunk carries the role
                yield _sse(chunk_body(parsed, "", first=True))
            while True:
                event = await _next_event(events, deadline, disconnect)
                if event[0] == "tokens":
                    steps += 1
                    delta = text.update(event[1])
                    if delta:
                        yield _sse(chunk_body(parsed, delta))
                    if text.finish:  # a stop sequence: the rest is not wanted
                        job.cancel()
                        yield end("stop", min(len(event[1]), parsed.max_tokens), steps)
                        return
                elif event[0] == "done":
                    _, tokens, forwards, gen_length = event
                    delta = text.update(tokens, final=True)
                    if delta:
                        yield _sse(chunk_body(parsed, delta))
                    finish = text.finish or _finish_reason(tokens, parsed.max_tokens, gen_length)
                    yield end(finish, min(len(tokens), parsed.max_tokens), forwards)
                    return
                elif event[0] == "error":
                    yield _sse(event[1].body())
                    return
                elif event[0] == "timeout":
                    job.cancel()
                    yield _sse(ApiError(504, timeout_message, None, "timeout",
                                        "timeout_error").body())
                    return
                else:  # the client went away
                    job.cancel()
                    return
        finally:
            job.cancel()  # a no-op once done; frees the row when the client left mid-stream
            disconnect.cancel()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, "chat")

    return app


def serve(source: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int | None = None,
          max_queue: int = 64, timeout: float = 120.0, batch_wait: float = 0.01,
          model_name: str | None = None, provider: str = "cpu", threads: int | None = None):
    """Load the model once and run uvicorn until interrupted."""
    from pathlib import Path

    import uvicorn

    from dllm_export.errors import DllmExportError, check_at_least

    path = Path(source)
    if (path / "manifest.json").is_file():
        from dllm_export.jsonio import read_json
        from dllm_export.runtime.artifact import refuse_own_layout

        refuse_own_layout(read_json(path / "manifest.json"), path, "serve")
        generator = Generator.from_artifact(path, provider=provider, threads=threads)
    elif (path / "config.json").is_file():
        generator = Generator.from_checkpoint(path)
    else:
        raise DllmExportError(f"{source}: neither an artifact or engine (manifest.json) nor a "
                              "checkpoint (config.json)")
    fixed = generator.backend.batch_size
    if max_batch is None:
        max_batch = fixed or 1
    check_at_least("--max-batch", max_batch, 1, 4096)
    check_at_least("--max-queue", max_queue, 1, 1 << 20)
    if fixed is not None and max_batch > fixed:
        raise DllmExportError(f"--max-batch {max_batch}: {source} runs batches of at most "
                              f"{fixed}; lower it or re-export with --batch {max_batch}")
    if not timeout > 0:
        raise DllmExportError(f"--timeout {timeout}: must be > 0 seconds")
    app = create_app(generator, model_name or path.resolve().name, max_batch, max_queue,
                     timeout, batch_wait)
    uvicorn.run(app, host=host, port=port, log_level="warning")
