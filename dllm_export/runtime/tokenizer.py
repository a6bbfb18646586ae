"""A torch-free tokenizer: ``tokenizer.json`` through the ``tokenizers`` library, plus the
chat template from ``tokenizer_config.json`` rendered in Jinja's sandbox, as transformers does.

User text never becomes a control token: a prompt that spells ``<|mdm_mask|>`` is encoded
as those characters, not as the mask id. In chat messages the control tokens of the
contents are marked before the template renders (private-use characters around them) and
encoded as plain text afterwards, while the control tokens the template writes itself are
kept, as transformers' ``mark_control_tokens`` / ``encode_marked_chat`` do.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path

from dllm_export.errors import DllmExportError
from dllm_export.jsonio import read_json
from dllm_export.runtime.chat_template import check_chat_template, render_chat_template

MARK_START, MARK_END = "\ue000", "\ue001"  # private use: never in a tokenizer's text
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def copy_tokenizer_files(source, destination) -> None:
    """Copy the tokenizer files ``source`` has (``TOKENIZER_FILES``) into ``destination``:
    every artifact carries them, so that the runtime reads no checkpoint."""
    import shutil

    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, Path(destination) / name)


def token_text(value) -> str | None:
    """tokenizer_config stores special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _template_text(value, origin: Path) -> str | None:
    """transformers stores one template as a string, or named ones as a list of dicts."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) for t in value):
        named = {t.get("name"): t.get("template") for t in value}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise DllmExportError(
        f"{origin}: chat_template must be a string or a list of named templates with a "
        "'default' one"
    )


class TextTokenizer:
    """Encode, decode and apply the chat template of a checkpoint or artifact directory."""

    def __init__(self, directory: Path):
        from tokenizers import Tokenizer

        self.directory = Path(directory)
        path = self.directory / "tokenizer.json"
        if not path.is_file():
            raise DllmExportError(
                f"{path}: file not found; the directory needs the model's tokenizer.json"
            )
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on parse errors
            raise DllmExportError(f"{path}: cannot be read by tokenizers ({err})") from None
        config_path = self.directory / "tokenizer_config.json"
        self.config = read_json(config_path) if config_path.is_file() else {}
        self.chat_template = _template_text(self.config.get("chat_template"), config_path)
        self.bos_token = token_text(self.config.get("bos_token"))
        self.eos_token = token_text(self.config.get("eos_token"))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    @cached_property
    def _plain(self):
        """A second tokenizer that reads control tokens in text as ordinary characters."""
        from tokenizers import Tokenizer

        plain = Tokenizer.from_str(self._tok.to_str())
        plain.encode_special_tokens = True
        return plain

    @cached_property
    def _control_patterns(self):
        tokens = sorted((t.content for t in self._tok.get_added_tokens_decoder().values()),
                        key=len, reverse=True)
        control = re.compile("|".join(map(re.escape, tokens)) or "(?!)")
        marked = re.compile(f"{MARK_START}({control.pattern}){MARK_END}|[{MARK_START}{MARK_END}]")
        return control, marked

    @staticmethod
    def _check_text(text) -> None:
        if not isinstance(text, str):
            raise DllmExportError(f"prompt: expected text, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # a shell argument with invalid bytes
            raise DllmExportError(
                f"prompt: not valid UTF-8 (byte {text[err.start]!r} at position {err.start}); "
                "pass UTF-8 text") from None

    def encode(self, text: str) -> list[int]:
        """User or data text: control tokens in it stay characters (never the mask id)."""
        self._check_text(text)
        return self._plain.encode(text, add_special_tokens=False).ids

    def _mark(self, value):
        if isinstance(value, str):
            value = value.replace(MARK_START, "").replace(MARK_END, "")
            return self._control_patterns[0].sub(lambda m: MARK_START + m[0] + MARK_END, value)
        if isinstance(value, dict):
            return {key: self._mark(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._mark(item) for item in value]
        return value

    def _encode_rendered(self, text: str) -> list[int]:
        """A rendered chat: the template's control tokens kept, marked ones as characters."""
        pieces = self._control_patterns[1].split(text)
        ids = self._tok.encode(pieces[0], add_special_tokens=False).ids
        for index, piece in enumerate(pieces[1:], start=1):
            if piece:
                encoder = self._plain if index % 2 else self._tok
                ids += encoder.encode(piece, add_special_tokens=False).ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render chat messages with the checkpoint's own template, in Jinja's sandbox."""
        origin = self.directory / "tokenizer_config.json"
        if not self.chat_template:
            raise DllmExportError(f"{origin}: no chat_template; drop --chat or add a template")
        return render_chat_template(
            self.chat_template,
            str(origin),
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def check_chat_template(self) -> None:
        """Refuse (one line) a template that does not parse or render in the sandbox."""
        if self.chat_template:
            check_chat_template(self.chat_template, str(self.directory / "tokenizer_config.json"))

    def format_prompt(self, prompt: str | list[dict], chat: bool) -> list[int]:
        """Token ids for a plain prompt, or for chat messages / a user turn when ``chat``."""
        if isinstance(prompt, str) and not chat:
            return self.encode(prompt)
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("content", ""), str):
                raise DllmExportError("chat messages: each needs a 'role' and a text 'content'")
            self._check_text(message.get("content", ""))
        return self._encode_rendered(self.apply_chat_template(self._mark(messages)))
