"""The serving engine: requests in, tokens out, one scheduler step at a time.

    engine = LLMEngine(EngineConfig(model_dir="runs/tiny/model"))
    rid = engine.add_request(prompt_ids, SamplingParams(max_tokens=64))
    while engine.has_unfinished():
        for out in engine.step(): ...          # RequestOutput: new tokens, finished, finish_reason

A request that can never run (prompt past the context, a cache too small for it, bad parameters)
is refused by add_request with a RequestError and takes nothing; one that fails later ends with
`error` set and its blocks returned. The HTTP server and `LLM` are thin layers over this class.
With `ep > 1` (under torchrun) each rank runs one engine over its own requests, the experts sharded
over the ranks; `step` and `has_unfinished` are then collectives (moeco.serve.ep).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from moeco.errors import ConfigError
from moeco.sampling import sample_rows
from moeco.serve.block_manager import BlockManager
from moeco.serve.cache import PagedLatentCache
from moeco.serve.model_runner import ModelRunner
from moeco.serve.sampling_params import RequestError, SamplingParams
from moeco.serve.scheduler import Scheduler
from moeco.serve.sequence import Sequence, Status

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class EngineConfig:
    model_dir: str | None = None
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    block_size: int = 64
    cache_bytes: int | None = None  # latent pool size; default: gpu_memory_utilization on CUDA, 1 GiB on CPU
    gpu_memory_utilization: float = 0.9
    keep_fp8: bool = False
    speculative: str | None = None  # "mtp": draft with the model's MTP module
    cuda_graphs: bool = True
    compile: bool = False  # torch.compile the decode step (a one-off compile of ~1 min; CUDA: see BENCHMARKS)
    seed: int = 0
    # expert-parallel serving (moeco.serve.ep): experts over `ep` ranks of torchrun, attention data-parallel
    ep: int = 1
    gpus_per_node: int = 0  # ranks per node of the mesh; 0: torchrun's --nproc-per-node
    dispatcher: str = "two_hop"  # "two_hop" or "direct" (moeco.parallel.dispatch)
    overlap: str = "none"  # "two_microbatch": each forward as two micro-batches (moeco.parallel.overlap)


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None
    error: str | None
    num_prompt_tokens: int
    num_output_tokens: int


class LLMEngine:
    def __init__(self, config: EngineConfig, model=None, tokenizer=None):
        self.config = c = config
        device = torch.device("cuda" if c.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if c.device == "auto" else c.device))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device = {c.device!r} but this PyTorch build sees no CUDA device; use cpu")
        dtype = _DTYPES.get(c.dtype) if c.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
        if dtype is None:
            raise ConfigError(f"dtype = {c.dtype!r}; use auto, bfloat16, float16 or float32")
        if not isinstance(c.ep, int) or c.ep < 1:
            raise ConfigError(f"ep = {c.ep!r}; use 1 (one process) or the number of ranks sharing the experts")
        loading = model is None
        if loading and c.model_dir is None:
            raise ConfigError("EngineConfig.model_dir is not set; pass a checkpoint directory")
        self.sync = None  # the EP group's step agreement (ep > 1)
        if c.ep > 1:
            from moeco.serve.ep import expert_parallel_model

            model, self.sync = expert_parallel_model(c, model, dtype)
        elif model is None:
            from moeco.loading import load_pretrained

            model = load_pretrained(c.model_dir, dtype=dtype, device=device, keep_fp8=c.keep_fp8)
        if loading and tokenizer is None:
            from moeco.loading import load_tokenizer

            tokenizer = load_tokenizer(c.model_dir)
        if c.overlap != "none":
            from moeco.parallel.overlap import set_overlap

            # under EP every rank splits every forward, so that all issue the same collectives
            set_overlap(model, c.overlap).min_sequences = 0 if c.ep > 1 else 2
        self.model, self.tokenizer = model.eval(), tokenizer
        mcfg = model.config
        self.device = model.model.embed_tokens.weight.device
        self.max_model_len = c.max_model_len or mcfg.max_position_embeddings
        if not 0 < self.max_model_len <= mcfg.max_position_embeddings:
            raise ConfigError(f"max_model_len = {self.max_model_len}; use 1..{mcfg.max_position_embeddings} "
                              "(the model's max_position_embeddings)")
        self.eos_token_id = mcfg.eos_token_id
        self.vocab_limit = tokenizer.get_vocab_size() if tokenizer is not None else mcfg.vocab_size
        self.spec = None
        num_layers = mcfg.num_hidden_layers
        if c.speculative is not None:
            if c.speculative != "mtp":
                raise ConfigError(f"speculative = {c.speculative!r}; the only method is 'mtp'")
            if not mcfg.num_nextn_predict_layers:
                raise ConfigError("speculative = 'mtp' needs a checkpoint with an MTP layer "
                                  "(num_nextn_predict_layers = 0 here)")
            num_layers += 1
        cache_dtype = model.model.embed_tokens.weight.dtype
        block_bytes = PagedLatentCache.bytes_per_block(mcfg, num_layers, c.block_size, cache_dtype)
        num_blocks = self._num_blocks(block_bytes)
        if num_blocks < 1:
            raise ConfigError(f"the latent cache gets {num_blocks} blocks of {block_bytes:,} bytes; "
                              "raise cache_bytes or gpu_memory_utilization")
        self.cache = PagedLatentCache(mcfg, num_layers, num_blocks, c.block_size, cache_dtype, self.device,
                                      use_kernel=self.device.type == "cuda")
        self.blocks = BlockManager(num_blocks, c.block_size)
        self.scheduler = Scheduler(self.blocks, c.max_num_seqs, c.max_num_batched_tokens)
        # graphs need a decode step without host syncs: on CUDA the grouped expert GEMM is one kernel
        # in bf16 only (other dtypes loop over experts on the host), so fp32/fp16 models run eager;
        # under EP the dispatchers read split counts back to the host at every layer: eager too, and
        # so is the two-micro-batch schedule (its timeline records timing events: not capturable)
        graphs = (c.cuda_graphs and self.device.type == "cuda" and cache_dtype == torch.bfloat16 and c.ep == 1
                  and c.overlap == "none")
        self.runner = ModelRunner(model, self.cache, c.max_num_seqs, self.max_model_len, cuda_graphs=graphs,
                                  compile=c.compile)
        if c.speculative == "mtp":
            from moeco.serve.spec import MTPDrafter

            self.spec = MTPDrafter(model, self.runner)
        self.requests: dict[str, Sequence] = {}
        self.exports: dict[str, Sequence] = {}  # prefilled, blocks held until sent (disaggregation)
        self.imports: dict[str, Sequence] = {}  # blocks reserved, latents not yet received
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self.generator = torch.Generator(device=self.device).manual_seed(c.seed)
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "finished": 0}

    def _num_blocks(self, block_bytes: int) -> int:
        c = self.config
        if c.cache_bytes is not None:
            return c.cache_bytes // block_bytes
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            in_use = total - free - cached  # weights and whatever else holds memory now
            budget = c.gpu_memory_utilization * total - in_use - 2 * 1024**3  # 2 GiB for activations
            return int(budget // block_bytes)
        return (1 << 30) // block_bytes

    @property
    def capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.config.block_size

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, prefill_only: bool = False) -> str:
        """Queue a request. `prefill_only` (a disaggregated prefill worker): it stops after its first
        token with finish_reason "prefilled" and keeps its blocks for `export_prompt`."""
        seq = self._new_sequence(prompt_token_ids, params, request_id)
        seq.prefill_only = prefill_only
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)
        self.counters["prompt_tokens"] += seq.num_prompt_tokens
        return seq.request_id

    def _new_sequence(self, prompt_token_ids, params, request_id) -> Sequence:
        params = params or SamplingParams()
        params.validate(self.model.config.vocab_size)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests or rid in self.exports or rid in self.imports:
            raise RequestError("request_id", f"request_id {rid!r} is already in use")
        prompt = list(prompt_token_ids)
        if not prompt:
            raise RequestError("prompt", "the prompt is empty; send at least one token")
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_limit]
        if bad:
            raise RequestError("prompt", f"token id {bad[0]!r} is outside [0, {self.vocab_limit})")
        if len(prompt) >= self.max_model_len:
            raise RequestError("prompt", f"the prompt has {len(prompt)} tokens; max_model_len is "
                                         f"{self.max_model_len}, leaving no room for output: shorten it")
        longest = min(len(prompt) + params.max_tokens, self.max_model_len)
        if self.blocks.blocks_for(longest + 1) > self.blocks.num_blocks:
            raise RequestError("max_tokens", f"prompt + max_tokens = {longest} tokens cannot fit the latent cache "
                                             f"({self.capacity_tokens} tokens); lower max_tokens or the prompt")
        seq = Sequence(rid, prompt, len(prompt), params, next(self._arrivals))
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        return seq

    def abort(self, request_id: str) -> None:
        seq = self.requests.pop(request_id, None)
        if seq is not None and not seq.finished:
            self.scheduler.remove(seq)
            seq.status, seq.finish_reason = Status.FINISHED, "abort"
        for held in (self.exports, self.imports):  # a hand-over that will not complete
            seq = held.pop(request_id, None)
            if seq is not None:
                self.blocks.release(seq)

    def has_unfinished(self) -> bool:
        """Requests waiting or running; with ep > 1 on any rank of the EP group (a collective)."""
        local = bool(self.scheduler.waiting or self.scheduler.running)
        return local if self.sync is None else self.sync.any(local)[0]

    # ---- stepping -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        prefill, decode = bool(batch.prefills), bool(batch.decodes)
        if self.sync is not None:  # EP: run every forward any rank runs (its MoE layers are collectives)
            prefill, decode = self.sync.any(prefill, decode)
        sampled: list[tuple[Sequence, list[int]]] = []
        if batch.prefills:
            sampled += self._run_prefill(batch.prefills)
        elif prefill:
            self.runner.idle("plain")
        if batch.decodes:
            sampled += self._run_decode(batch.decodes)
        elif decode:
            self.runner.idle("absorbed")
        outputs = []
        for seq, new in sampled:
            outputs.append(self._append(seq, new))
        return [o for o in outputs if o is not None]

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor):
        if self.vocab_limit < logits.shape[-1]:
            logits = logits.clone()
            logits[:, self.vocab_limit:] = float("-inf")
        p = [s.params for s in seqs]
        greedy = all(x.temperature == 0 for x in p)
        t = torch.tensor([x.temperature for x in p], device=self.device)
        top_p = torch.tensor([x.top_p for x in p], device=self.device)
        top_k = torch.tensor([x.top_k for x in p], device=self.device)
        return sample_rows(logits, t, top_p, top_k, [s.generator for s in seqs], all_greedy=greedy)

    def _run_prefill(self, items):
        h, logits = self.runner.prefill(items)
        done = [(i, seq) for i, (seq, n) in enumerate(items) if seq.num_computed + n == len(seq.token_ids)]
        for seq, n in items:
            seq.num_computed += n
            self.blocks.register_full_blocks(seq)
        if not done:
            return []
        rows = torch.tensor([i for i, _ in done], device=self.device)
        seqs = [s for _, s in done]
        tokens, _ = self._sample(seqs, logits[rows])
        if self.spec is not None:
            self.spec.after_prefill(self, items, h, tokens, done)
        return list(zip(seqs, [[t] for t in tokens.tolist()]))

    def _run_decode(self, seqs):
        if self.spec is not None:
            return self.spec.decode_step(self, seqs)
        h, logits = self.runner.decode(seqs)
        tokens, _ = self._sample(seqs, logits[:, 0])
        for s in seqs:
            s.num_computed += 1
            s.steps += 1
            self.blocks.register_full_blocks(s)
        return list(zip(seqs, [[t] for t in tokens.tolist()]))

    def _append(self, seq: Sequence, new: list[int]) -> RequestOutput | None:
        """Add sampled tokens to a sequence and finish it where a stop condition holds."""
        if seq.finished:
            return None
        if seq.prefill_only:  # hand-over: out of the batch, blocks kept for export_prompt
            seq.token_ids.append(new[0])
            self.scheduler.running.remove(seq)
            seq.status, seq.finish_reason = Status.FINISHED, "prefilled"
            self.requests.pop(seq.request_id, None)
            self.exports[seq.request_id] = seq
            return RequestOutput(seq.request_id, new[:1], True, "prefilled", None, seq.num_prompt_tokens, 1)
        emitted = []
        for tok in new:
            seq.token_ids.append(tok)
            emitted.append(tok)
            reason = self._stop_reason(seq, tok)
            if reason:
                self._finish(seq, reason)
                break
        self.counters["generation_tokens"] += len(emitted)
        return RequestOutput(seq.request_id, emitted, seq.finished, seq.finish_reason, seq.error,
                             seq.num_prompt_tokens, seq.num_output_tokens)

    def _stop_reason(self, seq: Sequence, tok: int) -> str | None:
        p = seq.params
        if (tok == self.eos_token_id and not p.ignore_eos) or tok in p.stop_token_ids:
            return "stop"
        if p.stop and self.tokenizer is not None:
            tail = self.tokenizer.decode(seq.output_ids[-(max(map(len, p.stop)) + 8):])
            if any(s in tail for s in p.stop):
                return "stop"
        if seq.num_output_tokens >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        self.scheduler.remove(seq)
        seq.status, seq.finish_reason, seq.error = Status.FINISHED, reason, error
        self.requests.pop(seq.request_id, None)
        self.counters["finished"] += 1

    # ---- disaggregation: prefill on one engine, decode on another ----------------------------------
    def _prompt_slots(self, seq: Sequence, start: int) -> torch.Tensor:
        bs, pos = self.config.block_size, torch.arange(start, seq.num_prompt_tokens)
        return (torch.tensor(seq.block_table)[pos // bs] * bs + pos % bs).to(self.device)

    def export_prompt(self, request_id: str, skip_tokens: int) -> tuple[dict, torch.Tensor]:
        """A prefilled request's hand-over: (state, latent rows of prompt positions skip_tokens..n-1 of
        every pool layer as bytes, (L * T * latent_dim * dtype bytes,) uint8). Its blocks stay held
        until `release_export`."""
        seq = self.exports[request_id]
        rows_LTC = self.cache.pool[:, self._prompt_slots(seq, skip_tokens)]
        state = {"first_token": seq.token_ids[-1], "draft": seq.draft[0] if seq.draft and seq.draft_probs is None
                 else -1, "generator": seq.generator.get_state() if seq.generator is not None else None}
        return state, rows_LTC.contiguous().view(torch.uint8).flatten()

    def release_export(self, request_id: str) -> None:
        seq = self.exports.pop(request_id, None)
        if seq is not None:
            self.blocks.release(seq)

    def reserve_import(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str) -> int | None:
        """Blocks for a request prefilled elsewhere; returns how many leading prompt tokens are already
        here (prefix-cache hits, not to be sent), or None while the free blocks do not suffice."""
        seq = self._new_sequence(prompt_token_ids, params, request_id)
        if not self.blocks.admit_import(seq):
            return None
        self.imports[request_id] = seq
        return seq.num_cached_prompt_tokens

    def import_bytes(self, request_id: str) -> int:
        seq = self.imports[request_id]
        return (seq.num_prompt_tokens - seq.num_cached_prompt_tokens) * self.cache.bytes_per_token()

    def complete_import(self, request_id: str, state: dict, rows: torch.Tensor) -> RequestOutput:
        """Write the received rows into the reserved blocks; the request joins the running batch with
        its first token (which may already finish it)."""
        seq = self.imports.pop(request_id)
        L, _, C = self.cache.pool.shape
        slots = self._prompt_slots(seq, seq.num_cached_prompt_tokens)
        self.cache.pool[:, slots] = rows.to(self.device).view(self.cache.pool.dtype).view(L, len(slots), C)
        seq.num_computed = seq.num_prompt_tokens
        self.blocks.register_full_blocks(seq)
        seq.draft = [state["draft"]] if state.get("draft", -1) >= 0 and self.spec is not None else []
        if state.get("generator") is not None and seq.generator is not None:
            seq.generator.set_state(state["generator"])
        seq.status = Status.RUNNING
        self.requests[request_id] = seq
        self.scheduler.running.append(seq)
        self.counters["prompt_tokens"] += seq.num_prompt_tokens
        return self._append(seq, [state["first_token"]])

    # ---- reporting ------------------------------------------------------------------------------
    def stats(self) -> dict:
        b = self.blocks
        return {
            "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
            "free_blocks": b.num_free, "total_blocks": b.num_blocks,
            "cache_usage": 1 - b.num_free / b.num_blocks, "capacity_tokens": self.capacity_tokens,
            "prefix_cache_hit_rate": b.hit_rate, "pending_transfers": len(self.exports) + len(self.imports), "num_preemptions": self.scheduler.num_preemptions,
            "spec_acceptance_rate": (self.spec.accepted / self.spec.proposed
                                     if self.spec and self.spec.proposed else None),
            **self.counters,
        }
