"""One HTTP request's generation: its engine requests (n per prompt), their text, their end.

A completion request with P prompts and `n` choices becomes P * n engine requests that share one
asyncio queue; choice `p * n + j` is the j-th sample of prompt p (OpenAI's numbering). `events()`
yields (choice, new text, finish reason) as outputs arrive; `close()` aborts every choice that has
not finished (client gone, an error) and is safe to call more than once, so both the response's
own cleanup and the stream's `finally` can call it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from moeco.serve.async_engine import AsyncEngine, EngineFailure, Overloaded
from moeco.serve.detokenizer import IncrementalDetokenizer
from moeco.serve.openai_protocol import APIError
from moeco.serve.sampling_params import RequestError, SamplingParams


@dataclass(eq=False)
class Choice:
    index: int
    request_id: str
    detok: IncrementalDetokenizer
    num_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    pieces: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class Generation:
    def __init__(self, engine: AsyncEngine, num_prompt_tokens: int):
        self.engine = engine
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices: list[Choice] = []
        self.num_prompt_tokens = num_prompt_tokens
        self._closed = False

    @classmethod
    async def start(cls, engine: AsyncEngine, tokenizer, prompts: list[list[int]],
                    params: list[list[SamplingParams]]) -> "Generation":
        """Submit every choice; on a refusal, abort the ones already submitted and raise APIError."""
        gen = cls(engine, sum(map(len, prompts)))
        try:
            for ids, per_choice in zip(prompts, params):
                for sp in per_choice:
                    rid = await engine.add(ids, sp, gen.queue)
                    gen.choices.append(Choice(len(gen.choices), rid, IncrementalDetokenizer(tokenizer, sp.stop)))
        except RequestError as exc:
            gen.close()
            raise APIError(400, str(exc), exc.field, "invalid_value") from None
        except Overloaded as exc:
            gen.close()
            raise APIError(503, f"the server is overloaded ({exc}); retry later", None, "overloaded") from None
        except BaseException:
            gen.close()
            raise
        return gen

    @property
    def num_completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.choices)

    def usage(self) -> dict:
        done = self.num_completion_tokens
        return {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": done,
                "total_tokens": self.num_prompt_tokens + done}

    async def events(self, disconnected=None):
        """Yield (choice, text, finish_reason or None) until every choice has finished.
        `disconnected`: an async callable polled while waiting (non-streaming responses, which
        the server does not cancel when the client leaves); when it says so, the choices are aborted."""
        by_id = {c.request_id: c for c in self.choices}
        pending = len(self.choices)
        loop = asyncio.get_running_loop()
        next_poll = loop.time() + 0.5
        try:
            while pending:
                if disconnected is None:
                    item = await self.queue.get()
                else:  # poll the connection every half second, whether or not outputs arrive
                    try:
                        item = await asyncio.wait_for(self.queue.get(), timeout=max(0.01, next_poll - loop.time()))
                    except asyncio.TimeoutError:
                        item = None
                    if loop.time() >= next_poll:
                        if await disconnected():
                            return
                        next_poll = loop.time() + 0.5
                    if item is None:
                        continue
                c = by_id.get(item.request_id)
                if c is None or c.finish_reason is not None:
                    continue
                if isinstance(item, EngineFailure):
                    c.finish_reason, c.error = item.reason, item.message if item.reason == "error" else None
                    pending -= 1
                    yield c, "", c.finish_reason
                    continue
                c.num_tokens += len(item.new_token_ids)
                text = c.detok.add(item.new_token_ids, final=item.finished)
                c.pieces.append(text)
                if item.finished:
                    c.finish_reason = "error" if item.error else item.finish_reason or "stop"
                    c.error = item.error
                elif c.detok.stopped:  # a stop string the engine has not seen yet: end it here
                    c.finish_reason = "stop"
                    self.engine.abort(c.request_id, reason="stop")
                if c.finish_reason is not None:
                    pending -= 1
                if text or c.finish_reason is not None:
                    yield c, text, c.finish_reason
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for c in self.choices:
            if c.finish_reason is None:
                c.finish_reason = "abort"
                self.engine.abort(c.request_id)
            self.engine.release()
