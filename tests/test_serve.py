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

import numpy as np
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
    # a stop sequence cuts the answer before it, streamed or not
    text = _expected(gen, PROMPTS[0])[0]
    assert len(text) >= 4, text
    stop = text[2:4]
    cut = text[: text.find(stop)]
    body = {"model": model, "prompt": PROMPTS[0], "stop": [stop], **SETTINGS}
    reply = httpx.post(server + "/v1/completions", json=body, timeout=120).json()
    assert reply["choices"][0]["text"] == cut and reply["choices"][0]["finish_reason"] == "stop"
    with httpx.stream("POST", server + "/v1/completions", json={**body, "stream": True},
                      timeout=120) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == cut
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
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
def test_serve_runs_a_checkpoint_on_the_pytorch_backend(tiny_dir):
    from dllm_export.runtime import Generator

    checkpoint = tiny_dir("llada-moe")
    gen = Generator.from_checkpoint(checkpoint)
    with _server(checkpoint, "--max-batch", "2") as url:
        body = {"model": Path(checkpoint).name, "prompt": PROMPTS[0], **SETTINGS}
        reply = httpx.post(url + "/v1/completions", json=body, timeout=120).json()
    out = gen.generate(PROMPTS[0], **GEN)
    assert reply["choices"][0]["text"] == out.texts[0]
    assert reply["usage"]["completion_tokens"] == len(out.tokens[0])


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


# ------------------------------------------------------------------ Triton

TRITON_VENV = Path(os.environ.get("DLLM_TRITON_VENV", ROOT / ".venv-triton"))
TRITON_PARAMS = {"max_tokens": 16, "temperature": 0, "dllm": {"block_length": 8, "steps": 16}}


class _FakeTensor:
    def __init__(self, name, array):
        self.name, self.array = name, array

    def as_numpy(self):
        return self.array


class _FakeResponse:
    def __init__(self, output_tensors=None, error=None):
        self.outputs = {t.name: t.array for t in output_tensors or []}
        self.error = error


class _FakeError:
    def __init__(self, message):
        self.message = message


class _FakeSender:
    def __init__(self):
        self.sent = []

    def send(self, response, flags=0):
        self.sent.append((response, flags))


class _FakeRequest:
    def __init__(self, text, params):
        self.inputs = {"text_input": np.array([[text.encode()]], dtype=object)}
        if params is not None:
            self.inputs["sampling_parameters"] = np.array([[json.dumps(params).encode()]],
                                                          dtype=object)
        self.sender = _FakeSender()

    def get_response_sender(self):
        return self.sender


class _FakePbUtils:
    """The few names of triton_python_backend_utils the model uses."""

    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    Tensor = _FakeTensor
    InferenceResponse = _FakeResponse
    TritonError = _FakeError

    @staticmethod
    def get_input_tensor_by_name(request, name):
        array = request.inputs.get(name)
        return None if array is None else _FakeTensor(name, array)



@pytest.fixture(scope="module")
def repository(served, tmp_path_factory):
    from dllm_export.serve.triton import write_repository

    root = tmp_path_factory.mktemp("triton") / "models"
    return write_repository(served[0], root, name="tiny", threads=1)


@pytest.mark.slow
def test_triton_model_streams_the_generators_answer_with_a_fake_backend(served, repository,
                                                                        monkeypatch):
    from dllm_export.serve import triton_model

    _, gen = served
    monkeypatch.setattr(triton_model, "pb_utils", _FakePbUtils)
    config = (repository / "config.pbtxt").read_text()
    assert "max_batch_size: 4" in config and "decoupled: true" in config
    model = triton_model.TritonPythonModel()
    model.initialize({"model_config": json.dumps({"max_batch_size": 4, "parameters": {
        "artifact": {"string_value": "artifact"}, "threads": {"string_value": "1"}}}),
        "model_repository": str(repository), "model_version": "1"})
    requests = [_FakeRequest(PROMPTS[0], TRITON_PARAMS),
                _FakeRequest(PROMPTS[1], {**TRITON_PARAMS, "stream": False}),
                _FakeRequest("Hi", {**TRITON_PARAMS, "chat": True}),
                _FakeRequest(PROMPTS[2], {"n": 2}),
                _FakeRequest(PROMPTS[3], {**TRITON_PARAMS, "dllm": {"block_length": 8, "steps": 3}})]
    assert model.execute(requests) is None  # decoupled: every answer goes through a sender
    for request, (prompt, chat) in zip(requests[:3], [(PROMPTS[0], False), (PROMPTS[1], False),
                                                      ("Hi", True)], strict=True):
        sent = request.sender.sent
        assert all(r.error is None for r, _ in sent)
        assert [flags for _, flags in sent][-1] == 1 and all(f == 0 for _, f in sent[:-1])
        text = "".join(r.outputs["text_output"][0, 0].decode() for r, _ in sent)
        out = gen.generate(prompt, chat=chat, **GEN)
        assert text == out.texts[0]
        assert int(sent[-1][0].outputs["completion_tokens"][0, 0]) == len(out.tokens[0])
        assert sent[-1][0].outputs["finish_reason"][0, 0].decode() in ("stop", "length")
    assert len(requests[1].sender.sent) == 1  # stream false: one response
    (error, flags), = requests[3].sender.sent
    assert flags == 1 and "sampling_parameters.n" in error.error.message
    (error, flags), = requests[4].sender.sent
    assert flags == 1 and "dllm.steps 3" in error.error.message


TRITON_GRPC_CLIENT = r'''
import json, queue, sys
import numpy as np
import tritonclient.grpc as grpcclient

url, model, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
results = queue.Queue()
client = grpcclient.InferenceServerClient(url)
client.start_stream(callback=lambda result, error: results.put((result, error)))
for index, (text, params) in enumerate(prompts):
    inputs = [grpcclient.InferInput("text_input", [1, 1], "BYTES"),
              grpcclient.InferInput("sampling_parameters", [1, 1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([[text.encode()]], dtype=object))
    inputs[1].set_data_from_numpy(np.array([[json.dumps(params).encode()]], dtype=object))
    client.async_stream_infer(model, inputs, request_id=str(index))
chunks = {str(i): [] for i in range(len(prompts))}
finished = {}
while len(finished) < len(prompts):
    result, error = results.get(timeout=300)
    if error is not None:
        print(json.dumps({"error": str(error)}))
        sys.exit(1)
    rid = result.get_response().id
    chunks[rid].append(result.as_numpy("text_output").reshape(-1)[0].decode())
    finish = result.as_numpy("finish_reason").reshape(-1)[0].decode()
    if finish:
        finished[rid] = [finish, int(result.as_numpy("completion_tokens").reshape(-1)[0])]
client.stop_stream()
print(json.dumps({rid: ["".join(c), len(c), *finished[rid]] for rid, c in chunks.items()}))
'''

TRITON_CONFIG_LINT = r'''
import sys
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
config = text_format.Parse(open(sys.argv[1]).read(), model_config_pb2.ModelConfig())
print(config.max_batch_size, config.model_transaction_policy.decoupled,
      config.instance_group[0].count, config.backend)
'''


@pytest.mark.slow
def test_triton_server_runs_the_repository(served, repository, tmp_path):
    if not (TRITON_VENV / "bin" / "python").exists():
        pytest.skip(f"no nvidia-pytriton venv at {TRITON_VENV} (docs/serving.md)")
    from dllm_export.serve.triton import pytriton_server

    _, gen = served
    python = str(TRITON_VENV / "bin" / "python")
    lint = subprocess.run([python, "-c", TRITON_CONFIG_LINT, str(repository / "config.pbtxt")],
                          capture_output=True, text=True, check=True)
    assert lint.stdout.split() == ["4", "True", "1", "python"]
    ports = [_free_port() for _ in range(3)]
    command, env = pytriton_server(TRITON_VENV, repository.parent, tmp_path, *ports)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{ports[0]}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"tritonserver exited {proc.returncode}: {proc.stdout.read()[-3000:]}")
            try:
                if httpx.get(url + "/v2/models/tiny/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("tritonserver: the model was not ready in 180 s")
            time.sleep(0.5)
        # HTTP: the generate_stream extension, as server-sent events
        body = {"text_input": PROMPTS[0], "sampling_parameters": json.dumps(TRITON_PARAMS)}
        with httpx.stream("POST", url + "/v2/models/tiny/generate_stream", json=body,
                          timeout=120) as response:
            assert response.status_code == 200
            events = [json.loads(line[6:]) for line in response.iter_lines()
                      if line.startswith("data: ")]
        out = gen.generate(PROMPTS[0], **GEN)
        assert "".join(e["text_output"] for e in events) == out.texts[0]
        assert events[-1]["finish_reason"] in ("stop", "length")
        assert events[-1]["completion_tokens"] == len(out.tokens[0])
        bad = httpx.post(url + "/v2/models/tiny/generate_stream", timeout=60,
                         json={"text_input": "hi", "sampling_parameters": '{"n": 2}'})
        assert "sampling_parameters.n" in bad.text
        # gRPC: tritonclient's bidirectional stream, four requests at once
        prompts = [[p, TRITON_PARAMS] for p in PROMPTS]
        client = subprocess.run([python, "-c", TRITON_GRPC_CLIENT, f"127.0.0.1:{ports[1]}",
                                 "tiny", json.dumps(prompts)], capture_output=True, text=True,
                                timeout=300)
        assert client.returncode == 0, client.stdout + client.stderr
        answers = json.loads(client.stdout.strip().splitlines()[-1])
        for index, prompt in enumerate(PROMPTS):
            text, chunks, finish, tokens = answers[str(index)]
            out = gen.generate(prompt, **GEN)
            assert text == out.texts[0], prompt
            assert tokens == len(out.tokens[0])
            assert chunks >= 1 and finish in ("stop", "length")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
