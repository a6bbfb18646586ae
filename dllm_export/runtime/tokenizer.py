"""A torch-free tokenizer: ``tokenizer.json`` through the ``tokenizers`` library, plus the
chat template from ``tokenizer_config.json`` rendered with Jinja, as transformers does."""

from __future__ import annotations

import json
from pathlib import Path

from dllm_export.errors import DllmExportError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def _token_text(value) -> str | None:
    """tokenizer_config stores special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


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
        self.config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.chat_template = self.config.get("chat_template")
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))

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
        """Render chat messages with the checkpoint's own template."""
        if not self.chat_template:
            raise DllmExportError(
                f"{self.directory / 'tokenizer_config.json'}: no chat_template; "
                "drop --chat or add a template"
            )
        import jinja2

        def raise_exception(message):
            raise DllmExportError(f"chat template: {message}")

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        template = env.from_string(self.chat_template)
        return template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def format_prompt(self, prompt: str | list[dict], chat: bool) -> list[int]:
        """Token ids for a plain prompt, or for chat messages / a user turn when ``chat``."""
        if isinstance(prompt, list):
            return self.encode(self.apply_chat_template(prompt))
        if chat:
            return self.encode(self.apply_chat_template([{"role": "user", "content": prompt}]))
        return self.encode(prompt)
