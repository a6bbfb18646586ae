"""dllm-export serve: a real uvicorn process on 127.0.0.1 over a tiny exported artifact,
queried with real HTTP clients (httpx and the openai package).

Parity: at temperature 0 the server's answers are the Generator's for the same prompt and
settings, alone and when concurrent requests share one denoise call."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from dllm_export.serve.text import AnswerText

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN, BATCH = 64, 4
# the settings every parity request uses (max_tokens 16 in blocks of 8, 16 steps)
SETTINGS = {"max_tokens": 16, "temperature": 0, "dllm": {"block_length": 8, "steps": 16}}
GEN = {"gen_length": 16, "block_length": 8, "steps": 16, "temperature": 0.0}
PROMPTS = ["Hello there", "The capital of France is", "1 2 3 4", "sort: 9 3 5"]
# a request that denoises for minutes unless cancelled (every step is a forward)
LONG = {"max_tokens": 16, "dllm": {"block_length": 16, "steps": 1 << 17}}


# ------------------------------------------------------------------ unit: the streamed text


def _decode(ids):
    return "".join(chr(i) for i in ids)


def test_answer_text_holds_back_a_possible_stop_and_cuts_before_it():
    text = AnswerText(_decode, ["END"], max_tokens=100)
    assert text.update([ord(c) for c in "abE"]) == "ab"  # "E" may start "END"
    assert text.update([ord(c) for c in "abEx"]) == "Ex"  # it did not
    assert text.update([ord(c) for c in "abExEN"]) == ""
    assert text.update([ord(c) for c in "abExENDyy"]) == ""
    assert text.sent == "abEx" and text.finish == "stop"


def test_answer_text_only_extends_and_caps_at_max_tokens():
    text = AnswerText(_decode, [], max_tokens=3)
    assert text.update([97, 0xFFFD]) == "a"  # an incomplete character waits
    assert text.update([97, 98, 99, 100], final=True) == "bc"
    assert text.sent == "abc" and text.finish is None


# ------------------------------------------------------------------ the server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def _server(artifact, *options):
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-m", "dllm_export.cli", "serve", str(artifact), "--port", str(port),
         "--threads", "1", *options], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=env, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited {proc.returncode}: {proc.stdout.read()}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("server did not answer /health in 120 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    """A tiny LLaDA-MoE artifact of batch 4 (canvas 48) and its Generator."""
    from dllm_export.export.onnx import ExportOptions, export_model
    from dllm_export.runtime import Generator

    out = tmp_path_factory.mktemp("serve") / "tiny-b4"
    export_model(tiny_dir("llada-moe"), out, ExportOptions(seq_len=SEQ_LEN, batch=BATCH))
    return out, Generator.from_artifact(out, threads=1)


@pytest.fixture(scope="module")
def server(served):
    with _server(served[0], "--batch-wait", "0.5") as url:
        yield url


def _client(url):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def _expected(gen, prompt, chat=False):
    out = gen.generate(prompt, chat=chat, **GEN)
    return out.texts[0], len(out.tokens[0]), out.forwards


def _metric(url, name, **labels) -> float:
    """A sample of /metrics, parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return sample.value
    raise AssertionError(f"{name} {labels} not in /metrics")


def _wait_for(url, key, value, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        health = httpx.get(url + "/health").json()
        if health[key] == value:
            return health
        time.sleep(0.05)
    raise AssertionError(f"/health {key} never became {value}: {health}")


@pytest.mark.slow
def test_completions_and_chat_equal_the_generator(served, server):
    _, gen = served
    client = _client(server)
    model = client.models.list().data[0].id
    assert model == "tiny-b4"
    for prompt in PROMPTS[:2]:
        text, count, forwards = _expected(gen, prompt)
        reply = client.completions.create(model=model, prompt=prompt, max_tokens=16,
                                          temperature=0,
                                          extra_body={"dllm": SETTINGS["dllm"]})
        assert reply.choices[0].text == text
        assert reply.usage.completion_tokens == count
        assert reply.usage.prompt_tokens == len(gen.encode(prompt, chat=False))
        extra = reply.usage.model_dump()
        assert extra["forwards"] == forwards
        assert extra["tokens_per_forward"] == pytest.approx(count / forwards, abs=1e-4)
    messages = [{"role": "user", "content": "Hi, who are you?"}]
    text, count, _ = _expected(gen, messages, chat=True)
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=16,
                                           temperature=0, extra_body={"dllm": SETTINGS["dllm"]})
    assert reply.choices[0].message.content == text
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens == count


@pytest.mark.slow
def test_streamed_chunks_concatenate_to_the_answer(served, server):
    _, gen = served
    client = _client(server)
    messages = [{"role": "user", "content": "Tell me a story"}]
    whole = client.chat.completions.create(model="tiny-b4", messages=messages, max_tokens=16,
                                           temperature=0, extra_body={"dllm": SETTINGS["dllm"]})
    stream = client.chat.completions.create(
        model="tiny-b4", messages=messages, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"dllm": SETTINGS["dllm"]})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == whole.choices[0].message.content == _expected(gen, messages, True)[0]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
        whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # completions, over raw SSE with httpx
    body = {"model": "tiny-b4", "prompt": PROMPTS[2], "stream": True, **SETTINGS}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(e["object"] == "text_completion" for e in events)
    assert "".join(e["choices"][0]["text"] for e in events) == _expected(gen, PROMPTS[2])[0]


@pytest.mark.slow
def test_concurrent_clients_share_a_denoise_call_and_keep_their_answers(served, server):
    _, gen = served
    client = _client(server)
    batches_before = _metric(server, "dllm_batch_rows_count")
    rows_before = _metric(server, "dllm_batch_rows_sum")
    results = {}

    def ask(prompt):
        reply = client.completions.create(model="tiny-b4", prompt=prompt, max_tokens=16,
                                          temperature=0, extra_body={"dllm": SETTINGS["dllm"]})
        results[prompt] = reply.choices[0].text

    threads = [threading.Thread(target=ask, args=(p,)) for p in PROMPTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for prompt in PROMPTS:
        assert results[prompt] == _expected(gen, prompt)[0], prompt
    batches = _metric(server, "dllm_batch_rows_count") - batches_before
    rows = _metric(server, "dllm_batch_rows_sum") - rows_before
    assert rows == len(PROMPTS)
    assert batches < len(PROMPTS)  # some requests ran as rows of one call
    assert _metric(server, "dllm_generated_tokens_total") > 0
    assert _metric(server, "dllm_step_seconds_count") > 0
    assert _metric(server, "dllm_queue_depth") == 0
    assert _metric(server, "dllm_requests_total", path="/v1/completions",
                   status="200") >= len(PROMPTS)


@pytest.mark.slow
def test_bad_requests_get_the_openai_error_shape(server):
    openai = pytest.importorskip("openai")
    client = _client(server)

    def error(body, path="/v1/completions", status=400):
        response = httpx.post(server + path, json=body, timeout=30)
        assert response.status_code == status, response.text
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        return err

    base = {"model": "tiny-b4", "prompt": "hi", **SETTINGS}
    assert error({**base, "model": "gpt-4"}, status=404)["code"] == "model_not_found"
    assert error({**base, "n": 2})["param"] == "n"
    assert error({**base, "logprobs": 3})["param"] == "logprobs"
    assert "n 2" in error({**base, "n": 2})["message"]
    err = error({**base, "dllm": {"threshold": 0.9, "temperatur": 1}})
    assert err["param"] == "dllm.temperatur" and "dllm.temperatur" in err["message"]
    assert error({**base, "top_p": 0.5})["param"] == "top_p"
    assert error({**base, "best_of": 3})["param"] == "best_of"
    assert error({**base, "frobnicate": 1})["param"] == "frobnicate"
    err = error({**base, "prompt": "word " * 80})
    assert err["code"] == "context_length_exceeded" and "canvas fits 48" in err["message"]
    assert "max_tokens 64" in error({**base, "max_tokens": 64})["message"]
    assert "dllm.steps" in error({**base, "dllm": {"block_length": 8, "steps": 3}})["message"]
    chat = {"model": "tiny-b4", "messages": [{"role": "user", "content": "hi"}], **SETTINGS}
    assert error({**chat, "tools": [{"type": "function"}]}, "/v1/chat/completions")["param"] == "tools"
    assert error({**chat, "messages": []}, "/v1/chat/completions")["param"] == "messages"
    response = httpx.post(server + "/v1/completions", content=b"{not json", timeout=30)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="n 2"):
        client.completions.create(model="tiny-b4", prompt="hi", n=2, max_tokens=16)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=16)


@pytest.mark.slow
def test_a_full_queue_answers_429_and_a_disconnect_frees_the_slot(served):
    with _server(served[0], "--max-batch", "1", "--max-queue", "1") as url:
        body = {"model": "tiny-b4", "prompt": "hi", **LONG}
        first = httpx.Client(timeout=300)
        streaming = first.stream("POST", url + "/v1/completions", json={**body, "stream": True})
        streaming.__enter__()
        _wait_for(url, "running", 1)
        waiting = threading.Thread(target=lambda: _swallow(httpx.post, url + "/v1/completions",
                                                            json=body, timeout=10))
        waiting.start()  # waits in the queue
        _wait_for(url, "queue_depth", 1)
        response = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert response.status_code == 429
        assert response.json()["error"]["code"] == "queue_full"
        assert response.json()["error"]["type"] == "rate_limit_error"
        streaming.__exit__(None, None, None)  # the streaming client leaves mid-generation
        first.close()
        # its batch stops at the next step (it had minutes to go) and the waiting one runs
        _wait_for(url, "queue_depth", 0, seconds=8)
        assert httpx.get(url + "/health").json()["running"] == 1
        waiting.join()  # that client gives up after 10 s: its running batch stops too
        _wait_for(url, "running", 0, seconds=30)
        short = {"model": "tiny-b4", "prompt": "hi", **SETTINGS}
        assert httpx.post(url + "/v1/completions", json=short, timeout=60).status_code == 200


def _swallow(call, *args, **kwargs):
    try:
        call(*args, **kwargs)
    except httpx.TimeoutException:
        pass


@pytest.mark.slow
def test_a_request_past_the_timeout_is_cancelled(served):
    with _server(served[0], "--timeout", "1.5") as url:
        body = {"model": "tiny-b4", "prompt": "hi", **LONG}
        started = time.monotonic()
        response = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "timeout"
        assert time.monotonic() - started < 30
        _wait_for(url, "running", 0, seconds=30)
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, json={
                "model": "tiny-b4", "messages": [{"role": "user", "content": "hi"}],
                "stream": True, **LONG}) as stream:
            events = [json.loads(line[6:]) for line in stream.iter_lines()
                      if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "timeout"
        _wait_for(url, "running", 0, seconds=30)
        short = {"model": "tiny-b4", "prompt": "hi", **SETTINGS}
        assert httpx.post(url + "/v1/completions", json=short, timeout=60).status_code == 200


@pytest.mark.slow
def test_serve_refuses_bad_options_in_one_line(served, tmp_path):
    from click.testing import CliRunner

    from dllm_export.cli import main

    result = CliRunner().invoke(main, ["serve", str(tmp_path)])
    assert result.exit_code == 1
    assert "neither an artifact or engine (manifest.json) nor a checkpoint" in result.output
    result = CliRunner().invoke(main, ["serve", str(served[0]), "--max-batch", "8"])
    assert result.exit_code == 1
    assert "--max-batch 8" in result.output and "--batch 8" in result.output
