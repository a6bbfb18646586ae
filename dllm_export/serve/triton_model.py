"""The Triton Inference Server Python-backend model over our runtime (decoupled streaming).

``triton.py`` writes this file's package next to ``model.py`` in a model repository, so the
model needs only numpy, tokenizers, jinja2 and onnxruntime (or TensorRT) in Triton's Python.

Inputs (per request, batch dimension from ``max_batch_size``):

| name | type | |
|---|---|---|
| ``text_input`` | STRING [1] | the prompt, or with ``chat`` the user turn (or a JSON list of messages) |
| ``sampling_parameters`` | STRING [1], optional | JSON: ``max_tokens``, ``temperature``, ``seed``, ``stop``, ``top_p``, ``chat``, ``stream``, ``dllm`` (as in the OpenAI server) |

Outputs of every response: ``text_output`` (STRING [1], the new text of the committed prefix;
the whole answer when ``stream`` is false), ``finish_reason`` (STRING [1], empty until the
final response), ``completion_tokens`` (INT32 [1]). Triton's dynamic batcher hands
``execute`` the requests that arrived together; those with identical sampler settings run
as rows of one ``denoise`` call.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dllm_export import families
from dllm_export.errors import DllmExportError
from dllm_export.runtime import Generator, denoise
from dllm_export.serve.protocol import ApiError, _stops, sampler_config
from dllm_export.serve.text import AnswerText

pb_utils = None  # triton_python_backend_utils, bound in initialize (a fake in tests)
PARAMETER_KEYS = {"max_tokens", "temperature", "seed", "stop", "top_p", "chat", "stream", "dllm"}


class _Row:
    def __init__(self, sender, ids, config, max_tokens, stops, stream, decode):
        self.sender, self.ids, self.config, self.stream = sender, ids, config, stream
        self.max_tokens = max_tokens
        self.text = AnswerText(decode, stops, max_tokens)
        self.last = 0
        self.closed = False


class TritonPythonModel:
    def initialize(self, args):
        global pb_utils
        if pb_utils is None:
            import triton_python_backend_utils as pb_utils_module

            pb_utils = pb_utils_module
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        here = Path(args["model_repository"]) / args["model_version"]
        artifact = here / parameters.get("artifact", "artifact")
        threads = int(parameters["threads"]) if parameters.get("threads") else None
        self.generator = Generator.from_artifact(artifact, provider=parameters.get(
            "provider", "cpu"), threads=threads)
        self.family = families.family(self.generator.family)
        self.max_batch = max(int(config.get("max_batch_size") or 1), 1)
        if self.generator.backend.batch_size is not None:
            self.max_batch = min(self.max_batch, self.generator.backend.batch_size)

    # ------------------------------------------------------------ one request

    def _string(self, request, name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            return None
        value = tensor.as_numpy().reshape(-1)[0]
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    def _parse(self, request, sender) -> _Row:
        text = self._string(request, "text_input")
        if text is None:
            raise ApiError(400, "text_input: required")
        raw = self._string(request, "sampling_parameters") or "{}"
        try:
            params = json.loads(raw)
        except ValueError as err:
            raise ApiError(400, f"sampling_parameters: not valid JSON ({err})") from None
        if not isinstance(params, dict):
            raise ApiError(400, "sampling_parameters: expected a JSON object")
        unknown = sorted(set(params) - PARAMETER_KEYS)
        if unknown:
            raise ApiError(400, f"sampling_parameters.{unknown[0]}: unknown; choose from "
                                f"{', '.join(sorted(PARAMETER_KEYS))}")
        gen = self.generator
        max_tokens = params.get("max_tokens")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)):
            raise ApiError(400, f"sampling_parameters.max_tokens {max_tokens!r}: expected an integer")
        config, keep = sampler_config(gen, params, max_tokens, gen.backend.seq_len)
        chat = bool(params.get("chat"))
        prompt = text
        if chat and text.lstrip().startswith("["):
            try:
                prompt = json.loads(text)
            except ValueError as err:
                raise ApiError(400, f"text_input: not a JSON list of messages ({err})") from None
        try:
            ids = gen.encode(prompt, chat=chat)
        except DllmExportError as err:
            raise ApiError(400, f"text_input: {err}") from None
        seq_len = gen.backend.seq_len
        if seq_len is not None and len(ids) > seq_len - config.gen_length:
            raise ApiError(400, f"text_input has {len(ids)} tokens but the canvas fits "
                                f"{seq_len - config.gen_length} (canvas {seq_len} - "
                                f"{config.gen_length} answer tokens)")
        return _Row(sender, ids, config, keep, _stops(params), params.get("stream", True),
                    gen.tokenizer.decode)

    def _respond(self, row: _Row, text: str, finish: str = "", tokens: int = 0):
        outputs = [
            # [1, 1]: the batch dimension of a max_batch_size model, then dims [1]
            pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_)),
            pb_utils.Tensor("finish_reason", np.array([[finish.encode()]], dtype=np.object_)),
            pb_utils.Tensor("completion_tokens", np.array([[tokens]], dtype=np.int32)),
        ]
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if finish else 0
        row.sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=flags)
        row.closed = bool(finish)

    # ------------------------------------------------------------ a batch

    def execute(self, requests):
        rows = []
        for request in requests:
            sender = request.get_response_sender()
            try:
                rows.append(self._parse(request, sender))
            except ApiError as err:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(err.message)),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        groups: dict = {}
        for row in rows:
            groups.setdefault(repr(row.config), []).append(row)
        for group in groups.values():
            for start in range(0, len(group), self.max_batch):
                self._run(group[start:start + self.max_batch])
        return None

    def _run(self, batch: list[_Row]):
        gen = self.generator
        config = batch[0].config
        mask = gen.special.mask_id

        def on_step(info):
            answer = info.canvas[:, info.canvas.shape[1] - config.gen_length:]
            for index, row in enumerate(batch):
                if not row.stream or row.closed:
                    continue
                generated = answer[index]
                masked = generated == mask
                ready = generated[: masked.argmax()] if masked.any() else generated
                tokens = gen.answer_tokens(ready)
                if len(tokens) > row.last:
                    row.last = len(tokens)
                    delta = row.text.update(tokens)
                    if row.text.finish:
                        self._respond(row, delta, "stop", min(len(tokens), row.max_tokens))
                    elif delta:
                        self._respond(row, delta, "", min(len(tokens), row.max_tokens))

        try:
            result = denoise(gen.backend, [r.ids for r in batch], config, gen.special,
                             on_step=on_step, family=self.family)
        except DllmExportError as err:
            for row in batch:
                if not row.closed:
                    row.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                        str(err))), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        for row, sequence in zip(batch, result.sequences, strict=True):
            if row.closed:
                continue
            tokens = gen.answer_tokens(sequence[result.prompt_length:])
            delta = row.text.update(tokens, final=True)
            cut = len(tokens) > row.max_tokens or len(tokens) >= config.gen_length
            finish = row.text.finish or ("length" if cut else "stop")
            self._respond(row, delta if row.stream else row.text.sent, finish,
                          min(len(tokens), row.max_tokens))

    def finalize(self):
        self.generator = None
