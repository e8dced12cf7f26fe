"""The OpenAI API's request bodies, their validation, and its error bodies.

Requests are validated here, before anything reaches the engine, so a bad field comes back as
400 with the field named in `param`:

    {"error": {"message": "max_tokens: Input should be greater than or equal to 1",
               "type": "invalid_request_error", "param": "max_tokens", "code": "invalid_value"}}

Types are strict (a JSON string "5" is not a number); fields a client may send that moeco does not
act on (`user`, `logit_bias` left empty...) are accepted and ignored, while ones that would change
the result and that moeco cannot honour (`logprobs`, `echo`, penalties, `best_of` > `n`, tools) are
refused by name rather than silently dropped. Extensions shared with vLLM: `top_k`, `ignore_eos`,
`stop_token_ids`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moeco.serve.sampling_params import SamplingParams

MAX_N = 64  # choices per request; each is a full engine request
MAX_STOP = 16


class APIError(Exception):
    """An error the client caused (or an overload); rendered as an OpenAI-style body."""

    _TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
              413: "invalid_request_error", 503: "service_unavailable_error", 500: "internal_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self._TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    """Sampling fields both endpoints share."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # vLLM's extension; -1 and 0 mean off
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = None
    stop: Any = None  # str | list[str], checked in stop_list
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    # accepted only at the value that changes nothing
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    best_of: int | None = None

    def check_unsupported(self) -> None:
        if self.logprobs not in (None, False):
            raise APIError(400, "logprobs are not supported by moeco serve; leave logprobs unset", "logprobs",
                           "unsupported_parameter")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise APIError(400, f"{name} = {getattr(self, name)} is not supported by moeco serve; "
                                    "leave it at 0", name, "unsupported_parameter")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, f"best_of = {self.best_of} is not supported; leave it unset (or equal to n)",
                           "best_of", "unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream = true", "stream_options",
                           "invalid_value")

    def stop_list(self) -> list[str]:
        stop = self.stop
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
            raise APIError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP} non-empty "
                                "strings", "stop", "invalid_value")
        return stop

    def sampling_params(self, max_tokens: int, choice: int) -> SamplingParams:
        """The engine's parameters for one choice. Choice j of a seeded request uses seed + j, so n
        seeded choices differ from one another and each is reproducible."""
        return SamplingParams(
            max_tokens=max_tokens, temperature=float(self.temperature), top_p=float(self.top_p),
            top_k=max(self.top_k, 0), seed=None if self.seed is None else self.seed + choice,
            stop=self.stop_list(), stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos)


class CompletionRequest(_Common):
    prompt: Any  # str | list[str] | list[int] | list[list[int]], checked in prompts()
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    suffix: str | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.echo:
            raise APIError(400, "echo is not supported by moeco serve; leave it false", "echo",
                           "unsupported_parameter")
        if self.suffix:
            raise APIError(400, "suffix is not supported by moeco serve; leave it unset", "suffix",
                           "unsupported_parameter")

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts, each text or token ids."""
        p = self.prompt
        bad = APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of "
                            "lists of token ids, and not empty", "prompt", "invalid_value")

        def is_ids(x):
            return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(p, str):
            return [p]
        if is_ids(p):
            return [p]
        if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            return list(p)
        if isinstance(p, list) and p and all(is_ids(x) for x in p):
            return list(p)
        raise bad


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None  # str | list of {"type": "text", "text": ...} | None

    def text(self, index: int) -> str:
        c = self.content
        if c is None or isinstance(c, str):
            return c or ""
        if isinstance(c, list) and all(isinstance(x, dict) for x in c):
            parts = []
            for x in c:
                if x.get("type") != "text" or not isinstance(x.get("text"), str):
                    raise APIError(400, f"messages[{index}].content: only text parts are supported "
                                        f"(got type {x.get('type')!r})", f"messages[{index}].content",
                                   "invalid_value")
                parts.append(x["text"])
            return "".join(parts)
        raise APIError(400, f"messages[{index}].content must be a string or a list of text parts",
                       f"messages[{index}].content", "invalid_value")


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: Any = None
    add_generation_prompt: bool = True  # vLLM's extension

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.tools:
            raise APIError(400, "tools are not supported by moeco serve", "tools", "unsupported_parameter")

    def conversation(self) -> list[dict]:
        return [{"role": m.role, "content": m.text(i)} for i, m in enumerate(self.messages)]


def parse(model: type[BaseModel], body: Any) -> Any:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
    try:
        req = model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = _param(err["loc"])
        missing = err["type"] == "missing"
        got = "" if missing else f" (got {_short(err.get('input'))})"
        message = f"{param}: {err['msg']}{got}" if param else err["msg"] + got
        raise APIError(400, message, param or None, "missing_required_parameter" if missing else "invalid_value") \
            from None
    req.check_unsupported()
    return req


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _param(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
