"""The training loop: data -> model -> loss -> AdamW step -> balance hook -> metrics -> checkpoint.

One optimizer step over a global batch of B sequences of S tokens (inputs t[:, :S], labels t[:, 1:]):

    for each micro-step a < A (this rank's b sequences):
        out   = model(inputs, return_mtp=True, return_aux=True)
        L_LM  = CE(out.logits, labels)
        L_MTP = 1/D sum_k CE(out.mtp_logits[k-1], labels[:, k:])          (D = num_nextn_predict_layers)
        L     = L_LM + lambda L_MTP + alpha * out.balance_loss             (alpha = model.aux_loss_alpha)
        (L / A).backward()              DDP averages over R ranks: the gradient of the global-batch mean
    clip ||g|| to grad_clip; AdamW(beta 0.9/0.95, wd 0.1 on matrices); lr = warmup, then cosine
    balance hook: all-reduce expert loads, bias -= gamma sign(load - mean), zero the counts

Data parallelism is torch DDP over torchrun's process group (gloo on CPU, NCCL on GPU) with
`broadcast_buffers=False`: each rank keeps its own expert counts until the hook sums them, and the
routing bias stays identical on every rank because every rank applies the same summed update. The
model itself never calls torch.distributed. With `parallel.ep > 1` (moeco.parallel) each rank keeps
only its range of the routed experts and an all-to-all dispatcher in each MoE layer; DDP skips the
expert parameters, whose gradients are reduced over their replicas, the clipping norm counts every
shard once, and checkpoints are written by every rank for its own experts.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from moeco.config import ModelConfig
from moeco.errors import ConfigError, DataError
from moeco.parallel.dist import Dist  # noqa: F401 (re-exported: the trainer's rank bookkeeping)
from moeco.train import metrics as M
from moeco.train.balance import BalanceHook, ImbalanceWatch
from moeco.train.checkpointing import CheckpointManager
from moeco.train.config import TrainConfig
from moeco.train.cuda_graph import GraphedStep, portable_state_dict, set_lr
from moeco.train.data import BatchLoader, PackedData, rank_slice
from moeco.train.guard import NonFiniteGuard
from moeco.train.run_dir import RunDir, prepare_run


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to lr * min_lr_ratio."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def lm_losses(out, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(LM loss, mean MTP loss over depths) in float32; MTP is 0 when the model has no MTP modules."""
    V = out.logits.shape[-1]
    lm = F.cross_entropy(out.logits.float().reshape(-1, V), labels.reshape(-1))
    mtp = [F.cross_entropy(logits.float().reshape(-1, V), labels[:, k:].reshape(-1))
           for k, logits in enumerate(out.mtp_logits, start=1)]
    return lm, (torch.stack(mtp).mean() if mtp else lm.new_zeros(()))


def _recipe(precision: str):
    if not precision.startswith("fp8"):
        return None
    try:
        from moeco.fp8.recipe import recipe_by_name
    except ImportError:
        raise ConfigError("train.precision = 'fp8' needs moeco.fp8.recipe, which this install lacks; "
                          "use bf16 or fp32") from None
    return recipe_by_name(precision, environ=os.environ)  # MOECO_FP8_* set the kernel choices, read once here


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return torch.bfloat16


class Trainer:
    def __init__(self, cfg: TrainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
                 verbose: bool = True, on_step: Callable[[int, dict], None] | None = None) -> None:
        from moeco.parallel.mesh import MeshSpec

        # Checked from the environment and the config alone, so every rank fails alike before any collective.
        self.mesh_spec = MeshSpec.from_env(cfg.ep, cfg.gpus_per_node)
        self.mesh_spec.check_model(cfg.model_config())
        self.dist = Dist(cfg.device, timeout_s=cfg.timeout_s)
        try:
            self._setup(cfg, Path(out), resume, overwrite, verbose)
        except BaseException:
            if hasattr(self, "run_dir"):
                self.run_dir.release()
            self.dist.close()
            raise
        self.on_step = on_step

    # ---- setup ------------------------------------------------------------------------------
    def _setup(self, cfg: TrainConfig, out: Path, resume: bool, overwrite: bool, verbose: bool) -> None:
        d = self.dist
        # Everything is checked (and the data prepared in memory) before anything in OUT is written.
        if cfg.cuda_graph and d.device.type != "cuda":
            raise ConfigError(f"train.cuda_graph = true needs a CUDA device, not {d.device}; "
                              "set train.cuda_graph = false")
        if cfg.cuda_graph and _autocast_dtype(cfg.precision, d.device) is None:
            raise ConfigError("train.cuda_graph = true needs train.precision bf16 or fp8, not fp32 (FP32 experts "
                              "run one GEMM per expert, sized on the host, which a CUDA graph cannot hold); "
                              "set train.precision = \"bf16\" or train.cuda_graph = false")
        if cfg.cuda_graph and d.world > 1:
            raise ConfigError(f"train.cuda_graph = true runs one process, not {d.world} (torchrun); "
                              "set train.cuda_graph = false for data parallelism")
        self.run_dir: RunDir = prepare_run(cfg, out, resume=resume, overwrite=overwrite, dist=d)
        cfg = self.cfg = self.run_dir.cfg
        self.mcfg: ModelConfig = self.run_dir.model_config
        self.micro = cfg.micro_batch_size or cfg.batch_size // d.world
        self.accum = cfg.batch_size // (d.world * self.micro)
        self.data: PackedData = self.run_dir.data
        self.loader = BatchLoader(len(self.data.train_index), cfg.batch_size, cfg.seed)
        self.ckpt = CheckpointManager(out / "checkpoints", cfg.keep_checkpoints)
        self.autocast = _autocast_dtype(cfg.precision, d.device)
        recipe = _recipe(cfg.precision)

        from moeco import Transformer, load_pretrained

        self.step = 0
        latest = self.run_dir.resume_from
        ep = self.mesh_spec.ep
        if latest is not None:
            self.mesh_spec.check_model(self.mcfg)
            from moeco.parallel.dist import agree

            model = agree(lambda: load_pretrained(latest / "model", dtype=torch.float32, device=d.device,
                                                  recipe=recipe, ep_rank=self.mesh_spec.ep_rank, ep_size=ep), d.world)
        elif ep > 1:  # build on meta, keep this rank's experts, then draw only its weights
            from moeco.parallel.expert_parallel import shard_experts

            self.mesh_spec.check_model(self.mcfg)
            torch.manual_seed(cfg.seed)
            with torch.device("meta"):
                model = Transformer(self.mcfg, recipe=recipe)
            shard_experts(model, self.mesh_spec)
            model.to_empty(device=d.device)
            model.reset_parameters()  # the single-process values: every matrix, each expert, its own seed
            model.reset_buffers(d.device)
        else:
            torch.manual_seed(cfg.seed)
            with torch.device(d.device):  # initialise on the device: seconds, not minutes, for a 3B model
                model = Transformer(self.mcfg, recipe=recipe)
        model.train()
        from moeco.comm import apply_codecs

        apply_codecs(model, cfg.dispatch_codec, cfg.combine_codec)  # the wire formats, in one process
        self.model = model
        self.mesh, self.traffic = None, None
        if ep > 1:  # shard the routed experts before the optimizer sees the parameters
            from moeco.parallel.expert_parallel import apply_expert_parallel
            from moeco.parallel.mesh import Mesh

            self.mesh = Mesh(self.mesh_spec)
            self.traffic = apply_expert_parallel(model, self.mesh, cfg.dispatcher, cfg.fp8_dispatch)
        from moeco.parallel.overlap import set_overlap

        self.overlap = set_overlap(model, cfg.overlap)  # two micro-batches, forward and backward (none: plain)
        if self.overlap is not None:
            self.overlap.keep = 1024  # every forward of a step (accumulation micro-steps) and its backward
        self.optimizer = self._optimizer(model)
        self.balance = BalanceHook(model, cfg.balance_gamma())
        self.imbalance = ImbalanceWatch(cfg.balance_gamma())
        self.guard = NonFiniteGuard(cfg.max_nonfinite_steps, self.ckpt.latest)
        if latest is not None:
            self._load_trainer_state(CheckpointManager.load_trainer_state(latest))
        else:
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            np.random.seed(cfg.seed % 2**32)

        self.forward = model
        if d.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            if self.mesh is not None:  # expert gradients are reduced over their replicas, not by DDP
                from moeco.parallel.expert_parallel import expert_param_names

                DDP._set_params_and_buffers_to_ignore_for_model(model, expert_param_names(model))
            self.forward = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                               broadcast_buffers=False)
        if cfg.compile:
            # Regional compilation: each decoder block compiles on its own, and blocks of one shape
            # share the compiled code, so compile time is that of a layer or two, not of the whole
            # unrolled model (which took over 225 s for `small` on the H200).
            from moeco.model.transformer import Block

            for block in model.modules():
                if isinstance(block, Block):
                    block.compile()

        self.graphed = (GraphedStep(self._compute, self.optimizer, d.device, self._zero_grad)
                        if cfg.cuda_graph else None)

        self.flops_per_token = M.flops_per_token(self.mcfg, cfg.seq_len)
        name = torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu"
        self.peak = M.peak_flops(name, cfg.peak_tflops)
        self.device_name = name
        self.log = M.MetricsLog(out / "metrics.jsonl", resume_step=self.step) if d.main else None
        self.progress = M.Progress(cfg.steps, self.step, enabled=verbose and d.main)

    def _optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        betas = (self.cfg.beta1, self.cfg.beta2)
        if self.cfg.moment_dtype() == "bf16":  # DeepSeek-V3: BF16 moments over FP32 master weights
            from moeco.train.optim import AdamWBF16Moments

            return AdamWBF16Moments(groups, lr=self.cfg.lr, betas=betas)
        fused = {"fused": True} if self.dist.device.type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=betas, **fused)

    # ---- state -------------------------------------------------------------------------------
    def _trainer_state(self) -> dict:
        state = {
            "step": self.step,
            "optimizer": portable_state_dict(self.optimizer),
            "scheduler": {"step": self.step, "lr": lr_at(max(self.step - 1, 0), self.cfg)},
            "loader": self.loader.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                    "python_version": random.getstate()[0], "python_gauss": random.getstate()[2],
                    "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
                    "numpy_pos": int(np.random.get_state()[2])},
            "world_size": self.dist.world,
        }
        if self.dist.device.type == "cuda":
            state["rng"]["cuda"] = torch.cuda.get_rng_state(self.dist.device)
        return state

    def _load_trainer_state(self, state: dict) -> None:
        self.step = int(state["step"])
        if state.get("ep", 1) > 1 or self.mesh is not None:  # expert moments saved whole: take this rank's range
            from moeco.parallel.checkpoint import shard_optimizer_state

            state["optimizer"] = shard_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))
        np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), rng["numpy_pos"], 0, 0.0))
        if "cuda" in rng and self.dist.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.dist.device)

    def save_checkpoint(self) -> Path | None:
        if self.cfg.keep_checkpoints == 0:  # only the final model/ (written by _finish)
            return None
        if self.mesh is not None:
            return self._save_checkpoint_ep()
        path = None
        if not self.guard.ok:  # the weights took a NaN/inf update: keep the last good checkpoint as latest
            return None
        self.guard.check_weights(self.model, self.step)
        if self.dist.main:
            tok = self.run_dir.tokenizer_files()
            path = self.ckpt.save(self.step, lambda p: self.model.save_pretrained(p, extra_files=tok),
                                  self._trainer_state())
        self.dist.barrier()
        return path

    def _save_checkpoint_ep(self) -> Path | None:
        """Expert parallelism: each rank of the first EP group writes its experts (moeco.parallel.checkpoint)."""
        from moeco.parallel.checkpoint import gather_optimizer_state, save_sharded

        state = self._trainer_state()
        state["optimizer"] = gather_optimizer_state(self.model, self.optimizer, self.mesh, state["optimizer"])
        state["ep"] = self.mesh.spec.ep
        staged = self.ckpt.root / f".tmp-ep-model-{self.step:08d}"  # removed after a crash like any .tmp-
        save_sharded(self.model, staged, self.mesh, extra_files=self.run_dir.tokenizer_files())
        path = None
        if self.dist.main:
            import shutil

            path = self.ckpt.save(self.step, lambda p: shutil.move(str(staged), str(p)), state)
        self.dist.barrier()
        return path

    def _save_model(self, path: Path) -> None:
        """The final model: sharded under expert parallelism (every rank calls it), else rank 0 writes it."""
        if self.mesh is not None:
            from moeco.parallel.checkpoint import save_sharded

            save_sharded(self.model, path, self.mesh, extra_files=self.run_dir.tokenizer_files())
        elif self.dist.main:
            self.model.save_pretrained(path, extra_files=self.run_dir.tokenizer_files())

    # ---- the loop ----------------------------------------------------------------------------
    def _autocast_ctx(self, cache: bool = True):
        if self.autocast is None:
            return contextlib.nullcontext()
        # A captured CUDA graph must not keep autocast's cached weight casts (cache=False then).
        return torch.autocast(self.dist.device.type, dtype=self.autocast, cache_enabled=cache)

    def _weight_cache(self):
        """The FP8 recipe's `weight_cache()` around an optimizer step's micro-steps, where it saves work:
        FP8 precision, more than one micro-step, and `train.fp8_weight_cache`."""
        if self.accum > 1 and self.cfg.fp8_weight_cache and self.cfg.precision.startswith("fp8"):
            return self.model.recipe.weight_cache()
        return contextlib.nullcontext()

    def _compute(self, batch_ABS: torch.Tensor, graph_mode: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a device batch of A micro-steps: forward, backward, clip, AdamW.

        Returns (loss sums (4,), grad norm) as device tensors and reads nothing back to the host, so
        that `GraphedStep` can capture it (`graph_mode`: its warm-up steps and the capture, which
        turn autocast's weight cache off). Gradients are left in place (the caller zeroes them).
        """
        cfg, d = self.cfg, self.dist
        alpha = self.mcfg.aux_loss_alpha
        sums = torch.zeros(4, device=d.device)  # loss, lm, mtp, balance (this rank's mean over micro-steps)
        with self._weight_cache():  # FP8 weights quantized once for all micro-steps (the optimizer runs after)
            for a in range(self.accum):
                seqs = batch_ABS[a]
                inputs, labels = seqs[:, :-1], seqs[:, 1:]
                sync = d.world == 1 or a == self.accum - 1
                ctx = contextlib.nullcontext() if sync else self.forward.no_sync()
                with ctx:
                    with self._autocast_ctx(cache=not graph_mode):
                        out = self.forward(inputs, return_mtp=True, return_aux=True)
                    lm, mtp = lm_losses(out, labels)
                    bal = out.balance_loss.float()
                    loss = lm + cfg.mtp_lambda * mtp + alpha * bal
                    (loss / self.accum).backward()
                sums += torch.stack([loss, lm, mtp, bal]).detach() / self.accum
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        if self.mesh is not None:
            from moeco.parallel.expert_parallel import clip_grad_norm_sharded, reduce_expert_grads

            reduce_expert_grads(self.model, self.mesh)
            grad_norm = clip_grad_norm_sharded(self.model, self.mesh, clip)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        return sums, grad_norm

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(self) -> dict:
        cfg, d = self.cfg, self.dist
        lr = lr_at(self.step, cfg)
        set_lr(self.optimizer, lr)
        batch = self.data.train_index[self.loader.next_batch()]
        t0 = time.perf_counter()
        batch_ABS = torch.stack([self.data.sequences(rank_slice(batch, a, d.rank, d.world, self.micro))
                                 for a in range(self.accum)])
        if self.overlap is not None:
            self.overlap.history = []
        if self.traffic is not None:
            self.traffic.reset()
        if self.graphed is not None:
            sums, grad_norm = self.graphed(batch_ABS)
        else:
            sums, grad_norm = self._compute(batch_ABS.to(d.device))
            self._zero_grad()
        load = self.balance.step()
        self.step += 1
        means = d.mean(sums).tolist()
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)
        dt = time.perf_counter() - t0
        tokens_per_s = cfg.batch_size * cfg.seq_len / dt
        traffic = {}
        if self.traffic is not None:  # forward bytes of every MoE layer this step, summed over ranks
            from moeco.parallel.route import TrafficCounter

            traffic = TrafficCounter.summary(d.sum(self.traffic.as_vector().to(d.device)).cpu())
        if self.overlap is not None and self.overlap.history:  # this rank's spans (moeco.parallel.overlap)
            from moeco.parallel.overlap import STAT_FIELDS

            for phase, prefix in (("forward", "overlap_"), ("backward", "overlap_bwd_")):
                st = self.overlap.stats(phase)
                traffic.update({prefix + k: getattr(st, k) for k in STAT_FIELDS})
        return {**traffic,
            "step": self.step, "loss": means[0], "lm_loss": means[1], "mtp_loss": means[2],
            "balance_loss": means[3], "lr": lr, "grad_norm": float(grad_norm),
            "tokens": self.step * cfg.batch_size * cfg.seq_len, "step_time_s": dt,
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self.flops_per_token / (d.world * self.peak) if self.peak else None,
            "expert_load": load, "expert_counts": self.balance.last_counts,
        }

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean LM loss over the first eval_batches x batch_size validation sequences (sharded over ranks)."""
        cfg, d = self.cfg, self.dist
        self.model.eval()
        n = min(len(self.data.val_index), cfg.eval_batches * cfg.batch_size)
        if self.mesh is not None:  # every rank must run as many forwards (their MoE layers talk to each other)
            n = max(d.world, n - n % d.world)
        mine = self.data.val_index[:n][d.rank::d.world]
        totals = torch.zeros(2, dtype=torch.float64, device=d.device)
        for start in range(0, len(mine), self.micro):
            seqs = self.data.sequences(mine[start:start + self.micro]).to(d.device)
            with self._autocast_ctx():
                logits = self.model(seqs[:, :-1]).logits
            V = logits.shape[-1]
            totals[0] += F.cross_entropy(logits.float().reshape(-1, V), seqs[:, 1:].reshape(-1),
                                         reduction="sum").double()
            totals[1] += seqs[:, 1:].numel()
        self.model.train()
        self.balance.discard_counts()
        totals = d.sum(totals)
        return float(totals[0] / totals[1])

    def run(self) -> dict:
        cfg, d = self.cfg, self.dist
        start, t_start = self.step, time.perf_counter()
        self._say(f"moeco train: {self.mcfg_summary()}")
        self._say(f"  data: {self.run_dir.data_source}; {self.data.n_tokens:,} tokens, "
                  f"{len(self.data.train_index)} train / {len(self.data.val_index)} val sequences of {cfg.seq_len}")
        self._say(f"  batch {cfg.batch_size} = {self.accum} micro-steps x {d.world} ranks x {self.micro}; "
                  f"{cfg.steps} steps; device {self.device_name}; precision "
                  f"{'bf16 autocast' if self.autocast else 'fp32'}{' (fp8 recipe)' if cfg.precision.startswith('fp8') else ''}"
                  + ("; CUDA graph from step 3" if cfg.cuda_graph else "")
                  + (f"; resuming at step {start}" if start else ""))
        if cfg.precision.startswith("fp8") and d.device.type == "cuda" and d.world == 1 and not cfg.cuda_graph:
            self._say("  hint: --set train.cuda_graph=true replays each step as one CUDA graph; the FP8 step is "
                      "host-bound without it (small on an H200: 333 -> 250 ms)")
        record: dict = {}
        val_loss = None
        try:
            while self.step < cfg.steps:
                record = self.train_step()
                last = self.step == cfg.steps
                if last or (cfg.eval_interval and self.step % cfg.eval_interval == 0):
                    val_loss = self.evaluate()
                    record["val_loss"], record["val_ppl"] = val_loss, M.perplexity(val_loss)
                if self.log is not None:
                    self.log.write(record)
                self.progress.update(record)
                if self.step % cfg.log_interval == 0 or last or self.step == start + 1 or "val_loss" in record:
                    self.progress.print(M.format_line(record))
                self.guard.update(record)
                self.imbalance.update(record)
                if self.on_step is not None:
                    self.on_step(self.step, record)
                if not last and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
            self.guard.before_publishing()
            if self.step not in self.ckpt.steps() and self.step > 0:
                self.save_checkpoint()
            summary = self._finish(record, val_loss, time.perf_counter() - t_start, self.step - start)
        finally:
            self.progress.close()
            if self.log is not None:
                self.log.close()
        return summary

    def _finish(self, record: dict, val_loss: float | None, wall: float, steps_run: int) -> dict:
        out = self.run_dir.out
        summary = {"steps": self.step, "wall_s": wall, "final_loss": record.get("loss"),
                   "val_loss": val_loss, "val_ppl": M.perplexity(val_loss) if val_loss is not None else None,
                   "tokens_per_s": steps_run * self.cfg.batch_size * self.cfg.seq_len / wall if wall else None,
                   "model_dir": str(out / "model"), "out": str(out)}
        self._save_model(out / "model")
        if self.dist.main:
            plots = M.write_plots(M.read_metrics(out / "metrics.jsonl"), out / "plots")
            summary["plots"] = [str(p) for p in plots]
            self._say(f"done: {self.step} steps in {wall:.0f} s"
                      + (f", {summary['tokens_per_s']:,.0f} tokens/s" if summary["tokens_per_s"] else "")
                      + (f"; validation loss {val_loss:.4f}, perplexity {summary['val_ppl']:.1f}"
                         if val_loss is not None else ""))
            self._say(f"  model:       {out / 'model'}  (config.json, safetensors, tokenizer.json)")
            self._say(f"  checkpoints: {out / 'checkpoints'}  (resume with: moeco train --resume {out})")
            self._say(f"  metrics:     {out / 'metrics.jsonl'}")
            self._say(f"  plots:       {', '.join(str(p) for p in plots)}")
            self._say(f"  config:      {out / 'train_config.toml'}")
            if self.traffic is not None and "ep_inter_rows_per_token" in record:
                from moeco.parallel.traffic import planner_rows

                s = self.mesh_spec
                want = planner_rows(self.mcfg, s.ep_nodes, s.ep_gpus_per_node, self.cfg.dispatcher)
                self._say(f"  experts:     {self.cfg.dispatcher} dispatch over {s.ep_nodes} node(s) x "
                          f"{s.ep_gpus_per_node}: {record['ep_inter_rows_per_token']:.2f} copies/token between "
                          f"nodes, {record['ep_inter_bytes_per_token']:,.0f} bytes/token/layer (last step)"
                          + (f"; planner {want:.2f} copies for balanced routing" if want is not None else ""))
        self.dist.barrier()
        return summary

    def mcfg_summary(self) -> str:
        c = self.mcfg
        n = sum(p.numel() for p in self.model.parameters())
        return (f"{n / 1e6:.1f}M parameters ({M.active_matmul_params(c) / 1e6:.1f}M active matmul), "
                f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.n_routed_experts} routed experts "
                f"(top {c.num_experts_per_tok}) + {c.n_shared_experts} shared, MTP depth "
                f"{c.num_nextn_predict_layers}, vocab {c.vocab_size}")

    def _say(self, text: str) -> None:
        self.progress.print(text)

    def close(self) -> None:
        self.run_dir.release()
        self.dist.close()


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
          verbose: bool = True, on_step: Callable[[int, dict], None] | None = None) -> dict:
    trainer = Trainer(cfg, out, resume=resume, overwrite=overwrite, verbose=verbose, on_step=on_step)
    try:
        return trainer.run()
    finally:
        trainer.close()


__all__ = ["Trainer", "train", "lr_at", "lm_losses", "DataError"]
