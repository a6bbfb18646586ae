"""OpenAI request bodies in, sampler settings out; OpenAI response and chunk bodies.

Every field of a request is either mapped to the sampler, checked to hold the one value we
implement (``n`` 1, no ``logprobs``, ...), or refused with a 400 that names it: nothing is
silently ignored. Our own options travel under the extension field ``dllm``.

| request field | becomes |
|---|---|
| ``max_tokens`` / ``max_completion_tokens`` | the cap on answer tokens; ``gen_length`` is it rounded up to whole blocks |
| ``temperature``, ``seed`` | the sampler's ``temperature``, ``seed`` |
| ``top_p`` | Dream's nucleus; other algorithms take only 1 |
| ``stop`` | up to 4 strings that end the answer (cut before them) |
| ``dllm.threshold``, ``block_length``, ``steps``, ``cache``, ``remasking``, ``alg``, ``alg_temp``, ``top_k`` | the sampler options of the same name |
"""

from __future__ import annotations

import math
import re
import time
import uuid
from dataclasses import dataclass, field

from dllm_export.errors import DllmExportError
from dllm_export.runtime import Generator, SamplerConfig

# dllm.* keys a request may set (SamplerConfig fields of the same name)
DLLM_KEYS = ("threshold", "block_length", "steps", "cache", "remasking", "alg", "alg_temp",
             "top_k")
MAX_STOPS = 4
COMMON = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "seed",
          "stop", "dllm", "user", "n", "logprobs", "presence_penalty", "frequency_penalty",
          "logit_bias"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools",
                        "tool_choice", "functions", "function_call", "response_format",
                        "parallel_tool_calls"}
# fields accepted only at the value that means "off"
ONLY = {
    "n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (None, False, 0),
    "top_logprobs": (None, 0), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0),
    "logit_bias": (None, {}), "suffix": (None, ""), "tools": (None, []), "functions": (None, []),
    "tool_choice": (None, "none"), "function_call": (None, "none"),
    "parallel_tool_calls": (None, False),
}


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


@dataclass
class ParsedRequest:
    """One validated request: what the scheduler runs and what the response needs."""

    kind: str  # "completion" or "chat"
    model: str
    prompt_ids: list[int]
    config: SamplerConfig
    max_tokens: int  # answer tokens kept (gen_length may round it up to whole blocks)
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    alone: bool = False  # sampled with an explicit seed: run in a batch of its own
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def batch_key(self):
        """Requests batch together only under identical sampler settings."""
        return (repr(self.config), self.id if self.alone else None)


_FLAG = re.compile(r"--([a-z-]+)")


def _sampler_message(message: str) -> str:
    """The runtime names its CLI flags; a request names its fields."""
    def field_name(match):
        name = match[1].replace("-", "_")
        if name == "gen_length":
            return "max_tokens"
        return name if name in ("temperature", "top_p", "seed") else f"dllm.{name}"

    return _FLAG.sub(field_name, message)


def _number(body: dict, name: str, kind=float):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and not float(value).is_integer()):
        raise bad(f"{name}: expected {'an integer' if kind is int else 'a number'}, got "
                  f"{value!r}", name)
    return kind(value)


def _check_fields(body: dict, allowed: set) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad(f"{unknown[0]}: not a field this server implements (it serves a diffusion "
                  f"model; see docs/serving.md for the fields it takes)", unknown[0])
    for name, values in ONLY.items():
        if name in body and body[name] not in values:
            raise bad(f"{name} {body[name]!r}: not supported by this server "
                      f"(it takes only {values[-1]!r})", name)
    if "stream_options" in body and body["stream_options"] is not None:
        options = body["stream_options"]
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad("stream_options: only {\"include_usage\": true|false} is supported",
                      "stream_options")
    if body.get("response_format") not in (None, {"type": "text"}):
        raise bad("response_format: only {\"type\": \"text\"} is supported", "response_format")


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop: expected a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOPS:
        raise bad(f"stop: at most {MAX_STOPS} sequences, got {len(stops)}", "stop")
    return stops


def _chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages: expected a non-empty list of {role, content}", "messages")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad(f"messages[{index}]: expected an object with a 'role'", "messages")
        extra = set(message) - {"role", "content", "name"}
        if extra:
            raise bad(f"messages[{index}].{sorted(extra)[0]}: not supported (text messages "
                      "only)", "messages")
        content = message.get("content", "")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise bad(f"messages[{index}].content: only text parts are supported",
                          "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{index}].content: expected text", "messages")
        out.append({"role": message["role"], "content": content})
    return out


def _completion_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise bad("prompt: send one prompt per request (a list of several, or of token ids, "
                  "is not supported)", "prompt")
    if not isinstance(prompt, str):
        raise bad("prompt: expected a string", "prompt")
    return prompt


def sampler_config(generator: Generator, body: dict, max_tokens: int | None,
                   seq_len: int | None) -> tuple[SamplerConfig, int]:
    """The sampler settings of a request, and the number of answer tokens it keeps.

    ``gen_length`` is ``max_tokens`` rounded up to whole blocks (the unit the sampler
    commits in) and capped by the canvas; without ``dllm.steps`` the steps keep the model
    default's steps per token."""
    dllm = body.get("dllm") or {}
    if not isinstance(dllm, dict):
        raise bad("dllm: expected an object of sampler options", "dllm")
    unknown = sorted(set(dllm) - set(DLLM_KEYS))
    if unknown:
        raise bad(f"dllm.{unknown[0]}: unknown option; choose from {', '.join(DLLM_KEYS)}",
                  f"dllm.{unknown[0]}")
    defaults = generator.defaults
    overrides = {k: v for k, v in dllm.items() if v is not None}
    for name in ("temperature", "seed"):
        if body.get(name) is not None:
            overrides[name] = _number(body, name, int if name == "seed" else float)
    top_p = _number(body, "top_p")
    algorithm = defaults.algorithm
    if top_p is not None and top_p != 1:
        if algorithm != "dream":
            raise bad(f"top_p {top_p}: the {algorithm} sampler has no nucleus sampling; "
                      "send top_p 1 or leave it out", "top_p")
        overrides["top_p"] = top_p
    wanted = defaults.gen_length if max_tokens is None else max_tokens
    if wanted < 1:
        raise bad(f"max_tokens {wanted}: must be at least 1", "max_tokens")
    block = overrides.get("block_length", defaults.block_length)
    if isinstance(block, int) and block > 0 and algorithm == "llada":
        gen_length = math.ceil(wanted / block) * block
    else:
        gen_length = wanted
    if seq_len is not None and gen_length >= seq_len:
        raise bad(f"max_tokens {wanted}: the canvas holds {seq_len} tokens (prompt and answer"
                  f"{f', answer in blocks of {block}' if gen_length != wanted else ''}); ask "
                  f"for fewer than {seq_len - (gen_length - wanted)}", "max_tokens")
    overrides["gen_length"] = gen_length
    if "steps" not in overrides and "threshold" not in overrides:
        blocks = gen_length // block if isinstance(block, int) and block > 0 else 1
        steps = math.ceil(gen_length * defaults.steps / defaults.gen_length)
        overrides["steps"] = max(blocks, math.ceil(steps / blocks) * blocks)
    try:
        return generator.config(**overrides), wanted
    except DllmExportError as err:
        raise bad(_sampler_message(str(err)), "dllm") from None
    except TypeError as err:
        raise bad(f"dllm: {err}", "dllm") from None


def parse_request(generator: Generator, model_name: str, body, kind: str) -> ParsedRequest:
    """Validate an OpenAI completion or chat body; raise ApiError naming the bad field."""
    if not isinstance(body, dict):
        raise bad("request body: expected a JSON object")
    _check_fields(body, COMPLETION_FIELDS if kind == "completion" else CHAT_FIELDS)
    model = body.get("model")
    if model != model_name:
        raise ApiError(404, f"model {model!r}: this server serves {model_name!r} only",
                       "model", "model_not_found")
    max_tokens = _number(body, "max_tokens", int)
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        max_tokens = _number(body, "max_completion_tokens", int)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad("stream: expected true or false", "stream")
    seq_len = generator.backend.seq_len
    config, keep = sampler_config(generator, body, max_tokens, seq_len)
    try:
        if kind == "chat":
            ids = generator.encode(_chat_messages(body), chat=True)
        else:
            ids = generator.encode(_completion_prompt(body), chat=False)
    except DllmExportError as err:
        raise bad(str(err), "messages" if kind == "chat" else "prompt") from None
    if not ids:
        raise bad("prompt: empty after tokenisation", "prompt")
    if seq_len is not None and len(ids) > seq_len - config.gen_length:
        raise bad(f"prompt has {len(ids)} tokens but the canvas fits "
                  f"{seq_len - config.gen_length} (canvas {seq_len} - {config.gen_length} "
                  "answer tokens); shorten it or lower max_tokens",
                  "messages" if kind == "chat" else "prompt", "context_length_exceeded")
    options = body.get("stream_options") or {}
    explicit_seed = body.get("seed") is not None and config.temperature > 0
    return ParsedRequest(kind=kind, model=model, prompt_ids=ids, config=config,
                         max_tokens=keep, stop=_stops(body), stream=stream,
                         include_usage=bool(options.get("include_usage")),
                         alone=explicit_seed)


# ------------------------------------------------------------------ responses


def usage(request: ParsedRequest, completion_tokens: int, forwards: int) -> dict:
    return {"prompt_tokens": len(request.prompt_ids), "completion_tokens": completion_tokens,
            "total_tokens": len(request.prompt_ids) + completion_tokens,
            "forwards": forwards,
            "tokens_per_forward": round(completion_tokens / max(forwards, 1), 4)}


def response_body(request: ParsedRequest, text: str, finish: str, usage_: dict) -> dict:
    if request.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": finish, "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    prefix = "chatcmpl-" if request.kind == "chat" else "cmpl-"
    return {"id": prefix + request.id, "object": obj, "created": request.created,
            "model": request.model, "choices": [choice], "usage": usage_}


def chunk_body(request: ParsedRequest, delta: str | None, finish: str | None = None,
               first: bool = False, usage_: dict | None = None) -> dict:
    """One streamed chunk; ``delta`` None with ``usage_`` is the final usage-only chunk."""
    prefix = "chatcmpl-" if request.kind == "chat" else "cmpl-"
    if request.kind == "chat":
        obj = "chat.completion.chunk"
        piece = {} if delta is None else {"content": delta}
        if first:
            piece = {"role": "assistant", **piece}
        choices = [{"index": 0, "delta": piece, "finish_reason": finish, "logprobs": None}]
    else:
        obj = "text_completion"
        choices = [{"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}]
    body = {"id": prefix + request.id, "object": obj, "created": request.created,
            "model": request.model, "choices": choices}
    if usage_ is not None:
        body["choices"] = []
        body["usage"] = usage_
    return body
