"""A torch-free tokenizer: ``tokenizer.json`` through the ``tokenizers`` library, plus the
chat template from ``tokenizer_config.json`` rendered in Jinja's sandbox, as transformers does."""

from __future__ import annotations

from pathlib import Path

from dllm_export.errors import DllmExportError
from dllm_export.jsonio import read_json
from dllm_export.runtime.chat_template import check_chat_template, render_chat_template

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


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

    def encode(self, text: str) -> list[int]:
        # Prompts are already formatted (chat template or raw text): add no specials.
        return self._tok.encode(text, add_special_tokens=False).ids

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
        if isinstance(prompt, list):
            return self.encode(self.apply_chat_template(prompt))
        if chat:
            return self.encode(self.apply_chat_template([{"role": "user", "content": prompt}]))
        return self.encode(prompt)
