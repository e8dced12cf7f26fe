"""The offline API: many prompts in, completions out, through the engine's continuous batching.

    llm = LLM("runs/tiny/model")
    outs = llm.generate(["The for statement", "A list"], SamplingParams(max_tokens=32))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason
"""

from __future__ import annotations

from dataclasses import dataclass

from moeco.errors import ConfigError
from moeco.serve.engine import EngineConfig, LLMEngine
from moeco.serve.sampling_params import SamplingParams


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str | None
    error: str | None = None


class LLM:
    def __init__(self, model_dir: str | None = None, *, model=None, tokenizer=None, **engine_options):
        self.engine = LLMEngine(EngineConfig(model_dir=model_dir, **engine_options), model=model, tokenizer=tokenizer)

    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.engine.tokenizer is None:
                raise ConfigError("this model directory has no tokenizer.json; pass token-id lists instead of text")
            return self.engine.tokenizer.encode(prompt).ids
        return list(prompt)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False) -> list[Completion]:
        """Completions in the order of `prompts` (strings or token-id lists)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ConfigError(f"{len(params_list)} SamplingParams for {len(prompts)} prompts; pass one or one each")
        engine = self.engine
        ids = [self.encode(p) for p in prompts]
        rids = [engine.add_request(p, sp) for p, sp in zip(ids, params_list)]
        out: dict[str, list[int]] = {r: [] for r in rids}
        ends: dict[str, tuple] = {}
        bar = _progress(len(rids)) if progress else None
        while engine.has_unfinished():
            for o in engine.step():
                out[o.request_id] += o.new_token_ids
                if o.finished:
                    ends[o.request_id] = (o.finish_reason, o.error)
                    if bar:
                        bar.advance(bar.task)
        if bar:
            bar.stop()
        tok = engine.tokenizer
        return [Completion(p, out[r], tok.decode(out[r]) if tok else None, *ends.get(r, (None, None)))
                for p, r in zip(ids, rids)]


def _progress(total: int):
    from rich.progress import Progress

    bar = Progress(transient=True)
    bar.task = bar.add_task("requests", total=total)
    bar.start()
    return bar
