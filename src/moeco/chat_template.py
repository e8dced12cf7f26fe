"""Chat messages to one prompt string, through the checkpoint's Jinja chat template.

Where the template comes from, first found wins:
    MODEL_DIR/chat_template.jinja                    (newer Hugging Face checkpoints)
    MODEL_DIR/tokenizer_config.json "chat_template"  (a string, or a list of named templates: "default")
    DEFAULT_CHAT_TEMPLATE                            (below)

moeco's default template, which `moeco train` writes into its tokenizer_config.json, is plain text,
because the models it trains see only plain documents separated by `<|eos|>`:

    System: You are terse.

    User: What does the for statement do?

    Assistant:

Each message is `Role: content` followed by a blank line; an assistant message ends with the eos
token, so a model that learns the format ends its own turn with eos (finish_reason "stop").

Templates are rendered in Jinja's immutable sandbox (a checkpoint's template is code from whoever
made the checkpoint), with the variables Hugging Face templates expect: `messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, and the helper `raise_exception(message)`.
"""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_CHAT_TEMPLATE = r"""{%- for message in messages -%}
{{ message['role'] | capitalize }}: {{ message['content'] }}
{%- if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n\n' }}
{%- endfor -%}
{%- if add_generation_prompt %}Assistant:{% endif -%}
"""


class ChatTemplateError(ValueError):
    """A template that cannot render these messages (a bad template, or one that refuses them)."""


def _token_text(value) -> str:
    if isinstance(value, dict):  # {"content": "<|eos|>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) else ""


def find_template(model_dir: str | Path | None) -> tuple[str, str, dict]:
    """(template source, where it came from, tokenizer_config.json as a dict or {})."""
    config: dict = {}
    if model_dir is None:
        return DEFAULT_CHAT_TEMPLATE, "moeco default", config
    model_dir = Path(model_dir)
    cfg_path = model_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError):
            config = {}
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(), str(jinja_file), config
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if isinstance(template, str) and template.strip():
        return template, f"{cfg_path}", config
    return DEFAULT_CHAT_TEMPLATE, "moeco default", config


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", origin: str = ""):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ChatTemplateError(str(message))

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            self.template = env.from_string(source)
        except TemplateError as exc:
            raise ChatTemplateError(f"the chat template from {origin or 'the checkpoint'} does not parse: {exc}") \
                from None
        self.bos_token, self.eos_token, self.origin = bos_token, eos_token, origin

    @classmethod
    def from_model_dir(cls, model_dir: str | Path | None) -> "ChatTemplate":
        source, origin, config = find_template(model_dir)
        return cls(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")), origin)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, ValueError, KeyError, IndexError) as exc:
            raise ChatTemplateError(f"the chat template cannot render these messages: {exc}") from None
